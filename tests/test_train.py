import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import RunConfig
from pipeline.model import build_model
from pipeline.monitor import member_norms
from pipeline.train import AGC_EPS, clip_gradients, clip_modes, train


def train_one(config, data):
    (result,) = train([config], data)
    return result

QUICK = dict(train_subset=2048, batch_size=64, max_steps=30)


def _model_with_grads(seed=0, depth=4, width=16, scale=1.0):
    model = build_model([RunConfig(depth=depth, width=width, activation="relu", init="he_normal", seed=seed)])
    torch.manual_seed(seed)
    x, y = torch.randn(32, 784), torch.randint(0, 10, (32,))
    (scale * F.cross_entropy(model(x)[0], y)).backward()
    return model


def _clip(model, mode, threshold):
    pre = torch.linalg.vector_norm(member_norms([p.grad for p in model.parameters()]), dim=0)
    return clip_gradients(model, clip_modes([mode], pre.device), torch.tensor([threshold]), pre)


def test_a_member_trains_on_the_batches_its_seed_draws_on_the_cpu(mnist):
    """The batches come from a CPU generator seeded with the run's seed, whatever the device (a CUDA
    generator draws another sequence): with a vanishing learning rate, each step's logged loss is the
    initial net's loss on the batch that torch.randperm with that generator picks, computed here."""
    cfg = RunConfig(activation="tanh", depth=3, width=32, init="xavier_normal", seed=7, lr=1e-12,
                    train_subset=640, batch_size=64, epochs=2, max_steps=14)
    logged = train_one(cfg, mnist).table.groupby("step").loss.first().to_numpy()
    model = build_model([cfg])
    g = torch.Generator().manual_seed(7)
    order = torch.cat([torch.randperm(640, generator=g) for _ in range(2)])  # 10 steps an epoch: two
    with torch.no_grad():
        expected = [F.cross_entropy(model(mnist.x_train[idx])[0], mnist.y_train[idx]).item()
                    for idx in order.split(64)[:14]]
    np.testing.assert_allclose(logged, expected, rtol=1e-5)


def test_norm_clipping_bounds_post_clip_norm_and_logs_pre(mnist):
    cfg = RunConfig(activation="relu", depth=6, width=64, init="he_normal", clip="norm", clip_threshold=0.5, **QUICK)
    steps = train_one(cfg, mnist).table.groupby("step").first()
    assert (steps.global_norm_post_clip <= 0.5 * (1 + 1e-5)).all()
    clipped = steps.global_norm_pre_clip > 0.5
    assert clipped.any()  # the threshold was chosen to bite
    assert (steps.clip_active == clipped.astype(float)).all()
    unclipped = steps[~clipped]
    np.testing.assert_allclose(unclipped.global_norm_post_clip, unclipped.global_norm_pre_clip, rtol=1e-6)


def test_value_clipping_bounds_every_element():
    model = _model_with_grads(scale=100.0)
    post, active = _clip(model, "value", 1e-3)
    assert bool(active)
    assert max(p.grad.abs().max().item() for p in model.parameters()) <= np.float32(1e-3)


def test_agc_bounds_each_unit_and_leaves_the_classifier_alone():
    model = _model_with_grads(scale=1e4)
    last_grad = model.layers[-1].weight.grad.clone()
    _, active = _clip(model, "agc", 0.01)
    assert bool(active)
    for layer in model.layers[:-1]:
        w_norm = layer.weight[0].detach().norm(dim=1).clamp(min=AGC_EPS)
        g_norm = layer.weight.grad[0].norm(dim=1)
        assert (g_norm <= 0.01 * w_norm * (1 + 1e-4)).all()
    assert torch.equal(model.layers[-1].weight.grad, last_grad)


def test_no_clipping_means_post_equals_pre(mnist):
    table = train_one(RunConfig(depth=3, width=32, **QUICK), mnist).table
    assert (table.global_norm_post_clip == table.global_norm_pre_clip).all()
    assert (table.clip_active == 0).all()


def test_relu_with_unit_normal_init_is_a_recorded_result_not_an_exception(mnist):
    cfg = RunConfig(activation="relu", depth=10, width=256, init="normal", init_std=1.0, **QUICK)
    result = train_one(cfg, mnist)
    assert result.outcome == "diverged"
    steps = result.table.groupby("step").first()
    bad = ~(np.isfinite(steps.loss) & np.isfinite(steps.global_norm_pre_clip))
    assert bad.iloc[-1] and not bad.iloc[:-1].any()  # kept up to and including the first bad step
    assert result.steps == len(steps) < cfg.total_steps
    init = result.table[result.table.step == 0].sort_values("layer").backprop_norm.to_numpy()
    assert init[0] / init[-1] > 1e6  # the error signal explodes towards the input


def test_sigmoid_at_depth_10_vanishes_at_the_first_layer(mnist):
    cfg = RunConfig(activation="sigmoid", depth=10, width=256, init="default", **QUICK)
    init = train_one(cfg, mnist).table.query("step == 0").sort_values("layer").weight_grad_norm.to_numpy()
    assert init[0] < 1e-3 * init[-1]
    assert (np.diff(np.log10(init[:-1])) > 0).all()  # shrinking layer after layer towards the input


def test_same_config_and_seed_give_identical_statistics(mnist):
    cfg = RunConfig(activation="tanh", depth=5, width=64, init="xavier_uniform", clip="agc", clip_threshold=0.05, **QUICK)
    a, b = train_one(cfg, mnist), train_one(cfg, mnist)
    pd.testing.assert_frame_equal(a.table, b.table)
    assert a.final_test_acc == b.final_test_acc
    c = train_one(cfg.replace(seed=1), mnist)
    assert not a.table.loss.equals(c.table.loss)


@pytest.mark.parametrize("optimizer", ["sgd", pytest.param("adam", marks=pytest.mark.e2e)])
def test_training_learns(mnist, optimizer):
    lr = 0.05 if optimizer == "sgd" else 1e-3
    cfg = RunConfig(activation="relu", depth=3, width=128, init="he_normal", optimizer=optimizer, lr=lr,
                    train_subset=6400, batch_size=64, epochs=2)
    result = train_one(cfg, mnist)
    assert result.outcome == "completed" and len(result.evals) == 2
    assert result.final_test_acc > 0.85


def test_histograms_at_first_middle_and_last_step(mnist):
    result = train_one(RunConfig(depth=3, width=16, **QUICK), mnist)
    h = result.histograms
    assert h["steps"].tolist() == [0, 15, 29]
    assert h["counts"].shape == (3, 3, len(h["log10_abs_grad_edges"]) - 1)
    sizes = [784 * 16, 16 * 16, 16 * 10]
    assert (h["counts"].sum(axis=2) == np.array(sizes)).all()  # every weight gradient counted once
