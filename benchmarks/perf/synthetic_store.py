"""A synthetic MLflow store at the scale of a big grid, to time `gradbench report` on it.

    python benchmarks/perf/synthetic_store.py --runs 1000 [--steps 300] [--report] [--keep DIR]

Writes a grid of N runs (1000: 8 activations x 5 inits x 5 depths x 5 widths; 7680: the standard
grid; any other N: N seeds of one configuration) with the real layout (a parent run with its spec.yaml; children with every param, the tags,
the summary metrics, config.json, gradients/layer_stats.parquet for every step x layer,
gradients/histograms.npz, signal/propagation.parquet, theory/profile.parquet,
plots/gradient_flow.png) but made-up statistics: gradient norms that shrink or grow geometrically
with depth, with noise. The gradient-flow plot is drawn once per depth (from that depth's first run)
and logged with every run of that depth, as its title says: one per run would cost a tenth of a
second a run, 7,680 times. Every run and the parent are tagged
gradbench.synthetic=true and the grid is named synthetic-N: a report on it says it is synthetic.
Never use it for results. With --report it then times `gradbench report` on the store (wall
time and peak memory of the process, from /usr/bin/time when there is one).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import pandas as pd
from mlflow.entities import Metric, Param
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pipeline import plots, tracking  # noqa: E402
from pipeline.activations import ACTIVATIONS  # noqa: E402
from pipeline.config import NUMBERS_VERSION, GridSpec, run_name  # noqa: E402
from pipeline.monitor import HIST_BINS, HIST_RANGE  # noqa: E402
from pipeline.results import LAYER_STATS, STEP_STATS, summary_table  # noqa: E402
from pipeline.tracking.store import TAG_SYNTHETIC  # noqa: E402

AXES_1000 = {"activation": ["sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "selu", "softsign"],
             "init": ["default", "xavier_normal", "he_normal", "lecun_normal", "orthogonal"],
             "depth": [2, 5, 10, 20, 50], "width": [64, 128, 256, 512, 1024]}


def spec_for(runs: int, steps: int) -> dict:
    """7680: the standard grid; 1000: 8 activations x 5 inits x 5 depths x 5 widths; any other N:
    one configuration (depth 10, width 128) with N seeds."""
    if runs == 7680:
        import yaml

        raw = yaml.safe_load((REPO / "benchmarks" / "standard.yaml").read_text())
    elif runs == 1000:
        raw = {"axes": AXES_1000}
    else:
        raw = {"base": {"depth": 10, "width": 128}, "seeds": runs}
    raw["name"] = f"synthetic-{runs}"
    raw["base"] = {**raw.get("base", {}), "max_steps": steps, "epochs": 1}
    return raw


def fake_run(config, steps: int, rng: np.random.Generator) -> tuple[pd.DataFrame, dict, pd.DataFrame, dict,
                                                                   pd.DataFrame | None]:
    """(layer table, histograms, propagation table, summary metrics, predicted profile) of plausible
    magnitudes; the profile is None where theory makes no prediction (SkipInit), as a run's is."""
    layers = config.depth
    slope = rng.normal(0.0, 0.3)  # log10 of the per-layer factor of |dL/dz|, vanishing < 0 < exploding
    depth_profile = 10 ** (slope * (layers - 1 - np.arange(layers)))
    decay = np.exp(-np.arange(steps) / max(steps, 1))[:, None]
    noise = rng.lognormal(0.0, 0.2, (steps, layers))
    backprop = 0.1 * depth_profile[None, :] * noise * (0.5 + decay)
    statistic = ACTIVATIONS[config.activation].statistic
    table = pd.DataFrame({
        "step": np.repeat(np.arange(steps), layers), "layer": np.tile(np.arange(layers), steps),
        "weight_grad_norm": (backprop * rng.lognormal(0, 0.1, backprop.shape)).reshape(-1),
        "backprop_norm": backprop.reshape(-1),
        "update_ratio": (1e-3 * noise).reshape(-1),
        statistic: np.clip(rng.normal(0.2, 0.1, steps * layers), 0, 1),
    })
    loss = 2.3 * np.exp(-np.arange(steps) / (steps / 3)) + 0.1 * rng.random(steps)
    per_step = {"loss": loss, "acc": 1 - loss / 2.5, "global_norm_pre_clip": backprop.sum(axis=1),
                "global_norm_post_clip": backprop.sum(axis=1), "clip_active": np.zeros(steps),
                "loss_scale": np.ones(steps)}
    for name in STEP_STATS:
        table[name] = np.repeat(per_step[name], layers)
    assert set(LAYER_STATS) - {"act"} <= set(table.columns)
    hist_steps = sorted({0, steps // 2, steps - 1})
    centre = np.log10(depth_profile) - 4
    bins = np.linspace(*HIST_RANGE, HIST_BINS)
    counts = np.exp(-0.5 * ((bins[None, None, :] - centre[None, :, None]) / 0.7) ** 2) * 1000
    histograms = {"steps": np.array(hist_steps), "counts": np.repeat(counts, len(hist_steps), axis=0).astype(np.float32),
                  "log10_abs_grad_edges": np.linspace(*HIST_RANGE, HIST_BINS + 1)}
    rows = []
    for step in hist_steps:
        for statistic_name, values in (("q", rng.lognormal(0, 0.3, layers - 1)), ("c", rng.uniform(0, 1, layers - 1)),
                                       ("zero_fraction", np.zeros(layers)), ("gsnr", rng.lognormal(-3, 0.5, layers))):
            rows.append(pd.DataFrame({"step": step, "layer": np.arange(len(values)), "statistic": statistic_name,
                                      "measured": values, "predicted": values * 1.05 if step == 0 and statistic_name in "qc"
                                      else np.nan}))
    accuracy = float(np.clip(0.95 - 0.8 * abs(slope) * rng.random(), 0.1, 0.99))
    metrics = {"final/test_acc": accuracy, "final/test_loss": float(loss[-1]), "run/steps": steps,
               "grad/first_last_ratio_init": float(depth_profile[0] / depth_profile[-1])}
    # the input-output Jacobian's spectrum at step 0, and the theory's (plain nets only, as a run's)
    mean_sq = float(10 ** (2 * slope * (layers - 2)) * rng.lognormal(0, 0.2))
    metrics.update({"jacobian/sv_mean_sq": mean_sq,
                    "jacobian/sv_log10_sd": float(0.05 * layers * rng.lognormal(0, 0.2))})
    if config.norm == "none" and config.residual == "none":
        metrics["theory/jacobian_mean_sq"] = mean_sq * float(rng.lognormal(0, 0.1))
    profile = None
    if config.residual != "skipinit" and layers > 1:  # the prediction a run logs: ln||dL/dz|| per hidden layer
        predicted = math.log(10) * slope * 1.02  # per layer towards the input, the last hidden layer 0
        hidden = np.arange(layers - 1)
        profile = pd.DataFrame({"layer": hidden, "log_norm": predicted * (layers - 2 - hidden)})
        metrics.update({"theory/slope_measured": math.log(10) * slope, "theory/slope_pred": predicted,
                        "theory/slope_error": math.log(10) * slope - predicted})
    return table, histograms, pd.concat(rows, ignore_index=True), metrics, profile


def build(runs: int, steps: int, experiment: str, echo=click.echo, raw: dict | None = None) -> tuple[GridSpec, float]:
    """Write the grid of spec_for(runs, steps), or of the spec `raw` (its runs must be `runs`: a
    test's small grid of several activations and inits), into `experiment`."""
    raw = raw or spec_for(runs, steps)
    spec = GridSpec.from_dict(raw, source=json.dumps(raw))
    assert len(spec.configs) == runs, len(spec.configs)
    client = tracking.get_client()
    start = time.perf_counter()
    exp_id, parent = tracking.open_grid_run(client, spec, experiment)
    client.set_tag(parent, TAG_SYNTHETIC, "true")
    rng = np.random.default_rng(0)
    flow_plots: dict[int, bytes] = {}  # depth -> the plot of that depth's first run
    with tempfile.TemporaryDirectory() as tmp:
        for i, config in enumerate(spec.configs):
            table, histograms, signal, metrics, profile = fake_run(config, steps, rng)
            slope = math.log(metrics["grad/first_last_ratio_init"]) / max(config.depth - 1, 1)  # ln, per layer
            diagnosis = "vanishing" if slope < -0.2 else "exploding" if slope > 0.2 else "healthy"
            tags = {tracking.TAG_CONFIG_HASH: config.config_hash(), tracking.TAG_GRID: spec.name,
                    tracking.TAG_OUTCOME: "completed", tracking.TAG_DIAGNOSIS: diagnosis,
                    tracking.TAG_NUMBERS_VERSION: str(NUMBERS_VERSION), TAG_SYNTHETIC: "true",
                    MLFLOW_PARENT_RUN_ID: parent, MLFLOW_RUN_NAME: run_name(config)}
            run_id = client.create_run(exp_id, run_name=run_name(config), tags=tags).info.run_id
            client.log_batch(run_id, params=[Param(k, str(v)) for k, v in config.to_dict().items()],
                             metrics=[Metric(k, v, 0, steps - 1) for k, v in metrics.items()])
            folder = Path(tmp, str(i))
            (folder / "gradients").mkdir(parents=True)
            (folder / "signal").mkdir()
            (folder / "config.json").write_text(config.to_json())
            table.to_parquet(folder / "gradients" / "layer_stats.parquet", index=False)
            summary_table(table).to_parquet(folder / "gradients" / "summary.parquet", index=False)
            np.savez_compressed(folder / "gradients" / "histograms.npz", **histograms)
            signal.to_parquet(folder / "signal" / "propagation.parquet", index=False)
            if profile is not None:
                (folder / "theory").mkdir()
                profile.to_parquet(folder / "theory" / "profile.parquet", index=False)
            if config.depth not in flow_plots:
                title = f"synthetic: {run_name(config)}, shown for every run of depth {config.depth}"
                flow_plots[config.depth] = plots.png(plots.gradient_flow(table, title))
            (folder / "plots").mkdir()
            (folder / "plots" / "gradient_flow.png").write_bytes(flow_plots[config.depth])
            client.log_artifacts(run_id, str(folder))
            client.set_terminated(run_id, "FINISHED")
            shutil.rmtree(folder)
            if (i + 1) % 100 == 0:
                echo(f"  {i + 1} / {runs} runs written ({time.perf_counter() - start:.0f} s)")
    tracking.close_grid_run(client, parent, {"runs_total": runs}, 0.0, "FINISHED")
    return spec, time.perf_counter() - start


def time_report(experiment: str, out_dir: Path) -> tuple[float, float | None]:
    """(wall seconds, peak RSS in MB or None) of `gradbench report` in a fresh process."""
    command = [sys.executable, "-m", "pipeline", "report", "--experiment", experiment, "--out-dir", str(out_dir)]
    gnu_time = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    start = time.perf_counter()
    if gnu_time:
        done = subprocess.run([gnu_time, "-f", "%M", *command], cwd=REPO, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode:
            raise click.ClickException(done.stderr[-2000:])
        return seconds, int(done.stderr.strip().splitlines()[-1]) / 1024
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise click.ClickException(done.stderr[-2000:])
    return time.perf_counter() - start, None


@click.command()
@click.option("--runs", type=click.IntRange(min=1), default=1000, show_default=True,
              help="1000, 7680 (the standard grid), or N seeds of one configuration.")
@click.option("--steps", type=click.IntRange(min=2), default=300, show_default=True,
              help="Steps of each run's layer table (a quick-grid run has 300).")
@click.option("--report/--no-report", default=True, show_default=True, help="Time `gradbench report` on it.")
@click.option("--keep", type=click.Path(file_okay=False), default=None,
              help="Build the store in this folder and keep it (default: a temporary one); a folder that "
                   "already holds the store of --runs is reused.")
def main(runs: int, steps: int, report: bool, keep: str | None) -> None:
    folder = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="gradbench-synthetic-"))
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder.resolve()}/mlflow.db"
    experiment = "synthetic"
    client = tracking.get_client()
    try:
        if client.get_experiment_by_name(experiment) is None:
            client.create_experiment(experiment, artifact_location=(folder / "artifacts").resolve().as_uri())
            spec, seconds = build(runs, steps, experiment)
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
            click.echo(f"{runs} synthetic runs of {steps} steps written in {seconds:.0f} s; store {size:,.0f} MB "
                       f"({folder})")
        else:
            held = tracking.grid_spec_of(client, tracking.find_grid_run(client, experiment, None)).name
            if held != f"synthetic-{runs}":
                raise click.UsageError(f"{folder} holds the store of grid {held}, not synthetic-{runs}: "
                                       "pass another --keep folder")
            click.echo(f"reusing the store of {held} in {folder}")
        if report:
            wall, peak = time_report(experiment, folder / "reports")
            click.echo(f"gradbench report on {runs} runs: {wall:.0f} s, peak RSS "
                       f"{'unknown' if peak is None else f'{peak:,.0f} MB'}")
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
