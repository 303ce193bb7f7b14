"""The tracking store: experiments, grid parent runs, and the queries that resume and report need.

Uses `MlflowClient` only (no fluent, process-global active run), so a grid can hold a parent and a
child open at once and workers can log in parallel. The tracking URI is MLflow's own: the embedded
default store unless MLFLOW_TRACKING_URI says otherwise. Nothing here imports training code: it is
handed configs, specs and finished values.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import tempfile
import time
import warnings
from pathlib import Path

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from ..config import NUMBERS_VERSION, GridSpec, RunConfig
from ..runtime import host_lock, process_alive

EXPERIMENT = "gradbench"
TAG_CONFIG_HASH = "gradbench.config_hash"
TAG_GRID = "gradbench.grid"
TAG_DIAGNOSIS = "gradbench.diagnosis"
TAG_OUTCOME = "gradbench.outcome"
TAG_THEORY_ABSENT = "gradbench.theory_absent"  # why a prediction is missing, where theory failed
TAG_GROUP = "gradbench.group"  # an id shared by the members trained together
TAG_GROUP_SIZE = "gradbench.group_size"
TAG_SPEC_HASH = "gradbench.spec_hash"
TAG_ROLE = "gradbench.role"  # "grid" on a grid's parent run
TAG_HOST = "gradbench.host"  # where a run's process lives: lets a resume tell dead runs from live ones
TAG_PID = "gradbench.pid"
# the grid's recorder process, once it has taken a trained run over to record it (grid.Recorder)
TAG_RECORDER_PID = "gradbench.recorder_pid"
TAG_NUMBERS_VERSION = "gradbench.numbers_version"  # config.NUMBERS_VERSION of the code that made the run
TAG_SYNTHETIC = "gradbench.synthetic"  # "true": made up by benchmarks/perf/synthetic_store.py, never a result
TAG_HEARTBEAT = "gradbench.heartbeat"  # a grid driver's last sign of life, Unix seconds
HEARTBEAT_SECONDS = 30.0  # how often a grid driver writes it
HEARTBEAT_STALE = 120.0  # a driver on another host not heard from for this long is taken for dead
MAX_METRICS_PER_CALL = 1000  # MLflow's limit for one log_batch call
MAX_PARAMS_PER_CALL = 100


def tracking_uri() -> str:
    """The tracking URI in force (MLFLOW_TRACKING_URI, or MLflow's embedded default)."""
    return mlflow.get_tracking_uri()


def now_ms() -> int:
    return int(time.time() * 1000)


_OPENED: set[str] = set()  # the SQLite stores this process has seen created
# MLflow's HTTP client retries a failed request 7 times with a backoff factor of 2 and waits 120 s
# for each answer: minutes per call while a tracking server is down, and a tracking write is
# shielded from stop signals (runtime.shielded), so a grid neither said so nor stopped. Bounded
# here (about 35 s at most a call, a few seconds for a refused connection) unless the user set them:
# a grid whose server stops answering says so within a minute (its next write comes within
# logger.FLUSH_SECONDS), and a stop signal does not wait for it (runtime.STOP_GRACE).
REMOTE_WAITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def get_client() -> MlflowClient:
    """MLflow's client for the tracking URI in force; a tracking server's waits bounded (REMOTE_WAITS).
    A local SQLite store is opened first under a
    lock that every gradbench command takes, whatever it runs: two commands that open a new store at
    once race MLflow's creation of its tables (alembic errors, and a store broken for good). A
    creation that fails leaves no file behind."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        for name, value in REMOTE_WAITS.items():
            os.environ.setdefault(name, value)
    if uri.startswith("sqlite:///") and uri not in _OPENED:
        path = os.path.abspath(uri[len("sqlite:///"):])  # a relative path names a different store in each folder
        with host_lock("store", path):
            new = not os.path.exists(path)
            try:
                MlflowClient(uri).search_experiments(max_results=1)  # creates (or upgrades) the tables
            except BaseException:
                if new:  # as it was: no store, rather than a half-made one that every later command fails on
                    for leftover in (path, path + "-journal", path + "-wal", path + "-shm"):
                        with contextlib.suppress(OSError):
                            os.remove(leftover)
                raise
        _OPENED.add(uri)
    return MlflowClient()


def _chain(exc: BaseException | None):
    """An exception and its causes and contexts, each once."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack += [e.__cause__, e.__context__]


def full_disk(exc: BaseException | None) -> str | None:
    """How a full disk said itself somewhere in an exception's chain (ENOSPC; SQLite's "database or
    disk is full", which SQLAlchemy puts behind its autoflush hint), or None."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return "no space left on device"
        text = str(e).lower()
        for words in ("database or disk is full", "no space left on device"):
            if words in text:
                return words
    return None


def store_down(exc: BaseException | None) -> bool:
    """Whether an exception says the store cannot take writes at all (a server that cannot be
    reached, a full disk): whatever is tried next fails the same way."""
    return unreachable(exc) or full_disk(exc) is not None


def unreachable(exc: BaseException | None) -> bool:
    """Whether an exception says that the tracking server could not be reached (refused, timed out,
    reset) after MLflow's retries: writing again to it would wait as long again for nothing."""
    import requests

    for e in _chain(exc):
        if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return True
        text = str(e)
        if isinstance(e, MlflowException) and text.startswith("API request to") and (
                "timeout" in text.lower() or "Max retries exceeded" in text or "Connection" in text):
            return True
    return False


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created if missing (safe when several processes race)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # another process created it between our two calls
        return client.get_experiment_by_name(name).experiment_id


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


def finished_config_hashes(client: MlflowClient, experiment_id: str) -> tuple[set[str], set[str]]:
    """(config hashes that have a FINISHED run of this numbers version, diverged runs included;
    those that have FINISHED runs of other versions only: made by code that computed differently)."""
    runs = search_all(client, experiment_id, f"attributes.status = 'FINISHED' and tags.`{TAG_CONFIG_HASH}` LIKE '%'")
    current, other = set(), set()
    for run in runs:
        same = run.data.tags.get(TAG_NUMBERS_VERSION) == str(NUMBERS_VERSION)
        (current if same else other).add(run.data.tags[TAG_CONFIG_HASH])
    return current, other - current


def fail_stale_runs(client: MlflowClient, experiment_id: str) -> int:
    """Mark FAILED the RUNNING runs of this experiment whose process, on this host, is gone (killed
    outright, so it could not mark them itself): configurations' runs, and the parent runs of grids
    whose driver is gone (a resume reopens its grid's parent all the same), except a parent that
    `mlflow run` opened (it ends that run itself, after the grid's process). Runs of other hosts are
    left alone: another machine may be running the same spec right now. Returns how many were
    marked. (No user text goes into the filter: names are compared here, not in MLflow's filter
    language.)"""
    running = search_all(client, experiment_id, f"attributes.status = 'RUNNING' and tags.`{TAG_CONFIG_HASH}` LIKE '%'")
    running += [r for r in search_all(client, experiment_id, f"attributes.status = 'RUNNING' and tags.`{TAG_ROLE}` = 'grid'")
                if "mlflow.project.entryPoint" not in r.data.tags]
    host = socket.gethostname()
    stale = [r for r in running if r.data.tags.get(TAG_HOST) == host and not _owners_alive(r)]
    for run in stale:
        client.set_terminated(run.info.run_id, "FAILED")
    return len(stale)


def _owners(run) -> list[int]:
    """The processes that may still write a run: the one that opened it and, once it has taken
    the run over, the grid's recorder."""
    tags = run.data.tags
    return [pid for pid in (int(tags.get(TAG_PID, "0") or 0), int(tags.get(TAG_RECORDER_PID, "0") or 0)) if pid]


def _owners_alive(run, besides: int = 0) -> bool:
    return any(process_alive(pid) for pid in _owners(run) if pid != besides)


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


class GridBusy(RuntimeError):
    """Another live driver is running the same grid: a second would train every configuration twice."""


def _live_driver(run) -> str | None:
    """Who drives a RUNNING grid parent run, if that driver is alive: on this host its pid says;
    on another, a heartbeat younger than HEARTBEAT_STALE."""
    tags = run.data.tags
    host, pid = tags.get(TAG_HOST), int(tags.get(TAG_PID, "0") or 0)
    if host == socket.gethostname():
        return f"pid {pid} on this host" if pid and pid != os.getpid() and process_alive(pid) else None
    age = time.time() - float(tags.get(TAG_HEARTBEAT, "0") or 0)
    return f"pid {pid} on host {host}, heard from {age:.0f} s ago" if host and age < HEARTBEAT_STALE else None


def open_grid_run(client: MlflowClient, spec: GridSpec, experiment: str) -> tuple[str, str]:
    """(experiment id, parent run id) for a grid: the `mlflow run` run if there is one, else the
    unfinished parent of an interrupted run of the same spec (resumed), else a new run. Raises
    GridBusy while another driver of the same spec is alive (gradbench.grid also holds a lock
    file, which settles two drivers on one host that start at the same moment)."""
    env_run = os.environ.get("MLFLOW_RUN_ID")
    exp_id = client.get_run(env_run).info.experiment_id if env_run else experiment_id(client, experiment)
    unfinished = search_all(client, exp_id, f"tags.`{TAG_SPEC_HASH}` = '{spec.spec_hash}' and attributes.status != 'FINISHED'")
    for run in unfinished:
        who = _live_driver(run) if run.info.status == "RUNNING" and run.info.run_id != env_run else None
        if who:
            raise GridBusy(f"grid {spec.name!r} is being run right now by {who} (parent run {run.info.run_id}): "
                           "a second driver would train every configuration twice. Wait for it to end, or stop "
                           "it and run this command again to resume")
    if env_run:
        parent_id = env_run
    elif unfinished:
        parent_id = max(unfinished, key=lambda r: r.info.start_time).info.run_id
        client.update_run(parent_id, status="RUNNING")
    else:
        parent_id = client.create_run(exp_id, run_name=spec.name).info.run_id
    tags = {TAG_ROLE: "grid", TAG_GRID: spec.name, TAG_SPEC_HASH: spec.spec_hash, MLFLOW_RUN_NAME: spec.name,
            TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid()), TAG_HEARTBEAT: f"{time.time():.0f}"}
    client.log_batch(parent_id, tags=[RunTag(k, v) for k, v in tags.items()])
    existing = client.get_run(parent_id).data.params
    if "grid_runs" not in existing:
        client.log_batch(parent_id, params=[Param("grid_runs", str(len(spec.configs)))])
    client.log_text(parent_id, spec.source, "spec.yaml")
    return exp_id, parent_id


