"""Recurrent nets over MNIST read as a sequence, as a stack of members (like model.MLP).

    model = build_recurrent(configs)   # configs with arch rnn, lstm or gru that share a group key

An image is a sequence of T steps of d pixels: rows (28 x 28) or pixels (784 x 1). Each member has
three weight layers, the monitor's L00, L01, L02:
    input      U (members, G x H, d),  b_ih   the input's projection, one batched matmul for all steps
    recurrent  W (members, G x H, H),  b_hh   applied at every step to the previous state (h_-1 = 0)
    classifier V (members, 10, H),     b      reads the last state h_T-1
with G = 1 (rnn), 4 (lstm: gates i, f, g, o) or 3 (gru: r, z, n), H = config.width, and PyTorch's
semantics (nn.RNN, nn.LSTM, nn.GRU, both biases included; tests/test_recurrent.py holds them equal):
    rnn   h_t = phi(U x_t + b_ih + W h_t-1 + b_hh)
    lstm  c_t = sigmoid(f) c_t-1 + sigmoid(i) tanh(g),  h_t = sigmoid(o) tanh(c_t)
    gru   n = tanh(U_n x_t + b_in + r (W_n h_t-1 + b_hn)),  h_t = (1 - z) n + z h_t-1
Inits: `default` is PyTorch's own for these cells, every weight and bias U(+-1/sqrt(H)); any other
init of model.INITS sets each gate's (H, d) block of U and (H, H) block of W on its own (biases
N(0, bias_std^2)). A `recurrent_init` other than same draws W and b_hh again by its rule (identity:
IRNN); then W is multiplied by `recurrent_gain`. The classifier is nn.Linear's own.

The monitor observes a training pass through `observer` (monitor_time.TimeObserver): the input
projection, each step's recurrent product and state, and the logits.
"""

from __future__ import annotations

import math
from typing import Protocol, Sequence

import torch
from torch import nn

from .activations import ACTIVATIONS
from .config import GATES, SEQUENCE_SHAPES, RunConfig
from .model import CLASSES, INITS, StackedLinear, _fan_based
from .runtime import set_seed


class Observer(Protocol):
    def sequence(self, projected: torch.Tensor) -> None: ...

    def state(self, t: int, h: torch.Tensor, u: torch.Tensor, recurrent: torch.Tensor) -> None: ...

    def output(self, logits: torch.Tensor) -> None: ...


class RecurrentNet(nn.Module):
    """A vanilla RNN, LSTM or GRU per member; `layers` are its input, recurrent and classifier
    weights (StackedLinear), as the monitor and clipping expect of every net."""

    norms = None  # no normalization layers (config.validate refuses them)
    residual = "none"

    def __init__(self, cell: str, activation: str, sequence: str, layers: list[StackedLinear]):
        super().__init__()
        self.cell = cell
        self.layers = nn.ModuleList(layers)
        self.act = ACTIVATIONS[activation].module()
        self.steps, self.step_inputs = SEQUENCE_SHAPES[sequence]
        self.observer: Observer | None = None  # set by the monitor; called on training passes only

    @property
    def members(self) -> int:
        return self.layers[0].weight.shape[0]

    @property
    def hidden(self) -> int:
        return self.layers[1].weight.shape[2]

    @property
    def recurrent_weight(self) -> torch.Tensor:
        return self.layers[1].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (members, batch, classes) of x (members, batch, 784), or (batch, 784) for all."""
        E, T, d, H = self.members, self.steps, self.step_inputs, self.hidden
        if x.dim() == 2:
            x = x.expand(E, -1, -1)
        batch = x.shape[1]
        observer = self.observer if torch.is_grad_enabled() else None
        projected = self.layers[0](x.reshape(E, batch * T, d)).view(E, batch, T, -1)  # U x_t + b_ih, every t
        if observer is not None:
            observer.sequence(projected)
        h = x.new_zeros(E, batch, H)
        c = x.new_zeros(E, batch, H) if self.cell == "lstm" else None
        for t in range(T):
            recurrent = self.layers[1](h)  # W h_t-1 + b_hh
            inp = projected[:, :, t]
            if self.cell == "rnn":
                u = inp + recurrent
                h = self.act(u)
            elif self.cell == "lstm":
                i, f, u, o = (inp + recurrent).chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(u)
                h = torch.sigmoid(o) * torch.tanh(c)
            else:  # gru
                xr, xz, xn = inp.chunk(3, dim=-1)
                hr, hz, hn = recurrent.chunk(3, dim=-1)
                r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                u = xn + r * hn
                h = (1 - z) * torch.tanh(u) + z * h
            if observer is not None:
                observer.state(t, h, u, recurrent)
        logits = self.layers[2](h)
        if observer is not None:
            observer.output(logits)
        return logits


def _blocks(weight: torch.Tensor, bias: torch.Tensor, gates: int, init, config: RunConfig) -> None:
    """init(block, bias block, config) on each gate's rows of (weight, bias)."""
    for w, b in zip(weight.chunk(gates), bias.chunk(gates)):
        init(w, b, config)


_identity = _fan_based(lambda w, cfg: nn.init.eye_(w))  # IRNN's W, its bias as the other inits

def member_weights(config: RunConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, bias) of the input, recurrent and classifier layers of one member, drawn on the CPU
    from its seed."""
    set_seed(config.seed)
    G, H = GATES[config.arch], config.width
    d = SEQUENCE_SHAPES[config.sequence][1]
    (U, b_ih), (W, b_hh) = (torch.empty(G * H, d), torch.empty(G * H)), (torch.empty(G * H, H), torch.empty(G * H))
    V, b = torch.empty(CLASSES, H), torch.empty(CLASSES)
    with torch.no_grad():
        if config.init == "default":  # nn.RNN/LSTM/GRU's reset_parameters
            for p in (U, W, b_ih, b_hh):
                nn.init.uniform_(p, -1 / math.sqrt(H), 1 / math.sqrt(H))
        else:
            _blocks(U, b_ih, G, INITS[config.init], config)
            _blocks(W, b_hh, G, INITS[config.init], config)
        if config.recurrent_init != "same":  # W and b_hh drawn again by their own rule
            rule = config.recurrent_init
            _blocks(W, b_hh, G, _identity if rule == "identity" else INITS[rule], config)
        W.mul_(config.recurrent_gain)
        INITS["default"](V, b, config)  # the classifier: nn.Linear's own
    return [(U, b_ih), (W, b_hh), (V, b)]


def build_recurrent(configs: Sequence[RunConfig], device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> RecurrentNet:
    first = configs[0]
    per_member = [member_weights(config) for config in configs]
    layers = [StackedLinear(torch.stack([m[i][0] for m in per_member]), torch.stack([m[i][1] for m in per_member]))
              for i in range(3)]
    net = RecurrentNet(first.arch, first.activation, first.sequence, layers)
    return net.to(device=device, dtype=dtype)
