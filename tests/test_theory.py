"""Mean-field theory against closed forms, Monte Carlo, and measured gradients on real MNIST."""

import math

import numpy as np
import pytest
import torch

from pipeline import theory
from pipeline.activations import ACTIVATIONS as REGISTRY
from pipeline.config import ACTIVATIONS, RunConfig
from pipeline.train import train


def test_relu_closed_forms():
    assert theory.predict(RunConfig(activation="relu", init="he_normal")).chi1 == pytest.approx(1.0, abs=1e-9)
    assert theory.predict(RunConfig(activation="relu", init="xavier_normal")).chi1 == pytest.approx(0.5, abs=1e-9)
    assert theory.length_map("relu", 3.0, 2.0, 0.0) == pytest.approx(3.0, abs=1e-9)  # q -> sigma_w^2 q / 2
    assert theory.predict(RunConfig(activation="relu", init="he_normal")).xi == math.inf


@pytest.mark.parametrize("sigma_w2", [0.5, 1.0, 1.7, 4.0])
def test_tanh_at_small_q_gives_sigma_w2(sigma_w2):
    assert theory.chi("tanh", 1e-10, sigma_w2) == pytest.approx(sigma_w2, rel=1e-8)


def test_numpy_activations_are_the_torch_ones():
    x = np.linspace(-6, 6, 241)
    for name in ACTIVATIONS:
        phi, dphi = REGISTRY[name].phi, REGISTRY[name].dphi
        t = torch.tensor(x, requires_grad=True)
        y = REGISTRY[name].module()(t)
        (grad,) = torch.autograd.grad(y.sum(), t)
        np.testing.assert_allclose(phi(x), y.detach().numpy(), rtol=1e-6, atol=1e-9, err_msg=name)
        mask = np.abs(x) > 1e-9  # the kink of rectifiers
        np.testing.assert_allclose(dphi(x)[mask], grad.numpy()[mask], rtol=1e-6, atol=1e-9, err_msg=name)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("q", [0.05, 1.0, 30.0, 784.0])
def test_expectations_match_monte_carlo(activation, q):
    phi, dphi = REGISTRY[activation].phi, REGISTRY[activation].dphi
    z = np.random.default_rng(0).standard_normal(2_000_000) * math.sqrt(q)
    for f in (lambda x: phi(x) ** 2, lambda x: dphi(x) ** 2):
        samples = f(z)
        stderr = samples.std() / math.sqrt(len(z))
        assert abs(theory.gaussian_mean(f, q) - samples.mean()) < 5 * stderr + 1e-12


def test_correlation_depth_peaks_at_the_order_chaos_boundary():
    """Schoenholz et al. 2017: for tanh with sigma_b^2 = 0.05 the boundary is near sigma_w^2 = 1.76."""
    def xi_c(sw2):
        return theory.correlation_depth("tanh", theory.fixed_point("tanh", sw2, 0.05), sw2, 0.05)

    assert xi_c(1.76) > 5 * xi_c(1.2)


@pytest.mark.parametrize(
    "activation, init, std",
    [("tanh", "xavier_normal", 1), ("tanh", "default", 1), ("relu", "default", 1), ("relu", "he_normal", 1),
     ("sigmoid", "default", 1), ("tanh", "normal", 0.1), ("selu", "lecun_normal", 1), ("relu", "normal", 0.1),
     ("gelu", "he_normal", 1)],
)
def test_predicted_slope_matches_the_measured_one(mnist, activation, init, std):
    """At init, the fitted per-layer slope of ln||dL/dh|| on real MNIST agrees with the finite-depth
    prediction (fixed-point theory alone is far off for gelu/He, which reaches q* slowly)."""
    cfg = RunConfig(activation=activation, init=init, init_std=std, depth=12, width=512, max_steps=1, batch_size=256)
    prediction = theory.predict(cfg, float(mnist.x_train.pow(2).mean()))
    init_norms = train([cfg], mnist)[0].table.query("step == 0").sort_values("layer").backprop_norm.to_numpy()
    assert theory.measured_slope(init_norms) == pytest.approx(prediction.finite_slope, abs=0.05)


def test_gain_and_bias_variance_enter_the_prediction():
    # LeCun with gain sqrt(2) is He: critical for ReLU
    assert theory.predict(RunConfig(activation="relu", init="lecun_normal", init_gain=math.sqrt(2))).chi1 == pytest.approx(1.0)
    cfg = RunConfig(activation="tanh", init="lecun_normal", init_gain=1.5, bias_std=0.2)
    assert theory.sigma_w2_of(cfg, 256, 256) == pytest.approx(2.25)
    assert theory.sigma_b2_of(cfg, 256) == pytest.approx(0.04)
    # with biases, q* stays away from zero even in the ordered phase
    assert theory.predict(cfg.replace(init_gain=0.8)).q_star > 0.01
