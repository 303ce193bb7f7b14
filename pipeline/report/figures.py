"""The report's summary figures. Each function returns a Figure (title, caption, and an inline SVG
or PNG), or None when the grid has nothing to show for it (e.g. no clipped runs). The line-panel
and heatmap figures are hand-drawn SVG (facets.py, svg.py): sharp at any zoom, and milliseconds
where matplotlib's layout of fifteen axes took seconds; the others are seaborn/matplotlib PNGs at 2x."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import matplotlib
import matplotlib.lines
import matplotlib.pyplot as plt
import matplotlib.text
import matplotlib.ticker
import numpy as np
import pandas as pd
import seaborn as sns
from markupsafe import Markup

from .. import theory
from ..config import FIELDS, from_dict, pair_keys
from ..diagnosis import LABELS
from . import svg
from .facets import Cell, Line, Row, facets, hexes, mean_series
from .runpage import HISTOGRAM_STEP, histogram_row, log10, thin, where_and_when

DIAGNOSIS_COLORS = dict(zip(LABELS, ["#4c9a2a", "#3b75af", "#d1495b", "#6a3d9a", "#7f7f7f", "#edae49"]))
# A clipped run and "the same configuration but for clipping"
CLIP_PAIR_KEYS = pair_keys("clip", "clip_threshold")


DPI = 80  # CSS pixels per inch of figure; PNGs are drawn at twice that, so they stay sharp when zoomed


@dataclass(frozen=True)
class Figure:
    key: str
    title: str
    caption: str
    png_base64: str  # a PNG at 2x, or "" where the figure is an SVG drawing
    width: int = 0  # CSS pixels: half the PNG's width, the drawing's width
    svg: Markup = Markup("")  # an inline SVG drawing (svg.document), safe to place in the page as it is


def _svg_figure(key: str, title: str, caption: str, drawing: str) -> Figure:
    width = int(re.search(r'width="(\d+)"', drawing).group(1))  # the <svg> element's, the first in it
    return Figure(key, title, caption, "", width, Markup(drawing))


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


class IllegibleFigure(AssertionError):
    """Two text elements of a figure overlap, or an axis spans decades on a linear scale."""


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


def check_panel(panel: svg.Panel, log_y: bool) -> None:
    """The decades rule for an SVG panel (svg.CHECKS): its y values, if all positive, span at most 3
    orders of magnitude on a linear axis. (Overlapping texts of the SVG figures are found in Chromium.)"""
    values = np.concatenate(panel.ys) if panel.ys else np.array([])
    lo, hi = sorted(panel.ylim)
    values = values[(values >= lo) & (values <= hi)]
    if not log_y and values.size and (values > 0).all() and values.max() / values.min() > 1e3:
        raise IllegibleFigure(f"SVG panel at ({panel.x}, {panel.y}): y spans {values.max() / values.min():.0e}, "
                              "not log")


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


def _deepest(layers: pd.DataFrame) -> tuple[int, pd.DataFrame]:
    """The deepest nets of the grid, at one clip setting (none where there is one): the rows the
    gradient-flow, signal and training-curve figures compare across activations and inits."""
    clip = "none" if (layers["clip"] == "none").any() else layers["clip"].iloc[0]
    depth = layers.depth.max()
    return depth, layers[(layers.depth == depth) & (layers["clip"] == clip)]


def mean_lines(ax, frame: pd.DataFrame, x: str, y: str, hue: str, palette: dict, **line) -> None:
    """facets.mean_series drawn by matplotlib: a line per hue, a band of one standard deviation
    where several rows share an x."""
    for series in mean_series(frame, x, y, hue, palette):
        colour = palette[series.key]
        ax.plot(series.x, series.y, color=colour, label=series.key, **line)
        if series.sd is not None:
            ax.fill_between(series.x, series.y - series.sd, series.y + series.sd, color=colour, alpha=0.2, linewidth=0)


DOTTED = (0, (1.5, 1.5))  # the style of every theory line


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


def gradient_flow(layers: pd.DataFrame, runs: pd.DataFrame) -> Figure | None:
    if layers.empty:
        return None
    depth, deepest = _deepest(layers)
    start = deepest[deepest.step == 0]
    # SkipInit's blocks get exactly zero gradient at step 0 (alpha = 0): no line to draw (a line
    # over the missing log10(0) would join the first layer to the last and look level)
    silent = sorted(start[start.backprop_norm == 0].setup.unique())
    start = start[~start.setup.isin(silent)]
    if start.empty:
        return None
    inits = sorted(start.setup.unique())
    palette = dict(zip(inits, hexes(sns.color_palette(n_colors=len(inits)))))
    activations = sorted(start.activation.unique())
    rows = []
    for column, name in [("backprop_norm", "||dL/dh||"), ("weight_grad_norm", "||dL/dW||")]:
        logs = start.assign(v=log10(start[column]))
        rows.append(Row("log10 norm", [Cell(f"{name} - {activation}",
                                            mean_series(logs[logs.activation == activation], "layer", "v", "setup", inits))
                                       for activation in activations]))
    errors: dict[str, list[str]] = {}  # activation -> "init: error" notes, for the caption
    for activation, cell in zip(activations, rows[0].cells):
        for init in inits:
            config_rows = start[(start.activation == activation) & (start.setup == init)]
            line = theory_line(config_rows, runs)
            if line is None:
                continue
            cell.predictions.append(Line(init, *line))
            error = config_rows.groupby("run_id").slope_error.first().mean()  # the logged theory/slope_error
            if np.isfinite(error):
                errors.setdefault(activation, []).append(f"{init} {error:+.2f}")
    drawing = facets("gradient-flow", rows, "layer", palette, "init [+ norm, residual]",
                     "log10 gradient norm per layer at step 0, measured and predicted", prediction="mean-field prediction")
    table = "; ".join(f"{activation}: {', '.join(notes)}" for activation, notes in errors.items())
    worst = f" Measured minus predicted slope of ln||dL/dh|| per layer: {table}." if errors else ""
    if silent:
        worst += (f" Left out: {', '.join(silent)}, whose residual blocks receive exactly zero gradient at step 0 "
                  "(alpha = 0 at init); their run pages show the later steps.")
    return _svg_figure("gradient-flow", f"Gradient flow at initialization (depth {depth})",
                       "log10 norm of the error signal dL/dh (top) and of the weight gradient dL/dW (bottom) per layer "
                       "at step 0, layer 0 next to the input, colour = init and, where a run has them, its "
                       "normalization and residual remedies (Glorot & Bengio's picture); the mean over seeds (and "
                       "widths), with a band of one standard deviation where there are several. A line that "
                       "falls towards layer 0 is a vanishing gradient; one that rises is an exploding gradient; flat "
                       "is what a good init achieves. Black dotted with crosses: the mean-field prediction "
                       "(pipeline/theory.py) for the hidden layers, anchored at the last hidden layer's measured "
                       "value." + worst, drawing)


def theory_line(rows: pd.DataFrame, runs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray] | None:
    """Predicted log10 ||dL/dz|| over the hidden layers of one config's runs (step 0), from the
    finite-depth mean-field profile, anchored at the mean measured value of the last hidden layer.
    None where theory makes no prediction (see theory._mean_field_holds; SkipInit at init)."""
    if rows.empty:
        return None
    run = runs[runs.run_id == rows.run_id.iloc[0]].iloc[0]
    values = {k: (v.item() if hasattr(v, "item") else v) for k, v in run.items() if k in FIELDS}
    prediction = theory.predict(from_dict(values))
    last_hidden = int(rows.layer.max()) - 1
    anchor = log10(rows[rows.layer == last_hidden].backprop_norm).mean()
    profile = np.array(prediction.log_norms[: last_hidden + 1]) / np.log(10)
    if not np.isfinite(anchor) or len(profile) == 0 or not np.all(np.isfinite(profile)):
        return None
    return np.arange(len(profile)), anchor + profile


MIN_STEPS = 10  # a run must have lasted this many steps to be picked for the over-time figures


def telling_runs(runs: pd.DataFrame) -> list[tuple[str, pd.Series]]:
    """The most vanishing, the most exploding, and the best healthy run, among the runs that lasted
    (a run that diverged at step 0 has no "when" to show)."""
    candidates = runs[runs.steps >= min(MIN_STEPS, runs.steps.max())] if len(runs) else runs
    picks: list[tuple[str, pd.Series]] = []
    ratio = candidates.first_last_ratio.replace([np.inf, -np.inf], np.nan)
    if ratio.notna().any():
        low, high = candidates.loc[ratio.idxmin()], candidates.loc[ratio.idxmax()]
        if low.first_last_ratio < 1:
            picks.append(("most vanishing", low))
        if high.first_last_ratio > 1:
            picks.append(("most exploding", high))
    healthy = candidates[candidates.diagnosis == "healthy"]
    if not healthy.empty:
        picks.append(("best healthy", healthy.loc[healthy.test_acc.idxmax()]))
    return picks


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


@dataclass(frozen=True)
class Pick:
    """A telling run with what the over-time figures draw of it."""

    label: str  # "most vanishing", ...
    run: pd.Series  # its row of the runs table
    table: pd.DataFrame | None  # its summary table (results.summary_table)
    histograms: dict[str, np.ndarray] | None  # its gradients/histograms.npz


def layer_step_heatmaps(picks: list[Pick]) -> Figure | None:
    picks = [p for p in picks if p.table is not None and not p.table.empty]
    if not picks:
        return None
    parts = []
    for i, pick in enumerate(picks):
        left, rows = 70 + 400 * i, thin(pick.table)
        name = str(pick.run.run_name)
        if pick.run.outcome == "diverged":
            name += f" (diverged: last step {int(rows.step.max())})"
        parts += [svg._text(left + 130, 18, f"{pick.label}:", weight="bold"), svg._text(left + 130, 34, name),
                  *where_and_when(rows, left, 50, "")]
    drawing = svg.document(70 + 400 * len(picks) - 20, 300, parts, "log10 ||dL/dh|| per layer and step of the telling runs")
    return _svg_figure("layer-step", "Where and when gradients vanish or explode",
                       f"log10 norm of dL/dh for each layer (rows, 0 = input side) and step (columns), for the most "
                       f"vanishing, the most exploding and the best healthy run among those that lasted at least "
                       f"{MIN_STEPS} steps, each on its own colour scale. A diverged run is shown up to its last "
                       "recorded step (the first bad one). Dark bands at the bottom are layers that receive no "
                       "learning signal.", drawing)


def training_curves(layers: pd.DataFrame) -> Figure | None:
    if layers.empty:
        return None
    depth, deepest = _deepest(layers)
    per_step = deepest[deepest.layer == 0]
    finite = thin(per_step)
    finite = finite[np.isfinite(finite.loss.astype(float))].astype({"loss": float, "acc": float})
    setups = sorted(finite.setup.unique())
    palette = dict(zip(setups, hexes(sns.color_palette(n_colors=len(setups)))))
    activations = sorted(finite.activation.unique())
    # the loss axis spans the runs that did not diverge; a diverged run's blow-up (1e18) would
    # otherwise set it, and every other curve would be a flat line at its bottom (it is cut at the edge)
    lasting = finite[finite.diagnosis != "diverged"].loss
    lasting = lasting[lasting > 0]
    log = bool(len(lasting)) and lasting.max() / lasting.min() > 10
    shown = (lambda v: np.log10(np.maximum(v, 1e-30))) if log else (lambda v: v)
    ylim = (float(shown(lasting.min() * 0.8)), float(shown(lasting.max() * 1.25))) if len(lasting) else None
    # where each diverged run stopped: its last finite loss, on the top edge when beyond the panel
    stopped = per_step[(per_step.diagnosis == "diverged") & np.isfinite(per_step.loss.astype(float))]
    last = stopped.loc[stopped.groupby("run_id").step.idxmax()] if len(stopped) else stopped
    loss, accuracy = [], []
    for activation in activations:
        found = finite[finite.activation == activation]
        ends = last[last.activation == activation]
        loss.append(Cell(f"loss - {activation}", mean_series(found.assign(v=shown(found.loss)), "step", "v", "setup",
                                                               setups),
                         stops=(ends.step.to_numpy(dtype=float), shown(ends.loss.to_numpy(dtype=float)))))
        accuracy.append(Cell(f"acc - {activation}", mean_series(found, "step", "acc", "setup", setups)))
    marked = len(last) > 0
    drawing = facets("training", [Row("train loss" + (" (log)" if log else ""), loss, log=log, ylim=ylim),
                                  Row("train accuracy", accuracy)], "step", palette, "init [+ norm, residual]",
                     "training loss and accuracy per step", dots=False,
                     extra=[("diverged: last finite loss", "#d1495b", "none", "cross")] if marked else None)
    note = (" A red X marks where each diverged run stopped: its last finite loss, or the top edge of the "
            "panel when that loss is beyond it.") if marked else ""
    return _svg_figure("training", f"Training curves (depth {depth})",
                       "Training loss (on a log scale where it spans more than a decade) and accuracy per step, colour "
                       "= init [+ normalization, residual]; the band is one standard "
                       "deviation over seeds where there are several. Flat curves at loss 2.3 are networks that never "
                       "started to learn." + note, drawing)


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


def outcomes(runs: pd.DataFrame) -> Figure | None:
    if runs.empty:
        return None
    factors = [f for f in ("activation", "init", "depth", "clip") if runs[f].nunique() > 0]
    if (runs.remedy != "").any():
        factors.append("remedy")
        runs = runs.assign(remedy=runs.remedy.replace("", "none"))
    fig, axes = plt.subplots(1, len(factors), figsize=(4.2 * len(factors), 3.6), squeeze=False)
    for i, (ax, factor) in enumerate(zip(axes[0], factors)):
        counts = pd.crosstab(runs[factor], runs.diagnosis).reindex(columns=[l for l in LABELS if l in set(runs.diagnosis)])
        counts.plot.bar(stacked=True, ax=ax, color=[DIAGNOSIS_COLORS.get(c, "#999") for c in counts.columns],
                        legend=i == len(factors) - 1, width=0.8)
        ax.set(title=f"by {factor}", xlabel="", ylabel="runs")
        ax.tick_params(axis="x", rotation=45)
    if len(factors):
        axes[0][-1].legend(title="diagnosis", bbox_to_anchor=(1.02, 1), loc="upper left")
    return Figure("outcomes", "Outcomes",
                  "How many runs were diagnosed healthy, vanishing, exploding, diverged, dead or saturated, by each "
                  "factor of the grid. The rules and thresholds are in the README.", *_encode(fig))


def histograms_over_time(picks: list[Pick]) -> Figure | None:
    picks = [p for p in picks if p.histograms is not None and len(p.histograms["steps"])]
    if not picks:
        return None
    parts, top = [], 20
    for pick in picks:
        parts.append(svg._text(70, top + 12, f"{pick.label}: {pick.run.run_name}", anchor="start", weight="bold"))
        parts += histogram_row(pick.histograms, 70, top + 42, xlabel=pick is picks[-1])
        top += 262
    n_steps = max(len(p.histograms["steps"]) for p in picks)
    drawing = svg.document(70 + HISTOGRAM_STEP * n_steps + 40, top + 20, parts,
                           "gradient histograms of the telling runs at three steps")
    return _svg_figure("histograms", "Gradient histograms over time",
                       "For the most vanishing, the most exploding and the best healthy run (rows), the distribution of "
                       "log10|dL/dW| of each layer (0 = input side) at the first, middle and last step (columns), on "
                       "one colour scale per run (its bar on the right): "
                       "what the MLflow UI cannot show (the leftmost bin holds everything below 1e-12, exact zeros "
                       "included). A vanishing gradient is a layer whose mass sits far to the "
                       "left of the output layer's; a spread that widens over steps is a layer whose units diverge.",
                       drawing)


def signal_propagation(signal: pd.DataFrame | None) -> Figure | None:
    """Forward q and c per hidden layer at step 0 on the deepest nets, measured against the q/c maps."""
    if signal is None or signal.empty:
        return None
    depth, start = _deepest(signal[signal.step == 0])
    if start.empty:
        return None
    setups = sorted(start.setup.unique())
    palette = dict(zip(setups, hexes(sns.color_palette(n_colors=len(setups)))))
    activations = sorted(start.activation.unique())
    rows = []
    for statistic in ["q", "c"]:
        cells = []
        for activation in activations:
            found = start[(start.activation == activation) & (start.statistic == statistic)]
            value = log10(found.measured) if statistic == "q" else found.measured
            cell = Cell(f"{'log10 q' if statistic == 'q' else 'c'} - {activation}",
                        mean_series(found.assign(v=value), "layer", "v", "setup", setups, band=False))
            predicted = found.dropna(subset=["predicted"]).groupby(["setup", "layer"]).predicted.mean().reset_index()
            for setup, line in predicted.groupby("setup"):
                y = log10(line.predicted) if statistic == "q" else line.predicted
                cell.predictions.append(Line(setup, line.layer.to_numpy(dtype=float), y.to_numpy(dtype=float)))
            cells.append(cell)
        c_low = float(start[start.statistic == "c"].measured.min()) if statistic == "c" else 0.0
        rows.append(Row("log10 q (mean z^2)" if statistic == "q" else "c (mean correlation)", cells,
                        ylim=None if statistic == "q" else (min(-0.05, c_low - 0.05), 1.05)))
    drawing = facets("signal", rows, "layer", palette, "init [+ norm, residual]",
                     "forward q and c per layer at step 0, measured and predicted", prediction="q/c-map prediction")
    return _svg_figure("signal", f"Signal propagation at initialization (depth {depth})",
                  "Forward pass at step 0, per hidden layer (0 next to the input): top, q, the mean squared "
                  "pre-activation z (log10); bottom, c, the mean correlation between the z of two different "
                  "examples of the batch. Colour = init [+ normalization, residual]. Black dotted with crosses: "
                  "the q-map and c-map of mean-field theory (Poole et al. 2016, Schoenholz et al. 2017), "
                  "propagated from the batch's measured input (plain nets only: no prediction with "
                  "normalization or residual blocks). c rising to 1 is the ordered phase, where inputs become "
                  "indistinguishable; c falling towards 0 the chaotic one.", drawing)


def gradient_signal(signal: pd.DataFrame | None) -> Figure | None:
    """GSNR per layer at the first and last histogram step on the deepest nets; the zero fraction
    where some layer has exact zeros."""
    if signal is None or signal.empty or "gsnr" not in set(signal.statistic):
        return None
    depth, nets = _deepest(signal[signal.statistic.isin(["gsnr", "zero_fraction"])])
    nets = nets[np.isfinite(nets.measured)]
    if nets.empty or not (nets.statistic == "gsnr").any():
        return None
    setups = sorted(nets.setup.unique())
    palette = dict(zip(setups, hexes(sns.color_palette(n_colors=len(setups)))))
    activations = sorted(nets.activation.unique())
    # each run's first and last recorded histogram step (a diverged run's last is earlier)
    last = nets.groupby("run_id").step.transform("max")
    lower = set(nets.setup[nets.precision != "fp32"])  # drawn dashed: it often lies on its fp32 twin
    panels = [("gsnr", nets.step == 0, "log10 GSNR, step 0"), ("gsnr", (nets.step == last) & (last > 0),
                                                                 "log10 GSNR, last step")]
    zeros = nets[nets.statistic == "zero_fraction"]
    if (zeros.measured > 0.01).any():
        panels.append(("zero_fraction", nets.step == 0, "zero fraction, step 0"))
    rows = []
    for statistic, when, label in panels:
        found = nets[when & (nets.statistic == statistic)]
        found = found.assign(v=log10(found.measured) if statistic == "gsnr" else found.measured)
        rows.append(Row(label, [Cell(activation, mean_series(found[found.activation == activation], "layer", "v",
                                                               "setup", setups, band=False, dashed=lower))
                                for activation in activations],
                        ylim=(-0.05, 1.05) if statistic == "zero_fraction" else None))
    drawing = facets("gradient-signal", rows, "layer", palette, "init [+ norm, residual]",
                     "gradient signal-to-noise ratio per layer")
    return _svg_figure("gradient-signal", f"Gradient signal-to-noise per layer (depth {depth})",
                  "Per layer (0 next to the input) of the deepest nets, the GSNR of dL/dW over one batch "
                  "(log10; Cockpit's MeanGSNR: the mean over W's entries of the squared mean per-example "
                  "gradient over its variance): at step 0 and at the run's last histogram step. A high GSNR is "
                  "a small or large gradient that the examples agree on; a low one is a gradient that is mostly "
                  "noise, whatever its norm. Colour = init [+ normalization, residual], dashed: a precision other "
                  "than fp32 (often on its fp32 twin); seeds averaged; not "
                  "measured with BatchNorm (no per-example gradient)."
                  + (" Last row: the fraction of dL/dW's entries that are exactly 0 at step 0 (dead units, "
                     "inputs that are 0 across the batch, fp16 underflow)." if len(panels) == 3 else ""), drawing)


def jacobian_spectrum(runs: pd.DataFrame) -> Figure | None:
    """The input-output Jacobian at step 0: its mean squared singular value against the theory's,
    run by run, and the spread of its singular values against depth."""
    runs = runs[np.isfinite(runs.jac_mean_sq.astype(float)) & (runs.jac_mean_sq > 0)]
    if runs.empty:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    paired = runs[np.isfinite(runs.jac_mean_sq_pred.astype(float)) & (runs.jac_mean_sq_pred > 0)]
    activations = sorted(runs.activation.unique())
    colours = dict(zip(activations, sns.color_palette(n_colors=len(activations))))
    for activation, rows in paired.groupby("activation"):
        axes[0].scatter(rows.jac_mean_sq_pred, rows.jac_mean_sq, s=16, color=colours[activation], label=activation)
    if len(paired):
        low = float(min(paired.jac_mean_sq_pred.min(), paired.jac_mean_sq.min())) / 2
        high = float(max(paired.jac_mean_sq_pred.max(), paired.jac_mean_sq.max())) * 2
        axes[0].plot([low, high], [low, high], color="black", linestyle=DOTTED, linewidth=1,
                     label="measured = predicted")
        axes[0].legend(fontsize=7, loc="upper left")
    axes[0].set(xscale="log", yscale="log", xlabel="predicted (product of chi_l)", ylabel="measured",
                title="mean squared singular value of J")
    setups = sorted(runs.setup.unique())
    palette = dict(zip(setups, sns.color_palette(n_colors=len(setups))))
    mean_lines(axes[1], runs.astype({"jac_log10_sd": float}), "depth", "jac_log10_sd", "setup", palette, marker="o",
               markersize=4)
    axes[1].set(title="spread of J's singular values", xlabel="depth", ylabel="sd of log10 singular value")
    depths = sorted(runs.depth.unique())
    if depths[-1] > 10 * depths[0]:
        axes[1].set_xscale("log")
        axes[1].minorticks_off()
    axes[1].set_xticks(depths, labels=[str(d) for d in depths])
    axes[1].legend(fontsize=7, title="init [+ norm, residual]", title_fontsize=7, loc="center left",
                   bbox_to_anchor=(1.02, 0.5), frameon=False)
    without = len(paired) < len(runs)
    return Figure("jacobian", "Input-output Jacobian at initialization",
                  "J = dz_{H-1}/dz_0, the last hidden layer's pre-activation against the first's, at 8 inputs of "
                  "the step-0 batch. Left: its mean squared singular value, measured against mean-field theory's "
                  "prediction (the product over layers of chi_l = sigma_w^2 E[phi'(z_l)^2]; Pennington et al. "
                  "2017), one point per run, colour = activation; on the dotted line they agree. Below 1 the "
                  "gradient vanishes through the net, above 1 it explodes. Right: the spread of the singular "
                  "values (sd of log10), the mean over activations, widths and seeds with a band of one standard "
                  "deviation, against depth: a wide spread is what dynamical isometry (orthogonal weights at "
                  "chi = 1) avoids, even where the mean is right."
                  + (" Runs without a prediction (normalization, residual blocks) are on the right only." if without
                     else ""), *_encode(fig))


def figure_tasks(runs: pd.DataFrame, layers: pd.DataFrame, signal: pd.DataFrame | None = None,
                 picks: list[Pick] = ()) -> list[Callable[[], Figure | None]]:
    """Every figure of the summary page, in page order, as a call to make (the report makes them on
    every core); `picks`: the telling runs (telling_runs) with their tables."""
    picks = list(picks)
    return [
        partial(accuracy_heatmaps, runs),
        partial(gradient_flow, layers, runs),
        partial(signal_propagation, signal),
        partial(gradient_signal, signal),
        partial(jacobian_spectrum, runs),
        partial(remedies, runs),
        partial(layer_step_heatmaps, picks),
        partial(histograms_over_time, picks),
        partial(training_curves, layers),
        partial(clipping, layers, runs),
        partial(outcomes, runs),
    ]
