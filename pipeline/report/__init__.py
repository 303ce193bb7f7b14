"""report stage: one self-contained HTML page per grid, from what MLflow holds.

    gradbench report [--grid-run RUN_ID]        # -> reports/<grid>-<date>.html, and an artifact of the grid run

Every figure is a seaborn PNG inlined as a data: URI; the page makes no network request and opens
from file:// offline. Strings from MLflow go through Jinja's autoescaping.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from pathlib import Path

import jinja2

from .. import tracking
from .collect import ReportData, collect
from .figures import all_figures
from .papers import section

SUMMARY_COLUMNS = ["run_name", "activation", "depth", "width", "init", "clip", "clip_threshold", "seed", "outcome",
                   "diagnosis", "test_acc", "first_last_ratio"]


def render(data: ReportData, n_configs: int) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
    )
    rows = data.runs.sort_values(["activation", "init", "depth", "clip", "seed"]).to_dict("records")
    return env.get_template("template.html.j2").render(
        grid=data.grid,
        experiment=data.experiment,
        parent_run_id=data.parent_run_id,
        n_runs=len(data.runs),
        n_configs=n_configs,
        generated=dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        tracking_uri=tracking.tracking_uri(),
        missing=data.missing,
        figures=all_figures(data.runs, data.layers),
        paper=section(data.reproduces, data.runs, data.layers),
        columns=SUMMARY_COLUMNS,
        rows=rows,
        any_url=any(r["url"] for r in rows),
    )


def build_report(experiment: str = tracking.EXPERIMENT, grid_run_id: str | None = None,
                 out_dir: str | os.PathLike = "reports") -> Path:
    """Write reports/<grid>-<date>.html (atomically) and log it to the grid's parent run."""
    data = collect(experiment, grid_run_id)
    html = render(data, n_configs=len(data.runs) + sum("no finished run" in m for m in data.missing))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{data.grid}-{dt.date.today().isoformat()}.html"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=out_dir)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(html)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is for reading
    os.replace(tmp, path)
    tracking.log_report(tracking.get_client(), data.parent_run_id, path)
    return path
