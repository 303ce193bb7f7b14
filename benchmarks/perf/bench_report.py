"""How long the report of a 100-run grid takes to render.

    python benchmarks/perf/bench_report.py --data-dir data [--steps 100] [--keep DIR]

Trains a real 100-run grid (5 activations x 5 inits x 2 depths x 2 clip settings, tiny budget)
into a throwaway MLflow store (or into DIR, reused if it already holds the grid), then times the
report twice: `build_report` in this process (collecting from MLflow, drawing the figures and the
run pages, writing the HTML), and `gradbench report` in a fresh process, which is what a user
waits for (imports and MLflow's start included).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click


@click.command()
@click.option("--data-dir", default="data", envvar="GRADBENCH_DATA_DIR", show_default=True)
@click.option("--source", default=None, envvar="GRADBENCH_MNIST_SOURCE")
@click.option("--steps", default=100, show_default=True, help="Training steps per run.")
@click.option("--keep", type=click.Path(file_okay=False), default=None,
              help="Train into this folder and keep it; a folder that holds the grid is reused.")
def main(data_dir: str, source: str | None, steps: int, keep: str | None) -> None:
    folder = Path(keep).resolve() if keep else Path(tempfile.mkdtemp(prefix="gradbench-bench100-"))
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
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
    click.echo(f"100-run grid trained and logged (or found) in {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    path = build_report("bench", out_dir=folder / "reports")
    pages = sum(p.stat().st_size for p in path.parent.rglob("*.html")) / 1e6
    click.echo(f"report in this process: {time.perf_counter() - start:.1f} s "
               f"({path.stat().st_size / 1e6:.1f} MB summary page, {pages:.1f} MB with the run pages)")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "report", "--experiment", "bench",
                    "--out-dir", str(folder / "reports-cli")], check=True, capture_output=True,
                   env=dict(os.environ, MLFLOW_TRACKING_URI=uri))
    click.echo(f"`gradbench report` in a fresh process: {time.perf_counter() - start:.1f} s")
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
