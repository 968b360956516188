"""The planner: a calibrated cost model from 2 processes to 1,000 GPUs.

``predict(config, cluster)`` models one optimizer step of a run on a cluster (step time and its
parts, tokens per second per GPU, MFU, memory per GPU); ``local_cluster()`` is this machine,
calibrated by measuring it; ``search(model, cluster, global_batch)`` ranks the meshes that fit.
``CARDS`` and ``LINKS`` are the datasheet figures it plans with, each with its source.
"""

from labkit.plan.calibrate import Calibration, calibrate, local_cluster
from labkit.plan.comm import collective_time, fit_alpha_beta
from labkit.plan.hardware import CARDS, LINKS, Card, Cluster, Link, cluster
from labkit.plan.memory import memory_per_rank, stages
from labkit.plan.predict import Prediction, predict
from labkit.plan.search import search
from labkit.plan.shapes import PUBLISHED, ModelShape, from_preset
from labkit.plan.workload import Workload, workload

__all__ = [
    "CARDS",
    "LINKS",
    "PUBLISHED",
    "Calibration",
    "Card",
    "Cluster",
    "Link",
    "ModelShape",
    "Prediction",
    "Workload",
    "calibrate",
    "cluster",
    "collective_time",
    "fit_alpha_beta",
    "from_preset",
    "local_cluster",
    "memory_per_rank",
    "predict",
    "search",
    "stages",
    "workload",
]
