"""The summary figures that seaborn and matplotlib draw, as PNGs at 2x: final accuracy heatmaps,
remedies side by side, clipping (papers.py draws a reproduction's); and the legibility check that
every such figure passes in the tests. A report imports this module only in its seaborn process
(workers.py), which imports it while the report reads MLflow: seaborn, scipy and pyplot take ~2 s."""

from __future__ import annotations

import base64
import io

import matplotlib
import matplotlib.lines
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ..config import pair_keys
from .figures import Figure, IllegibleFigure
from .runpage import log10, thin

# A clipped run and "the same configuration but for clipping"
CLIP_PAIR_KEYS = pair_keys("clip", "clip_threshold")
DPI = 80  # CSS pixels per inch of figure; PNGs are drawn at twice that, so they stay sharp when zoomed
FIGURE_CHECKS: list = []  # functions called on every figure before it is encoded (the tests add check_legible)


def _encode(fig: plt.Figure) -> tuple[str, int]:
    """The figure as a base64 PNG at 2x, and its width in CSS pixels. One laid out by constrained
    layout already fits what it draws; any other is cropped to it (bbox "tight": one more draw)."""
    for check in FIGURE_CHECKS:
        check(fig)
    buf = io.BytesIO()
    tight = fig.get_layout_engine() is None
    fig.savefig(buf, format="png", dpi=2 * DPI, bbox_inches="tight" if tight else None)
    plt.close(fig)
    png = buf.getvalue()
    width = int.from_bytes(png[16:20], "big")  # the IHDR chunk
    return base64.b64encode(png).decode("ascii"), width // 2


def _texts(fig: plt.Figure) -> list:
    """Every text element that is drawn: titles, axis labels, the tick labels in view, legends,
    annotations (not findobj's: that also returns the labels of ticks outside the view)."""
    found = list(fig.texts)
    for legend in fig.legends:
        found += [legend.get_title(), *legend.get_texts()]
    for ax in fig.axes:
        found += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            slack = 1e-9 * max(abs(lo), abs(hi), 1.0)
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if lo - slack <= tick.get_loc() <= hi + slack:
                    found += [tick.label1, tick.label2]
        if ax.get_legend() is not None:
            found += [ax.get_legend().get_title(), *ax.get_legend().get_texts()]
    return [t for t in found if t.get_visible() and t.get_text().strip()]


def check_legible(fig: plt.Figure) -> None:
    """No two text elements overlap (from the extents matplotlib renders), none is cut off by the
    edge of a figure that is not cropped, and no axis whose data spans more than 3 orders of
    magnitude is linear. Raises IllegibleFigure naming the culprits."""
    fig.draw_without_rendering()  # lays the figure out (constrained layout) as saving it will
    renderer = fig.canvas.get_renderer()
    # a figure that _encode does not crop to what it draws (constrained layout) must hold every text
    uncropped, edge = fig.get_layout_engine() is not None, fig.bbox.padded(1)
    boxes = []
    for text in _texts(fig):
        box = text.get_window_extent(renderer)
        if box.width > 0 and box.height > 0:
            boxes.append((text, box.shrunk(0.96, 0.9)))  # touching edges are fine
            if uncropped and not (edge.contains(box.x0, box.y0) and edge.contains(box.x1, box.y1)):
                raise IllegibleFigure(f"text {text.get_text()!r} is cut off by the figure's edge")
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1 :]:
            if box_a.overlaps(box_b):
                raise IllegibleFigure(f"text {a.get_text()!r} overlaps {b.get_text()!r}")
    for ax in fig.axes:
        for axis in ("y", "x"):
            scale = ax.get_yscale() if axis == "y" else ax.get_xscale()
            values = _data_values(ax, axis)
            if scale == "linear" and values.size and (values > 0).all() and values.max() / values.min() > 1e3:
                raise IllegibleFigure(f"{ax.get_title()!r}: {axis} spans {values.max() / values.min():.0e}, not log")


def _data_values(ax, axis: str) -> np.ndarray:
    """The finite data values in view on an axis, from its lines and scatter points."""
    values = []
    for line in ax.get_lines():
        data = line.get_ydata() if axis == "y" else line.get_xdata()
        values.append(np.asarray(data, dtype=float).ravel())
    for collection in ax.collections:
        offsets = np.asarray(collection.get_offsets(), dtype=float)
        if offsets.ndim == 2 and offsets.shape[1] == 2 and len(offsets):
            values.append(offsets[:, 1 if axis == "y" else 0])
    if not values:
        return np.array([])
    flat = np.concatenate(values)
    lo, hi = sorted(ax.get_ylim() if axis == "y" else ax.get_xlim())
    return flat[np.isfinite(flat) & (flat >= lo) & (flat <= hi)]  # what is in view


ANNOTATED_CELLS = 400  # a heatmap panel prints its values up to this many cells (beyond, the colour says it)


