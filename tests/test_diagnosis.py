"""The diagnosis rules on crafted statistics: each label, and the order in which rules apply."""

import numpy as np
import pandas as pd
import pytest

from pipeline.diagnosis import THRESHOLDS, diagnose, first_last_ratio


def table(backprop_at_init, act_name=None, act_last=0.0, steps=3):
    """A layer_stats table: `backprop_at_init` per layer at step 0, constant afterwards."""
    rows = []
    for step in range(steps):
        for layer, norm in enumerate(backprop_at_init):
            row = {"step": step, "layer": layer, "backprop_norm": norm, "weight_grad_norm": norm}
            if act_name:
                row[act_name] = act_last if step == steps - 1 else 0.0
            rows.append(row)
    return pd.DataFrame(rows)


def test_ratio_is_first_over_last_at_step_0():
    assert first_last_ratio(table([1e-4, 1e-2, 1.0])) == pytest.approx(1e-4)
    assert np.isnan(first_last_ratio(table([1.0, 0.0])))


@pytest.mark.parametrize(
    "norms, expected",
    [([1e-5, 1e-3, 1.0], "vanishing"), ([1e4, 1e2, 1.0], "exploding"), ([0.5, 0.8, 1.0], "healthy"),
     ([0.011, 0.1, 1.0], "healthy"), ([0.009, 0.1, 1.0], "vanishing")],
)
def test_gradient_ratio_rules(norms, expected):
    assert diagnose("completed", table(norms)) == expected


def test_divergence_wins_over_everything():
    assert diagnose("diverged", table([1e-9, 1.0], "dead", 1.0)) == "diverged"


def test_dead_and_saturated_come_before_the_gradient_ratio():
    over = THRESHOLDS["dead_fraction"] + 0.1
    assert diagnose("completed", table([1e-9, 1e-3, 1.0], "dead", over)) == "dead"
    assert diagnose("completed", table([1e-9, 1e-3, 1.0], "saturated", over)) == "saturated"
    assert diagnose("completed", table([1e-9, 1e-3, 1.0], "saturated", 0.2)) == "vanishing"
