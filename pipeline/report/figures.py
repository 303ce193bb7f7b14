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

from .figure import deepest, is_mlp, thin
from .workers import Seaborn

MIN_STEPS = 10  # a run must have lasted this many steps to be picked for the over-time figures
# what the per-step figures read of layer 0's rows: the tasks are pickled to the seaborn process,
# and all the layer rows of a 7,680-run grid pickle to 640 MB (measured)
TRAINING_COLUMNS = ["run_id", "step", "layer", "activation", "setup", "depth", "clip", "diagnosis", "loss", "acc"]
CLIPPING_COLUMNS = ["run_id", "step", "clip", "global_norm_pre_clip", "global_norm_post_clip"]


def telling_runs(runs: pd.DataFrame) -> list[tuple[str, pd.Series]]:
    """The most vanishing, the most exploding, and the best healthy MLP, among the runs that lasted
    (a run that diverged at step 0 has no "when" to show; a recurrent net has no layers in depth)."""
    runs = runs[is_mlp(runs)]
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
    """Every figure of the summary page, in page order, as a call for a seaborn process, each given
    the rows it draws; `picks`: the telling runs (telling_runs) with their tables; `profiles`: the
    deepest nets' logged theory/profile.parquet. The figures about depth draw the MLPs only (a
    recurrent run's depth means nothing): the through-time ones (time_tasks) draw the others."""
    picks = list(picks)
    every_run = runs
    mlps = set(runs.run_id[is_mlp(runs)])
    runs = runs[runs.run_id.isin(mlps)]
    all_steps = layers
    layers = layers[layers.run_id.isin(mlps)] if len(layers) else layers
    first = deepest(layers[layers.step == 0])[1] if len(layers) else layers  # every layer, step 0
    # (a selection of the columns first: a copy of every column of a big grid's rows is half a GB)
    per_step = layers.loc[layers.layer == 0, TRAINING_COLUMNS] if len(layers) else layers
    training = deepest(per_step)[1] if len(per_step) else per_step
    # clipping is no matter of depth: every run's global norms
    clip_steps = all_steps.loc[all_steps.layer == 0, CLIPPING_COLUMNS] if len(all_steps) else all_steps
    clipped = thin(clip_steps[clip_steps["clip"] != "none"]) if len(clip_steps) else clip_steps
    forward = signal[(signal.step == 0) & signal.statistic.isin(["q", "c"])] if signal is not None else None
    gradient = signal[signal.statistic.isin(["gsnr", "zero_fraction"])] if signal is not None else None
    return [
        Seaborn(drawn, "grid_figures", "accuracy_heatmaps", runs),
        Seaborn(drawn, "init_figures", "gradient_flow", first, profiles),
        Seaborn(drawn, "init_figures", "signal_propagation", forward),
        Seaborn(drawn, "init_figures", "gradient_signal", gradient),
        Seaborn(drawn, "init_figures", "jacobian_spectrum", runs),
        Seaborn(drawn, "grid_figures", "remedies", runs),
        Seaborn(drawn, "training_figures", "layer_step_heatmaps", picks),
        Seaborn(drawn, "training_figures", "histograms_over_time", picks),
        Seaborn(drawn, "training_figures", "training_curves", training),
        Seaborn(drawn, "training_figures", "clipping", clipped, every_run),
        Seaborn(drawn, "grid_figures", "outcomes", every_run),
    ]


def time_tasks(runs: pd.DataFrame, time: pd.DataFrame, profiles: pd.DataFrame) -> list[Callable]:
    """The figures of the "Through time" section, for a seaborn process: none where the grid holds no
    recurrent run. `time`, `profiles`: the recurrent runs' ||dL/dh_t|| at step 0 and their logged
    theory/time_profile.parquet (collect)."""
    recurrent = runs[~is_mlp(runs)]
    if recurrent.empty:
        return []
    return [Seaborn(drawn, "time_figures", "through_time", recurrent, time, profiles),
            Seaborn(drawn, "time_figures", "time_slopes", recurrent)]


def paper_section(paper: str | None, runs: pd.DataFrame, layers: pd.DataFrame) -> Seaborn:
    """papers.section (a grid's reproduction of a paper) as a call for a seaborn process (given the
    layer rows only where there is a paper: they are pickled to it)."""
    return Seaborn(drawn, "papers", "section", paper, runs, layers if paper else layers.iloc[:0])
