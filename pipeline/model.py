"""The MLP under study, as a stack of members, and the initialization registry (DESIGN vocabulary).

    model = build_model([config])             # one run: a stack of one member
    model = build_model(configs)              # a group: configs that agree on config.GROUP_KEYS

Every layer holds the weights of all members, W (members, out, in) and b (members, out), and is one
batched matmul (torch.baddbmm) for all of them; inputs are (members, batch, in). Members are
independent: member e's output, loss and gradients depend on member e's weights alone. Each member
is initialized on the CPU from its own seed, so a member of a group starts exactly where the same
config trained alone starts.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .activations import ACTIVATIONS
from .config import GATES, SEQUENCE_SHAPES, RunConfig
from .norms import NORMS
from .runtime import available_memory, set_seed

IN_FEATURES, CLASSES = 784, 10


def _fan_based(init_weight: Callable[[torch.Tensor, RunConfig], object]) -> Callable[..., None]:
    """An init that sets W with `init_weight(W, config)` and b ~ N(0, bias_std^2) (zero by default)."""

    def init(weight: torch.Tensor, bias: torch.Tensor, config: RunConfig) -> None:
        init_weight(weight, config)
        nn.init.normal_(bias, 0.0, config.bias_std) if config.bias_std > 0 else nn.init.zeros_(bias)

    return init


def _pytorch_default(weight: torch.Tensor, bias: torch.Tensor, config: RunConfig) -> None:
    """PyTorch's own Linear init: W and b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (Glorot's 'standard')."""
    bound = 1 / math.sqrt(weight.shape[1])
    nn.init.uniform_(weight, -bound, bound)
    nn.init.uniform_(bias, -bound, bound)


_RELU_GAIN = math.sqrt(2.0)
INITS: dict[str, Callable[[torch.Tensor, torch.Tensor, RunConfig], None]] = {
    "default": _pytorch_default,
    "normal": _fan_based(lambda w, cfg: nn.init.normal_(w, 0.0, cfg.init_std)),
    "xavier_uniform": _fan_based(lambda w, cfg: nn.init.xavier_uniform_(w, gain=cfg.init_gain)),
    "xavier_normal": _fan_based(lambda w, cfg: nn.init.xavier_normal_(w, gain=cfg.init_gain)),
    # He et al.: Var[W] = 2 / fan_in, the ReLU gain sqrt(2) on LeCun's 1 / fan_in
    "he_uniform": _fan_based(lambda w, cfg: nn.init.kaiming_uniform_(w, a=0.0, mode="fan_in", nonlinearity="relu").mul_(cfg.init_gain)),
    "he_normal": _fan_based(lambda w, cfg: nn.init.normal_(w, 0.0, cfg.init_gain * _RELU_GAIN / math.sqrt(w.shape[1]))),
    "lecun_normal": _fan_based(lambda w, cfg: nn.init.normal_(w, 0.0, cfg.init_gain / math.sqrt(w.shape[1]))),
    "orthogonal": _fan_based(lambda w, cfg: nn.init.orthogonal_(w, gain=cfg.init_gain)),
}


def layer_sizes(depth: int, width: int) -> list[tuple[int, int]]:
    """(fan_in, fan_out) of each Linear layer: 784 -> width x (depth - 1) -> 10."""
    sizes = [IN_FEATURES] + [width] * (depth - 1) + [CLASSES]
    return list(zip(sizes[:-1], sizes[1:]))


class StackedLinear(nn.Module):
    """One Linear layer per member: weight (members, out, in), bias (members, out).

    feature_major: compute W x as (members, out, batch) in memory and return it as a transposed view
    (members, batch, out). dL/dW then comes out of the batched product as (members, out, in), the
    weight's own layout; batch-major, it comes out transposed and autograd copies every weight's
    gradient every step (9% of a depth-20 group's step, measured). Elementwise ops keep the layout,
    so a plain or residual stack stays feature-major throughout (the MLP; a normalization layer
    hands back batch-major, and the next product transposes again). The recurrent net mixes its
    products with slices of batch-major tensors and keeps batch-major."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, feature_major: bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)
        self.feature_major = feature_major

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """z = W x + b for each member: x (members, batch, in) -> (members, batch, out). A single
        member may come as (batch, in): then it is nn.Linear's own fused kernel, which is what a
        single run costs without the member axis (the batched form measured 8-15% slower)."""
        if x.dim() == 2:
            return F.linear(x, self.weight.squeeze(0), self.bias.squeeze(0))
        if self.feature_major:
            return torch.baddbmm(self.bias.unsqueeze(2), self.weight, x.transpose(1, 2)).transpose(1, 2)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))


