"""The one module that talks to MLflow: experiments, runs, params, batched metrics, artifacts.

It uses `MlflowClient` only (no fluent, process-global active run), so a grid can hold a parent and
a child open at once and workers can log in parallel. The tracking URI is MLflow's own: the
embedded default store unless MLFLOW_TRACKING_URI says otherwise.

Under `mlflow run`, MLflow has created the run before the entry point starts (MLFLOW_RUN_ID) and
logged the -P parameters as strings: a stage adopts that run instead of creating one.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import yaml
from mlflow import MlflowClient
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from . import plots, theory
from .config import GridSpec, RunConfig
from .data import Mnist
from .diagnosis import diagnose, first_last_ratio
from .monitor import Chunk, act_statistic
from .train import ChunkSink, RunResult, train

# One progress bar per artifact download drowns the report's output; users can still turn it on.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

EXPERIMENT = "gradbench"
TAG_CONFIG_HASH = "gradbench.config_hash"
TAG_GRID = "gradbench.grid"
TAG_DIAGNOSIS = "gradbench.diagnosis"
TAG_OUTCOME = "gradbench.outcome"
TAG_SPEC_HASH = "gradbench.spec_hash"
TAG_ROLE = "gradbench.role"  # "grid" on a grid's parent run
TAG_HOST = "gradbench.host"  # where a run's process lives: lets a resume tell dead runs from live ones
TAG_PID = "gradbench.pid"
MAX_METRICS_PER_CALL = 1000  # MLflow's limit for one log_batch call
MAX_PARAMS_PER_CALL = 100

# Metric key prefix of each statistic; per-layer keys end in /L00, /L01, ...
STEP_METRICS = {
    "loss": "train/loss",
    "acc": "train/acc",
    "global_norm_pre_clip": "grad/global_norm_pre_clip",
    "global_norm_post_clip": "grad/global_norm_post_clip",
    "clip_active": "clip/active",
}
LAYER_METRICS = {"weight_grad_norm": "grad/weight_norm", "backprop_norm": "grad/backprop_norm", "update_ratio": "update/ratio"}


def layer_key(prefix: str, layer: int) -> str:
    return f"{prefix}/L{layer:02d}"


def get_client() -> MlflowClient:
    return MlflowClient()


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created if missing (safe when several processes race)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # another process created it between our two calls
        return client.get_experiment_by_name(name).experiment_id


def run_name(config: RunConfig) -> str:
    clip = "noclip" if config.clip == "none" else f"{config.clip}{config.clip_threshold:g}"
    init = f"normal{config.init_std:g}" if config.init == "normal" else config.init
    return f"{config.activation}-d{config.depth}-w{config.width}-{init}-{clip}-s{config.seed}"


def _same_param(existing: str, value: object) -> bool:
    """MLflow params are strings: '1e-2' from `mlflow run -P` and 0.01 from the CLI are the same."""
    if existing == str(value):
        return True
    try:
        return float(existing) == float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def log_dataset(client: MlflowClient, run_id: str, source: str, digest: str, attempts: int = 3) -> None:
    """Log MNIST (name "mnist", `digest`) as the training input of a run.

    MLflow's SQL store looks the dataset up and inserts it when missing, in two steps: runs that
    log the same new dataset at once can both miss it, and all but one then fail on the unique
    constraint. The winner's row exists by then, so trying again links to it."""
    with warnings.catch_warnings():  # a local folder matches two equivalent source classes
        warnings.simplefilter("ignore", UserWarning)
        resolved = resolve_dataset_source(source)
    dataset = MetaDataset(source=resolved, name="mnist", digest=digest)
    inputs = [DatasetInput(dataset._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, "training")])]
    for attempt in range(attempts):
        try:
            client.log_inputs(run_id, inputs)
            return
        except MlflowException as exc:
            if attempt == attempts - 1 or not _is_unique_violation(exc):
                raise


def _is_unique_violation(exc: MlflowException) -> bool:
    text = str(exc).lower()  # SQLite, PostgreSQL and MySQL say it differently; a server relays it
    return "unique constraint" in text or "duplicate key" in text or "duplicate entry" in text


