"""Per-layer gradient and activation statistics, every step, kept on the device.

The training loop calls the monitor at fixed points of each step; every statistic is a device
tensor written into a preallocated chunk buffer, so the loop never waits for the host. `flush()`
copies a whole chunk to the host in one transfer. Layer index L00 is the first Linear layer.

Per layer l (z_l = W_l x_{l-1} + b_l is the layer's output, before the activation):
    weight_grad_norm  ||dL/dW_l||           backprop_norm  ||dL/dz_l|| (the error reaching layer l)
    update_ratio      ||dW_l|| / ||W_l||    act            saturated or dead fraction (hidden layers)
Per step: loss, acc, global norm before and after clipping, whether clipping was active.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .model import MLP, RECTIFIERS, SATURATION_THRESHOLD

LAYER_STATS = ("weight_grad_norm", "backprop_norm", "update_ratio", "act")
STEP_STATS = ("loss", "acc", "global_norm_pre_clip", "global_norm_post_clip", "clip_active")
# Gradient histograms: log10|dL/dW| in fixed bins so that layers and runs compare directly.
HIST_RANGE = (-12.0, 4.0)
HIST_BINS = 80


def hidden_act_stats(hidden: torch.Tensor, saturation: float | None, rectifier: bool) -> torch.Tensor | None:
    """Saturated or dead fraction per hidden layer from stacked pre-activations (..., batch, width),
    worked on in place; None for an activation that has neither statistic. The leading dims stay:
    (layers,) here, (layers, members) in ensemble.py."""
    if saturation is not None:
        return hidden.abs_().gt_(saturation).mean(dim=(-2, -1))
    if rectifier:
        return hidden.gt_(0).amax(dim=-2).mean(dim=-1).neg_().add_(1)  # 1 - P(unit fires on the batch)
    return None


def grad_histogram(grad: torch.Tensor) -> torch.Tensor:
    """Counts of log10|grad| in the fixed HIST_BINS bins over HIST_RANGE."""
    lo, hi = HIST_RANGE
    return torch.histc(torch.log10(grad.detach().abs().float() + 1e-30).clamp(lo, hi), bins=HIST_BINS, min=lo, max=hi)


def histogram_arrays(hist_steps: list[int], hist: torch.Tensor, last_step: int) -> dict[str, np.ndarray]:
    """histograms.npz's arrays from (slots, layers, bins) counts: the slots of steps reached."""
    taken = [i for i, s in enumerate(hist_steps) if s <= last_step]
    return {
        "steps": np.array([hist_steps[i] for i in taken]),
        "counts": hist[taken].cpu().numpy(),
        "log10_abs_grad_edges": np.linspace(*HIST_RANGE, HIST_BINS + 1),
    }


@dataclass
class Chunk:
    """Host copy of consecutive steps: step (n,), per_step {name: (n,)}, per_layer {name: (n, L)}."""

    step: np.ndarray
    per_step: dict[str, np.ndarray]
    per_layer: dict[str, np.ndarray]

    def truncate(self, n: int) -> Chunk:
        return Chunk(
            self.step[:n],
            {k: v[:n] for k, v in self.per_step.items()},
            {k: v[:n] for k, v in self.per_layer.items()},
        )

    def first_nonfinite(self) -> int | None:
        """Index of the first step whose loss or pre-clip gradient norm is NaN or Inf."""
        bad = ~(np.isfinite(self.per_step["loss"]) & np.isfinite(self.per_step["global_norm_pre_clip"]))
        return int(np.argmax(bad)) if bad.any() else None


