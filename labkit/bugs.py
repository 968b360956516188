"""The bug zoo: seeded bugs a facilitator can switch on (``TrainConfig.bug``; never on by default).

Each is a mistake real projects shipped and fixed, put back on purpose in one place of labkit's
code. A run with a bug trains: its loss falls, nothing crashes. The equivalence oracle
(``RunResult.compare`` against one process) and the per-layer gradient norms
(``layer_norms=True``) are how a learner finds which one is wrong and why; notebook 10 is the
game and ``labkit.lessons.bugzoo`` its checker. The names are deliberately neutral, so that the
name does not give the cause away.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BUGS", "Bug"]


@dataclass(frozen=True)
class Bug:
    """One seeded bug: where it lives, what it needs to show, and what went wrong."""

    name: str
    needs: str  # the mesh it lives in, checked by TrainConfig ("pp", "tp", "ddp-accum")
    cause: str  # the answer a learner should find
    history: str  # where this mistake happened for real


BUGS: dict[str, Bug] = {
    b.name: b
    for b in (
        Bug(
            "A",
            "pp",
            "clipping uses each stage's own norm: the norm is not all-reduced across pipeline "
            "stages, so every stage clips by a different, smaller norm",
            "pipeline engines that computed the clip norm per stage before summing across the "
            "pipeline group (e.g. early DeepSpeed and Megatron-LM pipeline clipping fixes)",
        ),
        Bug(
            "B",
            "pp",
            "the pipeline's loss is scaled twice: divided by the number of micro-batches on top "
            "of the global token count, so every gradient is m times too small",
            "GPipe-style implementations that average each micro-batch's loss and then divide "
            "the accumulated gradient by the micro-batch count again",
        ),
        Bug(
            "C",
            "tp",
            "parameters every tensor-parallel rank holds whole (norms, embeddings, biases) are "
            "counted in the clip norm once per rank instead of once",
            "Megatron-LM's 'tensor-parallel duplicate' check, which exists because replicated "
            "parameters were counted tp times in the gradient norm",
        ),
        Bug(
            "D",
            "ddp-accum",
            "gradient accumulation forgets to hold back the sync (no no_sync()): every "
            "micro-batch's backward all-reduces, so the bytes grow with the accumulation steps "
            "while the weights stay right",
            "training loops that call backward under DDP for every accumulation step without "
            "model.no_sync() (a common issue in Hugging Face Accelerate and PyTorch forums)",
        ),
    )
}
