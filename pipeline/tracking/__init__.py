"""The one place that talks to MLflow. It imports no training code: training hands it chunks
while a run trains (logger.RunLogger) and finished values at the end; store.py answers the
queries that grid resume and the report need."""

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from .logger import METRIC_BUDGET, RunLogger, ended_by, layer_key, metric_strides
from .store import (
    EXPERIMENT,
    HEARTBEAT_SECONDS,
    TAG_CONFIG_HASH,
    TAG_DIAGNOSIS,
    TAG_GRID,
    TAG_GROUP,
    TAG_GROUP_SIZE,
    TAG_NUMBERS_VERSION,
    TAG_OUTCOME,
    TAG_RECORDER_PID,
    TAG_ROLE,
    TAG_THEORY_ABSENT,
    ArtifactFiles,
    GridBusy,
    NotFound,
    close_grid_run,
    experiment_id,
    fail_earlier_attempts,
    fail_stale_runs,
    find_grid_run,
    finished_config_hashes,
    full_disk,
    get_client,
    grid_spec_of,
    heartbeat,
    latest_finished_runs,
    live_children,
    log_dataset,
    log_report,
    open_grid_run,
    run_url,
    search_all,
    store_down,
    tracking_uri,
    unreachable,
)

__all__ = [
    "EXPERIMENT", "METRIC_BUDGET", "TAG_CONFIG_HASH", "TAG_DIAGNOSIS", "TAG_GRID", "TAG_GROUP", "TAG_GROUP_SIZE", "TAG_NUMBERS_VERSION", "TAG_OUTCOME",
    "TAG_RECORDER_PID", "TAG_ROLE", "TAG_THEORY_ABSENT", "ArtifactFiles", "MlflowClient", "MlflowException", "NotFound", "HEARTBEAT_SECONDS", "GridBusy", "heartbeat", "live_children", "RunLogger", "close_grid_run", "ended_by", "layer_key",
    "experiment_id", "fail_earlier_attempts", "fail_stale_runs", "find_grid_run", "finished_config_hashes",
    "get_client", "grid_spec_of", "latest_finished_runs", "log_dataset", "log_report", "metric_strides", "open_grid_run", "run_url",
    "search_all", "tracking_uri", "unreachable", "full_disk", "store_down",
]
