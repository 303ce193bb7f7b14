"""The summary figures of the nets at initialization (step 0), measured beside theory: gradient flow
per layer, forward signal propagation, gradient signal-to-noise, the input-output Jacobian. Drawn
with seaborn and matplotlib in the report's seaborn process (workers.py); captions in the
template (captions.html.j2), keyed by the figure's key."""

from __future__ import annotations

import math

import matplotlib.lines
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import pandas as pd
import seaborn as sns

from ..plots import flow_panel, log10, mean_lines
from .figure import SETUP, Figure, deepest, encode, facet_grid, legend_right, palette

PREDICTION = dict(color="black", linestyle=(0, (1.5, 1.5)), linewidth=1.6, zorder=3)  # theory: black dotted


def _predict(ax: plt.Axes, lines: pd.DataFrame, y: str, colours: dict) -> None:
    """Each setup's predicted line black dotted (labelled "<setup>: prediction"), with crosses in the
    setup's colour at its points."""
    for setup, line in lines.groupby("setup"):
        ax.plot(line.layer, line[y], label=f"{setup}: prediction", **PREDICTION)
        ax.plot(line.layer, line[y], linestyle="none", marker="x", markersize=5, markeredgewidth=1.4,
                color=colours[setup], zorder=4)


def _key(colours: dict, prediction: str = "", styles: dict | None = None) -> tuple[list, list[str]]:
    """Legend handles and labels: a line with a dot per colour key, then the prediction's."""
    handles = [matplotlib.lines.Line2D([], [], color=c, marker="o", markersize=4,
                                       linestyle=(styles or {}).get(k, "-")) for k, c in colours.items()]
    labels = [str(k) for k in colours]
    if prediction:
        handles.append(matplotlib.lines.Line2D([], [], marker="x", markeredgecolor="#222", **PREDICTION))
        labels.append(prediction)
    return handles, labels


def predicted_profiles(start: pd.DataFrame, profiles: pd.DataFrame) -> pd.DataFrame:
    """Per activation and setup of `start` (step-0 rows), the runs' logged prediction
    (theory/profile.parquet: ln||dL/dz|| per hidden layer, the last 0), the mean over the runs
    that logged one, in log10, anchored at the mean measured log10 ||dL/dh|| of the last hidden
    layer: columns activation, setup, layer, y. A setup without a logged profile has no rows."""
    columns = ["activation", "setup", "layer", "y"]
    if profiles is None or profiles.empty or start.empty:
        return pd.DataFrame(columns=columns)
    last_hidden = int(start.layer.max()) - 1
    anchors = (start[start.layer == last_hidden].assign(anchor=lambda f: log10(f.backprop_norm))
               .groupby(["activation", "setup"]).anchor.mean().reset_index())
    runs = start[["run_id", "activation", "setup"]].drop_duplicates()
    mean = (profiles[["run_id", "layer", "log_norm"]].merge(runs, on="run_id")
            .groupby(["activation", "setup", "layer"]).log_norm.mean().reset_index().merge(anchors))
    mean["y"] = mean.anchor + mean.log_norm / math.log(10)
    return mean[np.isfinite(mean.y)][columns]


def gradient_flow(layers: pd.DataFrame, profiles: pd.DataFrame | None = None) -> Figure | None:
    if layers.empty:
        return None
    depth, nets = deepest(layers)
    start = nets[nets.step == 0]
    # SkipInit's blocks get exactly zero gradient at step 0 (alpha = 0): nothing to draw but the
    # first and last layers' points, which read as a flow they are not; said in the notes instead
    silent = sorted(start[start.backprop_norm == 0].setup.unique())
    start = start[~start.setup.isin(silent)]
    if start.empty:
        return None
    colours = palette(sorted(start.setup.unique()))
    activations = sorted(start.activation.unique())
    predicted = predicted_profiles(start, profiles)
    handles, labels = _key(colours, "mean-field prediction" if len(predicted) else "")
    fig, axes = facet_grid(2, len(activations), [*labels, SETUP])
    for row, (column, name) in enumerate([("backprop_norm", "||dL/dh||"), ("weight_grad_norm", "||dL/dW||")]):
        for ax, activation in zip(axes[row], activations):
            mine = start[start.activation == activation]
            flow_panel(ax, mine.assign(v=log10(mine[column])), "v", "setup", colours)
            ax.set_title(f"{name} - {activation}", fontsize=9)
            if row == 0:
                _predict(ax, predicted[predicted.activation == activation], "y", colours)
        axes[row][0].set_ylabel("log10 norm")
    for ax in axes[-1]:
        ax.set_xlabel("layer")
    legend_right(fig, handles, labels, SETUP)
    errors = []  # "activation: init error, ..." where a prediction is drawn: the logged theory/slope_error
    for activation, drawn in predicted.groupby("activation"):
        mine = start[(start.activation == activation) & start.setup.isin(set(drawn.setup))]
        per_setup = mine.groupby("run_id")[["setup", "slope_error"]].first().groupby("setup").slope_error.mean()
        notes = [f"{setup} {error:+.2f}" for setup, error in per_setup.items() if np.isfinite(error)]
        if notes:
            errors.append(f"{activation}: {', '.join(notes)}")
    notes = f"Measured minus predicted slope of ln||dL/dh|| per layer: {'; '.join(errors)}." if errors else ""
    if silent:
        notes += (f" Left out: {', '.join(silent)}, whose residual blocks receive exactly zero gradient at step 0 "
                  "(alpha = 0 at init); their run pages show the later steps.")
    return encode(fig, "gradient-flow", f"Gradient flow at initialization (depth {depth})", notes.strip())


