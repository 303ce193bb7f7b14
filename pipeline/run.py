"""One tracked run, or one group of runs trained together, top to bottom:
open the MLflow runs -> train -> diagnose -> predict (theory) -> record.

    summaries = run_group([config], mnist)                  # `gradbench train`
    summaries = run_group(configs, mnist, parent_run_id=p)  # one group of a grid

This is the only module that knows both training and tracking; neither knows the other.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from . import plots, theory, tracking
from .config import RunConfig, run_name
from .data import Mnist
from .diagnosis import diagnose, first_last_ratio, first_last_time_ratio
from .results import RunResult
from .runtime import shielded
from .train import train


@dataclass(frozen=True)
class RunSummary:
    """What a finished run reports back to the CLI or the grid (one summary line)."""

    run_id: str
    name: str
    outcome: str
    diagnosis: str
    test_acc: float
    seconds: float
    error: str = ""  # why its record could not be made (its run is FAILED; the group's others are not)

    def line(self) -> str:
        if self.error:
            return f"{self.name}: failed to record ({self.error}) (run {self.run_id})"
        return (
            f"{self.name}: {self.outcome}, {self.diagnosis}, test acc {self.test_acc:.4f}, "
            f"{self.seconds:.1f} s (run {self.run_id})"
        )


def predict(config: RunConfig, result: RunResult) -> theory.Prediction:
    """The mean-field gradient prediction from the run's measured input moments (the one prediction
    a run logs: its slope as theory/slope_pred, its profile as theory/profile.parquet)."""
    return theory.predict(config, result.input_sq_mean, result.input_var_mean)


def forward_maps(config: RunConfig, result: RunResult) -> theory.ForwardMaps | None:
    """The q/c-map prediction from the input of the run's first step (None where there is none)."""
    signal = result.signal
    if not signal or signal["steps"][0] != 0 or not np.isfinite(signal["input_sq"][0]):  # the instrument was off
        return None
    return theory.forward_maps(config, float(signal["input_sq"][0]), float(signal["input_cross"][0]))


GRADIENT_SIGNAL = ("zero_fraction", "gsnr")  # per layer, measured only


def signal_table(result: RunResult, maps: theory.ForwardMaps | None) -> pd.DataFrame:
    """signal/propagation.parquet: step x layer x statistic, measured and predicted: q and c of the
    hidden layers (the prediction at step 0 only: later the weights are no longer random); the
    zero fraction and GSNR of every layer's dL/dW (no prediction)."""
    rows = []
    signal = result.signal
    for i, step in enumerate(signal.get("steps", [])):
        for statistic in ("q", "c", *GRADIENT_SIGNAL):
            measured = signal[statistic][i]
            known = maps is not None and step == 0 and statistic in ("q", "c")
            predicted = getattr(maps, statistic) if known else np.full(len(measured), np.nan)
            rows.append(pd.DataFrame({"step": int(step), "layer": np.arange(len(measured)), "statistic": statistic,
                                      "measured": measured, "predicted": predicted}))
    columns = ["step", "layer", "statistic", "measured", "predicted"]
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=columns)


def jacobian_table(result: RunResult, predicted: float) -> pd.DataFrame:
    """signal/jacobian.parquet: step x input x index, the singular values of J = dz_{H-1}/dz_0
    (descending), with the theory's mean squared singular value (`predicted`) beside them at step 0."""
    found = result.jacobian
    rows = []
    for step, values in zip(found["steps"], found["singular_values"]):
        inputs, width = values.shape
        rows.append(pd.DataFrame({"step": int(step), "input": np.repeat(np.arange(inputs), width),
                                  "index": np.tile(np.arange(width), inputs), "singular_value": values.reshape(-1),
                                  "predicted_mean_sq": predicted if step == 0 else math.nan}))
    return pd.concat(rows, ignore_index=True)


def jacobian_metrics(result: RunResult, predicted: float) -> dict[str, float]:
    """The step-0 spectrum in five numbers, and the theory's mean squared singular value."""
    found = result.jacobian
    if not found or found["steps"][0] != 0:
        return {}
    values = found["singular_values"][0].reshape(-1).astype(float)
    with np.errstate(all="ignore"):  # a spectrum that overflowed is NaN: not logged
        return {"jacobian/sv_max": float(values.max()), "jacobian/sv_min": float(values.min()),
                "jacobian/sv_median": float(np.median(values)), "jacobian/sv_mean_sq": float(np.mean(values**2)),
                # the spread, robust to the extremes: sd of log10 of the positive singular values
                "jacobian/sv_log10_sd": float(np.std(np.log10(values[values > 0]))) if (values > 0).any() else math.nan,
                "theory/jacobian_mean_sq": predicted}


