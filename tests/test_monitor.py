"""Monitor statistics against an independent computation: torch.autograd.grad in float64."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.activations import ACTIVATIONS as REGISTRY
from pipeline.config import RunConfig
from pipeline.model import build_model
from pipeline.monitor import Monitor, activation_statistic
from pipeline.results import layer_table


def _one_monitored_step(cfg: RunConfig, x, y, lr=0.1, edit=None):
    model = build_model([cfg], dtype=torch.float64)
    if edit is not None:
        edit(model)
    before = [l.weight[0].detach().clone() for l in model.layers]
    monitor = Monitor(model, cfg.activation, total_steps=1, chunk_steps=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    logits = model(x)
    loss = F.cross_entropy(logits[0], y)
    loss.backward()
    pre = monitor.gradients()
    optimizer.step()
    monitor.step_end(loss[None], (logits[0].argmax(1) == y).double().mean()[None], pre, None)
    (chunk,) = monitor.flush()
    return model, before, chunk


def _independent(model_weights, biases, x, y, act):
    """Forward by hand, then dL/dW and dL/dz straight from torch.autograd.grad."""
    ws = [w.clone().requires_grad_() for w in model_weights]
    zs, h = [], x
    for i, (w, b) in enumerate(zip(ws, biases)):
        z = h @ w.T + b
        zs.append(z)
        h = act(z) if i < len(ws) - 1 else z
    loss = F.cross_entropy(h, y)
    grads = torch.autograd.grad(loss, ws + zs)
    return [g.norm().item() for g in grads[: len(ws)]], [g.norm().item() for g in grads[len(ws) :]], zs


def test_layer_norms_match_autograd_in_float64():
    cfg = RunConfig(activation="tanh", depth=4, width=7, init="xavier_normal")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 784, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (5,), generator=g)
    model, before, chunk = _one_monitored_step(cfg, x, y)
    biases = [l.bias[0].detach() + 0.1 * l.bias.grad[0] for l in model.layers]  # undo the SGD step
    weight_norms, backprop_norms, zs = _independent(before, biases, x, y, torch.tanh)
    np.testing.assert_allclose(chunk.per_layer["weight_grad_norm"][0], weight_norms, rtol=1e-9)
    np.testing.assert_allclose(chunk.per_layer["backprop_norm"][0], backprop_norms, rtol=1e-9)
    # update ratio: ||W_after - W_before|| / ||W_before||, here exactly lr * ||dL/dW|| / ||W||
    expected_ratio = [0.1 * gn / w.norm().item() for gn, w in zip(weight_norms, before)]
    np.testing.assert_allclose(chunk.per_layer["update_ratio"][0], expected_ratio, rtol=1e-9)
    # saturated fraction of each hidden layer, from the definition: tanh'(z) = 1 - tanh(z)^2 < 10% of tanh'(0)
    sat = [((1 - torch.tanh(z) ** 2) < 0.1).double().mean().item() for z in zs[:-1]]
    np.testing.assert_allclose(chunk.per_layer["act"][0][:-1], sat)
    assert np.isnan(chunk.per_layer["act"][0][-1])  # the output layer has no activation
    total = np.sqrt(sum(p.grad.double().norm().item() ** 2 for p in model.parameters()))
    assert chunk.per_step["global_norm_pre_clip"][0] == pytest.approx(total, rel=1e-12)


@pytest.mark.parametrize("members", [1, 3])
def test_forward_length_and_correlation_match_a_pairwise_loop(members):
    """q (mean z^2) and c (mean cosine between two examples' z) of each hidden layer, and the
    input's mean square and cross product, recorded at step 0: against an explicit loop over the
    pairs of examples, in float64, for every member."""
    configs = [RunConfig(activation="tanh", depth=4, width=9, init="normal", init_std=0.3, bias_std=0.2, seed=s)
               for s in range(members)]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 784, generator=g, dtype=torch.float64) + 0.5  # correlated examples
    y = torch.randint(0, 10, (6,), generator=g)
    model = build_model(configs, dtype=torch.float64)
    monitor = Monitor(model, "tanh", total_steps=1, chunk_steps=1)
    logits = model(x)
    F.cross_entropy(logits.reshape(-1, 10), y.repeat(members)).backward()
    monitor.step_end(torch.zeros(members), torch.zeros(members), monitor.gradients(), None)
    pairs = [(a, b) for a in range(6) for b in range(6) if a != b]
    for e in range(members):
        signal = monitor.signal(e, 0)
        assert list(signal["steps"]) == [0]
        xs = x.numpy()
        assert signal["input_sq"][0] == pytest.approx((xs**2).mean(), rel=1e-12)
        cosine = np.mean([xs[a] @ xs[b] / np.linalg.norm(xs[a]) / np.linalg.norm(xs[b]) for a, b in pairs])
        assert signal["input_cross"][0] == pytest.approx((xs**2).mean() * cosine, rel=1e-12)
        h = x
        for i, layer in enumerate(model.layers[:-1]):
            z = (h @ layer.weight[e].T + layer.bias[e]).detach().numpy()
            cos = [z[a] @ z[b] / np.linalg.norm(z[a]) / np.linalg.norm(z[b]) for a, b in pairs]
            assert signal["q"][0][i] == pytest.approx((z**2).mean(), rel=1e-12)
            assert signal["c"][0][i] == pytest.approx(np.mean(cos), rel=1e-10, abs=1e-12)
            h = torch.tanh(torch.from_numpy(z))


def test_dead_fraction_counts_units_off_for_the_whole_batch():
    cfg = RunConfig(activation="relu", depth=3, width=6, init="he_normal")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 784, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (4,), generator=g)

    def kill_three(model):
        with torch.no_grad():
            model.layers[0].bias[0, :3] = -1e6  # three of six first-layer units can never fire

    model, _, chunk = _one_monitored_step(cfg, x, y, lr=0.0, edit=kill_three)
    with torch.no_grad():
        z0 = model.layers[0](x[None])
        z1 = model.layers[1](torch.relu(z0))
    assert chunk.per_layer["act"][0][0] >= 0.5
    for layer, z in enumerate((z0[0], z1[0])):
        assert chunk.per_layer["act"][0][layer] == pytest.approx((z <= 0).all(dim=0).double().mean().item())


@pytest.mark.parametrize("activation, z, dead", [
    # phi'(z) is still large here, so these units pass gradient and are not dead (they were, as z <= 0)
    ("elu", -1.0, 0.0), ("selu", -1.0, 0.0), ("gelu", -0.3, 0.0),
    # below 10% of the largest slope for every example: dead
    ("elu", -3.0, 1.0), ("selu", -3.0, 1.0), ("gelu", -0.7, 1.0), ("leaky_relu", -0.5, 1.0), ("relu", 0.0, 1.0),
])
def test_dead_is_defined_by_the_slope_not_the_sign(activation, z, dead):
    hidden = torch.full((1, 1, 4, 5), z, dtype=torch.float64)  # (layers, members, batch, width)
    assert activation_statistic(hidden, activation).item() == dead


def test_layer_table_has_one_row_per_step_and_layer():
    cfg = RunConfig(activation="relu", depth=3, width=4)
    x = torch.randn(2, 784, dtype=torch.float64)
    _, _, chunk = _one_monitored_step(cfg, x, torch.tensor([1, 2]))
    table = layer_table([chunk, chunk], "dead")
    assert len(table) == 2 * 3
    assert "dead" in table and "saturated" not in table


def test_members_are_monitored_separately():
    configs = [RunConfig(activation="tanh", depth=3, width=5, seed=s) for s in range(3)]
    model = build_model(configs, dtype=torch.float64)
    monitor = Monitor(model, "tanh", total_steps=1, chunk_steps=1)
    x, y = torch.randn(3, 4, 784, dtype=torch.float64), torch.randint(0, 10, (3, 4))
    logits = model(x)
    losses = torch.stack([F.cross_entropy(logits[e], y[e]) for e in range(3)])
    losses.sum().backward()
    pre = monitor.gradients()
    monitor.step_end(losses, losses, pre, None)
    chunks = monitor.flush()
    for e, chunk in enumerate(chunks):
        norms = [l.weight.grad[e].norm().item() for l in model.layers]
        np.testing.assert_allclose(chunk.per_layer["weight_grad_norm"][0], norms, rtol=1e-12)
        assert chunk.per_step["loss"][0] == losses[e].item()


@pytest.mark.parametrize("members,norm,residual,loss_scale",
                         [(1, "none", "none", 1.0), (3, "none", "none", 1.0), (2, "layer", "plain", 1.0),
                          (1, "none", "none", 1024.0)])
def test_gsnr_and_zero_fraction_match_a_loop_over_single_examples(members, norm, residual, loss_scale):
    """Per layer at step 0: the GSNR (mean over dL/dW's entries of mean^2 / variance of the
    per-example gradients) from the monitor's one-matmul formula, against per-example gradients
    taken one example at a time by autograd, in float64; and the fraction of exactly-zero entries.
    loss_scale: the loss multiplied before backward and the gradients divided after, as fp16's
    gradient scaler does (dL/dz then carries the scale)."""
    import copy

    from pipeline.monitor import GSNR_MAX

    configs = [RunConfig(activation="relu", depth=4, width=9, init="he_normal", norm=norm, residual=residual,
                         seed=s) for s in range(members)]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 784, generator=g, dtype=torch.float64)
    x[:, :50] = 0  # pixels that are 0 throughout the batch: their first-layer gradients are exactly 0
    y = torch.randint(0, 10, (7,), generator=g)
    model = build_model(configs, dtype=torch.float64)
    reference = copy.deepcopy(model)  # before the monitor's hooks
    monitor = Monitor(model, "relu", total_steps=1, chunk_steps=1)
    logits = model(x)
    (loss_scale * F.cross_entropy(logits.reshape(-1, 10), y.repeat(members), reduction="none")
     .view(members, -1).mean(dim=1).sum()).backward()
    for p in model.parameters():
        p.grad /= loss_scale
    monitor.step_end(torch.zeros(members), torch.zeros(members), monitor.gradients(loss_scale), None)

    per_example = []  # [example][layer]: (members, out, in)
    for i in range(len(x)):
        reference.zero_grad()
        out = reference(x[i : i + 1])
        F.cross_entropy(out.reshape(-1, 10), y[i : i + 1].repeat(members), reduction="sum").backward()
        per_example.append([layer.weight.grad.clone() for layer in reference.layers])
    for e in range(members):
        signal = monitor.signal(e, 0)
        for layer in range(len(model.layers)):
            g_i = torch.stack([grads[layer][e] for grads in per_example])  # (examples, out, in)
            mean, var = g_i.mean(dim=0), g_i.var(dim=0, unbiased=False)
            used = (g_i != 0).any(dim=0)
            expected = (mean[used] ** 2 / var[used]).clamp(max=GSNR_MAX).mean().item()
            assert signal["gsnr"][0][layer] == pytest.approx(expected, rel=1e-9), (e, layer)
            assert signal["zero_fraction"][0][layer] == pytest.approx((mean == 0).double().mean().item())
        assert signal["zero_fraction"][0][0] >= 50 / 784 - 1e-6  # the blank pixels' columns (a float32 buffer)


def test_gsnr_is_not_measured_with_batch_norm():
    """BatchNorm couples the examples through the batch statistics: no per-example gradient, NaN."""
    cfg = RunConfig(activation="relu", depth=3, width=6, init="he_normal", norm="batch")
    model = build_model([cfg], dtype=torch.float64)
    monitor = Monitor(model, "relu", total_steps=1, chunk_steps=1)
    x = torch.randn(5, 784, dtype=torch.float64)
    F.cross_entropy(model(x)[0], torch.arange(5)).backward()
    monitor.step_end(torch.zeros(1), torch.zeros(1), monitor.gradients(), None)
    signal = monitor.signal(0, 0)
    assert np.isnan(signal["gsnr"]).all() and (signal["zero_fraction"] >= 0).all()


@pytest.mark.parametrize("in_place", [False, True])
def test_a_nan_example_neither_kills_nor_saturates_a_unit(in_place):
    """A NaN pre-activation is not above the threshold (a diverging member's first bad step is
    kept): a rectifier unit that fires on another example stays alive, and for a squashing one
    the NaN entry is not saturated. Counted against a loop over the units."""
    nan = float("nan")
    hidden = torch.tensor([[nan, 2.0, nan, -1.0], [1.0, -1.0, nan, -3.0]])  # (batch, width)
    limit = REGISTRY["relu"].threshold
    dead = sum(not any(z > limit for z in hidden[:, u].tolist()) for u in range(4)) / 4  # NaN > limit is False
    saturated = sum(abs(z) > REGISTRY["tanh"].threshold for z in hidden.flatten().tolist()) / 8
    assert activation_statistic(hidden.clone(), "relu", in_place=in_place).item() == pytest.approx(dead) == 0.5
    assert activation_statistic(hidden.clone(), "tanh", in_place=in_place).item() == pytest.approx(saturated)
