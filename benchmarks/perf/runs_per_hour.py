"""Runs per hour of standard-grid configurations on this machine, and what that makes of the grid.

    python benchmarks/perf/runs_per_hour.py --data-dir data [--epochs 1]

Trains a slice of benchmarks/standard.yaml (its base: batch 128, SGD; tanh at depth 20, widths 128
and 512, four inits, no clipping, one seed: 8 runs) four ways, each into a fresh throwaway store:
one run at a time, two worker processes (--workers 2), ensembles (--ensemble on: the runs that
share an architecture train as one group), and both (ensembles in two workers). Prints each way's
wall time and runs per hour, and projects the whole standard grid (7,680 runs of 10 epochs, depths
2 to 50: mean 17.4) by scaling a run's time by epochs x depth, which over-counts the per-run fixed
cost (construction, evaluation, recording) and so errs long. --mode picks some of the ways.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import click
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pipeline.config import GridSpec  # noqa: E402
from pipeline.grid import run_grid  # noqa: E402

MODES = {"one at a time": {"ensemble": False}, "--workers 2": {"ensemble": False, "workers": 2},
         "ensembles": {"ensemble": True}, "both": {"ensemble": True, "workers": 2}}
GRID_RUNS, GRID_EPOCHS, GRID_MEAN_DEPTH, SLICE_DEPTH = 7680, 10, 17.4, 20


@click.command()
@click.option("--data-dir", default="data", envvar="GRADBENCH_DATA_DIR", show_default=True)
@click.option("--source", default=None, envvar="GRADBENCH_MNIST_SOURCE")
@click.option("--epochs", default=1, show_default=True, type=click.IntRange(min=1), help="Epochs per run.")
@click.option("--mode", "modes", multiple=True, type=click.Choice(list(MODES)),
              help="Ways to time (repeatable; default: all). both: ensembles in two worker processes.")
def main(data_dir: str, source: str | None, epochs: int, modes: tuple[str, ...]) -> None:
    data_dir = os.path.abspath(data_dir)
    raw = yaml.safe_load((REPO / "benchmarks" / "standard.yaml").read_text())
    raw.update(name="standard-slice", seeds=1,
               axes={"activation": ["tanh"], "init": ["default", "xavier_normal", "he_normal", "orthogonal"],
                     "depth": [SLICE_DEPTH], "width": [128, 512]})
    raw["base"]["epochs"] = epochs
    for mode, options in MODES.items():
        if modes and mode not in modes:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
            os.environ.pop("MLFLOW_RUN_ID", None)
            spec = GridSpec.from_dict(raw)
            start = time.perf_counter()
            result = run_grid(spec, data_dir, source, experiment="slice", echo=lambda s: None, progress=False,
                              **options)
            seconds = time.perf_counter() - start
        assert not result.failures, result.failures
        per_hour = len(spec.configs) * 3600 / seconds
        grid_hours = GRID_RUNS / per_hour * (GRID_EPOCHS / epochs) * (GRID_MEAN_DEPTH / SLICE_DEPTH)
        click.echo(f"{mode:>14}: {len(spec.configs)} runs in {seconds:.0f} s, {per_hour:.0f} runs/hour; "
                   f"the standard grid: about {grid_hours:.0f} hours ({grid_hours / 24:.1f} days)")


if __name__ == "__main__":
    main()
