"""Naive model parallelism inside one process: consecutive layers on different devices.

The classic picture on a machine with several GPUs: the embedding and the first blocks live on
``cuda:0``, the next blocks on ``cuda:1``, and the activations hop from device to device during
the forward pass (and back during backward, which autograd does by itself). Only one device
works at a time, which is exactly the idle time the pipelines of ``labkit.parallel.pipeline``
attack with micro-batches. On CPU the stages are processes instead (``strategy="pp-gpipe"`` with
``micro_batches=1``); this module runs anywhere, with ``devices=["cpu", "cpu"]`` for a dry run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from labkit.model import GPT
from labkit.parallel.pipeline import stage_bounds


class DeviceSplitGPT(nn.Module):
    """A GPT whose layers are cut into ``len(devices)`` stages, stage ``i`` on ``devices[i]``.

    The wrapped model keeps its parameter names (``state_dict()`` equals the GPT's), so results
    compare directly with a single-device run. ``balance`` is "layers" or "params", as for the
    pipeline strategies.
    """

    def __init__(
        self, model: GPT, devices: Sequence[str | torch.device], balance: str = "layers"
    ) -> None:
        super().__init__()
        self.model = model
        self.devices = [torch.device(d) for d in devices]
        self.bounds = stage_bounds(model, len(self.devices), balance)
        layers = model.layers()
        self.stages: list[tuple[list[nn.Module], torch.device]] = []
        for (start, stop), device in zip(self.bounds, self.devices, strict=True):
            stage = layers[start:stop]
            for layer in stage:
                layer.to(device)
            self.stages.append((stage, device))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = idx
        for stage, device in self.stages:
            x = x.to(device)  # the hop between devices: a copy over PCIe/NVLink on GPUs
            for layer in stage:
                x = layer(x)
        return x

    def placement(self) -> dict[str, str]:
        """Which device holds each layer (by its state-dict prefix)."""
        names = self.model.layer_names()
        return {
            names[i]: str(device)
            for (start, stop), device in zip(self.bounds, self.devices, strict=True)
            for i in range(start, stop)
        }


def split_across_devices(
    model: GPT, devices: Sequence[str | torch.device] | None = None, balance: str = "layers"
) -> DeviceSplitGPT:
    """Place ``model`` across ``devices`` (default: every visible GPU, else two CPU "stages")."""
    if devices is None:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        devices = [f"cuda:{i}" for i in range(n)] if n >= 2 else ["cpu", "cpu"]
    if len(devices) > len(model.layers()):
        raise ValueError(
            f"devices: {len(devices)} stages for {len(model.layers())} layers; "
            "use at most one device per layer"
        )
    return DeviceSplitGPT(model, devices, balance)
