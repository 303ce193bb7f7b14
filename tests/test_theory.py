"""Mean-field theory against closed forms, Monte Carlo, and measured gradients on real MNIST."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from pipeline import theory
from pipeline.activations import ACTIVATIONS as REGISTRY
from pipeline.config import ACTIVATIONS, RunConfig
from pipeline.model import build_model
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
    # the step-0 norms only: no signal instruments, a small test set for the one evaluation
    small = dataclasses.replace(mnist, x_test=mnist.x_test[:256], y_test=mnist.y_test[:256])
    (result,) = train([cfg], small, instruments=frozenset())
    init_norms = result.table.query("step == 0").sort_values("layer").backprop_norm.to_numpy()
    assert theory.measured_slope(init_norms) == pytest.approx(prediction.finite_slope, abs=0.05)


def test_gain_and_bias_variance_enter_the_prediction():
    # LeCun with gain sqrt(2) is He: critical for ReLU
    assert theory.predict(RunConfig(activation="relu", init="lecun_normal", init_gain=math.sqrt(2))).chi1 == pytest.approx(1.0)
    cfg = RunConfig(activation="tanh", init="lecun_normal", init_gain=1.5, bias_std=0.2)
    assert theory.sigma_w2_of(cfg, 256, 256) == pytest.approx(2.25)
    assert theory.sigma_b2_of(cfg, 256) == pytest.approx(0.04)
    # with biases, q* stays away from zero even in the ordered phase
    assert theory.predict(cfg.replace(init_gain=0.8)).q_star > 0.01


def monte_carlo_profile(config: RunConfig, seeds: int = 4, batch: int = 256) -> np.ndarray:
    """ln||dL/dz_l|| over the hidden layers (the last one 0) of random float64 nets built by the
    engine (model.build_model) on Gaussian inputs (E[x^2] = 1, per-pixel variance 1), backpropagating
    a random output gradient, averaged over seeds."""
    profiles = []
    for seed in range(seeds):
        model = build_model([config.replace(seed=seed, batch_size=batch)], dtype=torch.float64)
        zs: list[torch.Tensor] = []

        def keep(module, inputs, z, zs=zs):
            z.retain_grad()
            zs.append(z)

        for layer in model.layers:
            layer.register_forward_hook(keep)
        generator = torch.Generator().manual_seed(1000 + seed)
        out = model(torch.randn(batch, 784, generator=generator, dtype=torch.float64))
        (out * torch.randn(out.shape, generator=generator, dtype=torch.float64)).sum().backward()
        norms = np.log([z.grad.norm().item() for z in zs[:-1]])
        profiles.append(norms - norms[-1])
    return np.mean(profiles, axis=0)


@pytest.mark.parametrize("case", [
    dict(activation="relu", init="he_normal"),
    dict(activation="tanh", init="xavier_normal"),
    dict(activation="relu", init="he_normal", norm="batch"),
    dict(activation="tanh", init="xavier_normal", norm="batch"),
    dict(activation="relu", init="he_normal", norm="layer"),
    dict(activation="tanh", init="default", norm="layer"),
    dict(activation="tanh", init="xavier_normal", residual="plain"),
    dict(activation="relu", init="he_normal", residual="plain"),
    dict(activation="relu", init="default", residual="plain", residual_scale=0.5),
    dict(activation="relu", init="he_normal", norm="batch", residual="plain", residual_scale=0.3),
    dict(activation="tanh", init="xavier_normal", norm="layer", residual="plain"),
], ids=lambda case: "-".join(str(v) for v in case.values()))
def test_predicted_profile_matches_monte_carlo_on_wide_random_nets(case):
    """Each normalization and residual case: the predicted per-layer profile of ln||dL/dz|| and its
    fitted slope against wide random nets in float64 (width 512, batch 256, depth 10)."""
    config = RunConfig(depth=10, width=512, **case)
    prediction = theory.predict(config, input_sq_mean=1.0, input_var_mean=1.0)
    measured = monte_carlo_profile(config)
    assert theory.measured_slope(np.exp(np.append(measured, 0.0))) == pytest.approx(
        prediction.finite_slope, abs=0.015 + 0.03 * abs(prediction.finite_slope))
    np.testing.assert_allclose(measured, prediction.log_norms, atol=0.12)


def test_batchnorm_explodes_by_pi_over_pi_minus_one_for_relu():
    """Yang et al. 2019: at large batch, BatchNorm's ReLU net multiplies E||dL/dz||^2 by pi/(pi - 1)
    per layer, whatever the init, where the plain He net keeps it level."""
    for init in ("he_normal", "xavier_normal", "default"):
        prediction = theory.predict(RunConfig(activation="relu", init=init, norm="batch"))
        assert prediction.chi1 == pytest.approx(math.pi / (math.pi - 1), rel=1e-6)
    assert theory.predict(RunConfig(activation="relu", init="he_normal")).chi1 == pytest.approx(1.0)


def test_no_prediction_where_mean_field_does_not_hold():
    skipinit = theory.predict(RunConfig(residual="skipinit", depth=10))
    assert math.isnan(skipinit.finite_slope)  # alpha = 0: no gradient reaches the blocks at init
    deep_relu_stream = theory.predict(RunConfig(activation="relu", residual="plain", depth=20))
    assert math.isnan(deep_relu_stream.finite_slope) and math.isnan(deep_relu_stream.chi1)
    assert math.isfinite(theory.predict(RunConfig(activation="tanh", residual="plain", depth=20)).finite_slope)
    assert math.isfinite(theory.predict(RunConfig(activation="relu", residual="plain", norm="layer", depth=20)).finite_slope)


@pytest.mark.parametrize("case", [
    dict(activation="relu", init="he_normal", norm="batch"),
    dict(activation="tanh", init="xavier_normal", norm="layer"),
    dict(activation="tanh", init="xavier_normal", residual="plain"),
    dict(activation="relu", init="he_normal", norm="batch", residual="plain", residual_scale=0.5),
], ids=lambda case: "-".join(str(v) for v in case.values()))
def test_normalized_and_residual_slopes_match_on_real_mnist(mnist, case):
    """The same check on MNIST through the training loop, with the data's own input statistics."""
    cfg = RunConfig(depth=12, width=512, max_steps=1, batch_size=256, **case)
    small = dataclasses.replace(mnist, x_test=mnist.x_test[:256], y_test=mnist.y_test[:256])
    result = train([cfg], small, instruments=frozenset())[0]
    prediction = theory.predict(cfg, result.input_sq_mean, result.input_var_mean)
    init_norms = result.table.query("step == 0").sort_values("layer").backprop_norm.to_numpy()
    assert theory.measured_slope(init_norms) == pytest.approx(prediction.finite_slope, abs=0.05)


