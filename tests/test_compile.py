"""TrainConfig.compile: torch.compile of each block trains the same weights, and really compiles.

The tests use the ``aot_eager`` backend (forward and backward traced by dynamo and AOTAutograd,
no code generated), which needs no C++ compiler and takes seconds; inductor's generated kernels
differ from eager by float rounding only and are exercised by ``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import pytest

import labkit
from labkit.cli import build_parser
from labkit.config import TrainConfig

BASE = dict(model="nano", steps=3, global_batch_size=8, clip="norm", max_norm=0.05, progress=False)


@pytest.fixture(scope="module")
def eager() -> labkit.RunResult:
    return labkit.run(**BASE)


def test_compiled_blocks_train_the_eager_weights(eager):
    compiled = labkit.run(**BASE, compile="aot_eager", recompute="selective")
    assert compiled.info["compiled_graphs"] >= 1, "nothing was compiled"
    assert eager.info["compiled_graphs"] == 0
    assert compiled.compare(eager)["relative_difference"].max() <= 1e-5

    assert set(compiled.state_dict()) == set(eager.state_dict())  # the GPT's parameter names


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_compiled_blocks_under_data_parallelism(eager):
    result = labkit.run(**BASE, compile="aot_eager", strategy="ddp", world_size=2)
    assert result.info["compiled_graphs"] >= 1
    assert result.compare(eager)["relative_difference"].max() <= 1e-5


def test_bad_compile_value_is_named():
    with pytest.raises(ValueError, match=r"TrainConfig\.compile='cudagraph' is invalid"):
        TrainConfig(compile="cudagraph")
    assert TrainConfig(compile=True).compile_backend == "inductor"
    assert TrainConfig().compile_backend is None


def test_cli_takes_a_backend_name_or_a_bool():
    parser = build_parser()
    assert parser.parse_args(["train", "--compile", "aot_eager"]).compile == "aot_eager"
    assert parser.parse_args(["train", "--compile", "true"]).compile is True
    assert parser.parse_args(["train"]).compile is False
