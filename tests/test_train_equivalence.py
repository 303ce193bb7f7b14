"""The engine against an independent reference: a plain nn.Linear loop, written here, in float64.

For 1 and for 4 members, each clip mode, SGD and Adam, BatchNorm and LayerNorm (nn.BatchNorm1d,
nn.LayerNorm), plain and skipinit residual blocks, and a member that diverges while the others
go on: every per-layer statistic, the global norms, clipping, losses, accuracies, histograms and the
evaluations of each member equal those of the reference trained alone on the same batches.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import RunConfig
from pipeline.model import build_model
from pipeline.monitor import HIST_BINS, HIST_RANGE
from pipeline.train import train

BASE = dict(depth=5, width=24, train_subset=320, batch_size=32, epochs=2, max_steps=14, lr=0.05, precision="fp64")
TORCH_ACT = {"tanh": torch.tanh, "relu": torch.relu, "elu": F.elu}


@pytest.fixture(scope="module")
def mnist64(mnist):
    """The first 320 training and 500 test images, in float64."""
    return dataclasses.replace(mnist, x_train=mnist.x_train[:320].double(), y_train=mnist.y_train[:320],
                               x_test=mnist.x_test[:500].double(), y_test=mnist.y_test[:500])


def members(n: int, clip: str = "none", activation: str = "tanh", **extra) -> list[RunConfig]:
    """n configs that differ in everything a group allows: init, std, gain, bias, threshold, seed."""
    variants = [
        dict(init="xavier_normal", clip_threshold=0.5),
        dict(init="he_normal", init_gain=0.8, bias_std=0.1, clip_threshold=2.0),
        dict(init="normal", init_std=0.08, clip_threshold=0.1),
        dict(init="default", clip_threshold=0.02),
    ]
    scale = {"value": 0.02, "agc": 0.05}.get(clip, 1.0)  # so that each mode's thresholds bite
    return [RunConfig(activation=activation, clip=clip, seed=i, **{**variants[i], "clip_threshold":
                      variants[i]["clip_threshold"] * scale}, **BASE, **extra) for i in range(n)]


def _agc(layers: list[nn.Linear], extra: list[nn.Parameter], ratio: float) -> bool:
    """Adaptive gradient clipping as Brock et al. 2021 write it, unit by unit: each row of W and
    the whole bias (and each normalization gamma, beta and residual alpha as a whole),
    ||G_i|| <= ratio * max(||W_i||, 1e-3); the classifier is left alone."""
    active = False
    for layer in layers[:-1]:
        units = [(layer.weight[i], layer.weight.grad[i]) for i in range(layer.weight.shape[0])]
        for p, g in units + [(layer.bias, layer.bias.grad)] + [(q, q.grad) for q in extra if layer is layers[0]]:
            limit = ratio * max(p.norm().item(), 1e-3)
            if g.norm().item() > limit:
                g.mul_(limit / g.norm().item())
                active = True
    return active


def _low_slope(act, z: torch.Tensor) -> torch.Tensor:
    """phi'(z) straight from autograd, below 10% of its reference slope: 1 for all three (tanh'(0),
    and the largest slope of relu and elu)."""
    z = z.detach().clone().requires_grad_()
    (slope,) = torch.autograd.grad(act(z).sum(), z)
    return slope < 0.1


def clip_reference(config: RunConfig, params: list[torch.Tensor], rec: dict, agc=None) -> None:
    """Record the global norm before clipping ("pre"), clip with nn.utils (AGC: `agc()`, which
    clips and says whether it did), record whether clipping was active and the norm after ("post")."""
    rec["pre"].append(math.sqrt(sum(p.grad.norm().item() ** 2 for p in params)))
    if config.clip == "norm":
        nn.utils.clip_grad_norm_(params, config.clip_threshold)
        rec["active"].append(rec["pre"][-1] > config.clip_threshold)
    elif config.clip == "value":
        rec["active"].append(max(p.grad.abs().max().item() for p in params) > config.clip_threshold)
        nn.utils.clip_grad_value_(params, config.clip_threshold)
    elif config.clip == "agc":
        rec["active"].append(agc())
    else:
        rec["active"].append(False)
    rec["post"].append(math.sqrt(sum(p.grad.norm().item() ** 2 for p in params)))


def reference(config: RunConfig, start: list[tuple[torch.Tensor, torch.Tensor]], data) -> dict:
    """Train one config with nn.Linear layers from the given initial parameters; per-step records."""
    act = TORCH_ACT[config.activation]
    layers = [nn.Linear(w.shape[1], w.shape[0]).double() for w, _ in start]
    with torch.no_grad():
        for layer, (w, b) in zip(layers, start):
            layer.weight.copy_(w)
            layer.bias.copy_(b)
    hidden = len(layers) - 1
    norm_of = {"none": lambda w: nn.Identity(), "batch": nn.BatchNorm1d, "layer": nn.LayerNorm}[config.norm]
    norms = [norm_of(config.width).double() for _ in range(hidden)]
    if config.residual == "skipinit":
        alphas = [nn.Parameter(torch.zeros((), dtype=torch.float64)) for _ in range(hidden)]
    else:
        alphas = [torch.tensor(config.residual_scale, dtype=torch.float64)] * hidden
    extra = [p for n in norms for p in n.parameters()] + (alphas[1:] if config.residual == "skipinit" else [])
    params = [p for layer in layers for p in layer.parameters()] + extra

    def forward(h: torch.Tensor, zs: list, us: list) -> torch.Tensor:
        for j, layer in enumerate(layers):
            z = layer(h)
            zs.append(z)
            if j == hidden:
                return z
            u = norms[j](z)
            us.append(u)
            h = h + alphas[j] * act(u) if config.residual != "none" and j > 0 else act(u)

    if config.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)
    else:
        opt = torch.optim.Adam(params, lr=config.lr, betas=(config.momentum, 0.999))
    generator = torch.Generator().manual_seed(config.seed)
    n = config.train_subset
    per_epoch = math.ceil(n / config.batch_size)
    rec: dict[str, list] = {k: [] for k in ("loss", "acc", "pre", "post", "active", "weight_grad_norm",
                                           "backprop_norm", "update_ratio", "act", "hist", "evals")}
    step = 0
    while step < config.total_steps:
        order = torch.randperm(n, generator=generator)
        for i in range(per_epoch):
            idx = order[i * config.batch_size : (i + 1) * config.batch_size]
            zs, us = [], []
            h = forward(data.x_train[idx], zs, us)
            for z in zs:
                z.retain_grad()
            loss = F.cross_entropy(h, data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            rec["loss"].append(loss.item())
            rec["acc"].append((h.argmax(1) == data.y_train[idx]).double().mean().item())
            rec["weight_grad_norm"].append([l.weight.grad.norm().item() for l in layers])
            rec["backprop_norm"].append([z.grad.norm().item() for z in zs])
            low = [_low_slope(act, u) for u in us]  # what phi receives
            if config.activation == "tanh":
                rec["act"].append([m.double().mean().item() for m in low])
            else:  # dead: low slope for every example of the batch
                rec["act"].append([m.all(dim=0).double().mean().item() for m in low])
            rec["hist"].append([np.histogram(np.clip(np.log10(np.abs(l.weight.grad.numpy()) + 1e-30), *HIST_RANGE),
                                             bins=HIST_BINS, range=HIST_RANGE)[0] for l in layers])
            clip_reference(config, params, rec, lambda: _agc(layers, extra, config.clip_threshold))
            before = [l.weight.detach().clone() for l in layers]
            opt.step()
            rec["update_ratio"].append([(l.weight.detach() - w).norm().item() / w.norm().item()
                                        for l, w in zip(layers, before)])
            step += 1
            if step == config.total_steps:
                break
        with torch.no_grad():
            for module in norms:
                module.eval()
            h = forward(data.x_test, [], [])
            for module in norms:
                module.train()
            rec["evals"].append((step - 1, F.cross_entropy(h, data.y_test).item(),
                                 (h.argmax(1) == data.y_test).double().mean().item()))
    return rec


def initial_parameters(configs: list[RunConfig]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    model = build_model(configs, dtype=torch.float64)
    return [[(l.weight[e].detach().clone(), l.bias[e].detach().clone()) for l in model.layers]
            for e in range(len(configs))]


def assert_matches(result, ref: dict, config: RunConfig, until: int | None = None) -> None:
    """The engine's record of a member against the reference, step by step (the first `until`)."""
    table = result.table
    steps = table.groupby("step").first()
    n = until if until is not None else config.total_steps
    assert len(steps) >= n
    close = dict(rtol=1e-5, atol=1e-9)
    for column in ("loss", "acc"):
        np.testing.assert_allclose(steps[column].to_numpy()[:n], ref[column][:n], **close, err_msg=column)
    np.testing.assert_allclose(steps.global_norm_pre_clip.to_numpy()[:n], ref["pre"][:n], **close)
    np.testing.assert_allclose(steps.global_norm_post_clip.to_numpy()[:n], ref["post"][:n], **close)
    np.testing.assert_array_equal(steps.clip_active.to_numpy()[:n], np.array(ref["active"][:n], dtype=float))
    for column in ("weight_grad_norm", "backprop_norm", "update_ratio"):
        ours = table.pivot(index="step", columns="layer", values=column).to_numpy()[:n]
        np.testing.assert_allclose(ours, np.array(ref[column][:n]), **close, err_msg=column)
    statistic = "saturated" if config.activation == "tanh" else "dead"
    ours = table.pivot(index="step", columns="layer", values=statistic).to_numpy()[:n, :-1]
    np.testing.assert_allclose(ours, np.array(ref["act"][:n]), atol=1e-6, err_msg=statistic)
    for slot, step in enumerate(result.histograms["steps"]):
        if step < n:
            diff = np.abs(result.histograms["counts"][slot] - np.array(ref["hist"][step]))
            assert diff.max() <= 2, f"histogram at step {step}"  # float32 log10 at a bin edge


