"""What a report's figure is, and what the figure modules share: the Figure a template places (its
caption is the template's, keyed by the figure's key), the PNG encoding at 2x, the legibility check
the tests run on every figure, and the selections several figures make. The figure modules
(init_figures, training_figures, grid_figures, papers) import this one; it imports none of them.
pyplot is imported where a figure is closed, not here: the report's own process imports this."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..results import SUMMARY_POINTS, thin_steps

DPI = 80  # CSS pixels per inch of figure; PNGs are drawn at twice that, so they stay sharp when zoomed
FIGURE_CHECKS: list = []  # functions called on every figure before it is encoded (the tests add check_legible)
# matplotlib's and seaborn's default colours (tab10), a colour per key in order, over again beyond ten
TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
DIVERGED = "#d1495b"  # a diverged run's mark
SETUP = "init [+ norm, residual]"  # what the colours of the per-layer and per-step figures are


@dataclass(frozen=True)
class Figure:
    key: str  # its id in the page, and which caption the template writes under it
    title: str
    png_base64: str  # a PNG at 2x
    width: int  # CSS pixels: half the PNG's width
    notes: str = ""  # what the caption adds for this grid's data (left out runs, measured errors)


class IllegibleFigure(AssertionError):
    """Two text elements of a figure overlap, one is cut off by its edge, or an axis spans decades on
    a linear scale."""


def palette(keys) -> dict:
    return {key: TAB10[i % len(TAB10)] for i, key in enumerate(keys)}


def encode(fig, key: str, title: str, notes: str = "") -> Figure:
    """The matplotlib figure as a Figure: a PNG at 2x, after FIGURE_CHECKS, saved as laid out (by
    constrained layout, or by a fixed one: never cropped, which would cost one more draw). The
    matplotlib figure is closed."""
    import matplotlib.pyplot as plt

    for check in FIGURE_CHECKS:
        check(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=2 * DPI)
    plt.close(fig)
    png = buf.getvalue()
    width = int.from_bytes(png[16:20], "big")  # the IHDR chunk
    return Figure(key, title, base64.b64encode(png).decode("ascii"), width // 2, notes)


def warm_up() -> None:
    """Draw and encode a small figure once: a process's first figure loads fonts and the Agg backend
    (~0.5 s), which a drawing process does while the report reads MLflow."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1), layout="constrained")
    ax.plot([0, 1], [0, 1])
    ax.set(title="warm-up", xlabel="x", ylabel="y")
    encode(fig, "warm-up", "")


def _texts(fig) -> list:
    """Every text element that is drawn: titles, axis labels, the tick labels in view, legends,
    annotations (not findobj's: that also returns the labels of ticks outside the view)."""
    found = []
    for owner in [fig, *fig.subfigs]:  # the figure and its subfigures (fig.axes holds theirs too)
        found += owner.texts
        for legend in owner.legends:
            found += [legend.get_title(), *legend.get_texts()]
    for ax in fig.axes:
        found += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        for axis in (ax.xaxis, ax.yaxis):
            scaled = axis.get_transform().transform  # compared where they are drawn (log10 on a log axis)
            lo, hi = sorted(scaled(np.array(axis.get_view_interval(), dtype=float)))
            slack = 1e-9 * max(abs(lo), abs(hi), 1.0)
            ticks = axis.get_major_ticks() + axis.get_minor_ticks()
            places = scaled(np.array([tick.get_loc() for tick in ticks], dtype=float)) if ticks else []
            found += [label for tick, at in zip(ticks, places) if lo - slack <= at <= hi + slack
                      for label in (tick.label1, tick.label2)]
        if ax.get_legend() is not None:
            found += [ax.get_legend().get_title(), *ax.get_legend().get_texts()]
    return [t for t in found if t.get_visible() and t.get_text().strip()]


def check_legible(fig) -> None:
    """No two text elements overlap (from the extents matplotlib renders), none is cut off by the
    figure's edge (encode saves it as laid out, uncropped), and no axis whose data spans more than 3
    orders of magnitude is linear (a magnitude: data bounded by 1, a correlation, a share or an
    accuracy, is read from 0 on a linear axis). Raises IllegibleFigure naming the culprits."""
    fig.draw_without_rendering()  # lays the figure out as saving it will
    renderer = fig.canvas.get_renderer()
    edge = fig.bbox.padded(1)
    boxes = []
    for text in _texts(fig):
        box = text.get_window_extent(renderer)
        if box.width > 0 and box.height > 0:
            boxes.append((text, box.shrunk(0.96, 0.9)))  # touching edges are fine
            if not (edge.contains(box.x0, box.y0) and edge.contains(box.x1, box.y1)):
                raise IllegibleFigure(f"text {text.get_text()!r} is cut off by the figure's edge")
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1 :]:
            if box_a.overlaps(box_b):
                raise IllegibleFigure(f"text {a.get_text()!r} overlaps {b.get_text()!r}")
    for ax in fig.axes:
        for axis in ("y", "x"):
            scale = ax.get_yscale() if axis == "y" else ax.get_xscale()
            values = _data_values(ax, axis)
            if scale == "linear" and values.size and (values > 0).all() and values.max() > 1 \
                    and values.max() / values.min() > 1e3:
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


