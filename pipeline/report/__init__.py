"""report stage: one self-contained HTML page per grid, from what MLflow holds.

    gradbench report [--grid-run RUN_ID]   # -> reports/<grid>-<run id>-<date>.html, a page per run in
                                           #    reports/<grid>-<run id>-<date>/, reports/index.html, and an
                                           #    artifact of the grid run

The summary's figures are seaborn/matplotlib PNGs, drawn once per report by the seaborn process
(workers.py), their captions in the template (captions.html.j2); a run page shows the run's own
logged plots/gradient_flow.png beside small hand-drawn SVG panels (runpage.py, svg.py: a thousand
pages must cost milliseconds each). Images are inlined as data: URIs; no page makes a network
request, each opens from file:// offline. Figures and pages are drawn by processes started before
the report reads MLflow: the seaborn process imports seaborn while the report reads. Strings from
MLflow go through Jinja's autoescaping.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd

from .. import tracking
from ..config import FIELDS
from ..runtime import process_alive
from .collect import ReportData, collect, read_histograms, read_summary, read_time
from .figure import Figure, is_mlp
from .figures import MIN_STEPS, Pick, figure_tasks, paper_section, telling_runs, time_tasks
from .runpage import page_names, run_figure, slug
from .workers import Workers, draw, workers

SUMMARY_COLUMNS = ["run_name", "activation", "depth", "width", "init", "remedy", "clip", "clip_threshold", "seed", "outcome",
                   "diagnosis", "test_acc", "first_last_ratio"]
# where a grid holds recurrent nets: their arch, and their gradient through time (time/first_last_ratio_init)
RECURRENT_COLUMNS = ["arch", "time_ratio"]
GATED = ("lstm", "gru")  # their activation is fixed (sigmoid gates, tanh): blank in the summary
RUN_PAGES = 1000  # run pages drawn by default: every run of a grid this size, the telling ones of a bigger one
META = re.compile(r'<meta name="gradbench-(\w+)" content="([^"]*)">')


@functools.lru_cache(maxsize=1)  # one per process: it compiles each template once
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
    )


def render(data: ReportData, n_configs: int, figures: list[Figure], paper, run_dir: str = "",
           pages: dict[str, str] | None = None, through_time: list[Figure] = ()) -> str:
    """The report page. `pages` maps run ids to their pages' file names inside `run_dir`;
    `through_time`: the figures of the recurrent runs' section (none: no section)."""
    pages = pages or {}
    anchors = page_names(data.runs)
    columns = SUMMARY_COLUMNS
    recurrent = ~is_mlp(data.runs)
    if recurrent.any():  # a recurrent run's depth means nothing: left blank
        columns = [columns[0], *RECURRENT_COLUMNS[:1], *columns[1:], *RECURRENT_COLUMNS[1:]]
    rows = (data.runs.assign(_depth=data.runs.depth.where(~recurrent, -1))
            .sort_values(["activation", "init", "remedy", "_depth", "clip", "seed"])
            .assign(depth=lambda runs: runs.depth.astype(object).where(runs._depth >= 0, ""),
                    activation=lambda runs: runs.activation.where(~runs.arch.isin(GATED), ""))  # unused there
            .to_dict("records"))
    for row in rows:
        row["page"] = pages.get(row["run_id"], "")
        row["anchor"] = anchors[row["run_id"]][:-5]
    return _environment().get_template("template.html.j2").render(
        grid=data.grid,
        experiment=data.experiment,
        parent_run_id=data.parent_run_id,
        n_runs=len(data.runs),
        n_configs=n_configs,
        generated=dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        tracking_uri=tracking.tracking_uri(),
        missing=data.missing,
        notices=data.notices,
        figures=figures,
        through_time=list(through_time),
        min_steps=MIN_STEPS,
        paper=paper,
        columns=columns,
        rows=rows,
        run_dir=run_dir,
        n_pages=len(pages),
        any_url=any(r["url"] for r in rows),
    )


def _run_page(run: pd.Series, artifacts, grid: str, report_name: str, page: str) -> str:
    """One run's page: reading the run's tables and drawing its figure."""
    table, _ = read_summary(artifacts, run.run_id)
    hist = read_histograms(artifacts, run.run_id)
    recurrent = run.get("arch", "mlp") not in ("mlp", None)
    time = read_time(artifacts, run.run_id) if recurrent else None
    figure = None if table is None or table.empty else run_figure(run, table, hist, time)
    # drawn and logged by the run (plots.py): through time for a recurrent net, per layer for an MLP
    flow = artifacts.get(run.run_id, "plots/gradient_flow_time.png" if recurrent else "plots/gradient_flow.png")
    return _environment().get_template("run.html.j2").render(
        run=run, grid=grid, report_name=report_name, page_key=page[:-5], figure=figure, recurrent=recurrent,
        flow=base64.b64encode(Path(flow).read_bytes()).decode("ascii") if flow else "",
        config=[(k, run[k]) for k in FIELDS])


def runs_with_pages(runs: pd.DataFrame, limit: int | None) -> pd.DataFrame:
    """The runs that get a page: all of them up to `limit` (None: no limit); beyond it the telling
    runs, then the diverged ones, then the rest by how far their gradient ratio is from level (the
    most extreme first)."""
    if limit is None or len(runs) <= limit:
        return runs
    telling = {run.run_id for _, run in telling_runs(runs)}
    extreme = np.abs(np.log10(runs.first_last_ratio.astype(float).where(runs.first_last_ratio > 0)))
    order = runs.assign(_telling=~runs.run_id.isin(telling), _diverged=runs.outcome != "diverged",
                        _extreme=-extreme.fillna(-np.inf))
    return runs.loc[order.sort_values(["_telling", "_diverged", "_extreme"], kind="stable").index[:limit]]