@pytest.mark.e2e  # every mode alone, 1 and 4 members (the fast tier's mixed group has them all)
@pytest.mark.parametrize("n_members", [1, 4])
@pytest.mark.parametrize("clip", ["none", "norm", "value", "agc"])
def test_every_member_matches_the_plain_reference(mnist64, n_members, clip):
    configs = members(n_members, clip)
    starts = initial_parameters(configs)
    bites = []
    for config, start, result in zip(configs, starts, train(configs, mnist64)):
        ref = reference(config, start, mnist64)
        assert result.outcome == "completed"
        assert_matches(result, ref, config)
        assert [e[0] for e in result.evals] == [e[0] for e in ref["evals"]] == [9, 13]
        np.testing.assert_allclose([e[1:] for e in result.evals], [e[1:] for e in ref["evals"]], rtol=1e-9)
        bites.append(any(ref["active"]))
    assert any(bites) == (clip != "none")  # each mode's thresholds bite somewhere


@pytest.mark.parametrize("n_members", [pytest.param(1, marks=pytest.mark.e2e), 4])
def test_adam_and_a_rectifier_match_too(mnist64, n_members):
    configs = members(n_members, "norm", activation="relu", optimizer="adam", momentum=0.9)
    configs = [c.replace(lr=1e-3) for c in configs]
    for config, start, result in zip(configs, initial_parameters(configs), train(configs, mnist64)):
        assert_matches(result, reference(config, start, mnist64), config)


