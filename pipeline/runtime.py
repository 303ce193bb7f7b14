"""Runtime settings, in one place: device, seed, dtypes, SIGTERM, process-wide defaults.

`configure()` is called once per process by whatever starts work there (the CLI, a pool worker, a
Ray task); nothing in gradbench changes process state at import time.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: `gradbench --help` and prepare do without it
    import torch


def param_dtype(precision: str) -> torch.dtype:
    """The dtype of a precision's parameters: bf16 and fp16 keep fp32 parameters (the optimizer's
    master weights) and compute under autocast."""
    import torch

    return {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.float32, "fp16": torch.float32,
            "tf32": torch.float32}[precision]


def check_precision(device: torch.device, precision: str) -> None:
    """Raise ValueError when this torch cannot autocast to `precision` on `device` (older CPU
    builds fall back to fp32 with a warning: a run that says fp16 must compute in fp16), or when
    the device has no TF32 (a CPU or a GPU before Ampere would compute fp32 under tf32's name)."""
    import warnings

    import torch

    if precision == "tf32" and (device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8):
        raise ValueError(f"tf32 needs a CUDA GPU of compute capability 8.0 or newer (Ampere), not {device.type}: "
                         "use fp32 there")
    if precision not in ("bf16", "fp16"):
        return
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.autocast(device.type, dtype=dtype):
                found = (torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)).dtype
        except RuntimeError:
            found = None
    if found != dtype:
        raise ValueError(f"{precision} autocast is not supported on {device.type} by torch {torch.__version__}: "
                         "use fp32 or bf16 there")


def available_memory(device: torch.device) -> int | None:
    """Bytes free on the device: CUDA's free memory, or the host's MemAvailable (Linux); None if unknown."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def configure() -> None:
    """Process-wide defaults: a display-free matplotlib backend (clusters, CI), no MLflow progress
    bar per artifact download (it drowns the report's output; users can turn it on), and no
    traceback from MLflow's SQL store for an error that gradbench reports itself, in words (its
    "SQLAlchemy database error" log printed a full disk as a crash, before gradbench said it)."""
    import logging

    import matplotlib

    matplotlib.use("Agg")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    store_log = logging.getLogger("mlflow.store.db.utils")
    if _quiet_sql_errors not in store_log.filters:
        store_log.addFilter(_quiet_sql_errors)


def _quiet_sql_errors(record) -> bool:
    """A logging filter: drop MLflow's "SQLAlchemy database error" record (the error itself is raised
    and reported); keep every other."""
    return not str(record.msg).startswith("SQLAlchemy database error")


def get_device(name: str = "auto") -> torch.device:
    """auto: cuda if available, else cpu. An explicit device that is not there is an error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} asked for, but MPS (Apple GPUs) is not available on this machine")
    return device


def set_seed(seed: int) -> None:
    """Seed every generator a run touches (Python, NumPy, torch on CPU and all GPUs)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def matmul_precision(precision: str):
    """TF32 matmuls and convolutions on CUDA for the `with` block where precision is tf32 (the global
    flags are set back after it); nothing otherwise."""
    import torch

    if precision != "tf32":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def autocast(device: torch.device, precision: str):
    """The autocast context of a precision (bf16 and fp16 compute in their type, the others as
    stored: no context at all, since entering a disabled autocast still costs time in every step)."""
    import torch

    if precision not in ("bf16", "fp16"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


# How a process stops on a signal. Raising KeyboardInterrupt wherever a signal lands is not
# reliable: it can land in a garbage-collection callback, where Python prints "Exception ignored"
# and goes on. So a stop signal is first remembered; the training loop checks it after every step
# and the run and grid code between tracking writes (check_stop), and inside a tracking write
# (shielded) it waits for the write's end, for STOP_GRACE seconds at most. Outside training and
# tracking writes (waiting on workers, loading data) it also raises at once, and the flag stays set
# in case that raise was swallowed; a swallowed one is not printed either (_quiet_unraisable: its
# "Exception ignored ... Traceback" on stderr reads as a crash). A second signal stops the process
# at once, wherever it is, inside a write too; a step that has not ended STOP_GRACE seconds after
# the first (a metrics write inside it waiting on a server) is cut there.
#
# A tracking write that a stop finds waiting on a store that does not answer (a tracking server
# down or frozen: MLflow's client waits and retries for up to a minute a call) gives way after
# STOP_GRACE seconds (a SIGALRM timer), and so does, at once, every later write of this process:
# the runs it had not recorded are left RUNNING with this process's host and pid, for the next
# command on the store to mark FAILED (tracking.fail_stale_runs) and the same grid to resume.
STOP_GRACE = 5.0
_state: dict = {"shield": 0, "defer": 0, "signum": None, "parent": None, "stopping": False, "gave_way": False,
                "installed": False, "last": None, "helpers": set()}


class WriteAbandoned(KeyboardInterrupt):
    """A stop that could not wait for a tracking write: the store did not answer within STOP_GRACE
    seconds of the stop signal, or a second signal came."""


def _quiet_unraisable(unraisable) -> None:
    """sys.unraisablehook: say nothing of our own stop interrupt where a finalizer or weakref
    callback swallowed it (the flag stays set; check_stop raises it again); anything else as Python
    would."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and _state["signum"] is not None:
        return
    sys.__unraisablehook__(unraisable)


