"""The summary figures of the recurrent runs, the report's "Through time" section: the error signal
||dL/dh_t|| against the time step at initialization, measured beside the mean-field prediction each
run logged (theory/time_profile.parquet: drawn as logged, never recomputed), and the slope of that
decay and the final accuracy per configuration family. Drawn with seaborn and matplotlib in the
report's seaborn process (workers.py); captions in the template (captions.html.j2), keyed by the
figure's key."""

from __future__ import annotations

import math

import matplotlib.lines
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ..config import GATES, SEQUENCE_SHAPES, SEQUENCES
from ..plots import log10, mean_lines
from .figure import Figure, encode, palette

THEORY = dict(linestyle=(0, (4, 2)), linewidth=1.4)  # a family's logged prediction: dashed in its colour
FAMILY = "arch, activation, init [, W init x gain]"  # what the colours are
PREDICTED = "mean-field prediction (logged)"


def _panels(runs: pd.DataFrame) -> list[tuple[str, str]]:
    """(sequence, arch) of every panel, rows before pixels, rnn before lstm before gru."""
    found = set(zip(runs.sequence, runs.arch))
    return [(s, a) for s in SEQUENCES for a in GATES if (s, a) in found]


def _theory(measured: pd.DataFrame, profiles: pd.DataFrame) -> pd.DataFrame:
    """Per family of `measured` (one panel's step-0 rows, with v = log10 ||dL/dh_t||), the mean over
    its runs of their logged ln||dL/dh_t|| (0 at the last step), in log10, anchored at the family's
    mean measured value at the last time step: columns family, time, y. A family whose runs logged
    no profile has no rows."""
    if profiles.empty or measured.empty:
        return pd.DataFrame(columns=["family", "time", "y"])
    last = measured[measured.time == measured.time.max()].groupby("family").v.mean().rename("anchor")
    runs = measured[["run_id", "family"]].drop_duplicates()
    mean = (profiles[["run_id", "time", "log_norm"]].merge(runs, on="run_id")
            .groupby(["family", "time"]).log_norm.mean().reset_index().merge(last.reset_index(), on="family"))
    mean["y"] = mean.anchor + mean.log_norm / math.log(10)
    return mean[np.isfinite(mean.y)][["family", "time", "y"]]


def through_time(runs: pd.DataFrame, time: pd.DataFrame, profiles: pd.DataFrame) -> Figure | None:
    """log10 ||dL/dh_t|| against t at step 0, a panel per sequence and arch, a line per family (the
    mean over seeds, a band of one sd), its logged prediction dashed beside it."""
    measured = time.merge(runs[["run_id", "arch", "sequence", "family"]], on="run_id")
    measured = measured.assign(v=log10(measured.grad_norm))
    measured = measured[measured.step == 0]
    if not np.isfinite(measured.v).any():
        return None
    # a mean over a family's runs only where every one of them is finite: one seed underflowing to 0
    # (fp32) at the first steps would otherwise leave the mean of the others there, and a jump where it joins
    finite = measured.v.notna().groupby([measured.family, measured.sequence, measured.time]).transform("all")
    gaps = sorted(set(measured.family[~finite & measured.v.notna()]))
    measured = measured.assign(v=measured.v.where(finite))
    panels = _panels(runs[runs.run_id.isin(set(measured.run_id))])
    colours = palette(sorted(runs.family.unique()))
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    room = 0.7 + 0.075 * max(len(FAMILY), *map(len, colours))
    fig, axes = plt.subplots(rows, columns, figsize=(0.8 + 3.4 * columns + room, 0.5 + 2.8 * rows), squeeze=False,
                             layout="constrained")
    predicted_any, without = False, set()
    for ax, (sequence, arch) in zip(axes.flat, panels):
        mine = measured[(measured.sequence == sequence) & (measured.arch == arch)]
        mean_lines(ax, mine, "time", "v", "family", colours, dots=False)
        predicted = _theory(mine, profiles)
        for family, line in predicted.groupby("family"):
            ax.plot(line.time, line.y, color=colours[family], **THEORY)
        predicted_any |= len(predicted) > 0
        without |= set(mine.family) - set(predicted.family)
        ax.set_title(f"{arch} - {sequence} ({SEQUENCE_SHAPES[sequence][0]} steps)", fontsize=9)
        ax.set(xlabel="time step t (0 = first row or pixel)", ylabel="log10 ||dL/dh_t||")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    handles = [matplotlib.lines.Line2D([], [], color=c) for c in colours.values()]
    labels = list(colours)
    if predicted_any:
        handles.append(matplotlib.lines.Line2D([], [], color="#444", **THEORY))
        labels.append(PREDICTED)
    fig.legend(handles, labels, title=FAMILY, loc="outside right upper", frameon=False, fontsize=8, title_fontsize=8)
    notes = (f"No prediction logged (no dashed line) for: {'; '.join(sorted(without))}." if without else "")
    if gaps:
        notes += (f" Gaps in {'; '.join(gaps)}: time steps where some run's ||dL/dh_t|| is 0 (below fp32's range) "
                  "or not finite, so no mean over its runs is drawn there.")
    return encode(fig, "through-time", "Gradient through time at initialization", notes)


def time_slopes(runs: pd.DataFrame) -> Figure | None:
    """Per family and sequence (rows): the measured slope of ln||dL/dh_t|| per time step (a dot per
    run) beside the logged prediction's (a cross: the mean over its runs), and the final test
    accuracy (a dot per run)."""
    if runs.empty:
        return None
    order_of = {s: i for i, s in enumerate(SEQUENCES)}
    data = runs.assign(row=runs.family + " - " + runs.sequence, _order=runs.sequence.map(order_of))
    data = data.astype({"time_slope_measured": float, "time_slope_pred": float, "test_acc": float})
    order = data.sort_values(["_order", "family"]).row.unique().tolist()
    archs = [a for a in GATES if a in set(data.arch)]
    colours = dict(zip(archs, sns.color_palette(n_colors=len(archs))))
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.7 + 0.3 * len(order)), sharey=True, layout="constrained")
    for ax, column in zip(axes, ["time_slope_measured", "test_acc"]):
        sns.stripplot(data=data, x=column, y="row", hue="arch", hue_order=archs, palette=colours, order=order, ax=ax,
                      size=6, jitter=False, dodge=False, legend=False)
        ax.grid(axis="x", alpha=0.3)
    predicted = data.groupby("row").time_slope_pred.mean().reindex(order)
    shown = np.isfinite(predicted.to_numpy())
    axes[0].scatter(predicted.to_numpy()[shown], np.arange(len(order))[shown], marker="x", color="black", s=45,
                    linewidths=1.6, zorder=4, label=PREDICTED)
    axes[0].axvline(0, color="black", linewidth=0.8)
    axes[0].set(title="at initialization (step 0)", xlabel="slope of ln||dL/dh_t|| per time step", ylabel="")
    axes[1].axvline(0.1, color="#d1495b", linewidth=0.8, linestyle="--")
    axes[1].set(title="after training", xlabel="final test accuracy", xlim=(0, 1))
    handles = [matplotlib.lines.Line2D([], [], color=c, marker="o", linestyle="none") for c in colours.values()]
    labels = [f"{a}: measured, a run" for a in archs]
    if shown.any():
        handles.append(matplotlib.lines.Line2D([], [], color="black", marker="x", linestyle="none",
                                               markeredgewidth=1.6))
        labels.append(PREDICTED)
    fig.legend(handles, labels, loc="outside right upper", frameon=False, fontsize=8)
    return encode(fig, "time-slopes", "Gradient decay through time and accuracy, per family")
