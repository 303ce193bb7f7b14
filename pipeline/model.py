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


def _fan_based(init_weight: Callable[[torch.Tensor, RunConfig], object]) -> Callable[[nn.Linear, RunConfig], None]:
    """An init that sets W with `init_weight(W, config)` and b ~ N(0, bias_std^2) (zero by default)."""

    def init(layer: nn.Linear, config: RunConfig) -> None:
        init_weight(layer.weight, config)
        nn.init.normal_(layer.bias, 0.0, config.bias_std) if config.bias_std > 0 else nn.init.zeros_(layer.bias)

    return init


def _keep_default(layer: nn.Linear, config: RunConfig) -> None:
    """PyTorch's own Linear init: W and b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (Glorot's 'standard')."""


_RELU_GAIN = math.sqrt(2.0)
INITS: dict[str, Callable[[nn.Linear, RunConfig], None]] = {
    "default": _keep_default,
    "normal": _fan_based(lambda w, cfg: nn.init.normal_(w, 0.0, cfg.init_std)),
    "xavier_uniform": _fan_based(lambda w, cfg: nn.init.xavier_uniform_(w, gain=cfg.init_gain)),
    "xavier_normal": _fan_based(lambda w, cfg: nn.init.xavier_normal_(w, gain=cfg.init_gain)),
    # He et al.: Var[W] = 2 / fan_in, the ReLU gain sqrt(2) on LeCun's 1 / fan_in
    "he_uniform": _fan_based(lambda w, cfg: nn.init.kaiming_uniform_(w, a=0.0, mode="fan_in", nonlinearity="relu").mul_(cfg.init_gain)),
    "he_normal": _fan_based(lambda w, cfg: nn.init.normal_(w, 0.0, cfg.init_gain * _RELU_GAIN / math.sqrt(w.shape[1]))),
    "lecun_normal": _fan_based(lambda w, cfg: nn.init.normal_(w, 0.0, cfg.init_gain / math.sqrt(w.shape[1]))),
    "orthogonal": _fan_based(lambda w, cfg: nn.init.orthogonal_(w, gain=cfg.init_gain)),
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