def build_report(experiment: str = tracking.EXPERIMENT, grid_run_id: str | None = None,
                 out_dir: str | os.PathLike = "reports", run_pages: int | None = RUN_PAGES) -> Path:
    """Write <out_dir>/<grid>-<run id>-<date>.html with a page per run in the folder of the same
    name, refresh <out_dir>/index.html, and log the report to the grid's parent run. Each file
    appears whole or not at all (written aside, then renamed). File names are slugs of the grid's
    name and its run id's first 8 characters: a name never leaves out_dir, and two grids never
    share one. `run_pages`: at most that many run pages (None: one for every run)."""
    # the drawing processes start now, to import seaborn while the report reads MLflow; the pool reads
    # a big grid's tables too. downloads: where a remote store's artifacts land
    with workers() as drawing, tempfile.TemporaryDirectory(prefix="gradbench-report-") as downloads:
        return _build(collect(experiment, grid_run_id, downloads, drawing.pool if drawing else None), Path(out_dir),
                      run_pages, drawing)


def _build(data: ReportData, out_dir: Path, run_pages: int | None, drawing: Workers | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    # unique per grid run: two grids whose names slug alike (non-ASCII ones all become "unnamed"), or one
    # spec run in two experiments, never write one file; the same grid run reported again replaces its own
    stem = f"{slug(data.grid, 60)}-{data.parent_run_id[:8]}-{dt.date.today().isoformat()}"
    path = out_dir / f"{stem}.html"
    # the summary's figures (in the seaborn process) and the run pages (on the pool), drawn together
    picks = [Pick(label, run, data.table(run.run_id), data.histograms(run.run_id))
             for label, run in telling_runs(data.runs)]
    summary_tasks = figure_tasks(data.runs, data.layers, data.signal, picks, data.profiles)
    recurrent_tasks = time_tasks(data.runs, data.time, data.time_profiles)
    figures = [*summary_tasks, *recurrent_tasks, paper_section(data.reproduces, data.runs, data.layers)]
    names = page_names(data.runs)
    paged = runs_with_pages(data.runs, run_pages)
    pages = dict(zip(paged.run_id, paged.run_id.map(names)))
    drawn = draw(figures + [functools.partial(_run_page, run, data.artifacts, data.grid, path.name, names[run.run_id])
                            for _, run in paged.iterrows()], drawing)
    summary_figures, paper = drawn[: len(summary_tasks)], drawn[len(figures) - 1]
    through_time = [f for f in drawn[len(summary_tasks) : len(figures) - 1] if f is not None]
    if len(pages) < len(data.runs):
        data.missing.insert(0, f"run pages for {len(data.runs) - len(pages)} of {len(data.runs)} runs: drawn for "
                               f"the {len(pages)} most telling (the runs of the figures, the diverged ones, then "
                               "the most vanishing or exploding); `gradbench report --run-pages all` draws every "
                               "one (about 0.05 s of a core each)")
    html = render(data, len(data.runs) + sum("no finished run" in m for m in data.missing),
                  [f for f in summary_figures if f is not None], paper, run_dir=stem, pages=pages,
                  through_time=through_time)
    _sweep(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{stem}.{_owner()}.", dir=out_dir))
    try:
        for name, page in zip(pages.values(), drawn[len(figures) :]):
            (staging / name).write_text(page, encoding="utf-8")
        _write(path, html)
        run_dir = out_dir / stem
        if run_dir.exists():
            shutil.rmtree(run_dir)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; a report is for reading
        os.replace(staging, run_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_index(out_dir)
    tracking.log_report(tracking.get_client(), data.parent_run_id, path)
    return path


_HOST = slug(socket.gethostname()).replace(".", "-")
_LEFT_BEHIND = re.compile(r"\..+\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[A-Za-z0-9_]+")


def _owner() -> str:
    """host-pid, in the names of the files a report is writing (what _sweep reads back)."""
    return f"{_HOST}-{os.getpid()}"


def _sweep(out_dir: Path) -> None:
    """Remove what a report killed outright left half-written in out_dir (its hidden staging folder
    or temp file), where that report ran on this host and its process is gone."""
    for entry in out_dir.glob(".*"):
        found = _LEFT_BEHIND.fullmatch(entry.name)
        if not found or found["host"] != _HOST or process_alive(int(found["pid"])):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_owner()}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is for reading
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_index(out_dir: Path) -> Path:
    """out_dir/index.html: every report in the folder, newest first, from the facts each report
    carries in its <meta> tags."""
    reports = []
    for path in out_dir.glob("*.html"):
        if path.name == "index.html":
            continue
        facts = dict(META.findall(path.read_text(encoding="utf-8", errors="replace")[:4000]))
        if "grid" in facts:
            reports.append({"file": path.name, **facts})
    reports.sort(key=lambda r: (r.get("generated", ""), r["file"]), reverse=True)
    index = out_dir / "index.html"
    _write(index, _environment().get_template("index.html.j2").render(reports=reports))
    return index
