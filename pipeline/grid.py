"""grid stage: expand a spec, skip finished configs, run the rest (in this process or N workers).

    gradbench grid benchmarks/quick.yaml [--workers 2] [--rerun]

A grid is one MLflow parent run (named after the spec) with one child run per configuration.
Resuming is keyed on the config hash: a configuration with a FINISHED run in the experiment is
skipped, so running the same command again after an interruption completes only what is missing.
Runs left RUNNING by a process that was killed outright are marked FAILED first.

Workers are separate processes (spawned, so CUDA is safe). The driver creates the store, the
experiment and the parent run before any worker starts: concurrent first-time schema creation in a
SQLite file is what breaks it, while concurrent writers to an existing one are safe.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .config import GridSpec, RunConfig
from .tracking import RunSummary


@dataclass
class GridResult:
    parent_run_id: str
    total: int
    skipped: int
    summaries: list[RunSummary] = field(default_factory=list)
    failures: list[tuple[RunConfig, str]] = field(default_factory=list)
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        return {
            "runs_total": self.total,
            "runs_skipped": self.skipped,
            "runs_finished": len(self.summaries),
            "runs_failed": len(self.failures),
        }

    def line(self) -> str:
        outcomes = Counter(s.diagnosis for s in self.summaries)
        detail = ", ".join(f"{n} {label}" for label, n in sorted(outcomes.items()))
        return (
            f"grid done in {self.seconds:.0f} s: {self.total} configs, {self.skipped} already finished, "
            f"{len(self.summaries)} run now ({detail or 'none'}), {len(self.failures)} failed "
            f"(parent run {self.parent_run_id})"
        )


class _Runner:
    """Runs configs in one process, loading each (device, precision) of MNIST once."""

    def __init__(self, data_dir: str, source: str | None, experiment: str, parent_run_id: str, grid: str):
        self.data_dir, self.source = data_dir, source
        self.experiment, self.parent_run_id, self.grid = experiment, parent_run_id, grid
        self._data: dict[tuple[str, str], object] = {}

    def __call__(self, config: RunConfig) -> tuple[RunConfig, RunSummary | None, str | None]:
        from . import data, tracking
        from .train import DTYPES, get_device

        try:
            device = get_device(config.device)
            key = (str(device), config.precision)
            if key not in self._data:
                self._data[key] = data.load(self.data_dir, device, DTYPES[config.precision], self.source)
            summary = tracking.tracked_train(config, self._data[key], self.experiment, self.parent_run_id, self.grid)
            return config, summary, None
        except Exception as exc:  # the run is marked FAILED; the grid goes on and reports it
            return config, None, f"{type(exc).__name__}: {exc}"


_worker_runner: _Runner | None = None


def _worker_init(runner: _Runner, tracking_uri: str, gpus: "multiprocessing.Queue", threads: int) -> None:
    """Per worker: the driver's tracking URI, a share of the CPU threads, a GPU of its own if any."""
    import torch

    global _worker_runner
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        torch.cuda.set_device(gpus.get())

    def interrupted(signum, frame):  # pool.terminate() sends SIGTERM: mark the open run KILLED
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    _worker_runner = runner


def _worker_run(config: RunConfig):
    return _worker_runner(config)


def _run_parallel(runner: _Runner, todo: list[RunConfig], workers: int, tracking_uri: str) -> Iterator:
    import torch

    ctx = multiprocessing.get_context("spawn")
    gpus = ctx.Queue()
    n_gpus = torch.cuda.device_count()
    for i in range(workers):
        gpus.put(i % n_gpus if n_gpus else 0)
    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = ctx.Pool(workers, initializer=_worker_init, initargs=(runner, tracking_uri, gpus, threads))
    try:
        yield from pool.imap_unordered(_worker_run, todo)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def run_grid(
    spec: GridSpec,
    data_dir: str,
    source: str | None = None,
    experiment: str = "gradbench",
    workers: int = 1,
    rerun: bool = False,
    echo: Callable[[str], None] = print,
    progress: bool = True,
) -> GridResult:
    """Run every configuration of `spec` that has no FINISHED run yet (all of them with rerun)."""
    import mlflow
    from tqdm import tqdm

    from . import data, tracking

    data.prepare(data_dir, source)  # once, in the driver, before any worker reads it
    client = tracking.get_client()
    exp_id, parent_id = tracking.open_grid_run(client, spec, experiment)
    stale = tracking.fail_stale_runs(client, exp_id, spec.name)
    if stale:
        echo(f"marked {stale} run(s) FAILED that a killed grid left RUNNING")
    done = set() if rerun else tracking.finished_config_hashes(client, exp_id)
    todo = [c for c in spec.configs if c.config_hash() not in done]
    result = GridResult(parent_id, total=len(spec.configs), skipped=len(spec.configs) - len(todo))
    echo(f"grid {spec.name}: {len(spec.configs)} configs, {result.skipped} already finished, {len(todo)} to run")

    experiment_name = client.get_experiment(exp_id).name
    runner = _Runner(data_dir, source, experiment_name, parent_id, spec.name)
    start = time.perf_counter()
    status = "KILLED"
    try:
        stream = (
            _run_parallel(runner, todo, workers, mlflow.get_tracking_uri())
            if workers > 1 and len(todo) > 1
            else map(runner, todo)
        )
        with tqdm(total=len(todo), unit="run", disable=not progress, dynamic_ncols=True) as bar:
            write = bar.write if progress else echo  # lines above the bar, not through it
            for config, summary, error in stream:
                if summary is not None:
                    result.summaries.append(summary)
                    write(summary.line())
                else:
                    result.failures.append((config, error))
                    write(f"FAILED {tracking.run_name(config)}: {error}")
                bar.update()
        status = "FAILED" if result.failures else "FINISHED"
    finally:
        result.seconds = time.perf_counter() - start
        tracking.close_grid_run(client, parent_id, result.counts(), result.seconds, status)
    echo(result.line())
    return result
