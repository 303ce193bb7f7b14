"""RunLogger: streams one training run into one MLflow run. It only logs: it is handed chunks while
training runs, then the finished summaries, tags, tables and figures.

Under `mlflow run -e train`, MLflow has created the run before the entry point starts
(MLFLOW_RUN_ID) and logged the -P parameters as strings: a single run adopts that run.
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from ..activations import ACTIVATIONS
from ..config import NUMBERS_VERSION, RunConfig, run_name
from ..results import Chunk, RunResult
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
    experiment_id,
    get_client,
    log_dataset,
    now_ms,
)

# Metric key of each per-step statistic, and the prefix of each per-layer one (keys end in /L00, /L01, ...)
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


def ended_by(exc: BaseException) -> str:
    """The status of runs that an exception ends: an interrupt KILLED, anything else FAILED."""
    return "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"


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
        self.act_key = f"act/{ACTIVATIONS[config.activation].statistic}"
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
        if env_run and parent_run_id is None and group_size == 1:
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
            logger.fail(ended_by(exc))
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

    # -- called while training runs (train.ChunkSink) -----------------------------------------------

    def on_chunk(self, chunk: Chunk) -> None:
        self._last_chunk = chunk
        rows = [i for i, s in enumerate(chunk.step) if s % self.config.log_every == 0]
        self._log_rows(chunk, rows)

    def on_eval(self, step: int, loss: float, acc: float) -> None:
        self._log_metrics([Metric("test/loss", loss, now_ms(), step), Metric("test/acc", acc, now_ms(), step)])

    def _log_rows(self, chunk: Chunk, rows: list[int]) -> None:
        now = now_ms()
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

    def finish(self, result: RunResult, summaries: dict[str, float], tags: dict[str, str],
               figures: dict[str, plt.Figure], tables: dict[str, pd.DataFrame] | None = None) -> None:
        """Log the last step, the finite summaries (at the last step), the layer table, histograms,
        other tables (artifact path -> DataFrame, written as parquet) and figures (closed here), the
        tags; then mark the run FINISHED."""
        chunk = self._last_chunk
        if chunk is not None and len(chunk.step) and int(chunk.step[-1]) != self._last_logged_step:
            self._log_rows(chunk, [len(chunk.step) - 1])
        last = max(result.steps - 1, 0)
        self._log_metrics([Metric(k, float(v), now_ms(), last) for k, v in summaries.items() if math.isfinite(v)])
        with tempfile.TemporaryDirectory() as tmp:
            table_path = Path(tmp) / "layer_stats.parquet"
            result.table.to_parquet(table_path, index=False)
            self.client.log_artifact(self.run_id, str(table_path), "gradients")
            hist_path = Path(tmp) / "histograms.npz"
            np.savez_compressed(hist_path, **result.histograms)
            self.client.log_artifact(self.run_id, str(hist_path), "gradients")
            for artifact, frame in (tables or {}).items():
                folder, name = artifact.rsplit("/", 1) if "/" in artifact else ("", artifact)
                path = Path(tmp) / name
                frame.to_parquet(path, index=False)
                self.client.log_artifact(self.run_id, str(path), folder or None)
        for path, fig in figures.items():
            self.client.log_figure(self.run_id, fig, path, save_kwargs={"dpi": 72})
            plt.close(fig)
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.FINISHED))

    def fail(self, status: str = "FAILED") -> None:
        """Mark the run FAILED or KILLED (an exception or an interrupt, not a diverged run)."""
        self.client.set_terminated(self.run_id, status)
