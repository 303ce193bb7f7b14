"""The perf suite: how fast gradbench trains, and what its instrumentation costs.

    gradbench bench [--quick] [--out reports/perf.json]

Two kinds of cost, never mixed:
- per step, in the steady state: a StepClock synchronizes the device after a few warm-up steps
  and after the last step, and times what lies between but the middle histogram step; construction,
  the first steps, the histogram steps' snapshots (histograms, forward signal, Jacobian spectrum:
  three per run, however long), the test-set evaluation and the end of the run lie outside;
- per run, fixed: the whole run's time minus its steps at the steady-state rate (construction,
  evaluation, the layer table, histograms, theory and figures, MLflow's run creation, metrics,
  artifacts and closing).

Every figure is a paired ratio: the two sides are timed alternately (a b a b ...) after a warm-up
of each, one ratio per alternation, and the median and the spread (min-max) of 3 (--quick) or 7
alternations are printed. A slow spell of the machine hits both sides of one alternation alike;
this VM's speed drifts by tens of percent over minutes. --quick and the full mode time the same
configurations (fewer steps in quick), so their ratios estimate the same thing.

1. steps: gradbench's loop (full monitoring) against the seed-style loop of the classic PyTorch
   MNIST example (torchvision MNIST, ToTensor + Normalize, DataLoader batch 64, a host copy per
   batch, loss.item() every 10 steps), both training gradbench's 784-512-512-10 ReLU MLP; and the
   one-member engine (monitoring off) against a plain nn.Linear loop with the same bookkeeping;
2. steps: full per-layer monitoring on against off;
3. runs: a quick-grid run (depth 5 and depth 20) tracked into a real SQLite store against the same
   work untracked: MLflow's share; and the monitoring's fixed cost (layer table, histograms,
   theory, figure) as a share of the tracked run;
4. steps: achieved FLOP/s at depth 20, widths 256 and 1024 (6 x weights x samples per step,
   monitoring on) against the fp32 matmul peak measured in this run;
5. runs: configurations trained as one ensemble against one at a time (runs per hour), widths 128
   and 512, whole runs (their fixed costs included: that is what a grid pays);
6. peak resident memory of one quick-grid run (a subprocess), peak GPU memory where there is one;
   full mode: the quick grid end to end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .activations import ACTIVATIONS
from .config import RunConfig
from .data import MEAN, STD, Mnist, load
from .model import layer_sizes
from .monitor import INSTRUMENTS
from .runtime import get_device
from .train import train

REFERENCE_BATCH = 64
# what a run does only because it is tracked: every RunLogger entry point (the MLflow calls and
# the logger's own work: metric objects, artifact files)
TRACKING_METHODS = ("start", "log_dataset", "on_chunk", "on_eval", "finish")
QUICK_SPEC = Path(__file__).resolve().parents[1] / "benchmarks" / "quick.yaml"  # in a source checkout
QUICK_RUN = dict(width=128, max_steps=300, train_subset=38400)  # a quick-grid run (benchmarks/quick.yaml)
INSTRUMENT_NOTES = {
    "set": "all four against none, paired: tanh, depth 20, width 128, 300 steps, untracked; target <= 1.05",
    "gsnr": "per-layer gradient signal-to-noise ratio",
    "jacobian": "input-output Jacobian singular values (grows with width^3)",
    "signal": "forward q and c per layer",
    "zero_fraction": "exactly-zero gradient entries per layer",
}


@dataclass(frozen=True)
class Budget:
    pairs: int  # alternations per paired ratio (the median and the range of 3 in quick mode, 7 in full)
    steps: int  # timed steady-state steps at depth 3 to 10 (after WARMUP steps)
    deep_steps: int  # the same at depth 20 (FLOP/s)
    members: int  # configurations in the ensemble measurement
    ensemble_steps: int  # steps of each ensemble-measurement run
    full: bool  # also the quick grid end to end


# quick: under 3 minutes on the 2-core CPU, so that it is run (5 pairs and 30 ensemble steps took 5.3)
QUICK = Budget(pairs=3, steps=40, deep_steps=8, members=4, ensemble_steps=20, full=False)
FULL = Budget(pairs=7, steps=250, deep_steps=30, members=8, ensemble_steps=50, full=True)
WARMUP = 3  # untimed steps first: lazy initialization, allocator warm-up


@dataclass(frozen=True)
class Ratio:
    """a / b over paired alternations: the median, its spread, and each side's median."""

    median: float
    low: float
    high: float
    a: float
    b: float
    pairs: int

    def to_dict(self) -> dict:
        return {"median": self.median, "low": self.low, "high": self.high, "a": self.a, "b": self.b,
                "pairs": self.pairs}

    def text(self, fmt: str = "{:.2f}") -> str:
        return f"{fmt.format(self.median)} ({fmt.format(self.low)}-{fmt.format(self.high)})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


