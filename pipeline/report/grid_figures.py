"""The summary figures of the grid's runs as a whole: final accuracy per configuration, the
remedies side by side, and the diagnoses by each factor. Drawn with seaborn and matplotlib in the
report's seaborn process (workers.py); captions in the template (captions.html.j2), keyed by the
figure's key."""

from __future__ import annotations

import matplotlib.patches
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator

from ..diagnosis import LABELS
from ..plots import log10
from .figure import Figure, encode, is_mlp

DIAGNOSIS_COLORS = dict(zip(LABELS, ["#4c9a2a", "#3b75af", "#d1495b", "#6a3d9a", "#7f7f7f", "#edae49"]))


ANNOTATED_CELLS = 400  # a heatmap panel prints its values up to this many cells (beyond, the colour says it)


def accuracy_heatmaps(runs: pd.DataFrame) -> Figure | None:
    if runs.empty:
        return None
    clips = sorted(runs["clip"].unique(), key=lambda c: (c != "none", c))
    rows = runs.groupby(["activation", "setup"]).ngroups
    # at least as tall as the rows' label on two lines (a grid of one or two rows)
    fig, axes = plt.subplots(1, len(clips), figsize=(2.4 + 2.6 * len(clips), max(2.0, 1.2 + 0.32 * rows)), squeeze=False,
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
        ax.set_ylabel("activation - init\n[+ norm, residual]" if i == 0 else "")
    return encode(fig, "accuracy", "Final test accuracy")


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
    return encode(fig, "remedies", f"Remedies side by side (depth {depth})")


def outcomes(runs: pd.DataFrame) -> Figure | None:
    """Stacked bars of the runs' diagnoses, a panel per factor of the grid (its values on x)."""
    if runs.empty:
        return None
    mlp = is_mlp(runs)
    factors = ["activation", "init", "depth", "clip"] if mlp.any() else ["activation", "init", "clip"]
    if (runs.remedy != "").any():
        factors.append("remedy")
        runs = runs.assign(remedy=runs.remedy.replace("", "none"))
    if not mlp.all():  # recurrent runs: by arch and sequence; their depth means nothing, they are not in "by depth"
        factors += ["arch", "sequence"]
        runs = runs.assign(sequence=runs.sequence.where(~mlp, "mlp"),
                           activation=runs.activation.where(~runs.arch.isin(["lstm", "gru"]), "(gated cell)"))
    found = set(runs.diagnosis)
    labels = [label for label in LABELS if label in found] + sorted(found - set(LABELS))
    colours = [DIAGNOSIS_COLORS.get(label, "#999999") for label in labels]
    tables = [pd.crosstab(counted[factor], counted.diagnosis).reindex(columns=labels, fill_value=0)
              for factor, counted in ((f, runs[mlp] if f == "depth" else runs) for f in factors)]
    longest = [max(len(str(v)) for v in table.index) for table in tables]
    slant = [n > 3 for n in longest]  # long names side by side run into each other: slanted, in columns that hold them
    # a slanted label's box is about 0.77 of its length (0.067 in a character at 8 pt) wide: its column's width
    widths = [max(1.2, len(table) * max(0.42, 0.77 * 0.067 * n + 0.12)) for table, n in zip(tables, longest)]
    fig, axes = plt.subplots(1, len(factors), figsize=(1.6 + sum(widths) + 0.6 * len(factors), 3.6), sharey=True,
                             width_ratios=widths, layout="constrained")
    for ax, factor, table, turned in zip(axes, factors, tables, slant):
        base = np.zeros(len(table))
        for label, colour in zip(labels, colours):
            ax.bar(np.arange(len(table)), table[label].to_numpy(), 0.8, bottom=base, color=colour)
            base += table[label].to_numpy()
        ax.set_xticks(np.arange(len(table)), labels=[str(v) for v in table.index], fontsize=8,
                      rotation=40 if turned else 0, ha="right" if turned else "center",
                      rotation_mode="anchor" if turned else "default")
        ax.set(title="by depth (MLPs)" if factor == "depth" and not mlp.all() else f"by {factor}", xlim=(-0.6, len(table) - 0.4))
        ax.title.set_fontsize(9)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("runs")
    fig.legend([matplotlib.patches.Patch(color=c) for c in colours], labels, title="diagnosis",
               loc="outside right upper",
               frameon=False, fontsize=8, title_fontsize=8)
    return encode(fig, "outcomes", "Outcomes")
