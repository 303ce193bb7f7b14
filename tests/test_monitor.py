"""Monitor statistics against an independent computation: torch.autograd.grad in float64."""

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import RunConfig
from pipeline.model import SATURATION_THRESHOLD, build_model
from pipeline.monitor import Monitor, layer_table


def _one_monitored_step(cfg: RunConfig, x, y, lr=0.1):
    torch.manual_seed(0)
    model = build_model(cfg, dtype=torch.float64)
    before = [l.weight.detach().clone() for l in model.layers]
    monitor = Monitor(model, cfg.activation, total_steps=1, chunk_steps=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    preacts = []
    logits = model(x, preacts)
    loss = F.cross_entropy(logits, y)
    monitor.watch(preacts)
    loss.backward()
    pre = monitor.gradients(0)
    monitor.clipped(pre, None)
    monitor.before_update()
    optimizer.step()
    monitor.after_update(loss, (logits.argmax(1) == y).double().mean())
    return model, before, monitor.flush()


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
    biases = [l.bias.detach() + 0.1 * l.bias.grad for l in model.layers]  # undo the SGD step
    weight_norms, backprop_norms, zs = _independent(before, biases, x, y, torch.tanh)
    np.testing.assert_allclose(chunk.per_layer["weight_grad_norm"][0], weight_norms, rtol=1e-6)
    np.testing.assert_allclose(chunk.per_layer["backprop_norm"][0], backprop_norms, rtol=1e-6)
    # update ratio: ||W_after - W_before|| / ||W_before||, here exactly lr * ||dL/dW|| / ||W||
    expected_ratio = [0.1 * gn / w.norm().item() for gn, w in zip(weight_norms, before)]
    np.testing.assert_allclose(chunk.per_layer["update_ratio"][0], expected_ratio, rtol=1e-5)
    # saturated fraction of each hidden layer, from the definition: |z| above the threshold
    sat = [(z.abs() > SATURATION_THRESHOLD["tanh"]).double().mean().item() for z in zs[:-1]]
    np.testing.assert_allclose(chunk.per_layer["act"][0][:-1], sat)
    assert np.isnan(chunk.per_layer["act"][0][-1])  # the output layer has no activation
    total = np.sqrt(sum(p.grad.double().norm().item() ** 2 for p in model.parameters()))
    assert chunk.per_step["global_norm_pre_clip"][0] == np.float32(total)


def test_dead_fraction_counts_units_off_for_the_whole_batch():
    cfg = RunConfig(activation="relu", depth=3, width=6, init="he_normal")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 784, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (4,), generator=g)
    torch.manual_seed(0)
    model = build_model(cfg, dtype=torch.float64)
    with torch.no_grad():
        model.layers[0].bias[:3] = -1e6  # three of six first-layer units can never fire
    monitor = Monitor(model, "relu", total_steps=1, chunk_steps=1)
    preacts = []
    logits = model(x, preacts)
    monitor.watch(preacts)
    F.cross_entropy(logits, y).backward()
    monitor.clipped(monitor.gradients(0), None)
    monitor.before_update()
    monitor.after_update(torch.tensor(0.0), torch.tensor(0.0))
    chunk = monitor.flush()
    expected = (preacts[1] <= 0).all(dim=0).double().mean().item()
    assert chunk.per_layer["act"][0][0] >= 0.5
    assert chunk.per_layer["act"][0][1] == np.float32(expected)


def test_layer_table_has_one_row_per_step_and_layer():
    cfg = RunConfig(activation="relu", depth=3, width=4)
    x = torch.randn(2, 784, dtype=torch.float64)
    _, _, chunk = _one_monitored_step(cfg, x, torch.tensor([1, 2]))
    table = layer_table([chunk, chunk], "relu")
    assert len(table) == 2 * 3
    assert "dead" in table and "saturated" not in table
