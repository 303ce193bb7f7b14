"""report stage: one self-contained HTML page per grid, from what MLflow holds.

    gradbench report [--grid-run RUN_ID]   # -> reports/<grid>-<date>.html, a page per run in
                                           #    reports/<grid>-<date>/, reports/index.html, and an
                                           #    artifact of the grid run

Every figure is a seaborn PNG inlined as a data: URI; the page makes no network request and opens
from file:// offline. Strings from MLflow go through Jinja's autoescaping.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import multiprocessing
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd

from .. import tracking
from ..config import FIELDS
from ..runtime import die_with_parent
from .collect import ReportData, collect, read_histograms, read_summary
from .figures import Pick, all_figures, telling_runs
from .papers import section
from .runpage import page_names, run_figure, slug

SUMMARY_COLUMNS = ["run_name", "activation", "depth", "width", "init", "remedy", "clip", "clip_threshold", "seed", "outcome",
                   "diagnosis", "test_acc", "first_last_ratio"]
RUN_PAGES = 100  # run pages drawn by default: every run of a grid this size, the telling ones of a bigger one
META = re.compile(r'<meta name="gradbench-(\w+)" content="([^"]*)">')


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
    )


def render(data: ReportData, n_configs: int, run_dir: str = "", pages: dict[str, str] | None = None) -> str:
    """The report page. `pages` maps run ids to their pages' file names inside `run_dir`."""
    pages = pages or {}
    anchors = page_names(data.runs)
    rows = data.runs.sort_values(["activation", "init", "remedy", "depth", "clip", "seed"]).to_dict("records")
    for row in rows:
        row["page"] = pages.get(row["run_id"], "")
        row["anchor"] = anchors[row["run_id"]][:-5]
    picks = [Pick(label, run, data.table(run.run_id), data.histograms(run.run_id))
             for label, run in telling_runs(data.runs)]
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
        figures=all_figures(data.runs, data.layers, data.signal, picks),
        paper=section(data.reproduces, data.runs, data.layers),
        columns=SUMMARY_COLUMNS,
        rows=rows,
        run_dir=run_dir,
        n_pages=len(pages),
        any_url=any(r["url"] for r in rows),
    )


def _run_page(job: tuple) -> str:
    """One run's page (a process-pool task: reading the run's tables and drawing its figure)."""
    run, artifacts, grid, report_name, page = job
    table, _ = read_summary(artifacts, run.run_id)
    hist = read_histograms(artifacts, run.run_id)
    figure = None if table is None or table.empty else run_figure(run, table, hist)
    return _environment().get_template("run.html.j2").render(
        run=run, grid=grid, report_name=report_name, page_key=page[:-5], figure=figure,
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


@contextlib.contextmanager
def drawing_run_pages(data: ReportData, folder: Path, report_name: str,
                      limit: int | None = RUN_PAGES) -> Iterator[dict[str, str]]:
    """Start drawing a page per run (up to `limit`, see runs_with_pages) on every core, yield run id
    -> page file name at once (the summary page is drawn meanwhile), and write the pages into
    `folder` when the block ends."""
    names = page_names(data.runs)
    jobs = [(run, data.artifacts, data.grid, report_name, names[run.run_id])
            for _, run in runs_with_pages(data.runs, limit).iterrows()]
    pages = {job[0].run_id: job[-1] for job in jobs}
    workers = min(os.cpu_count() or 1, len(jobs))
    if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        # fork: the workers inherit the imported modules (and FIGURE_CHECKS), so they start at once
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                 initializer=die_with_parent) as pool:  # no page drawn on for a killed report
            try:
                drawn = pool.map(_run_page, jobs, chunksize=max(1, len(jobs) // (4 * workers)))
                yield pages
                htmls = list(drawn)
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    else:
        yield pages
        htmls = [_run_page(job) for job in jobs]
    for job, html in zip(jobs, htmls):
        (folder / job[-1]).write_text(html, encoding="utf-8")


def build_report(experiment: str = tracking.EXPERIMENT, grid_run_id: str | None = None,
                 out_dir: str | os.PathLike = "reports", run_pages: int | None = RUN_PAGES) -> Path:
    """Write <out_dir>/<grid>-<date>.html with a page per run in <out_dir>/<grid>-<date>/, refresh
    <out_dir>/index.html, and log the report to the grid's parent run. Each file appears whole or
    not at all (written aside, then renamed). File names are slugs of the grid's name: a name never
    leaves out_dir. `run_pages`: at most that many run pages (None: one for every run)."""
    with tempfile.TemporaryDirectory(prefix="gradbench-report-") as downloads:  # artifacts of a remote store
        return _build(collect(experiment, grid_run_id, downloads), Path(out_dir), run_pages)


def _build(data: ReportData, out_dir: Path, run_pages: int | None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{slug(data.grid)}-{dt.date.today().isoformat()}"
    path = out_dir / f"{stem}.html"
    staging = Path(tempfile.mkdtemp(prefix=f".{stem}.", dir=out_dir))
    try:
        with drawing_run_pages(data, staging, path.name, run_pages) as pages:
            if len(pages) < len(data.runs):
                data.missing.insert(0, f"run pages for {len(data.runs) - len(pages)} of {len(data.runs)} runs: drawn "
                                       f"for the {len(pages)} most telling (the runs of the figures, the diverged "
                                       "ones, then the most vanishing or exploding); `gradbench report --run-pages "
                                       "all` draws every one (about 0.5 s of a core each)")
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
