"""The activation registry: each threshold is where phi' crosses 10% of its reference slope."""

import numpy as np
import pytest
import torch

from pipeline.activations import ACTIVATIONS
from pipeline.config import ACTIVATIONS as VOCABULARY


def torch_slope(name: str, z: np.ndarray) -> np.ndarray:
    """phi'(z) from autograd on the torch module: independent of the registry's numpy phi'."""
    t = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(ACTIVATIONS[name].module()(t).sum(), t)
    return grad.numpy()


def test_the_registry_is_the_vocabulary():
    assert tuple(ACTIVATIONS) == VOCABULARY
    assert {a.statistic for a in ACTIVATIONS.values()} == {"saturated", "dead"}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_threshold_is_where_the_slope_falls_below_ten_percent(name):
    act = ACTIVATIONS[name]
    z = np.linspace(-8, 8, 160_001)  # step 1e-4
    slope = torch_slope(name, z)
    if act.kind == "squashing":  # saturated where |z| > threshold; reference slope phi'(0)
        low = slope < 0.1 * torch_slope(name, np.zeros(1))[0]
        distance = np.abs(z)
    else:  # dead where z <= threshold; reference slope: the largest
        low = slope < 0.1 * slope.max()
        distance = -z
    edge = -act.threshold if act.kind == "rectifier" else act.threshold
    assert low.any() and (~low).any()
    assert (distance[low] >= edge - 2e-4).all() and (distance[~low] <= edge + 2e-4).all()