def stepped_metrics(result: RunResult) -> list[tuple[str, float, int]]:
    """grad/zero_fraction/Lxx and grad/gsnr/Lxx at each histogram step, as (key, value, step)."""
    signal = result.signal
    return [(tracking.layer_key(f"grad/{statistic}", layer), float(value), int(step))
            for statistic in GRADIENT_SIGNAL
            for step, values in zip(signal.get("steps", []), signal.get(statistic, []))
            for layer, value in enumerate(values)]


def profile_table(prediction: theory.Prediction) -> pd.DataFrame | None:
    """theory/profile.parquet: the predicted ln||dL/dz|| of each hidden layer (0 next to the input,
    the last 0) that theory/slope_pred is fitted on: what the report draws, never a recomputation.
    None where there is no prediction (no hidden layer, or a NaN: SkipInit, see theory.predict)."""
    log_norms = np.asarray(prediction.log_norms, dtype=float)
    if log_norms.size == 0 or not np.isfinite(log_norms).all():
        return None
    return pd.DataFrame({"layer": np.arange(log_norms.size, dtype=np.int64), "log_norm": log_norms})


def summary_metrics(config: RunConfig, result: RunResult, maps: theory.ForwardMaps | None = None,
                    prediction: theory.Prediction | None = None, jacobian_pred: float = math.nan) -> dict[str, float]:
    """One number each: the final test metrics, the gradient ratio at init, the mean-field
    prediction against the slope measured at step 0, and the forward q/c maps against the measured
    q and c at step 0 (NaN where unknown: not logged). `prediction`: predict(config, result);
    `jacobian_pred`: the theory's mean squared singular value of the Jacobian."""
    prediction = prediction or predict(config, result)
    init = result.table[result.table.step == 0].sort_values("layer")
    measured = theory.measured_slope(init.backprop_norm.to_numpy()) if len(init) else math.nan
    forward = {"theory/q_error": math.nan, "theory/c_error": math.nan, "theory/xi_c": math.nan,
               "signal/xi_c_measured": math.nan}
    if maps is not None:
        q, c = result.signal["q"][0], result.signal["c"][0]
        with np.errstate(divide="ignore", invalid="ignore"):
            forward = {
                "theory/q_error": float(np.max(np.abs(q / maps.q - 1))),  # relative, the worst hidden layer
                "theory/c_error": float(np.max(np.abs(c - maps.c))),  # absolute: c is already in [-1, 1]
                "theory/xi_c": maps.xi_c,
                "signal/xi_c_measured": theory.measured_correlation_depth(c, maps.c_star),
            }
    return {
        "final/test_acc": result.final_test_acc,
        "final/test_loss": result.final_test_loss,
        "run/steps": result.steps,
        "run/seconds": result.seconds,
        "grad/first_last_ratio_init": first_last_ratio(result.table, "backprop_norm"),
        "grad/first_last_weight_ratio_init": first_last_ratio(result.table, "weight_grad_norm"),
        "theory/chi1": prediction.chi1,
        "theory/q_star": prediction.q_star,
        "theory/xi": prediction.xi,
        "theory/slope_fixed_point": prediction.slope,
        "theory/slope_pred": prediction.finite_slope,
        "theory/slope_measured": measured,
        "theory/slope_error": measured - prediction.finite_slope,
        **forward,
        **jacobian_metrics(result, jacobian_pred),
    }


@dataclass
class Analysis:
    """What a finished run adds to its training record: the diagnosis, the summary metrics (theory
    beside measurement), tags, figures and tables. Computed without MLflow (the bench times it)."""

    diagnosis: str
    summaries: dict[str, float]
    tags: dict[str, str]
    figures: dict[str, bytes]  # artifact path -> PNG
    tables: dict[str, pd.DataFrame]
    stepped: list[tuple[str, float, int]]  # metrics at the histogram steps: (key, value, step)


# The theory's arithmetic at a configuration's extremes (an init std of 1e300 squared, an exp of a
# huge q): it raises one of these, and the prediction is absent, never the run failed.
THEORY_ERRORS = (ArithmeticError, ValueError)
NO_PREDICTION = theory.Prediction(math.nan, math.nan, math.nan, math.nan, (), math.nan)


