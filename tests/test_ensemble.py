"""The ensemble path against the sequential one: the same statistics for every member, on CPU."""

import numpy as np
import pandas as pd
import pytest

from pipeline.config import RunConfig
from pipeline.ensemble import ENSEMBLE_KEYS, groups, train_ensemble
from pipeline.train import train

BASE = dict(depth=5, width=48, train_subset=640, batch_size=64, epochs=2, max_steps=14, optimizer="sgd", lr=0.05)


def members(clip="none", **extra):
    """Members that differ in everything an ensemble allows: init, init_std, gain, bias, threshold, seed."""
    return [
        RunConfig(activation="tanh", init="xavier_normal", seed=0, clip=clip, clip_threshold=0.5, **BASE, **extra),
        RunConfig(activation="tanh", init="he_normal", init_gain=0.8, bias_std=0.1, seed=1, clip=clip,
                  clip_threshold=2.0, **BASE, **extra),
        RunConfig(activation="tanh", init="normal", init_std=0.08, seed=2, clip=clip, clip_threshold=0.1, **BASE, **extra),
    ]


def assert_same(ensemble_result, sequential_result):
    a, b = ensemble_result.table, sequential_result.table
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=2e-4, atol=1e-6)
    assert ensemble_result.outcome == sequential_result.outcome
    assert ensemble_result.steps == sequential_result.steps
    assert [e[0] for e in ensemble_result.evals] == [e[0] for e in sequential_result.evals]
    assert ensemble_result.final_test_acc == pytest.approx(sequential_result.final_test_acc, abs=2e-3)
    for key in ("steps", "counts"):
        np.testing.assert_allclose(ensemble_result.histograms[key], sequential_result.histograms[key], atol=3)


@pytest.mark.parametrize("clip", ["none", "norm", "value", "agc"])
def test_each_member_matches_its_sequential_run(mnist, clip):
    configs = members(clip)
    for ours, theirs in zip(train_ensemble(configs, mnist), (train(c, mnist) for c in configs)):
        assert_same(ours, theirs)


def test_adam_and_rectifiers_match_too(mnist):
    configs = [c.replace(activation="relu", optimizer="adam", lr=1e-3) for c in members()]
    for ours, theirs in zip(train_ensemble(configs, mnist), (train(c, mnist) for c in configs)):
        assert_same(ours, theirs)


def test_a_diverging_member_stops_alone(mnist):
    blowup = RunConfig(activation="relu", depth=5, width=48, init="normal", init_std=1.0, seed=3,
                       **{k: v for k, v in BASE.items() if k not in ("depth", "width")})
    configs = [members()[0].replace(activation="relu"), blowup.replace(activation="relu")]
    ours = train_ensemble(configs, mnist)
    theirs = [train(c, mnist) for c in configs]
    assert [r.outcome for r in ours] == ["completed", "diverged"]
    assert_same(ours[0], theirs[0])
    assert ours[1].steps == theirs[1].steps and ours[1].table.step.max() == theirs[1].table.step.max()


def test_grouping_keeps_only_compatible_configs_together():
    configs = members() + [members()[0].replace(width=64), members()[1].replace(clip="norm")]
    found = groups(configs, max_size=2)
    assert sorted(len(g) for g in found) == [1, 1, 1, 2]
    for group in found:
        assert len({tuple(getattr(c, k) for k in ENSEMBLE_KEYS) for c in group}) == 1


def test_grid_with_ensembles_logs_each_member_as_its_own_run(store, mnist_dir, tmp_path):
    import yaml
    from click.testing import CliRunner

    from pipeline.cli import cli
    from tests.conftest import runs_of

    spec = {"name": "ens", "base": {"depth": 4, "width": 32, "train_subset": 640, "batch_size": 64, "max_steps": 6},
            "axes": {"init": ["default", "xavier_normal", "he_normal"]}, "seeds": 2}
    path = tmp_path / "ens.yaml"
    path.write_text(yaml.safe_dump(spec))
    for mode, experiment in (("on", store), ("off", store + "-seq")):
        result = CliRunner().invoke(cli, ["grid", str(path), "--ensemble", mode, "--data-dir", str(mnist_dir),
                                          "--experiment", experiment, "--no-progress"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    ours = {r.data.tags["gradbench.config_hash"]: r for r in runs_of(store) if "gradbench.config_hash" in r.data.tags}
    theirs = {r.data.tags["gradbench.config_hash"]: r for r in runs_of(store + "-seq")
              if "gradbench.config_hash" in r.data.tags}
    assert len(ours) == 6 and set(ours) == set(theirs)
    for h, run in ours.items():
        assert run.info.status == "FINISHED"
        assert set(run.data.metrics) == set(theirs[h].data.metrics)  # exactly the metrics of the sequential path
        assert run.data.params == theirs[h].data.params
        assert run.data.metrics["train/loss"] == pytest.approx(theirs[h].data.metrics["train/loss"], rel=1e-4)
