"""Gather what a report needs from MLflow alone: the grid's runs, and their per-step tables."""

from __future__ import annotations

import tempfile
import zipfile
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .. import tracking
from ..config import FIELDS, run_name
from ..tracking.store import TAG_SYNTHETIC


@dataclass
class ReportData:
    grid: str
    parent_run_id: str
    experiment: str
    runs: pd.DataFrame  # one row per configuration that has a finished run
    layers: pd.DataFrame  # layer_stats of those runs, with the run's config columns joined
    missing: list[str] = field(default_factory=list)  # what the report could not show, and why
    reproduces: str | None = None  # the paper the grid's spec reproduces, if any
    histograms: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # run id -> histograms.npz
    signal: pd.DataFrame = field(default_factory=pd.DataFrame)  # signal/propagation.parquet of every run, run_id joined


NORM_LABELS = {"none": "", "batch": "BatchNorm", "layer": "LayerNorm"}


def remedy_label(norm: str, residual: str, residual_scale: float) -> str:
    """The architectural remedies of a run: 'BatchNorm + residual 0.5', 'SkipInit', '' for none."""
    parts = [NORM_LABELS[norm]]
    parts.append({"none": "", "plain": f"residual {residual_scale:g}", "skipinit": "SkipInit"}[residual])
    return " + ".join(p for p in parts if p)


def setup_label(init: str, norm: str, residual: str, residual_scale: float, precision: str = "fp32") -> str:
    """What the figures colour by: the init, the architectural remedies when there are any, and
    the precision when it is not fp32."""
    remedy = remedy_label(norm, residual, residual_scale)
    label = f"{init} + {remedy}" if remedy else init
    return label if precision == "fp32" else f"{label} ({precision})"


# the input-output Jacobian's spectrum at step 0 (absent: NaN, e.g. BatchNorm or an older run)
JACOBIAN_COLUMNS = {"jac_sv_max": "jacobian/sv_max", "jac_sv_min": "jacobian/sv_min", "jac_sv_median": "jacobian/sv_median",
                    "jac_mean_sq": "jacobian/sv_mean_sq", "jac_log10_sd": "jacobian/sv_log10_sd",
                    "jac_mean_sq_pred": "theory/jacobian_mean_sq"}


def collect(experiment: str, grid_run_id: str | None = None) -> ReportData:
    client = tracking.get_client()
    parent = tracking.find_grid_run(client, experiment, grid_run_id)
    spec = tracking.grid_spec_of(client, parent)
    configs = {c.config_hash(): c for c in spec.configs}
    found = tracking.latest_finished_runs(client, parent.info.experiment_id, set(configs))
    missing = [
        f"{run_name(c)}: no finished run" for h, c in configs.items() if h not in found
    ]
    rows, tables = [], []
    histograms: dict[str, dict[str, np.ndarray]] = {}
    signals: list[pd.DataFrame] = []
    without_signal = 0
    with tempfile.TemporaryDirectory() as tmp:
        for h, run in found.items():
            config = configs[h]
            metrics, tags = run.data.metrics, run.data.tags
            row = {
                "run_id": run.info.run_id,
                "run_name": run.info.run_name,
                **config.to_dict(),
                "outcome": tags.get(tracking.TAG_OUTCOME, "unknown"),
                "diagnosis": tags.get(tracking.TAG_DIAGNOSIS, "unknown"),
                "test_acc": metrics.get("final/test_acc", float("nan")),
                "first_last_ratio": metrics.get("grad/first_last_ratio_init", float("nan")),
                "slope_error": metrics.get("theory/slope_error", float("nan")),  # absent where no prediction
                "slope_measured": metrics.get("theory/slope_measured", float("nan")),
                "slope_pred": metrics.get("theory/slope_pred", float("nan")),
                **{column: metrics.get(key, float("nan")) for column, key in JACOBIAN_COLUMNS.items()},
                "url": tracking.run_url(run),
            }
            rows.append(row)
            path = tracking.download_artifact(client, run.info.run_id, "gradients/layer_stats.parquet", f"{tmp}/{h}")
            if path is None:
                missing.append(f"{run.info.run_name}: no gradients/layer_stats.parquet artifact")
                continue
            try:
                table = pd.read_parquet(path)
            except (OSError, ValueError) as exc:  # a corrupt artifact is reported, not fatal
                missing.append(f"{run.info.run_name}: gradients/layer_stats.parquet unreadable ({exc})")
                continue
            table["run_id"] = run.info.run_id
            tables.append(table)
            hist = tracking.download_artifact(client, run.info.run_id, "gradients/histograms.npz", f"{tmp}/{h}")
            if hist is not None:
                try:
                    with np.load(hist) as arrays:
                        histograms[run.info.run_id] = {k: arrays[k] for k in arrays.files}
                except (OSError, ValueError, zipfile.BadZipFile) as exc:
                    missing.append(f"{run.info.run_name}: gradients/histograms.npz unreadable ({exc})")
            path = tracking.download_artifact(client, run.info.run_id, "signal/propagation.parquet", f"{tmp}/{h}")
            if path is None:
                without_signal += 1  # recorded before the forward instruments existed
                continue
            try:
                signals.append(pd.read_parquet(path).assign(run_id=run.info.run_id))
            except (OSError, ValueError) as exc:
                missing.append(f"{run.info.run_name}: signal/propagation.parquet unreadable ({exc})")
    if parent.data.tags.get(TAG_SYNTHETIC) == "true":
        missing.insert(0, "SYNTHETIC DATA: this grid was written by benchmarks/perf/synthetic_store.py to time the "
                          "report; its statistics are made up and mean nothing")
    if without_signal:
        missing.append(f"{without_signal} run(s) without signal/propagation.parquet (recorded by an older gradbench): "
                       "left out of the signal-propagation figure")
    runs = pd.DataFrame(rows, columns=["run_id", "run_name", *FIELDS, "outcome", "diagnosis", "test_acc",
                                       "first_last_ratio", "slope_error", "slope_measured", "slope_pred",
                                       *JACOBIAN_COLUMNS, "url"])
    runs["remedy"] = [remedy_label(*v) for v in zip(runs["norm"], runs.residual, runs.residual_scale)]
    runs["setup"] = [setup_label(*v) for v in zip(runs["init"], runs["norm"], runs.residual, runs.residual_scale,
                                                   runs.precision)]
    layers = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["run_id", "step", "layer"])
    layers = layers.merge(runs[["run_id", *FIELDS, "diagnosis", "slope_error", "setup"]], on="run_id") if tables else layers
    signal = pd.concat(signals, ignore_index=True) if signals else pd.DataFrame(
        columns=["step", "layer", "statistic", "measured", "predicted", "run_id"])
    if signals:
        signal = signal.merge(runs[["run_id", "activation", "depth", "clip", "setup", "seed", "precision"]],
                              on="run_id")
    experiment_name = client.get_experiment(parent.info.experiment_id).name
    return ReportData(spec.name, parent.info.run_id, experiment_name, runs, layers, missing, spec.reproduces,
                      histograms, signal)
