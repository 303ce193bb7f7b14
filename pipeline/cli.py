"""The `gradbench` command: one thin click command per stage. Parsing here, logic in the stages.

    gradbench prepare --source ../shared/data/mnist
    gradbench train --activation sigmoid --depth 10 --width 256 --init default --clip none --epochs 1
"""

from __future__ import annotations

import math
import os
import sys
import urllib.parse
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__
from .config import FIELDS, ConfigError, RunConfig, from_dict
from .data import DATA_DIR_ENV, SOURCE_ENV, DataError, DownloadError

EXPERIMENT_ENV = "GRADBENCH_EXPERIMENT"


def _click_type(f) -> Any:
    """The click type of a RunConfig field: Choice for closed sets, ranges for bounds."""
    meta = f.metadata
    if "choices" in meta:
        return click.Choice(meta["choices"])
    if f.type == "int":
        return click.IntRange(min=meta.get("min"), max=meta.get("max"))
    if f.type == "float":
        low = meta.get("min", meta.get("gt"))
        return click.FloatRange(min=low, min_open="gt" in meta, max=meta.get("lt"), max_open="lt" in meta)
    return str


def config_options(command: Callable) -> Callable:
    """One --option per RunConfig field, with the field's default, bounds and help."""
    for name, f in reversed(FIELDS.items()):
        option = click.option(
            f"--{name.replace('_', '-')}", name, type=_click_type(f), default=f.default, show_default=True,
            help=f.metadata["help"],
        )
        command = option(command)
    return command


data_dir_option = click.option(
    "--data-dir", default="data", show_default=True, envvar=DATA_DIR_ENV, metavar="DIR",
    type=click.Path(file_okay=False), help=f"Where MNIST is prepared (MNIST/raw inside). Env: {DATA_DIR_ENV}.",
)
source_option = click.option(
    "--source", envvar=SOURCE_ENV, metavar="DIR_OR_URL", default=None,
    help=f"Folder or URL with the four MNIST IDX files (.gz or not) instead of downloading. Env: {SOURCE_ENV}.",
)
def _experiment_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not value.strip() or any(not c.isprintable() for c in value) or len(value) > 500:
        raise click.BadParameter(f"{value!r} is not an experiment name: give 1 to 500 printable characters")
    return value


experiment_option = click.option(
    "--experiment", default="gradbench", show_default=True, envvar=EXPERIMENT_ENV, metavar="NAME",
    callback=_experiment_name, help="MLflow experiment (ignored under `mlflow run`, which has chosen one).",
)


def _check_source(source: str | None) -> None:
    if source and not urllib.parse.urlparse(source).scheme and not os.path.isdir(source):
        raise click.BadParameter(f"{source!r} is not a folder (or a URL)", param_hint="--source")


def _config_from(kwargs: dict[str, Any]) -> RunConfig:
    try:
        config = from_dict({name: kwargs.pop(name) for name in FIELDS})
    except ConfigError as exc:
        raise click.BadParameter(exc.message, param_hint=f"--{exc.key.replace('_', '-')}") from None
    _check_device(config.device, config.precision)
    _check_memory([config], hint="--depth/--width" if config.arch == "mlp" else "--width/--sequence")
    return config


def _check_memory(configs: list[RunConfig], hint: str, prefix: str = "") -> None:
    """Each architecture fits in what its device has free (a usage error, with the figures)."""
    from .config import group_key
    from .model import check_memory
    from .runtime import get_device

    seen = set()
    for config in configs:
        key = group_key(config)
        if key in seen:
            continue
        seen.add(key)
        try:
            check_memory(config, get_device(config.device))
        except ValueError as exc:
            raise click.BadParameter(f"{prefix}{exc}", param_hint=hint) from None


