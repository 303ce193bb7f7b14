"""report stage: one self-contained HTML page per grid, from what MLflow holds.

    gradbench report [--grid-run RUN_ID]   # -> reports/<grid>-<date>.html, a page per run in
                                           #    reports/<grid>-<date>/, reports/index.html, and an
                                           #    artifact of the grid run

Every figure is a seaborn PNG inlined as a data: URI; the page makes no network request and opens
from file:// offline. Strings from MLflow go through Jinja's autoescaping.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import re
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import jinja2

from .. import tracking
from ..config import FIELDS
from .collect import ReportData, collect
from .figures import all_figures
from .papers import section
from .runpage import page_names, run_figure, slug

SUMMARY_COLUMNS = ["run_name", "activation", "depth", "width", "init", "remedy", "clip", "clip_threshold", "seed", "outcome",
                   "diagnosis", "test_acc", "first_last_ratio"]
META = re.compile(r'<meta name="gradbench-(\w+)" content="([^"]*)">')


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
    )


def render(data: ReportData, n_configs: int, run_dir: str = "", pages: dict[str, str] | None = None) -> str:
    """The report page. `pages` maps run ids to their pages' file names inside `run_dir`."""
    pages = pages or {}
    rows = data.runs.sort_values(["activation", "init", "remedy", "depth", "clip", "seed"]).to_dict("records")
    for row in rows:
        row["page"] = pages.get(row["run_id"], "")
    return _environment().get_template("template.html.j2").render(
        grid=data.grid,
        experiment=data.experiment,
        parent_run_id=data.parent_run_id,
        n_runs=len(data.runs),
        n_configs=n_configs,
        generated=dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        tracking_uri=tracking.tracking_uri(),
        missing=data.missing,
        figures=all_figures(data.runs, data.layers, data.histograms, data.signal),
        paper=section(data.reproduces, data.runs, data.layers),
        columns=SUMMARY_COLUMNS,
        rows=rows,
        run_dir=run_dir,
        any_url=any(r["url"] for r in rows),
    )


def _run_page(job: tuple) -> str:
    """One run's page (a process-pool task: the figure is the costly part)."""
    run, table, hist, grid, report_name, page = job
    figure = None if table is None or table.empty else run_figure(run, table, hist)
    return _environment().get_template("run.html.j2").render(
        run=run, grid=grid, report_name=report_name, page_key=page[:-5], figure=figure,
        config=[(k, run[k]) for k in FIELDS])


def render_run_pages(data: ReportData, folder: Path, report_name: str) -> dict[str, str]:
    """One page per run in `folder`, drawn on every core; returns run id -> page file name."""
    pages = page_names(data.runs)
    tables = dict(tuple(data.layers.groupby("run_id"))) if not data.layers.empty else {}
    jobs = [(run, tables.get(run.run_id), data.histograms.get(run.run_id), data.grid, report_name, pages[run.run_id])
            for _, run in data.runs.iterrows()]
    workers = min(os.cpu_count() or 1, len(jobs))
    if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        # fork: the workers inherit the imported modules (and FIGURE_CHECKS), so they start at once
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            htmls = list(pool.map(_run_page, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    else:
        htmls = [_run_page(job) for job in jobs]
    for job, html in zip(jobs, htmls):
        (folder / job[-1]).write_text(html, encoding="utf-8")
    return pages


def build_report(experiment: str = tracking.EXPERIMENT, grid_run_id: str | None = None,
                 out_dir: str | os.PathLike = "reports") -> Path:
    """Write <out_dir>/<grid>-<date>.html with a page per run in <out_dir>/<grid>-<date>/, refresh
    <out_dir>/index.html, and log the report to the grid's parent run. Each file appears whole or
    not at all (written aside, then renamed). File names are slugs of the grid's name: a name never
    leaves out_dir."""
    data = collect(experiment, grid_run_id)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{slug(data.grid)}-{dt.date.today().isoformat()}"
    path = out_dir / f"{stem}.html"
    staging = Path(tempfile.mkdtemp(prefix=f".{stem}.", dir=out_dir))
    try:
        pages = render_run_pages(data, staging, path.name)
        html = render(data, n_configs=len(data.runs) + sum("no finished run" in m for m in data.missing),
                      run_dir=stem, pages=pages)
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


def _write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
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
