"""Gather what a report needs from MLflow alone: the grid's runs, their per-step rows, and the
artifacts a figure or a run page reads on demand."""

from __future__ import annotations

import multiprocessing
import os
import zipfile
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .. import tracking
from ..config import FIELDS, run_name
from ..norms import NORMS
from ..results import SUMMARY_POINTS, summary_table, thin_steps
from ..runtime import die_with_parent
from ..tracking.store import TAG_SYNTHETIC
from .figure import is_mlp

# the config columns joined to the layer rows: what the figures group and colour by
LAYER_KEYS = ["run_id", "activation", "init", "depth", "width", "clip", "clip_threshold", "seed", "precision", "norm",
              "residual", "diagnosis", "outcome", "slope_error", "setup"]
ROW_BUDGET = 2_000_000  # per-step rows held for the whole grid: every step of a small grid, thinned for a big one
READERS = 4  # threads per process reading artifacts (a download waits on the network, not on Python)


@dataclass
class ReportData:
    grid: str
    parent_run_id: str
    experiment: str
    runs: pd.DataFrame  # one row per configuration that has a finished run (steps: how many it recorded)
    # per run: every layer at its first step, and layer 0's row (which carries the step's loss,
    # accuracy and global norms) at every step, or at evenly spaced steps when the grid is big
    layers: pd.DataFrame
    artifacts: tracking.ArtifactFiles  # the runs' artifacts, read when a figure or a run page needs them
    missing: list[str] = field(default_factory=list)  # what the report could not show, and why
    reproduces: str | None = None  # the paper the grid's spec reproduces, if any
    signal: pd.DataFrame = field(default_factory=pd.DataFrame)  # signal/propagation.parquet of the deepest nets
    profiles: pd.DataFrame = field(default_factory=pd.DataFrame)  # theory/profile.parquet of the deepest nets
    # the recurrent runs' gradients/time_stats.parquet at step 0 (run_id, time, grad_norm) and their
    # theory/time_profile.parquet (run_id, time, log_norm): what the through-time figure draws
    time: pd.DataFrame = field(default_factory=pd.DataFrame)
    time_profiles: pd.DataFrame = field(default_factory=pd.DataFrame)
    notices: list[str] = field(default_factory=list)  # what a reader must know first (synthetic data)

    def table(self, run_id: str) -> pd.DataFrame | None:
        """A run's summary table (results.summary_table): layer 0 at every step, every layer at up
        to results.SUMMARY_POINTS steps."""
        table, _ = read_summary(self.artifacts, run_id)
        return table

    def histograms(self, run_id: str) -> dict[str, np.ndarray] | None:
        return read_histograms(self.artifacts, run_id)


def read_histograms(artifacts: tracking.ArtifactFiles, run_id: str) -> dict[str, np.ndarray] | None:
    """A run's gradients/histograms.npz (None when it has none or it is unreadable)."""
    path = artifacts.get(run_id, "gradients/histograms.npz")
    if path is None:
        return None
    try:
        with np.load(path) as arrays:
            return {k: arrays[k] for k in arrays.files}
    except (OSError, ValueError, zipfile.BadZipFile):
        return None


def read_time(artifacts: tracking.ArtifactFiles, run_id: str) -> pd.DataFrame | None:
    """A recurrent run's gradients/time_stats.parquet (None when it has none or it is unreadable)."""
    table = _read_table(artifacts, run_id, "gradients/time_stats.parquet")
    return table.to_pandas() if isinstance(table, pa.Table) else None


def read_summary(artifacts: tracking.ArtifactFiles, run_id: str) -> tuple[pd.DataFrame | None, str | None]:
    """(a run's summary table, or None and why not)."""
    table, error = _read_summary(artifacts, run_id)
    return (None if table is None else table.to_pandas()), error


def _read_summary(artifacts: tracking.ArtifactFiles, run_id: str) -> tuple[pa.Table | None, str | None]:
    """Runs recorded before gradbench wrote gradients/summary.parquet have it made from their full
    layer table."""
    name = "gradients/summary.parquet"
    path = artifacts.get(run_id, name)
    summarize = path is None  # an older run: its full layer table only
    if summarize:
        name = "gradients/layer_stats.parquet"
        path = artifacts.get(run_id, name)
    if path is None:
        return None, "no gradients/summary.parquet or gradients/layer_stats.parquet artifact"
    try:
        table = _read_parquet(path)
    except (OSError, ValueError) as exc:  # a corrupt artifact is reported, not fatal
        return None, f"{name} unreadable ({exc})"
    if summarize:
        table = pa.Table.from_pandas(summary_table(table.to_pandas()), preserve_index=False)
    return table, None


