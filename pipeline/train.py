"""The one training loop: a group of configs (a single run is a group of one) trained together.

    results = train([config], mnist)            # one run
    results = train(configs, mnist, sinks)      # configs that agree on config.GROUP_KEYS

The members of a group share the architecture, the optimizer settings and the step budget; each
keeps what makes it itself: its init and seed (model.build_model), its own shuffling (a CPU generator
seeded with its seed), its clip threshold, its loss (the members' mean losses are summed, so each
member's gradient is its own) and its optimizer state (torch.optim updates are element-wise, so one
optimizer over the stacked parameters updates every member as its own optimizer would).

The whole dataset already sits on the device; a batch is an index into it. Nothing in the loop
waits for the host: statistics stay on the device (monitor.py) and are copied in chunks, and the
divergence check (NaN or Inf in a member's loss or gradients) runs on each copied chunk. A
diverged member's record stops at its first bad step, which is kept (it shows the blow-up); the
others go on. Its slot in the stack keeps computing (on NaNs) until the group ends.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F

from .activations import ACTIVATIONS
from .config import GROUP_KEYS, SEQUENCE_SHAPES, RunConfig, group_key, state_activation
from .data import Mnist
from .model import MLP, build_model
from .monitor import INSTRUMENTS, Monitor, member_norms
from .monitor_time import RecurrentMonitor
from .recurrent import RecurrentNet, build_recurrent
from .results import Chunk, RunResult, layer_table, time_table
from .runtime import autocast, check_precision, check_stop, deferred, matmul_precision, param_dtype

AGC_EPS = 1e-3
# time steps of input profiles a recurrent run hands the theory (theory.predict_time: one profile per
# example, ~0.25 ms a step): 64 images of 28 rows, 8 of 784 pixels
TIME_PROFILE_BUDGET = 1_792  # Brock et al. 2021: floor on ||W_i|| so that zero-initialized units can move


class ChunkSink(Protocol):
    """Where a member's finished chunks and evaluations go while training runs (a tracking.RunLogger)."""

    def on_chunk(self, chunk: Chunk) -> None: ...

    def on_eval(self, step: int, loss: float, acc: float) -> None: ...


class _Discard:
    def on_chunk(self, chunk: Chunk) -> None:
        pass

    def on_eval(self, step: int, loss: float, acc: float) -> None:
        pass


