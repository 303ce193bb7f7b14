"""Per-layer gradient and activation statistics of every member, every step, kept on the device.

The monitor observes the forward pass through hooks on the model's layers and is called twice a
step by the training loop:

    logits = model(x)                          # hooks: each layer's z, and a dL/dz hook on it
    losses.sum().backward()
    pre = monitor.gradients()                  # per-layer norms; the global norm before clipping
    post, active = clip(...)
    optimizer.step()
    monitor.step_end(losses, accs, post, active)

Every statistic is a device tensor written into a preallocated chunk buffer with a member axis, so
the loop never waits for the host; `flush()` copies a chunk to the host in one transfer and hands
back one `results.Chunk` per member. Layer index L00 is the first Linear layer.

Per layer l and member (z_l = W_l x_{l-1} + b_l is the layer's output, before norm and activation):
    weight_grad_norm  ||dL/dW_l||           backprop_norm  ||dL/dz_l|| (the error reaching layer l)
    update_ratio      ||dW_l|| / ||W_l||    act            saturated or dead fraction of what phi
                                                           receives (hidden layers; see activations.py)
The global norm covers every parameter: Linear layers, normalization gamma and beta, skipinit alphas.
Per step: loss, acc, global norm before and after clipping, whether clipping was active.
At the histogram steps (first, middle, last): gradient histograms and the INSTRUMENTS, each of which
can be left out (the perf bench times each against a run without it):
    signal         q and c of each hidden layer's z (forward length and correlation)
    jacobian       singular values of the input-output Jacobian dz_{H-1}/dz_0 at the batch's first
                   JACOBIAN_INPUTS examples
    zero_fraction  per layer, the fraction of dL/dW's entries that are exactly 0 (in fp16: underflow)
    gsnr           per layer, the gradient signal-to-noise ratio of dL/dW from per-example gradients
None of them runs between two histogram steps: the per-step hot path is the same with or without them.
With full=False only the per-step scalars are kept (what divergence detection needs).
"""

from __future__ import annotations

import numpy as np
import torch

from .activations import ACTIVATIONS
from .model import MLP
from .norms import NORMS
from .results import LAYER_STATS, STEP_STATS, Chunk

# Gradient histograms: log10|dL/dW| in fixed bins so that layers and runs compare directly.
HIST_RANGE = (-12.0, 4.0)
HIST_BINS = 80