def _device_error(name: str, precision: str = "fp32") -> tuple[str, str] | None:
    """(field, message) where the device is not there or this torch cannot autocast to the
    precision on it; None where both are fine."""
    from .runtime import check_precision, get_device

    try:
        device = get_device(name)
    except (ValueError, RuntimeError) as exc:
        return "device", str(exc)
    try:
        check_precision(device, precision)
    except ValueError as exc:
        return "precision", str(exc)
    return None


def _check_device(name: str, precision: str = "fp32") -> None:
    """The device is there and this torch can autocast to the precision on it (usage errors)."""
    error = _device_error(name, precision)
    if error:
        raise click.BadParameter(error[1], param_hint=f"--{error[0]}")


def _check_spec_devices(spec_path: str, spec) -> None:
    """_check_device for every (device, precision) of a spec, the error naming the file and the
    key the user wrote (<file>: base.precision: ...), as the spec's other errors do."""
    import yaml

    from .config import spec_origin

    for device, precision in sorted({(c.device, c.precision) for c in spec.configs}):
        error = _device_error(device, precision)
        if error:
            field, message = error
            raw = yaml.safe_load(Path(spec_path).read_text(encoding="utf-8"))
            where = spec_origin(raw, field, device if field == "device" else precision)
            raise click.BadParameter(f"{spec_path}: {where}: {message}", param_hint="SPEC")


def _prepare(data_dir: str, source: str | None):
    from . import data

    _check_source(source)
    _check_folder(data_dir, "--data-dir")
    try:
        return data.prepare(data_dir, source)
    except DataError as exc:
        raise click.BadParameter(str(exc), param_hint="--source") from None
    except DownloadError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:  # a read-only or full disk: the environment, not the input
        raise click.ClickException(f"cannot write MNIST into {data_dir!r}: {exc.strerror or exc}") from None


def _check_folder(path: str, option: str) -> None:
    """A folder to create or use: no part of it may be an existing file (a usage error, exit 2)."""
    for part in [Path(path), *Path(path).parents]:
        if part.exists():
            if not part.is_dir():
                raise click.BadParameter(f"{str(part)!r} is a file, not a folder", param_hint=option)
            return


STORE_PACKAGES = ("mlflow", "sqlalchemy", "sqlite3", "requests", "urllib3")


def _store_failure(exc: BaseException) -> bool:
    """An error of the tracking store, not of gradbench: an MLflow, SQLAlchemy, sqlite3 or HTTP
    exception, or an OSError raised while their code ran (a store path whose folder is a file)."""
    if any(c.__module__.split(".")[0] in STORE_PACKAGES for c in type(exc).__mro__):
        return True
    if not isinstance(exc, OSError):
        return False
    tb = exc.__traceback__
    while tb is not None:  # raised inside the store's code (by pathlib, os, ... that it calls)
        if any(package in Path(tb.tb_frame.f_code.co_filename).parts for package in STORE_PACKAGES):
            return True
        tb = tb.tb_next
    return False


def _store_error(exc: BaseException, advice: str) -> click.ClickException:
    """Exit 1 naming the tracking store and the cause in words: a full disk as such, anything else
    in the first sentences of the store's own words."""
    from .tracking import full_disk, tracking_uri

    full = full_disk(exc)
    if full:
        return click.ClickException(
            f"the tracking store {tracking_uri()} failed: the disk is full ({full}). Free some space where the "
            "store (and its artifacts) live and run the same command again: finished runs are kept")
    detail = (getattr(exc, "message", None) or str(exc) or type(exc).__name__).strip().splitlines()[0]
    if len(detail) > 300:  # the first sentences, not half a URL
        detail = detail[: detail.rfind(". ", 0, 300) + 1 or 300]
    return click.ClickException(f"the tracking store {tracking_uri()} failed: {detail.rstrip('.')}. {advice}")


