"""grid stage: expand a spec, skip finished configs, run the rest: in this process, in N local
worker processes, or as Ray tasks on a cluster.

    gradbench grid benchmarks/quick.yaml [--workers 2] [--rerun] [--executor ray --address auto]

A grid is one MLflow parent run (named after the spec) with one child run per configuration.
Resuming is keyed on the config hash: a configuration with a FINISHED run in the experiment is
skipped, so running the same command again after an interruption completes only what is missing.
Runs left RUNNING by a process of this host that is gone (killed outright) are marked FAILED first;
a Ray task retried after its worker was lost marks the attempt it replaces FAILED itself.

Every executor runs groups: configs that agree on config.GROUP_KEYS train together in one pass
(train.py) when ensembles are on, and alone (groups of one) when they are off. Local workers are
separate processes (spawned, so CUDA is safe); a Ray task runs one group. The driver creates the
store, the experiment and the parent run before any worker starts: concurrent first-time schema
creation in a SQLite file is what breaks it, while concurrent writers to an existing one are safe.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .config import GridSpec, RunConfig, group_key, run_name
from .run import RunSummary, Trained, fail_runs
from .runtime import (
    STOP_GRACE,
    check_stop,
    configure,
    process_alive,
    shielded,
    stop_on_signals,
    stop_with_me,
    stopped_by,
)

Outcome = tuple[RunConfig, "RunSummary | None", "str | None"]  # a config, its summary or its error
MAX_GROUP = 32  # members trained together at most on a CPU (on CUDA: as many as fit, _split_to_fit)


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


_DATA: dict[tuple[str, str, str], object] = {}  # per process: (data_dir, device, precision) -> Mnist


# On a 2-core CPU, training the members of a group together was measured faster than one by one up
# to this width: 1.50x to 1.77x at width 128, and 0.98x to 1.18x at 512 (gradbench bench --quick, 4
# members, four runs), and the quick grid (width 128) in 235 s against 327 s, the same outcomes. At
# 512 it is a wash on this VM; wider nets were not measured: one by one.
CPU_ENSEMBLE_MAX_WIDTH = 512


# On the 2-core CPU the quick grid took 81 and 89 s with two worker processes of one thread each,
# against 126 and 120 s in one process of two threads (alternated, the same outcomes): one process
# leaves a core idle while it runs Python (the step's dispatch, the analysis, MLflow).
def auto_workers() -> int:
    """--workers auto: one process per GPU with CUDA; on a CPU, two where there are 2 cores or more."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def plan_groups(configs: list[RunConfig], ensemble: bool, max_size: int | None = MAX_GROUP) -> list[list[RunConfig]]:
    """What trains together: with ensembles, configs of one group key in groups of at most
    max_size (None: no limit); without, each config alone."""
    if not ensemble:
        return [[c] for c in configs]
    by_key: dict[tuple, list[RunConfig]] = {}
    for config in configs:
        by_key.setdefault(group_key(config), []).append(config)
    size = max_size or len(configs)
    return [group[i : i + size] for group in by_key.values() for i in range(0, len(group), size)]


def auto_groups(configs: list[RunConfig], cuda: bool) -> list[list[RunConfig]]:
    """--ensemble auto: on CUDA, where small nets leave the device idle, every config of a group key
    in one group, as many as fit (_split_to_fit); on a CPU only the nets up to CPU_ENSEMBLE_MAX_WIDTH,
    where it was measured faster, MAX_GROUP at a time; the wider ones one by one."""
    if cuda:
        return plan_groups(configs, True, max_size=None)
    narrow = [c for c in configs if c.width <= CPU_ENSEMBLE_MAX_WIDTH]
    return plan_groups(narrow, True) + plan_groups([c for c in configs if c.width > CPU_ENSEMBLE_MAX_WIDTH], False)


class _Runner:
    """Runs one group in this process (the driver, a pool worker or a Ray worker). Picklable: the
    data it loads is cached per process, so a worker loads MNIST once for all its groups."""

    def __init__(self, data_dir: str, source: str | None, experiment: str, parent_run_id: str, grid: str):
        self.data_dir, self.source = data_dir, source
        self.experiment, self.parent_run_id, self.grid = experiment, parent_run_id, grid

    def _data(self, config: RunConfig):
        """MNIST on the config's device and precision, loaded once per process."""
        from . import data
        from .runtime import get_device, param_dtype

        device = get_device(config.device)
        key = (self.data_dir, str(device), config.precision)
        if key not in _DATA:
            _DATA[key] = data.load(self.data_dir, device, param_dtype(config.precision), self.source)
        return _DATA[key]

    def __call__(self, group: list[RunConfig]) -> list[Outcome]:
        """Train and record one group here."""
        trained = self.train(group)
        return trained if isinstance(trained, list) else _recorded(trained)

    def train(self, group: list[RunConfig]) -> Trained | list[Outcome]:
        """Open the group's runs and train it: what the recorder needs, or each member's error."""
        from .run import open_and_train

        return _unless_failed(group, lambda: open_and_train(group, self._data(group[0]), self.experiment,
                                                            self.parent_run_id, self.grid))


