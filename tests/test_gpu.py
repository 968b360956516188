"""The GPU path: CUDA training, bf16 autocast, the allocator's memory, NCCL.

Tests marked ``gpu`` skip where no GPU is visible (see conftest.py); ``benchmarks/gpu_check.sh``
runs them on a GPU machine. The tests without the mark check, on any machine, what labkit does
when a run asks for more ranks than there are GPUs.
"""

from __future__ import annotations

import pytest
import torch

import labkit
from labkit import launch
from labkit.launch import resolve_device

NANO = dict(model="nano", steps=6, global_batch_size=8, progress=False)


def _one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_two_ranks_on_one_gpu_are_refused_before_launch(monkeypatch):
    _one_gpu(monkeypatch)

    def no_workers(*args, **kwargs):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(launch, "run_on_workers", no_workers)
    with pytest.raises(ValueError, match=r"only 1 GPU\(s\) visible"):
        labkit.run(**NANO, strategy="ddp", world_size=2, device="cuda")


def test_auto_device_with_too_few_gpus_falls_back_to_cpu_and_says_so(monkeypatch):
    _one_gpu(monkeypatch)
    cfg = labkit.TrainConfig(**NANO, strategy="ddp", world_size=2)
    with pytest.warns(UserWarning, match="1 GPU"):
        assert resolve_device(cfg) == ("cpu", "gloo")


@pytest.mark.gpu
def test_single_trains_on_cuda_with_device_auto():
    run = labkit.run(**NANO)
    assert run.info["device"].startswith("cuda")
    assert run.losses.iloc[-1] < run.losses.iloc[0]


@pytest.mark.gpu
def test_bf16_autocast_on_cuda_trains_and_the_allocator_measures_memory():
    run = labkit.run(**NANO, precision="bf16")
    assert run.losses.iloc[-1] < run.losses.iloc[0]
    mem = run.memory.iloc[0]
    assert mem["peak_bytes"] >= mem["params_bytes"] > 0  # torch.cuda.max_memory_allocated


@pytest.mark.gpu
def test_nccl_ddp_equals_single_when_two_gpus_are_visible():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs for one NCCL rank each")
    single = labkit.run(**NANO)
    ddp = labkit.run(**NANO, strategy="ddp", world_size=2)
    assert ddp.info["backend"] == "nccl"
    assert single.compare(ddp)["relative_difference"].max() <= 1e-4  # TF32/cuBLAS order


@pytest.mark.gpu
def test_inductor_compiled_blocks_on_cuda_train_close_to_eager():
    eager = labkit.run(**NANO, precision="bf16")
    compiled = labkit.run(**NANO, precision="bf16", compile=True)
    assert compiled.info["compiled_graphs"] >= 1
    # Fused bf16 kernels round differently: close, not equal.
    assert abs(compiled.losses.iloc[-1] - eager.losses.iloc[-1]) < 0.05
