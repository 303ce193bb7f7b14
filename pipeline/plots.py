"""Per-run figures logged with each run (plots/*.png). The cross-run report lives in report/."""

from __future__ import annotations

import io

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def gradient_flow(table: pd.DataFrame, title: str) -> plt.Figure:
    """log10 of ||dL/dh|| and ||dL/dW|| against layer index, at the first, middle and last step."""
    steps = sorted({int(table.step.min()), int(table.step.median()), int(table.step.max())})
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3), sharex=True)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.16, top=0.8, wspace=0.25)  # fixed: one draw, not two
    for ax, column, label in zip(axes, ["backprop_norm", "weight_grad_norm"], ["||dL/dh||", "||dL/dW||"]):
        for step in steps:
            rows = table[table.step == step].sort_values("layer")
            with np.errstate(divide="ignore", invalid="ignore"):
                ax.plot(rows.layer, np.log10(rows[column].astype(float)), marker="o", ms=3, label=f"step {step}")
        ax.set(title=f"log10 {label} per layer", xlabel="layer (0 = next to the input)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    return fig


def png(fig: plt.Figure, dpi: int = 72) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()
