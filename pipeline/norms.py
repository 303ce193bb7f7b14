"""The one normalization registry: what config, model, monitor and the report each need to know of
the layer that normalizes each hidden pre-activation before phi.

    norm = NORMS["batch"]
    norm.label            # "BatchNorm": how figures, tables and paper sections name it
    norm.tag              # "-bn": its mark in a run's name
    norm.mixes_examples   # True: see below
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Norm:
    name: str  # the vocabulary's value (config, CLI, YAML, MLflow param)
    label: str  # "" for none
    tag: str  # "" for none
    # Its statistics are the batch's, so the examples of a batch are coupled: a per-example gradient
    # (GSNR) and the per-input hidden map (the Jacobian) are not defined, and the net's output on one
    # example depends on the others. BatchNorm in training mode; LayerNorm normalizes each example alone.
    mixes_examples: bool


NORMS: dict[str, Norm] = {norm.name: norm for norm in (
    Norm("none", "", "", mixes_examples=False),
    Norm("batch", "BatchNorm", "-bn", mixes_examples=True),
    Norm("layer", "LayerNorm", "-ln", mixes_examples=False),
)}
