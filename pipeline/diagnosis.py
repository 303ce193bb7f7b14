"""Label a run healthy, vanishing, exploding, diverged, dead or saturated from its statistics.

The rules, first match wins (all thresholds live in THRESHOLDS):
1. diverged   the loss or a gradient became NaN/Inf during training;
2. dead       rectifier nets: at the last step, on average over hidden layers, more than
              `dead_fraction` of the units are inactive on every example of the batch;
3. saturated  squashing nets: at the last step, on average over hidden layers, more than
              `saturated_fraction` of the units sit where phi'(z) < 10% of phi'(0);
4. exploding  at initialization the error signal reaching the first layer, ||dL/dh_L00||, is more
              than `exploding_ratio` times the one at the output layer (a recurrent net: the error
              reaching the first time step, ||dL/dh_0||, against the one at the last);
5. vanishing  ... less than `vanishing_ratio` times the one at the output layer (or the last step);
6. healthy    otherwise.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

THRESHOLDS = {
    "vanishing_ratio": 1e-2,
    "exploding_ratio": 1e2,
    "dead_fraction": 0.5,
    "saturated_fraction": 0.5,
}
LABELS = ("healthy", "vanishing", "exploding", "diverged", "dead", "saturated")


def first_last_ratio(table: pd.DataFrame, column: str = "backprop_norm", step: int = 0) -> float:
    """||first layer|| / ||last layer|| of a per-layer statistic at one step (NaN if unknown)."""
    rows = table[table.step == step].sort_values("layer")[column].to_numpy()
    if len(rows) < 2 or not rows[-1] > 0:
        return math.nan
    with np.errstate(invalid="ignore"):  # inf / inf: no ratio (NaN)
        return float(np.float64(rows[0]) / rows[-1])


def first_last_time_ratio(time: pd.DataFrame, step: int = 0) -> float:
    """||dL/dh_0|| / ||dL/dh_T-1|| of a recurrent net at one step (NaN if unknown)."""
    rows = time[time.step == step].sort_values("time").grad_norm.to_numpy()
    if len(rows) < 2 or not rows[-1] > 0:
        return math.nan
    with np.errstate(invalid="ignore"):
        return float(np.float64(rows[0]) / rows[-1])


def diagnose(outcome: str, table: pd.DataFrame, thresholds: dict[str, float] = THRESHOLDS,
             time: pd.DataFrame | None = None) -> str:
    """The label; `time`: a recurrent net's statistics through time (its ratio replaces the layers')."""
    if outcome == "diverged":
        return "diverged"
    if table.empty:
        return "healthy"
    last = table[table.step == table.step.max()]
    if "dead" in table and last["dead"].mean() > thresholds["dead_fraction"]:
        return "dead"
    if "saturated" in table and last["saturated"].mean() > thresholds["saturated_fraction"]:
        return "saturated"
    ratio = first_last_ratio(table) if time is None or time.empty else first_last_time_ratio(time)
    if ratio > thresholds["exploding_ratio"]:
        return "exploding"
    if ratio < thresholds["vanishing_ratio"]:
        return "vanishing"
    return "healthy"
