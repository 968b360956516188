"""The device mesh: ``pp x dp x cp x tp`` ranks, which rank holds what, and a group per dimension.

Ranks are numbered with tp innermost (fastest-varying), then cp, then dp, then pp outermost, the
layout of torchtitan and picotron: the tp ranks of one slice are neighbours (the same GPU board in real
systems, where tensor parallelism's frequent all-reduces need the fastest link), and a pipeline
stage is a contiguous block of ranks. For ``pp=2, dp=2, tp=2``::

    rank:  0 1 2 3 4 5 6 7
    pp:    0 0 0 0 1 1 1 1     stage (which layers)
    dp:    0 0 1 1 0 0 1 1     replica (which rows of the batch)
    tp:    0 1 0 1 0 1 0 1     slice (which heads and MLP columns)

A collective "over dimension d" runs among the ranks that agree on every *other* coordinate:
the dp group of rank 5 is {5, 7}, its tp group {4, 5}, its pp group {1, 5}. (cp is 1 here, so it
adds no digit; with cp=2 each dp replica's batch rows are shared by 2 ranks that each take a
zig-zag piece of every sequence: ``labkit.parallel.context_parallel``.)

``mesh_coords`` and ``layout`` are pure functions (no processes needed: a notebook prints them);
``Mesh`` is the runtime object each rank builds, on ``torch.distributed.device_mesh``.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from labkit.data import shard_rows
from labkit.parallel.presets import DIMS

if TYPE_CHECKING:
    import pandas as pd

    from labkit.config import TrainConfig


def mesh_coords(rank: int, shape: dict[str, int]) -> dict[str, int]:
    """``{"pp": .., "dp": .., "cp": .., "tp": ..}`` of ``rank`` (tp fastest-varying).

    A dimension missing from ``shape`` has size 1 and is left out of the answer.
    """
    coords = {}
    for dim in reversed(DIMS):
        rank, coords[dim] = divmod(rank, shape.get(dim, 1))
    return {d: coords[d] for d in DIMS if d in shape}


def mesh_rank(coords: dict[str, int], shape: dict[str, int]) -> int:
    """The rank at ``coords`` (the inverse of ``mesh_coords``)."""
    rank = 0
    for dim in DIMS:
        rank = rank * shape.get(dim, 1) + coords.get(dim, 0)
    return rank


def group_ranks(shape: dict[str, int], dims: tuple[str, ...]) -> list[list[int]]:
    """The partition of all ranks into groups that vary only along ``dims``."""
    shape = {d: shape.get(d, 1) for d in DIMS}
    others = [d for d in DIMS if d not in dims]
    groups = []
    for fixed in itertools.product(*(range(shape[d]) for d in others)):
        base = dict(zip(others, fixed, strict=True))
        members = [
            mesh_rank({**base, **dict(zip(dims, free, strict=True))}, shape)
            for free in itertools.product(*(range(shape[d]) for d in dims))
        ]
        groups.append(sorted(members))
    return groups


def layout(cfg: TrainConfig) -> pd.DataFrame:
    """Which rank holds what for ``cfg``: one row per rank, no process started.

    Columns: ``rank, pp, dp, cp, tp`` (coordinates), ``layers`` (the pipeline stage's layers, cut
    by layer count as ``pp_balance="layers"`` does), ``rows`` (the rows of each global batch this
    rank's replica consumes), ``tokens`` (the positions of each sequence it holds: all, or its
    zig-zag chunks with cp > 1), ``heads`` (the attention heads of its tensor-parallel slice).
    """
    import pandas as pd

    from labkit.model import PRESETS

    preset = PRESETS[cfg.model]
    names = ["embed", *(f"blocks.{i}" for i in range(preset.n_layer)), "head"]
    shape = cfg.mesh_shape
    rows = []
    for rank in range(cfg.world_size):
        c = mesh_coords(rank, shape)
        stage = shard_rows(len(names), c["pp"], shape["pp"])
        batch = shard_rows(cfg.global_batch_size, c["dp"], shape["dp"])
        heads = shard_rows(preset.n_head, c["tp"], shape["tp"])
        block = cfg.block_size or preset.block_size
        chunk = block // (2 * shape["cp"])
        late = 2 * shape["cp"] - 1 - c["cp"]
        tokens = (
            f"0..{block - 1}"
            if shape["cp"] == 1
            else f"{c['cp'] * chunk}..{(c['cp'] + 1) * chunk - 1}, {late * chunk}..{(late + 1) * chunk - 1}"
        )
        stage_names = names[stage]
        rows.append(
            {
                "rank": rank,
                **c,
                "layers": stage_names[0]
                + (f" .. {stage_names[-1]}" if len(stage_names) > 1 else ""),
                "rows": f"{batch.start}..{batch.stop - 1}",
                "tokens": tokens,
                "heads": f"{heads.start}..{heads.stop - 1}",
            }
        )
    return pd.DataFrame(rows).set_index("rank")


class Mesh:
    """This rank's place in the mesh and the process group of each dimension.

    ``group(dim)`` is None for a dimension of size 1 (nothing to communicate: callers skip the
    collective, since ``group=None`` in torch.distributed means *every* rank). A one-dimensional
    mesh uses the default group; a composed one is a ``torch.distributed.device_mesh.DeviceMesh``
    whose sub-groups serve each dimension. Every rank must build its Mesh at the same point.
    """

    def __init__(self, shape: dict[str, int], rank: int, device_type: str = "cpu") -> None:
        self.shape = {d: int(shape.get(d, 1)) for d in DIMS}
        self.world_size = math.prod(self.shape.values())
        self.rank = rank
        self.coords = mesh_coords(rank, self.shape)
        self.device_type = device_type
        self.device_mesh: Any = None
        self._groups: dict[tuple[str, ...], Any] = {}
        active = [d for d in DIMS if self.shape[d] > 1]
        if len(active) > 1:
            from torch.distributed.device_mesh import init_device_mesh

            self.device_mesh = init_device_mesh(
                device_type, tuple(self.shape[d] for d in DIMS), mesh_dim_names=DIMS
            )
            for d in active:
                self._groups[(d,)] = self.device_mesh.get_group(d)
        elif active:
            self._groups[(active[0],)] = dist.group.WORLD

    def size(self, dim: str) -> int:
        """How many ranks the dimension has."""
        return self.shape[dim]

    def local_rank(self, dim: str) -> int:
        """This rank's coordinate along ``dim``."""
        return self.coords[dim]

    def group(self, *dims: str) -> Any:
        """The process group over ``dims`` (None if they hold one rank).

        Groups over several dimensions are made on first use: every rank must ask for them in
        the same order (labkit does so while setting up, before the first step).
        """
        dims = tuple(d for d in DIMS if d in dims and self.shape[d] > 1)
        if not dims:
            return None
        if dims not in self._groups:
            if math.prod(self.shape[d] for d in dims) == self.world_size:
                self._groups[dims] = dist.group.WORLD
            else:
                mine = None
                for ranks in group_ranks(self.shape, dims):  # every rank creates every group
                    g = dist.new_group(ranks)
                    if self.rank in ranks:
                        mine = g
                self._groups[dims] = mine
        return self._groups[dims]

    def peer(self, dim: str, index: int) -> int:
        """The global rank whose coordinate along ``dim`` is ``index`` (others as this rank's)."""
        return mesh_rank({**self.coords, dim: index}, self.shape)

    def dim_mesh(self, dim: str) -> Any:
        """A one-dimensional ``DeviceMesh`` over ``dim`` (what FSDP2's ``fully_shard`` takes)."""
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

        if self.device_mesh is not None:
            return self.device_mesh[dim]
        if self.shape[dim] == self.world_size:
            return init_device_mesh(self.device_type, (self.world_size,))
        return DeviceMesh.from_group(self.group(dim), self.device_type)

    def __repr__(self) -> str:
        dims = " x ".join(f"{d}={self.shape[d]}" for d in DIMS)
        return f"Mesh({dims}; rank {self.rank} at {self.coords})"