class RunLogger(ChunkSink):
    """Streams one training run into one MLflow run: metrics at a stride, then artifacts."""

    def __init__(self, client: MlflowClient, run_id: str, config: RunConfig):
        self.client = client
        self.run_id = run_id
        self.config = config
        self.act_key = f"act/{act_statistic(config.activation)}"
        self._last_logged_step = -1
        self._last_chunk: Chunk | None = None

    @classmethod
    def start(
        cls,
        config: RunConfig,
        experiment: str = EXPERIMENT,
        parent_run_id: str | None = None,
        grid: str | None = None,
        client: MlflowClient | None = None,
    ) -> RunLogger:
        """Open the run for `config`: a new one, a child of `parent_run_id`, or the `mlflow run` one."""
        client = client or get_client()
        tags = {TAG_CONFIG_HASH: config.config_hash(), MLFLOW_RUN_NAME: run_name(config),
                TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid())}
        if grid:
            tags[TAG_GRID] = grid
        env_run = os.environ.get("MLFLOW_RUN_ID")
        if env_run and parent_run_id is None:
            run_id = env_run
        else:
            if parent_run_id:
                tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
            run = client.create_run(experiment_id(client, experiment), run_name=run_name(config), tags=tags)
            run_id = run.info.run_id
        logger = cls(client, run_id, config)
        try:
            logger._log_params_and_tags(tags)
        except BaseException as exc:  # an interrupt here must not leave the new run RUNNING
            logger.fail(_ended_by(exc))
            raise
        return logger

    def _log_params_and_tags(self, tags: dict[str, str]) -> None:
        existing = self.client.get_run(self.run_id).data.params
        params = []
        for key, value in self.config.to_dict().items():
            if key in existing:
                if not _same_param(existing[key], value):
                    raise ValueError(f"run {self.run_id} already has {key}={existing[key]!r}, not {value!r}")
                continue
            params.append(Param(key, str(value)))
        for i in range(0, max(len(params), 1), MAX_PARAMS_PER_CALL):
            batch_tags = [RunTag(k, v) for k, v in tags.items()] if i == 0 else []
            self.client.log_batch(self.run_id, params=params[i : i + MAX_PARAMS_PER_CALL], tags=batch_tags)
        self.client.log_text(self.run_id, self.config.to_json(), "config.json")

    def log_dataset(self, source: str, digest: str) -> None:
        log_dataset(self.client, self.run_id, source, digest)

    # -- ChunkSink: called by the training loop ---------------------------------------------------

    def on_chunk(self, chunk: Chunk) -> None:
        self._last_chunk = chunk
        rows = [i for i, s in enumerate(chunk.step) if s % self.config.log_every == 0]
        self._log_rows(chunk, rows)

    def on_eval(self, step: int, loss: float, acc: float) -> None:
        self._log_metrics([Metric("test/loss", loss, _now(), step), Metric("test/acc", acc, _now(), step)])

    def _log_rows(self, chunk: Chunk, rows: list[int]) -> None:
        now = _now()
        metrics = []
        for i in rows:
            step = int(chunk.step[i])
            for name, key in STEP_METRICS.items():
                metrics.append(Metric(key, float(chunk.per_step[name][i]), now, step))
            for name, prefix in LAYER_METRICS.items() if chunk.per_layer else ():
                for layer, value in enumerate(chunk.per_layer[name][i]):
                    metrics.append(Metric(layer_key(prefix, layer), float(value), now, step))
            if chunk.per_layer:
                act = chunk.per_layer["act"][i]
                for layer in range(len(act) - 1):  # hidden layers only
                    metrics.append(Metric(layer_key(self.act_key, layer), float(act[layer]), now, step))
            self._last_logged_step = step
        self._log_metrics(metrics)

    def _log_metrics(self, metrics: list[Metric]) -> None:
        # Synchronous on purpose: MLflow's asynchronous mode (synchronous=False) costs a fixed ~0.7 s
        # per run when set_terminated shuts its queue down, far more than these batches take.
        for i in range(0, len(metrics), MAX_METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + MAX_METRICS_PER_CALL])

    # -- end of run -------------------------------------------------------------------------------

    def finish(self, result: RunResult) -> str:
        """Log the last step, summaries, artifacts and tags; mark the run FINISHED. Returns the diagnosis."""
        chunk = self._last_chunk
        if chunk is not None and len(chunk.step) and int(chunk.step[-1]) != self._last_logged_step:
            self._log_rows(chunk, [len(chunk.step) - 1])
        diagnosis = diagnose(result.outcome, result.table)
        last = max(result.steps - 1, 0)
        summaries = {
            "final/test_acc": result.final_test_acc,
            "final/test_loss": result.final_test_loss,
            "run/steps": result.steps,
            "run/seconds": result.seconds,
            "grad/first_last_ratio_init": first_last_ratio(result.table, "backprop_norm"),
            "grad/first_last_weight_ratio_init": first_last_ratio(result.table, "weight_grad_norm"),
        }
        summaries.update(theory_metrics(self.config, result))
        self._log_metrics([Metric(k, float(v), _now(), last) for k, v in summaries.items() if math.isfinite(v)])
        self._log_artifacts(result)
        self.client.log_batch(
            self.run_id, tags=[RunTag(TAG_OUTCOME, result.outcome), RunTag(TAG_DIAGNOSIS, diagnosis)]
        )
        self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.FINISHED))
        return diagnosis

    def fail(self, status: str = "FAILED") -> None:
        """Mark the run FAILED or KILLED (an exception or an interrupt, not a diverged run)."""
        self.client.set_terminated(self.run_id, status)

    def _log_artifacts(self, result: RunResult) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            table_path = Path(tmp) / "layer_stats.parquet"
            result.table.to_parquet(table_path, index=False)
            self.client.log_artifact(self.run_id, str(table_path), "gradients")
            hist_path = Path(tmp) / "histograms.npz"
            np.savez_compressed(hist_path, **result.histograms)
            self.client.log_artifact(self.run_id, str(hist_path), "gradients")
        if not result.table.empty:
            fig = plots.gradient_flow(result.table, run_name(self.config))
            self.client.log_figure(self.run_id, fig, "plots/gradient_flow.png", save_kwargs={"dpi": 72})
            plt.close(fig)


