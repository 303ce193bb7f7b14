"""The vanilla RNN's mean field through time (theory.predict_time) against Monte Carlo: wide nets
built by recurrent.build_recurrent, ||dL/dh_t|| read by hooks on each state."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from pipeline import theory
from pipeline.config import RunConfig
from pipeline.monitor_time import time_points
from pipeline.recurrent import build_recurrent

WIDTH, T, D = 1024, 28, 28  # sequence rows
DRAWS, BATCH = 3, 32
# Tolerances. Over (net, batch) draws at width 1024 the measured ln||dL/dh_0|| - ln||dL/dh_27|| has a
# standard deviation of 0.02 to 0.08 (it shrinks as 1/sqrt(width): errors of the mean of 8 draws
# were 0.02 to 0.07 at width 256 and 512, under 0.01 at 2048: noise, no bias found), so the mean of
# 3 draws has a standard error of at most ~0.05: LOG_TOL is 4 of them. Measured max |error| of the
# mean over t: 0.01 to 0.06 over the cases below, three sets of seeds each; slopes within 0.002 per
# step (SLOPE_TOL 0.01, predicted slopes +0.03 to -0.56). What the tests tell apart: the default
# init's variances taken as 1/(3 fan_in) move ln||dL/dh_0|| by 6; chi at the fixed point alone
# misses the transient explosion by 1.1.
LOG_TOL, SLOPE_TOL = 0.2, 0.01


class GradientNorms:
    """recurrent.Observer: ||dL/dh_t|| of every step, by a hook on each state."""

    def __init__(self, steps: int):
        self.norms = np.full(steps, np.nan)

    def sequence(self, projected):
        pass

    def state(self, t, h, u, recurrent):
        h.register_hook(lambda grad: self.norms.__setitem__(t, grad.norm().item()))

    def output(self, logits):
        pass


def rows(profiles: np.ndarray, gen: torch.Generator) -> torch.Tensor:
    """Gaussian images (examples, 784) whose row t of example n has mean square profiles[n, t] exactly."""
    g = torch.randn(*profiles.shape, D, generator=gen, dtype=torch.float64)
    g = g / g.pow(2).mean(-1, keepdim=True).sqrt()
    return (g * torch.from_numpy(profiles).sqrt()[..., None]).reshape(len(profiles), T * D)


def measured_log_norms(config: RunConfig, profiles: np.ndarray, seed: int) -> np.ndarray:
    """ln||dL/dh_t|| - ln||dL/dh_T-1|| of one net (seeded) on one batch, for L = sum(logits * r)."""
    net = build_recurrent([dataclasses.replace(config, seed=seed)], dtype=torch.float64)
    net.observer = recorder = GradientNorms(net.steps)
    gen = torch.Generator().manual_seed(1000 + seed)
    logits = net(rows(profiles, gen))
    (logits * torch.randn(logits.shape, generator=gen, dtype=torch.float64)).sum().backward()
    logs = np.log(recorder.norms)
    return logs - logs[-1]


def rnn(**kwargs) -> RunConfig:
    return RunConfig(**{"arch": "rnn", "activation": "tanh", "width": WIDTH, "sequence": "rows", **kwargs})


def normal(sigma_w2: float) -> dict:
    return {"init": "normal", "init_std": math.sqrt(sigma_w2 / WIDTH)}  # sigma_u^2 = 28/1024 sigma_w^2


BUMP = 0.2 + 1.3 * np.sin(np.linspace(0, np.pi, T)) ** 2  # an MNIST-like profile: empty top and bottom rows

CASES = {
    # (config, p_t, sign of the slope): chi_t ~ sigma_w^2 = 1.2 while q_t is small (q_0 = 0.002),
    # towards chi* ~ 1 at q* ~ 0.11: a transient explosion over the first ~20 steps
    "exploding_transient": (rnn(**normal(1.2)), np.full(T, 0.05), +1),
    "exploding_fixed_point": (rnn(**normal(2.0)), np.ones(T), +1),  # chi* = 1.04 > 1
    "vanishing": (rnn(**normal(0.6)), np.ones(T), -1),
    "he_normal_profile": (rnn(init="he_normal"), BUMP, -1),  # sigma_u^2 = 2: the input term dominates q_t
    "default": (rnn(init="default"), np.ones(T), -1),  # every Var 1/(3H): sigma_u^2 = 28/3072, not 1/3
    "own_recurrent_rule": (rnn(init="xavier_normal", recurrent_init="orthogonal", recurrent_gain=1.1, bias_std=0.1),
                           np.ones(T), -1),
    "default_recurrent_rule": (rnn(init="lecun_normal", recurrent_init="default", recurrent_gain=2.0, bias_std=0.2),
                               np.ones(T), -1),
}


@pytest.mark.parametrize("name", CASES)
def test_log_norms_through_time_match_monte_carlo(name):
    config, p, sign = CASES[name]
    prediction = theory.predict_time(config, p)
    batch = np.broadcast_to(p, (BATCH, T)).copy()
    measured = np.mean([measured_log_norms(config, batch, seed) for seed in range(DRAWS)], axis=0)
    assert prediction.log_norms[-1] == 0.0
    np.testing.assert_allclose(measured, prediction.log_norms, atol=LOG_TOL, rtol=0)
    slope = theory.measured_time_slope(np.arange(T), np.exp(measured))
    assert slope == pytest.approx(prediction.slope, abs=SLOPE_TOL)
    assert sign * prediction.slope > 0.02 and sign * slope > 0.02
    if name == "exploding_fixed_point":
        assert prediction.chi > 1.03  # 1.043


def test_per_example_profiles_are_what_the_batch_norm_sees():
    """Rows of 0.2 or 2.0 at random (MNIST's background and ink): each example has its own q_t, and
    the batch's gradient is dominated by the examples whose gradient vanishes least. The mean profile
    is 1.6 to 1.9 off in ln||dL/dh_0|| (slope -0.30 against a measured -0.24); the examples' own
    profiles 0.1 to 0.16 per batch."""
    config, rng = rnn(init="he_normal"), np.random.default_rng(0)
    measured, own, mean = [], [], []
    for seed in range(DRAWS):
        profiles = np.where(rng.random((BATCH, T)) < 0.5, 0.2, 2.0)
        measured.append(measured_log_norms(config, profiles, seed))
        own.append(theory.predict_time(config, profiles).log_norms)
        mean.append(theory.predict_time(config, profiles.mean(axis=0)).log_norms)
    measured, own, mean = (np.mean(x, axis=0) for x in (measured, own, mean))
    np.testing.assert_allclose(measured, own, atol=LOG_TOL, rtol=0)
    assert theory.measured_time_slope(np.arange(T), np.exp(measured)) == pytest.approx(
        -np.polyfit(np.arange(T), own, 1)[0], abs=SLOPE_TOL)
    assert abs(measured[0] - mean[0]) > 1.0


@pytest.mark.parametrize("config, reason", [
    (RunConfig(arch="lstm", width=64), "gated"),
    (RunConfig(arch="gru", width=64), "gated"),
    (rnn(recurrent_init="identity"), "identity"),
    (RunConfig(arch="mlp"), "not a recurrent net"),
])
def test_no_prediction_where_the_mean_field_does_not_apply(config, reason):
    with pytest.raises(ValueError, match=reason):
        theory.predict_time(config, np.ones(T))


def test_the_profile_must_have_the_sequence_length():
    with pytest.raises(ValueError, match="784"):
        theory.predict_time(rnn(sequence="pixels"), np.ones(T))


def test_measured_time_slope_of_an_exponential_is_its_rate():
    t = np.arange(T)
    assert theory.measured_time_slope(t, 3.0 * np.exp(-0.25 * t)) == pytest.approx(0.25, abs=1e-12)  # grows towards 0
    kept = time_points(784)  # 28 of 784 pixels: every 29th step
    assert theory.measured_time_slope(kept, np.exp(0.01 * kept)) == pytest.approx(-0.01, abs=1e-12)
    irregular = np.array([0, 1, 5, 6, 40, 41, 300])
    assert theory.measured_time_slope(irregular, np.exp(-0.03 * irregular)) == pytest.approx(0.03, abs=1e-12)


def test_measured_time_slope_keeps_finite_positive_norms():
    t = np.arange(5.0)
    norms = np.exp(-0.5 * t)
    norms[[1, 3]] = [0.0, np.nan]
    assert theory.measured_time_slope(t, norms) == pytest.approx(0.5, abs=1e-12)
    assert math.isnan(theory.measured_time_slope(t, [1.0, 0.0, np.inf, np.nan, -1.0]))
    assert math.isnan(theory.measured_time_slope([2, 2], [1.0, 3.0]))  # one time point, twice


def test_the_predicted_slope_is_fitted_as_the_measured_one():
    prediction = theory.predict_time(rnn(init="he_normal", sequence="pixels"), np.full(784, 0.5))
    everywhere, kept = np.arange(784), time_points(784)
    assert prediction.slope == pytest.approx(theory.measured_time_slope(everywhere, np.exp(prediction.log_norms)))
    assert prediction.slope_at(kept) == pytest.approx(
        theory.measured_time_slope(kept, np.exp(prediction.log_norms[kept])), rel=1e-9)