def test_a_diverging_member_stops_while_the_others_go_on(mnist64):
    healthy = members(3, activation="relu")
    blowup = healthy[0].replace(init="normal", init_std=50.0, seed=7)  # overflows even in fp64
    configs = [healthy[0], blowup, healthy[1], healthy[2]]
    results = train(configs, mnist64)
    assert [r.outcome for r in results] == ["completed", "diverged", "completed", "completed"]
    starts = initial_parameters(configs)
    for config, start, result in zip(configs, starts, results):
        ref = reference(config, start, mnist64)
        if result.outcome == "completed":
            assert_matches(result, ref, config)
            assert result.steps == config.total_steps
        else:
            bad = next(i for i, (loss, pre) in enumerate(zip(ref["loss"], ref["pre"]))
                       if not (math.isfinite(loss) and math.isfinite(pre)))
            assert result.steps == bad + 1 and result.table.step.max() == bad  # kept up to the first bad step
            assert_matches(result, ref, config, until=bad)


@pytest.mark.parametrize("norm, residual, clip", [
    pytest.param("batch", "none", "norm", marks=pytest.mark.e2e), pytest.param("layer", "skipinit", "value", marks=pytest.mark.e2e),
    pytest.param("none", "plain", "norm", marks=pytest.mark.e2e), pytest.param("none", "skipinit", "agc", marks=pytest.mark.e2e),
    ("batch", "skipinit", "norm"), ("layer", "plain", "agc"),
])
@pytest.mark.parametrize("n_members", [pytest.param(1, marks=pytest.mark.e2e), 3])
def test_normalization_and_residual_blocks_match_torch_modules(mnist64, norm, residual, clip, n_members):
    """BatchNorm (batch statistics in training, running ones in the evaluations, each member its
    own), LayerNorm, and residual blocks: the same numbers as nn.BatchNorm1d and nn.LayerNorm."""
    configs = [c.replace(residual_scale=0.5 + 0.25 * i) for i, c in
               enumerate(members(n_members, clip, norm=norm, residual=residual))]
    if clip == "agc":  # the ratios are relative to the weights: bite, but let skipinit's alphas move
        configs = [c.replace(clip_threshold=0.02) for c in configs]
    bites = []
    for config, start, result in zip(configs, initial_parameters(configs), train(configs, mnist64)):
        ref = reference(config, start, mnist64)
        assert result.outcome == "completed"
        assert_matches(result, ref, config)
        np.testing.assert_allclose([e[1:] for e in result.evals], [e[1:] for e in ref["evals"]], rtol=1e-9)
        bites.append(any(ref["active"]))
    assert any(bites)


def test_a_group_mixing_clip_modes_lrs_and_momenta_matches_each_member_alone(mnist64):
    """Everything a member holds on its own slice of the stack: its clip mode and threshold, and
    (SGD) its lr and momentum, 0 included. One group; each member against its own reference."""
    from pipeline.config import group_key

    settings = [("none", 1.0, 0.05, 0.9), ("norm", 0.5, 0.1, 0.0), ("value", 0.01, 0.02, 0.5), ("agc", 0.025, 0.05, 0.9),
                ("norm", 2.0, 0.03, 0.95)]
    configs = [c.replace(clip=clip, clip_threshold=threshold, lr=lr, momentum=momentum)
               for c, (clip, threshold, lr, momentum) in zip([*members(4), members(1)[0].replace(seed=4)], settings)]
    assert len({group_key(c) for c in configs}) == 1
    for config, start, result in zip(configs, initial_parameters(configs), train(configs, mnist64)):
        ref = reference(config, start, mnist64)
        assert result.outcome == "completed"
        assert_matches(result, ref, config)
        np.testing.assert_allclose([e[1:] for e in result.evals], [e[1:] for e in ref["evals"]], rtol=1e-9)
        assert any(ref["active"]) == (config.clip != "none"), config.clip  # each member's own mode bites
