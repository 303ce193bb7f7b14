"""The report's summary figures, in page order (figure_tasks). Each returns a Figure (title,
caption, and an inline SVG or PNG), or None when the grid has nothing to show for it (e.g. no
clipped runs). The line-panel and heatmap figures here are hand-drawn SVG (facets.py, svg.py):
sharp at any zoom, and milliseconds where matplotlib's layout of fifteen axes took seconds. The
others are seaborn PNGs (seaborn_figures.py), which this module does not import: the report's
seaborn process (workers.py) imports seaborn while the report itself reads MLflow."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
from markupsafe import Markup

from .. import theory
from ..config import FIELDS, from_dict
from ..diagnosis import LABELS
from . import svg
from .facets import Cell, Line, Row, draw_lines, facets, mean_series, reach
from .runpage import HISTOGRAM_STEP, histogram_row, log10, thin, where_and_when
from .workers import Seaborn

# matplotlib's and seaborn's default colours (tab10), the same in the SVG and the PNG figures
TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def palette(keys) -> dict:
    """A colour per key, in order, tab10's ten over again beyond ten keys (as seaborn's palette)."""
    return {key: TAB10[i % len(TAB10)] for i, key in enumerate(keys)}


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


class IllegibleFigure(AssertionError):
    """Two text elements of a figure overlap, one is cut off by its edge, or an axis spans decades on
    a linear scale."""


def check_panel(panel: svg.Panel, log_y: bool) -> None:
    """The decades rule for an SVG panel (svg.CHECKS): its y values, if all positive, span at most 3
    orders of magnitude on a linear axis. (Overlapping texts of the SVG figures are found in Chromium.)"""
    values = np.concatenate(panel.ys) if panel.ys else np.array([])
    lo, hi = sorted(panel.ylim)
    values = values[(values >= lo) & (values <= hi)]
    if not log_y and values.size and (values > 0).all() and values.max() / values.min() > 1e3:
        raise IllegibleFigure(f"SVG panel at ({panel.x}, {panel.y}): y spans {values.max() / values.min():.0e}, "
                              "not log")


def _deepest(layers: pd.DataFrame) -> tuple[int, pd.DataFrame]:
    """The deepest nets of the grid, at one clip setting (none where there is one): the rows the
    gradient-flow, signal and training-curve figures compare across activations and inits."""
    clip = "none" if (layers["clip"] == "none").any() else layers["clip"].iloc[0]
    depth = layers.depth.max()
    return depth, layers[(layers.depth == depth) & (layers["clip"] == clip)]


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
    colours = palette(inits)
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
    drawing = facets("gradient-flow", rows, "layer", colours, "init [+ norm, residual]",
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
    colours = palette(setups)
    activations = sorted(finite.activation.unique())
    # the loss axis spans the runs that did not diverge; a diverged run's blow-up (1e18) would
    # otherwise set it, and every other curve would be a flat line at its bottom (it is cut at the edge)
    lasting = finite[finite.diagnosis != "diverged"].loss
    lasting = lasting[lasting > 0]
    log = bool(len(lasting)) and lasting.max() / lasting.min() > 10
    shown = (lambda v: np.log10(np.maximum(v, 1e-30))) if log else (lambda v: v)
    ylim = (float(shown(lasting.min() * 0.8)), float(shown(lasting.max() * 1.25))) if len(lasting) else None
    # where each diverged run stopped: its last finite loss, on the panel's edge when beyond it
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
                                  Row("train accuracy", accuracy)], "step", colours, "init [+ norm, residual]",
                     "training loss and accuracy per step", dots=False,
                     extra=[("diverged: last finite loss", "#d1495b", "none", "cross")] if marked else None)
    note = (" A red X marks where each diverged run stopped: its last finite loss, or the edge of the "
            "panel when that loss is beyond it.") if marked else ""
    return _svg_figure("training", f"Training curves (depth {depth})",
                       "Training loss (on a log scale where it spans more than a decade) and accuracy per step, colour "
                       "= init [+ normalization, residual]; the band is one standard "
                       "deviation over seeds where there are several. Flat curves at loss 2.3 are networks that never "
                       "started to learn." + note, drawing)


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
    colours = palette(setups)
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
    drawing = facets("signal", rows, "layer", colours, "init [+ norm, residual]",
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
    colours = palette(setups)
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
    drawing = facets("gradient-signal", rows, "layer", colours, "init [+ norm, residual]",
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


DIAGNOSIS_COLORS = dict(zip(LABELS, ["#4c9a2a", "#3b75af", "#d1495b", "#6a3d9a", "#7f7f7f", "#edae49"]))


def outcomes(runs: pd.DataFrame) -> Figure | None:
    if runs.empty:
        return None
    factors = [f for f in ("activation", "init", "depth", "clip") if runs[f].nunique() > 0]
    if (runs.remedy != "").any():
        factors.append("remedy")
        runs = runs.assign(remedy=runs.remedy.replace("", "none"))
    found = set(runs.diagnosis)
    labels = [label for label in LABELS if label in found] + sorted(found - set(LABELS))
    tables = [pd.crosstab(runs[factor], runs.diagnosis).reindex(columns=labels, fill_value=0) for factor in factors]
    longest = max(svg.text_width(str(value)) for table in tables for value in table.index)
    parts, left, top, height = [], 60.0, 34.0, 180.0
    for i, (factor, table) in enumerate(zip(factors, tables)):
        # slanted labels' boxes must not overlap their neighbours' (Chromium's check): wide enough columns
        column = max(30.0, 0.77 * max(svg.text_width(str(value)) for value in table.index) + 8)
        width = max(110.0, column * len(table))
        panel = svg.Panel(left, top, width, height, (-0.5, len(table) - 0.5), (0.0, 1.05 * table.sum(axis=1).max()))
        for column, (value, row) in enumerate(table.iterrows()):
            base = 0
            for label in labels:
                if row[label]:
                    panel.bar(column - 0.4, column + 0.4, base, base + row[label], DIAGNOSIS_COLORS.get(label, "#999"),
                              name=f"{factor} {value}: {row[label]} {label}")
                    base += row[label]
        panel.frame(f"by {factor}", "", "runs" if i == 0 else "", integer_y=True, slant=True,
                    xticks=[(column, str(value)) for column, value in enumerate(table.index)])
        parts.append(panel.svg())
        left += width + 48
    drawn, legend_height = svg.legend(left - 20, top, "diagnosis",
                                      [(label, DIAGNOSIS_COLORS.get(label, "#999"), "none", "dot") for label in labels])
    parts.append(drawn)
    bottom = top + max(height + 0.64 * longest + 30, legend_height + 10)
    drawing = svg.document(int(left + 100), int(bottom), parts, "diagnosis counts by each factor of the grid")
    return _svg_figure("outcomes", "Outcomes",
                       "How many runs were diagnosed healthy, vanishing, exploding, diverged, dead or saturated, by "
                       "each factor of the grid. The rules and thresholds are in the README.", drawing)


def jacobian_spectrum(runs: pd.DataFrame) -> Figure | None:
    """The input-output Jacobian at step 0: its mean squared singular value against the theory's,
    run by run, and the spread of its singular values against depth."""
    runs = runs[np.isfinite(runs.jac_mean_sq.astype(float)) & (runs.jac_mean_sq > 0)]
    if runs.empty:
        return None
    paired = runs[np.isfinite(runs.jac_mean_sq_pred.astype(float)) & (runs.jac_mean_sq_pred > 0)]
    parts, left, top = [], 70.0, 34.0
    if len(paired):  # left: measured against predicted, log-log, one dot per run
        activations = sorted(paired.activation.unique())
        colours = palette(activations)
        predicted = np.log10(paired.jac_mean_sq_pred.to_numpy(dtype=float))
        measured = np.log10(paired.jac_mean_sq.to_numpy(dtype=float))
        lo, hi = svg.limits(np.concatenate([predicted, measured]), pad=0.08)
        panel = svg.Panel(left, top, 240, 220, (lo, hi), (lo, hi))
        panel.line([lo, hi], [lo, hi], "black", width=1.2, style="dotted", name="measured = predicted")
        for activation in activations:
            mine = (paired.activation == activation).to_numpy()
            panel.points(predicted[mine], measured[mine], colours[activation], name=activation)
        panel.frame("mean squared singular value of J", "predicted (product of chi_l)", "measured", log_x=True,
                    log_y=True)
        parts.append(panel.svg())
        entries = [(a, colours[a], "none", "dot") for a in activations] + [("measured = predicted", "black", "dotted", "")]
        drawn, _ = svg.legend(left + 252, top + 4, "activation", entries)
        parts.append(drawn)
        # past the legend, room for the right panel's tick labels and axis label
        left += 252 + 30 + max(svg.text_width(text) for text, *_ in entries) + 80
    # right: the spread of the singular values against depth, a line per setup over seeds and widths
    setups = sorted(runs.setup.unique())
    colours = palette(setups)
    depths = sorted(runs.depth.unique())
    log_depth = depths[-1] > 10 * depths[0]
    spread = runs.astype({"jac_log10_sd": float}).assign(x=np.log10(runs.depth.astype(float)) if log_depth
                                                         else runs.depth.astype(float))
    lines = mean_series(spread, "x", "jac_log10_sd", "setup", setups)
    xs = np.log10(np.array(depths, dtype=float)) if log_depth else np.array(depths, dtype=float)
    panel = svg.Panel(left, top, 260, 220, svg.limits(xs, pad=0.08), svg.limits(np.append(reach(lines), 0.0),
                                                                                 pad=0.06))
    draw_lines(panel, lines, colours)
    panel.frame("spread of J's singular values", "depth", "sd of log10 singular value",
                xticks=[(x, str(d)) for x, d in zip(xs, depths)])
    parts.append(panel.svg())
    drawn, legend_height = svg.legend(left + 272, top + 4, "init [+ norm, residual]",
                                      [(s, colours[s], "solid", "dot") for s in setups])
    parts.append(drawn)
    width = left + 272 + max(svg.text_width(s) for s in [*setups, "init [+ norm, residual]"]) + 50
    drawing = svg.document(int(width), int(max(top + 220 + 50, top + legend_height + 10)), parts,
                           "the input-output Jacobian's singular values, measured and predicted")
    without = len(paired) < len(runs)
    return _svg_figure("jacobian", "Input-output Jacobian at initialization",
                  "J = dz_{H-1}/dz_0, the last hidden layer's pre-activation against the first's, at 8 inputs of "
                  "the step-0 batch. Left: its mean squared singular value, measured against mean-field theory's "
                  "prediction (the product over layers of chi_l = sigma_w^2 E[phi'(z_l)^2]; Pennington et al. "
                  "2017), one point per run, colour = activation; on the dotted line they agree. Below 1 the "
                  "gradient vanishes through the net, above 1 it explodes. Right: the spread of the singular "
                  "values (sd of log10), the mean over activations, widths and seeds with a band of one standard "
                  "deviation, against depth: a wide spread is what dynamical isometry (orthogonal weights at "
                  "chi = 1) avoids, even where the mean is right."
                  + (" Runs without a prediction (normalization, residual blocks) are on the right only." if without
                     else ""), drawing)


def _seaborn(name: str, *args) -> Figure | None:
    """seaborn_figures.<name>(*args), imported where it is drawn (the report's seaborn process)."""
    from . import seaborn_figures

    return getattr(seaborn_figures, name)(*args)


def paper_section(paper: str | None, runs: pd.DataFrame, layers: pd.DataFrame):
    """papers.section (a grid's reproduction of a paper, drawn with seaborn), imported where it is drawn."""
    from .papers import section

    return section(paper, runs, layers)


def figure_tasks(runs: pd.DataFrame, layers: pd.DataFrame, signal: pd.DataFrame | None = None,
                 picks: list[Pick] = ()) -> list[Callable[[], Figure | None]]:
    """Every figure of the summary page, in page order, as a call to make (the report makes them on
    every core); `picks`: the telling runs (telling_runs) with their tables."""
    picks = list(picks)
    return [
        Seaborn(_seaborn, "accuracy_heatmaps", runs),
        partial(gradient_flow, layers, runs),
        partial(signal_propagation, signal),
        partial(gradient_signal, signal),
        partial(jacobian_spectrum, runs),
        Seaborn(_seaborn, "remedies", runs),
        partial(layer_step_heatmaps, picks),
        partial(histograms_over_time, picks),
        partial(training_curves, layers),
        Seaborn(_seaborn, "clipping", layers, runs),
        partial(outcomes, runs),
    ]
