"""labkit: learn how large language models are trained efficiently, by running the real thing.

import labkit
result = labkit.run(model="nano", steps=50, strategy="ddp", world_size=2)
result.metrics        # one row per (step, rank)
result.state_dict()   # the trained weights, equal to strategy="single"'s
"""

from labkit.config import TrainConfig
from labkit.launch import WorkerError, run
from labkit.result import RunResult

__all__ = ["RunResult", "TrainConfig", "WorkerError", "run"]
__version__ = "0.1.0"
