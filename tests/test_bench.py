"""The bench: its paired ratios are computed right (a unit test with known costs), and `gradbench
bench --quick` runs end to end at a tiny budget and writes every key (its timings are not tested)."""

import json

import pytest
from click.testing import CliRunner

from pipeline import bench
from pipeline.cli import cli

RATIOS = ["speedup_vs_seed_loop", "engine_vs_plain_loop", "monitor_overhead", "ensemble_speedup_w128",
          "ensemble_speedup_w512"]
KEYS = [*RATIOS, "quick_run_d5", "quick_run_d20", "peak_fraction_w256", "peak_fraction_w1024", "peak_rss_mb", "device"]


def test_paired_alternates_after_a_warm_up_and_takes_the_median_ratio():
    calls = []
    costs = {"a": iter([99.0, 2.0, 6.0, 3.0]), "b": iter([99.0, 1.0, 2.0, 1.0])}  # first of each: warm-up

    def side(name):
        def cost():
            calls.append(name)
            return next(costs[name])
        return cost

    ratio = bench.paired(side("a"), side("b"), pairs=3)
    assert calls == ["a", "b"] * 4
    assert (ratio.median, ratio.low, ratio.high) == (3.0, 2.0, 3.0)  # ratios 2, 3, 3
    assert (ratio.a, ratio.b, ratio.pairs) == (3.0, 1.0, 3)  # each side's own median
    assert ratio.text() == "3.00 (2.00-3.00)"


@pytest.mark.e2e
def test_bench_quick_from_a_fresh_directory_with_the_default_data_dir(tmp_path, monkeypatch):
    """As a new user runs it: a relative --data-dir (the default), no source in the environment.
    The bench's subprocesses run in a temporary folder and must still find the data."""
    from tests.conftest import SHARED_MNIST, require_mnist

    require_mnist()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GRADBENCH_MNIST_SOURCE", raising=False)
    monkeypatch.delenv("GRADBENCH_DATA_DIR", raising=False)
    monkeypatch.setattr(bench, "QUICK", bench.Budget(pairs=1, steps=3, deep_steps=1, members=2, ensemble_steps=3,
                                                      full=False))
    monkeypatch.setattr(bench, "QUICK_RUN", dict(width=16, max_steps=6, train_subset=640))
    prepared = CliRunner().invoke(cli, ["prepare", "--source", str(SHARED_MNIST)])
    assert prepared.exit_code == 0, prepared.output
    result = CliRunner().invoke(cli, ["bench", "--quick"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "| speedup vs seed loop, per step |" in result.output
    assert "| one-member engine vs plain nn.Linear loop, per step |" in result.output
    results = json.loads((tmp_path / "reports" / "perf.json").read_text())
    for key in KEYS:
        assert key in results, key
    assert results["device"] == "cpu" and results["peak_rss_mb"] > 100
    assert 0 < results["peak_fraction_w1024"] < 1.5  # a fraction of the peak measured in the same run
    for key in RATIOS:  # one alternation: the ratio is the two sides' own times divided
        ratio = results[key]
        assert ratio["pairs"] == 1 and ratio["median"] == pytest.approx(ratio["a"] / ratio["b"]), key
    share = results["quick_run_d20"]["mlflow_share"]
    assert 0 < share["a"] < share["b"]  # seconds in the run logger, within the tracked run's seconds
    instruments = results["instruments"]  # each instrument's own seconds, a share of a run that has them all
    assert set(instruments["share"]) == {"signal", "jacobian", "gsnr", "zero_fraction"}
    assert all(0 < share["median"] < 1 for share in instruments["share"].values()), instruments["share"]
    assert "| instrument jacobian, share of the run |" in result.output


def test_results_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A bench stopped inside a write (Ctrl-C) keeps the last whole file, and no hidden part file."""
    out = tmp_path / "perf.json"
    bench.write_json({"device": "cpu", "complete": False}, out)
    real_replace = __import__("os").replace

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr("os.replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench.write_json({"device": "cpu", "complete": True, "more": [1] * 1000}, out)
    monkeypatch.setattr("os.replace", real_replace)
    assert json.loads(out.read_text()) == {"device": "cpu", "complete": False}
    assert [p.name for p in tmp_path.iterdir()] == ["perf.json"]


def test_ctrl_c_during_the_bench_exits_130_and_leaves_the_sections_measured(tmp_path, monkeypatch):
    """`gradbench bench` stopped after its first section: exit 130, "stopped by SIGINT", and a
    whole perf.json that says it is not complete."""
    out = tmp_path / "perf.json"

    def stopped_midway(data_dir, source, quick, device, echo, out):
        bench.write_json({"device": "cpu", "complete": False}, out)
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run_bench", stopped_midway)
    monkeypatch.setattr("pipeline.cli._prepare", lambda data_dir, source: None)
    result = CliRunner().invoke(cli, ["bench", "--quick", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 130, (result.output, result.exception)
    assert "stopped by SIGINT" in result.output and "Traceback" not in result.output
    assert json.loads(out.read_text())["complete"] is False
