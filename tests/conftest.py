"""Shared test set-up: tests marked ``gpu`` skip, with the reason, where CUDA is absent."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason="needs CUDA: no GPU visible (benchmarks/gpu_check.sh runs these)"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
