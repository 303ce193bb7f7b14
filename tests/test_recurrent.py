"""Recurrent nets against PyTorch's own cells (nn.RNN, nn.LSTM, nn.GRU), in float64.

The reference steps the torch module one time step at a time (so that each h_t is a tensor whose
gradient is the whole dL/dh_t), trains with torch.optim.SGD and nn.utils' clipping, and computes
every statistic itself: each member of a group that mixes inits, clip modes, lrs and momenta must
record what its reference records alone, step by step.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import GATES, SEQUENCE_SHAPES, ConfigError, RunConfig, run_name
from pipeline.monitor_time import time_points
from pipeline.recurrent import build_recurrent
from pipeline.train import train
from tests.test_train_equivalence import clip_reference

BASE = dict(width=10, train_subset=96, batch_size=32, epochs=2, max_steps=5, precision="fp64")
TORCH_CELL = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


@pytest.fixture(scope="module")
def mnist64(mnist):
    return dataclasses.replace(mnist, x_train=mnist.x_train[:96].double(), y_train=mnist.y_train[:96],
                               x_test=mnist.x_test[:200].double(), y_test=mnist.y_test[:200])


def group(arch: str, **extra) -> list[RunConfig]:
    """Three members that differ in all a group allows: init, W's init and scale, clip mode, lr, momentum, seed."""
    variants = [
        dict(init="default", clip="none", lr=0.05, momentum=0.9),
        dict(init="xavier_normal", recurrent_init="orthogonal", recurrent_gain=1.3, bias_std=0.1, clip="norm",
             clip_threshold=0.05, lr=0.1, momentum=0.0),
        dict(init="he_normal", recurrent_init="identity", clip="value", clip_threshold=0.002, lr=0.02, momentum=0.5),
    ]
    return [RunConfig(arch=arch, seed=i, **variants[i], **{**BASE, **extra}) for i in range(len(variants))]


def _cell(arch: str, start, activation: str) -> tuple[nn.Module, nn.Linear]:
    (U, b_ih), (W, b_hh), (V, b) = start
    kwargs = {"nonlinearity": activation} if arch == "rnn" else {}
    cell = TORCH_CELL[arch](U.shape[1], W.shape[1], batch_first=True, **kwargs).double()
    head = nn.Linear(V.shape[1], V.shape[0]).double()
    with torch.no_grad():
        for p, v in ((cell.weight_ih_l0, U), (cell.bias_ih_l0, b_ih), (cell.weight_hh_l0, W),
                     (cell.bias_hh_l0, b_hh), (head.weight, V), (head.bias, b)):
            p.copy_(v)
    return cell, head