def signal_propagation(signal: pd.DataFrame | None) -> Figure | None:
    """Forward q and c per hidden layer at step 0 on the deepest nets, measured against the q/c maps."""
    if signal is None or signal.empty:
        return None
    depth, start = deepest(signal[signal.step == 0])
    start = start[start.statistic.isin(["q", "c"])]
    if start.empty:
        return None
    setups = sorted(start.setup.unique())
    colours = palette(setups)
    activations = sorted(start.activation.unique())
    handles, labels = _key(colours, "q/c-map prediction" if start.predicted.notna().any() else "")
    fig, axes = facet_grid(2, len(activations), [*labels, SETUP])
    for row, statistic in enumerate(["q", "c"]):
        for ax, activation in zip(axes[row], activations):
            found = start[(start.activation == activation) & (start.statistic == statistic)]
            shown = log10 if statistic == "q" else (lambda v: np.asarray(v, dtype=float))
            mean_lines(ax, found.assign(v=shown(found.measured)), "layer", "v", "setup", colours, band=False)
            predicted = found.dropna(subset=["predicted"]).groupby(["setup", "layer"]).predicted.mean().reset_index()
            _predict(ax, predicted.assign(y=shown(predicted.predicted)), "y", colours)
            ax.set(title=f"{'log10 q' if statistic == 'q' else 'c'} - {activation}", xlabel="", ylabel="")
            ax.title.set_fontsize(9)
        if statistic == "c":
            low = float(start[start.statistic == "c"].measured.min())
            axes[row][0].set_ylim(min(-0.05, low - 0.05), 1.05)
        axes[row][0].set_ylabel("log10 q (mean z^2)" if statistic == "q" else "c (mean correlation)")
    for ax in axes[-1]:
        ax.set_xlabel("layer")
        ax.xaxis.get_major_locator().set_params(integer=True)
    legend_right(fig, handles, labels, SETUP)
    return encode(fig, "signal", f"Signal propagation at initialization (depth {depth})")