def _unless_failed(group: list[RunConfig], work: Callable):
    """work(), or, when it raises, each member's error (their runs are marked FAILED): the grid goes
    on and reports them; but not past a store that takes no writes (a server that cannot be
    reached, a full disk): every group would fail the same way, a server's after a wait."""
    from . import tracking

    try:
        return work()
    except Exception as exc:
        if tracking.store_down(exc):
            raise
        return [(c, None, f"{type(exc).__name__}: {exc}") for c in group]


def _recorded(trained: Trained, take_over: bool = False) -> list[Outcome]:
    """Record a trained group (run.record); take_over: in the recorder process, which first tags
    each run with its pid (a resume then waits for it, as for a live worker)."""
    from .run import record

    def work():
        summaries = record(trained, take_over=take_over)
        return [(c, None, s.error) if s.error else (c, s, None) for c, s in zip(trained.configs, summaries)]

    return _unless_failed(trained.configs, work)


_worker_runner: _Runner | None = None


def _worker_init(runner: _Runner, tracking_uri: str, gpus: "multiprocessing.Queue", threads: int) -> None:
    """Per worker: the driver's tracking URI, a share of the CPU threads, a GPU of its own if any."""
    import torch

    global _worker_runner
    configure()
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        torch.cuda.set_device(gpus.get())
    # pool.terminate() sends SIGTERM: the open run is marked KILLED. Ctrl-C reaches every process of
    # the terminal's group: the workers leave it to the driver, which terminates them. A driver
    # killed outright takes its workers with it (stop_on_signals' parent_pid).
    stop_on_signals(sigint=False, parent_pid=os.getppid())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_runner = runner


def _worker_run(group: list[RunConfig]) -> list[Outcome]:
    try:
        return _worker_runner(group)
    except KeyboardInterrupt:  # stopped (its runs are marked KILLED): leave quietly, no traceback
        raise SystemExit(1) from None


def _run_parallel(runner: _Runner, groups: list[list[RunConfig]], workers: int, tracking_uri: str) -> Iterator:
    import torch

    ctx = multiprocessing.get_context("spawn")
    gpus = ctx.Queue()
    n_gpus = torch.cuda.device_count()
    for i in range(workers):
        gpus.put(i % n_gpus if n_gpus else 0)
    threads = max(1, (os.cpu_count() or 1) // workers)
    # the workers start with Ctrl-C ignored (a disposition that exec keeps), so that one arriving
    # while they import is the driver's alone to handle
    main = threading.current_thread() is threading.main_thread()  # where Python allows handlers
    driver_sigint = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        pool = ctx.Pool(workers, initializer=_worker_init, initargs=(runner, tracking_uri, gpus, threads))
    finally:
        if main:
            signal.signal(signal.SIGINT, driver_sigint)
    try:
        for outcomes in pool.imap_unordered(_worker_run, groups):
            yield from outcomes
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


class RecorderLost(RuntimeError):
    """The grid's recorder process ended without recording the group it was given (killed)."""


class Recorder:
    """A process of its own that records trained groups (run.record: analysis, theory, figures,
    MLflow) while the driver trains the next group, so that the device does not wait for it. One
    group at a time, handed over when the next group has trained: at most two groups' results in
    memory. A process, not a thread: a thread busy in Python took the GIL from the training loop's
    many short waits and slowed it 15x (a depth-5 group of 8, 4.2 s alone, 61 s beside one).

    It stops with the driver: on the driver's stop signal (passed on, runtime.stop_with_me), and
    on its death (kill -9 included: PDEATHSIG). The runs it has taken over carry its pid, so a
    resume waits for it as for a live worker; a run is FINISHED only once its record is whole."""

    def __init__(self, tracking_uri: str):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve_records, args=(child, tracking_uri, os.getpid()), daemon=True,
                                 name="gradbench-recorder")
        self._proc.start()
        child.close()
        stop_with_me(self._proc.pid)

    def submit(self, trained: Trained) -> None:
        try:
            self._conn.send(trained)
        except OSError:  # a broken pipe: it is gone
            raise self._lost() from None

    def outcomes(self) -> list[Outcome]:
        """Wait for the group submitted last, and return its outcomes."""
        try:
            while not self._conn.poll(0.2):
                check_stop()
                if not self._proc.is_alive():
                    raise self._lost()
            kind, value = self._conn.recv()
        except (EOFError, OSError):  # its end of the pipe closed: it is gone
            raise self._lost() from None
        if kind == "error":
            raise value
        return value

    def _lost(self) -> RecorderLost:
        self._proc.join(timeout=1)
        return RecorderLost(f"the grid's recorder process ended (exit code {self._proc.exitcode}) before recording "
                            "its group: its runs are left RUNNING, for the next command to mark FAILED; the same "
                            "command resumes")

    def close(self, stopped: bool = False) -> None:
        """Let it finish and end (stopped: it is stopping already; wait for it to mark its runs)."""
        stop_with_me(self._proc.pid, False)
        if stopped and stopped_by() is None:  # not stopped by a signal (which was passed on to it)
            self._proc.terminate()
        elif not stopped and self._proc.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send(None)
        self._proc.join(timeout=4 * STOP_GRACE if stopped else None)
        if self._proc.is_alive():
            self._proc.kill()
        self._conn.close()