def _now() -> int:
    return int(time.time() * 1000)


def theory_metrics(config: RunConfig, result: RunResult) -> dict[str, float]:
    """Mean-field prediction for the config against the slope measured at step 0."""
    prediction = theory.predict(config, result.input_sq_mean)
    init = result.table[result.table.step == 0].sort_values("layer")
    measured = theory.measured_slope(init.backprop_norm.to_numpy()) if len(init) else math.nan
    return {
        "theory/chi1": prediction.chi1,
        "theory/q_star": prediction.q_star,
        "theory/xi": prediction.xi,
        "theory/slope_fixed_point": prediction.slope,
        "theory/slope_pred": prediction.finite_slope,
        "theory/slope_measured": measured,
        "theory/slope_error": measured - prediction.finite_slope,
    }


def _ended_by(exc: BaseException) -> str:
    """The status of runs that an exception ends: an interrupt KILLED, anything else FAILED."""
    return "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"


def interrupt_on_sigterm() -> None:
    """SIGTERM (a scheduler stopping the job, pool.terminate()) unwinds like Ctrl-C, so that the
    open runs are marked KILLED. Python allows signal handlers in the main thread only."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


@dataclass(frozen=True)
class RunSummary:
    """What a finished run reports back to the CLI or the grid (one summary line)."""

    run_id: str
    name: str
    outcome: str
    diagnosis: str
    test_acc: float
    seconds: float

    def line(self) -> str:
        return (
            f"{self.name}: {self.outcome}, {self.diagnosis}, test acc {self.test_acc:.4f}, "
            f"{self.seconds:.1f} s (run {self.run_id})"
        )


def tracked_train(
    config: RunConfig,
    data: Mnist,
    experiment: str = EXPERIMENT,
    parent_run_id: str | None = None,
    grid: str | None = None,
    client: MlflowClient | None = None,
) -> RunSummary:
    """Train one config into one MLflow run. A diverged run is FINISHED (it is a result); an
    exception marks the run FAILED and an interrupt KILLED, so that a resumed grid redoes it."""
    logger = RunLogger.start(config, experiment, parent_run_id, grid, client)
    try:
        logger.log_dataset(data.location, data.digest)
        result = train(config, data, logger)
        diagnosis = logger.finish(result)
    except BaseException as exc:
        logger.fail(_ended_by(exc))
        raise
    return RunSummary(logger.run_id, run_name(config), result.outcome, diagnosis, result.final_test_acc, result.seconds)


# -- grids: one parent run per spec, children found by config hash -----------------------------------


def search_all(client: MlflowClient, experiment_id: str, filter_string: str = "") -> list:
    """Every run matching the filter (search_runs pages through at most 50,000 at a time)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=50_000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def finished_config_hashes(client: MlflowClient, experiment_id: str) -> set[str]:
    """Config hashes that already have a FINISHED run in the experiment (diverged runs included)."""
    runs = search_all(client, experiment_id, f"attributes.status = 'FINISHED' and tags.`{TAG_CONFIG_HASH}` LIKE '%'")
    return {r.data.tags[TAG_CONFIG_HASH] for r in runs}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def fail_stale_runs(client: MlflowClient, experiment_id: str, grid: str) -> int:
    """Mark FAILED the RUNNING children of this grid whose process, on this host, is gone (killed
    outright, so it could not mark them itself). Runs of other hosts are left alone: another
    machine may be running the same spec right now. Returns how many were marked."""
    running = search_all(
        client, experiment_id, f"attributes.status = 'RUNNING' and tags.`{TAG_GRID}` = '{grid}' and tags.`{TAG_CONFIG_HASH}` LIKE '%'"
    )
    host = socket.gethostname()
    stale = [
        r for r in running
        if r.data.tags.get(TAG_HOST) == host and not _alive(int(r.data.tags.get(TAG_PID, "0") or 0))
    ]
    for run in stale:
        client.set_terminated(run.info.run_id, "FAILED")
    return len(stale)


