"""The GPT's shapes, presets, layer list and FLOP formula."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from labkit.lessons.clipping import DeepNet
from labkit.model import (
    GPT,
    PRESETS,
    build_gpt,
    count_params,
    flops_per_token,
    matmul_params,
    model_config,
)


def test_nano_is_test_sized_and_large_is_worth_a_gpu():
    assert count_params(GPT(model_config("nano", vocab_size=103))) < 100_000
    assert PRESETS["large"].n_layer * PRESETS["large"].d_model ** 2 * 12 > 50_000_000


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_layers_compose_to_the_model(norm):
    model = build_gpt(model_config("nano", vocab_size=50, norm=norm), seed=0)
    idx = torch.randint(0, 50, (2, 16))
    x = idx
    for layer in model.layers():
        x = layer(x)
    assert torch.equal(x, model(idx))
    assert x.shape == (2, 16, 50)
    names = set(model.state_dict())
    for prefix in model.layer_names():
        assert any(n.startswith(prefix + ".") for n in names)


def test_same_seed_same_weights():
    cfg = model_config("nano", vocab_size=50)
    a, b = build_gpt(cfg, 7).state_dict(), build_gpt(cfg, 7).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = build_gpt(cfg, 8).state_dict()
    assert not torch.equal(a["head.out.weight"], c["head.out.weight"])


@pytest.mark.parametrize("preset", ["nano", "micro"])
def test_flops_formula_matches_a_count_of_the_actual_model(preset):
    cfg = model_config(preset, vocab_size=97)
    model = GPT(cfg)
    batch = 2
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size))
    counter = FlopCounterMode(display=False)
    # The math attention path is made of matmuls the counter sees (fused CPU kernels are opaque).
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(idx).float().sum().backward()
    counted = counter.get_total_flops() / (batch * cfg.block_size)
    assert counted == pytest.approx(flops_per_token(cfg), rel=1e-9)
    # The formula's N is exactly the matmul weights of the model as built.
    n = (flops_per_token(cfg) - 12 * cfg.n_layer * cfg.d_model * cfg.block_size) // 6
    assert n == matmul_params(model)


def test_deep_net_gradients_explode_towards_the_input():
    torch.manual_seed(0)
    net = DeepNet(depth=24, gain=3.0)
    net(torch.randn(32, 16)).pow(2).mean().backward()
    first = net.layers[0].weight.grad.norm()
    last = net.layers[-1].weight.grad.norm()
    assert first > 50 * last


def test_xl_preset_has_a_few_hundred_million_parameters_with_a_tokenizer_vocabulary():
    with torch.device("meta"):  # shapes only: no memory, no init
        xl = GPT(model_config("xl", vocab_size=50304))
    assert 300e6 < count_params(xl) < 450e6
    # The head is a real cost at that vocabulary: about 14% of the matmul weights, as in GPT-2.
    head = xl.head.out.weight.numel()
    assert 0.10 < head / matmul_params(xl) < 0.2
