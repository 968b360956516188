"""Cards, links and clusters: what the planner knows about the machines it plans for.

Every datasheet figure carries its source. Two figures are *assumptions*, not datasheet values,
and are named as such: ``Card.efficiency``, the fraction of the datasheet's dense matrix peak that
a whole training step's kernels reach (large GEMMs reach about 0.7-0.8 of it; attention, norms and
element-wise kernels much less), and ``Link.efficiency``, the fraction of a link's datasheet
bandwidth a ring all-reduce reaches (nccl-tests' bus bandwidth over the link's). This machine's
CPU has no datasheet entry: ``labkit.plan.local_cluster()`` measures it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

__all__ = ["CARDS", "LINKS", "Card", "Cluster", "Link", "cluster"]


@dataclass(frozen=True)
class Link:
    """A link between two devices: per-message latency (alpha) and per-direction bandwidth."""

    name: str
    latency_s: float  # alpha: the cost of one message, whatever its size
    bandwidth_Bps: float  # datasheet bytes per second, one direction, per device
    efficiency: float = 1.0  # the fraction of bandwidth_Bps a ring collective reaches
    source: str = ""

    @property
    def beta_s_per_B(self) -> float:
        """Seconds per byte actually moved (1 / achieved bandwidth)."""
        return 1.0 / (self.bandwidth_Bps * self.efficiency)


@dataclass(frozen=True)
class Card:
    """One accelerator (or this CPU): its dense matrix peak, memory and memory bandwidth."""

    name: str
    peak_flops: dict[str, float]  # dense FLOP/s by compute dtype: "bf16", "fp32"
    memory_bytes: float
    memory_Bps: float
    nvlink: Link | None  # the link between cards of one node (None: PCIe only)
    efficiency: float = 0.5  # assumed fraction of peak a training step's kernels reach
    source: str = ""
    # Measured on this machine only (local_cluster): seconds of fixed cost per layer and
    # micro-batch (Python and kernel-launch overhead that FLOPs do not explain), and the matrix
    # width at which its kernels reach half their rate (narrow matrices run far below peak).
    overhead_s: float = 0.0
    half_rate_width: float = 0.0

    def flops(self, precision: str) -> float:
        """Dense FLOP/s this card's peak gives for a run's precision (fp16 runs as bf16)."""
        key = "fp32" if precision == "fp32" else "bf16"
        return self.peak_flops.get(key) or self.peak_flops["fp32"]


GB = 1e9
T = 1e12

# Links. NVLink figures are per GPU and direction (the datasheets quote both directions summed).
LINKS: dict[str, Link] = {
    link.name: link
    for link in (
        Link(
            "nvlink4", 3e-6, 450 * GB, 0.8, "H100/H200 SXM datasheet: NVLink 900 GB/s (both ways)"
        ),
        Link("nvlink3", 3e-6, 300 * GB, 0.8, "A100 SXM datasheet: NVLink 600 GB/s (both ways)"),
        Link("nvlink5", 3e-6, 900 * GB, 0.8, "DGX B200 datasheet: NVLink 1.8 TB/s (both ways)"),
        Link("pcie4", 5e-6, 32 * GB, 0.8, "PCIe 4.0 x16: 64 GB/s (both ways)"),
        Link("ib-ndr", 10e-6, 50 * GB, 0.8, "InfiniBand NDR: 400 Gb/s per GPU (ConnectX-7)"),
        Link("ib-hdr", 10e-6, 25 * GB, 0.8, "InfiniBand HDR: 200 Gb/s per GPU (ConnectX-6)"),
        Link("ethernet-100g", 20e-6, 12.5 * GB, 0.7, "100 Gb/s Ethernet (RoCE) per node"),
    )
}

# Dense (not 2:4 sparse) tensor-core peaks from NVIDIA's datasheets.
CARDS: dict[str, Card] = {
    card.name: card
    for card in (
        Card(
            "H100",
            {"bf16": 989 * T, "fp32": 67 * T},
            80 * GB,
            3350 * GB,
            LINKS["nvlink4"],
            source="NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16 989 TFLOPS dense, "
            "FP32 67 TFLOPS, 80 GB HBM3 at 3.35 TB/s",
        ),
        Card(
            "H200",
            {"bf16": 989 * T, "fp32": 67 * T},
            141 * GB,
            4800 * GB,
            LINKS["nvlink4"],
            source="NVIDIA H200 Tensor Core GPU datasheet (SXM): BF16 989 TFLOPS dense, "
            "141 GB HBM3e at 4.8 TB/s",
        ),
        Card(
            "A100",
            {"bf16": 312 * T, "fp32": 19.5 * T},
            80 * GB,
            2039 * GB,
            LINKS["nvlink3"],
            source="NVIDIA A100 Tensor Core GPU datasheet (SXM 80GB): BF16 312 TFLOPS dense, "
            "FP32 19.5 TFLOPS, 2,039 GB/s",
        ),
        Card(
            "B200",
            {"bf16": 2250 * T, "fp32": 75 * T},
            180 * GB,
            8000 * GB,
            LINKS["nvlink5"],
            source="NVIDIA DGX B200 datasheet: FP16/BF16 2.25 PFLOPS dense per GPU "
            "(4.5 sparse), 180 GB HBM3e per GPU at 8 TB/s",
        ),
        Card(
            "L4",
            {"bf16": 121 * T, "fp32": 30.3 * T},
            24 * GB,
            300 * GB,
            None,
            source="NVIDIA L4 datasheet: BF16 121 TFLOPS dense (242 sparse), FP32 30.3 TFLOPS, "
            "24 GB GDDR6 at 300 GB/s, PCIe 4.0",
        ),
    )
}


@dataclass(frozen=True)
class Cluster:
    """``n_gpus`` cards, ``gpus_per_node`` to a node, linked inside a node and between nodes.

    ``shared_cores``: on this machine the "devices" are processes sharing that many CPU cores, so
    their compute cannot run side by side beyond the cores (``local_cluster`` sets it; real
    clusters leave it None). ``collectives`` optionally holds measured ``(alpha, beta)`` per
    group size, fitted from labkit's collective benchmark, which then replace the links' values.
    """

    card: Card
    n_gpus: int
    gpus_per_node: int = 8
    intra: Link | None = None
    inter: Link = field(default_factory=lambda: LINKS["ib-ndr"])
    shared_cores: int | None = None
    collectives: dict[int, tuple[float, float]] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        if self.n_gpus < 1 or self.gpus_per_node < 1:
            raise ValueError("Cluster: n_gpus and gpus_per_node must be at least 1")

    @property
    def intra_link(self) -> Link:
        """The link inside a node: the card's NVLink, else PCIe."""
        return self.intra or self.card.nvlink or LINKS["pcie4"]

    def link_for(self, group_size: int, stride: int) -> Link:
        """The slowest link a ring over ``group_size`` ranks spaced ``stride`` apart crosses."""
        span = group_size * stride
        return self.intra_link if span <= self.gpus_per_node else self.inter

    def describe(self) -> str:
        """One line: how many of which card, and their links."""
        nodes = -(-self.n_gpus // self.gpus_per_node)
        return (
            self.name
            or f"{self.n_gpus} x {self.card.name} ({nodes} node(s) of {self.gpus_per_node}; "
            f"{self.intra_link.name} inside, {self.inter.name} between)"
        )


def cluster(
    card: str | Card = "H100",
    n_gpus: int = 8,
    *,
    gpus_per_node: int = 8,
    inter: str | Link = "ib-ndr",
    efficiency: float | None = None,
) -> Cluster:
    """A cluster of a named card (``CARDS``) joined by a named link (``LINKS``)."""
    if isinstance(card, str):
        if card not in CARDS:
            raise ValueError(f"card={card!r} is unknown: allowed: {', '.join(CARDS)}")
        card = CARDS[card]
    if efficiency is not None:
        card = replace(card, efficiency=efficiency)
    if isinstance(inter, str):
        if inter not in LINKS:
            raise ValueError(f"inter={inter!r} is unknown: allowed: {', '.join(LINKS)}")
        inter = LINKS[inter]
    return Cluster(card, n_gpus, gpus_per_node=gpus_per_node, inter=inter)