def _stopped(ctx: click.Context, exc: KeyboardInterrupt) -> None:
    """A stop (Ctrl-C, SIGTERM): say so on stderr, no traceback, and exit 128 + the signal's number
    (130 for Ctrl-C, 143 for SIGTERM), as a shell reports a process a signal ended."""
    import signal

    from .runtime import WriteAbandoned, stand_down, stopped_by

    stand_down()
    signum = stopped_by() or signal.SIGINT
    text = f"stopped by {signal.Signals(signum).name}"
    if isinstance(exc, WriteAbandoned):
        from .tracking import tracking_uri

        text += (f" without waiting for the tracking store {tracking_uri()} ({exc}): the runs it had not recorded "
                 "are left RUNNING; the next gradbench command on the store marks them FAILED")
    if ctx.invoked_subcommand in ("grid", "train"):
        text += "; finished runs are kept, so the same command resumes"
    click.echo(f"\n{text}", err=True)
    ctx.exit(128 + signum)


def main() -> None:
    """`gradbench` and `python -m pipeline`. A stop (exit status 128 + the signal's number) leaves by
    os._exit once stdout and stderr are flushed. CPython remembers a KeyboardInterrupt that left
    code run by eval() or exec() of a string (namedtuple and dataclass creation, lazy imports) even
    when it was caught later, and at exit turns whatever status was asked for into death by SIGINT:
    a stop signal landing there made a grid exit -2 instead of 143. Atexit handlers are skipped on
    a stop: its runs are marked already, and MLflow's would wait on a store that did not answer."""
    import signal

    from .runtime import stopped_by

    try:
        cli(prog_name="gradbench")
    except SystemExit as exc:
        if isinstance(exc.code, int) and exc.code > 128:
            _leave(exc.code)
        raise
    except KeyboardInterrupt:  # one that got past the command group (while click parsed the line)
        _leave(128 + (stopped_by() or signal.SIGINT))


def _leave(status: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(status)


AUTO_ON_OFF = {"auto": None, "on": True, "off": False}  # --ensemble, --overlap: None lets the grid decide
MAX_WORKERS = 256  # local processes; more is a typo, not a machine


class _Workers(click.ParamType):
    """--workers: a whole number >= 1, or auto (None: grid.auto_workers decides)."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int):
            return value
        text = str(value).strip().lower()
        if text == "auto":
            return None
        try:
            number = float(text)  # MLflow passes a float parameter as 2.0
        except ValueError:
            number = math.nan
        if not (1 <= number <= MAX_WORKERS and number == int(number)):
            self.fail(f"{value!r} is neither a whole number of processes (1 to {MAX_WORKERS}) nor auto", param, ctx)
        return int(number)


class _Cli(click.Group):
    """The command group: a failing tracking store (a corrupt or read-only mlflow.db, an unreachable
    server, a URI MLflow cannot use, a full disk) is a failing environment: exit 1 with the cause in
    words. A stop signal exits 128 + its number, without a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            _stopped(ctx, exc)
        except Exception as exc:
            if not _store_failure(exc):
                raise
            raise _store_error(exc, "Check MLFLOW_TRACKING_URI (a database URI such as sqlite:///mlflow.db, or "
                                    "http://host:5000) and that the store is readable and writable; finished runs "
                                    "are kept, so the same command resumes") from None


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="gradbench")
def cli() -> None:
    """gradbench: see, measure and fix vanishing and exploding gradients in deep MLPs on MNIST.

    Stages: prepare (MNIST) -> train (one run) / grid (a study) -> report. Every run is tracked in
    MLflow (MLFLOW_TRACKING_URI, default: MLflow's embedded store); compare runs with `mlflow ui`.
    """
    from .runtime import configure

    configure()


@cli.command()
@data_dir_option
@source_option
def prepare(data_dir: str, source: str | None) -> None:
    """Put verified MNIST into DATA_DIR/MNIST/raw: downloaded through torchvision, or copied from
    --source (a folder or URL holding the four IDX files). Idempotent; checks the MD5 of each
    file's decompressed content, and never leaves a half-written file behind."""
    folder = _prepare(data_dir, source)
    click.echo(f"MNIST ready in {folder}")