class StepClock:
    """Times the steady state of a training loop: called with the number of steps done after each
    step, it synchronizes the device and reads the clock after step `start` and after step `end`,
    and around the step `skip` (the middle histogram step, whose snapshots are a per-run cost:
    three per run whatever its length), which is left out."""

    def __init__(self, device: torch.device, start: int, end: int, skip: int | None = None):
        if skip is not None and not (start <= skip and skip + 1 <= end and end - start > 1):
            skip = None  # not inside the window (a very short run): nothing to leave out
        self.device, self.start, self.end, self.skip = device, start, end, skip
        marks = {start, end} | ({skip, skip + 1} if skip is not None else set())
        self.marks: dict[int, float] = dict.fromkeys(marks, math.nan)

    @classmethod
    def for_run(cls, device: torch.device, start: int, total: int) -> StepClock:
        """For a run of `total` steps: those after `start` but the middle and the last histogram
        steps (step indices total // 2 and total - 1, monitor.py)."""
        return cls(device, start, total - 1 if total - 1 > start else total, skip=total // 2)

    def __call__(self, step: int) -> None:
        if step in self.marks:
            _sync(self.device)
            self.marks[step] = time.perf_counter()

    @property
    def per_step(self) -> float:
        seconds, steps = self.marks[self.end] - self.marks[self.start], self.end - self.start
        if self.skip is not None:
            seconds -= self.marks[self.skip + 1] - self.marks[self.skip]
            steps -= 1
        return seconds / steps


Loop = Callable[[int, StepClock], object]  # runs `steps` steps, calling the clock after each


def timed_run(loop: Loop, steps: int, device: torch.device) -> tuple[float, float]:
    """(seconds per step in the steady state, fixed seconds) of one run of `loop`: WARMUP steps,
    then `steps` timed ones; fixed = the whole run minus all its steps at the steady-state rate."""
    clock = StepClock.for_run(device, WARMUP, WARMUP + steps)
    total = _seconds(lambda: loop(WARMUP + steps, clock), device)
    return clock.per_step, total - (WARMUP + steps) * clock.per_step


def paired(a: Callable[[], float], b: Callable[[], float], pairs: int) -> Ratio:
    """a() / b() for each of `pairs` alternations, after a warm-up of each. a and b return a cost
    (seconds, seconds per step, ...)."""
    a(), b()
    sa, sb = [], []
    for _ in range(pairs):
        sa.append(a())
        sb.append(b())
    ratios = [x / y for x, y in zip(sa, sb)]
    return Ratio(statistics.median(ratios), min(ratios), max(ratios), statistics.median(sa), statistics.median(sb), pairs)


def reference_loop(data_dir: str, device: torch.device) -> Callable[[int], None]:
    """The seed-style loop, as in pytorch/examples' mnist/main.py, cut to `steps` steps, training
    gradbench's 784-512-512-10 MLP (depth 3, width 512) so that the ratio compares loops."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])
    dataset = datasets.MNIST(data_dir, train=True, download=False, transform=transform)
    test_set = datasets.MNIST(data_dir, train=False, download=False, transform=transform)

    def run(steps: int, clock: StepClock) -> None:
        torch.manual_seed(0)
        loader = torch.utils.data.DataLoader(dataset, batch_size=REFERENCE_BATCH, shuffle=True, num_workers=0)
        model = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
            torch.nn.ReLU(), torch.nn.Linear(512, 10),
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
            clock(batch_idx + 1)
        test(model)  # the example tests after each epoch, as gradbench's loop does at its end

    def test(model: torch.nn.Module) -> None:
        model.eval()
        with torch.no_grad():
            for x, y in torch.utils.data.DataLoader(test_set, batch_size=1000):
                x, y = x.to(device), y.to(device)
                output = model(x)
                F.cross_entropy(output, y, reduction="sum").item()
                output.argmax(dim=1).eq(y).sum().item()

    return run


def plain_loop(config: RunConfig, data: Mnist) -> Callable[[int], None]:
    """The same network and batches as the engine's single run, as a plain nn.Linear stack doing
    the bookkeeping the engine does with monitoring off: per step the loss, the accuracy and the
    global gradient norm (divergence detection) kept on the device; one evaluation at the end. The
    ratio against the engine is then the cost of the member axis alone."""
    device = data.x_train.device
    n_train = config.train_subset or len(data.x_train)

    def run(steps: int, clock: StepClock) -> None:
        torch.manual_seed(config.seed)
        layers: list[torch.nn.Module] = []
        for fan_in, fan_out in layer_sizes(config.depth, config.width):
            layers += [torch.nn.Linear(fan_in, fan_out), ACTIVATIONS[config.activation].module()]
        model = torch.nn.Sequential(*layers[:-1]).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
        shuffle = torch.Generator(device=device).manual_seed(config.seed)
        order = torch.randperm(n_train, device=device, generator=shuffle)
        record = torch.zeros(3, steps, device=device)
        for i in range(steps):
            idx = order[i * config.batch_size : (i + 1) * config.batch_size]
            yb = data.y_train.index_select(0, idx)  # as the engine gathers its batches
            logits = model(data.x_train.index_select(0, idx))
            loss = F.cross_entropy(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            record[0, i] = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(
                [p.grad for p in model.parameters()])))
            optimizer.step()
            record[1, i] = loss.detach()
            record[2, i] = (logits.argmax(dim=1) == yb).float().mean()
            clock(i + 1)
        record.cpu()
        with torch.no_grad():
            for i in range(0, len(data.x_test), 2000):
                logits = model(data.x_test[i : i + 2000])
                F.cross_entropy(logits, data.y_test[i : i + 2000], reduction="sum")
                (logits.argmax(dim=1) == data.y_test[i : i + 2000]).sum()

    return run


STEADY_TEST = 500  # test images a steady-state loop evaluates on (its evaluation lies outside the timed steps)


def small_test(data: Mnist) -> Mnist:
    """The data with STEADY_TEST test images, for measures whose evaluation is not what they time."""
    return dataclasses.replace(data, x_test=data.x_test[:STEADY_TEST], y_test=data.y_test[:STEADY_TEST])


def engine_loop(config: RunConfig, data: Mnist, full_monitor: bool = True, steady: bool = True) -> Loop:
    """The engine's single run. steady: for a per-step measure, without the signal-propagation
    instruments and on a small test set: both act only at the histogram steps and the run's end,
    outside the timed steps (at width 1024 they took most of the bench's time)."""
    instruments = frozenset() if steady else INSTRUMENTS
    if steady:
        data = small_test(data)
    return lambda steps, clock: train([config.replace(max_steps=steps)], data, full_monitor=full_monitor, clock=clock,
                                      instruments=instruments)


def matmul_peak(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """fp32 matmul FLOP/s: the best of `repeats` n x n x n products."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)  # warm up
    return 2 * n**3 / min(_seconds(lambda: torch.mm(a, b), device) for _ in range(repeats))


def _weights(config: RunConfig) -> int:
    return sum(fan_in * fan_out for fan_in, fan_out in layer_sizes(config.depth, config.width))


def _quick_run_rss_mb(data_dir: str) -> float:
    """Peak RSS (MB) of one quick-grid run (its deepest config), tracked into a throwaway store (NaN
    where there is no /proc, which holds the figure)."""
    if not Path("/proc/self/status").exists():
        return float("nan")
    args = ["--activation", "sigmoid", "--depth", "20", *(f"--{k.replace('_', '-')}={v}" for k, v in QUICK_RUN.items()),
            "--data-dir", data_dir, "--experiment", "bench"]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        env.pop("MLFLOW_RUN_ID", None)
        status = Path(tmp, "status")
        # the child's own high-water mark, /proc/self/status's VmHWM, read as it exits: getrusage's
        # ru_maxrss (RUSAGE_CHILDREN, or wait4's) keeps the pre-exec peak of the fork, which is
        # this bench process's size, not the run's
        code = (f"import atexit, runpy, sys; atexit.register(lambda: open({str(status)!r}, 'w').write("
                f"open('/proc/self/status').read())); sys.argv = ['gradbench', 'train', *{args!r}]; "
                "runpy.run_module('pipeline', run_name='__main__')")
        done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"the quick-grid run failed ({done.returncode}): {done.stderr[-2000:]}")
        peak = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
    return int(peak.split()[1]) / 1024  # kB


def _quick_grid_seconds(data_dir: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        env.pop("MLFLOW_RUN_ID", None)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline", "grid", str(QUICK_SPEC), "--data-dir", data_dir, "--no-progress"],
                       env=env, cwd=tmp, check=True, capture_output=True)
    return time.perf_counter() - start


@contextlib.contextmanager
def seconds_in(cls: type, names: tuple[str, ...]) -> Iterator[list[float]]:
    """Adds up, into the yielded [seconds], the time spent in the methods `names` of `cls` while
    the block runs (methods that do not call one another; classmethods too)."""
    spent = [0.0]
    saved = {name: cls.__dict__[name] for name in names}

    def timed(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
        return wrapper

    for name, attr in saved.items():
        setattr(cls, name, classmethod(timed(attr.__func__)) if isinstance(attr, classmethod) else timed(attr))
    try:
        yield spent
    finally:
        for name, attr in saved.items():
            setattr(cls, name, attr)


def run_costs(config: RunConfig, data: Mnist, device: torch.device, pairs: int) -> dict:
    """One quick-grid run three ways, alternately: tracked (run_group into a SQLite store), the same
    work untracked (train, analyse, the figure rendered), and training alone with monitoring off.
    MLflow's share: (tracked - untracked) / tracked. The monitoring's fixed cost: the analysis, plus
    what monitoring adds to the run's fixed cost (fixed = run - steps x steady-state step), as a
    share of the tracked run."""
    from . import tracking
    from .run import analyse, run_group

    steps = config.total_steps - WARMUP

    def tracked() -> tuple[float, float]:  # (the whole, the tracking) in seconds
        with seconds_in(tracking.RunLogger, TRACKING_METHODS) as spent:
            whole = _seconds(lambda: run_group([config], data, "bench", client=client), device)
        return whole, spent[0]

    def untracked(clock: StepClock) -> tuple[float, float]:  # (the whole, the analysis) in seconds
        start = time.perf_counter()
        result = train([config], data, clock=clock)[0]
        trained = time.perf_counter()
        analyse(config, result)
        end = time.perf_counter()
        return end - start, end - trained

    rows = []  # per alternation: tracked, untracked, analysis, fixed (monitoring on), fixed (off)
    with tempfile.TemporaryDirectory() as tmp:
        saved = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        try:
            client = tracking.get_client()
            client.create_experiment("bench", artifact_location=Path(tmp, "artifacts").as_uri())
            for i in range(pairs + 1):  # the first alternation warms up
                tracked_seconds, tracking_seconds = tracked()
                clock = StepClock.for_run(device, WARMUP, config.total_steps)
                total, analysis = untracked(clock)
                on_fixed = total - analysis - config.total_steps * clock.per_step
                off_fixed = timed_run(engine_loop(config, data, False, steady=False), steps, device)[1]
                if i:
                    rows.append((tracked_seconds, total, analysis, on_fixed, off_fixed, tracking_seconds))
        finally:
            if saved is None:
                os.environ.pop("MLFLOW_TRACKING_URI")
            else:
                os.environ["MLFLOW_TRACKING_URI"] = saved
    med = statistics.median
    tracked_s, untracked_s, analysis_s = ([r[k] for r in rows] for k in range(3))
    mlflow = [logger / t for t, *_, logger in rows]  # measured inside the run
    difference = [(t - u) / t for t, u, *_ in rows]  # the same, as a difference of two runs (noisier)
    monitoring = [(a + on - off) / t for t, _, a, on, off, _ in rows]
    return {
        "tracked_seconds": med(tracked_s), "untracked_seconds": med(untracked_s), "analysis_seconds": med(analysis_s),
        "mlflow_seconds": med(r[-1] for r in rows),
        "mlflow_share": Ratio(med(mlflow), min(mlflow), max(mlflow), med(r[-1] for r in rows), med(tracked_s),
                              pairs).to_dict(),
        "mlflow_share_by_difference": Ratio(med(difference), min(difference), max(difference), med(tracked_s),
                                            med(untracked_s), pairs).to_dict(),
        "monitoring_fixed_share": Ratio(med(monitoring), min(monitoring), max(monitoring), med(analysis_s),
                                        med(tracked_s), pairs).to_dict(),
    }


# the functions each instrument spends its time in (pipeline/monitor.py)
INSTRUMENT_FUNCTIONS = {"signal": ("square_and_cross", "length_and_correlation"),
                        "jacobian": ("jacobian_singular_values",), "gsnr": ("gradient_snr",),
                        "zero_fraction": ("zero_fractions",)}


@contextlib.contextmanager
def time_functions(module, groups: dict[str, tuple[str, ...]], device: torch.device) -> Iterator[dict[str, float]]:
    """Adds up, per group, the seconds spent in the module functions it names while the block runs
    (the device synchronized around each call, so that GPU work is counted where it is launched)."""
    spent = dict.fromkeys(groups, 0.0)
    saved = {name: getattr(module, name) for names in groups.values() for name in names}

    def timed(group: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            _sync(device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(device)
                spent[group] += time.perf_counter() - start
        return wrapper

    for group, names in groups.items():
        for name in names:
            setattr(module, name, timed(group, saved[name]))
    try:
        yield spent
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)


def instrument_costs(config: RunConfig, data: Mnist, device: torch.device, pairs: int, each: bool) -> dict:
    """What each instrument of monitor.INSTRUMENTS costs a whole untracked run (train, then
    analyse): the whole set against none, paired; each instrument's own seconds inside the run
    (timed around its functions), as a share of the run; with `each`, also each instrument as
    Cockpit prints them: the run with every instrument against the run without that one, paired.
    Every round runs each variant once."""
    from . import monitor
    from .run import analyse

    variants = {"all": INSTRUMENTS, "none": frozenset()}
    if each:
        variants.update({name: INSTRUMENTS - {name} for name in sorted(INSTRUMENTS)})

    def run(instruments: frozenset[str]) -> tuple[float, dict[str, float]]:
        with time_functions(monitor, INSTRUMENT_FUNCTIONS, device) as spent:
            seconds = _seconds(lambda: analyse(config, train([config], data, instruments=instruments)[0]), device)
        return seconds, dict(spent)

    rounds, shares = [], []
    for i in range(pairs + 1):  # the first round warms up
        timed = {name: run(instruments) for name, instruments in variants.items()}
        if i:
            rounds.append({name: seconds for name, (seconds, _) in timed.items()})
            whole, spent = timed["all"]
            shares.append({name: spent[name] / whole for name in INSTRUMENT_FUNCTIONS})

    def ratio(without: str) -> dict:
        found = [r["all"] / r[without] for r in rounds]
        return Ratio(statistics.median(found), min(found), max(found), statistics.median(r["all"] for r in rounds),
                     statistics.median(r[without] for r in rounds), pairs).to_dict()

    med = statistics.median
    return {"set": ratio("none"),
            "share": {name: {"median": med(s[name] for s in shares), "low": min(s[name] for s in shares),
                             "high": max(s[name] for s in shares)} for name in INSTRUMENT_FUNCTIONS},
            **({name: ratio(name) for name in sorted(INSTRUMENTS)} if each else {})}


def run_bench(data_dir: str, source: str | None = None, quick: bool = False, device_name: str = "auto",
              echo: Callable[[str], None] = print, out: str | os.PathLike | None = None) -> dict:
    """Run every measurement; with `out`, the results so far are written there after each section
    (a bench stopped midway keeps what it measured)."""
    budget = QUICK if quick else FULL
    device = get_device(device_name)
    data: Mnist = load(data_dir, device, source=source)
    n, pairs = budget.steps, budget.pairs
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "torch_threads": torch.get_num_threads(), "quick": quick, "pairs": pairs, "steps": n}

    def section(line: str) -> None:
        results["complete"] = line == "done"  # false in what a bench stopped midway leaves
        if out is not None:
            write_json(results, out)
        echo(line)

    def steady(config: RunConfig, full_monitor: bool = True, steps: int = n) -> Callable[[], float]:
        return lambda: timed_run(engine_loop(config, data, full_monitor), steps, device)[0]

    section("1/6 steps: gradbench's loop against the seed-style loop, and against a plain nn.Linear loop")
    ours = RunConfig(activation="relu", depth=3, width=512, batch_size=REFERENCE_BATCH, device=str(device))
    reference = reference_loop(data_dir, device)
    ratio = paired(lambda: timed_run(reference, n, device)[0], steady(ours), pairs)
    results["speedup_vs_seed_loop"] = ratio.to_dict()
    results["seed_loop_samples_per_s"] = REFERENCE_BATCH / ratio.a
    results["gradbench_samples_per_s"] = REFERENCE_BATCH / ratio.b
    engine = RunConfig(activation="relu", depth=10, width=256, init="he_normal", device=str(device))
    plain = plain_loop(engine, data)
    # plain time / engine time: >= 0.95 means the member axis costs at most 5%
    results["engine_vs_plain_loop"] = paired(lambda: timed_run(plain, n, device)[0], steady(engine, False),
                                             pairs).to_dict()

    section("2/6 steps: monitoring on against off")
    monitored = RunConfig(activation="tanh", depth=10, width=256, device=str(device))
    results["monitor_overhead"] = paired(steady(monitored), steady(monitored, False), pairs).to_dict()

    section("3/6 runs: MLflow's share and the monitoring's fixed cost, quick-grid runs at depth 5 and 20")
    for depth in (5, 20):
        config = RunConfig(activation="tanh", depth=depth, device=str(device), **QUICK_RUN)
        results[f"quick_run_d{depth}"] = run_costs(config, data, device, pairs)

    section("   and each signal-propagation instrument's cost, a depth-20 quick-grid run with it against without")
    config = RunConfig(activation="tanh", depth=20, device=str(device), **QUICK_RUN)
    results["instruments"] = instrument_costs(config, data, device, pairs, each=budget.full)

    section("4/6 steps: achieved FLOP/s against the matmul peak")
    peak = matmul_peak(device)
    results["matmul_peak_gflops"] = peak / 1e9
    for width in (256, 1024):
        config = RunConfig(activation="relu", depth=20, width=width, init="he_normal", device=str(device))
        seconds = statistics.median(steady(config, steps=budget.deep_steps)() for _ in range(pairs))
        flops = 6 * _weights(config) * config.batch_size / seconds
        results[f"loop_gflops_w{width}"] = flops / 1e9
        results[f"peak_fraction_w{width}"] = flops / peak

    section("5/6 runs: ensembles against one at a time")
    # training whole runs, without the instruments and on a small test set: at 20 to 50 steps their
    # per-run costs would outweigh the steps, which on a real run (300 steps and more) they do not
    small = small_test(data)
    for width in (128, 512):
        configs = [RunConfig(activation="relu", depth=10, width=width, init=init, seed=seed,
                             max_steps=budget.ensemble_steps, device=str(device))
                   for init in ("he_normal", "xavier_normal") for seed in range(budget.members // 2)]
        results[f"ensemble_speedup_w{width}"] = paired(
            lambda configs=configs: _seconds(lambda: [train([c], small, instruments=frozenset()) for c in configs], device),
            lambda configs=configs: _seconds(lambda: train(configs, small, instruments=frozenset()), device),
            pairs).to_dict()
    results["ensemble_members"] = budget.members

    section("6/6 peak memory of a quick-grid run")
    data_dir = os.path.abspath(data_dir)  # the subprocesses below run in a temporary folder
    results["peak_rss_mb"] = _quick_run_rss_mb(data_dir)
    if device.type == "cuda":
        results["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    if budget.full and QUICK_SPEC.is_file():  # the spec is beside the package in a source checkout
        section("   and the quick grid end to end")
        results["quick_grid_seconds"] = _quick_grid_seconds(data_dir)
    section("done")
    return results


def markdown(results: dict) -> str:
    def r(key: str, fmt: str = "{:.2f}") -> str:
        return Ratio(**results[key]).text(fmt)

    def share(run: str, key: str) -> str:
        return Ratio(**results[run][key]).text("{:.1%}")

    rows = [
        ("device", results["device"], f"each ratio: median (min-max) of {results['pairs']} paired alternations"),
        ("gradbench loop, samples/s", f"{results['gradbench_samples_per_s']:,.0f}",
         "steady state, full monitoring, 784-512-512-10, batch 64"),
        ("seed-style loop, samples/s", f"{results['seed_loop_samples_per_s']:,.0f}", "DataLoader + transforms, same net"),
        ("speedup vs seed loop, per step", r("speedup_vs_seed_loop") + "x", "target >= 5x"),
        ("one-member engine vs plain nn.Linear loop, per step", r("engine_vs_plain_loop", "{:.3f}"),
         "speed ratio; same bookkeeping, monitoring off; target >= 0.95"),
        ("monitoring on / off, per step", r("monitor_overhead", "{:.3f}"), "tanh, depth 10, width 256; target <= 1.05"),
    ]
    for depth in (5, 20):
        run = f"quick_run_d{depth}"
        rows += [
            (f"MLflow share of a quick-grid run, depth {depth}", share(run, "mlflow_share"),
             f"{results[run]['mlflow_seconds']:.2f} s in the run logger of a {results[run]['tracked_seconds']:.2f} s "
             f"run (tracked minus untracked: {share(run, 'mlflow_share_by_difference')}); target <= 5%"),
            (f"monitoring fixed cost, depth {depth}", share(run, "monitoring_fixed_share"),
             f"analysis {results[run]['analysis_seconds']:.2f} s; share of the tracked run; target <= 5%"),
        ]
    rows += [
        ("fp32 matmul peak", f"{results['matmul_peak_gflops']:.0f} GFLOP/s", "measured in this run"),
        ("depth 20, width 256, per step", f"{results['peak_fraction_w256']:.1%} of peak",
         f"{results['loop_gflops_w256']:.0f} GFLOP/s"),
        ("depth 20, width 1024, per step", f"{results['peak_fraction_w1024']:.1%} of peak",
         f"{results['loop_gflops_w1024']:.0f} GFLOP/s; target >= 50%"),
        (f"ensemble of {results['ensemble_members']} vs one at a time, width 128", r("ensemble_speedup_w128") + "x",
         "runs per hour, training whole runs (no instruments)"),
        (f"ensemble of {results['ensemble_members']} vs one at a time, width 512", r("ensemble_speedup_w512") + "x",
         "runs per hour, training whole runs (no instruments); target on a GPU >= 10x"),
        *instrument_rows(results.get("instruments", {})),
        ("peak RSS, one quick-grid run", f"{results['peak_rss_mb']:.0f} MB", ""),
    ]
    if "peak_gpu_mb" in results:
        rows.append(("peak GPU memory", f"{results['peak_gpu_mb']:.0f} MB", ""))
    if "quick_grid_seconds" in results:
        rows.append(("quick grid end to end", f"{results['quick_grid_seconds']:.0f} s", "54 runs"))
    lines = ["| measure | value | note |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def instrument_rows(found: dict) -> list[tuple[str, str, str]]:
    if not found:
        return []
    rows = [("instruments, whole run all / none", Ratio(**found["set"]).text("{:.3f}"), INSTRUMENT_NOTES["set"])]
    for name in sorted(INSTRUMENTS):
        share = found["share"][name]
        paired = f"; run with / without it: {Ratio(**found[name]).text('{:.3f}')}" if name in found else ""
        rows.append((f"instrument {name}, share of the run", f"{share['median']:.2%} ({share['low']:.2%}-{share['high']:.2%})",
                     INSTRUMENT_NOTES[name] + " (seconds inside its functions)" + paired))
    return rows


def write_json(results: dict, out: str | os.PathLike) -> Path:
    """Write the results whole or not at all: into a hidden file beside `out`, then renamed over it
    (a bench stopped inside a write left a cut JSON file)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(json.dumps(results, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
