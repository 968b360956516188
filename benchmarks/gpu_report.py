"""The GPU check's measurements: environment, bf16 and fp32 matmul ceilings, a bf16 training run.

Run by ``benchmarks/gpu_check.sh`` on a machine with a GPU; it writes
``benchmarks/results/gpu-<card>.md``. Every figure in that file is measured here, except the
datasheet peaks, which are quoted with their source. Without CUDA it says so and writes nothing.

    python -m benchmarks.gpu_report [--model xl] [--vocab-size 50304] [--steps 30] [--batch 16] [--compile]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

import labkit
from labkit.perf import machine_info, peak_matmul_flops

RESULTS = Path(__file__).resolve().parent / "results"

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, FLOP/s.
DATASHEET_BF16 = {
    "H200": (989e12, "NVIDIA H200 datasheet (SXM): 1,979 TFLOPS with sparsity, half dense"),
    "H100": (989e12, "NVIDIA H100 datasheet (SXM): 1,979 TFLOPS with sparsity, half dense"),
    "A100": (312e12, "NVIDIA A100 datasheet: 312 TFLOPS bf16 dense"),
    "L4": (121e12, "NVIDIA L4 datasheet: 242 TFLOPS with sparsity, half dense"),
    "B200": (
        2250e12,
        "NVIDIA B200 datasheet: 4.5 PFLOPS bf16 with sparsity, half dense",
    ),
}


def datasheet(card: str) -> tuple[float, str] | None:
    """The datasheet peak of ``card`` (matched by its model number), or None."""
    for name, value in DATASHEET_BF16.items():
        if name in card:
            return value
    return None


def run(argv: list[str]) -> int:
    """Measure and write the report."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_report")
    parser.add_argument("--model", default="xl")
    parser.add_argument("--vocab-size", type=int, default=50304, help="GPT-2's padded tokenizer")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--compile", action="store_true", help="TrainConfig.compile=True")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no GPU visible: nothing measured, nothing written")
        return 0
    card = torch.cuda.get_device_name(0)
    sizes = (2048, 4096, 8192)
    bf16 = max(peak_matmul_flops("cuda", torch.bfloat16, sizes).values())
    fp32 = max(peak_matmul_flops("cuda", torch.float32, sizes).values())
    result = labkit.run(
        model=args.model,
        vocab_size=args.vocab_size,
        compile=args.compile,
        steps=args.steps,
        global_batch_size=args.batch,
        precision="bf16",
        device="cuda",
        eval_every=0,
        progress=False,
    )
    steady = result.metrics[result.metrics["step"] >= 5]
    achieved = float(steady["flops_per_s"].median())
    tokens = float(steady["tokens_per_s"].median())
    mem = result.memory.iloc[0]
    sheet = datasheet(card)
    lines = [
        f"# GPU check on {card}",
        "",
        "Command: `bash benchmarks/gpu_check.sh` (this file: `python -m benchmarks.gpu_report "
        + " ".join(argv)
        + "`)",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in machine_info().items()),
        f"| CUDA | {torch.version.cuda} |",
        f"| NCCL | {'.'.join(map(str, torch.cuda.nccl.version()))} |",
        "",
        "| measured | value |",
        "|---|---|",
        f"| bf16 matmul ceiling (best of {sizes}) | {bf16 / 1e12:.1f} TFLOP/s |",
        f"| fp32 matmul ceiling (best of {sizes}) | {fp32 / 1e12:.1f} TFLOP/s |",
        f"| train {args.model} (vocab {args.vocab_size}, compile={args.compile}), bf16, batch "
        f"{args.batch}: median step | "
        f"{float(steady['step_time_s'].median()) * 1e3:.1f} ms |",
        f"| tokens/s | {tokens:,.0f} |",
        f"| achieved (6N + attention FLOPs) | {achieved / 1e12:.1f} TFLOP/s |",
        f"| MFU vs the measured bf16 ceiling | {achieved / bf16:.1%} |",
        f"| peak allocated (torch.cuda.max_memory_allocated) | {mem['peak_bytes'] / 2**30:.2f} GiB |",
        f"| peak reserved (torch.cuda.max_memory_reserved) | "
        f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB |",
    ]
    if sheet is not None:
        lines.append(f"| MFU vs the datasheet bf16 peak ({sheet[1]}) | {achieved / sheet[0]:.1%} |")
    text = "\n".join(lines) + "\n"
    print(text)
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"gpu-{slug}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
