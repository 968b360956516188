"""The ``labkit`` command: ``labkit train ...`` and ``labkit bench ...``.

``labkit train`` takes every TrainConfig field as a flag (``--world-size 2``), generated from the
dataclass so the two can never drift apart. Under ``torchrun`` the same command runs one rank per
process (``torchrun --nproc-per-node 2 -m labkit train --strategy ddp``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from pathlib import Path
from typing import Any

from labkit import config as C
from labkit.config import TrainConfig

BENCHMARKS = ("peak", "clip", "dp", "pp", "tp", "mesh", "start", "plan")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, not a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, and the epilog's table printed as written."""


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _bool_or_name(text: str) -> bool | str:
    try:
        return _bool(text)
    except argparse.ArgumentTypeError:
        return text.strip()


def _optional(kind: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _key_values(text: str) -> dict[str, Any]:
    """``"num_cycles=2,power=1.5"`` -> ``{"num_cycles": 2, "power": 1.5}``."""
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"expected key=value, got {item!r}")
        key, raw = item.split("=", 1)
        for kind in (int, float):
            try:
                out[key.strip()] = kind(raw)
                break
            except ValueError:
                continue
        else:
            out[key.strip()] = raw
    return out


# Allowed values shown in --help for the fields that take a name.
CHOICES = {
    "model": C.MODELS,
    "norm": C.NORMS,
    "corpus": C.CORPORA,
    "optimizer": C.OPTIMIZERS,
    "clip": C.CLIP_METHODS,
    "nonfinite": C.NONFINITE,
    "precision": C.PRECISIONS,
    "recompute": C.RECOMPUTE,
    "compile": ("true", "false", *C.COMPILE_BACKENDS),
    "strategy": C.STRATEGIES,
    "dp_impl": C.DP_IMPLS,
    "pp_schedule": C.PP_SCHEDULES,
    "backend": C.BACKENDS,
    "device": C.DEVICES,
    "pp_balance": C.PP_BALANCE,
}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        # Mesh fields left unset are derived from the others: their flag defaults to unset too.
        default = None if f.name in C.DERIVED_FIELDS else getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if kind == "bool | str":  # --compile true / false / a backend name
            parse: Any = _bool_or_name
        elif "bool" in kind:
            parse = _bool
        elif "dict" in kind:
            parse, default = _key_values, ",".join(f"{k}={v}" for k, v in default.items())
        elif "tuple" in kind:
            parse, default = (lambda s: tuple(filter(None, s.split(",")))), ",".join(default)
        elif kind.startswith("int"):
            parse = _optional(int) if "None" in kind else int
        elif kind.startswith("float"):
            parse = float
        else:
            parse = _optional(str) if "None" in kind else str
        allowed = CHOICES.get(f.name)
        text = "one of: " + ", ".join(allowed) if allowed else f"TrainConfig.{f.name}"
        parser.add_argument(
            flag, dest=f.name, type=parse, default=default, metavar=f.name.upper(), help=text
        )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``labkit`` command."""
    parser = _Parser(prog="labkit", description="Train and benchmark with labkit.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    from labkit.parallel.presets import describe

    train = sub.add_parser(
        "train",
        help="train a model with any strategy",
        formatter_class=_HelpFormatter,
        epilog="strategies (presets over the dp x pp x cp x tp mesh; or set --dp/--pp/--cp/--tp):\n"
        + describe(),
    )
    _add_config_flags(train)
    train.add_argument("--csv", default="labkit-metrics.csv", help="where to write the metrics")
    bench = sub.add_parser("bench", help="run a benchmark (ratios measured side by side)")
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    return parser


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or (
        "RANK" in os.environ and "LOCAL_RANK" in os.environ
    )


def _train(args: argparse.Namespace) -> int:
    from labkit.launch import WorkerError, run, run_under_torchrun
    from labkit.preflight import check_output_file

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        given = {k: v for k, v in vars(args).items() if k in fields}
        cfg = TrainConfig(
            **{k: v for k, v in given.items() if not (k in C.DERIVED_FIELDS and v is None)}
        )
        check_output_file(args.csv, "--csv")  # before training, not after it
        if _under_torchrun():
            result = run_under_torchrun(cfg)
            if result is None:  # not global rank 0: rank 0 reports
                return 0
        else:
            result = run(cfg)
    except ValueError as err:
        print(f"labkit train: error: {err}", file=sys.stderr)
        return 2
    except WorkerError as err:
        print(f"labkit train: {err}", file=sys.stderr)
        return 1
    result.to_csv(args.csv)
    with_pd_options(lambda: print(result.summary().to_string(float_format=lambda v: f"{v:.4g}")))
    cfg = result.config  # under torchrun: the world size torchrun actually started
    first, last = result.losses.iloc[0], result.losses.iloc[-1]
    val = result.metrics[result.metrics["rank"] == 0].dropna(subset=["val_loss"])
    val_text = " -> ".join(f"{v:.3f} (step {s + 1})" for s, v in zip(val.step, val.val_loss))
    print(
        f"\n{cfg.label}, {cfg.steps} steps in "
        f"{result.info.get('wall_s', 0):.1f} s: training loss {first:.3f} -> {last:.3f}; "
        f"validation loss {val_text}; metrics written to {args.csv}"
    )
    return 0


def with_pd_options(fn: Any) -> None:
    """Run ``fn`` with pandas printing wide tables on one line."""
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 20):
        fn()


def _bench(args: argparse.Namespace) -> int:
    # Benchmarks live beside the package (benchmarks/ at the repository root).
    root = Path(__file__).resolve().parents[1]
    if (root / "benchmarks").is_dir() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    module = importlib.import_module(f"benchmarks.bench_{args.name}")
    return int(module.run(args.args) or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``labkit`` and ``python -m labkit``."""
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return _train(args)
    return _bench(args)


if __name__ == "__main__":
    raise SystemExit(main())