def accuracy_heatmaps(runs: pd.DataFrame) -> Figure | None:
    if runs.empty:
        return None
    clips = sorted(runs["clip"].unique(), key=lambda c: (c != "none", c))
    rows = runs.groupby(["activation", "setup"]).ngroups
    fig, axes = plt.subplots(1, len(clips), figsize=(2.4 + 2.6 * len(clips), 1.2 + 0.32 * rows), squeeze=False,
                             layout="constrained")
    index = runs.groupby(["activation", "setup"]).size().index  # the same rows in every panel
    depths = sorted(runs.depth.unique())
    for i, (ax, clip) in enumerate(zip(axes[0], clips)):
        table = runs[runs["clip"] == clip].pivot_table(index=["activation", "setup"], columns="depth", values="test_acc")
        table = table.reindex(index=index, columns=depths)
        # the row labels once, on the first panel: drawn on every panel they overlap the neighbour's cells
        sns.heatmap(table, annot=table.size <= ANNOTATED_CELLS, fmt=".2f", vmin=0, vmax=1, cmap="viridis", cbar=False, ax=ax,
                    annot_kws={"fontsize": 7}, yticklabels=i == 0)
        ax.set_title(f"clip = {clip}")
        ax.set_ylabel("activation - init [+ norm, residual]" if i == 0 else "")
    return Figure("accuracy", "Final test accuracy",
                  "Mean final test accuracy over seeds, per activation and init with its normalization and "
                  "residual remedies if any (rows), and depth (columns), one panel per clip setting; a blank cell "
                  "is not in the grid. Look for the cells that fall to chance (0.10) as depth grows, and for the "
                  "remedy that brings them back.", *_encode(fig))


def remedies(runs: pd.DataFrame) -> Figure | None:
    """The four families side by side on the deepest nets: init, clipping, normalization, residual."""
    if runs.empty or not (runs.remedy != "").any():
        return None
    depth = runs.depth.max()
    deep = runs[runs.depth == depth].copy()
    clip = np.where(deep["clip"] == "none", "", ", clip " + deep["clip"] + " " + deep.clip_threshold.map("{:g}".format))
    deep["remedies"] = deep.setup + clip
    order = (deep.assign(key=list(zip(deep.remedy != "", deep["clip"] != "none", deep.setup)))
             .sort_values("key").remedies.unique().tolist())
    deep["log10 first/last"] = log10(deep.first_last_ratio)
    fig, axes = plt.subplots(1, 2, figsize=(11, 1.4 + 0.3 * len(order)), sharey=True, layout="constrained")
    for ax, column in zip(axes, ["log10 first/last", "test_acc"]):
        sns.stripplot(data=deep, x=column, y="remedies", hue="activation", order=order, ax=ax, size=6, jitter=False,
                      dodge=False, legend=ax is axes[-1])
        ax.grid(axis="x", alpha=0.3)
    axes[0].axvline(0, color="black", linewidth=0.8)
    for x in (-2, 2):  # the diagnosis thresholds (vanishing_ratio 1e-2, exploding_ratio 1e2)
        axes[0].axvline(x, color="#d1495b", linewidth=0.8, linestyle="--")
    axes[0].set(xlabel="log10 ||dL/dh|| first layer / last layer, step 0", ylabel="")
    axes[1].set(xlabel="final test accuracy", xlim=(0, 1))
    if axes[1].get_legend() is not None:
        sns.move_legend(axes[1], "center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    return Figure("remedies", f"Remedies side by side (depth {depth})",
                  "Each row is one combination of remedies on the deepest nets of the grid: the init, with "
                  "normalization (BatchNorm, LayerNorm) and residual blocks (fixed scale or SkipInit) where a run "
                  "has them, and gradient clipping. Left: how much larger the error signal is at the first layer "
                  "than at the last at initialization (0: level; beyond the red dashed lines at -2 and +2 the run "
                  "is diagnosed vanishing or exploding). Right: final test accuracy. Colour = activation; one dot "
                  "per seed. Runs without a finite ratio (diverged at step 0) are left out of the left panel.",
                  *_encode(fig))


def clipping(layers: pd.DataFrame, runs: pd.DataFrame) -> Figure | None:
    clipped = runs[runs["clip"] != "none"]
    if clipped.empty:
        return None
    per_step = layers[layers.layer == 0]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), layout="constrained")
    norms = thin(per_step[per_step["clip"] != "none"])
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
    active = per_step[per_step["clip"] != "none"].groupby(["run_id", "clip", "activation"]).clip_active.mean().reset_index()
    sns.barplot(data=active, x="activation", y="clip_active", hue="clip", errorbar=("pi", 100), ax=axes[1])
    axes[1].set(title="fraction of steps clipped", ylabel="fraction", ylim=(0, 1))
    if active.activation.nunique() > 4:  # eight names side by side run into each other
        axes[1].tick_params(axis="x", rotation=45)
    pairs = clipped.merge(runs[runs["clip"] == "none"], on=CLIP_PAIR_KEYS, suffixes=("", "_none"))
    if not pairs.empty:
        sns.scatterplot(data=pairs, x="test_acc_none", y="test_acc", hue="clip", style="activation", ax=axes[2])
        axes[2].plot([0, 1], [0, 1], "k--", lw=0.8)
        sns.move_legend(axes[2], "center left", bbox_to_anchor=(1.02, 0.5), frameon=False, fontsize=7)
    axes[2].set(title="test accuracy: clipped vs not", xlabel="without clipping", ylabel="with clipping",
                xlim=(0, 1), ylim=(0, 1))
    return Figure("clipping", "Gradient clipping",
                  "Left: global gradient norm before (solid) and after (dashed) clipping, colour = clip mode "
                  "(norm: the global L2 norm is clipped; value: each element; agc: each unit). Middle: how often the "
                  "clip was active, the mean over runs (the black line: from the least to the most clipped run). Right: each clipped run against the same configuration without clipping; points "
                  "above the diagonal are runs that clipping helped.", *_encode(fig))


def warm_up() -> None:
    """Draw and encode a small figure once: a process's first figure loads fonts and the Agg
    backend (~0.5 s), which a drawing worker does while the report reads MLflow."""
    fig, ax = plt.subplots(figsize=(2, 1), layout="constrained")
    ax.plot([0, 1], [0, 1])
    ax.set(title="warm-up", xlabel="x", ylabel="y")
    fig.savefig(io.BytesIO(), format="png", dpi=2 * DPI)
    plt.close(fig)