def thin(per_step: pd.DataFrame) -> pd.DataFrame:
    """Keep at most SUMMARY_POINTS evenly spaced steps (the same steps for every run). Of a run's
    summary table (results.summary_table): the steps at which it holds every layer."""
    return per_step[per_step.step.isin(thin_steps(per_step.step.to_numpy(), SUMMARY_POINTS))]


def histogram_shares(hist: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(shares, edges) of a run's gradients/histograms.npz: for each step and layer, the share of its
    weight-gradient entries in each bin of log10|dL/dW|, cut to the bins where something fell."""
    edges = hist["log10_abs_grad_edges"]
    counts = hist["counts"].astype(float)  # (steps, layers, bins)
    shares = counts / np.maximum(counts.sum(axis=2, keepdims=True), 1)
    used = np.flatnonzero(counts.sum(axis=(0, 1)))
    lo, hi = (used.min(), used.max() + 1) if used.size else (0, len(edges) - 1)
    return shares[:, :, lo:hi], edges[lo : hi + 1]


def is_mlp(runs: pd.DataFrame) -> pd.Series:
    """Which runs are MLPs: arch mlp, or no arch (recorded before recurrent nets existed). The
    depth-wise figures draw these only (a recurrent run's depth means nothing)."""
    if "arch" not in runs:
        return pd.Series(True, index=runs.index)
    return runs["arch"].fillna("mlp") == "mlp"


def deepest(layers: pd.DataFrame) -> tuple[int, pd.DataFrame]:
    """The deepest nets of the grid, at one clip setting (none where there is one): the rows the
    gradient-flow, signal and training-curve figures compare across activations and inits."""
    clip = "none" if (layers["clip"] == "none").any() else layers["clip"].iloc[0]
    depth = layers.depth.max()
    return int(depth), layers[(layers.depth == depth) & (layers["clip"] == clip)]


# a facet grid's geometry, in inches: a fixed layout costs one draw where constrained layout costs
# two (measured: 1.4 s against 2.6 s for ten panels); the tests' legibility check holds it to its edges
PANEL_W, PANEL_H = 2.2, 1.6  # one panel's axes
GAP_X, GAP_Y = 0.22, 0.42  # between panels (y: the row below's titles; shared axes label the outer panels only)
LEFT, BOTTOM, TOP = 0.85, 0.55, 0.3  # y tick labels and label; x tick labels and label; the first row's titles


def facet_grid(rows: int, columns: int, legend: list[str]):
    """(fig, axes[rows][columns]): panels sharing x (every panel) and y (each row) in a fixed layout,
    with room on the right for a legend of `legend`'s texts (legend_right)."""
    import matplotlib.pyplot as plt

    room = 0.7 + 0.062 * max(map(len, legend), default=0)  # a legend's key and its texts at 8 pt
    width = LEFT + columns * PANEL_W + (columns - 1) * GAP_X + room
    height = TOP + rows * PANEL_H + (rows - 1) * GAP_Y + BOTTOM
    fig, axes = plt.subplots(rows, columns, figsize=(width, height), sharex=True, sharey="row", squeeze=False)
    fig.subplots_adjust(left=LEFT / width, right=1 - room / width, bottom=BOTTOM / height, top=1 - TOP / height,
                        wspace=GAP_X / PANEL_W, hspace=GAP_Y / PANEL_H)
    return fig, axes


def legend_right(fig, handles: list, labels: list[str], title: str) -> None:
    """One legend for the whole figure, right of a facet grid's panels, at the top."""
    corner = (fig.subplotpars.right + 0.1 / fig.get_figwidth(), fig.subplotpars.top)  # 0.1 in right of the panels
    fig.legend(handles, labels, title=title, loc="upper left", bbox_to_anchor=corner, frameon=False, fontsize=8,
               title_fontsize=8, alignment="left")
