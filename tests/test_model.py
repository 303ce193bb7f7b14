import math

import pytest
import torch

from pipeline.activations import ACTIVATIONS as ACT_REGISTRY
from pipeline.config import ACTIVATIONS, INITS, RunConfig
from pipeline.model import INITS as INIT_REGISTRY
from pipeline.model import build_model


def _init(init: str, **fields) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    weight, bias = torch.empty(FAN_OUT, FAN_IN), torch.empty(FAN_OUT)
    with torch.no_grad():
        INIT_REGISTRY[init](weight, bias, RunConfig(init=init, **fields))
    return weight, bias

FAN_OUT, FAN_IN = 400, 300
# Var[W] that each init's definition gives, written out independently of the implementation.
EXPECTED_VAR = {
    "default": 1 / (3 * FAN_IN),  # U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    "normal": 0.5**2,  # init_std = 0.5 below
    "xavier_uniform": 2 / (FAN_IN + FAN_OUT),
    "xavier_normal": 2 / (FAN_IN + FAN_OUT),
    "he_uniform": 2 / FAN_IN,
    "he_normal": 2 / FAN_IN,
    "lecun_normal": 1 / FAN_IN,
    "orthogonal": 1 / max(FAN_IN, FAN_OUT),  # orthonormal columns when fan_out > fan_in
}


def test_registries_cover_the_vocabulary():
    assert set(ACT_REGISTRY) == set(ACTIVATIONS)
    assert set(INIT_REGISTRY) == set(INITS) == set(EXPECTED_VAR)


@pytest.mark.parametrize("init", sorted(EXPECTED_VAR))
def test_init_gives_the_variance_of_its_definition(init):
    weight, bias = _init(init, init_std=0.5)
    w = weight.double()
    # n = 120,000 samples: the relative standard error of a variance estimate is sqrt(2/n) ~ 0.4%.
    assert w.var().item() == pytest.approx(EXPECTED_VAR[init], rel=0.03)
    assert abs(w.mean().item()) < 4 * math.sqrt(EXPECTED_VAR[init] / w.numel())
    if init == "default":
        assert bias.abs().max().item() <= 1 / math.sqrt(FAN_IN)
        assert bias.double().var().item() == pytest.approx(1 / (3 * FAN_IN), rel=0.3)  # 400 samples
    else:
        assert torch.count_nonzero(bias) == 0


def test_orthogonal_columns_are_orthonormal():
    weight, _ = _init("orthogonal")
    gram = weight.double().T @ weight.double()
    assert torch.allclose(gram, torch.eye(FAN_IN, dtype=torch.float64), atol=1e-5)


def test_mlp_shapes_and_depth_counts_weight_layers():
    model = build_model([RunConfig(depth=4, width=16, activation="tanh", seed=s) for s in range(3)])
    assert [tuple(l.weight.shape) for l in model.layers] == [(3, 16, 784), (3, 16, 16), (3, 16, 16), (3, 10, 16)]
    assert model(torch.zeros(5, 784)).shape == (3, 5, 10)  # one input batch for every member
    assert model(torch.zeros(3, 5, 784)).shape == (3, 5, 10)  # or one batch each


def test_each_member_is_built_from_its_own_seed_wherever_it_trains():
    configs = [RunConfig(depth=3, width=8, init=i, seed=s) for i, s in (("he_normal", 1), ("default", 2), ("he_normal", 3))]
    together = build_model(configs)
    for e, config in enumerate(configs):
        torch.manual_seed(12345)  # the global RNG state does not matter
        alone = build_model([config])
        assert all(torch.equal(a[0], t[e]) for a, t in zip(alone.parameters(), together.parameters()))
    assert not torch.equal(together.layers[0].weight[0], together.layers[0].weight[2])  # same init, other seed


def test_members_are_independent():
    """Member e's output and gradients depend on member e's weights alone."""
    model = build_model([RunConfig(depth=3, width=8, seed=s) for s in range(2)], dtype=torch.float64)
    x = torch.randn(2, 4, 784, dtype=torch.float64)
    model(x)[0].sum().backward()
    assert all(p.grad[1].abs().max() == 0 for p in model.parameters())
    assert all(p.grad[0].abs().max() > 0 for p in model.parameters())


@pytest.mark.parametrize("init", ["xavier_normal", "he_uniform", "he_normal", "lecun_normal", "orthogonal"])
def test_init_gain_scales_the_std_and_bias_std_sets_the_biases(init):
    weight, bias = _init(init, init_gain=1.5, bias_std=0.3)
    assert weight.double().var().item() == pytest.approx(1.5**2 * EXPECTED_VAR[init], rel=0.03)
    assert bias.double().std().item() == pytest.approx(0.3, rel=0.25)  # 400 samples


def test_memory_estimate_counts_each_member_and_mnist_once():
    from pipeline.model import memory_estimate

    weights = 784 * 8 + 8 * 8 + 8 * 10  # depth 3, width 8
    params = weights + 8 + 8 + 10
    mnist = 70_000 * 785 * 4
    # parameters four times (weight, gradient, update-ratio copy, momentum), activations kept for
    # backward, the evaluation batch, the Jacobian snapshot
    per_member = (4 * params + 4 * 32 * 8 * 3 + 2 * 2000 * 8 + 3 * 8 * 8 * 8) * 4
    assert memory_estimate(3, 8, 32, "sgd", "fp32") == per_member + mnist
    assert memory_estimate(3, 8, 32, "sgd", "fp32", members=5) == 5 * per_member + mnist
    assert memory_estimate(3, 8, 32, "adam", "fp32") == per_member + 4 * params + mnist  # Adam's second moment
    assert memory_estimate(3, 8, 32, "sgd", "fp64") == 2 * (per_member + mnist)


def test_members_that_fit_is_what_check_memory_accepts(monkeypatch):
    from pipeline import model

    config = RunConfig(depth=20, width=512)
    monkeypatch.setattr(model, "available_memory", lambda device: 2 * 2**30)  # a device with 2 GiB free
    fit = model.members_that_fit(config, torch.device("cpu"))
    assert fit > 1
    model.check_memory(config, torch.device("cpu"), members=fit)
    with pytest.raises(ValueError, match="GiB free"):
        model.check_memory(config, torch.device("cpu"), members=2 * fit)
    monkeypatch.setattr(model, "available_memory", lambda device: None)  # unknown: no split, no refusal
    assert model.members_that_fit(config, torch.device("cpu")) is None
    model.check_memory(config, torch.device("cpu"), members=10_000)


@pytest.mark.parametrize("norm", ["none", "batch", "layer"])
def test_a_norm_mixes_the_examples_exactly_where_the_registry_says(norm):
    """NORMS[norm].mixes_examples, against the net itself: does one example's output (training mode)
    change when another example of its batch changes?"""
    from pipeline.norms import NORMS

    model = build_model([RunConfig(depth=3, width=16, norm=norm)])
    x = torch.randn(4, 784, generator=torch.Generator().manual_seed(0))
    other = x.clone()
    other[1:] = torch.randn(3, 784, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        moved = not torch.allclose(model(x)[0, 0], model(other)[0, 0])
    assert moved == NORMS[norm].mixes_examples