class StackedNorm(nn.Module):
    """BatchNorm1d or LayerNorm of each member's (batch, width) pre-activations, with its own affine
    gamma (1 at init) and beta (0) and, for BatchNorm, its own running statistics, (members, width).
    In training mode BatchNorm normalizes with the batch's statistics and updates the running ones;
    in eval mode it uses the running ones (as nn.BatchNorm1d, momentum 0.1, eps 1e-5)."""

    def __init__(self, kind: str, members: int, width: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.kind, self.eps, self.momentum = kind, eps, momentum
        self.weight = nn.Parameter(torch.ones(members, width))
        self.bias = nn.Parameter(torch.zeros(members, width))
        if kind == "batch":
            self.register_buffer("running_mean", torch.zeros(members, width))
            self.register_buffer("running_var", torch.ones(members, width))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: (batch, width) for one member, else (members, batch, width)."""
        if self.kind == "layer":  # per example: the member axis is just another batch axis
            if z.dim() == 2:
                return F.layer_norm(z, z.shape[-1:], self.weight[0], self.bias[0], self.eps)
            return F.layer_norm(z, z.shape[-1:], None, None, self.eps) * self.weight.unsqueeze(1) + self.bias.unsqueeze(1)
        # BatchNorm: each member's features side by side, (batch, members x width), one kernel; the
        # running statistics are updated in place through the flat views of the (members, width) buffers
        stats = (self.running_mean.view(-1), self.running_var.view(-1))
        if z.dim() == 2:
            return F.batch_norm(z, *stats, self.weight.view(-1), self.bias.view(-1), self.training, self.momentum, self.eps)
        members, batch, width = z.shape
        flat = z.transpose(0, 1).reshape(batch, members * width)
        out = F.batch_norm(flat, *stats, self.weight.view(-1), self.bias.view(-1), self.training, self.momentum, self.eps)
        return out.view(batch, members, width).transpose(0, 1)


class MLP(nn.Module):
    """`depth` stacked Linear layers (the last one the classifier); each hidden layer computes
    z = W h + b, u = norm(z) (identity with norm none), phi(u); a residual layer (width to width: all
    but the first and the classifier) adds alpha * phi(u) to its input. alpha is a buffer of each
    member's residual_scale (plain) or a learned per-member scalar starting at 0 (skipinit).

    The monitor observes each layer's output z (forward hooks on `layers`) and what phi receives (a
    forward pre-hook on `act`)."""

    def __init__(self, layers: list[StackedLinear], activation: str, norm: str = "none", residual: str = "none",
                 residual_scales: Sequence[float] = ()):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.act = ACTIVATIONS[activation].module()
        members, hidden = layers[0].weight.shape[0], len(layers) - 1
        widths = [layer.weight.shape[1] for layer in layers[:-1]]
        self.norms = nn.ModuleList(StackedNorm(norm, members, w) for w in widths) if norm != "none" else None
        self.residual = residual
        for i in range(1, hidden):  # alpha1 ... of the residual layers
            if residual == "plain":
                self.register_buffer(f"alpha{i}", torch.tensor(list(residual_scales), dtype=torch.float32))
            elif residual == "skipinit":
                self.register_parameter(f"alpha{i}", nn.Parameter(torch.zeros(members)))

    @property
    def members(self) -> int:
        return self.layers[0].weight.shape[0]

    def _alpha(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Layer i's alpha, shaped to scale x: (members,) -> (members, 1, 1), or a scalar for one member."""
        alpha = getattr(self, f"alpha{i}")
        return alpha.view(-1, 1, 1) if x.dim() == 3 else alpha.view(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (members, batch, classes); x is (members, batch, 784), or (batch, 784) for all.
        One member runs batch-major, (batch, features), through the layers (see StackedLinear)."""
        if self.members == 1:
            x = x.reshape(-1, x.shape[-1])
        elif x.dim() == 2:
            x = x.expand(self.members, -1, -1)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            z = layer(x)
            if i == last:
                x = z
                break
            h = self.act(self.norms[i](z) if self.norms is not None else z)
            x = x + self._alpha(i, x) * h if self.residual != "none" and i > 0 else h
        return x.view(self.members, -1, x.shape[-1])


    def hidden_map(self, member: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """z_0 -> z_{H-1} of one member for one example, (width,) -> (width,): the first hidden
        layer's pre-activation to the last one's, computed as forward computes it (weights detached:
        for Jacobians). Not for a norm that mixes the examples of a batch (norms.py)."""
        if self.norms is not None and NORMS[self.norms[0].kind].mixes_examples:
            raise ValueError(f"the hidden map of a {NORMS[self.norms[0].kind].label} net depends on the whole batch")
        last = len(self.layers) - 2  # the last hidden layer

        def f(z: torch.Tensor) -> torch.Tensor:
            x = z
            for i in range(last + 1):
                if i > 0:
                    z = F.linear(x, self.layers[i].weight[member].detach(), self.layers[i].bias[member].detach())
                if i == last:
                    break
                if self.norms is not None:  # LayerNorm, per example
                    norm = self.norms[i]
                    z = F.layer_norm(z, z.shape[-1:], norm.weight[member].detach(), norm.bias[member].detach(), norm.eps)
                h = self.act.forward(z)  # not self.act(z): the monitor's hook on it is for training passes
                x = x + getattr(self, f"alpha{i}")[member].detach() * h if self.residual != "none" and i > 0 else h
            return z

        return f


def build_model(
    configs: Sequence[RunConfig], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> MLP:
    """The MLP of one config or of a group: each member initialized on the CPU from its own seed
    (the same numbers wherever it trains and whoever it trains with), then stacked and moved."""
    first = configs[0]
    per_member = []
    for config in configs:
        set_seed(config.seed)
        params = []
        for fan_in, fan_out in layer_sizes(first.depth, first.width):
            weight, bias = torch.empty(fan_out, fan_in), torch.empty(fan_out)
            with torch.no_grad():
                INITS[config.init](weight, bias, config)
            params.append((weight, bias))
        per_member.append(params)
    layers = [
        StackedLinear(torch.stack([m[i][0] for m in per_member]), torch.stack([m[i][1] for m in per_member]),
                      feature_major=True)
        for i in range(first.depth)
    ]
    model = MLP(layers, first.activation, first.norm, first.residual, [c.residual_scale for c in configs])
    return model.to(device=device, dtype=dtype)


# What a run needs on its device, beside the nets it sizes: grid.py splits groups to fit, the CLI
# refuses what cannot fit before any run exists.


def memory_estimate(depth: int, width: int, batch_size: int, optimizer: str, precision: str,
                    members: int = 1) -> int:
    """Bytes a group of `members` runs of this architecture needs on its device, roughly: the
    parameters four times over (weights, gradients, the monitor's copy for the update ratio, the
    optimizer's momentum; Adam twice), the activations kept for backward (about four per unit and
    example: z, phi(z), dL/dz, the norm's output), an evaluation batch of 2,000 images, the Jacobian
    snapshot (8 inputs x width^2, three buffers), and MNIST itself (70,000 x 784)."""
    nbytes = 8 if precision == "fp64" else 4
    params = sum(fan_in * fan_out + fan_out for fan_in, fan_out in layer_sizes(depth, width))
    copies = 4 + (optimizer == "adam")
    per_member = (copies * params + 4 * batch_size * width * depth + 2 * 2000 * width + 3 * 8 * width * width) * nbytes
    return members * per_member + _mnist_bytes(precision)


def config_memory(config: RunConfig, members: int = 1) -> int:
    """memory_estimate of any arch: a recurrent net keeps, for backward, its gates and states at
    every time step (about (3 G + 3) x width values per example and step), not its depth's."""
    if config.arch == "mlp":
        return memory_estimate(config.depth, config.width, config.batch_size, config.optimizer, config.precision, members)
    nbytes = 8 if config.precision == "fp64" else 4
    G, H, (T, d) = GATES[config.arch], config.width, SEQUENCE_SHAPES[config.sequence]
    params = G * H * (d + H) + 2 * G * H + CLASSES * (H + 1)
    copies = 4 + (config.optimizer == "adam")
    per_member = (copies * params + (3 * G + 3) * H * T * config.batch_size + 2000 * (G + 2) * H) * nbytes
    return members * per_member + _mnist_bytes(config.precision)


def _mnist_bytes(precision: str) -> int:
    """MNIST on the device: 70,000 images of 784 pixels and their labels."""
    return 70_000 * 785 * (8 if precision == "fp64" else 4)


def members_that_fit(config: RunConfig, device: torch.device) -> int | None:
    """How many runs of this architecture can train together in what the device has free (at
    least 1; None if unknown)."""
    free = available_memory(device)
    if free is None:
        return None
    data = _mnist_bytes(config.precision)  # shared by the members
    one = config_memory(config) - data
    return max(1, int((0.8 * free - data) // one))


def check_memory(config: RunConfig, device: torch.device, members: int = 1) -> None:
    """Raise ValueError, with the figures, when a run (a group of `members`) cannot fit in what the
    device has free: refused before any run exists, not after minutes of swapping."""
    need = config_memory(config, members)
    free = available_memory(device)
    if free is not None and need > 0.9 * free:
        weights = sum(fan_in * fan_out for fan_in, fan_out in layer_sizes(config.depth, config.width))
        net = f"depth {config.depth} x width {config.width} ({weights:,} weights" if config.arch == "mlp" else (
            f"{config.arch} of width {config.width} over {config.sequence} (batch {config.batch_size}")
        raise ValueError(f"{net}"
                         f"{f', {members} runs together' if members > 1 else ''}) needs about {need / 2**30:,.1f} GiB "
                         f"on {device.type}, which has {free / 2**30:,.1f} GiB free")
