"""The perf suite: how fast gradbench trains, and what its instrumentation costs.

    gradbench bench [--quick] [--out reports/perf.json]      (the CLI loads this file)

Every figure is a ratio of two things timed side by side in this process, on the same machine:
1. gradbench's loop (full monitoring on) against the seed-style loop of the classic PyTorch MNIST
   example: torchvision MNIST with ToTensor + Normalize through a DataLoader (batch 64,
   num_workers 0), a host copy per batch, loss.item() every 10 steps, the 784-512-256-10 ReLU net;
   and the engine with one member (monitoring off) against a plain nn.Linear loop over the same
   on-device batches: what the member axis costs a single run;
2. full per-layer monitoring against monitoring off, same loop and config;
3. MLflow tracking on (a real SQLite store) against off: the fraction of the run time it adds,
   for a run of 300 steps (--quick: a quick-grid run) or one epoch;
4. achieved FLOP/s of the loop (6 x parameters x samples / time) at depth 20, widths 256 and 1024,
   against the fp32 matmul peak measured here and now;
5. 8 configurations (4 with --quick) as one ensemble against one at a time (runs per hour), widths
   128 and 512;
6. peak resident memory of one quick-grid run (a subprocess), and peak GPU memory where there is one.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.activations import ACTIVATIONS
from pipeline.config import RunConfig
from pipeline.data import MEAN, STD, Mnist, load
from pipeline.model import layer_sizes
from pipeline.runtime import get_device
from pipeline.train import train

REFERENCE_BATCH = 64


@dataclass(frozen=True)
class Budget:
    steps: int  # training steps per timed loop
    tracked_steps: int  # steps of the run whose MLflow share is measured
    repeats: int  # best of this many (the least disturbed measurement)
    members: int  # configurations in the ensemble measurement
    full: bool  # also the quick grid end to end, and MLflow at a second stride


QUICK = Budget(steps=100, tracked_steps=300, repeats=2, members=4, full=False)  # 300: a quick-grid run
FULL = Budget(steps=600, tracked_steps=469, repeats=5, members=8, full=True)  # 469: one epoch of MNIST


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def _paired(a: Callable[[], object], b: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float]:
    """Best times of a and b, warmed up once each, then run alternately (a b a b ...), so that a
    slow spell of the machine hits both sides alike."""
    a(), b()
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(_best_seconds(a, device, 1))
        times_b.append(_best_seconds(b, device, 1))
    return min(times_a), min(times_b)


def _paired_ratios(a: Callable[[], object], b: Callable[[], object], device: torch.device,
                   pairs: int) -> tuple[float, float, float]:
    """time(a) / time(b) for each of `pairs` alternations (a b a b ..., after a warm-up of each):
    the median ratio and its spread (min, max). This VM's speed drifts by tens of percent."""
    a(), b()
    ratios = []
    for _ in range(pairs):
        ratios.append(_best_seconds(a, device, 1) / _best_seconds(b, device, 1))
    return statistics.median(ratios), min(ratios), max(ratios)


def reference_loop(data_dir: str, device: torch.device, steps: int) -> Callable[[], None]:
    """The seed-style loop, as in pytorch/examples' mnist/main.py, cut to `steps` steps."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])
    dataset = datasets.MNIST(data_dir, train=True, download=False, transform=transform)
    test_set = datasets.MNIST(data_dir, train=False, download=False, transform=transform)

    def run() -> None:
        torch.manual_seed(0)
        loader = torch.utils.data.DataLoader(dataset, batch_size=REFERENCE_BATCH, shuffle=True, num_workers=0)
        model = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256),
            torch.nn.ReLU(), torch.nn.Linear(256, 10),
        ).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        model.train()
        for batch_idx, (x, y) in enumerate(loader):
            if batch_idx == steps:
                break
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            if batch_idx % 10 == 0:
                loss.item()  # the example prints the loss every log_interval = 10 batches
        test(model)  # the example tests after each epoch, as gradbench's loop does at its end

    def test(model: torch.nn.Module) -> None:
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in torch.utils.data.DataLoader(test_set, batch_size=1000):
                x, y = x.to(device), y.to(device)
                output = model(x)
                F.cross_entropy(output, y, reduction="sum").item()
                correct += output.argmax(dim=1).eq(y).sum().item()

    return run


def plain_loop(config: RunConfig, data: Mnist) -> Callable[[], None]:
    """The same network and batches as the engine's single run, as a plain nn.Linear stack doing
    the bookkeeping the engine does with monitoring off: per step the loss, the accuracy and the
    global gradient norm (divergence detection) kept on the device; one evaluation at the end. The
    ratio against the engine is then the cost of the member axis alone."""
    device = data.x_train.device
    n_train = config.train_subset or len(data.x_train)

    def run() -> None:
        torch.manual_seed(config.seed)
        layers: list[torch.nn.Module] = []
        for fan_in, fan_out in layer_sizes(config.depth, config.width):
            layers += [torch.nn.Linear(fan_in, fan_out), ACTIVATIONS[config.activation].module()]
        model = torch.nn.Sequential(*layers[:-1]).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
        shuffle = torch.Generator(device=device).manual_seed(config.seed)
        order = torch.randperm(n_train, device=device, generator=shuffle)
        record = torch.zeros(3, config.total_steps, device=device)
        for i in range(config.total_steps):
            idx = order[i * config.batch_size : (i + 1) * config.batch_size]
            logits = model(data.x_train[idx])
            loss = F.cross_entropy(logits, data.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            record[0, i] = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(
                [p.grad for p in model.parameters()])))
            optimizer.step()
            record[1, i] = loss.detach()
            record[2, i] = (logits.argmax(dim=1) == data.y_train[idx]).float().mean()
        record.cpu()
        with torch.no_grad():
            for i in range(0, len(data.x_test), 2000):
                logits = model(data.x_test[i : i + 2000])
                F.cross_entropy(logits, data.y_test[i : i + 2000], reduction="sum")
                (logits.argmax(dim=1) == data.y_test[i : i + 2000]).sum()

    return run


def matmul_peak(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """fp32 matmul FLOP/s: the best of `repeats` n x n x n products."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)  # warm up
    seconds = _best_seconds(lambda: torch.mm(a, b), device, repeats)
    return 2 * n**3 / seconds