@cli.command()
@config_options
@data_dir_option
@source_option
@experiment_option
def train(data_dir: str, source: str | None, experiment: str, **kwargs: Any) -> None:
    """Train one MLP on MNIST and record it as one MLflow run: per-layer gradient statistics every
    step, metrics every --log-every steps, artifacts at the end. A run that diverges (NaN/Inf)
    stops early and is recorded as outcome 'diverged'; that is a result, not an error."""
    config = _config_from(kwargs)
    _prepare(data_dir, source)
    from . import data
    from .run import run_group
    from .runtime import get_device, param_dtype, stop_on_signals

    stop_on_signals()
    mnist = data.load(data_dir, get_device(config.device), param_dtype(config.precision))
    from . import tracking

    client = tracking.get_client()
    tracking.fail_stale_runs(client, tracking.experiment_id(client, experiment))  # what a killed train left RUNNING
    (summary,) = run_group([config], mnist, experiment, client=client)
    if summary.error:
        raise click.ClickException(summary.line())
    click.echo(summary.line())


@cli.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(exists=True, dir_okay=False))
@click.option("--workers", type=_Workers(), default="1", show_default=True,
              help="Processes that train in parallel (one per GPU where there are several); auto: one per GPU "
                   "with CUDA, else 2 where there are 2 cores or more (the main job's choice).")
@click.option("--rerun", is_flag=True, help="Run every configuration again, finished or not.")
@click.option("--reduced", is_flag=True,
              help="Run the spec's reduced: budget (a grid of its own, named <name>-reduced).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this machine (--workers processes); ray: one Ray task per configuration.")
@click.option("--address", metavar="ADDR", default=None, envvar="RAY_ADDRESS",
              help="Ray cluster to join (e.g. auto, or ray://head:10001); default: start a local one. Env: RAY_ADDRESS.")
