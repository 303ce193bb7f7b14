"""Mixed precision (fp16 with a dynamic loss scale) on real MNIST: where a vanishing gradient
becomes exactly zero, how the loss scale's skipped steps are told from divergence, and fp16
through the real CLI into a real MLflow store."""

import numpy as np
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from pipeline.cli import cli
from pipeline.config import RunConfig, group_key
from pipeline.grid import plan_groups
from pipeline.train import train
from tests.conftest import runs_of

SMALL = dict(width=64, max_steps=3, train_subset=512, device="cpu")


def _step0(result, column):
    table = result.table
    return table[table.step == 0].sort_values("layer")[column].to_numpy()


@pytest.mark.e2e
def test_fp16_turns_a_vanishing_gradient_into_zeros_where_fp32_keeps_it(mnist):
    """Sigmoid at depth 20 (default init): dL/dz shrinks about 7x per layer from the output down.
    Where fp32 measures a layer gradient below ~1e-12 (below fp16's smallest number, 6e-8, even
    after the 65536 loss scale) fp16's dL/dW is all zeros; where it is above 1e-5 fp16 has no zeros
    and the same norm as fp32 (the loss scale divided out) within a few percent."""
    fp32, fp16 = (train([RunConfig(activation="sigmoid", depth=20, precision=p, **SMALL)], mnist)[0]
                  for p in ("fp32", "fp16"))
    norm32, norm16 = _step0(fp32, "backprop_norm"), _step0(fp16, "backprop_norm")
    zeros32, zeros16 = fp32.signal["zero_fraction"][0], fp16.signal["zero_fraction"][0]
    assert (zeros32 < 0.01).all()  # fp32: no entry of any layer's gradient is exactly 0
    tiny, large = norm32 < 1e-12, norm32 > 1e-5
    assert tiny.sum() >= 3 and large.sum() >= 3, norm32
    assert (zeros16[tiny] > 0.99).all() and (zeros16[large] < 0.01).all(), (zeros16, norm32)
    np.testing.assert_allclose(norm16[large], norm32[large], rtol=0.05)
    assert (_step0(fp16, "loss_scale") == 65536).all() and (_step0(fp32, "loss_scale") == 1).all()


@pytest.mark.e2e
def test_fp16_skipped_steps_are_not_divergence_until_the_scale_is_down_to_1(mnist):
    """An exploding tanh net (sigma_w = 0.5 x sqrt(width), depth 30): its scaled gradients overflow,
    each such step is skipped and the scale halved (not a divergence); once the scale is 1 the
    gradient itself is beyond fp16's range, and that step ends the run as diverged."""
    config = RunConfig(activation="tanh", depth=30, init="normal", init_std=0.5, precision="fp16",
                       **dict(SMALL, max_steps=30, train_subset=5120))
    (result,) = train([config], mnist)
    steps = result.table.groupby("step").first()
    assert result.outcome == "diverged" and steps.loss_scale.iloc[0] == 65536
    overflowed = ~np.isfinite(steps.global_norm_pre_clip)
    assert overflowed.iloc[:-1].sum() >= 5 and (steps.loss_scale.iloc[:-1][overflowed.iloc[:-1]] > 1).all()
    assert steps.loss_scale.iloc[-1] <= 1 and overflowed.iloc[-1]  # the run's last step is the one at scale 1


def test_fp16_runs_never_train_together():
    """One loss scale per group would skip every member's step when one overflows."""
    configs = [RunConfig(precision="fp16", seed=s) for s in range(3)]
    assert [len(g) for g in plan_groups(configs, ensemble=True)] == [1, 1, 1]
    assert len({group_key(c) for c in [RunConfig(seed=s) for s in range(3)]}) == 1  # fp32 still groups
    with pytest.raises(ValueError, match="fp16 runs train one at a time"):
        train(configs[:2], None)


def test_fp16_through_the_cli_logs_the_loss_scale_and_zero_fractions(store, mnist_dir):
    result = CliRunner().invoke(cli, ["train", "--precision", "fp16", "--depth", "4", "--width", "32",
                                      "--train-subset", "640", "--batch-size", "64", "--device", "cpu",
                                      "--data-dir", str(mnist_dir), "--experiment", store], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run,) = runs_of(store)
    assert run.info.status == "FINISHED" and run.data.params["precision"] == "fp16"
    client = MlflowClient()
    scale = client.get_metric_history(run.info.run_id, "train/loss_scale")
    assert scale[0].step == 0 and scale[0].value == 65536
    zeros = client.get_metric_history(run.info.run_id, "grad/zero_fraction/L00")
    assert [m.step for m in zeros] == [0, 5, 9] and all(0 <= m.value <= 1 for m in zeros)
