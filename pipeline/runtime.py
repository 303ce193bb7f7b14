"""Runtime settings, in one place: device, seed, dtypes, SIGTERM, process-wide defaults.

`configure()` is called once per process by whatever starts work there (the CLI, a pool worker, a
Ray task); nothing in gradbench changes process state at import time.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: `gradbench --help` and prepare do without it
    import torch


def param_dtype(precision: str) -> torch.dtype:
    """The dtype of a precision's parameters: bf16 and fp16 keep fp32 parameters (the optimizer's
    master weights) and compute under autocast."""
    import torch

    return {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.float32, "fp16": torch.float32}[precision]


def check_precision(device: torch.device, precision: str) -> None:
    """Raise ValueError when this torch cannot autocast to `precision` on `device` (older CPU
    builds fall back to fp32 with a warning: a run that says fp16 must compute in fp16)."""
    import warnings

    import torch

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


def configure() -> None:
    """Process-wide defaults: a display-free matplotlib backend (clusters, CI) and no MLflow
    progress bar per artifact download (it drowns the report's output; users can turn it on)."""
    import matplotlib

    matplotlib.use("Agg")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


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


def autocast(device: torch.device, precision: str):
    """The autocast context of a precision (bf16 and fp16 compute in their type, the others as
    stored: no context at all, since entering a disabled autocast still costs time in every step)."""
    import torch

    if precision not in ("bf16", "fp16"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


_shield = {"depth": 0, "pending": None}  # signals that arrived inside a shielded() block


def interrupt_on_sigterm() -> None:
    """SIGTERM (a scheduler stopping the job, pool.terminate()) unwinds like Ctrl-C, so that the
    open runs are marked KILLED; inside a shielded() block it waits for the block's end. Python
    allows signal handlers in the main thread only."""

    def handler(signum, frame):
        if _shield["depth"]:
            _shield["pending"] = signum
            return
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def shielded():
    """A block that SIGTERM does not cut in two (writing a run's start or end to the tracking
    store): a SIGTERM that arrives inside it is raised as KeyboardInterrupt when it ends."""
    _shield["depth"] += 1
    try:
        yield
    finally:
        _shield["depth"] -= 1
        if _shield["depth"] == 0 and _shield["pending"] is not None:
            signum, _shield["pending"] = _shield["pending"], None
            raise KeyboardInterrupt(f"signal {signum}")
