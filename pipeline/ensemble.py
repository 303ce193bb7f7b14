"""Ensembles: configurations that share an architecture, trained together in one pass.

On a GPU a small MLP leaves the device mostly idle. Here E configurations that agree on
ENSEMBLE_KEYS stack their weights along a leading member dimension, and each layer is one batched
matmul (torch.baddbmm) for all of them. Each member keeps what makes it itself:
- its init and seed: it is built exactly as the sequential path builds it, then stacked;
- its own shuffling (a generator seeded with its seed) and its clip threshold;
- its optimizer state: optimizer updates are element-wise, so one torch.optim optimizer over the
  stacked parameters updates every member exactly as its own optimizer would;
- its loss: the members' mean losses are summed, so each member's gradient is its own.
Every member produces the same Chunks, evaluations and RunResult as train.train would, and is
logged as its own MLflow run. Statistics are the ones of monitor.py, reduced per member.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import RunConfig
from .data import Mnist
from .model import ACTIVATIONS, RECTIFIERS, SATURATION_THRESHOLD, build_model
from .monitor import (
    HIST_BINS,
    LAYER_STATS,
    STEP_STATS,
    Chunk,
    grad_histogram,
    hidden_act_stats,
    histogram_arrays,
    layer_table,
)
from .train import AGC_EPS, DTYPES, ChunkSink, RunResult, make_optimizer, set_seed

# What members must share; they may differ in init, init_std, init_gain, bias_std, clip_threshold, seed.
ENSEMBLE_KEYS = ("activation", "depth", "width", "optimizer", "lr", "momentum", "batch_size", "epochs",
                 "max_steps", "train_subset", "precision", "clip", "device")


def ensemble_key(config: RunConfig) -> tuple:
    return tuple(getattr(config, k) for k in ENSEMBLE_KEYS)


def groups(configs: list[RunConfig], max_size: int = 32) -> list[list[RunConfig]]:
    """Configs that can train together, in chunks of at most max_size members."""
    by_key: dict[tuple, list[RunConfig]] = {}
    for config in configs:
        by_key.setdefault(ensemble_key(config), []).append(config)
    return [group[i : i + max_size] for group in by_key.values() for i in range(0, len(group), max_size)]


class StackedMLP(nn.Module):
    """E MLPs of one architecture: weights (E, out, in), biases (E, out); inputs (E, batch, in)."""

    def __init__(self, members: list[nn.Module], activation: str):
        super().__init__()
        depth = len(members[0].layers)
        self.weights = nn.ParameterList(
            nn.Parameter(torch.stack([m.layers[i].weight.detach() for m in members])) for i in range(depth)
        )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.stack([m.layers[i].bias.detach() for m in members])) for i in range(depth)
        )
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor, preacts: list[torch.Tensor] | None = None) -> torch.Tensor:
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            z = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
            if preacts is not None:
                preacts.append(z)
            x = self.act(z) if i < last else z
        return x


def _member_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(len(tensors), E): the norm of each tensor's slice for each member."""
    return torch.stack([torch.linalg.vector_norm(t.flatten(1), dim=1) for t in tensors]).float()