def member_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(len(tensors), members): the L2 norm of each tensor's slice of each member, in the tensors'
    dtype (clipping uses it at full precision)."""
    if tensors[0].shape[0] == 1:  # one member: one fused kernel over all tensors
        return torch.stack(torch._foreach_norm(tensors)).unsqueeze(1)
    return torch.stack([torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1) for t in tensors])


def activation_statistic(hidden: torch.Tensor, activation: str, in_place: bool = False) -> torch.Tensor:
    """Saturated or dead fraction from hidden pre-activations (..., batch, width) -> (...), e.g. one
    layer's (members, batch, width) -> (members,). in_place: `hidden` is a scratch copy that may be
    overwritten (a new buffer for |z| costs its page faults: 280 us a step at depth 20)."""
    act, dtype = ACTIVATIONS[activation], torch.promote_types(hidden.dtype, torch.float32)
    if act.kind == "squashing":  # fraction of (unit, example) pairs with |z| beyond the threshold
        return (hidden.abs_() if in_place else hidden.abs()).gt_(act.threshold).mean(dim=(-2, -1), dtype=dtype)
    # a unit is dead when z <= threshold for every example: 1 - P(unit is alive somewhere in the batch);
    # a NaN z is not above it, so one NaN example does not kill a unit that fires on another
    above = hidden.gt_(act.threshold) if in_place else hidden.gt(act.threshold)
    return above.amax(dim=-2).mean(dim=-1, dtype=dtype).neg_().add_(1)


SIGNAL_STATS = ("q", "c")
GRAD_SIGNAL_STATS = ("zero_fraction", "gsnr")  # per layer (every Linear), at the histogram steps
INSTRUMENTS = frozenset({"signal", "jacobian", "zero_fraction", "gsnr"})
GSNR_MAX = 2.0**20  # an entry whose per-example gradients all agree has infinite GSNR: capped here
JACOBIAN_INPUTS = 8  # examples of the batch whose input-output Jacobian is taken at the histogram steps


def jacobian_singular_values(model: MLP, x: torch.Tensor) -> torch.Tensor:
    """Singular values of J = dz_{H-1}/dz_0 (the last hidden layer's pre-activation with respect to
    the first's, width x width) of each member at each input: x (members, inputs, 784) ->
    (members, inputs, width), descending. One reverse-mode Jacobian per input (torch.func)."""
    first = model.layers[0]
    values = []
    for e in range(model.members):
        z0 = torch.nn.functional.linear(x[e], first.weight[e].detach(), first.bias[e].detach())
        jacobians = torch.func.vmap(torch.func.jacrev(model.hidden_map(e)))(z0)
        # a diverging member's weights can be inf or NaN by then: its spectrum is NaN, not an error
        finite = torch.isfinite(jacobians).all(dim=-1).all(dim=-1)
        found = torch.full(jacobians.shape[:-1], float("nan"), dtype=jacobians.dtype, device=jacobians.device)
        if finite.any():
            found[finite] = torch.linalg.svdvals(jacobians[finite])
        values.append(found)
    return torch.stack(values)


def square_and_cross(x: torch.Tensor, members: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Of a layer's input x (members, batch, n): the mean of x^2 over entries, and the cross product
    of two different examples as the theory uses it: that mean square times the mean cosine
    x_a . x_b / (|x_a| |x_b|) over pairs (so the first layer's predicted c is the inputs' mean
    cosine, as measured on z, whatever the spread of the examples' norms); each (members,)."""
    x = x.reshape(members, -1, x.shape[-1]).to(torch.promote_types(x.dtype, torch.float32))
    square = x.pow(2).mean(dim=(1, 2))
    return square, square * length_and_correlation(x, members)[1]


def length_and_correlation(z: torch.Tensor, members: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q: the mean squared pre-activation, and c: the mean correlation z_a . z_b / (|z_a| |z_b|)
    over pairs of different examples of the batch, each (members,)."""
    z = z.reshape(members, -1, z.shape[-1]).to(torch.promote_types(z.dtype, torch.float32))
    batch = z.shape[1]
    q = z.pow(2).mean(dim=(1, 2))
    unit = z / torch.linalg.vector_norm(z, dim=2, keepdim=True).clamp(min=1e-30)
    total = unit.sum(dim=1).pow(2).sum(dim=1)  # sum over all pairs of cosines, a == b included (= batch)
    return q, (total - batch) / (batch * max(batch - 1, 1))


def gradient_snr(a: torch.Tensor, d: torch.Tensor, grad: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Mean gradient signal-to-noise ratio of a Linear layer's weight, from one batch, per member
    (as Cockpit's MeanGSNR, after Liu et al. 2020): over the weight's entries j, the mean of
    m_j^2 / v_j, with m_j the mean and v_j the (population) variance of the per-example gradients
    dl_i/dW_j. Entries whose per-example gradients are all 0 (input pixels that are 0 throughout the
    batch, dead units) are left out; each ratio is capped at GSNR_MAX.

    a (members, batch, in): the layer's input; d (members, batch, out): dL/dz from the backward pass of
    L = scale * sum over members of the batch-mean loss; grad (members, out, in): dL/dW of the
    unscaled mean loss, which is m. No per-example gradient is formed: for a Linear layer
    dl_i/dW = (batch / scale) d_i a_i^T, so the mean of their squares is one matmul, (d^2)^T (a^2)."""
    batch = a.shape[1]
    if batch < 2:
        return torch.full(grad.shape[:1], float("nan"), device=grad.device)
    dtype = torch.promote_types(grad.dtype, torch.float32)
    a, d, grad = a.to(dtype), d.to(dtype), grad.to(dtype)
    second = d.square().transpose(1, 2).bmm(a.square()) * (batch / scale**2)  # E_i[(dl_i/dW_j)^2]
    used = second > 0
    # m^2 <= E[g^2]: with rho = m^2 / E[g^2] in [0, 1], m^2 / v = rho / (1 - rho), free of cancellation
    rho = (grad.square() / torch.where(used, second, 1.0)).clamp(max=GSNR_MAX / (1 + GSNR_MAX))
    ratio = torch.where(used, rho / (1 - rho), 0.0)
    return ratio.sum(dim=(1, 2)) / used.sum(dim=(1, 2))


def zero_fractions(grads: list[torch.Tensor]) -> torch.Tensor:
    """(layers, members): the fraction of each member's entries of each gradient that are exactly 0."""
    return torch.stack([(g.reshape(g.shape[0], -1) == 0).float().mean(dim=1) for g in grads])


def grad_histogram(grad: torch.Tensor) -> torch.Tensor:
    """Counts of log10|grad| in the fixed HIST_BINS bins over HIST_RANGE."""
    lo, hi = HIST_RANGE
    return torch.histc(torch.log10(grad.detach().abs().float() + 1e-30).clamp(lo, hi), bins=HIST_BINS, min=lo, max=hi)


class Monitor:
    """Collects statistics of `model`'s members for `total_steps` steps in chunks of `chunk_steps`."""

    def __init__(self, model: MLP, activation: str, total_steps: int, chunk_steps: int = 64, full: bool = True,
                 instruments: frozenset[str] = INSTRUMENTS):
        self.full = full
        self.instruments = instruments if full else frozenset()
        self.activation = activation
        self.members, self.n_layers = model.members, len(model.layers)
        self.weights = [layer.weight for layer in model.layers]
        # W0, b0, W1, b1, ... then the normalization and residual parameters (in the global norm only)
        linear = [p for layer in model.layers for p in (layer.weight, layer.bias)]
        seen = {id(p) for p in linear}
        self.params = linear + [p for p in model.parameters() if id(p) not in seen]
        device, E, L = self.weights[0].device, self.members, self.n_layers
        # fp32 buffers, fp64 for fp64 runs: a finite fp64 norm of 1e40 must not be stored as inf
        dtype = torch.promote_types(self.weights[0].dtype, torch.float32)
        self.chunk_steps = chunk_steps
        self._per_step = torch.full((len(STEP_STATS), chunk_steps, E), float("nan"), device=device, dtype=dtype)
        self._per_layer = torch.full((len(LAYER_STATS), chunk_steps, L, E), float("nan"), device=device, dtype=dtype)
        self._row = 0  # row of the current step in the chunk
        self._first_step = 0  # global step of row 0
        self._hidden: list[torch.Tensor] = []  # this step's hidden pre-activations (what phi receives)
        self._backprop: list[torch.Tensor | None] = [None] * L
        # the update ratio's numerator: the optimizer's own update where it says it (MemberSGD: train.py
        # sets updates_from), else a snapshot of the weights before the step and a difference after
        self.updates_from: torch.optim.Optimizer | None = None
        self._prev_weights: list[torch.Tensor] = []
        self._weight_norms: torch.Tensor | None = None
        self.hist_steps = sorted({0, total_steps // 2, total_steps - 1})
        self._slots = {step: slot for slot, step in enumerate(self.hist_steps)}  # step -> histogram slot
        self._hist = torch.zeros((E, len(self.hist_steps), L, HIST_BINS), device=device)
        # forward signal at the histogram steps: q and c of each hidden layer's z, and of the input
        self._signal = torch.full((len(self.hist_steps), len(SIGNAL_STATS), L - 1, E), float("nan"), device=device,
                                  dtype=dtype)
        self._input = torch.full((len(self.hist_steps), 2, E), float("nan"), device=device, dtype=dtype)
        # zero fraction and GSNR of each layer's dL/dW at the histogram steps; GSNR from each layer's
        # input and dL/dz (not with a norm that mixes the examples: no per-example gradient, norms.py)
        self._grad_signal = torch.full((len(self.hist_steps), len(GRAD_SIGNAL_STATS), L, E), float("nan"),
                                       device=device, dtype=dtype)
        mixed = model.norms is not None and NORMS[model.norms[0].kind].mixes_examples
        self._gsnr_on = "gsnr" in self.instruments and not mixed
        self._layer_inputs: dict[int, torch.Tensor] = {}  # this histogram step's a and dL/dz, per layer
        self._layer_grads: dict[int, torch.Tensor] = {}
        # the input-output Jacobian's singular values at the histogram steps (not where the norm mixes
        # the examples: no per-input hidden map; not below 3 layers, where J is the identity)
        self.model = model
        self._jacobian_on = "jacobian" in self.instruments and self.n_layers >= 3 and not mixed
        self._jacobian_x: torch.Tensor | None = None  # the histogram step's first inputs
        self._jacobian: dict[int, torch.Tensor] = {}  # slot -> (members, inputs, width)
        if full:
            self._install(model)

    def _install(self, model: MLP) -> None:
        """Observe the training passes: each layer's z and input, what phi receives, dL/dz."""
        for i, layer in enumerate(model.layers):
            layer.register_forward_hook(self._forward_hook(i))
        model.act.register_forward_pre_hook(self._activation_hook)

    @property
    def step(self) -> int:
        return self._first_step + self._row

    def _forward_hook(self, i: int):
        def hook(module, inputs, z: torch.Tensor) -> None:
            if not z.requires_grad:  # evaluation (no_grad): nothing to monitor there
                return
            slot = self._slots.get(self.step)
            z.register_hook(self._backprop_hook(i, keep=slot is not None and self._gsnr_on))
            if slot is not None:
                if self._gsnr_on:
                    self._layer_inputs[i] = inputs[0].detach()
                with torch.no_grad():
                    if i == 0 and "signal" in self.instruments:
                        self._input[slot] = torch.stack(square_and_cross(inputs[0].detach(), self.members))
                    if i == 0 and self._jacobian_on:
                        x = inputs[0].detach()
                        self._jacobian_x = x.reshape(self.members, -1, x.shape[-1])[:, :JACOBIAN_INPUTS]
                    if i < self.n_layers - 1 and "signal" in self.instruments:
                        self._signal[slot, :, i] = torch.stack(length_and_correlation(z.detach(), self.members))

        return hook

    def _activation_hook(self, module, inputs: tuple[torch.Tensor]) -> None:
        """What phi receives, hidden layer by hidden layer (after the normalization, if any)."""
        u = inputs[0]
        if u.requires_grad:
            self._hidden.append(u.detach().view(self.members, -1, u.shape[-1]))  # one member may be 2-D

    def _backprop_hook(self, i: int, keep: bool):
        def hook(grad: torch.Tensor) -> None:
            # at least fp32: an fp16 norm overflows at 65504 where the entries themselves do not; over
            # (batch, out) as they lie (a feature-major grad would be copied by a reshape to (members, -1))
            g = grad.detach().view(self.members, -1, grad.shape[-1])
            self._backprop[i] = torch.linalg.vector_norm(g, dim=(1, 2), dtype=torch.promote_types(g.dtype, torch.float32))
            if keep:
                self._layer_grads[i] = grad.detach()

        return hook

    # -- called by the training loop, twice a step ---------------------------------------------------

    @torch.no_grad()
    def gradients(self, loss_scale: float = 1.0) -> torch.Tensor:
        """After backward (and the gradient scaler's unscale), before clipping: record per-layer
        statistics and return the global gradient norm of each member (members,). `loss_scale`: what
        the loss was multiplied by before backward (fp16), which dL/dz still carries."""
        norms = member_norms([p.grad for p in self.params])  # (parameters, members): W0, b0, W1, b1, ...
        global_norm = torch.linalg.vector_norm(norms, dim=0)
        row = self._row
        self._per_step[STEP_STATS.index("global_norm_pre_clip"), row] = global_norm
        if self.full:
            self._per_layer[LAYER_STATS.index("weight_grad_norm"), row] = norms[0 : 2 * self.n_layers : 2]
            self._record_activity(row, loss_scale)
            slot = self._slots.get(self.step)
            if slot is not None:
                for i, w in enumerate(self.weights):
                    for e in range(self.members):
                        self._hist[e, slot, i] = grad_histogram(w.grad[e])
                if "zero_fraction" in self.instruments:
                    self._grad_signal[slot, 0] = zero_fractions([w.grad for w in self.weights])
                if self._gsnr_on:
                    E = self.members
                    for i, w in enumerate(self.weights):
                        a, d = self._layer_inputs[i], self._layer_grads[i]
                        self._grad_signal[slot, 1, i] = gradient_snr(a.reshape(E, -1, a.shape[-1]),
                                                                     d.reshape(E, -1, d.shape[-1]), w.grad, loss_scale)
                    self._layer_inputs, self._layer_grads = {}, {}
                if self._jacobian_x is not None:  # the weights of this step's forward pass
                    self._jacobian[slot] = jacobian_singular_values(self.model, self._jacobian_x)
                    self._jacobian_x = None
            # the weights as the optimizer finds them, for the update ratio
            self._weight_norms = member_norms(self.weights)
            if self.updates_from is None:
                if self._prev_weights:
                    torch._foreach_copy_(self._prev_weights, self.weights)
                else:
                    self._prev_weights = [w.detach().clone() for w in self.weights]
        return global_norm

    def _record_activity(self, row: int, loss_scale: float) -> None:
        """This step's per-layer dL/dz norms (from the hooks) and saturated or dead fractions."""
        self._per_layer[LAYER_STATS.index("backprop_norm"), row] = torch.stack(self._backprop) / loss_scale
        # one member: one stacked copy, a handful of kernels whatever the depth; a group: layer by layer,
        # as stacking copied them all (10 MB a step at depth 20 and 8 members, 8% of the step)
        if self.members == 1:
            stats = activation_statistic(torch.stack(self._hidden), self.activation, in_place=True)
        else:
            stats = torch.stack([activation_statistic(u, self.activation) for u in self._hidden])
        self._per_layer[LAYER_STATS.index("act"), row, : len(stats)] = stats
        self._hidden = []

    def _updates(self) -> list[torch.Tensor]:
        """What each weight moved by in this step (its sign aside)."""
        if self.updates_from is None:
            torch._foreach_sub_(self._prev_weights, self.weights)  # now holds -dW
            return self._prev_weights
        moved = self.updates_from.updates  # None: the step was skipped (an fp16 overflow)
        return [moved[w] if moved is not None else torch.zeros_like(w) for w in self.weights]

    @torch.no_grad()
    def step_end(self, losses: torch.Tensor, accs: torch.Tensor, post_norm: torch.Tensor,
                 active: torch.Tensor | None, loss_scale: float = 1.0) -> None:
        """After the optimizer step: update ratios, losses, accuracies, clipping; the step is done."""
        row = self._row
        if self.full:
            self._per_layer[LAYER_STATS.index("update_ratio"), row] = member_norms(self._updates()) / self._weight_norms
        self._per_step[STEP_STATS.index("loss"), row] = losses.detach()
        self._per_step[STEP_STATS.index("acc"), row] = accs.detach()
        self._per_step[STEP_STATS.index("global_norm_post_clip"), row] = post_norm
        self._per_step[STEP_STATS.index("clip_active"), row] = 0.0 if active is None else active.float()
        self._per_step[STEP_STATS.index("loss_scale"), row] = loss_scale
        self._row += 1

    # -- host side ---------------------------------------------------------------------------------

    @property
    def chunk_full(self) -> bool:
        return self._row == self.chunk_steps

    def flush(self) -> list[Chunk]:
        """Copy the steps recorded since the last flush to the host (one transfer), one Chunk per
        member, and reset."""
        n = self._row
        host = torch.cat([self._per_step.flatten(), self._per_layer.flatten()]).cpu().numpy()
        per_step = host[: self._per_step.numel()].reshape(self._per_step.shape)
        per_layer = host[self._per_step.numel() :].reshape(self._per_layer.shape)
        steps = np.arange(self._first_step, self._first_step + n)
        per_time = self._flush_time(n)
        chunks = [
            Chunk(
                steps,
                {name: per_step[i, :n, e].copy() for i, name in enumerate(STEP_STATS)},
                {name: per_layer[i, :n, :, e].copy() for i, name in enumerate(LAYER_STATS)} if self.full else {},
                per_time[e] if per_time else {},
            )
            for e in range(self.members)
        ]
        self._first_step += n
        self._row = 0
        self._per_step.fill_(float("nan"))
        self._per_layer.fill_(float("nan"))
        return chunks

    def _flush_time(self, n: int) -> list[dict[str, np.ndarray]]:
        """Per member, the statistics through time of the chunk's n steps (recurrent nets only)."""
        return []

    def signal(self, member: int, last_step: int) -> dict[str, np.ndarray]:
        """What the instruments measured of a member at the histogram steps reached: q and c per
        hidden layer (steps, hidden layers), the input's mean square and mean cross product (steps,),
        zero_fraction and gsnr per layer (steps, layers); NaN where an instrument was off."""
        taken = self._taken(last_step)
        if not self.full or not taken:
            return {}
        signal = self._signal[taken, ..., member].cpu().numpy()
        inputs = self._input[taken, :, member].cpu().numpy()
        grad = self._grad_signal[taken, ..., member].cpu().numpy()
        return {"steps": np.array([self.hist_steps[i] for i in taken]), "q": signal[:, 0], "c": signal[:, 1],
                "input_sq": inputs[:, 0], "input_cross": inputs[:, 1],
                "zero_fraction": grad[:, 0], "gsnr": grad[:, 1]}

    def jacobian(self, member: int, last_step: int) -> dict[str, np.ndarray]:
        """The Jacobian's singular values of a member at the histogram steps reached: steps, and
        singular_values, a list of (inputs, width) arrays, one per step (an epoch's short last batch
        may have fewer than JACOBIAN_INPUTS examples)."""
        taken = [slot for slot in self._taken(last_step) if slot in self._jacobian]
        if not taken:
            return {}
        return {"steps": np.array([self.hist_steps[i] for i in taken]),
                "singular_values": [self._jacobian[i][member].cpu().numpy() for i in taken]}

    def _taken(self, last_step: int) -> list[int]:
        """The slots of the histogram steps a member reached (a diverged one stops early)."""
        return [slot for slot, step in enumerate(self.hist_steps) if step <= last_step]

    def histograms(self, member: int, last_step: int) -> dict[str, np.ndarray]:
        """histograms.npz of a member: gradient histograms at the first, middle and last step reached."""
        taken = self._taken(last_step)
        return {
            "steps": np.array([self.hist_steps[i] for i in taken]),
            "counts": self._hist[member, taken].cpu().numpy(),
            "log10_abs_grad_edges": np.linspace(*HIST_RANGE, HIST_BINS + 1),
        }