def fail_earlier_attempts(client: MlflowClient, parent_run_id: str, config: RunConfig) -> int:
    """Before a retried task starts its run: mark the attempts of the same config under the same
    parent that are still RUNNING FAILED (their worker was lost; the retry replaces them)."""
    experiment = client.get_run(parent_run_id).info.experiment_id
    earlier = search_all(
        client, experiment,
        f"attributes.status = 'RUNNING' and tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}' "
        f"and tags.`{TAG_CONFIG_HASH}` = '{config.config_hash()}'",
    )
    for run in earlier:
        client.set_terminated(run.info.run_id, "FAILED")
    return len(earlier)


def open_grid_run(client: MlflowClient, spec: GridSpec, experiment: str) -> tuple[str, str]:
    """(experiment id, parent run id) for a grid: the `mlflow run` run if there is one, else the
    unfinished parent of an interrupted run of the same spec (resumed), else a new run."""
    env_run = os.environ.get("MLFLOW_RUN_ID")
    if env_run:
        run = client.get_run(env_run)
        exp_id, parent_id = run.info.experiment_id, env_run
    else:
        exp_id = experiment_id(client, experiment)
        previous = search_all(
            client, exp_id, f"tags.`{TAG_SPEC_HASH}` = '{spec.spec_hash}' and attributes.status != 'FINISHED'"
        )
        if previous:
            parent_id = max(previous, key=lambda r: r.info.start_time).info.run_id
            client.update_run(parent_id, status="RUNNING")
        else:
            parent_id = client.create_run(exp_id, run_name=spec.name).info.run_id
    tags = {TAG_ROLE: "grid", TAG_GRID: spec.name, TAG_SPEC_HASH: spec.spec_hash, MLFLOW_RUN_NAME: spec.name}
    client.log_batch(parent_id, tags=[RunTag(k, v) for k, v in tags.items()])
    existing = client.get_run(parent_id).data.params
    if "grid_runs" not in existing:
        client.log_batch(parent_id, params=[Param("grid_runs", str(len(spec.configs)))])
    client.log_text(parent_id, spec.source, "spec.yaml")
    return exp_id, parent_id


def close_grid_run(client: MlflowClient, parent_id: str, counts: dict[str, int], seconds: float, status: str) -> None:
    metrics = [Metric(f"grid/{k}", float(v), _now(), 0) for k, v in counts.items()]
    metrics.append(Metric("grid/seconds", seconds, _now(), 0))
    client.log_batch(parent_id, metrics=metrics)
    client.set_terminated(parent_id, status)


# -- reading back: what the report stage needs, from MLflow alone ----------------------------------