@pytest.mark.parametrize("case", [
    dict(activation="tanh", init="xavier_normal"),
    dict(activation="tanh", init="normal", init_std=0.1),  # chaotic: sigma_w^2 = 10
    dict(activation="tanh", init="lecun_normal", init_gain=1.5, bias_std=0.3),
    dict(activation="relu", init="he_normal"),
    dict(activation="sigmoid", init="default"),
], ids=lambda case: "-".join(str(v) for v in case.values()))
def test_forward_q_and_c_maps_match_monte_carlo(case):
    """The q-map and c-map, propagated from the input's mean square and mean cross product, against
    wide random float64 nets on correlated Gaussian inputs, averaged over seeds."""
    from pipeline.monitor import length_and_correlation, square_and_cross

    config = RunConfig(depth=8, width=1024, **case)
    generator = torch.Generator().manual_seed(5)
    shared = torch.randn(1, 784, generator=generator, dtype=torch.float64)
    x = 0.6 * shared + 0.8 * torch.randn(64, 784, generator=generator, dtype=torch.float64)  # correlation 0.36
    measured = []
    for seed in range(12):  # ReLU at criticality: q's per-layer ratio has sd ~ sqrt(5 / width) per net
        model = build_model([config.replace(seed=seed)], dtype=torch.float64)
        h, rows = x, []
        with torch.no_grad():
            for layer in model.layers[:-1]:
                z = layer(h)
                rows.append([v.item() for v in length_and_correlation(z, 1)])
                h = model.act(z)
        measured.append(rows)
    q, c = np.mean(measured, axis=0).T
    maps = theory.forward_maps(config, *(v.item() for v in square_and_cross(x, 1)))
    np.testing.assert_allclose(q, maps.q, rtol=0.1)
    np.testing.assert_allclose(c, maps.c, atol=0.03)
    assert theory.forward_maps(config.replace(norm="batch"), 1.0, 0.1) is None  # not modelled: no prediction


