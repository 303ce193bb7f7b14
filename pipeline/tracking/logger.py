"""RunLogger: streams one training run into one MLflow run. It only logs: it is handed chunks while
training runs, then the finished summaries, tags, tables and figures.

Under `mlflow run -e train`, MLflow has created the run before the entry point starts
(MLFLOW_RUN_ID) and logged the -P parameters as strings: a single run adopts that run.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from ..activations import ACTIVATIONS
from ..config import NUMBERS_VERSION, RunConfig, run_name, state_activation
from ..results import Chunk, RunResult, summary_table
from .store import (
    EXPERIMENT,
    MAX_METRICS_PER_CALL,
    MAX_PARAMS_PER_CALL,
    TAG_CONFIG_HASH,
    TAG_GRID,
    TAG_GROUP,
    TAG_GROUP_SIZE,
    TAG_HOST,
    TAG_NUMBERS_VERSION,
    TAG_PID,
    TAG_RECORDER_PID,
    experiment_id,
    get_client,
    log_dataset,
    now_ms,
    unreachable,
)

# Metric key of each per-step statistic, and the prefix of each per-layer one (keys end in /L00, /L01, ...)
STEP_METRICS = {
    "loss": "train/loss",
    "acc": "train/acc",
    "global_norm_pre_clip": "grad/global_norm_pre_clip",
    "global_norm_post_clip": "grad/global_norm_post_clip",
    "clip_active": "clip/active",
}
LOSS_SCALE_METRIC = "train/loss_scale"  # fp16 runs only (1 in every other run)
LAYER_METRICS = {"weight_grad_norm": "grad/weight_norm", "backprop_norm": "grad/backprop_norm", "update_ratio": "update/ratio"}
# With --log-every 0 (the default) a run logs at most about this many metric values: half to the
# per-step curves (loss, accuracy, norms: the ones read in the UI), half to the per-layer ones.
# MLflow's SQLite store costs about 0.2 ms per value; every step of every statistic is in the
# run's gradients/layer_stats.parquet artifact anyway.
METRIC_BUDGET = 500
# Metrics are written in batches: when a batch is full, or this long after the last write (so
# that a long run's curves still move in the UI), and at the end of the run.
FLUSH_SECONDS = 10.0


def metric_strides(config: RunConfig) -> tuple[int, int]:
    """(stride of the per-step metrics, stride of the per-layer metrics), in steps: each kind gets
    half the budget (step 0 and the last step at least, however deep the net)."""
    if config.log_every:
        return config.log_every, config.log_every

    def stride(values_per_step: int) -> int:
        points = max(2, METRIC_BUDGET // 2 // values_per_step)  # the last step comes on top of the stride's
        return max(1, -(-config.total_steps // (points - 1)))

    per_layer_values = len(LAYER_METRICS) * config.weight_layers + config.weight_layers - 1  # act: hidden layers only
    return stride(len(STEP_METRICS)), stride(per_layer_values)


def layer_key(prefix: str, layer: int) -> str:
    return f"{prefix}/L{layer:02d}"


def ended_by(exc: BaseException) -> str:
    """The status of runs that an exception ends: an interrupt KILLED (a generator closed because
    its consumer was interrupted too), anything else FAILED."""
    return "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)) else "FAILED"


def _same_param(existing: str, value: object) -> bool:
    """MLflow params are strings: '1e-2' from `mlflow run -P` and 0.01 from the CLI are the same."""
    if existing == str(value):
        return True
    try:
        return float(existing) == float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


class RunLogger:
    """One MLflow run: params and tags at the start, metrics at a stride while training, then the
    summaries, artifacts and the final status."""

    def __init__(self, client: MlflowClient, run_id: str, config: RunConfig):
        self.client = client
        self.run_id = run_id
        self.config = config
        self.act_key = f"act/{ACTIVATIONS[state_activation(config)].statistic}"
        self._step_logged_at = self._layer_logged_at = -1  # the last step each kind was logged at
        self._pending: list[Metric] = []  # metrics not yet written
        self._written_at = time.monotonic()
        self._last_chunk: Chunk | None = None
        self.step_stride, self.layer_stride = metric_strides(config)
        self.step_metrics = dict(STEP_METRICS, **({"loss_scale": LOSS_SCALE_METRIC} if config.precision == "fp16" else {}))

    def __getstate__(self) -> dict:
        """Pickled (to the grid's recorder process) without the client: the receiver attaches its own."""
        return {**self.__dict__, "client": None}

    @classmethod
    def start(
        cls,
        config: RunConfig,
        experiment: str = EXPERIMENT,
        parent_run_id: str | None = None,
        grid: str | None = None,
        client: MlflowClient | None = None,
        group: tuple[str, int] | None = None,
    ) -> RunLogger:
        """Open the run for `config`: a child of `parent_run_id`, the `mlflow run` one (a single run
        without a parent), or a new one. `group` is (id, size) of the members trained together."""
        client = client or get_client()
        group_id, group_size = group or ("", 1)
        tags = {TAG_CONFIG_HASH: config.config_hash(), MLFLOW_RUN_NAME: run_name(config),
                TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid()),
                TAG_NUMBERS_VERSION: str(NUMBERS_VERSION), TAG_GROUP_SIZE: str(group_size)}
        if group_id:
            tags[TAG_GROUP] = group_id
        if grid:
            tags[TAG_GRID] = grid
        env_run = os.environ.get("MLFLOW_RUN_ID")
        adopted = bool(env_run and parent_run_id is None and group_size == 1)
        if adopted:
            run_id = env_run
        else:
            if parent_run_id:
                tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
            run = client.create_run(experiment_id(client, experiment), run_name=run_name(config), tags=tags)
            run_id = run.info.run_id
        logger = cls(client, run_id, config)
        try:
            if adopted:  # mlflow run's run: it may hold params already, and none of these tags
                logger._log_params_and_tags(tags, client.get_run(run_id).data.params)
            else:  # created above with its tags and no params: one write, no read
                logger._log_params_and_tags({}, {})
        except BaseException as exc:  # an interrupt here must not leave the new run RUNNING
            logger.fail(ended_by(exc))
            raise
        return logger

    def _log_params_and_tags(self, tags: dict[str, str], existing: dict[str, str]) -> None:
        """The config as params (those not in `existing`, the run's params, which must agree), and `tags`."""
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

    def take_over(self) -> None:
        """This process records the run from now on (the grid's recorder): a resume waits for it."""
        self.client.set_tag(self.run_id, TAG_RECORDER_PID, str(os.getpid()))

    def log_dataset(self, source: str, digest: str) -> None:
        log_dataset(self.client, self.run_id, source, digest)

    # -- called while training runs (train.ChunkSink) -----------------------------------------------

    def on_chunk(self, chunk: Chunk) -> None:
        self._last_chunk = chunk
        rows = [i for i, s in enumerate(chunk.step) if s % self.step_stride == 0 or s % self.layer_stride == 0]
        self._queue(self._row_metrics(chunk, rows))

    def on_eval(self, step: int, loss: float, acc: float) -> None:
        self._queue([Metric("test/loss", loss, now_ms(), step), Metric("test/acc", acc, now_ms(), step)])

    def _queue(self, metrics: list[Metric]) -> None:
        self._pending += metrics
        if len(self._pending) >= MAX_METRICS_PER_CALL or time.monotonic() - self._written_at > FLUSH_SECONDS:
            self._log_metrics(self._pending)
            self._pending = []

    @staticmethod
    def _due(step: int, stride: int, logged_at: int, last: bool) -> bool:
        if logged_at == step:  # the last step can be on the stride: logged once
            return False
        return last or step % stride == 0

    def _row_metrics(self, chunk: Chunk, rows: list[int], last: bool = False) -> list[Metric]:
        """The metrics of the chunk's rows: the per-step metrics on their stride, the per-layer ones on theirs;
        last=True (the run's last step): each kind that is not logged at that step yet."""
        now = now_ms()
        metrics = []
        for i in rows:
            step = int(chunk.step[i])
            if self._due(step, self.step_stride, self._step_logged_at, last):
                for name, key in self.step_metrics.items():
                    metrics.append(Metric(key, float(chunk.per_step[name][i]), now, step))
                self._step_logged_at = step
            if not chunk.per_layer or not self._due(step, self.layer_stride, self._layer_logged_at, last):
                continue
            for name, prefix in LAYER_METRICS.items():
                for layer, value in enumerate(chunk.per_layer[name][i]):
                    metrics.append(Metric(layer_key(prefix, layer), float(value), now, step))
            act = chunk.per_layer["act"][i]
            for layer in range(len(act) - 1):  # hidden layers only
                metrics.append(Metric(layer_key(self.act_key, layer), float(act[layer]), now, step))
            self._layer_logged_at = step
        return metrics

    def _log_metrics(self, metrics: list[Metric], tags: list[RunTag] | None = None) -> None:
        # Synchronous on purpose: MLflow's asynchronous mode (synchronous=False) costs a fixed ~0.7 s
        # per run when set_terminated shuts its queue down, far more than these batches take.
        for i in range(0, max(len(metrics), 1 if tags else 0), MAX_METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + MAX_METRICS_PER_CALL],
                                  tags=(tags or []) if i == 0 else [])
        self._written_at = time.monotonic()

    # -- end of run -------------------------------------------------------------------------------

    def finish(self, result: RunResult, summaries: dict[str, float], tags: dict[str, str],
               figures: dict[str, bytes], tables: dict[str, pd.DataFrame] | None = None,
               stepped: list[tuple[str, float, int]] = ()) -> None:
        """Log the layer table, histograms, other tables (artifact path -> DataFrame, written as
        parquet) and figures (artifact path -> PNG bytes); then the last step's metrics, the finite
        summaries (at the last step), the finite `stepped` metrics (key, value, step) and the tags;
        then mark the run FINISHED."""
        chunk = self._last_chunk
        metrics = self._pending
        if chunk is not None and len(chunk.step):
            metrics += self._row_metrics(chunk, [len(chunk.step) - 1], last=True)
        last = max(result.steps - 1, 0)
        metrics += [Metric(k, float(v), now_ms(), last) for k, v in summaries.items() if math.isfinite(v)]
        metrics += [Metric(k, float(v), now_ms(), step) for k, v, step in stepped if math.isfinite(v)]
        # every artifact into one folder, then one log_artifacts call (each call costs a store round trip)
        with tempfile.TemporaryDirectory() as tmp:
            files = {"config.json": self.config.to_json(), "gradients/layer_stats.parquet": result.table,
                     "gradients/summary.parquet": summary_table(result.table),
                     "gradients/histograms.npz": result.histograms, **(tables or {}), **figures}
            for artifact, content in files.items():
                path = Path(tmp, artifact)
                path.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, str):
                    path.write_text(content)
                elif isinstance(content, pd.DataFrame):
                    content.to_parquet(path, index=False)
                elif isinstance(content, dict):
                    np.savez_compressed(path, **content)
                else:  # a figure's PNG
                    path.write_bytes(content)
            self.client.log_artifacts(self.run_id, tmp)
        self._log_metrics(metrics, [RunTag(k, v) for k, v in tags.items()])
        self._pending = []
        self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.FINISHED))

    def fail(self, status: str = "FAILED") -> None:
        """Mark the run FAILED or KILLED (an exception or an interrupt, not a diverged run), with
        the metrics it had queued, if the store takes them. Called while handling a tracking server
        that could not be reached, it writes nothing (each write would wait as long again): the run
        stays RUNNING, for the next command on the store to mark FAILED (fail_stale_runs)."""
        if unreachable(sys.exc_info()[1]):
            return
        if self._pending:
            with contextlib.suppress(MlflowException):
                self._log_metrics(self._pending)
            self._pending = []
        self.client.set_terminated(self.run_id, status)