def heartbeat(client: MlflowClient, parent_id: str) -> None:
    client.set_tag(parent_id, TAG_HEARTBEAT, f"{time.time():.0f}")


def live_children(client: MlflowClient, experiment_id: str, parent_id: str) -> list:
    """RUNNING child runs of a grid whose process (or recorder), on this host, is alive and is not
    this one: with no other driver alive, the workers or recorder of a driver killed outright."""
    running = search_all(client, experiment_id, f"attributes.status = 'RUNNING' and tags.`{TAG_CONFIG_HASH}` LIKE '%'")
    host = socket.gethostname()
    return [r for r in running if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == parent_id and r.data.tags.get(TAG_HOST) == host
            and _owners_alive(r, besides=os.getpid())]


def close_grid_run(client: MlflowClient, parent_id: str, counts: dict[str, int], seconds: float, status: str) -> None:
    metrics = [Metric(f"grid/{k}", float(v), now_ms(), 0) for k, v in counts.items()]
    metrics.append(Metric("grid/seconds", seconds, now_ms(), 0))
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
            raise NotFound(f"no experiment {experiment!r} in {tracking_uri()}: run `gradbench grid SPEC` first")
    grids = search_all(client, found.experiment_id, f"tags.`{TAG_ROLE}` = 'grid'")
    if not grids:
        raise NotFound(f"experiment {found.name!r} has no grid runs: run `gradbench grid SPEC` first")
    return max(grids, key=lambda r: r.info.start_time)