def predicted(what: str, call: Callable[[], object], absent: list[str], default=None):
    """call(), or `default` where the theory cannot compute it for this configuration (`absent`
    says why)."""
    try:
        with np.errstate(all="ignore"):
            return call()
    except THEORY_ERRORS as exc:
        absent.append(f"{what}: {type(exc).__name__}: {exc}")
        return default


def time_profile(prediction) -> pd.DataFrame:
    """theory/time_profile.parquet: the predicted ln||dL/dh_t|| of every time step t (the last 0),
    what theory/time_slope_pred is fitted on and the report draws."""
    log_norms = np.asarray(prediction.log_norms, dtype=float)
    return pd.DataFrame({"time": np.arange(log_norms.size, dtype=np.int64), "log_norm": log_norms})


def time_metrics(result: RunResult, prediction) -> dict[str, float]:
    """A recurrent run's gradient through time at step 0: the slope of ln||dL/dh_t|| over t (per
    step towards the start, as theory.measured_time_slope fits it), its first/last ratio, and the
    mean-field slope fitted at the same time points (NaN where there is no prediction)."""
    init = result.time[result.time.step == 0].sort_values("time")
    times = init.time.to_numpy()
    measured = theory.measured_time_slope(times, init.grad_norm.to_numpy()) if len(init) else math.nan
    predicted_slope = prediction.slope_at(times) if prediction is not None and len(init) else math.nan
    return {"time/slope_measured": measured, "time/first_last_ratio_init": first_last_time_ratio(result.time),
            "theory/time_slope_pred": predicted_slope, "theory/time_slope_error": measured - predicted_slope,
            "theory/time_chi": math.nan if prediction is None else prediction.chi}


def spectrum_metrics(result: RunResult) -> list[tuple[str, float, int]]:
    """rnn/spectral_radius and rnn/sv_max of the recurrent W at each histogram step, (key, value, step)."""
    found = result.spectrum
    return [(f"rnn/{name}", float(value), int(step)) for name in ("spectral_radius", "sv_max")
            for step, value in zip(found.get("steps", []), found.get(name, []))]


def analyse_recurrent(config: RunConfig, result: RunResult) -> Analysis:
    """analyse() for arch rnn, lstm and gru: the diagnosis and theory through time (the MLP's
    depth-wise theory does not apply)."""
    diagnosis = diagnose(result.outcome, result.table, time=result.time)
    absent: list[str] = []
    prediction = predicted("gradient through time",
                           lambda: theory.predict_time(config, result.input_sq_by_time), absent)
    tables = {"gradients/time_stats.parquet": result.time}
    profile = None
    if prediction is not None and np.isfinite(prediction.log_norms).all():
        profile = tables["theory/time_profile.parquet"] = time_profile(prediction)
    figures = {} if result.time.empty else {
        "plots/gradient_flow_time.png": plots.png(plots.time_flow(result.time, run_name(config), profile))}
    tags = {tracking.TAG_OUTCOME: result.outcome, tracking.TAG_DIAGNOSIS: diagnosis}
    if absent:
        tags[tracking.TAG_THEORY_ABSENT] = "; ".join(absent)[:4000]
    summaries = {"final/test_acc": result.final_test_acc, "final/test_loss": result.final_test_loss,
                 "run/steps": result.steps, "run/seconds": result.seconds, **time_metrics(result, prediction)}
    return Analysis(diagnosis, summaries, tags, figures, tables, stepped_metrics(result) + spectrum_metrics(result))


def analyse(config: RunConfig, result: RunResult) -> Analysis:
    if config.arch != "mlp":
        return analyse_recurrent(config, result)
    diagnosis = diagnose(result.outcome, result.table)
    figures = {} if result.table.empty else {
        "plots/gradient_flow.png": plots.png(plots.gradient_flow(result.table, run_name(config)))}
    absent: list[str] = []  # the predictions theory could not make, and why
    maps = predicted("q/c maps", lambda: forward_maps(config, result), absent)
    prediction = predicted("gradient profile", lambda: predict(config, result), absent, NO_PREDICTION)
    jacobian_pred = math.nan if maps is None else predicted(
        "Jacobian", lambda: theory.jacobian_mean_sq(config, maps.q), absent, math.nan)
    tables = {"signal/propagation.parquet": signal_table(result, maps)} if result.signal else {}
    if result.jacobian:
        tables["signal/jacobian.parquet"] = jacobian_table(result, jacobian_pred)
    profile = profile_table(prediction)
    if profile is not None:
        tables["theory/profile.parquet"] = profile
    tags = {tracking.TAG_OUTCOME: result.outcome, tracking.TAG_DIAGNOSIS: diagnosis}
    if absent:
        tags[tracking.TAG_THEORY_ABSENT] = "; ".join(absent)[:4000]
    return Analysis(diagnosis, summary_metrics(config, result, maps, prediction, jacobian_pred), tags, figures,
                    tables, stepped_metrics(result))


