"""The report's summary figures, in page order (figure_tasks): each a call that the report's
seaborn process makes (workers.py), returning a Figure (figure.py) or None where the grid has
nothing to show for it (e.g. no clipped runs). The drawing modules (init_figures, training_figures,
grid_figures, papers) import seaborn and pyplot; this one names them and imports none of them, so
that the report's own process does not pay for those imports while it reads MLflow."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .workers import Seaborn

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


def drawn(module: str, name: str, *args):
    """<module>.<name>(*args) of this package, imported where it is called (a seaborn process)."""
    return getattr(importlib.import_module(f".{module}", __package__), name)(*args)


def figure_tasks(runs: pd.DataFrame, layers: pd.DataFrame, signal: pd.DataFrame | None = None,
                 picks: list[Pick] = (), profiles: pd.DataFrame | None = None) -> list[Callable]:
    """Every figure of the summary page, in page order, as a call for a seaborn process; `picks`:
    the telling runs (telling_runs) with their tables; `profiles`: the deepest nets' logged
    theory/profile.parquet."""
    picks = list(picks)
    return [
        Seaborn(drawn, "grid_figures", "accuracy_heatmaps", runs),
        Seaborn(drawn, "init_figures", "gradient_flow", layers, profiles),
        Seaborn(drawn, "init_figures", "signal_propagation", signal),
        Seaborn(drawn, "init_figures", "gradient_signal", signal),
        Seaborn(drawn, "init_figures", "jacobian_spectrum", runs),
        Seaborn(drawn, "grid_figures", "remedies", runs),
        Seaborn(drawn, "training_figures", "layer_step_heatmaps", picks),
        Seaborn(drawn, "training_figures", "histograms_over_time", picks),
        Seaborn(drawn, "training_figures", "training_curves", layers),
        Seaborn(drawn, "training_figures", "clipping", layers, runs),
        Seaborn(drawn, "grid_figures", "outcomes", runs),
    ]


def paper_section(paper: str | None, runs: pd.DataFrame, layers: pd.DataFrame) -> Seaborn:
    """papers.section (a grid's reproduction of a paper) as a call for a seaborn process."""
    return Seaborn(drawn, "papers", "section", paper, runs, layers)