def _read_parquet(path) -> pa.Table:
    """A small parquet file, read whole: ParquetFile without threads is about half the cost of
    pq.read_table (which goes through the datasets layer), and cost per file is what a grid's report
    pays 7,680 times."""
    with pq.ParquetFile(path) as file:
        return file.read(use_threads=False)


def _layer_rows(artifacts: tracking.ArtifactFiles, run_id: str, points: int) -> tuple[pa.Table | None, int, str | None]:
    """(Of a run's summary table, what the summary figures draw: every layer at the first step, and
    layer 0 at `points` evenly spaced steps, all of them in a small grid; the run's number of steps;
    what went wrong, if anything)."""
    table, error = _read_summary(artifacts, run_id)
    if table is None or table.num_rows == 0:
        return None, 0, error
    step, layer = table["step"].to_numpy(), table["layer"].to_numpy()
    kept = (step == step.min()) | ((layer == 0) & np.isin(step, thin_steps(step[layer == 0], points)))
    return _with_run_id(table.filter(pa.array(kept)), run_id), int(step.max()) + 1, None


def _with_run_id(table: pa.Table, run_id: str) -> pa.Table:
    return table.append_column("run_id", pa.array([run_id] * table.num_rows, pa.string()))


def _joined(tables: list[pa.Table], runs: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Every run's rows in one frame (one pandas conversion for the whole grid: a frame per run
    costs more than reading it), with the runs' `columns` joined on run_id."""
    return pa.concat_tables(tables, promote_options="permissive").to_pandas().merge(runs[columns], on="run_id")


def family_label(arch: str, activation: str, init: str, init_std: float, recurrent_init: str,
                 recurrent_gain: float) -> str:
    """A recurrent run's configuration family, what the through-time figures colour by: 'rnn tanh,
    normal 0.2, W identity x 1.5', 'lstm, xavier_normal' (seeds and the sequence aside)."""
    net = f"{arch} {activation}" if arch in ("mlp", "rnn") else arch  # the gated cells have no activation to set
    parts = [net, f"normal {init_std:g}" if init == "normal" else init]
    weights = "" if recurrent_init == "same" else f"W {recurrent_init}"
    if recurrent_gain != 1:
        weights = f"{weights or 'W'} x {recurrent_gain:g}"
    return ", ".join(parts + ([weights] if weights else []))


def remedy_label(norm: str, residual: str, residual_scale: float) -> str:
    """The architectural remedies of a run: 'BatchNorm + residual 0.5', 'SkipInit', '' for none."""
    parts = [NORMS[norm].label]
    parts.append({"none": "", "plain": f"residual {residual_scale:g}", "skipinit": "SkipInit"}[residual])
    return " + ".join(p for p in parts if p)


def setup_label(init: str, norm: str, residual: str, residual_scale: float, precision: str = "fp32") -> str:
    """What the figures colour by: the init, the architectural remedies when there are any, and
    the precision when it is not fp32."""
    remedy = remedy_label(norm, residual, residual_scale)
    label = f"{init} + {remedy}" if remedy else init
    return label if precision == "fp32" else f"{label} ({precision})"


# a recurrent run's gradient through time at step 0 (runs/config.arch rnn, lstm, gru; NaN for an MLP):
# the slope of ln||dL/dh_t|| per time step towards t = 0, measured and predicted (rnn only), and the
# ratio ||dL/dh_0|| / ||dL/dh_T-1||
TIME_COLUMNS = {"time_slope_measured": "time/slope_measured", "time_slope_pred": "theory/time_slope_pred",
                "time_ratio": "time/first_last_ratio_init"}
# the input-output Jacobian's spectrum at step 0 (absent: NaN, e.g. BatchNorm or an older run)
JACOBIAN_COLUMNS = {"jac_sv_max": "jacobian/sv_max", "jac_sv_min": "jacobian/sv_min", "jac_sv_median": "jacobian/sv_median",
                    "jac_mean_sq": "jacobian/sv_mean_sq", "jac_log10_sd": "jacobian/sv_log10_sd",
                    "jac_mean_sq_pred": "theory/jacobian_mean_sq"}