@click.option("--ensemble", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Train configs that share an architecture together in one pass (auto: on CUDA, and on a "
                   "CPU for widths up to 512, where it was measured faster), "
                   "with every executor: each worker or Ray task trains a group.")
@click.option("--overlap", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="With one local process (--workers 1; refused with more): record each group (analysis, figures, "
                   "MLflow) in a second process "
                   "while the next group trains (auto: on CUDA, where the device would wait; on a 2-core CPU it "
                   "was measured to gain nothing).")
@data_dir_option
@source_option
@experiment_option
def grid(spec_path: str, workers: int | None, rerun: bool, reduced: bool, progress: bool, executor: str, address: str | None,
         ensemble: str, overlap: str, data_dir: str, source: str | None, experiment: str) -> None:
    """Run every configuration of the grid SPEC (a YAML file, see benchmarks/) as a child run of
    one parent run named after the spec. Configurations that already have a FINISHED run are
    skipped, so the same command resumes an interrupted grid; --rerun runs everything again.
    With --executor ray each configuration is a Ray task (a GPU share each where the cluster has
    GPUs); point MLFLOW_TRACKING_URI at a tracking server that every node can reach."""
    from .config import GridSpec, SpecError

    try:
        spec = GridSpec.from_yaml(spec_path, reduced=reduced)
    except SpecError as exc:
        raise click.BadParameter(str(exc), param_hint="SPEC") from None
    _check_spec_devices(spec_path, spec)
    _check_memory(list(spec.configs), hint="SPEC", prefix=f"{spec_path}: ")
    from .grid import auto_workers

    workers = workers or auto_workers()
    if overlap == "on" and (executor == "ray" or workers > 1):  # it would be ignored: said, not done silently
        where = "--executor ray" if executor == "ray" else f"--workers {workers}"
        raise click.BadParameter(f"--overlap on records beside one local process, and {where} has each worker "
                                 f"record its own groups: use --workers 1, or leave --overlap auto",
                                 param_hint="--overlap")
    if executor == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise click.BadParameter("Ray is not installed: pip install 'gradbench[ray]'", param_hint="--executor")
    _prepare(data_dir, source)
    from .grid import ExecutorError, RecorderLost, run_grid
    from .runtime import stop_on_signals
    from .tracking import GridBusy, MlflowException

    stop_on_signals()

    try:
        result = run_grid(spec, data_dir, source, experiment, workers, rerun, echo=click.echo, progress=progress,
                          executor=executor, address=address, ensemble=AUTO_ON_OFF[ensemble],
                          overlap=AUTO_ON_OFF[overlap])
    except (ExecutorError, GridBusy, RecorderLost) as exc:
        raise click.ClickException(str(exc)) from None
    except MlflowException as exc:
        raise _store_error(exc, "Fix it (is the tracking server up?) and run the same command again: finished "
                                "runs are kept") from None
    if result.failures:
        raise click.ClickException(f"{len(result.failures)} run(s) failed; run the same command again to retry them")


@cli.command()
@click.option("--grid-run", "grid_run_id", metavar="RUN_ID", default=None,
              help="The grid's parent run (default: the latest grid in the experiment).")
@click.option("--out-dir", default="reports", show_default=True, type=click.Path(file_okay=False),
              help="Where the HTML file is written.")
@click.option("--run-pages", default="1000", show_default=True, metavar="N|all",
              help="Draw a page per run for at most N runs (a grid with more gets pages for its most telling "
                   "runs; each page costs about 0.05 s of a core), or for all.")
@experiment_option
def report(grid_run_id: str | None, out_dir: str, run_pages: str, experiment: str) -> None:
    """Render a grid as one self-contained HTML report (seaborn figures inline, no network), written
    to OUT_DIR/<grid>-<run id>-<date>.html with a page per run in OUT_DIR/<grid>-<run id>-<date>/, and logged as an
    artifact of the grid's parent run. Everything comes from MLflow: runs, params, metrics and
    artifacts."""
    from . import tracking
    from .report import build_report

    _check_folder(out_dir, "--out-dir")
    if run_pages != "all" and not (run_pages.isdigit() and len(run_pages) < 10):
        raise click.BadParameter(f"{run_pages!r} is neither 'all' nor a whole number under a billion", param_hint="--run-pages")
    client = tracking.get_client()
    found = client.get_experiment_by_name(experiment)
    if found is not None:  # what a killed train or grid of this host left RUNNING is not shown as running
        tracking.fail_stale_runs(client, found.experiment_id)
    try:
        path = build_report(experiment, grid_run_id or None, out_dir,  # '' from MLproject means none
                            None if run_pages == "all" else int(run_pages))
    except tracking.NotFound as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:  # a read-only or full disk
        raise click.ClickException(f"cannot write the report into {out_dir!r}: {exc.strerror or exc}") from None
    click.echo(f"report written to {path}")


@cli.command()
@click.option("--quick", is_flag=True, help="Fewer steps and alternations: about 10 minutes on 2 CPU cores (the full run about 25).")
@click.option("--out", default="reports/perf.json", show_default=True, type=click.Path(dir_okay=False),
              help="Where the JSON results are written.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu, cuda or cuda:N.")
@data_dir_option
@source_option
def bench(quick: bool, out: str, device: str, data_dir: str, source: str | None) -> None:
    """Measure gradbench's speed and the cost of its instrumentation, each as a ratio of two
    things timed side by side in this process: the loop against the classic PyTorch MNIST
    example's, monitoring on/off, MLflow on/off, FLOP/s against the measured matmul peak, and
    peak memory. Prints a markdown table and writes JSON to --out."""
    _check_folder(str(Path(out).parent), "--out")
    _check_device(device)
    from . import bench as suite

    _prepare(data_dir, source)
    results = suite.run_bench(data_dir, source, quick, device, echo=lambda s: click.echo(s, err=True), out=out)
    click.echo(suite.markdown(results))
    click.echo(f"\nwritten to {out}", err=True)