class NotFound(LookupError):
    """The experiment, grid or run asked for is not in the tracking store."""


def find_grid_run(client: MlflowClient, experiment: str, grid_run_id: str | None = None):
    """The grid's parent run: `grid_run_id`; else the `mlflow run` run if it is a grid (the main
    entry point); else the latest grid in the experiment (the `mlflow run` one's, if any)."""
    if grid_run_id:
        run = _get_run(client, grid_run_id)
        if run.data.tags.get(TAG_ROLE) != "grid":
            raise NotFound(f"run {grid_run_id} is not a grid's parent run")
        return run
    env_run = os.environ.get("MLFLOW_RUN_ID")
    if env_run:
        run = _get_run(client, env_run)
        if run.data.tags.get(TAG_ROLE) == "grid":
            return run
        found = client.get_experiment(run.info.experiment_id)
    else:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise NotFound(f"no experiment {experiment!r} in {mlflow.get_tracking_uri()}: run `gradbench grid SPEC` first")
    grids = search_all(client, found.experiment_id, f"tags.`{TAG_ROLE}` = 'grid'")
    if not grids:
        raise NotFound(f"experiment {found.name!r} has no grid runs: run `gradbench grid SPEC` first")
    return max(grids, key=lambda r: r.info.start_time)


def _get_run(client: MlflowClient, run_id: str):
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise NotFound(f"no run {run_id} in the tracking store {mlflow.get_tracking_uri()}") from None


def grid_spec_of(client: MlflowClient, parent) -> GridSpec:
    """The spec a grid ran, from its spec.yaml artifact."""
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(parent.info.run_id, "spec.yaml", tmp)
        text = Path(path).read_text()
    raw = yaml.safe_load(text) or {}
    return GridSpec.from_dict(raw, default_name=parent.data.tags.get(TAG_GRID, "grid"), source=text)


def latest_finished_runs(client: MlflowClient, experiment_id: str, hashes: set[str]) -> dict[str, object]:
    """config hash -> its most recent FINISHED run in the experiment (the run a resume would skip to)."""
    runs = search_all(client, experiment_id, f"attributes.status = 'FINISHED' and tags.`{TAG_CONFIG_HASH}` LIKE '%'")
    latest: dict[str, object] = {}
    for run in runs:
        h = run.data.tags[TAG_CONFIG_HASH]
        if h in hashes and (h not in latest or run.info.start_time > latest[h].info.start_time):
            latest[h] = run
    return latest


def download_artifact(client: MlflowClient, run_id: str, path: str, dst: str) -> Path | None:
    """A run's artifact as a local file, or None if the run does not have it."""
    try:
        return Path(client.download_artifacts(run_id, path, dst))
    except (MlflowException, OSError):
        return None


def log_report(client: MlflowClient, parent_run_id: str, path: Path) -> None:
    client.log_artifact(parent_run_id, str(path), "report")


def run_url(run) -> str | None:
    """Link to a run in the MLflow UI, when the tracking URI is a server."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"


def tracked_train_ensemble(
    configs: list[RunConfig],
    data: Mnist,
    experiment: str = EXPERIMENT,
    parent_run_id: str | None = None,
    grid: str | None = None,
    client: MlflowClient | None = None,
) -> list[RunSummary]:
    """Train configs together (ensemble.train_ensemble), each into its own MLflow run, with exactly
    the params, metrics and artifacts that tracked_train gives it."""
    from .ensemble import train_ensemble

    client = client or get_client()
    loggers: list[RunLogger] = []
    finished: list[str] = []
    try:
        for config in configs:  # inside the try: an interrupt here ends the runs already opened
            loggers.append(RunLogger.start(config, experiment, parent_run_id, grid, client))
        for logger in loggers:
            logger.log_dataset(data.location, data.digest)
        results = train_ensemble(configs, data, loggers)
        for logger, result in zip(loggers, results):
            finished.append(logger.finish(result))
    except BaseException as exc:
        for logger in loggers[len(finished):]:
            logger.fail(_ended_by(exc))
        raise
    return [
        RunSummary(lg.run_id, run_name(c), r.outcome, d, r.final_test_acc, r.seconds)
        for lg, c, r, d in zip(loggers, configs, results, finished)
    ]
