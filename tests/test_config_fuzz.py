"""Property-based: random and adversarial TrainConfig inputs end in a clear error or a real run.

For any keyword arguments, ``TrainConfig(**kw)`` either raises ValueError naming a field, or
builds a config; and every config that validates (on the nano model, one process) trains a step
without any other exception. No third outcome (TypeError, a crash inside torch, a hang) exists.
"""

import dataclasses
import math
import re
import warnings

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import labkit
from labkit import TrainConfig, config

FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
CHOICES = {
    "model": config.MODELS,
    "norm": config.NORMS,
    "corpus": config.CORPORA,
    "optimizer": config.OPTIMIZERS,
    "nonfinite": config.NONFINITE,
    "precision": config.PRECISIONS,
    "strategy": config.STRATEGIES,
    "backend": config.BACKENDS,
    "device": config.DEVICES,
    "pp_balance": config.PP_BALANCE,
    "clip": config.CLIP_METHODS,
    "schedule": ("constant", "linear", "cosine", "wsd", "step", "no-such-schedule"),
    "warmup": ("linear", "exponential", "untuned_linear", "bogus"),
}
# Values no field should accept silently, mixed with plausible ones.
ADVERSARIAL = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)


def _value(name: str) -> st.SearchStrategy:
    plausible = st.sampled_from(CHOICES[name]) if name in CHOICES else st.integers(0, 12)
    return st.one_of(plausible, ADVERSARIAL)


ANY_KWARGS = st.dictionaries(
    st.one_of(st.sampled_from(FIELDS), st.text(min_size=1, max_size=6)),
    st.deferred(lambda: ADVERSARIAL),
    max_size=6,
).flatmap(
    lambda d: st.fixed_dictionaries(
        {k: _value(k) if k in FIELDS else st.just(v) for k, v in d.items()}
    )
)


def _names_a_field(message: str) -> bool:
    return bool(re.search(r"TrainConfig\.\w+|unknown TrainConfig field|keyword arguments", message))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ANY_KWARGS)
def test_any_input_is_a_config_or_a_value_error_naming_a_field(kwargs):
    try:
        TrainConfig(**kwargs)
    except ValueError as err:
        assert _names_a_field(str(err)), str(err)
        event("rejected with a clear error")
    else:
        event("valid")


def _mostly(plausible: st.SearchStrategy) -> st.SearchStrategy:
    """Plausible values three times in four, so most drawn configs are valid and really run."""
    return st.one_of(plausible, plausible, plausible, ADVERSARIAL)


# Fields a one-process nano run can take any valid value of (not the launcher's or the
# fault injector's: fault="kill:0:0" would kill the test process, as asked).
RUNNABLE = {
    "lr": _mostly(st.floats(1e-8, 1e6)),
    "beta1": _mostly(st.floats(0, 1)),
    "beta2": _mostly(st.floats(0, 1)),
    "eps": _mostly(st.floats(1e-12, 10)),
    "weight_decay": _mostly(st.floats(0, 10)),
    "momentum": _mostly(st.floats(0, 1)),
    "max_norm": _mostly(st.floats(1e-9, 1e9)),
    "clip_value": _mostly(st.floats(1e-9, 1e9)),
    "min_lr": _mostly(st.floats(0, 1e-3)),
    "warmup_steps": _mostly(st.integers(0, 3)),
    "grad_accum_steps": _mostly(st.integers(1, 5)),
    "global_batch_size": _mostly(st.integers(1, 9)),
    "seed": _mostly(st.integers(0, 2**63 - 1)),
    "block_size": _mostly(st.one_of(st.none(), st.integers(2, 40))),
    "zclip_warmup_steps": _mostly(st.integers(1, 3)),
    "autoclip_percentile": _mostly(st.floats(0, 100)),
    "freeze": st.one_of(st.just(()), st.sampled_from([("embed",), ("head",), ("blocks.0",)])),
    **{
        name: st.sampled_from(CHOICES[name])
        for name in ("norm", "optimizer", "clip", "schedule", "warmup", "nonfinite", "precision")
    },
}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional=RUNNABLE))
def test_every_valid_config_survives_a_one_step_nano_run(kwargs):
    base = dict(model="nano", steps=3, stop_after=1, eval_batches=1, progress=False, device="cpu")
    try:
        cfg = TrainConfig(**{**base, **kwargs})
    except ValueError as err:
        assert _names_a_field(str(err)), str(err)
        event("rejected with a clear error")
        return
    event("valid: trained one step")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "every step skipped" is a legal outcome of lr=1e6
        try:
            result = labkit.run(cfg)
        except FloatingPointError:
            assert cfg.nonfinite == "raise"  # asked to stop on a non-finite norm
            return
    assert len(result.metrics) == 1
    assert math.isfinite(result.metrics["lr"].iloc[0])


def test_the_fuzzer_can_tell_a_bad_message():
    assert not _names_a_field("optimizer got an empty parameter list")
    with pytest.raises(ValueError, match=r"TrainConfig\.lr"):
        TrainConfig(lr=-1)
