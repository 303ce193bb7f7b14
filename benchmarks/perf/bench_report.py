"""How long the report of a 100-run grid takes to render.

    python benchmarks/perf/bench_report.py --data-dir data [--steps 100]

Trains a real 100-run grid (5 activations x 5 inits x 2 depths x 2 clip settings, tiny budget)
into a throwaway MLflow store, then times `gradbench report` on it: collecting from MLflow, drawing
the figures, and writing the HTML.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import click


@click.command()
@click.option("--data-dir", default="data", envvar="GRADBENCH_DATA_DIR", show_default=True)
@click.option("--source", default=None, envvar="GRADBENCH_MNIST_SOURCE")
@click.option("--steps", default=100, show_default=True, help="Training steps per run.")
def main(data_dir: str, source: str | None, steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        from pipeline.config import GridSpec
        from pipeline.grid import run_grid
        from pipeline.report import build_report

        spec = GridSpec.from_dict({
            "name": "bench100",
            "base": {"width": 64, "batch_size": 128, "max_steps": steps, "train_subset": 12800},
            "axes": {"activation": ["sigmoid", "tanh", "relu", "elu", "softsign"],
                     "init": ["default", "normal", "xavier_normal", "he_normal", "orthogonal"],
                     "depth": [5, 15], "clip": ["none", "norm"]},
        })
        assert len(spec.configs) == 100
        start = time.perf_counter()
        run_grid(spec, data_dir, source, experiment="bench", echo=lambda s: None, progress=False)
        grid_seconds = time.perf_counter() - start
        start = time.perf_counter()
        path = build_report("bench", out_dir=Path(tmp) / "reports")
        report_seconds = time.perf_counter() - start
        click.echo(f"100-run grid trained and logged in {grid_seconds:.0f} s; "
                   f"report rendered in {report_seconds:.1f} s ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
