"""The input-output Jacobian J = dz_{H-1}/dz_0 (Pennington et al. 2017): its singular values against
torch.autograd.functional.jacobian on an independently written network, what training records,
and the mean-field mean squared singular value on wide nets at init."""

import math

import numpy as np
import pytest
import torch

from pipeline import run, theory
from pipeline.config import RunConfig
from pipeline.model import build_model
from pipeline.monitor import JACOBIAN_INPUTS, jacobian_singular_values
from pipeline.train import train


def _independent_map(model, e: int, alpha: float | None):
    """z_0 -> z_{H-1} of member e, written from the weights with plain tensor ops (tanh; LayerNorm
    without affine changes: gamma 1, beta 0 at init; residual blocks h + alpha tanh(LN(z)))."""
    weights = [(layer.weight[e].detach(), layer.bias[e].detach()) for layer in model.layers]

    def ln(z):
        return (z - z.mean()) / torch.sqrt(z.var(unbiased=False) + 1e-5) if alpha is not None else z

    def f(z):
        x = torch.tanh(ln(z))
        for i in range(1, len(weights) - 1):
            z = weights[i][0] @ x + weights[i][1]
            if i == len(weights) - 2:
                return z
            x = x + alpha * torch.tanh(ln(z)) if alpha is not None else torch.tanh(z)
        return z

    return f


@pytest.mark.parametrize("residual", [False, True])
def test_singular_values_equal_autograd_jacobian_and_svdvals(residual):
    extra = {"norm": "layer", "residual": "plain", "residual_scale": 0.5} if residual else {}
    configs = [RunConfig(activation="tanh", depth=5, width=7, init="xavier_normal", seed=s, **extra) for s in (0, 1)]
    model = build_model(configs, dtype=torch.float64)
    x = torch.randn(2, 3, 784, dtype=torch.float64)
    found = jacobian_singular_values(model, x)
    assert found.shape == (2, 3, 7)
    for e in range(2):
        f = _independent_map(model, e, 0.5 if residual else None)
        for i in range(3):
            z0 = model.layers[0].weight[e].detach() @ x[e, i] + model.layers[0].bias[e].detach()
            expected = torch.linalg.svdvals(torch.autograd.functional.jacobian(f, z0))
            torch.testing.assert_close(found[e, i], expected, rtol=1e-10, atol=1e-12)


def test_training_records_the_spectrum_of_the_initial_weights_at_the_first_inputs(mnist):
    """Step 0's singular values are those of the freshly built nets at the first examples of each
    member's first batch (its own shuffle), and nothing is recorded with BatchNorm."""
    configs = [RunConfig(activation="tanh", depth=4, width=16, init=init, seed=s, max_steps=4, batch_size=32,
                         train_subset=640, device="cpu") for init, s in (("orthogonal", 0), ("he_normal", 3))]
    results = train(configs, mnist)
    model = build_model(configs)
    firsts = torch.stack([torch.randperm(640, generator=torch.Generator().manual_seed(c.seed))[:JACOBIAN_INPUTS]
                          for c in configs])
    expected = jacobian_singular_values(model, mnist.x_train[firsts]).numpy()
    for e, result in enumerate(results):
        assert list(result.jacobian["steps"]) == [0, 2, 3]  # the histogram steps
        np.testing.assert_allclose(result.jacobian["singular_values"][0], expected[e], rtol=1e-4)
    (bn,) = train([configs[0].replace(norm="batch")], mnist)
    assert bn.jacobian == {}


@pytest.mark.e2e  # Monte Carlo on wide nets: tens of seconds each
@pytest.mark.parametrize("init, activation", [("xavier_normal", "tanh"), ("he_normal", "relu"), ("default", "tanh")])
def test_mean_squared_singular_value_matches_the_product_of_chi_on_a_wide_net(mnist, init, activation):
    """Width 1024, depth 6, at init: tr(J J^T)/width against prod_l chi_l at the q-map's lengths,
    within 10% (8 inputs x 1024 singular values)."""
    config = RunConfig(activation=activation, depth=6, width=1024, init=init, max_steps=1, batch_size=32,
                       device="cpu")
    (result,) = train([config], mnist)
    maps = run.forward_maps(config, result)
    predicted = theory.jacobian_mean_sq(config, maps.q)
    found = run.jacobian_metrics(result, predicted)
    assert found["jacobian/sv_min"] <= found["jacobian/sv_median"] <= found["jacobian/sv_max"]
    assert found["jacobian/sv_mean_sq"] == pytest.approx(found["theory/jacobian_mean_sq"], rel=0.10)
    table = run.jacobian_table(result, predicted)
    assert len(table) == JACOBIAN_INPUTS * 1024 and (table.predicted_mean_sq == found["theory/jacobian_mean_sq"]).all()


@pytest.mark.e2e
def test_orthogonal_weights_keep_the_spectrum_concentrated_where_gaussian_ones_spread_it(mnist):
    """Pennington et al. 2017 at the same chi: tanh, sigma_w^2 = 1.05, depth 32. The means agree with
    the theory for both; the spread of log singular values is several times wider for Gaussian."""
    spreads = {}
    for init in ("orthogonal", "normal"):
        config = RunConfig(activation="tanh", depth=32, width=256, init=init, init_gain=math.sqrt(1.05),
                           init_std=math.sqrt(1.05 / 256), max_steps=1, batch_size=32, device="cpu")
        (result,) = train([config], mnist)
        maps = run.forward_maps(config, result)
        found = run.jacobian_metrics(result, theory.jacobian_mean_sq(config, maps.q))
        assert found["jacobian/sv_mean_sq"] == pytest.approx(found["theory/jacobian_mean_sq"], rel=0.5), init
        spreads[init] = float(np.std(np.log(result.jacobian["singular_values"][0])))
    assert spreads["normal"] > 3 * spreads["orthogonal"], spreads


def test_a_short_last_batch_gives_fewer_inputs_not_a_crash(mnist):
    """641 images in batches of 64: the last step (a histogram step) has one example, so its
    Jacobian has one input where the others have JACOBIAN_INPUTS (stacking them raised, and the run
    was FAILED with a traceback)."""
    config = RunConfig(depth=3, width=16, train_subset=641, batch_size=64, device="cpu")
    (result,) = train([config], mnist)
    assert result.outcome == "completed" and result.steps == 11
    shapes = [values.shape for values in result.jacobian["singular_values"]]
    assert shapes[0] == (JACOBIAN_INPUTS, 16) and shapes[-1] == (1, 16)
    assert len(run.jacobian_table(result, float("nan"))) == sum(a * b for a, b in shapes)