def _params(config: RunConfig) -> int:
    w = config.width
    return 785 * w + (config.depth - 2) * (w + 1) * w + (w + 1) * 10


def _quick_run_rss_mb(data_dir: str) -> float:
    """Peak RSS (MB) of one quick-grid run (its deepest config), tracked into a throwaway store."""
    args = ["--activation", "sigmoid", "--depth", "20", "--width", "128", "--max-steps", "300",
            "--train-subset", "38400", "--data-dir", data_dir, "--experiment", "bench"]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        env.pop("MLFLOW_RUN_ID", None)
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        subprocess.run([sys.executable, "-m", "pipeline", "train", *args], env=env, cwd=tmp, check=True,
                       capture_output=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(after, before) / 1024  # ru_maxrss is in KiB on Linux


def _quick_grid_seconds(data_dir: str) -> float:
    spec = Path(__file__).resolve().parents[1] / "quick.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        env.pop("MLFLOW_RUN_ID", None)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline", "grid", str(spec), "--data-dir", data_dir, "--no-progress"],
                       env=env, cwd=tmp, check=True, capture_output=True)
    return time.perf_counter() - start


def run_bench(data_dir: str, source: str | None = None, quick: bool = False, device_name: str = "auto",
              echo: Callable[[str], None] = print) -> dict:
    budget = QUICK if quick else FULL
    device = get_device(device_name)
    data: Mnist = load(data_dir, device, source=source)
    steps = budget.steps
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "torch_threads": torch.get_num_threads(), "steps": steps, "quick": quick}

    def timed(config: RunConfig) -> float:
        return _best_seconds(lambda: train([config], data), device, budget.repeats)

    echo("1/6 gradbench loop against the seed-style loop")
    ours_cfg = RunConfig(activation="relu", depth=3, width=512, batch_size=REFERENCE_BATCH, max_steps=steps,
                         device=str(device))
    reference, ours = _paired(reference_loop(data_dir, device, steps), lambda: train([ours_cfg], data), device,
                              budget.repeats)
    results["seed_loop_samples_per_s"] = steps * REFERENCE_BATCH / reference
    results["gradbench_samples_per_s"] = steps * REFERENCE_BATCH / ours
    results["speedup_vs_seed_loop"] = reference / ours
    engine_cfg = RunConfig(activation="relu", depth=10, width=256, init="he_normal", max_steps=steps,
                           device=str(device))
    # speed ratio (plain time / engine time): >= 0.95 means the member axis costs at most 5%
    pairs = max(7, budget.repeats)
    ratio, low, high = _paired_ratios(plain_loop(engine_cfg, data),
                                      lambda: train([engine_cfg], data, full_monitor=False), device, pairs)
    results["engine_vs_plain_loop"] = ratio
    results["engine_vs_plain_loop_spread"] = [low, high]
    results["engine_vs_plain_loop_pairs"] = pairs

    echo("2/6 monitoring on against off")
    monitored_cfg = RunConfig(activation="tanh", depth=10, width=256, max_steps=steps, device=str(device))
    on, off = _paired(lambda: train([monitored_cfg], data), lambda: train([monitored_cfg], data, full_monitor=False),
                      device, budget.repeats)
    results["monitor_overhead"] = on / off

    echo("3/6 MLflow tracking on against off")
    tracked_cfg = monitored_cfg.replace(max_steps=budget.tracked_steps)
    results["mlflow_overhead"] = _mlflow_overhead(tracked_cfg, data, device, budget.repeats)
    results["mlflow_run_steps"] = budget.tracked_steps
    if budget.full:  # MLflow's store costs per metric value: the stride is the lever (default: every 10 steps)
        results["mlflow_overhead_log_every_50"] = _mlflow_overhead(tracked_cfg.replace(log_every=50), data, device,
                                                                   budget.repeats)

    echo("4/6 achieved FLOP/s against the matmul peak")
    peak = matmul_peak(device)
    results["matmul_peak_gflops"] = peak / 1e9
    for width in (256, 1024):
        cfg = RunConfig(activation="relu", depth=20, width=width, init="he_normal", max_steps=steps // 3,
                        device=str(device))
        seconds = timed(cfg)
        flops = 6 * _params(cfg) * cfg.batch_size * cfg.max_steps / seconds
        results[f"loop_gflops_w{width}"] = flops / 1e9
        results[f"peak_fraction_w{width}"] = flops / peak

    echo("5/6 ensembles against one run at a time")
    for width in (128, 512):
        configs = [RunConfig(activation="relu", depth=10, width=width, init=init, seed=seed, max_steps=steps // 3,
                             device=str(device)) for init in ("he_normal", "xavier_normal")
                   for seed in range(budget.members // 2)]
        one_by_one, together = _paired(lambda configs=configs: [train([c], data) for c in configs],
                                       lambda configs=configs: train(configs, data), device,
                                       max(1, budget.repeats // 2))
        results[f"ensemble_speedup_w{width}"] = one_by_one / together
    results["ensemble_members"] = len(configs)

    echo("6/6 peak memory of a quick-grid run")
    data_dir = os.path.abspath(data_dir)  # the subprocesses below run in a temporary folder
    results["peak_rss_mb"] = _quick_run_rss_mb(data_dir)
    if device.type == "cuda":
        results["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    if budget.full:
        echo("   and the quick grid end to end")
        results["quick_grid_seconds"] = _quick_grid_seconds(data_dir)
    return results


def _mlflow_overhead(config: RunConfig, data: Mnist, device: torch.device, repeats: int) -> float:
    """Fraction of a tracked run's time that MLflow adds: (tracked - untracked) / tracked."""
    from pipeline import tracking
    from pipeline.run import run_group

    with tempfile.TemporaryDirectory() as tmp:
        saved = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        try:
            client = tracking.get_client()
            client.create_experiment("bench", artifact_location=Path(tmp, "artifacts").as_uri())
            tracked, plain = _paired(lambda: run_group([config], data, "bench", client=client),
                                     lambda: train([config], data), device, repeats)
        finally:
            if saved is None:
                os.environ.pop("MLFLOW_TRACKING_URI")
            else:
                os.environ["MLFLOW_TRACKING_URI"] = saved
    return (tracked - plain) / tracked


def markdown(results: dict) -> str:
    rows = [
        ("device", results["device"], ""),
        ("gradbench loop, samples/s", f"{results['gradbench_samples_per_s']:,.0f}", "full monitoring on"),
        ("seed-style loop, samples/s", f"{results['seed_loop_samples_per_s']:,.0f}", "DataLoader + transforms"),
        ("speedup vs seed loop", f"{results['speedup_vs_seed_loop']:.2f}x", "target >= 5x"),
        ("one-member engine vs plain nn.Linear loop", f"{results['engine_vs_plain_loop']:.3f}",
         "speed ratio, median of {} pairs (range {:.2f}-{:.2f}); same bookkeeping, monitoring off; "
         "target >= 0.95".format(results["engine_vs_plain_loop_pairs"], *results["engine_vs_plain_loop_spread"])),
        ("monitoring on / off", f"{results['monitor_overhead']:.3f}", "target <= 1.10"),
        ("MLflow share of run time", f"{results['mlflow_overhead']:.1%}",
         f"{results['mlflow_run_steps']}-step run; target <= 5%"),
        ("fp32 matmul peak", f"{results['matmul_peak_gflops']:.0f} GFLOP/s", "measured here"),
        ("depth 20, width 256", f"{results['peak_fraction_w256']:.1%} of peak", f"{results['loop_gflops_w256']:.0f} GFLOP/s"),
        ("depth 20, width 1024", f"{results['peak_fraction_w1024']:.1%} of peak", f"{results['loop_gflops_w1024']:.0f} GFLOP/s; target >= 50%"),
        (f"ensemble of {results['ensemble_members']} vs one at a time, width 128",
         f"{results['ensemble_speedup_w128']:.2f}x", "runs per hour"),
        (f"ensemble of {results['ensemble_members']} vs one at a time, width 512",
         f"{results['ensemble_speedup_w512']:.2f}x", "runs per hour; target on an H100 >= 10x"),
        ("peak RSS, one quick-grid run", f"{results['peak_rss_mb']:.0f} MB", ""),
    ]
    if "mlflow_overhead_log_every_50" in results:
        rows.insert(6, ("MLflow share, --log-every 50", f"{results['mlflow_overhead_log_every_50']:.1%}", "same run"))
    if "peak_gpu_mb" in results:
        rows.append(("peak GPU memory", f"{results['peak_gpu_mb']:.0f} MB", ""))
    if "quick_grid_seconds" in results:
        rows.append(("quick grid end to end", f"{results['quick_grid_seconds']:.0f} s", "48 runs"))
    lines = ["| measure | value | note |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def write_json(results: dict, out: str | os.PathLike) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return out