def _squashed_input(arch: str, cell: nn.Module, x_t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """What the state's squashing receives at a step, from the cell's weights: the RNN's
    pre-activation, the LSTM's candidate g, the GRU's n (computed here, not read from the engine)."""
    gi = F.linear(x_t, cell.weight_ih_l0, cell.bias_ih_l0)
    gh = F.linear(h, cell.weight_hh_l0, cell.bias_hh_l0)
    H = h.shape[-1]
    if arch == "rnn":
        return gi + gh
    if arch == "lstm":
        return (gi + gh)[:, 2 * H : 3 * H]
    r = torch.sigmoid(gi[:, :H] + gh[:, :H])
    return gi[:, 2 * H :] + r * gh[:, 2 * H :]


def _low_slope(activation: str, z: torch.Tensor) -> torch.Tensor:
    """phi'(z) from autograd below 10% of phi's largest slope (1 for tanh and relu)."""
    z = z.clone().requires_grad_()
    (slope,) = torch.autograd.grad(getattr(torch, activation)(z).sum(), z)
    return slope < 0.1


def reference(config: RunConfig, start, data) -> dict:
    activation = config.activation if config.arch == "rnn" else "tanh"
    cell, head = _cell(config.arch, start, activation if config.arch == "rnn" else "tanh")
    params = list(cell.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)
    T, d = SEQUENCE_SHAPES[config.sequence]
    kept = time_points(T)
    rec = {k: [] for k in ("loss", "pre", "post", "active", "weight_grad_norm", "backprop_norm", "update_ratio",
                           "grad_norm", "state_sq", "act", "evals")}
    generator = torch.Generator().manual_seed(config.seed)
    n, step = config.train_subset, 0
    while step < config.total_steps:
        order = torch.randperm(n, generator=generator)
        for i in range(math.ceil(n / config.batch_size)):
            idx = order[i * config.batch_size : (i + 1) * config.batch_size]
            x = data.x_train[idx].view(len(idx), T, d)
            hidden = None
            states, squashed = [], []
            for t in range(T):
                h_prev = torch.zeros(len(idx), config.width, dtype=torch.float64) if hidden is None else (
                    hidden[0] if isinstance(hidden, tuple) else hidden)[0]
                squashed.append(_squashed_input(config.arch, cell, x[:, t], h_prev).detach())
                _, hidden = cell(x[:, t : t + 1], hidden)
                h = hidden[0] if isinstance(hidden, tuple) else hidden
                h.retain_grad()
                states.append(h)
            logits = head(states[-1][0])
            logits.retain_grad()
            loss = F.cross_entropy(logits, data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            rec["loss"].append(loss.item())
            rec["weight_grad_norm"].append([cell.weight_ih_l0.grad.norm().item(), cell.weight_hh_l0.grad.norm().item(),
                                            head.weight.grad.norm().item()])
            rec["backprop_norm"].append(logits.grad.norm().item())
            rec["grad_norm"].append([states[t].grad.norm().item() for t in kept])
            rec["state_sq"].append([states[t].pow(2).mean().item() for t in kept])
            low = [_low_slope(activation, squashed[t]) for t in kept]
            if activation == "tanh":  # saturated: phi' below 10% of its largest; dead: so for every example
                rec["act"].append([m.double().mean().item() for m in low])
            else:
                rec["act"].append([m.all(dim=0).double().mean().item() for m in low])
            clip_reference(config, params, rec)
            before = [p.detach().clone() for p in (cell.weight_ih_l0, cell.weight_hh_l0, head.weight)]
            opt.step()
            rec["update_ratio"].append([(p.detach() - w).norm().item() / w.norm().item() for p, w in
                                        zip((cell.weight_ih_l0, cell.weight_hh_l0, head.weight), before)])
            step += 1
            if step == config.total_steps:
                break
        with torch.no_grad():
            out, _ = cell(data.x_test.view(len(data.x_test), T, d))
            h = head(out[:, -1])
            rec["evals"].append((step - 1, F.cross_entropy(h, data.y_test).item(),
                                 (h.argmax(1) == data.y_test).double().mean().item()))
    return rec


def _start(configs: list[RunConfig]):
    net = build_recurrent(configs, dtype=torch.float64)
    return [[(l.weight[e].detach().clone(), l.bias[e].detach().clone()) for l in net.layers]
            for e in range(len(configs))]


def assert_matches(result, ref: dict, config: RunConfig) -> None:
    close = dict(rtol=1e-6, atol=1e-12)
    steps = result.table.groupby("step").first()
    n = config.total_steps
    np.testing.assert_allclose(steps.loss.to_numpy(), ref["loss"], **close, err_msg="loss")
    np.testing.assert_allclose(steps.global_norm_pre_clip.to_numpy(), ref["pre"], **close)
    np.testing.assert_allclose(steps.global_norm_post_clip.to_numpy(), ref["post"], **close)
    np.testing.assert_array_equal(steps.clip_active.to_numpy(), np.array(ref["active"], dtype=float))
    for column in ("weight_grad_norm", "update_ratio"):
        ours = result.table.pivot(index="step", columns="layer", values=column).to_numpy()
        np.testing.assert_allclose(ours, np.array(ref[column]), **close, err_msg=column)
    ours = result.table.pivot(index="step", columns="layer", values="backprop_norm").to_numpy()
    np.testing.assert_allclose(ours[:, 2], ref["backprop_norm"], **close, err_msg="dL/dlogits")
    statistic = "saturated" if config.arch != "rnn" or config.activation == "tanh" else "dead"
    for column, key in (("grad_norm", "grad_norm"), ("state_sq", "state_sq"), (statistic, "act")):
        ours = result.time.pivot(index="step", columns="time", values=column).to_numpy()
        assert ours.shape == (n, len(time_points(SEQUENCE_SHAPES[config.sequence][0])))
        np.testing.assert_allclose(ours, np.array(ref[key]), **close, err_msg=column)
    np.testing.assert_allclose([e[1:] for e in result.evals], [e[1:] for e in ref["evals"]], **close)


@pytest.mark.parametrize("arch, activation", [("rnn", "tanh"), ("rnn", "relu"), ("lstm", "relu"), ("gru", "relu")])
def test_a_mixed_group_matches_torch_cells_member_by_member(mnist64, arch, activation):
    configs = group(arch, activation=activation)
    results = train(configs, mnist64)
    for config, start, result in zip(configs, _start(configs), results):
        assert result.outcome == "completed"
        assert_matches(result, reference(config, start, mnist64), config)


@pytest.mark.e2e
def test_pixel_mnist_matches_too(mnist64):
    configs = group("rnn", activation="tanh", sequence="pixels", max_steps=2)[:2]
    results = train(configs, mnist64)
    for config, start, result in zip(configs, _start(configs), results):
        assert_matches(result, reference(config, start, mnist64), config)
        assert sorted(result.time.time.unique()) == list(time_points(784))
        assert result.time.time.max() == 783 and result.time.time.nunique() == 28


def test_the_recurrent_layers_see_the_same_error_where_the_cell_adds_their_outputs(mnist64):
    """RNN and LSTM add U x_t and W h_t-1 before any gate: the error reaching either, over every t,
    is one and the same (L00 = L01); the GRU gates W's candidate block by r, so it differs."""
    for arch, same in (("rnn", True), ("lstm", True), ("gru", False)):
        table = train(group(arch)[:1], mnist64)[0].table
        flows = table.pivot(index="step", columns="layer", values="backprop_norm").to_numpy()
        assert np.allclose(flows[:, 0], flows[:, 1], rtol=1e-9) == same, arch


def test_the_spectrum_of_w_is_its_own(mnist64):
    configs = group("rnn", activation="tanh")
    results = train(configs, mnist64)
    net = build_recurrent(configs, dtype=torch.float64)
    for e, result in enumerate(results):
        W = net.layers[1].weight[e].detach()
        assert result.spectrum["steps"][0] == 0
        np.testing.assert_allclose(result.spectrum["sv_max"][0], np.linalg.norm(W.numpy(), 2), rtol=1e-6)
        np.testing.assert_allclose(result.spectrum["spectral_radius"][0], np.abs(np.linalg.eigvals(W.numpy())).max(),
                                   rtol=1e-6)
    identity = results[2].spectrum  # identity init: radius and largest singular value 1 at step 0
    assert identity["spectral_radius"][0] == pytest.approx(1.0) and identity["sv_max"][0] == pytest.approx(1.0)
    gated = train(group("lstm")[:1], mnist64)[0].spectrum
    assert np.isnan(gated["spectral_radius"]).all() and np.isfinite(gated["sv_max"]).all()


def test_default_init_is_pytorchs_and_inits_act_per_gate():
    H = 64
    for arch in GATES:
        net = build_recurrent([RunConfig(arch=arch, width=H)])
        for layer in net.layers[:2]:
            assert layer.weight.abs().max() <= 1 / math.sqrt(H) and layer.bias.abs().max() <= 1 / math.sqrt(H)
        W = build_recurrent([RunConfig(arch=arch, width=H, init="he_normal", recurrent_init="identity",
                                       recurrent_gain=0.5)]).layers[1].weight[0]
        for block in W.detach().chunk(GATES[arch]):
            assert torch.equal(block, 0.5 * torch.eye(H))
        W = build_recurrent([RunConfig(arch=arch, width=H, init="orthogonal")]).layers[1].weight[0].detach()
        for block in W.chunk(GATES[arch]):
            assert torch.allclose(block @ block.T, torch.eye(H), atol=1e-5)


def test_the_config_keeps_mlp_hashes_and_names_recurrent_runs():
    mlp = RunConfig()
    assert mlp.config_hash() == "8d98d56cc7fd5711"  # as before arch existed: every stored MLP run still counts
    assert RunConfig(arch="mlp", sequence="pixels", recurrent_init="identity") == mlp  # unused: reset
    assert RunConfig(arch="lstm", activation="tanh", depth=30) == RunConfig(arch="lstm")
    names = {run_name(RunConfig(arch=a, **kw)) for a in ("rnn", "lstm", "gru") for kw in
             ({}, {"sequence": "pixels"}, {"recurrent_init": "identity"}, {"recurrent_gain": 2.0})}
    assert len(names) == 12
    assert run_name(RunConfig(arch="rnn", activation="relu", recurrent_init="identity", sequence="pixels", width=100)) \
        == "rnn-relu-pixels-w100-default-Widentity-noclip-s0"
    for name, value in (("norm", "batch"), ("residual", "plain")):
        with pytest.raises(ConfigError) as found:
            RunConfig(arch="rnn", **{name: value})
        assert found.value.key == name and "recurrent" in str(found.value)
    # a W init that uses init_std keeps it, whatever U's init
    assert RunConfig(arch="rnn", init="he_normal", recurrent_init="normal", init_std=0.3).init_std == 0.3


def test_train_records_a_recurrent_run_with_the_contract(store, mnist_dir, tmp_path):
    """`gradbench train --arch rnn` through the real CLI into a real store: DESIGN's recurrent metrics,
    the time table at full resolution, the theory beside the measured slope, the figure."""
    import os

    import pandas as pd
    from click.testing import CliRunner
    from mlflow import MlflowClient

    from pipeline.cli import cli
    from tests.conftest import runs_of

    args = ["train", "--arch", "rnn", "--activation", "tanh", "--init", "normal", "--init-std", "0.25",
            "--width", "24", "--train-subset", "640", "--batch-size", "64", "--data-dir", mnist_dir,
            "--experiment", store]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run,) = runs_of(store)
    assert run.info.status == "FINISHED" and run.info.run_name == "rnn-tanh-rows-w24-normal0.25-noclip-b64-n640-s0"
    assert run.data.params["arch"] == "rnn" and run.data.params["sequence"] == "rows"
    metrics = run.data.metrics
    for key in ("time/slope_measured", "time/first_last_ratio_init", "theory/time_slope_pred", "theory/time_chi",
                "rnn/spectral_radius", "rnn/sv_max", "grad/weight_norm/L02", "act/saturated/L01", "final/test_acc"):
        assert key in metrics, key
    assert "theory/chi1" not in metrics and "act/saturated/L02" not in metrics  # no depth-wise theory
    assert run.data.tags["gradbench.diagnosis"] in ("healthy", "vanishing", "exploding", "saturated")
    local = MlflowClient().download_artifacts(run.info.run_id, "", str(tmp_path))
    time = pd.read_parquet(os.path.join(local, "gradients", "time_stats.parquet"))
    assert len(time) == 10 * 28 and list(time.columns) == ["step", "time", "grad_norm", "state_sq", "saturated"]
    profile = pd.read_parquet(os.path.join(local, "theory", "time_profile.parquet"))
    assert len(profile) == 28 and profile.log_norm.iloc[-1] == 0
    assert os.path.exists(os.path.join(local, "plots", "gradient_flow_time.png"))
    # the logged slope is the one the table gives
    from pipeline.theory import measured_time_slope

    first = time[time.step == 0]
    assert metrics["time/slope_measured"] == pytest.approx(measured_time_slope(first.time, first.grad_norm), rel=1e-9)
    history = MlflowClient().get_metric_history(run.info.run_id, "rnn/sv_max")
    assert [m.step for m in history] == [0, 5, 9]


def test_lstm_says_why_it_has_no_prediction(store, mnist_dir):
    from click.testing import CliRunner

    from pipeline.cli import cli
    from tests.conftest import runs_of

    args = ["train", "--arch", "lstm", "--width", "16", "--train-subset", "256", "--batch-size", "64",
            "--data-dir", mnist_dir, "--experiment", store]
    assert CliRunner().invoke(cli, args, catch_exceptions=False).exit_code == 0
    (run,) = runs_of(store)
    assert "theory/time_slope_pred" not in run.data.metrics and "time/slope_measured" in run.data.metrics
    assert "gated" in run.data.tags["gradbench.theory_absent"]
    assert "rnn/spectral_radius" not in run.data.metrics and "rnn/sv_max" in run.data.metrics