def collect(experiment: str, grid_run_id: str | None = None, folder: str | None = None,
            pool: Executor | None = None) -> ReportData:
    """The grid's runs and what the summary figures draw. Artifacts that have to be downloaded (a
    server, an object store) land in `folder`, which must outlive the ReportData."""
    client = tracking.get_client()
    parent = tracking.find_grid_run(client, experiment, grid_run_id)
    spec = tracking.grid_spec_of(client, parent)
    configs = {c.config_hash(): c for c in spec.configs}
    found = tracking.latest_finished_runs(client, parent.info.experiment_id, set(configs))
    missing = [
        f"{run_name(c)}: no finished run" for h, c in configs.items() if h not in found
    ]
    rows = []
    for h, run in found.items():
        metrics, tags = run.data.metrics, run.data.tags
        rows.append({
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            **configs[h].to_dict(),
            "outcome": tags.get(tracking.TAG_OUTCOME, "unknown"),
            "diagnosis": tags.get(tracking.TAG_DIAGNOSIS, "unknown"),
            "test_acc": metrics.get("final/test_acc", float("nan")),
            "first_last_ratio": metrics.get("grad/first_last_ratio_init", float("nan")),
            "slope_error": metrics.get("theory/slope_error", float("nan")),  # absent where no prediction
            "slope_measured": metrics.get("theory/slope_measured", float("nan")),
            "slope_pred": metrics.get("theory/slope_pred", float("nan")),
            **{column: metrics.get(key, float("nan")) for column, key in TIME_COLUMNS.items()},
            **{column: metrics.get(key, float("nan")) for column, key in JACOBIAN_COLUMNS.items()},
            "url": tracking.run_url(run),
        })
    runs = pd.DataFrame(rows, columns=["run_id", "run_name", *FIELDS, "outcome", "diagnosis", "test_acc",
                                       "first_last_ratio", "slope_error", "slope_measured", "slope_pred",
                                       *TIME_COLUMNS, *JACOBIAN_COLUMNS, "url"])
    runs["remedy"] = [remedy_label(*v) for v in zip(runs["norm"], runs.residual, runs.residual_scale)]
    runs["setup"] = [setup_label(*v) for v in zip(runs["init"], runs["norm"], runs.residual, runs.residual_scale,
                                                   runs.precision)]
    runs["family"] = [family_label(*v) for v in zip(runs.arch, runs.activation, runs["init"], runs.init_std,
                                                    runs.recurrent_init, runs.recurrent_gain)]
    artifacts = tracking.ArtifactFiles({r.info.run_id: r.info.artifact_uri for r in found.values()}, folder)
    points = max(SUMMARY_POINTS, ROW_BUDGET // max(len(runs), 1))
    read = in_processes(_layer_rows, [(artifacts, run_id, points) for run_id in runs.run_id], pool)
    tables = [table for table, _, _ in read if table is not None]
    missing += [f"{name}: {error}" for name, (_, _, error) in zip(runs.run_name, read) if error]
    runs["steps"] = [steps for _, steps, _ in read]
    layers = _joined(tables, runs, LAYER_KEYS) if tables else pd.DataFrame(columns=["run_id", "step", "layer"])
    # the share of its recorded steps at which a run's clip was active (all of them in a small grid)
    clip_fraction = (layers.clip_active.where(layers.layer == 0).groupby(layers.run_id).mean() if tables
                     else pd.Series(dtype=float))
    runs["clip_fraction"] = runs.run_id.map(clip_fraction).astype(float)
    mlps = runs[is_mlp(runs)]
    deepest = mlps[mlps.depth == mlps.depth.max()]
    signal, without_signal, profiles = _deepest_tables(artifacts, deepest, missing, pool)
    time, time_profiles = _time_tables(artifacts, runs[~is_mlp(runs)], missing, pool)
    notices = []
    if parent.data.tags.get(TAG_SYNTHETIC) == "true":
        notices.append("SYNTHETIC DATA: this grid was written by benchmarks/perf/synthetic_store.py to time the "
                       "report; its statistics are made up and mean nothing")
    if without_signal:
        missing.append(f"{without_signal} run(s) without signal/propagation.parquet (recorded by an older gradbench): "
                       "left out of the signal-propagation figure")
    experiment_name = client.get_experiment(parent.info.experiment_id).name
    return ReportData(spec.name, parent.info.run_id, experiment_name, runs, layers, artifacts, missing, spec.reproduces,
                      signal, profiles, time, time_profiles, notices)


def _read_table(artifacts: tracking.ArtifactFiles, run_id: str, name: str) -> pa.Table | str | None:
    """A run's parquet artifact `name` with its run_id; None where the run has none (recorded before
    gradbench wrote it, or no prediction to write), why not where it is unreadable."""
    path = artifacts.get(run_id, name)
    if path is None:
        return None
    try:
        table = _read_parquet(path)
    except (OSError, ValueError) as exc:
        return f"{name} unreadable ({exc})"
    return _with_run_id(table, run_id)


def _chunk(job: tuple) -> list:
    function, jobs = job
    with ThreadPoolExecutor(READERS) as pool:
        return list(pool.map(lambda args: function(*args), jobs))


def in_processes(function, jobs: list[tuple], pool: Executor | None = None) -> list:
    """[function(*job) for job in jobs], on every core: in the processes of `pool` (the report's),
    or of one forked for them, each with a few threads. Reading a run's small tables is mostly Python
    and pyarrow overhead (~5 ms), which threads alone cannot spread over cores."""
    workers = min(os.cpu_count() or 1, max(1, len(jobs) // 200))  # a process is worth ~200 reads (~1 s)
    if workers == 1 or (pool is None and "fork" not in multiprocessing.get_all_start_methods()):
        return _chunk((function, jobs))
    chunks = [(function, jobs[i::workers]) for i in range(workers)]
    if pool is not None:
        parts = list(pool.map(_chunk, chunks))
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                 initializer=die_with_parent) as own:  # not left reading when the report is killed
            parts = list(own.map(_chunk, chunks))
    out = [None] * len(jobs)
    for i, part in enumerate(parts):
        out[i::workers] = part
    return out


DEEPEST_TABLES = ("signal/propagation.parquet", "theory/profile.parquet")  # what the figures of the deepest nets read


def _read_tables(artifacts: tracking.ArtifactFiles, run_id: str) -> list[pa.Table | str | None]:
    return [_read_table(artifacts, run_id, name) for name in DEEPEST_TABLES]


def _deepest_tables(artifacts: tracking.ArtifactFiles, runs: pd.DataFrame, missing: list[str],
                    pool: Executor | None = None) -> tuple[pd.DataFrame, int, pd.DataFrame]:
    """Of `runs` (the deepest nets), in one pass: signal/propagation.parquet joined to their configs,
    how many runs have none, and theory/profile.parquet (the prediction each run logged per hidden
    layer: a run without one, no prediction or recorded by an older gradbench, has no rows; the
    gradient-flow figure draws no prediction for it, never a recomputed one)."""
    read_all = in_processes(_read_tables, [(artifacts, run_id) for run_id in runs.run_id], pool)
    missing += [f"{name}: {t}" for name, tables in zip(runs.run_name, read_all) for t in tables if isinstance(t, str)]
    signals = [s for s, _ in read_all if isinstance(s, pa.Table)]
    profiles = [p for _, p in read_all if isinstance(p, pa.Table)]
    without = sum(s is None for s, _ in read_all)
    profile = (pa.concat_tables(profiles).to_pandas() if profiles
               else pd.DataFrame(columns=["layer", "log_norm", "run_id"]))
    if not signals:
        return pd.DataFrame(columns=["step", "layer", "statistic", "measured", "predicted", "run_id"]), without, profile
    signal = _joined(signals, runs, ["run_id", "activation", "depth", "clip", "setup", "seed", "precision"])
    return signal, without, profile


TIME_TABLES = ("gradients/time_stats.parquet", "theory/time_profile.parquet")  # what the through-time figures read


def _read_time_tables(artifacts: tracking.ArtifactFiles, run_id: str) -> list[pa.Table | str | None]:
    """A recurrent run's time statistics at step 0 (every step is there: a few rows of a big table are
    kept) and its logged time profile."""
    stats, profile = (_read_table(artifacts, run_id, name) for name in TIME_TABLES)
    if isinstance(stats, pa.Table):
        stats = stats.select(["step", "time", "grad_norm", "run_id"])
        stats = stats.filter(pa.array(stats["step"].to_numpy() == 0))
    return [stats, profile]


def _time_tables(artifacts: tracking.ArtifactFiles, runs: pd.DataFrame, missing: list[str],
                 pool: Executor | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Of the recurrent `runs`: ||dL/dh_t|| at step 0 (run_id, time, grad_norm) and the logged
    theory/time_profile.parquet (run_id, time, log_norm; none where the run made no prediction:
    lstm, gru, an identity W). Bounded: 28 time points and one profile per run."""
    read_all = in_processes(_read_time_tables, [(artifacts, run_id) for run_id in runs.run_id], pool)
    missing += [f"{name}: {t}" for name, tables in zip(runs.run_name, read_all) for t in tables if isinstance(t, str)]
    stats = [s for s, _ in read_all if isinstance(s, pa.Table)]
    profiles = [p for _, p in read_all if isinstance(p, pa.Table)]
    missing += [f"{name}: no gradients/time_stats.parquet" for name, (s, _) in zip(runs.run_name, read_all) if s is None]
    time = (pa.concat_tables(stats).to_pandas() if stats
            else pd.DataFrame(columns=["step", "time", "grad_norm", "run_id"]))
    profile = (pa.concat_tables(profiles).to_pandas() if profiles
               else pd.DataFrame(columns=["time", "log_norm", "run_id"]))
    return time, profile
