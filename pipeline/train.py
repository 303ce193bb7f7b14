"""One training run: the loop, gradient clipping, divergence detection.

    gradbench train --activation sigmoid --depth 10 --width 256 --init default --epochs 1

The whole dataset already sits on the device; a batch is an index into it. Nothing in the loop
waits for the host: statistics stay on the device (monitor.py) and are copied in chunks, and the
divergence check (NaN or Inf in the loss or the gradients) runs on each copied chunk. A diverged
run stops at the end of that chunk, keeps everything up to the first bad step, and is a result.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .config import RunConfig
from .data import Mnist
from .model import MLP, build_model
from .monitor import Chunk, Monitor, layer_table

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.float32}
AGC_EPS = 1e-3  # Brock et al. 2021: floor on ||W_i|| so that zero-initialized units can move


def get_device(name: str = "auto") -> torch.device:
    """auto: cuda if available, else cpu. An explicit device that is not there is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available on this machine")
    return device


def set_seed(seed: int) -> None:
    """Seed every generator a run touches (Python, NumPy, torch on CPU and all GPUs)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class RunResult:
    outcome: str  # "completed" or "diverged"
    steps: int  # optimizer steps taken and recorded
    seconds: float
    final_test_loss: float
    final_test_acc: float
    evals: list[tuple[int, float, float]]  # (step, test loss, test accuracy) after each epoch
    table: pd.DataFrame  # monitor.layer_table: one row per step x layer
    histograms: dict[str, np.ndarray]
    input_sq_mean: float  # E[x^2] of the training inputs, for the theory's finite-depth prediction


class ChunkSink:
    """Where finished chunks and evaluations go while training runs (tracking.RunLogger, or none)."""

    def on_chunk(self, chunk: Chunk) -> None: ...

    def on_eval(self, step: int, loss: float, acc: float) -> None: ...


def clip_gradients(model: MLP, mode: str, threshold: float) -> torch.Tensor | None:
    """Clip in place; return a device bool 'clipping changed something', None when mode is none."""
    params = list(model.parameters())
    if mode == "none":
        return None
    if mode == "norm":
        total = torch.nn.utils.clip_grad_norm_(params, threshold, foreach=True)
        return total > threshold
    if mode == "value":
        active = torch.stack([p.grad.abs().amax() for p in params]).amax() > threshold
        torch.nn.utils.clip_grad_value_(params, threshold, foreach=True)
        return active
    if mode == "agc":
        return _adaptive_clip(model, threshold)
    raise ValueError(f"unknown clip mode {mode!r}")


def _adaptive_clip(model: MLP, ratio: float) -> torch.Tensor:
    """Unit-wise AGC (Brock et al. 2021): rescale each unit's gradient so that
    ||G_i|| <= ratio * max(||W_i||, eps), row-wise for weights and whole-vector for biases. As in the
    paper, the final (classifier) layer is left unclipped."""
    active = torch.zeros((), dtype=torch.bool, device=next(model.parameters()).device)
    for layer in model.layers[:-1]:
        for p, dim in ((layer.weight, 1), (layer.bias, 0)):
            p_norm = torch.linalg.vector_norm(p.detach(), dim=dim, keepdim=True).clamp(min=AGC_EPS)
            g_norm = torch.linalg.vector_norm(p.grad, dim=dim, keepdim=True)
            max_norm = ratio * p_norm
            trigger = g_norm > max_norm
            p.grad.copy_(torch.where(trigger, p.grad * (max_norm / g_norm.clamp(min=1e-6)), p.grad))
            active |= trigger.any()
    return active


def make_optimizer(model: MLP, config: RunConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    return torch.optim.Adam(model.parameters(), lr=config.lr, betas=(config.momentum, 0.999))


@torch.no_grad()
def evaluate(model: MLP, x: torch.Tensor, y: torch.Tensor, batch: int = 10_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean test loss and accuracy, as device scalars."""
    loss = torch.zeros((), device=x.device, dtype=torch.float64)
    correct = torch.zeros((), device=x.device, dtype=torch.int64)
    for i in range(0, len(x), batch):
        logits = model(x[i : i + batch])
        loss += F.cross_entropy(logits.float(), y[i : i + batch], reduction="sum").double()
        correct += (logits.argmax(dim=1) == y[i : i + batch]).sum()
    return loss / len(x), correct.double() / len(x)


def train(config: RunConfig, data: Mnist, sink: ChunkSink | None = None, full_monitor: bool = True) -> RunResult:
    """Train one MLP on `data` (already on its device) and record every step's statistics."""
    sink = sink or ChunkSink()
    device = data.x_train.device
    set_seed(config.seed)
    model = build_model(config, device, DTYPES[config.precision])
    optimizer = make_optimizer(model, config)
    total = config.total_steps
    monitor = Monitor(model, config.activation, total, chunk_steps=min(total, 64), full=full_monitor)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")

    n_train = config.train_subset or len(data.x_train)
    x_train, y_train = data.x_train[:n_train], data.y_train[:n_train]
    shuffle = torch.Generator(device=device).manual_seed(config.seed)
    steps_per_epoch = math.ceil(n_train / config.batch_size)

    chunks: list[Chunk] = []
    evals: list[tuple[int, float, float]] = []
    outcome = "completed"
    step = 0
    start = time.perf_counter()
    while step < total and outcome == "completed":
        order = torch.randperm(n_train, device=device, generator=shuffle)
        for i in range(steps_per_epoch):
            idx = order[i * config.batch_size : (i + 1) * config.batch_size]
            xb, yb = x_train[idx], y_train[idx]
            preacts: list[torch.Tensor] = []
            with autocast:
                logits = model(xb, preacts)
            loss = F.cross_entropy(logits.float(), yb)
            monitor.watch(preacts)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            pre = monitor.gradients(step)
            monitor.clipped(pre, clip_gradients(model, config.clip, config.clip_threshold))
            monitor.before_update()
            optimizer.step()
            monitor.after_update(loss, (logits.argmax(dim=1) == yb).float().mean())
            step += 1
            # Flush at each epoch's end too, so that divergence is known before the evaluation.
            if monitor.chunk_full or step == total or i == steps_per_epoch - 1:
                chunk = monitor.flush()
                bad = chunk.first_nonfinite()
                if bad is not None:
                    chunk = chunk.truncate(bad + 1)  # keep the first bad step: it shows the blow-up
                    step = int(chunk.step[-1]) + 1
                    outcome = "diverged"
                chunks.append(chunk)
                sink.on_chunk(chunk)
            if outcome == "diverged" or step == total:
                break
        if outcome == "completed":
            test_loss, test_acc = (float(v) for v in evaluate(model, data.x_test, data.y_test))
            evals.append((step - 1, test_loss, test_acc))
            sink.on_eval(step - 1, test_loss, test_acc)

    if outcome == "diverged":
        test_loss, test_acc = (float(v) for v in evaluate(model, data.x_test, data.y_test))
        sink.on_eval(step - 1, test_loss, test_acc)
    else:
        _, test_loss, test_acc = evals[-1]
    return RunResult(
        outcome=outcome,
        steps=step,
        seconds=time.perf_counter() - start,
        final_test_loss=test_loss,
        final_test_acc=test_acc,
        evals=evals,
        table=layer_table(chunks, config.activation),
        histograms=monitor.histograms(step - 1),
        input_sq_mean=data.input_sq_mean,
    )

