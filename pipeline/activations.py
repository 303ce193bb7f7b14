"""The one activation registry: what model, monitor and theory each need to know of a nonlinearity.

    act = ACTIVATIONS["tanh"]
    act.module()          # a torch module (torch is imported only when a module is asked for)
    act.phi, act.dphi     # numpy phi and phi' for the mean-field theory (PyTorch's definitions)
    act.kind              # "squashing" (statistic: saturated) or "rectifier" (statistic: dead)
    act.threshold         # the z where phi' falls to 10% of its reference slope (see below)

Both activation statistics are defined from phi' alone:
- squashing (sigmoid, tanh, softsign): a (unit, example) pair is *saturated* when phi'(z) is below
  10% of phi'(0), i.e. when |z| > threshold. The statistic is the fraction of such pairs.
- rectifier (relu, leaky_relu, elu, gelu, selu): a unit is *dead* on a batch when phi'(z) is below
  10% of phi's largest slope for every example, i.e. when z <= threshold for every example. The
  statistic is the fraction of such units. ReLU and leaky ReLU (slope 0.01 < 10%) are dead at
  z <= 0; ELU and SELU only once exp(z) < 0.1 (z < ln 0.1); GELU below z ~ -0.53 (its slope is
  negative between -inf and -0.75, at most 0.129 in size: still small next to its peak of 1.129).
tests/test_activations.py checks every threshold against phi' numerically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

SELU_ALPHA, SELU_SCALE = 1.6732632423543772, 1.0507009873554805
LEAKY_SLOPE = 0.01
LOW_SLOPE = 0.1  # "below 10% of the reference slope": saturated or dead

Array = np.ndarray


def _sigmoid(x: Array) -> Array:
    return 0.5 * (1 + np.tanh(x / 2))


def _erf(x: Array) -> Array:
    from scipy.special import erf  # scipy only where the theory asks for GELU

    return erf(x)


def _gelu(x: Array) -> Array:
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def _dgelu(x: Array) -> Array:
    return 0.5 * (1 + _erf(x / math.sqrt(2))) + x * np.exp(-x * x / 2) / math.sqrt(2 * math.pi)


@dataclass(frozen=True)
class Activation:
    name: str
    torch_name: str  # class in torch.nn
    torch_kwargs: tuple[tuple[str, float], ...]
    phi: Callable[[Array], Array]
    dphi: Callable[[Array], Array]
    kind: str  # "squashing" or "rectifier"
    threshold: float

    @property
    def statistic(self) -> str:
        """Name of the activation statistic: 'saturated' for squashing functions, 'dead' for rectifiers."""
        return "saturated" if self.kind == "squashing" else "dead"

    def module(self):
        from torch import nn

        return getattr(nn, self.torch_name)(**dict(self.torch_kwargs))


def _squashing(name, torch_name, phi, dphi, threshold):
    return Activation(name, torch_name, (), phi, dphi, "squashing", threshold)


def _rectifier(name, torch_name, phi, dphi, threshold, **kwargs):
    return Activation(name, torch_name, tuple(kwargs.items()), phi, dphi, "rectifier", threshold)


_LN_TENTH = math.log(LOW_SLOPE)  # exp(z) < 0.1: ELU and SELU below 10% of their largest slope

ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        # squashing, saturated where |z| > threshold: sigmoid' < 0.025, tanh' = 1 - tanh^2 < 0.1,
        # softsign' = 1/(1+|z|)^2 < 0.1 (listed last)
        _squashing("sigmoid", "Sigmoid", _sigmoid, lambda x: _sigmoid(x) * (1 - _sigmoid(x)), 3.636893),
        _squashing("tanh", "Tanh", np.tanh, lambda x: 1 - np.tanh(x) ** 2, 1.818446),
        # rectifiers, dead where z <= threshold for the whole batch
        _rectifier("relu", "ReLU", lambda x: np.maximum(x, 0), lambda x: (x > 0).astype(float), 0.0),
        _rectifier(
            "leaky_relu", "LeakyReLU",
            lambda x: np.where(x > 0, x, LEAKY_SLOPE * x), lambda x: np.where(x > 0, 1.0, LEAKY_SLOPE), 0.0,
            negative_slope=LEAKY_SLOPE,
        ),
        _rectifier(
            "elu", "ELU",
            lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0))),
            lambda x: np.where(x > 0, 1.0, np.exp(np.minimum(x, 0))), _LN_TENTH,
        ),
        _rectifier("gelu", "GELU", _gelu, _dgelu, -0.532406),
        _rectifier(
            "selu", "SELU",
            lambda x: SELU_SCALE * np.where(x > 0, x, SELU_ALPHA * np.expm1(np.minimum(x, 0))),
            lambda x: SELU_SCALE * np.where(x > 0, 1.0, SELU_ALPHA * np.exp(np.minimum(x, 0))), _LN_TENTH,
        ),
        _squashing("softsign", "Softsign", lambda x: x / (1 + np.abs(x)), lambda x: 1 / (1 + np.abs(x)) ** 2, 2.162278),
    )
}
NAMES = tuple(ACTIVATIONS)