def gradient_signal(signal: pd.DataFrame | None) -> Figure | None:
    """GSNR per layer at the first and last histogram step on the deepest nets; the zero fraction
    where some layer has exact zeros."""
    if signal is None or signal.empty or "gsnr" not in set(signal.statistic):
        return None
    depth, nets = deepest(signal[signal.statistic.isin(["gsnr", "zero_fraction"])])
    nets = nets.astype({"measured": float})  # a NaN stays: a gap in its line (SkipInit's silent blocks), not a join
    if not ((nets.statistic == "gsnr") & np.isfinite(nets.measured)).any():
        return None
    setups = sorted(nets.setup.unique())
    colours = palette(setups)
    lower = set(nets.setup[nets.precision != "fp32"])  # drawn dashed: it often lies on its fp32 twin
    dashes = {s: (0, (4, 2)) for s in lower}
    activations = sorted(nets.activation.unique())
    # each run's first and last recorded histogram step (a diverged run's last is earlier)
    last = nets.groupby("run_id").step.transform("max")
    panels = [("gsnr", nets.step == 0, "log10 GSNR, step 0"),
              ("gsnr", (nets.step == last) & (last > 0), "log10 GSNR, last step")]
    if (nets[nets.statistic == "zero_fraction"].measured > 0.01).any():
        panels.append(("zero_fraction", nets.step == 0, "zero fraction, step 0"))
    handles, labels = _key(colours, styles=dashes)
    fig, axes = facet_grid(len(panels), len(activations), [*labels, SETUP])
    for row, (statistic, when, label) in enumerate(panels):
        found = nets[when & (nets.statistic == statistic)]
        found = found.assign(v=log10(found.measured) if statistic == "gsnr" else found.measured)
        for ax, activation in zip(axes[row], activations):
            mine = found[found.activation == activation]
            mean_lines(ax, mine, "layer", "v", "setup", colours, band=False, styles=dashes)
            ax.set(title=activation if row == 0 else "", xlabel="", ylabel="")
            ax.title.set_fontsize(9)
        axes[row][0].set_ylabel(label)
        if statistic == "zero_fraction":
            axes[row][0].set_ylim(-0.05, 1.05)
    for ax in axes[-1]:
        ax.set_xlabel("layer")
        ax.xaxis.get_major_locator().set_params(integer=True)
    legend_right(fig, handles, labels, SETUP)
    return encode(fig, "gradient-signal", f"Gradient signal-to-noise per layer (depth {depth})",
                  "Last row: the fraction of dL/dW's entries that are exactly 0 at step 0 (dead units, inputs that "
                  "are 0 across the batch, fp16 underflow)." if len(panels) == 3 else "")


def jacobian_spectrum(runs: pd.DataFrame) -> Figure | None:
    """The input-output Jacobian at step 0: its mean squared singular value against the theory's,
    run by run, and the spread of its singular values against depth."""
    runs = runs[np.isfinite(runs.jac_mean_sq.astype(float)) & (runs.jac_mean_sq > 0)]
    if runs.empty:
        return None
    paired = runs[np.isfinite(runs.jac_mean_sq_pred.astype(float)) & (runs.jac_mean_sq_pred > 0)]
    setups = sorted(runs.setup.unique())
    fig, axes = plt.subplots(1, 2 if len(paired) else 1, squeeze=False, layout="constrained",
                             figsize=(3.4 + (5.2 if len(paired) else 0) + 0.075 * max(map(len, setups)), 3.4))
    axes = list(axes[0])
    if len(paired):  # left: measured against predicted, log-log, one dot per run
        ax = axes.pop(0)
        values = np.concatenate([paired.jac_mean_sq_pred.to_numpy(float), paired.jac_mean_sq.to_numpy(float)])
        lo, hi = values.min() / 2, values.max() * 2
        ax.plot([lo, hi], [lo, hi], color="black", linestyle=":", linewidth=1.2, label="measured = predicted")
        sns.scatterplot(data=paired, x="jac_mean_sq_pred", y="jac_mean_sq", hue="activation",
                        hue_order=sorted(paired.activation.unique()), s=22, linewidth=0, ax=ax)
        ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), title="mean squared singular value of J",
               xlabel="predicted (product of chi_l)", ylabel="measured")
        for axis in (ax.xaxis, ax.yaxis):  # at most five decades labelled: dozens of them run into each other
            axis.set_major_locator(matplotlib.ticker.LogLocator(numticks=5))
            axis.set_minor_locator(matplotlib.ticker.NullLocator())
        sns.move_legend(ax, "center left", bbox_to_anchor=(1.02, 0.5), frameon=False, fontsize=8, title="activation",
                        title_fontsize=8)
    ax = axes[0]  # right: the spread of the singular values against depth, a line per setup
    depths = sorted(runs.depth.unique())
    lines = mean_lines(ax, runs.astype({"depth": float, "jac_log10_sd": float}), "depth", "jac_log10_sd", "setup",
                       palette(setups))
    if depths[-1] > 10 * depths[0]:
        ax.set_xscale("log")
    ax.set_xticks(depths, labels=[str(d) for d in depths])
    ax.minorticks_off()
    ax.set(title="spread of J's singular values", xlabel="depth", ylabel="sd of log10 singular value")
    ax.set_ylim(bottom=0)
    ax.legend(lines, [line.get_label() for line in lines], loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False,
              fontsize=8, title=SETUP, title_fontsize=8)
    without = len(paired) < len(runs)
    notes = "Runs without a prediction (normalization, residual blocks) are on the right only." if without else ""
    return encode(fig, "jacobian", "Input-output Jacobian at initialization", notes)