def _serve_records(conn, tracking_uri: str, driver: int) -> None:
    """The recorder's loop: record each trained group it is sent and send back its outcomes (or the
    error that stops the grid), until it is sent None, stopped, or its driver is gone."""
    import torch

    configure()
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    torch.set_num_threads(1)  # the training keeps the cores; recording is mostly Python
    stop_on_signals(sigint=False, parent_pid=driver)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: the driver passes it on
    try:
        while (trained := conn.recv()) is not None:
            try:
                conn.send(("done", _recorded(trained, take_over=True)))
            except Exception as exc:  # a store that takes no writes: the driver stops the grid
                conn.send(("error", _portable(exc)))
    except (KeyboardInterrupt, EOFError, OSError):  # stopped (its runs are marked), or the driver is gone
        pass


def _portable(exc: Exception) -> Exception:
    """An exception that survives the trip to the driver (pickling drops the chain where a full disk
    or an unreachable server says itself)."""
    import pickle

    import requests

    from . import tracking

    full = tracking.full_disk(exc)
    if full:
        return tracking.MlflowException(f"{full}: {exc}")
    if tracking.unreachable(exc):
        return requests.exceptions.ConnectionError(str(exc))
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _run_overlapped(runner: _Runner, groups: list[list[RunConfig]], tracking_uri: str) -> Iterator:
    """Groups trained here one after another, each recorded by the Recorder while the next trains.
    A group trained here and not handed over yet is this process's to mark when the grid stops."""
    recorder = Recorder(tracking_uri)
    recording = False  # the recorder has a group
    held: Trained | None = None  # trained here, not handed over yet
    stopped = False
    try:
        for group in groups:
            trained = runner.train(group)
            if isinstance(trained, list):  # the group failed: its errors
                yield from trained
                continue
            held = trained
            if recording:
                recording = False
                yield from recorder.outcomes()
            recorder.submit(held)
            held, recording = None, True
        if recording:
            yield from recorder.outcomes()
    except BaseException as exc:
        stopped = isinstance(exc, (KeyboardInterrupt, GeneratorExit))
        if held is not None:
            fail_runs(held.loggers, exc)
        raise
    finally:
        recorder.close(stopped)


RAY_RETRIES = 3  # a task whose worker is lost (node down, process killed) runs again this often


class ExecutorError(RuntimeError):
    """The executor cannot run the grid (Ray not installed, cluster unreachable)."""


def gpus_for(group: list[RunConfig]) -> float:
    """GPU share a Ray task asks for: a single small net leaves a GPU mostly idle, so four share one."""
    config = group[0]
    return 0.25 if len(group) == 1 and config.width <= 512 and config.depth <= 20 else 1.0


def _ray_task(runner: _Runner, group: list[RunConfig], tracking_uri: str) -> list[Outcome]:
    """One group on a Ray worker. A retry (the last attempt's worker was lost) first marks the
    attempts it replaces FAILED, so the grid ends with exactly one FINISHED run per config."""
    from . import tracking

    configure()
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    client = tracking.get_client()
    for config in group:
        tracking.fail_earlier_attempts(client, runner.parent_run_id, config)
    return runner(group)


