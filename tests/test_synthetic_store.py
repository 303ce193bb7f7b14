"""benchmarks/perf/synthetic_store.py: a store with the real run layout and made-up numbers, on
which the real report renders and says that it is synthetic."""

import importlib.util

import pytest
from mlflow import MlflowClient

from pipeline.report import build_report
from tests.conftest import REPO, runs_of


def _tool():
    spec = importlib.util.spec_from_file_location("synthetic_store", REPO / "benchmarks" / "perf" / "synthetic_store.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.e2e
def test_the_report_renders_a_synthetic_store_and_says_it_is_synthetic(store, tmp_path):
    tool = _tool()
    spec, _ = tool.build(12, 20, store, echo=lambda line: None)
    runs = runs_of(store)
    kids = [r for r in runs if "gradbench.config_hash" in r.data.tags]
    assert len(kids) == 12 and all(r.data.tags["gradbench.synthetic"] == "true" for r in runs)
    assert {r.data.tags["gradbench.config_hash"] for r in kids} == {c.config_hash() for c in spec.configs}
    client = MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(kids[0].info.run_id, "gradients")}
    assert artifacts == {"gradients/layer_stats.parquet", "gradients/summary.parquet", "gradients/histograms.npz"}
    for kid in kids:  # what a real run logs beside them: its predicted profile and its gradient-flow plot
        assert {a.path for a in client.list_artifacts(kid.info.run_id, "theory")} == {"theory/profile.parquet"}
        assert {a.path for a in client.list_artifacts(kid.info.run_id, "plots")} == {"plots/gradient_flow.png"}
    path = build_report(store, out_dir=tmp_path / "reports")
    text = path.read_text()
    assert "SYNTHETIC DATA" in text and "synthetic-12" in text
    assert len(list((tmp_path / "reports" / path.stem).glob("*.html"))) == 12  # a page per run
