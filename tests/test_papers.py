"""Every paper reproduction spec executes end to end at a tiny budget (same axes and depths, a few
steps on a few images), and its report sets the paper beside the measurements."""

import pytest
import yaml

from pipeline.config import PAPERS, GridSpec
from pipeline.grid import run_grid
from pipeline.report import build_report
from tests.conftest import REPO

pytestmark = pytest.mark.e2e  # real grids

TINY = {"max_steps": 3, "train_subset": 256, "batch_size": 64, "width": 16, "log_every": 1, "epochs": 1}
TITLES = {"glorot2010": "Glorot &amp; Bengio 2010", "he2015": "He et al. 2015", "pascanu2013": "Pascanu et al. 2013",
          "pascanu2013_rnn": "Pascanu et al. 2013", "le2015": "Le, Jaitly &amp; Hinton 2015",
          "schoenholz2017": "Schoenholz et al. 2017", "yang2019": "Yang et al. 2019", "he2016": "He et al. 2016",
          "de2020": "De &amp; Smith 2020", "pennington2017": "Pennington, Schoenholz &amp; Ganguli 2017"}


@pytest.mark.parametrize("paper", PAPERS)
def test_paper_spec_runs_and_reports_side_by_side(paper, store, mnist_dir, tmp_path):
    raw = yaml.safe_load((REPO / "benchmarks" / f"{paper}.yaml").read_text())
    assert raw["reproduces"] == paper
    raw["base"].update(TINY)
    raw["seeds"] = [0]
    spec = GridSpec.from_dict(raw)
    result = run_grid(spec, str(mnist_dir), experiment=store, echo=lambda s: None, progress=False)
    assert not result.failures and len(result.summaries) == len(spec.configs)
    html = build_report(store, out_dir=tmp_path).read_text()
    assert f"Reproduction: {TITLES[paper]}" in html
    assert html.count("<tr>") > len({(c.activation, c.init, c.depth) for c in spec.configs})
