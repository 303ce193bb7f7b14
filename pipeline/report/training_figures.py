"""The summary figures over training: where and when the telling runs' gradients vanish or explode
(layer x step), their gradient histograms at three steps, the training curves of the deepest nets,
and gradient clipping. Drawn with seaborn and matplotlib in the report's seaborn process
(workers.py); captions in the template (captions.html.j2), keyed by the figure's key."""

from __future__ import annotations

import matplotlib.lines
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from ..config import pair_keys
from ..plots import log10, mean_lines
from .figure import DIVERGED, SETUP, Figure, deepest, encode, facet_grid, histogram_shares, legend_right, palette, thin

CLIP_PAIR_KEYS = pair_keys("clip", "clip_threshold")  # a clipped run and "the same configuration but for clipping"


def _run_title(pick) -> str:
    name = str(pick.run.run_name)
    if pick.run.outcome == "diverged":
        name += f" (diverged: last step {int(pick.table.step.max())})" if pick.table is not None else " (diverged)"
    return f"{pick.label}: {name}"


def layer_step_matrix(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(cells, steps) of a run's summary table: log10 ||dL/dh|| per layer (rows, 0 first) and
    thinned step (columns); NaN where a layer has no finite value at a step."""
    thinned = thin(table)
    layer = thinned.layer.to_numpy(dtype=int)
    steps, column = np.unique(thinned.step.to_numpy(), return_inverse=True)
    cells = np.full((layer.max() + 1, len(steps)), np.nan)
    cells[layer, column] = log10(thinned.backprop_norm)
    return cells, steps


def layer_step_heatmaps(picks: list) -> Figure | None:
    picks = [p for p in picks if p.table is not None and not p.table.empty]
    if not picks:
        return None
    fig, axes = plt.subplots(1, len(picks), figsize=(4.3 * len(picks), 3.6), squeeze=False, layout="constrained")
    for ax, pick in zip(axes[0], picks):
        cells, steps = layer_step_matrix(pick.table)
        half = (steps[1] - steps[0]) / 2 if len(steps) > 1 else 0.5
        image = ax.imshow(cells, origin="lower", aspect="auto", cmap="magma", interpolation="nearest",
                          extent=(steps[0] - half, steps[-1] + half, -0.5, len(cells) - 0.5))
        fig.colorbar(image, ax=ax, label="log10 ||dL/dh||")
        ax.set(xlabel="step", ylabel="layer")
        ax.set_title(_run_title(pick).replace(": ", ":\n", 1), fontsize=9)
        ax.yaxis.get_major_locator().set_params(integer=True)
    return encode(fig, "layer-step", "Where and when gradients vanish or explode")


def histograms_over_time(picks: list) -> Figure | None:
    picks = [p for p in picks if p.histograms is not None and len(p.histograms["steps"])]
    if not picks:
        return None
    columns = max(len(p.histograms["steps"]) for p in picks)
    fig = plt.figure(figsize=(1.6 + 2.9 * columns, 0.2 + 2.7 * len(picks)), layout="constrained")
    for pick, subfig in zip(picks, np.atleast_1d(fig.subfigures(len(picks), 1))):
        shares, edges = histogram_shares(pick.histograms)
        vmax = float(shares.max()) or 1.0  # one colour scale per run
        axes = subfig.subplots(1, columns, sharey=True, squeeze=False)[0]
        for i, ax in enumerate(axes):
            if i >= len(shares):
                ax.set_visible(False)
                continue
            image = ax.imshow(shares[i], origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=vmax,
                              interpolation="nearest", extent=(edges[0], edges[-1], -0.5, shares.shape[1] - 0.5))
            ax.set_title(f"step {int(pick.histograms['steps'][i])}", fontsize=9)
            ax.set(xlabel="log10 |dL/dW|", ylabel="layer" if i == 0 else "")
            ax.yaxis.get_major_locator().set_params(integer=True)
        subfig.colorbar(image, ax=axes, label="share of the layer's entries", shrink=0.9)
        subfig.suptitle(_run_title(pick), fontsize=10, fontweight="bold", x=0.02, ha="left")
    return encode(fig, "histograms", "Gradient histograms over time")


def training_curves(layers: pd.DataFrame) -> Figure | None:
    if layers.empty:
        return None
    depth, nets = deepest(layers)
    per_step = nets[nets.layer == 0].astype({"loss": float, "acc": float})
    finite = thin(per_step)
    finite = finite[np.isfinite(finite.loss)]
    if finite.empty:
        return None
    setups = sorted(finite.setup.unique())
    colours = palette(setups)
    activations = sorted(finite.activation.unique())
    # the loss axis spans the runs that did not diverge; a diverged run's blow-up (1e18) would
    # otherwise set it, and every other curve would be a flat line at its bottom (it is cut at the edge)
    lasting = finite[finite.diagnosis != "diverged"].loss
    lasting = lasting[lasting > 0]
    log = bool(len(lasting)) and lasting.max() / lasting.min() > 10
    # where each diverged run stopped: its last finite loss, on the panel's edge when beyond it
    stopped = per_step[(per_step.diagnosis == "diverged") & np.isfinite(per_step.loss)]
    ends = stopped.loc[stopped.groupby("run_id").step.idxmax()] if len(stopped) else stopped
    handles = [matplotlib.lines.Line2D([], [], color=c) for c in colours.values()]
    labels = list(setups)
    if len(ends):
        handles.append(matplotlib.lines.Line2D([], [], color=DIVERGED, marker="x", linestyle="none", markersize=7,
                                               markeredgewidth=2.4))
        labels.append("diverged: last finite loss")
    fig, axes = facet_grid(2, len(activations), [*labels, SETUP])
    for ax_loss, ax_acc, activation in zip(axes[0], axes[1], activations):
        mine = finite[finite.activation == activation]
        for ax, y in ((ax_loss, "loss"), (ax_acc, "acc")):
            mean_lines(ax, mine, "step", y, "setup", colours, dots=False)
        ax_loss.set_title(f"loss - {activation}", fontsize=9)
        ax_acc.set_title(f"acc - {activation}", fontsize=9)
    if len(lasting):
        axes[0][0].set_ylim(lasting.min() * (0.8 if log else 0.95), lasting.max() * (1.25 if log else 1.05))
    if log:  # ticks at 1, 2 and 5 times the powers of ten where few decades are in view, labelled plainly (0.5, 2)
        axes[0][0].set_yscale("log")
        decades = np.log10(lasting.max() / lasting.min())
        axes[0][0].yaxis.set_major_locator(LogLocator(subs=(1.0,) if decades > 3 else (1.0, 2.0, 5.0), numticks=6))
        axes[0][0].yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axes[0][0].yaxis.set_minor_formatter(NullFormatter())
    low, high = axes[0][0].get_ylim()
    for ax, activation in zip(axes[0], activations):
        mine = ends[ends.activation == activation]
        if len(mine):
            ax.plot(mine.step, np.clip(mine.loss, low, high), linestyle="none", marker="x", color=DIVERGED,
                    markersize=7, markeredgewidth=2.4, clip_on=False, zorder=5)
    axes[0][0].set_ylabel("train loss" + (" (log scale)" if log else ""))
    axes[1][0].set_ylabel("train accuracy")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    legend_right(fig, handles, labels, SETUP)
    note = ("A red X marks where each diverged run stopped: its last finite loss, or the edge of the panel when "
            "that loss is beyond it.") if len(ends) else ""
    return encode(fig, "training", f"Training curves (depth {depth})", note)


def clipping(norms: pd.DataFrame, runs: pd.DataFrame) -> Figure | None:
    """`norms`: the clipped runs' global norms before and after clipping per step (layer 0's rows,
    thinned); `runs`: with each run's clip_fraction (collect)."""
    clipped = runs[runs["clip"] != "none"]
    if clipped.empty:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), layout="constrained")
    modes = sorted(norms["clip"].unique())
    colours = dict(zip(modes, sns.color_palette(n_colors=len(modes))))
    styles = {"global_norm_pre_clip": ("-", "before clipping"), "global_norm_post_clip": ("--", "after clipping")}
    for column, (style, _) in styles.items():  # median and quartiles over runs, by pandas in one pass
        quartiles = (norms.assign(v=log10(norms[column])).groupby(["clip", "step"]).v
                     .quantile([0.25, 0.5, 0.75]).unstack().reset_index())
        for mode, rows in quartiles.groupby("clip"):
            axes[0].plot(rows.step, rows[0.5], color=colours[mode], linestyle=style)
            axes[0].fill_between(rows.step, rows[0.25], rows[0.75], color=colours[mode], alpha=0.2, linewidth=0)
    axes[0].legend(handles=[matplotlib.lines.Line2D([], [], color=c, label=m) for m, c in colours.items()]
                   + [matplotlib.lines.Line2D([], [], color="black", linestyle=st, label=label)
                      for st, label in styles.values()], fontsize=8, title="clip mode", title_fontsize=8)
    axes[0].set(title="global gradient norm (median, IQR band)", xlabel="step", ylabel="log10 global norm")
    sns.barplot(data=clipped, x="activation", y="clip_fraction", hue="clip", errorbar=("pi", 100), ax=axes[1])
    axes[1].set(title="fraction of steps clipped", ylabel="fraction", ylim=(0, 1))
    if clipped.activation.nunique() > 4:  # eight names side by side run into each other
        axes[1].tick_params(axis="x", rotation=45)
    pairs = clipped.merge(runs[runs["clip"] == "none"], on=CLIP_PAIR_KEYS, suffixes=("", "_none"))
    if not pairs.empty:
        sns.scatterplot(data=pairs, x="test_acc_none", y="test_acc", hue="clip", style="activation", ax=axes[2])
        axes[2].plot([0, 1], [0, 1], "k--", lw=0.8)
        sns.move_legend(axes[2], "center left", bbox_to_anchor=(1.02, 0.5), frameon=False, fontsize=7)
    axes[2].set(title="test accuracy: clipped vs not", xlabel="without clipping", ylabel="with clipping",
                xlim=(0, 1), ylim=(0, 1))
    return encode(fig, "clipping", "Gradient clipping")
