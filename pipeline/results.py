"""What training hands on: plain host-side records (numpy, pandas), no torch and no MLflow.

Training (train.py, monitor.py) produces them; run.py and the tracking package consume them. Keeping
them here lets the tracking code read a chunk without importing any training code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

LAYER_STATS = ("weight_grad_norm", "backprop_norm", "update_ratio", "act")
# loss_scale: what the loss was multiplied by before backward (fp16's dynamic loss scale; 1 otherwise)
# recurrent nets, per time point t: ||dL/dh_t|| (the error reaching step t), the state's mean square
# h_t^2, and the saturated or dead fraction of what the state's squashing receives (like 'act')
TIME_STATS = ("grad_norm", "state_sq", "act")
STEP_STATS = ("loss", "acc", "global_norm_pre_clip", "global_norm_post_clip", "clip_active", "loss_scale")


@dataclass
class Chunk:
    """Host copy of one member's consecutive steps: step (n,), per_step {name: (n,)}, per_layer
    {name: (n, layers)} (empty when only the per-step scalars were monitored), per_time
    {name: (n, time points)} (TIME_STATS, recurrent nets only)."""

    step: np.ndarray
    per_step: dict[str, np.ndarray]
    per_layer: dict[str, np.ndarray]
    per_time: dict[str, np.ndarray] = field(default_factory=dict)

    def truncate(self, n: int) -> Chunk:
        return Chunk(
            self.step[:n],
            {k: v[:n] for k, v in self.per_step.items()},
            {k: v[:n] for k, v in self.per_layer.items()},
            {k: v[:n] for k, v in self.per_time.items()},
        )

    def first_nonfinite(self) -> int | None:
        """Index of the first step whose loss or pre-clip gradient norm is NaN or Inf. A loss-scaled
        (fp16) step whose gradients overflowed is skipped by the scaler, which lowers the scale: that
        is divergence only once the scale is down to 1 (the unscaled gradient is out of range)."""
        overflow = ~np.isfinite(self.per_step["global_norm_pre_clip"]) & (self.per_step["loss_scale"] <= 1)
        bad = ~np.isfinite(self.per_step["loss"]) | overflow
        return int(np.argmax(bad)) if bad.any() else None


@dataclass
class RunResult:
    outcome: str  # "completed" or "diverged"
    steps: int  # optimizer steps taken and recorded
    seconds: float
    final_test_loss: float
    final_test_acc: float
    evals: list[tuple[int, float, float]]  # (step, test loss, test accuracy) after each epoch
    table: pd.DataFrame  # one row per step x layer (see layer_table)
    histograms: dict[str, np.ndarray]  # histograms.npz: steps, counts (steps, layers, bins), edges
    input_sq_mean: float  # E[x^2] of the training inputs, for the theory's finite-depth prediction
    input_var_mean: float  # the pixels' variance across the training images, averaged (BatchNorm's theory)
    signal: dict[str, np.ndarray] = field(default_factory=dict)  # monitor.Monitor.signal: forward q and c
    jacobian: dict = field(default_factory=dict)  # monitor.Monitor.jacobian: steps and a list of singular values
    # recurrent nets: one row per step x time point (time_table); the recurrent W's spectral radius
    # and largest singular value at the histogram steps (steps, spectral_radius, sv_max); the mean
    # square of a few training images at each time step, (images, T): the theory's input term
    time: pd.DataFrame = field(default_factory=pd.DataFrame)
    spectrum: dict[str, np.ndarray] = field(default_factory=dict)
    input_sq_by_time: np.ndarray | None = None


def layer_table(chunks: list[Chunk], act_statistic: str) -> pd.DataFrame:
    """Long table, one row per step x layer: every per-layer statistic plus the step's scalars.
    The generic 'act' statistic is named after what it measures ('saturated' or 'dead')."""
    names = [act_statistic if n == "act" else n for n in LAYER_STATS]
    if not chunks or not chunks[0].per_layer:
        return pd.DataFrame(columns=["step", "layer", *names, *STEP_STATS])
    step = np.concatenate([c.step for c in chunks])
    n_layers = chunks[0].per_layer[LAYER_STATS[0]].shape[1]
    columns = {"step": np.repeat(step, n_layers), "layer": np.tile(np.arange(n_layers), len(step))}
    for name, column in zip(LAYER_STATS, names):
        columns[column] = np.concatenate([c.per_layer[name] for c in chunks]).reshape(-1)
    for name in STEP_STATS:
        columns[name] = np.repeat(np.concatenate([c.per_step[name] for c in chunks]), n_layers)
    return pd.DataFrame(columns)


def time_table(chunks: list[Chunk], times: np.ndarray, act_statistic: str) -> pd.DataFrame:
    """gradients/time_stats.parquet: one row per step x recorded time point t (0 the first step of
    the sequence), every TIME_STATS statistic ('act' named after what it measures)."""
    names = [act_statistic if n == "act" else n for n in TIME_STATS]
    if not chunks or not chunks[0].per_time:
        return pd.DataFrame(columns=["step", "time", *names])
    step = np.concatenate([c.step for c in chunks])
    columns = {"step": np.repeat(step, len(times)), "time": np.tile(np.asarray(times, dtype=np.int64), len(step))}
    for name, column in zip(TIME_STATS, names):
        columns[column] = np.concatenate([c.per_time[name] for c in chunks]).reshape(-1)
    return pd.DataFrame(columns)


SUMMARY_POINTS = 150  # steps at which gradients/summary.parquet keeps every layer: enough to draw a run


def thin_steps(steps: np.ndarray, points: int = SUMMARY_POINTS) -> np.ndarray:
    """At most `points` of the sorted unique `steps`, evenly spaced, the first and the last included."""
    steps = np.unique(steps)
    if len(steps) <= points:
        return steps
    return steps[np.linspace(0, len(steps) - 1, points).round().astype(int)]


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """gradients/summary.parquet, what a report reads of a run (the full layer table of a standard-grid
    run is 4,690 steps x up to 50 layers): layer 0's row at every step (it carries the step's loss,
    accuracy and global norms) and every layer at the steps thin_steps picks from all of them."""
    if table.empty:
        return table
    every_layer = table.step.isin(thin_steps(table.step.to_numpy()))
    return table[every_layer | (table.layer == 0)].reset_index(drop=True)