def clip_modes(modes: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Each clip mode a group's members use (none aside): which members use it, (members,) bool."""
    return {mode: torch.tensor([m == mode for m in modes], device=device) for mode in sorted(set(modes) - {"none"})}


def clip_gradients(model: MLP | RecurrentNet, modes: dict[str, torch.Tensor], thresholds: torch.Tensor,
                   pre_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Clip each member's gradients in place by its own mode (clip_modes) and threshold; a member of
    another mode is left exactly as it is (multiplied by 1, clamped to +-inf, never triggered).
    Returns each member's global norm after clipping and whether clipping changed something (None
    when no member clips)."""
    if not modes:
        return pre_norm, None
    grads = [p.grad for p in model.parameters()]
    active = torch.zeros_like(pre_norm, dtype=torch.bool)

    def per_member(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    for mode, mine in modes.items():
        if mode == "norm":  # the arithmetic of torch.nn.utils.clip_grad_norm_, per member
            coef = torch.where(mine, (thresholds / (pre_norm + 1e-6)).clamp(max=1.0), 1.0)
            torch._foreach_mul_(grads, [per_member(coef, g) for g in grads])
            active |= mine & (pre_norm > thresholds)
        elif mode == "value":
            largest = torch.stack([g.reshape(g.shape[0], -1).abs().amax(dim=1) for g in grads]).amax(dim=0)
            active |= mine & (largest > thresholds)
            limits = torch.where(mine, thresholds, torch.inf)
            for g in grads:
                limit = per_member(limits, g)
                torch.clamp(g, -limit, limit, out=g)
        elif mode == "agc":
            active |= mine & _adaptive_clip(model, torch.where(mine, thresholds, torch.inf), per_member)
        else:
            raise ValueError(f"unknown clip mode {mode!r}")
    return torch.linalg.vector_norm(member_norms(grads), dim=0), active


def _adaptive_clip(model: MLP | RecurrentNet, ratios: torch.Tensor, per_member) -> torch.Tensor:
    """Unit-wise AGC (Brock et al. 2021): rescale each unit's gradient so that
    ||G_i|| <= ratio * max(||W_i||, eps), row-wise for weights, whole-vector for biases and
    normalization gamma and beta, whole-scalar for skipinit alphas. As in the paper, the final
    (classifier) layer is left unclipped."""
    active = torch.zeros_like(ratios, dtype=torch.bool)
    classifier = {id(p) for p in model.layers[-1].parameters()}
    for p in model.parameters():
        if id(p) in classifier:
            continue
        # per unit: a weight's rows (members, out, in); a vector (members, n) whole; an alpha (members,)
        p_norm = torch.linalg.vector_norm(p.detach(), dim=-1, keepdim=True) if p.dim() > 1 else p.detach().abs()
        g_norm = torch.linalg.vector_norm(p.grad, dim=-1, keepdim=True) if p.dim() > 1 else p.grad.abs()
        p_norm = p_norm.clamp(min=AGC_EPS)
        max_norm = per_member(ratios, p_norm) * p_norm
        trigger = g_norm > max_norm
        p.grad.copy_(torch.where(trigger, p.grad * (max_norm / g_norm.clamp(min=1e-6)), p.grad))
        active |= trigger.view(len(active), -1).any(dim=1)
    return active


class MemberSGD(torch.optim.Optimizer):
    """torch.optim.SGD's update (no dampening, Nesterov or weight decay) with each member's own lr
    and momentum, tensors over the member axis (the stacked parameters' first dimension):
    buf = momentum * buf + grad (buf = grad at the first step), p -= lr * buf."""

    def __init__(self, params, lr: torch.Tensor, momentum: torch.Tensor) -> None:
        super().__init__(params, {})
        self.lr, self.momentum = lr, momentum
        self.updates: dict[torch.Tensor, torch.Tensor] | None = None  # of the last step, None before one
        self._views: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def step(self, closure=None) -> None:
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        # each member's lr and momentum over its slice of each parameter, (members, 1, ...), made once
        lrs, momenta = zip(*(self._member_views(p) for p in params))
        bufs = [self.state[p].get("momentum_buffer") for p in params]
        if any(buf is None for buf in bufs):  # the first step: buf = grad
            bufs = [g.clone() if buf is None else buf.mul_(m).add_(g) for buf, m, g in zip(bufs, momenta, grads)]
            for p, buf in zip(params, bufs):
                self.state[p]["momentum_buffer"] = buf
        else:  # one call per operation for all parameters (a Python loop of two ops each cost 10% of a step)
            torch._foreach_mul_(bufs, list(momenta))
            torch._foreach_add_(bufs, grads)
        updates = torch._foreach_mul(bufs, list(lrs))
        torch._foreach_sub_(params, updates)
        self.updates = dict(zip(params, updates))  # what each parameter moved by: the monitor's update ratio

    def _member_views(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if p not in self._views:
            member = (-1, *([1] * (p.dim() - 1)))
            self._views[p] = self.lr.view(member), self.momentum.view(member)
        return self._views[p]


def make_optimizer(model: MLP | RecurrentNet, configs: Sequence[RunConfig]) -> torch.optim.Optimizer:
    """SGD with each member's lr and momentum; Adam with the group's (config.group_key)."""
    first = configs[0]
    if first.optimizer == "sgd":
        param = next(model.parameters())
        lr, momentum = (torch.tensor([getattr(c, k) for c in configs], device=param.device, dtype=param.dtype)
                        for k in ("lr", "momentum"))
        return MemberSGD(model.parameters(), lr, momentum)
    return torch.optim.Adam(model.parameters(), lr=first.lr, betas=(first.momentum, 0.999))


def member_losses(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each member: logits (members, batch, classes), y (members, batch) -> (members,)."""
    # at least fp32: bf16 logits (autocast) would lose the loss's precision; fp64 stays fp64
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    members, batch, classes = logits.shape
    # flattened to (members x batch, classes): the 2-D kernel, faster than the (N, C, d) one
    losses = F.cross_entropy(logits.reshape(-1, classes), y.reshape(-1), reduction="none").view(members, batch)
    return losses.mean(dim=1) if reduction == "mean" else losses.sum(dim=1)


@torch.no_grad()
def evaluate(model: MLP | RecurrentNet, x: torch.Tensor, y: torch.Tensor, batch: int = 2000) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean test loss and accuracy of each member, as device tensors (members,)."""
    model.eval()  # BatchNorm: the running statistics
    loss = torch.zeros(model.members, device=x.device, dtype=torch.float64)
    correct = torch.zeros(model.members, device=x.device, dtype=torch.int64)
    for i in range(0, len(x), batch):
        logits = model(x[i : i + batch])
        yb = y[i : i + batch].expand(model.members, -1)
        loss += member_losses(logits, yb, reduction="sum").double()
        correct += (logits.argmax(dim=2) == yb).sum(dim=1)
    model.train()
    return loss / len(x), correct.double() / len(x)


def train(configs: Sequence[RunConfig], data: Mnist, sinks: Sequence[ChunkSink] | None = None,
          full_monitor: bool = True, clock: Callable[[int], None] | None = None,
          instruments: frozenset[str] = INSTRUMENTS) -> list[RunResult]:
    """Train a group of configs on `data` (already on its device); one RunResult per config.
    `clock` (the perf bench's StepClock) is called with the number of steps done after each step;
    `instruments`: those of monitor.INSTRUMENTS to take at the histogram steps."""
    if len(configs) > 1 and configs[0].precision == "fp16":
        raise ValueError("fp16 runs train one at a time: one loss scaler would couple the members")
    if len({group_key(c) for c in configs}) != 1:
        raise ValueError(f"a group's members must agree on {', '.join(GROUP_KEYS)}")
    first, members = configs[0], len(configs)
    sinks = list(sinks) if sinks is not None else [_Discard() for _ in configs]
    device = data.x_train.device
    dtype = param_dtype(first.precision)
    recurrent = first.arch != "mlp"
    model = (build_recurrent if recurrent else build_model)(configs, device, dtype)
    activation = state_activation(first)
    optimizer = make_optimizer(model, configs)
    thresholds = torch.tensor([c.clip_threshold for c in configs], device=device, dtype=dtype)
    modes = clip_modes([c.clip for c in configs], device)
    total = first.total_steps
    monitor = (RecurrentMonitor if recurrent else Monitor)(model, activation, total, chunk_steps=min(total, 64),
                                                          full=full_monitor, instruments=instruments)
    own_update = isinstance(optimizer, MemberSGD)  # the update ratio from the optimizer's step, no snapshot
    monitor.updates_from = optimizer if own_update else None
    check_precision(device, first.precision)
    # fp16: the standard recipe's dynamic loss scale (a step whose scaled gradients overflow is skipped
    # and the scale halved); one scale for the whole group, so fp16 runs train alone (config.group_key)
    scaler = torch.amp.GradScaler(device.type, enabled=first.precision == "fp16")
    n_train = first.train_subset or len(data.x_train)
    x_train, y_train = data.x_train[:n_train], data.y_train[:n_train]
    # each member's batches come from its own generator on the CPU (like its init, model.build_model), so
    # a seed draws the same batches on any device: a CUDA generator's randperm is another sequence
    shufflers = [torch.Generator().manual_seed(c.seed) for c in configs]
    steps_per_epoch = math.ceil(n_train / first.batch_size)

    chunks: list[list[Chunk]] = [[] for _ in configs]
    evals: list[list[tuple[int, float, float]]] = [[] for _ in configs]
    last_step = [total - 1] * members  # a diverged member's last recorded step
    final: list[tuple[float, float] | None] = [None] * members  # a diverged member's (test loss, accuracy)
    diverged = [False] * members
    step, start = 0, time.perf_counter()
    # a stop signal ends the run after the step it arrives in (runtime.py)
    with deferred(), matmul_precision(first.precision):
        while step < total and not all(diverged):
            order = torch.stack([torch.randperm(n_train, generator=g) for g in shufflers]).to(device)
            for i in range(steps_per_epoch):
                idx = order[:, i * first.batch_size : (i + 1) * first.batch_size]
                # index_select on the flat index: 6x faster than x_train[idx] on a CPU (a group's batches)
                flat = idx.reshape(-1)
                xb = x_train.index_select(0, flat).view(*idx.shape, x_train.shape[-1])
                yb = y_train.index_select(0, flat).view(idx.shape)
                with autocast(device, first.precision):
                    logits = model(xb)
                losses = member_losses(logits, yb)
                optimizer.zero_grad(set_to_none=True)
                accs = (logits.argmax(dim=2) == yb).float().mean(dim=1)
                # one path for every precision: the scaler does nothing unless it is enabled (fp16)
                loss_scale = scaler.get_scale()
                scaler.scale(losses.sum()).backward()  # each member's gradient is its own loss's
                scaler.unscale_(optimizer)  # monitoring and clipping see the true gradients
                pre_norm = monitor.gradients(loss_scale)
                post_norm, active = clip_gradients(model, modes, thresholds, pre_norm)
                if own_update:
                    optimizer.updates = None  # stays None if the scaler skips the step
                scaler.step(optimizer)  # fp16: skipped if the scaled gradients overflowed
                scaler.update()
                monitor.step_end(losses, accs, post_norm, active, loss_scale)
                step += 1
                if clock is not None:
                    clock(step)
                check_stop()
                # Flush at each epoch's end too, so that divergence is known before the evaluation.
                if monitor.chunk_full or step == total or i == steps_per_epoch - 1:
                    for e, chunk in enumerate(monitor.flush()):
                        if diverged[e]:
                            continue
                        bad = chunk.first_nonfinite()
                        if bad is not None:
                            chunk = chunk.truncate(bad + 1)  # keep the first bad step: it shows the blow-up
                            diverged[e], last_step[e] = True, int(chunk.step[-1])
                        chunks[e].append(chunk)
                        sinks[e].on_chunk(chunk)
                if step == total or all(diverged):
                    break
            # A completed epoch is evaluated; a member that diverged gets one evaluation, at its last
            # recorded step (its weights are NaN by then: the loss is NaN and the accuracy a guess).
            test_losses, test_accs = (v.cpu().tolist() for v in evaluate(model, data.x_test, data.y_test))
            for e in range(members):
                result = (test_losses[e], test_accs[e])
                if not diverged[e]:
                    evals[e].append((step - 1, *result))
                    sinks[e].on_eval(step - 1, *result)
                elif final[e] is None:
                    final[e] = result
                    sinks[e].on_eval(last_step[e], *result)
            check_stop()

    seconds = time.perf_counter() - start
    statistic = ACTIVATIONS[activation].statistic
    by_time = None
    if recurrent:  # the theory's input term: the first training images' mean square at each time step
        steps, width = SEQUENCE_SHAPES[first.sequence]
        examples = max(8, TIME_PROFILE_BUDGET // steps)
        by_time = x_train[:examples].reshape(-1, steps, width).double().pow(2).mean(dim=2).cpu().numpy()
    results = []
    for e in range(members):
        test_loss, test_acc = final[e] if diverged[e] else evals[e][-1][1:]
        results.append(RunResult(
            outcome="diverged" if diverged[e] else "completed",
            steps=last_step[e] + 1,
            seconds=seconds,
            final_test_loss=test_loss,
            final_test_acc=test_acc,
            evals=evals[e],
            table=layer_table(chunks[e], statistic),
            histograms=monitor.histograms(e, last_step[e]),
            signal=monitor.signal(e, last_step[e]),
            jacobian=monitor.jacobian(e, last_step[e]),
            input_sq_mean=data.input_sq_mean,
            input_var_mean=data.input_var_mean,
            **({"time": time_table(chunks[e], monitor.times, statistic), "spectrum": monitor.spectrum(e, last_step[e]),
                "input_sq_by_time": by_time} if recurrent else {}),
        ))
    return results