class Monitor:
    """Collects statistics for `total_steps` steps of `model` in chunks of `chunk_steps`.

    With full=False only the per-step scalars are kept (loss, accuracy, global norms: what
    divergence detection and clipping need); the per-layer statistics are skipped.
    """

    def __init__(self, model: MLP, activation: str, total_steps: int, chunk_steps: int = 64, full: bool = True):
        self.full = full
        self.n_layers = len(model.layers)
        self.weights = [layer.weight for layer in model.layers]
        self.params = [p for layer in model.layers for p in (layer.weight, layer.bias)]
        device, dtype = self.weights[0].device, torch.float32
        self.chunk_steps = chunk_steps
        self._per_step = torch.full((len(STEP_STATS), chunk_steps), float("nan"), device=device, dtype=dtype)
        self._per_layer = torch.full(
            (len(LAYER_STATS), chunk_steps, self.n_layers), float("nan"), device=device, dtype=dtype
        )
        self._row = 0  # row of the current step in the chunk
        self._first_step = 0  # global step of row 0
        self._saturation = SATURATION_THRESHOLD.get(activation)
        self._rectifier = activation in RECTIFIERS
        self._backprop: list[torch.Tensor] = []
        self._prev_weights = [w.detach().clone() for w in self.weights] if full else []
        self._weight_norms: torch.Tensor | None = None
        self.hist_steps = sorted({0, total_steps // 2, total_steps - 1})
        self._hist = torch.zeros((len(self.hist_steps), self.n_layers, HIST_BINS), device=device, dtype=dtype)

    # -- called by the training loop, in this order, once per step ---------------------------------

    @torch.no_grad()
    def watch(self, preacts: list[torch.Tensor]) -> None:
        """Activation statistics of this forward pass, and hooks that catch dL/dz in backward."""
        if not self.full:
            return
        self._backprop = [None] * self.n_layers
        for i, z in enumerate(preacts):
            z.register_hook(self._backprop_hook(i))
        # One stacked copy (layers, batch, width) of the hidden pre-activations (the output layer has
        # no activation): a handful of kernels whatever the depth.
        stats = hidden_act_stats(torch.stack(preacts[:-1]), self._saturation, self._rectifier)
        if stats is not None:
            self._per_layer[LAYER_STATS.index("act"), self._row, : len(stats)] = stats

    def _backprop_hook(self, i: int):
        def hook(grad: torch.Tensor) -> None:
            self._backprop[i] = torch.linalg.vector_norm(grad.detach()).float()

        return hook

    @torch.no_grad()
    def gradients(self, step: int) -> torch.Tensor:
        """After backward, before clipping: per-layer norms; returns the global pre-clip norm."""
        grads = [p.grad for p in self.params]
        norms = torch._foreach_norm(grads)  # one fused pass over all gradients
        global_norm = torch.linalg.vector_norm(torch.stack(norms).float())
        if self.full:
            self._per_layer[LAYER_STATS.index("weight_grad_norm"), self._row] = torch.stack(norms[0::2]).float()
            self._per_layer[LAYER_STATS.index("backprop_norm"), self._row] = torch.stack(self._backprop)
            if step in self.hist_steps:
                self._histograms(self.hist_steps.index(step))
        self._per_step[STEP_STATS.index("global_norm_pre_clip"), self._row] = global_norm
        return global_norm

    def _histograms(self, slot: int) -> None:
        for i, w in enumerate(self.weights):
            self._hist[slot, i] = grad_histogram(w.grad)

    @torch.no_grad()
    def clipped(self, global_norm_pre: torch.Tensor, active: torch.Tensor | None) -> None:
        """After clipping: the global norm that reaches the optimizer."""
        row = self._row
        if active is None:  # no clipping: post == pre
            self._per_step[STEP_STATS.index("global_norm_post_clip"), row] = global_norm_pre
            self._per_step[STEP_STATS.index("clip_active"), row] = 0.0
            return
        norms = torch._foreach_norm([p.grad for p in self.params])
        self._per_step[STEP_STATS.index("global_norm_post_clip"), row] = torch.linalg.vector_norm(torch.stack(norms))
        self._per_step[STEP_STATS.index("clip_active"), row] = active.float()

    @torch.no_grad()
    def before_update(self) -> None:
        if self.full:
            self._weight_norms = torch.stack(torch._foreach_norm(self.weights))
            torch._foreach_copy_(self._prev_weights, self.weights)

    @torch.no_grad()
    def after_update(self, loss: torch.Tensor, acc: torch.Tensor) -> None:
        """After the optimizer step: update ratios, loss and accuracy; the step is complete."""
        if self.full:
            torch._foreach_sub_(self._prev_weights, self.weights)  # now holds -dW
            delta = torch.stack(torch._foreach_norm(self._prev_weights))
            self._per_layer[LAYER_STATS.index("update_ratio"), self._row] = (delta / self._weight_norms).float()
        self._per_step[STEP_STATS.index("loss"), self._row] = loss.detach().float()
        self._per_step[STEP_STATS.index("acc"), self._row] = acc.detach().float()
        self._row += 1

    # -- host side ---------------------------------------------------------------------------------

    @property
    def chunk_full(self) -> bool:
        return self._row == self.chunk_steps

    def flush(self) -> Chunk:
        """Copy the steps recorded since the last flush to the host (one transfer) and reset."""
        n = self._row
        host = torch.cat([self._per_step.flatten(), self._per_layer.flatten()]).cpu().numpy()
        per_step = host[: self._per_step.numel()].reshape(self._per_step.shape)
        per_layer = host[self._per_step.numel() :].reshape(self._per_layer.shape)
        chunk = Chunk(
            step=np.arange(self._first_step, self._first_step + n),
            per_step={name: per_step[i, :n].copy() for i, name in enumerate(STEP_STATS)},
            per_layer={name: per_layer[i, :n].copy() for i, name in enumerate(LAYER_STATS)} if self.full else {},
        )
        self._first_step += n
        self._row = 0
        self._per_step.fill_(float("nan"))
        self._per_layer.fill_(float("nan"))
        return chunk

    def histograms(self, last_step: int) -> dict[str, np.ndarray]:
        """Gradient histograms at the first, middle and last step reached (for histograms.npz)."""
        return histogram_arrays(self.hist_steps, self._hist, last_step)


def act_statistic(activation: str) -> str:
    """Name of the activation statistic of an activation: 'saturated' or 'dead'."""
    return "dead" if activation in RECTIFIERS else "saturated"


def layer_table(chunks: list[Chunk], activation: str) -> pd.DataFrame:
    """Long table, one row per step x layer: every per-layer statistic plus the step's scalars.
    The generic 'act' statistic is named after what it measures for this activation."""
    names = [act_statistic(activation) if n == "act" else n for n in LAYER_STATS]
    if not chunks or not chunks[0].per_layer:
        return pd.DataFrame(columns=["step", "layer", *names, *STEP_STATS])
    step = np.concatenate([c.step for c in chunks])
    n_layers = chunks[0].per_layer[LAYER_STATS[0]].shape[1]
    columns = {"step": np.repeat(step, n_layers), "layer": np.tile(np.arange(n_layers), len(step))}
    for name, column in zip(LAYER_STATS, names):
        columns[column] = np.concatenate([c.per_layer[name] for c in chunks]).reshape(-1)
    for name in STEP_STATS:
        columns[name] = np.repeat(np.concatenate([c.per_step[name] for c in chunks]), n_layers)
    return pd.DataFrame(columns)