@dataclass
class Trained:
    """A group that has trained and is not recorded yet: what `record` needs, in this process or
    in the grid's recorder process (picklable: the loggers travel without their client)."""

    configs: list[RunConfig]
    loggers: list[tracking.RunLogger]
    results: list[RunResult]


def fail_runs(loggers: Sequence[tracking.RunLogger], exc: BaseException) -> None:
    """Mark these runs as an exception ends them (tracking.ended_by: an interrupt KILLED, anything
    else FAILED), each write whole."""
    with shielded():
        for logger in loggers:
            logger.fail(tracking.ended_by(exc))


def open_and_train(
    configs: Sequence[RunConfig],
    data: Mnist,
    experiment: str = tracking.EXPERIMENT,
    parent_run_id: str | None = None,
    grid: str | None = None,
    client: tracking.MlflowClient | None = None,
    clock: Callable[[int], None] | None = None,
) -> Trained:
    """Open a run per config and train the group. Any exception marks the runs opened so far
    FAILED, an interrupt KILLED, so that a resumed grid redoes them. `clock`: see train.train."""
    client = client or tracking.get_client()
    group = (uuid.uuid4().hex[:12], len(configs))
    loggers: list[tracking.RunLogger] = []
    # SIGTERM lands in training, or between two tracking writes, never inside one (shielded):
    # a run is opened whole, ended whole, and an interrupt always finds it in `loggers`
    try:
        for config in configs:
            with shielded():
                loggers.append(tracking.RunLogger.start(config, experiment, parent_run_id, grid, client, group))
        with shielded():
            for logger in loggers:
                logger.log_dataset(data.location, data.digest)
        results = train(configs, data, loggers, clock=clock)
    except BaseException as exc:
        fail_runs(loggers, exc)
        raise
    return Trained(list(configs), loggers, results)


def record(trained: Trained, client: tracking.MlflowClient | None = None, take_over: bool = False) -> list[RunSummary]:
    """Diagnose, predict and record each member of a trained group, and mark its run FINISHED (a
    diverged run too: it is a result). A member whose analysis raises is FAILED on its own (its
    summary says why); any other exception marks the runs not yet finished FAILED, an interrupt
    KILLED. take_over: another process opened the runs (the grid's recorder records them): each
    run is first tagged with this process's pid."""
    loggers = trained.loggers
    client = client or loggers[0].client or tracking.get_client()
    for logger in loggers:
        logger.client = client
    summaries: list[RunSummary] = []
    try:
        if take_over:
            with shielded():
                for logger in loggers:
                    logger.take_over()
        for config, logger, result in zip(trained.configs, loggers, trained.results):
            try:
                found = analyse(config, result)
            except Exception as exc:  # this member's record cannot be made: its run FAILED, the others go on
                with shielded():
                    logger.fail()
                    summaries.append(RunSummary(logger.run_id, run_name(config), "failed", "", math.nan, result.seconds,
                                                f"{type(exc).__name__}: {exc}"))
                continue
            with shielded():
                logger.finish(result, found.summaries, found.tags, found.figures, found.tables, found.stepped)
                summaries.append(RunSummary(logger.run_id, run_name(config), result.outcome, found.diagnosis,
                                            result.final_test_acc, result.seconds))
    except BaseException as exc:
        fail_runs(loggers[len(summaries):], exc)
        raise
    return summaries


def run_group(
    configs: Sequence[RunConfig],
    data: Mnist,
    experiment: str = tracking.EXPERIMENT,
    parent_run_id: str | None = None,
    grid: str | None = None,
    client: tracking.MlflowClient | None = None,
    clock: Callable[[int], None] | None = None,
) -> list[RunSummary]:
    """Train `configs` together (a group of one for a single run), each into its own MLflow run,
    and record them: open_and_train, then record, in this process."""
    return record(open_and_train(configs, data, experiment, parent_run_id, grid, client, clock))
