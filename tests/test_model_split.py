"""Naive model parallelism in one process equals the unsplit model, forward and backward."""

import pytest
import torch

from labkit.model import build_gpt, lm_loss_sum, model_config
from labkit.parallel.model_split import split_across_devices


@pytest.mark.parametrize("balance", ["layers", "params"])
def test_split_model_equals_the_whole_model(balance):
    cfg = model_config("micro", vocab_size=40)
    whole, split_base = build_gpt(cfg, seed=1), build_gpt(cfg, seed=1)
    split = split_across_devices(split_base, ["cpu", "cpu", "cpu"], balance=balance)
    idx = torch.randint(0, 40, (2, 16))
    lm_loss_sum(whole(idx), idx).backward()
    lm_loss_sum(split(idx), idx).backward()
    for (name, a), b in zip(whole.named_parameters(), split_base.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), name
    placement = split.placement()
    assert list(placement) == whole.layer_names()
    assert set(split.state_dict()) == {f"model.{k}" for k in whole.state_dict()}


def test_more_devices_than_layers_is_refused():
    model = build_gpt(model_config("nano", vocab_size=40), seed=0)
    with pytest.raises(ValueError, match="devices"):
        split_across_devices(model, ["cpu"] * 5)
