"""A page per run: the evidence behind a summary row (layer x step, histograms, curves, diagnosis;
the run's own logged gradient-flow figure beside them), so that a reader can go from the table to
what the run did."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
from markupsafe import Markup

from ..plots import log10
from . import svg
from .figure import histogram_shares, thin


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


@dataclass(frozen=True)
class RunFigure:
    key: str
    svg: Markup  # inline SVG (svg.document), safe to place in the page as it is; its caption is run.html.j2's
    histograms: bool  # whether it has the histogram row


WIDTH, HEIGHT = 1100, 580  # the drawing's size in CSS pixels (it scales down with the page)


def run_figure(run: pd.Series, table: pd.DataFrame, hist: dict | None, time: pd.DataFrame | None = None) -> RunFigure:
    """Top: log10 ||dL/dh|| per layer and step (a recurrent net's `time`, its time statistics:
    log10 ||dL/dh_t|| per time point and step); training curves. Bottom: the gradient histograms.
    Hand-drawn SVG (svg.py): a page per run must cost milliseconds, and matplotlib took 0.8 s of a
    core for these axes. (The run's gradient flow is its own logged plots/gradient_flow.png.)"""
    thinned = thin(table)  # of a summary table: the steps at which it has every layer
    top, bottom = 40, 340
    if time is not None and not time.empty:
        through = thin(time).rename(columns={"time": "layer", "grad_norm": "backprop_norm"})
        heatmap = where_and_when(through, 70, top, "where and when, through time", "time step t", "log10 ||dL/dh_t||")
    else:
        heatmap = where_and_when(thinned, 70, top, "where and when")
    parts = [*heatmap, *_training(thinned, top)]
    histograms = hist is not None and len(hist["steps"]) > 0
    if histograms:
        parts += histogram_row(hist, 70, bottom)
    drawing = svg.document(WIDTH, HEIGHT if histograms else bottom - 40, parts,
                           f"gradient statistics of run {run.run_name}")
    return RunFigure(f"run-{slug(str(run.run_name))}", Markup(drawing), histograms)


# A page is drawn from numpy arrays of its table's columns: pandas' selections and pivots cost more
# than the drawing itself, a thousand pages over.


def where_and_when(thinned: pd.DataFrame, left: float, top: float, title: str, ylabel: str = "layer",
                   bar: str = "log10 ||dL/dh||") -> list[str]:
    """log10 ||dL/dh|| per layer (rows, 0 at the bottom) and step (columns) in magma, a 260 x 200 px
    panel at (left, top), its colour bar on the right (together 340 px wide). The rows may be evenly
    spaced time points (a recurrent run's 0, 29, ... 783): each row spans its spacing."""
    rows, row = np.unique(thinned.layer.to_numpy(dtype=int), return_inverse=True)
    steps, column = np.unique(thinned.step.to_numpy(), return_inverse=True)
    cells = np.full((len(rows), len(steps)), np.nan)
    cells[row, column] = log10(thinned.backprop_norm)
    lo, hi = svg.limits(cells, pad=0)
    x0, x1 = steps.min() - 0.5, steps.max() + 0.5
    half = (rows[-1] - rows[0]) / (len(rows) - 1) / 2 if len(rows) > 1 else 0.5
    y0, y1 = rows[0] - half, rows[-1] + half
    panel = svg.Panel(left, top, 260, 200, (x0, x1), (y0, y1))
    panel.image(cells, (x0, x1, y0, y1), "magma", lo, hi)
    panel.frame(title, "step", ylabel, integer_x=True, integer_y=True)
    return [panel.svg(), svg.colour_bar(left + 272, top, 200, "magma", lo, hi, bar)]


def _training(thinned: pd.DataFrame, top: float) -> list[str]:
    first = thinned.layer.to_numpy() == 0  # layer 0's row carries the step's loss and accuracy
    step = thinned.step.to_numpy()[first]
    loss, acc = thinned.loss.to_numpy(dtype=float)[first], thinned.acc.to_numpy(dtype=float)[first]
    finite = np.isfinite(loss) & (loss > 0)
    log = finite.any() and loss[finite].max() / loss[finite].min() > 10  # a diverging run's 1e18 must not flatten the rest
    shown = log10(loss[finite]) if log else loss[finite]
    xlim = svg.limits(step)
    panel = svg.Panel(560, top, 380, 200, xlim, svg.limits(shown))
    panel.line(step[finite], shown, "#3b75af")
    panel.frame("training", "step", "train loss" + (" (log)" if log else ""), integer_x=True, log_y=log,
                ylabel_colour="#3b75af")
    accuracy = svg.Panel(560, top, 380, 200, xlim, (0.0, 1.0))
    accuracy.line(step, acc, "#d1495b")
    accuracy.frame(ylabel="train accuracy", side="right", ylabel_colour="#d1495b", xaxis=False)
    return [panel.svg(), accuracy.svg()]


HISTOGRAM_STEP = 310  # px from one histogram panel to the next


def histogram_row(hist: dict, left: float, top: float) -> list[str]:
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
        panel.frame(f"step {int(step)}", "log10 |dL/dW|", "layer" if i == 0 else "", integer_y=True)
        parts.append(panel.svg())
    parts.append(svg.colour_bar(left + HISTOGRAM_STEP * len(hist["steps"]) - 60, top, 180, "viridis", 0.0, vmax,
                                "share of the layer's entries"))
    return parts