def _run_ray(runner: _Runner, groups: list[list[RunConfig]], tracking_uri: str, address: str | None) -> Iterator:
    try:
        import ray
    except ImportError:
        raise ExecutorError("--executor ray needs Ray: pip install 'gradbench[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ExecutorError(f"cannot reach the Ray cluster at {address or 'a new local cluster'}: {exc}") from None
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    task = ray.remote(max_retries=RAY_RETRIES)(_ray_task)
    pending = {}
    for group in groups:
        options = {"num_cpus": 1, "num_gpus": gpus_for(group)} if has_gpus else {"num_cpus": 1}
        pending[task.options(**options).remote(runner, group, tracking_uri)] = group
    try:
        while pending:
            (done,), _ = ray.wait(list(pending), num_returns=1)
            group = pending.pop(done)
            try:
                yield from ray.get(done)
            except ray.exceptions.RayError as exc:  # retries exhausted: failed configs, not lost ones
                yield from ((c, None, f"{type(exc).__name__}: {exc}") for c in group)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started_here:
            ray.shutdown()


def run_grid(
    spec: GridSpec,
    data_dir: str,
    source: str | None = None,
    experiment: str = "gradbench",
    workers: int = 1,
    rerun: bool = False,
    echo: Callable[[str], None] = print,
    progress: bool = True,
    executor: str = "local",
    address: str | None = None,
    ensemble: bool | None = None,
    overlap: bool | None = None,
) -> GridResult:
    """Run every configuration of `spec` that has no FINISHED run yet (all of them with rerun), in
    this process, in `workers` local processes, or as Ray tasks (executor="ray"). Configs that
    share an architecture train together as groups when `ensemble` is True (None: on CUDA only),
    with every executor. With `overlap` (None: on CUDA only), a grid of several groups in this
    process records each group in a second process while the next trains (Recorder)."""
    from tqdm import tqdm

    from . import data, tracking

    folder = data.prepare(data_dir, source)  # once, in the driver, before any worker reads it
    client = tracking.get_client()
    lock = _driver_lock(spec, experiment)  # released when the grid ends, or with this process
    try:
        with shielded():  # SIGTERM waits until the parent run is open and its try/finally guards it
            exp_id, parent_id = tracking.open_grid_run(client, spec, experiment)
            # the dataset row exists before the workers link their runs to it (they would race to create it)
            tracking.log_dataset(client, parent_id, str(folder.resolve()), data.dataset_digest())
    except BaseException:
        lock.close()
        raise
    result = GridResult(parent_id, total=len(spec.configs), skipped=0)
    start = time.perf_counter()
    status = "KILLED"
    beating = threading.Event()
    threading.Thread(target=_heartbeat, args=(parent_id, beating), daemon=True).start()
    try:
        _wait_for_orphans(client, exp_id, parent_id, echo)
        stale = tracking.fail_stale_runs(client, exp_id)
        if stale:
            echo(f"marked {stale} run(s) FAILED that a killed grid left RUNNING")
        done, older = (set(), set()) if rerun else tracking.finished_config_hashes(client, exp_id)
        todo = [c for c in spec.configs if c.config_hash() not in done]
        result.skipped = len(spec.configs) - len(todo)
        echo(f"grid {spec.name}: {len(spec.configs)} configs, {result.skipped} already finished, {len(todo)} to run")
        again = sum(c.config_hash() in older for c in todo)
        if again:
            echo(f"  ({again} of them finished before, under another numbers version: run again, not reused)")
        experiment_name = client.get_experiment(exp_id).name
        # absolute: pool and Ray workers do not share the driver's working directory
        runner = _Runner(os.path.abspath(data_dir), source, experiment_name, parent_id, spec.name)
        import torch

        if overlap is None:  # the quick grid on the 2-core CPU: 111 and 104 s with it, 109 and 103 s without
            overlap = torch.cuda.is_available()
        if ensemble is None:
            groups = auto_groups(todo, cuda=torch.cuda.is_available())
        else:
            groups = plan_groups(todo, ensemble)
        groups = [part for group in groups for part in _split_to_fit(group)]
        if executor == "ray":
            stream = _run_ray(runner, groups, tracking.tracking_uri(), address)
        elif workers > 1 and len(groups) > 1:
            stream = _run_parallel(runner, groups, workers, tracking.tracking_uri())
        elif overlap and len(groups) > 1:
            stream = _run_overlapped(runner, groups, tracking.tracking_uri())
        else:
            stream = (outcome for group in groups for outcome in runner(group))
        with tqdm(total=len(todo), unit="run", disable=not progress, dynamic_ncols=True) as bar:
            write = bar.write if progress else echo  # lines above the bar, not through it
            for config, summary, error in stream:
                check_stop()  # a signal whose first raise was swallowed stops the grid here
                if summary is not None:
                    result.summaries.append(summary)
                    write(summary.line())
                else:
                    result.failures.append((config, error))
                    write(f"FAILED {run_name(config)}: {error}")
                bar.update()
        status = "FAILED" if result.failures else "FINISHED"
    except BaseException as exc:
        error = exc
        raise
    else:
        error = None
    finally:
        beating.set()
        result.seconds = time.perf_counter() - start
        try:
            # a server that cannot be reached is not waited for again: the parent is left RUNNING, for
            # the resume to reopen, or the next command to close once this process is gone
            if not tracking.unreachable(error):
                with shielded():
                    tracking.close_grid_run(client, parent_id, result.counts(), result.seconds, status)
        except Exception:
            if error is None:
                raise  # else the first error is the one to report (a full disk fails the close too)
        finally:  # released even when the store is down: the same command must be able to resume
            lock.close()
    echo(result.line())
    return result


def _split_to_fit(group: list[RunConfig]) -> list[list[RunConfig]]:
    """A group split so that each part fits in what its device has free (model.members_that_fit)."""
    from .model import members_that_fit
    from .runtime import get_device

    if len(group) == 1:
        return [group]
    size = members_that_fit(group[0], get_device(group[0].device)) or len(group)
    return [group[i : i + size] for i in range(0, len(group), size)]


ORPHAN_WAIT = 60.0  # seconds a resume waits for a killed driver's workers to stop


def _driver_lock(spec: GridSpec, experiment: str):
    """An exclusive lock, for this process's life, on (tracking store, experiment, spec): a second
    driver of the same grid on this host is refused here, however close together the two start
    (the kernel releases the lock when its holder dies, kill -9 included). Drivers on other hosts
    are told apart by the parent run's heartbeat (tracking.open_grid_run)."""
    import fcntl

    from . import tracking
    from .runtime import lock_path

    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///"):  # a relative path names a different store in each folder
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    handle = open(lock_path("grid", uri, experiment, spec.spec_hash), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(handle)
        handle.close()
        raise tracking.GridBusy(f"grid {spec.name!r} (or another spec of the same configurations) is being run right now "
                                f"by {holder} on this host, into the same store and experiment: a second driver would "
                                "train every configuration twice. Wait for it to end, or stop it and run this command "
                                "again to resume") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle


def _lock_holder(handle) -> str:
    """'pid N' of the process holding the lock: the file holds the pid its holder wrote, which a
    holder that has just taken the lock may not have written yet (or an earlier holder's): read
    until it names a live process, for up to a second."""
    for _ in range(20):
        handle.seek(0)
        words = handle.read().split()
        if len(words) == 2 and words[1].isdigit() and int(words[1]) != os.getpid() and process_alive(int(words[1])):
            return f"pid {words[1]}"
        time.sleep(0.05)
    return "another process"


def _wait_for_orphans(client, exp_id: str, parent_id: str, echo: Callable[[str], None]) -> None:
    """The workers of a driver killed outright stop after their current step (they watch their
    parent) or finish the run they are writing: wait for them, so that what they finish is not run
    again and nothing is left RUNNING."""
    from . import tracking

    deadline = time.monotonic() + ORPHAN_WAIT
    orphans = tracking.live_children(client, exp_id, parent_id)
    if orphans:
        echo(f"waiting for {len(orphans)} run(s) of a killed driver's workers to stop")
    while orphans and time.monotonic() < deadline:
        time.sleep(0.5)
        orphans = tracking.live_children(client, exp_id, parent_id)
    if orphans:
        echo(f"{len(orphans)} run(s) still RUNNING by live processes after {ORPHAN_WAIT:.0f} s: left alone")


def _heartbeat(parent_id: str, stop: threading.Event) -> None:
    """Tell drivers on other hosts that this grid's driver is alive (a failed write is retried next time)."""
    from . import tracking

    client = tracking.get_client()
    while not stop.wait(tracking.HEARTBEAT_SECONDS):
        try:
            tracking.heartbeat(client, parent_id)
        except Exception:  # the store is down: the grid itself will say so
            pass