def _get_run(client: MlflowClient, run_id: str):
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise NotFound(f"no run {run_id} in the tracking store {tracking_uri()}") from None


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


class ArtifactFiles:
    """Runs' artifacts as local files, fetched when asked for: a local artifact store's own files,
    read in place (nothing copied), or for a server or an object store one download each into
    `folder`. It goes straight to each run's artifact location (MlflowClient.download_artifacts
    looks the run up first: ~20 ms a file, ten times the read). Holds only plain data, so report
    workers forked from the collecting process use it as is."""

    def __init__(self, artifact_uris: dict[str, str], folder: str | None = None):
        self.uris, self.folder = artifact_uris, folder  # folder None: a temporary one, made when needed

    def get(self, run_id: str, path: str) -> Path | None:
        """The local file of a run's artifact, or None if the run does not have it."""
        try:
            repo = get_artifact_repository(self.uris[run_id])
            if isinstance(repo, LocalArtifactRepository):
                local = Path(repo.download_artifacts(path))
                return local if local.is_file() else None
            self.folder = self.folder or tempfile.mkdtemp(prefix="gradbench-artifacts-")
            root = Path(self.folder, run_id)  # the download lands at root / path
            if not (root / path).is_file():
                root.mkdir(parents=True, exist_ok=True)
                repo.download_artifacts(path, str(root))
            return root / path if (root / path).is_file() else None
        except (MlflowException, OSError):
            return None


def log_report(client: MlflowClient, parent_run_id: str, path: Path) -> None:
    client.log_artifact(parent_run_id, str(path), "report")


def run_url(run) -> str | None:
    """Link to a run in the MLflow UI, when the tracking URI is a server."""
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
