"""A page per run: the evidence behind a summary row (gradient flow, layer x step, histograms,
curves, diagnosis), so that a reader can go from the table to what the run did."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
from markupsafe import Markup

from ..results import SUMMARY_POINTS, thin_steps
from . import svg


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


def log10_array(values) -> np.ndarray:
    """log10 of the values as floats, NaN where that is not finite (0, negative, inf)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log10(np.asarray(values, dtype=float))
    out[~np.isfinite(out)] = np.nan
    return out


def log10(values: pd.Series) -> pd.Series:
    """log10_array of a column, as a column (same index)."""
    return pd.Series(log10_array(values), index=values.index, name=values.name)


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


@dataclass(frozen=True)
class RunFigure:
    key: str
    caption: str
    svg: Markup  # inline SVG (svg.document), safe to place in the page as it is


WIDTH, HEIGHT = 1100, 580  # the drawing's size in CSS pixels (it scales down with the page)
LINES = ["#3b75af", "#ef8636", "#519e3e"]  # first, middle and last step


def run_figure(run: pd.Series, table: pd.DataFrame, hist: dict | None) -> RunFigure:
    """Top: gradient flow at the first, middle and last step; log10 ||dL/dh|| per layer and step;
    training curves. Bottom: the gradient histograms. Hand-drawn SVG (svg.py): a page per run must
    cost milliseconds, and matplotlib took 0.8 s of a core for these eight axes."""
    thinned = thin(table)  # of a summary table: the steps at which it has every layer
    top, bottom = 40, 340
    parts = [_flow(thinned, top), *where_and_when(thinned, 400, top, "where and when"), *_training(thinned, top)]
    histograms = hist is not None and len(hist["steps"]) > 0
    if histograms:
        parts += histogram_row(hist, 70, bottom)
    drawing = svg.document(WIDTH, HEIGHT if histograms else bottom - 40, parts,
                           f"gradient statistics of run {run.run_name}")
    return RunFigure(f"run-{slug(str(run.run_name))}",
                     "Top: log10 norm of dL/dh per layer at the first, middle and last step (drawn wide to narrow, "
                     "so lines that coincide show as bands); the same for every "
                     "layer and step; training loss (log scale where it spans more than a decade) and accuracy. "
                     "Bottom: the share of each layer's weight-gradient entries in each bin of log10|dL/dW| at the "
                     "first, middle and last step (one colour scale for the three); the leftmost bin holds "
                     "everything below 1e-12, exact zeros included.", Markup(drawing))


# A page is drawn from numpy arrays of its table's columns: pandas' selections and pivots cost more
# than the drawing itself, a thousand pages over.


def _flow(thinned: pd.DataFrame, top: float) -> str:
    step, layer = thinned.step.to_numpy(), thinned.layer.to_numpy()
    norm = log10_array(thinned.backprop_norm)
    recorded = np.unique(step)
    steps = sorted({int(recorded[0]), int(recorded[len(recorded) // 2]), int(recorded[-1])})
    lines = []
    for at in steps:
        rows = np.flatnonzero(step == at)
        rows = rows[np.argsort(layer[rows], kind="stable")]
        lines.append((layer[rows], norm[rows]))
    panel = svg.Panel(70, top, 250, 200, svg.limits(layer), svg.limits(np.concatenate([n for _, n in lines])))
    # wide to narrow, so that coinciding lines stay seen
    for (xs, ys), colour, width in zip(lines, LINES, (4.5, 3.0, 1.6)):
        panel.line(xs, ys, colour, width=width, dots=True)
    panel.frame("log10 ||dL/dh|| per layer", "layer (0 = input side)", "log10 norm", integer_x=True)
    panel.legend([(f"step {at}" + ("" if np.isfinite(ys).any() else " (no finite value)"), colour)
                  for at, (_, ys), colour in zip(steps, lines, LINES)])  # a diverged run's last step may have none
    return panel.svg()


def where_and_when(thinned: pd.DataFrame, left: float, top: float, title: str) -> list[str]:
    """log10 ||dL/dh|| per layer (rows, 0 at the bottom) and step (columns) in magma, a 260 x 200 px
    panel at (left, top), its colour bar on the right (together 340 px wide)."""
    layer = thinned.layer.to_numpy(dtype=int)
    steps, column = np.unique(thinned.step.to_numpy(), return_inverse=True)
    cells = np.full((layer.max() + 1, len(steps)), np.nan)
    cells[layer, column] = log10_array(thinned.backprop_norm)
    lo, hi = svg.limits(cells, pad=0)
    x0, x1 = steps.min() - 0.5, steps.max() + 0.5
    panel = svg.Panel(left, top, 260, 200, (x0, x1), (-0.5, len(cells) - 0.5))
    panel.image(cells, (x0, x1, -0.5, len(cells) - 0.5), "magma", lo, hi)
    panel.frame(title, "step", "layer", integer_x=True, integer_y=True)
    return [panel.svg(), svg.colour_bar(left + 272, top, 200, "magma", lo, hi, "log10 ||dL/dh||")]


def _training(thinned: pd.DataFrame, top: float) -> list[str]:
    first = thinned.layer.to_numpy() == 0  # layer 0's row carries the step's loss and accuracy
    step = thinned.step.to_numpy()[first]
    loss, acc = thinned.loss.to_numpy(dtype=float)[first], thinned.acc.to_numpy(dtype=float)[first]
    finite = np.isfinite(loss) & (loss > 0)
    log = finite.any() and loss[finite].max() / loss[finite].min() > 10  # a diverging run's 1e18 must not flatten the rest
    shown = log10_array(loss[finite]) if log else loss[finite]
    xlim = svg.limits(step)
    panel = svg.Panel(850, top, 160, 200, xlim, svg.limits(shown))
    panel.line(step[finite], shown, "#3b75af")
    panel.frame("training", "step", "train loss" + (" (log)" if log else ""), integer_x=True, log_y=log,
                ylabel_colour="#3b75af")
    accuracy = svg.Panel(850, top, 160, 200, xlim, (0.0, 1.0))
    accuracy.line(step, acc, "#d1495b")
    accuracy.frame(ylabel="train accuracy", side="right", ylabel_colour="#d1495b", xaxis=False)
    return [panel.svg(), accuracy.svg()]


HISTOGRAM_STEP = 310  # px from one histogram panel to the next


def histogram_row(hist: dict, left: float, top: float, xlabel: bool = True) -> list[str]:
    """One 230 x 180 px panel per recorded step from (left, top): for each layer (rows), the share of
    its weight-gradient entries in each bin of log10|dL/dW| (columns), on one colour scale for the
    run's steps, its bar after the last panel."""
    shares, edges = histogram_shares(hist)
    vmax = float(shares.max()) or 1.0
    parts = []
    for i, (step, share) in enumerate(zip(hist["steps"], shares)):
        extent = (float(edges[0]), float(edges[-1]), -0.5, share.shape[0] - 0.5)
        panel = svg.Panel(left + HISTOGRAM_STEP * i, top, 230, 180, extent[:2], extent[2:])
        panel.image(share, extent, "viridis", 0.0, vmax)
        panel.frame(f"step {int(step)}", "log10 |dL/dW|" if xlabel else "", "layer" if i == 0 else "", integer_y=True)
        parts.append(panel.svg())
    parts.append(svg.colour_bar(left + HISTOGRAM_STEP * len(hist["steps"]) - 60, top, 180, "viridis", 0.0, vmax,
                                "share of the layer's entries"))
    return parts