def test_an_exploding_nets_q_map_is_not_capped():
    """ReLU with N(0, 1) weights at width 128: q grows by sigma_w^2 / 2 = 64 per layer, past 1e12
    (where the fixed-point search stops) as the measured q does; beyond a float's reach, no prediction."""
    maps = theory.forward_maps(RunConfig(activation="relu", init="normal", width=128, depth=20), 1.0, 0.3)
    np.testing.assert_allclose(np.diff(np.log10(maps.q))[1:], np.log10(64), rtol=1e-6)
    assert maps.q[-1] > 1e30
    deep = theory.forward_maps(RunConfig(activation="relu", init="normal", width=1024, depth=200), 1.0, 0.3)
    assert np.isnan(deep.q[-1]) and np.isfinite(deep.q[:10]).all()


def test_fixed_point_reaches_the_critical_point_and_skips_unstable_ones():
    """tanh at sigma_w^2 = 1, sigma_b^2 = 0: q* = 0, where chi = tanh'(0)^2 = 1 exactly; the length
    map creeps there (q - q^2 per step: plain iteration stopped 2,000 steps short, at chi 0.9995).
    GELU at a large gain has 0 as an unstable fixed point and q growing without bound: the
    acceleration must not jump onto 0. Each against its analytic value; and the accelerated answer
    is a fixed point of the map to the iteration's tolerance."""
    q = theory.fixed_point("tanh", 1.0, 0.0)
    assert abs(theory.chi("tanh", q, 1.0) - 1.0) < 1e-5
    assert theory.fixed_point("gelu", 16.0, 0.0) == theory.Q_MAX
    assert theory.fixed_point("relu", 2.5, 0.0) == theory.Q_MAX
    for activation, sw2, sb2 in [("tanh", 1.5, 0.05), ("sigmoid", 4.0, 0.1), ("elu", 1.2, 0.02)]:
        q = theory.fixed_point(activation, sw2, sb2)
        assert abs(theory.length_map(activation, q, sw2, sb2) - q) <= 1e-11 * max(1.0, q)


def test_correlation_fixed_point_is_a_fixed_point_across_the_order_chaos_boundary():
    """tanh, sigma_b^2 = 0.05, from the ordered phase across the boundary (sigma_w^2 ~ 1.76) into
    chaos: c* is a fixed point of the c-map to 1e-9 (plain iteration stopped at its 200-step cap near
    the boundary, 0.970 where c* is 0.998), and it falls from ~1 as chi_1 crosses 1."""
    found = []
    for sw2 in (1.5, 1.7, 1.76, 1.8, 2.0, 3.0):
        q = theory.fixed_point("tanh", sw2, 0.05)
        c = theory.correlation_fixed_point("tanh", q, sw2, 0.05)
        assert abs(theory.correlation_map("tanh", c, q, sw2, 0.05)[0] - c) < 1e-9, sw2
        found.append(c)
    assert found[0] > 0.9999 and found == sorted(found, reverse=True) and found[-1] < 0.5


@pytest.mark.parametrize("activation, sw2", [("tanh", 2.0), ("tanh", 4.0), ("softsign", 2.0)])
def test_correlation_fixed_point_is_where_plain_iteration_goes(activation, sw2):
    """Odd activations without bias in chaos: the c-map is nearly linear near its fixed point, and an
    unguarded Aitken jump crossed it, then crossed back, for all 200 steps (tanh at sigma_w^2 = 2
    logged c* = 0.63 and xi_c = 157 where c* = 0, xi_c = 21.7). c* must be where 2,000 plain steps
    from c = 0.5 go, and for tanh (c* = 0: independent inputs) xi_c = -1/ln(sigma_w^2 E[phi'(u)]^2),
    u ~ N(0, q*), from an independent Gauss-Hermite rule."""
    q = theory.fixed_point(activation, sw2, 0.0)
    phi = REGISTRY[activation].phi
    c = 0.5
    for _ in range(2_000):
        c = sw2 * theory._pair_mean(phi, q, c) / q
    found = theory.correlation_fixed_point(activation, q, sw2, 0.0)
    assert found == pytest.approx(c, abs=1e-6)
    if activation == "tanh":
        x, w = np.polynomial.hermite_e.hermegauss(80)
        slope = np.sum(w * (1 - np.tanh(math.sqrt(q) * x) ** 2)) / math.sqrt(2 * math.pi)
        assert theory.correlation_depth(activation, q, sw2, 0.0) == pytest.approx(-1 / math.log(sw2 * slope**2), rel=1e-4)
