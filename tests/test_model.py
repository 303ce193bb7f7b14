import math

import pytest
import torch

from pipeline.config import ACTIVATIONS, INITS, RunConfig
from pipeline.model import ACTIVATIONS as ACT_REGISTRY
from pipeline.model import INITS as INIT_REGISTRY
from pipeline.model import MLP, build_model

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
    torch.manual_seed(0)
    layer = torch.nn.Linear(FAN_IN, FAN_OUT)
    with torch.no_grad():
        INIT_REGISTRY[init](layer, RunConfig(init=init, init_std=0.5))
    w = layer.weight.double()
    # n = 120,000 samples: the relative standard error of a variance estimate is sqrt(2/n) ~ 0.4%.
    assert w.var().item() == pytest.approx(EXPECTED_VAR[init], rel=0.03)
    assert abs(w.mean().item()) < 4 * math.sqrt(EXPECTED_VAR[init] / w.numel())
    if init == "default":
        assert layer.bias.abs().max().item() <= 1 / math.sqrt(FAN_IN)
    else:
        assert torch.count_nonzero(layer.bias) == 0


def test_orthogonal_columns_are_orthonormal():
    layer = torch.nn.Linear(FAN_IN, FAN_OUT)
    with torch.no_grad():
        INIT_REGISTRY["orthogonal"](layer, RunConfig(init="orthogonal"))
    gram = layer.weight.double().T @ layer.weight.double()
    assert torch.allclose(gram, torch.eye(FAN_IN, dtype=torch.float64), atol=1e-5)


def test_mlp_shapes_and_depth_counts_weight_layers():
    model = MLP(depth=4, width=16, activation="tanh")
    assert [tuple(l.weight.shape) for l in model.layers] == [(16, 784), (16, 16), (16, 16), (10, 16)]
    preacts: list[torch.Tensor] = []
    assert model(torch.zeros(3, 784), preacts).shape == (3, 10)
    assert [tuple(z.shape) for z in preacts] == [(3, 16)] * 3 + [(3, 10)]


def test_build_model_is_seeded_by_the_global_rng():
    cfg = RunConfig(depth=3, width=8, init="he_normal")
    torch.manual_seed(1)
    a = build_model(cfg)
    torch.manual_seed(1)
    b = build_model(cfg)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("init", ["xavier_normal", "he_uniform", "he_normal", "lecun_normal", "orthogonal"])
def test_init_gain_scales_the_std_and_bias_std_sets_the_biases(init):
    torch.manual_seed(0)
    layer = torch.nn.Linear(FAN_IN, FAN_OUT)
    with torch.no_grad():
        INIT_REGISTRY[init](layer, RunConfig(init=init, init_gain=1.5, bias_std=0.3))
    assert layer.weight.double().var().item() == pytest.approx(1.5**2 * EXPECTED_VAR[init], rel=0.03)
    assert layer.bias.double().std().item() == pytest.approx(0.3, rel=0.25)  # 400 samples
