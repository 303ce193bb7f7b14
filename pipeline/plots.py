"""Per-run figures logged with each run (plots/*.png), and the one gradient-flow drawer: the run's
plots/gradient_flow.png and the report's gradient-flow figure both draw with flow_panel. Plain
matplotlib (no seaborn): a training process draws a run's figure in about 0.13 s (2-core CPU).
pyplot is imported where a figure is made, not here: the report's reading processes import log10."""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import matplotlib.pyplot as plt

STEP_WIDTHS = (4.5, 3.0, 1.6)  # the first, middle and last step, drawn wide to narrow: coinciding lines stay seen


def log10(values) -> np.ndarray:
    """log10 of the values as floats, NaN where that is not finite (0, negative, inf)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log10(np.asarray(values, dtype=float))
    out[~np.isfinite(out)] = np.nan
    return out


def mean_lines(ax: plt.Axes, frame: pd.DataFrame, x: str, y: str, hue: str, colours: dict, band: bool = True,
               widths: dict | None = None, styles: dict | None = None, dots: bool = True) -> list[plt.Line2D]:
    """One line per key of `colours` that `hue` holds (in that order): the mean of y over the frame's
    rows at each x, with a band of one standard deviation where several rows share an x (and
    `band`). A NaN is a gap in its line, not a zero. `widths`, `styles`: a line width (default 1.6)
    and a matplotlib line style per key. Returns the lines drawn, for a legend."""
    stats = frame.groupby([hue, x], sort=True)[y].agg(["mean", "std", "count"]).reset_index()
    drawn = []
    for key, colour in colours.items():
        rows = stats[stats[hue] == key]
        if rows.empty:
            continue
        xs, mean = rows[x].to_numpy(dtype=float), rows["mean"].to_numpy(dtype=float)
        if band and (rows["count"] > 1).any():
            sd = rows["std"].to_numpy(dtype=float)
            ax.fill_between(xs, mean - sd, mean + sd, color=colour, alpha=0.2, linewidth=0)
        width = (widths or {}).get(key, 1.6)
        drawn += ax.plot(xs, mean, color=colour, linewidth=width, linestyle=(styles or {}).get(key, "-"),
                         marker="o" if dots else None, markersize=max(3.0, width + 1.2), label=str(key))
    return drawn


def flow_panel(ax: plt.Axes, frame: pd.DataFrame, value: str, hue: str, colours: dict,
               widths: dict | None = None) -> list[plt.Line2D]:
    """A gradient-flow panel: `value` (a log10 norm) against `layer`, one line per key of `colours`
    that `hue` holds, the mean over the frame's rows at each layer with dots at the layers and a band
    of one standard deviation where several rows share a layer (mean_lines)."""
    drawn = mean_lines(ax, frame, "layer", value, hue, colours, widths=widths)
    ax.xaxis.get_major_locator().set_params(integer=True)
    return drawn


def gradient_flow(table: pd.DataFrame, title: str) -> plt.Figure:
    """log10 of ||dL/dh|| and ||dL/dW|| against layer index, at the first, middle and last recorded step."""
    import matplotlib.pyplot as plt

    recorded = np.unique(table.step.to_numpy())
    steps = sorted({int(recorded[0]), int(recorded[len(recorded) // 2]), int(recorded[-1])})
    shown = table[table.step.isin(steps)]
    colours = dict(zip(steps, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    widths = dict(zip(steps, STEP_WIDTHS[-len(steps):]))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3), sharex=True)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.16, top=0.8, wspace=0.25)  # fixed: one draw, not two
    for ax, column, label in zip(axes, ["backprop_norm", "weight_grad_norm"], ["||dL/dh||", "||dL/dW||"]):
        lines = flow_panel(ax, shown.assign(v=log10(shown[column])), "v", "step", colours, widths)
        ax.set(title=f"log10 {label} per layer", xlabel="layer (0 = next to the input)")
        if ax is axes[0]:  # a diverged run's last step may have no finite norm: said, as its line is not seen
            ax.legend(lines, [f"step {line.get_label()}" + ("" if np.isfinite(line.get_ydata()).any()
                                                             else " (no finite value)") for line in lines], fontsize=8)
    fig.suptitle(title)
    return fig


def time_flow(time: pd.DataFrame, title: str, predicted: pd.DataFrame | None = None) -> plt.Figure:
    """A recurrent run through time: log10 ||dL/dh_t|| and the state's mean square against the time
    step t, at the first, middle and last recorded step; the mean-field prediction at step 0
    (`predicted`: time, log_norm, natural log relative to the last step) anchored on its last value."""
    import matplotlib.pyplot as plt

    recorded = np.unique(time.step.to_numpy())
    steps = sorted({int(recorded[0]), int(recorded[len(recorded) // 2]), int(recorded[-1])})
    shown = time[time.step.isin(steps)].rename(columns={"time": "layer"})
    colours = dict(zip(steps, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    widths = dict(zip(steps, STEP_WIDTHS[-len(steps):]))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3), sharex=True)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.16, top=0.8, wspace=0.25)
    for ax, column, label in zip(axes, ["grad_norm", "state_sq"], ["log10 ||dL/dh_t||", "log10 mean h_t^2"]):
        lines = flow_panel(ax, shown.assign(v=log10(shown[column])), "v", "step", colours, widths)
        ax.set(title=f"{label} through time", xlabel="time step t (0 = the first pixel row or pixel)")
        if ax is axes[0]:
            names = [f"step {line.get_label()}" + ("" if np.isfinite(line.get_ydata()).any() else " (no finite value)")
                     for line in lines]
            first = shown[shown.step == steps[0]].sort_values("layer")
            if predicted is not None and len(first) and np.isfinite(first.grad_norm.iloc[-1]):
                anchor = math.log10(first.grad_norm.iloc[-1]) if first.grad_norm.iloc[-1] > 0 else math.nan
                ax.plot(predicted.time, anchor + predicted.log_norm / math.log(10), color="black", linestyle="--",
                        linewidth=1.2)
                lines.append(ax.lines[-1])
                names.append("mean-field theory, step 0")
            ax.legend(lines, names, fontsize=8)
    fig.suptitle(title)
    return fig


def png(fig: plt.Figure, dpi: int = 72) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()
