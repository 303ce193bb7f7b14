"""The bench runs end to end and writes every key the issue asks for (its timings are not tested)."""

import json

import pytest
from click.testing import CliRunner

from pipeline import bench
from pipeline.cli import cli

KEYS = ["speedup_vs_seed_loop", "monitor_overhead", "mlflow_overhead", "peak_fraction_w256", "peak_fraction_w1024",
        "peak_rss_mb", "device", "ensemble_speedup_w128", "ensemble_speedup_w512"]


@pytest.mark.slow
def test_bench_quick_writes_the_table_and_the_json(mnist_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "QUICK", bench.Budget(steps=6, tracked_steps=6, repeats=1, members=2, full=False))
    out = tmp_path / "perf.json"
    result = CliRunner().invoke(cli, ["bench", "--quick", "--data-dir", str(mnist_dir), "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "| speedup vs seed loop |" in result.output
    results = json.loads(out.read_text())
    for key in KEYS:
        assert key in results, key
    assert results["device"] == "cpu" and results["peak_rss_mb"] > 100
    assert 0 < results["peak_fraction_w1024"] < 1.5  # a fraction of the peak measured in the same run
