"""A page per run: the evidence behind a summary row (gradient flow, layer x step, histograms,
curves, diagnosis), so that a reader can go from the table to what the run did."""

from __future__ import annotations

import re

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import pandas as pd

from .figures import Figure, _encode, _log10, _thin, draw_histograms, loss_scale


def slug(name: str, limit: int = 80) -> str:
    """A safe file name for any name: letters, digits, '.', '_' and '-' only, never a path."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
    cleaned = re.sub(r"\.{2,}", ".", cleaned).strip("-.")[:limit].strip("-.")  # no '..' anywhere
    return cleaned or "unnamed"


def page_names(runs: pd.DataFrame) -> dict[str, str]:
    """run id -> its page's file name: the slug of its run name, made unique with the run id."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for run_id, run_name in zip(runs.run_id, runs.run_name):
        name = slug(str(run_name))
        if name in taken:
            name = f"{name}-{run_id[:8]}"
        taken.add(name)
        names[run_id] = f"{name}.html"
    return names


def run_figure(run: pd.Series, table: pd.DataFrame, hist: dict | None) -> Figure:
    """Top: gradient flow at the first, middle and last step; log10 ||dL/dh|| per layer and step;
    training curves. Bottom: the gradient histograms. Plain matplotlib with a fixed layout: a page
    per run must cost a fraction of a second (no seaborn heatmap, no layout engine, no tight box)."""
    with plt.rc_context({"axes.titley": 1.0}):  # a fixed title position: placing it costs a third of a page
        return _run_figure(run, table, hist)


def _run_figure(run: pd.Series, table: pd.DataFrame, hist: dict | None) -> Figure:
    fig, axes = plt.subplots(2, 3, figsize=(11, 5.6))
    fig.subplots_adjust(left=0.06, right=0.93, bottom=0.09, top=0.94, wspace=0.6, hspace=0.45)
    flow, heat, curves = axes[0]
    thinned = _thin(table)  # of a summary table: the steps at which it has every layer
    recorded = np.unique(thinned.step)
    steps = sorted({int(recorded[0]), int(recorded[len(recorded) // 2]), int(recorded[-1])})
    for step in steps:
        rows = thinned[thinned.step == step].sort_values("layer")
        flow.plot(rows.layer, _log10(rows.backprop_norm), marker="o", ms=3, label=f"step {step}")
    flow.set(title="log10 ||dL/dh|| per layer", xlabel="layer (0 = input side)")
    flow.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    flow.legend(fontsize=7)
    matrix = thinned.assign(v=_log10(thinned.backprop_norm)).pivot_table(index="layer", columns="step", values="v",
                                                                         dropna=False)
    image = heat.imshow(matrix.to_numpy(), aspect="auto", origin="lower", cmap="magma", interpolation="nearest",
                        extent=(matrix.columns.min() - 0.5, matrix.columns.max() + 0.5, -0.5, len(matrix) - 0.5))
    fig.colorbar(image, ax=heat, label="log10 ||dL/dh||")
    heat.set(title="where and when", xlabel="step", ylabel="layer")
    heat.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    per_step = thinned[thinned.layer == 0]
    finite = per_step[np.isfinite(per_step.loss.astype(float)) & (per_step.loss > 0)]
    curves.plot(finite.step, finite.loss, color="#3b75af")
    curves.set(xlabel="step", title="training")
    curves.set_ylabel("train loss", color="#3b75af")
    loss_scale(curves, finite.loss)
    accuracy = curves.twinx()
    accuracy.plot(per_step.step, per_step.acc, color="#d1495b")
    accuracy.set(ylim=(0, 1))
    accuracy.set_ylabel("train accuracy", color="#d1495b")
    if hist is not None and len(hist["steps"]):
        draw_histograms(axes[1], hist)
    for ax in axes[1][0 if hist is None else len(hist["steps"]):]:
        ax.set_axis_off()
    return Figure(f"run-{slug(str(run.run_name))}", str(run.run_name),
                  "Top: log10 norm of dL/dh per layer at the first, middle and last step; the same for every "
                  "layer and step; training loss (log scale where it spans more than a decade) and accuracy. "
                  "Bottom: the share of each layer's weight-gradient entries in each bin of log10|dL/dW| at the "
                  "first, middle and last step; the leftmost bin holds everything below 1e-12, exact zeros "
                  "included.", *_encode(fig, tight=False))
