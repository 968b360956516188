"""Helpers for notebook 00, the tour: what machine this is, and what a first loss should be.

* ``describe_machine``: the device and communication backend that ``device="auto"`` picks here,
  the CPU cores and GPUs, and the library versions, as a small table.
* ``uniform_loss``: the loss of a model that guesses every token with equal probability,
  ``ln(vocab_size)``: an untrained model starts close to it.
"""

from __future__ import annotations

import math
import os
import platform

import pandas as pd
import torch

from labkit.config import TrainConfig
from labkit.data import load_corpus

__all__ = ["describe_machine", "machine_facts", "uniform_loss"]


def machine_facts() -> dict[str, object]:
    """Facts about this machine as a dict (see ``describe_machine`` for the table)."""
    # Imported here: launch pulls in torch.distributed, which the rest of this module does not need.
    from labkit.launch import resolve_device

    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    # What labkit.run(device="auto") would choose for a multi-process data-parallel run.
    device, backend = resolve_device(
        TrainConfig(model="nano", strategy="ddp", world_size=max(1, n_gpus))
    )
    gpu_names = sorted({torch.cuda.get_device_name(i) for i in range(n_gpus)})
    return {
        "device": device,
        "backend": backend,
        "gpus": n_gpus,
        "gpu_model": ", ".join(gpu_names) or "-",
        "cpu_cores": os.cpu_count() or 1,
        "torch_threads": torch.get_num_threads(),
        "ranks_suggested": n_gpus if n_gpus else 2,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


_EXPLAIN = {
    "device": "where tensors live and the maths runs",
    "backend": "how processes talk: NCCL between GPUs, Gloo between CPU processes",
    "gpus": "CUDA GPUs visible to PyTorch",
    "gpu_model": "the GPU model(s)",
    "cpu_cores": "logical CPU cores (os.cpu_count)",
    "torch_threads": "threads one PyTorch process uses for its maths",
    "ranks_suggested": "world_size for the data-parallel lessons: one rank per GPU, else 2",
    "python": "Python version",
    "torch": "PyTorch version",
}


def describe_machine() -> pd.DataFrame:
    """A table of this machine: device and backend that labkit picks, cores, GPUs, versions."""
    facts = machine_facts()
    rows = [
        {"what": key, "value": str(value), "meaning": _EXPLAIN[key]} for key, value in facts.items()
    ]
    return pd.DataFrame(rows).set_index("what")


def uniform_loss(corpus: str = "pydoc") -> float:
    """``ln(vocab_size)``: the cross-entropy of guessing every token with equal probability."""
    return math.log(load_corpus(corpus).vocab_size)
