"""The MLP under study, and the activation and initialization registries (DESIGN vocabulary).

    model = build_model(config)      # MLP 784 -> width x (depth-1) -> 10, initialized per config
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .config import RunConfig

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "selu": nn.SELU,
    "softsign": nn.Softsign,
}

# Which activation statistic a layer reports: saturation for squashing functions, dead units for
# rectifiers. A unit is saturated when its local slope phi'(z) is below 10% of phi'(0), i.e. when
# |z| exceeds the threshold below (sigmoid: sigma'(z) < 0.025, tanh: 1 - tanh^2 < 0.1,
# softsign: 1/(1+|z|)^2 < 0.1). A unit is dead when z <= 0 for every example of the batch.
SATURATION_THRESHOLD = {"sigmoid": 3.6369, "tanh": 1.8184, "softsign": 2.1623}
RECTIFIERS = ("relu", "leaky_relu", "elu", "gelu", "selu")


def _zero_bias(init_weight: Callable[[torch.Tensor, RunConfig], object]) -> Callable[[nn.Linear, RunConfig], None]:
    """An init that sets W with `init_weight(W, config)` and b to zero."""

    def init(layer: nn.Linear, config: RunConfig) -> None:
        init_weight(layer.weight, config)
        nn.init.zeros_(layer.bias)

    return init


def _keep_default(layer: nn.Linear, config: RunConfig) -> None:
    """PyTorch's own Linear init: W and b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (Glorot's 'standard')."""


INITS: dict[str, Callable[[nn.Linear, RunConfig], None]] = {
    "default": _keep_default,
    "normal": _zero_bias(lambda w, cfg: nn.init.normal_(w, 0.0, cfg.init_std)),
    "xavier_uniform": _zero_bias(lambda w, cfg: nn.init.xavier_uniform_(w)),
    "xavier_normal": _zero_bias(lambda w, cfg: nn.init.xavier_normal_(w)),
    "he_uniform": _zero_bias(lambda w, cfg: nn.init.kaiming_uniform_(w, mode="fan_in", nonlinearity="relu")),
    "he_normal": _zero_bias(lambda w, cfg: nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu")),
    "lecun_normal": _zero_bias(lambda w, cfg: nn.init.normal_(w, 0.0, 1.0 / math.sqrt(w.shape[1]))),
    "orthogonal": _zero_bias(lambda w, cfg: nn.init.orthogonal_(w)),
}


class MLP(nn.Module):
    """`depth` Linear layers (the last one the classifier) with `activation` between them."""

    def __init__(self, depth: int, width: int, activation: str, in_features: int = 784, classes: int = 10):
        super().__init__()
        sizes = [in_features] + [width] * (depth - 1) + [classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor, preacts: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Logits; if `preacts` is a list, each layer's output z = Wx + b is appended to it."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            z = layer(x)
            if preacts is not None:
                preacts.append(z)
            x = self.act(z) if i < last else z
        return x


def build_model(config: RunConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> MLP:
    """The MLP of a config, initialized on the CPU with the current RNG state, then moved."""
    model = MLP(config.depth, config.width, config.activation)
    with torch.no_grad():
        for layer in model.layers:
            INITS[config.init](layer, config)
    return model.to(device=device, dtype=dtype)
