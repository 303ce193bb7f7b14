"""Does a run compute the same on the GPU as on the CPU? (Needs a CUDA device.)

    python benchmarks/perf/cpu_vs_cuda.py --data-dir data [--device cuda]

Trains four configurations (tanh and ReLU, four inits; depth 10, width 128, 20 steps) once on the
CPU and once on the device, and prints the largest relative difference of any layer's ||dL/dW||
at step 0 and at the last step, and the final test accuracies. A seed fixes the initial weights
and the batches on any device, so only float rounding should differ (about 1e-6 in fp32). Then a
group of four trained together against each member alone on the device (the ensemble engine must
not couple them), and tf32, bf16, fp16 and fp64 runs on the device, which must finish, each with
its largest difference from the fp32 run's ||dL/dW|| (what `precision: tf32` costs in the norms).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline import data  # noqa: E402
from pipeline.config import RunConfig  # noqa: E402
from pipeline.train import train  # noqa: E402

BASE = dict(depth=10, width=128, max_steps=20, train_subset=2560, batch_size=64, seed=3)


def norms(result) -> np.ndarray:
    """||dL/dW|| per step (rows) and layer (columns)."""
    return result.table.pivot(index="step", columns="layer", values="weight_grad_norm").to_numpy()


def largest_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.abs(a)))


@click.command()
@click.option("--data-dir", default="data", envvar="GRADBENCH_DATA_DIR", show_default=True)
@click.option("--source", default=None, envvar="GRADBENCH_MNIST_SOURCE")
@click.option("--device", default="cuda", show_default=True)
def main(data_dir: str, source: str | None, device: str) -> None:
    cpu = data.load(data_dir, torch.device("cpu"), source=source)
    other = data.load(data_dir, torch.device(device), source=source)
    for activation, init in [("tanh", "xavier_normal"), ("relu", "he_normal"), ("tanh", "orthogonal"),
                             ("relu", "default")]:
        config = RunConfig(activation=activation, init=init, **BASE)
        (a,), (b,) = train([config], cpu), train([config], other)
        click.echo(f"{activation}/{init}: cpu vs {device}, largest relative difference of a layer's ||dL/dW||: "
                   f"step 0 {largest_difference(norms(a)[0], norms(b)[0]):.1e}, step {len(norms(a)) - 1} "
                   f"{largest_difference(norms(a)[-1], norms(b)[-1]):.1e}; test accuracy {a.final_test_acc:.4f} / "
                   f"{b.final_test_acc:.4f}")
    group = [RunConfig(activation="tanh", init=i, **BASE) for i in ("xavier_normal", "orthogonal", "default", "he_normal")]
    together, alone = train(group, other), [train([c], other)[0] for c in group]
    worst = max(largest_difference(norms(y), norms(x)) for x, y in zip(together, alone))
    click.echo(f"{device}: a group of 4 against each member alone, largest relative difference over every step "
               f"and layer {worst:.1e}")
    (fp32,) = train([RunConfig(activation="tanh", init="xavier_normal", **BASE)], other)
    a = norms(fp32)
    for precision in ("tf32", "bf16", "fp16", "fp64"):
        tensors = data.load(data_dir, other.x_train.device, torch.float64, source=source) if precision == "fp64" else other
        try:
            (result,) = train([RunConfig(activation="tanh", init="xavier_normal", precision=precision, **BASE)], tensors)
        except Exception as exc:  # noqa: BLE001 - reported, the check goes on
            click.echo(f"{device} {precision}: FAILED {type(exc).__name__}: {exc}")
            continue
        b = norms(result)
        click.echo(f"{device} {precision}: {result.outcome}, {result.steps} steps, test accuracy {result.final_test_acc:.4f}; "
                   f"largest relative difference of a layer's ||dL/dW|| from fp32: step 0 "
                   f"{largest_difference(a[0], b[0]):.1e}, step {len(a) - 1} {largest_difference(a[-1], b[-1]):.1e}")


if __name__ == "__main__":
    main()