def stop_on_signals(sigint: bool = True, parent_pid: int | None = None) -> None:
    """Install the stop handler for SIGTERM (a scheduler stopping the job, pool.terminate()) and,
    with `sigint`, Ctrl-C: the open runs are then marked KILLED. `parent_pid` (a pool worker): stop
    too when that process is gone, and have Linux send SIGTERM when it dies (a driver killed with
    -9 must not leave its workers training). Python allows signal handlers in the main thread only."""
    _state.update(signum=None, parent=parent_pid, stopping=False, gave_way=False, last=None)
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _handler)
    if sigint:
        signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGALRM, _grace_over)
    _state["installed"] = True
    sys.unraisablehook = _quiet_unraisable
    if parent_pid is not None:
        die_with_parent()


def stop_with_me(pid: int | None, stop: bool = True) -> None:
    """A helper process of this one (the grid's recorder) that a stop signal reaching this
    process is passed on to at once, as SIGTERM (so that both stop together); stop=False: no more."""
    (_state["helpers"].add if stop else _state["helpers"].discard)(pid)


def _handler(signum, frame):
    again = _state["signum"] is not None
    _state.update(signum=signum, last=signum)
    for pid in list(_state["helpers"]):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    if _state["shield"]:
        if _state["stopping"]:  # a second signal: the write is given up, as it would be after the grace
            _give_way(f"signal {signum} came again while a tracking write was waiting")
        _state["stopping"] = True
        _arm(STOP_GRACE)
        return  # raised when the write ends
    _state["stopping"] = True
    if again or not _state["defer"]:
        raise KeyboardInterrupt(f"signal {signum}")
    _arm(STOP_GRACE)  # a step that does not end in time (a metrics write waiting on a server) is cut


def stopped_by() -> int | None:
    """The stop signal this process last received (None: none, or an interrupt Python raised itself)."""
    return _state["last"]


def _arm(seconds: float) -> None:
    """A SIGALRM in `seconds` (0: none), where this process's handlers are installed (main thread)."""
    if _state["installed"] and threading.current_thread() is threading.main_thread():
        signal.setitimer(signal.ITIMER_REAL, seconds)


def stand_down() -> None:
    """The process is exiting on a stop: no grace timer may fire any more (its KeyboardInterrupt,
    raised while the process unwinds, ended it by SIGINT instead of its exit status)."""
    if _state["installed"] and threading.current_thread() is threading.main_thread():
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
    _state.update(stopping=False, signum=None)


def _give_way(why: str) -> None:
    _state.update(gave_way=True, signum=None)
    _arm(0)
    raise WriteAbandoned(why)


def _grace_over(signum, frame):
    """SIGALRM: the grace a stop gives a tracking write, or a step to reach its end, is over."""
    if not _state["stopping"]:
        return
    if _state["shield"]:
        _give_way(f"the tracking store did not answer within {STOP_GRACE:g} s of the stop signal ({_state['last']})")
    if _state["defer"] and _state["signum"] is not None:
        _state["signum"] = None
        raise KeyboardInterrupt(f"signal {_state['last']}: the step did not end within {STOP_GRACE:g} s")


def die_with_parent() -> None:
    """prctl(PR_SET_PDEATHSIG, SIGTERM) on Linux: this process is sent SIGTERM when its parent dies
    (killed outright included); elsewhere a grid worker's check_stop parent check does it."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def lock_path(kind: str, *parts: str) -> str:
    """The file that a host-wide lock of `kind` on `parts` (a store's path, a folder, a grid) takes:
    one per key in the temporary folder, so that every process of this host finds the same one."""
    import hashlib
    import tempfile

    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"gradbench-{kind}-{key}.lock")


@contextlib.contextmanager
def host_lock(kind: str, *parts: str):
    """Wait for, then hold, an exclusive lock among this host's processes (the kernel releases it
    when its holder dies, kill -9 included)."""
    import fcntl

    with open(lock_path(kind, *parts), "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def check_stop() -> None:
    """Raise KeyboardInterrupt if a stop signal arrived, or this worker's driver is gone."""
    if _state["signum"] is not None:
        signum, _state["signum"] = _state["signum"], None
        raise KeyboardInterrupt(f"signal {signum}")
    if _state["parent"] is not None and os.getppid() != _state["parent"]:
        raise KeyboardInterrupt("the grid's driver process is gone")


@contextlib.contextmanager
def deferred():
    """A block that checks for stop signals itself (check_stop, e.g. after each training step): a
    first signal inside it only sets the flag."""
    _state["defer"] += 1
    try:
        yield
    finally:
        _state["defer"] -= 1


@contextlib.contextmanager
def shielded():
    """A block that a stop signal does not cut in two (writing a run's start or end to the
    tracking store): a signal that arrives inside it is raised as KeyboardInterrupt when it ends.
    While the process is stopping, the block gets STOP_GRACE seconds (then WriteAbandoned), and
    none at all once a write has been given up: the store is not answering."""
    outermost = _state["shield"] == 0
    if outermost and _state["gave_way"]:
        raise WriteAbandoned("an earlier tracking write was given up: the store is not answering")
    _state["shield"] += 1
    try:
        if outermost and _state["stopping"]:
            _arm(STOP_GRACE)
        yield
    finally:
        _state["shield"] -= 1
        if _state["shield"] == 0:
            _arm(0)
            if _state["signum"] is not None:
                check_stop()
