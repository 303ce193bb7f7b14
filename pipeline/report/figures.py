"""The report's seaborn figures. Each function returns a Figure (title, caption, inline PNG), or
None when the grid has nothing to show for it (e.g. no clipped runs)."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .. import theory
from ..config import FIELDS, from_dict, pair_keys
from ..diagnosis import LABELS

MAX_POINTS = 150  # steps per curve: enough to read a curve, few enough to draw 100 runs fast
DIAGNOSIS_COLORS = dict(zip(LABELS, ["#4c9a2a", "#3b75af", "#d1495b", "#6a3d9a", "#7f7f7f", "#edae49"]))
# A clipped run and "the same configuration but for clipping"
CLIP_PAIR_KEYS = pair_keys("clip", "clip_threshold")


@dataclass(frozen=True)
class Figure:
    key: str
    title: str
    caption: str
    png_base64: str


def _encode(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _log10(values: pd.Series) -> pd.Series:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log10(values.astype(float))
    return out.replace([np.inf, -np.inf], np.nan)


def _thin(per_step: pd.DataFrame) -> pd.DataFrame:
    """Keep at most MAX_POINTS evenly spaced steps (the same steps for every run)."""
    steps = np.sort(per_step.step.unique())
    keep = steps[np.linspace(0, len(steps) - 1, min(len(steps), MAX_POINTS)).round().astype(int)]
    return per_step[per_step.step.isin(keep)]


def _deepest(layers: pd.DataFrame) -> tuple[int, pd.DataFrame]:
    """The deepest nets of the grid, at one clip setting (none where there is one): the rows the
    gradient-flow and training-curve figures compare across activations and inits."""
    clip = "none" if (layers["clip"] == "none").any() else layers["clip"].iloc[0]
    depth = layers.depth.max()
    return depth, layers[(layers.depth == depth) & (layers["clip"] == clip)]


def accuracy_heatmaps(runs: pd.DataFrame) -> Figure | None:
    if runs.empty:
        return None
    clips = sorted(runs["clip"].unique(), key=lambda c: (c != "none", c))
    rows = runs.groupby(["activation", "init"]).ngroups
    fig, axes = plt.subplots(1, len(clips), figsize=(1.6 + 3.2 * len(clips), 1.2 + 0.32 * rows), squeeze=False)
    for ax, clip in zip(axes[0], clips):
        table = runs[runs["clip"] == clip].pivot_table(index=["activation", "init"], columns="depth", values="test_acc")
        sns.heatmap(table, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="viridis", cbar=False, ax=ax,
                    annot_kws={"fontsize": 7})
        ax.set_title(f"clip = {clip}")
        ax.set_ylabel("activation - init" if ax is axes[0][0] else "")
    return Figure("accuracy", "Final test accuracy",
                  "Mean final test accuracy over seeds, per activation and init (rows) and depth (columns), one "
                  "panel per clip setting. Look for the cells that fall to chance (0.10) as depth grows, and for "
                  "the init or clipping that brings them back.", _encode(fig))


def gradient_flow(layers: pd.DataFrame) -> Figure | None:
    if layers.empty:
        return None
    depth, deepest = _deepest(layers)
    start = deepest[deepest.step == 0]
    long = start.melt(id_vars=["activation", "init", "layer", "seed"], value_vars=["backprop_norm", "weight_grad_norm"],
                      var_name="statistic", value_name="norm")
    long["log10 norm"] = _log10(long["norm"])
    long["statistic"] = long.statistic.map({"backprop_norm": "||dL/dh||", "weight_grad_norm": "||dL/dW||"})
    inits = sorted(start.init.unique())
    palette = dict(zip(inits, sns.color_palette(n_colors=len(inits))))
    grid = sns.relplot(data=long, x="layer", y="log10 norm", hue="init", hue_order=inits, palette=palette,
                       col="activation", row="statistic", kind="line", marker="o", height=2.6, aspect=1.2,
                       facet_kws={"sharey": "row"})
    for activation, ax in zip(grid.col_names, grid.axes[0]):
        for init in inits:
            line = theory_line(start[(start.activation == activation) & (start.init == init)])
            if line is not None:
                ax.plot(*line, linestyle="--", color=palette[init], linewidth=1.2)
    grid.set_titles("{row_name} - {col_name}")
    return Figure("gradient-flow", f"Gradient flow at initialization (depth {depth})",
                  "log10 norm of the error signal dL/dh (top) and of the weight gradient dL/dW (bottom) per layer "
                  "at step 0, layer 0 next to the input, colour = init (Glorot & Bengio's picture). A line that "
                  "falls towards layer 0 is a vanishing gradient; one that rises is an exploding gradient; flat is "
                  "what a good init achieves. Dashed: the mean-field prediction (pipeline/theory.py) for the hidden "
                  "layers, anchored at the last hidden layer's measured value.", _encode(grid.figure))


def theory_line(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray] | None:
    """Predicted log10 ||dL/dh|| over the hidden layers of one config's runs (step 0), from the
    finite-depth mean-field slopes, anchored at the mean measured value of the last hidden layer."""
    if rows.empty:
        return None
    values = {k: (v.item() if hasattr(v, "item") else v) for k, v in rows.iloc[0].items() if k in FIELDS}
    prediction = theory.predict(from_dict(values))
    last_hidden = int(rows.layer.max()) - 1
    anchor = _log10(rows[rows.layer == last_hidden].backprop_norm).mean()
    if not np.isfinite(anchor) or not prediction.layer_slopes:
        return None
    # going from layer l+1 down to layer l adds slope_l (natural log) to ln||dL/dh||
    steps = np.array(prediction.layer_slopes[::-1]) / np.log(10)
    layers = np.arange(last_hidden, -1, -1)
    return layers, anchor + np.concatenate([[0.0], np.cumsum(steps)])[: len(layers)]


def telling_runs(runs: pd.DataFrame) -> list[tuple[str, pd.Series]]:
    """The most vanishing, the most exploding, and the best healthy run, where the grid has them."""
    picks: list[tuple[str, pd.Series]] = []
    ratio = runs.first_last_ratio.replace([np.inf, -np.inf], np.nan)
    if ratio.notna().any():
        low, high = runs.loc[ratio.idxmin()], runs.loc[ratio.idxmax()]
        if low.first_last_ratio < 1:
            picks.append(("most vanishing", low))
        if high.first_last_ratio > 1:
            picks.append(("most exploding", high))
    healthy = runs[runs.diagnosis == "healthy"]
    if not healthy.empty:
        picks.append(("best healthy", healthy.loc[healthy.test_acc.idxmax()]))
    return picks


def layer_step_heatmaps(layers: pd.DataFrame, runs: pd.DataFrame) -> Figure | None:
    picks = [(label, run) for label, run in telling_runs(runs) if (layers.run_id == run.run_id).any()]
    if not picks:
        return None
    fig, axes = plt.subplots(1, len(picks), figsize=(4.6 * len(picks), 3.4), squeeze=False)
    for ax, (label, run) in zip(axes[0], picks):
        rows = _thin(layers[layers.run_id == run.run_id])
        table = rows.assign(v=_log10(rows.backprop_norm)).pivot_table(index="layer", columns="step", values="v")
        sns.heatmap(table, cmap="magma", ax=ax, cbar_kws={"label": "log10 ||dL/dh||"}, xticklabels=max(1, len(table.columns) // 6))
        ax.invert_yaxis()
        ax.set_title(f"{label}: {run.run_name}", fontsize=8)
    return Figure("layer-step", "Where and when gradients vanish or explode",
                  "log10 norm of dL/dh for each layer (rows, 0 = input side) and step (columns), for the most "
                  "vanishing, the most exploding and the best healthy run. Dark bands at the bottom are layers "
                  "that receive no learning signal.", _encode(fig))


def training_curves(layers: pd.DataFrame) -> Figure | None:
    if layers.empty:
        return None
    depth, deepest = _deepest(layers)
    steps = _thin(deepest[deepest.layer == 0])
    long = steps.melt(id_vars=["activation", "init", "step", "seed"], value_vars=["loss", "acc"], var_name="metric")
    grid = sns.relplot(data=long, x="step", y="value", hue="init", col="activation", row="metric", kind="line",
                       height=2.4, aspect=1.3, errorbar="sd", facet_kws={"sharey": "row"})
    grid.set_titles("{row_name} - {col_name}")
    return Figure("training", f"Training curves (depth {depth})",
                  "Training loss and accuracy per step, colour = init; the band is one standard deviation over "
                  "seeds where there are several. Flat curves at loss 2.3 are networks that never started to learn.",
                  _encode(grid.figure))


def clipping(layers: pd.DataFrame, runs: pd.DataFrame) -> Figure | None:
    clipped = runs[runs["clip"] != "none"]
    if clipped.empty:
        return None
    per_step = layers[layers.layer == 0]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    norms = _thin(per_step[per_step["clip"] != "none"]).melt(
        id_vars=["step", "clip"], value_vars=["global_norm_pre_clip", "global_norm_post_clip"], var_name="norm")
    norms["log10 global norm"] = _log10(norms.value)
    norms["norm"] = norms["norm"].map({"global_norm_pre_clip": "before clipping", "global_norm_post_clip": "after"})
    sns.lineplot(data=norms, x="step", y="log10 global norm", hue="clip", style="norm", errorbar=("pi", 50), ax=axes[0])
    axes[0].set_title("global gradient norm (median, IQR band)")
    active = per_step[per_step["clip"] != "none"].groupby(["run_id", "clip", "activation"]).clip_active.mean().reset_index()
    sns.barplot(data=active, x="activation", y="clip_active", hue="clip", ax=axes[1])
    axes[1].set(title="fraction of steps clipped", ylabel="fraction", ylim=(0, 1))
    pairs = clipped.merge(runs[runs["clip"] == "none"], on=CLIP_PAIR_KEYS, suffixes=("", "_none"))
    if not pairs.empty:
        sns.scatterplot(data=pairs, x="test_acc_none", y="test_acc", hue="clip", style="activation", ax=axes[2])
        axes[2].plot([0, 1], [0, 1], "k--", lw=0.8)
    axes[2].set(title="test accuracy: clipped vs not", xlabel="without clipping", ylabel="with clipping",
                xlim=(0, 1), ylim=(0, 1))
    return Figure("clipping", "Gradient clipping",
                  "Left: global gradient norm before (solid) and after (dashed) clipping. Middle: how often the "
                  "clip was active. Right: each clipped run against the same configuration without clipping; points "
                  "above the diagonal are runs that clipping helped.", _encode(fig))


def outcomes(runs: pd.DataFrame) -> Figure | None:
    if runs.empty:
        return None
    factors = [f for f in ("activation", "init", "depth", "clip") if runs[f].nunique() > 0]
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
                  "factor of the grid. The rules and thresholds are in the README.", _encode(fig))


def all_figures(runs: pd.DataFrame, layers: pd.DataFrame) -> list[Figure]:
    figures = [
        accuracy_heatmaps(runs),
        gradient_flow(layers),
        layer_step_heatmaps(layers, runs),
        training_curves(layers),
        clipping(layers, runs),
        outcomes(runs),
    ]
    return [f for f in figures if f is not None]