def clip_members(model: StackedMLP, mode: str, thresholds: torch.Tensor) -> torch.Tensor | None:
    """train.clip_gradients for every member at once, each with its own threshold; returns (E,) bools."""
    if mode == "none":
        return None
    params = [p for pair in zip(model.weights, model.biases) for p in pair]
    grads = [p.grad for p in params]

    def per_member(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.view(-1, *([1] * (like.dim() - 1)))

    if mode == "norm":  # the arithmetic of torch.nn.utils.clip_grad_norm_, per member
        total = torch.linalg.vector_norm(_member_norms(grads), dim=0)
        coef = (thresholds / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(per_member(coef.to(g.dtype), g))
        return total > thresholds
    if mode == "value":
        active = torch.stack([g.flatten(1).abs().amax(dim=1) for g in grads]).amax(dim=0) > thresholds
        for g in grads:
            limit = per_member(thresholds.to(g.dtype), g)
            torch.clamp(g, -limit, limit, out=g)
        return active
    if mode == "agc":  # unit-wise (rows of W, whole b), classifier layer left alone: see train._adaptive_clip
        active = torch.zeros_like(thresholds, dtype=torch.bool)
        for w, b in list(zip(model.weights, model.biases))[:-1]:
            for p, dims in ((w, (2,)), (b, (1,))):
                p_norm = torch.linalg.vector_norm(p.detach(), dim=dims, keepdim=True).clamp(min=AGC_EPS)
                g_norm = torch.linalg.vector_norm(p.grad, dim=dims, keepdim=True)
                max_norm = per_member(thresholds.to(p.dtype), p_norm) * p_norm
                trigger = g_norm > max_norm
                p.grad.copy_(torch.where(trigger, p.grad * (max_norm / g_norm.clamp(min=1e-6)), p.grad))
                active |= trigger.flatten(1).any(dim=1)
        return active
    raise ValueError(f"unknown clip mode {mode!r}")


class EnsembleMonitor:
    """monitor.Monitor's statistics, reduced per member: buffers (stat, step, [layer,] member)."""

    def __init__(self, model: StackedMLP, activation: str, total_steps: int, chunk_steps: int):
        self.model = model
        self.members = model.weights[0].shape[0]
        self.n_layers = len(model.weights)
        self.params = [p for pair in zip(model.weights, model.biases) for p in pair]
        device, E, L = model.weights[0].device, self.members, self.n_layers
        self.chunk_steps = chunk_steps
        self._per_step = torch.full((len(STEP_STATS), chunk_steps, E), math.nan, device=device)
        self._per_layer = torch.full((len(LAYER_STATS), chunk_steps, L, E), math.nan, device=device)
        self._row, self._first_step = 0, 0
        self._saturation = SATURATION_THRESHOLD.get(activation)
        self._rectifier = activation in RECTIFIERS
        self._backprop: list[torch.Tensor | None] = []
        self._prev = [w.detach().clone() for w in model.weights]
        self._weight_norms: torch.Tensor | None = None
        self.hist_steps = sorted({0, total_steps // 2, total_steps - 1})
        self._hist = torch.zeros((E, len(self.hist_steps), L, HIST_BINS), device=device)

    @torch.no_grad()
    def watch(self, preacts: list[torch.Tensor]) -> None:
        self._backprop = [None] * self.n_layers
        for i, z in enumerate(preacts):
            z.register_hook(self._hook(i))
        stats = hidden_act_stats(torch.stack(preacts[:-1]), self._saturation, self._rectifier)  # (layers, E)
        if stats is not None:
            self._per_layer[LAYER_STATS.index("act"), self._row, : len(stats)] = stats

    def _hook(self, i: int):
        def hook(grad: torch.Tensor) -> None:
            self._backprop[i] = torch.linalg.vector_norm(grad.detach().flatten(1), dim=1).float()

        return hook

    @torch.no_grad()
    def gradients(self, step: int) -> torch.Tensor:
        norms = _member_norms([p.grad for p in self.params])  # (2L, E)
        global_norm = torch.linalg.vector_norm(norms, dim=0)
        self._per_layer[LAYER_STATS.index("weight_grad_norm"), self._row] = norms[0::2]
        self._per_layer[LAYER_STATS.index("backprop_norm"), self._row] = torch.stack(self._backprop)
        if step in self.hist_steps:
            slot = self.hist_steps.index(step)
            for i, w in enumerate(self.model.weights):
                for e in range(self.members):
                    self._hist[e, slot, i] = grad_histogram(w.grad[e])
        self._per_step[STEP_STATS.index("global_norm_pre_clip"), self._row] = global_norm
        return global_norm

    @torch.no_grad()
    def clipped(self, global_norm_pre: torch.Tensor, active: torch.Tensor | None) -> None:
        post, clip = STEP_STATS.index("global_norm_post_clip"), STEP_STATS.index("clip_active")
        if active is None:
            self._per_step[post, self._row] = global_norm_pre
            self._per_step[clip, self._row] = 0.0
            return
        self._per_step[post, self._row] = torch.linalg.vector_norm(_member_norms([p.grad for p in self.params]), dim=0)
        self._per_step[clip, self._row] = active.float()

    @torch.no_grad()
    def before_update(self) -> None:
        self._weight_norms = _member_norms(list(self.model.weights))
        torch._foreach_copy_(self._prev, list(self.model.weights))

    @torch.no_grad()
    def after_update(self, losses: torch.Tensor, accs: torch.Tensor) -> None:
        torch._foreach_sub_(self._prev, list(self.model.weights))
        self._per_layer[LAYER_STATS.index("update_ratio"), self._row] = _member_norms(self._prev) / self._weight_norms
        self._per_step[STEP_STATS.index("loss"), self._row] = losses.detach().float()
        self._per_step[STEP_STATS.index("acc"), self._row] = accs.detach().float()
        self._row += 1

    @property
    def chunk_full(self) -> bool:
        return self._row == self.chunk_steps

    def flush(self) -> list[Chunk]:
        """One host transfer; a Chunk per member, exactly as monitor.Monitor.flush makes them."""
        n = self._row
        host_step, host_layer = (t.cpu().numpy() for t in (self._per_step, self._per_layer))
        steps = np.arange(self._first_step, self._first_step + n)
        chunks = [
            Chunk(steps,
                  {name: host_step[i, :n, e].copy() for i, name in enumerate(STEP_STATS)},
                  {name: host_layer[i, :n, :, e].copy() for i, name in enumerate(LAYER_STATS)})
            for e in range(self.members)
        ]
        self._first_step += n
        self._row = 0
        self._per_step.fill_(math.nan)
        self._per_layer.fill_(math.nan)
        return chunks

    def histograms(self, member: int, last_step: int) -> dict[str, np.ndarray]:
        return histogram_arrays(self.hist_steps, self._hist[member], last_step)


@torch.no_grad()
def _evaluate(model: StackedMLP, x: torch.Tensor, y: torch.Tensor, batch: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    E = model.weights[0].shape[0]
    loss = torch.zeros(E, device=x.device, dtype=torch.float64)
    correct = torch.zeros(E, device=x.device, dtype=torch.int64)
    for i in range(0, len(x), batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        logits = model(xb.unsqueeze(0).expand(E, -1, -1))
        loss += F.cross_entropy(logits.float().transpose(1, 2), yb.expand(E, -1), reduction="none").double().sum(1)
        correct += (logits.argmax(dim=2) == yb).sum(1)
    return (loss / len(x)).cpu().numpy(), (correct.double() / len(x)).cpu().numpy()


def train_ensemble(configs: list[RunConfig], data: Mnist, sinks: list[ChunkSink] | None = None) -> list[RunResult]:
    """Train configs that share ENSEMBLE_KEYS together; one RunResult per config, as train.train's."""
    if len({ensemble_key(c) for c in configs}) != 1:
        raise ValueError(f"an ensemble's members must agree on {', '.join(ENSEMBLE_KEYS)}")
    cfg0, E = configs[0], len(configs)
    sinks = sinks or [ChunkSink() for _ in configs]
    device = data.x_train.device
    members = []
    for config in configs:  # each built exactly as train.train builds it
        set_seed(config.seed)
        members.append(build_model(config, device, DTYPES[config.precision]))
    model = StackedMLP(members, cfg0.activation)
    del members
    optimizer = make_optimizer(model, cfg0)
    thresholds = torch.tensor([c.clip_threshold for c in configs], device=device)
    total = cfg0.total_steps
    monitor = EnsembleMonitor(model, cfg0.activation, total, chunk_steps=min(total, 64))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg0.precision == "bf16")
    n_train = cfg0.train_subset or len(data.x_train)
    x_train, y_train = data.x_train[:n_train], data.y_train[:n_train]
    shufflers = [torch.Generator(device=device).manual_seed(c.seed) for c in configs]
    steps_per_epoch = math.ceil(n_train / cfg0.batch_size)

    chunks: list[list[Chunk]] = [[] for _ in configs]
    evals: list[list[tuple[int, float, float]]] = [[] for _ in configs]
    last_step = [total - 1] * E  # a diverged member's last recorded step
    diverged = [False] * E
    final: list[tuple[float, float] | None] = [None] * E  # a diverged member's final (loss, accuracy)
    step, start = 0, time.perf_counter()
    while step < total and not all(diverged):
        order = torch.stack([torch.randperm(n_train, device=device, generator=g) for g in shufflers])
        for i in range(steps_per_epoch):
            idx = order[:, i * cfg0.batch_size : (i + 1) * cfg0.batch_size]
            xb, yb = x_train[idx], y_train[idx]
            preacts: list[torch.Tensor] = []
            with autocast:
                logits = model(xb, preacts)
            losses = F.cross_entropy(logits.float().transpose(1, 2), yb, reduction="none").mean(dim=1)
            monitor.watch(preacts)
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()  # each member's gradient is its own loss's
            pre = monitor.gradients(step)
            monitor.clipped(pre, clip_members(model, cfg0.clip, thresholds))
            monitor.before_update()
            optimizer.step()
            monitor.after_update(losses, (logits.argmax(dim=2) == yb).float().mean(dim=1))
            step += 1
            if monitor.chunk_full or step == total or i == steps_per_epoch - 1:
                for e, chunk in enumerate(monitor.flush()):
                    if diverged[e]:
                        continue
                    bad = chunk.first_nonfinite()
                    if bad is not None:
                        chunk = chunk.truncate(bad + 1)
                        diverged[e], last_step[e] = True, int(chunk.step[-1])
                    chunks[e].append(chunk)
                    sinks[e].on_chunk(chunk)
            if step == total or all(diverged):
                break
        # As train.train: a completed epoch is evaluated; a member that diverged gets one final
        # evaluation, at its last recorded step (its weights are NaN by then, in both paths).
        losses_test, accs_test = _evaluate(model, data.x_test, data.y_test)
        for e in range(E):
            result = (float(losses_test[e]), float(accs_test[e]))
            if not diverged[e]:
                evals[e].append((step - 1, *result))
                sinks[e].on_eval(step - 1, *result)
            elif final[e] is None:
                final[e] = result
                sinks[e].on_eval(last_step[e], *result)
    seconds = time.perf_counter() - start
    results = []
    for e, config in enumerate(configs):
        test_loss, test_acc = final[e] if diverged[e] else evals[e][-1][1:]
        results.append(RunResult(
            outcome="diverged" if diverged[e] else "completed",
            steps=last_step[e] + 1,
            seconds=seconds,
            final_test_loss=test_loss,
            final_test_acc=test_acc,
            evals=evals[e],
            table=layer_table(chunks[e], config.activation),
            histograms=monitor.histograms(e, last_step[e]),
            input_sq_mean=data.input_sq_mean,
        ))
    return results
