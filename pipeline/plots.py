"""Per-run figures logged with each run (plots/*.png). The cross-run report lives in report/."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on clusters and CI; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402


def gradient_flow(table: pd.DataFrame, title: str) -> plt.Figure:
    """log10 of ||dL/dh|| and ||dL/dW|| against layer index, at the first, middle and last step."""
    steps = sorted({int(table.step.min()), int(table.step.median()), int(table.step.max())})
    rows = table[table.step.isin(steps)].copy()
    long = rows.melt(
        id_vars=["step", "layer"],
        value_vars=["backprop_norm", "weight_grad_norm"],
        var_name="statistic",
        value_name="norm",
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        long["log10 norm"] = np.log10(long["norm"].astype(float))
    long["step"] = long["step"].astype(str)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharex=True, constrained_layout=True)
    for ax, stat, label in zip(axes, ["backprop_norm", "weight_grad_norm"], ["||dL/dh||", "||dL/dW||"]):
        sns.lineplot(data=long[long.statistic == stat], x="layer", y="log10 norm", hue="step", marker="o", ax=ax)
        ax.set_title(f"log10 {label} per layer")
        ax.set_xlabel("layer (0 = next to the input)")
    fig.suptitle(title)
    return fig
