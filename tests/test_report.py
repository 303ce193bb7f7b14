"""The report stage, from a real MLflow store, and the report and MLflow UI in headless Chromium."""

import base64
import functools
import io
import json
import operator
import os
import re
from pathlib import Path

import matplotlib
import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from pipeline.cli import cli
from pipeline.config import GridSpec
from pipeline.grid import run_grid
from pipeline.report import figures, seaborn_figures, svg
from pipeline.report.runpage import slug
from pipeline.report.workers import Seaborn, draw, workers
from tests.conftest import MlflowServer

TINY_BASE = {"depth": 4, "width": 16, "train_subset": 640, "batch_size": 64, "max_steps": 8, "log_every": 2}
SPEC = {
    "name": "tiny",
    "base": TINY_BASE,
    "axes": {"activation": ["relu", "tanh"], "init": ["default", "he_normal"],
             "clipping": [{"clip": "none"}, {"clip": "norm", "clip_threshold": 0.5}]},
    "include": [{"activation": "relu", "init": "default", "norm": "batch"},
                {"activation": "tanh", "init": "default", "residual": "skipinit"}],
}
FIGURES = ["accuracy", "gradient-flow", "signal", "gradient-signal", "jacobian", "remedies", "layer-step", "histograms", "training", "clipping", "outcomes"]
SVG_FIGURES = ["gradient-flow", "signal", "gradient-signal", "jacobian", "layer-step", "histograms", "training", "outcomes"]  # the others: PNG
# What each figure's caption must name (a figure says what its caption says).
CAPTION_NAMES = {"accuracy": "test accuracy", "gradient-flow": "dL/dh", "remedies": "normalization",
                 "jacobian": "singular value",
                 "signal": "correlation", "gradient-signal": "GSNR", "layer-step": "each layer",
                 "histograms": "log10|dL/dW|", "training": "loss", "clipping": "clipping", "outcomes": "diagnosed"}
ARTIFACTS = Path(os.environ.get("GRADBENCH_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


def make_grid(tmp_path, mnist_dir, store, spec=SPEC):
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return run_grid(GridSpec.from_yaml(path), str(mnist_dir), experiment=store, echo=lambda s: None, progress=False)


def report_cli(store, out_dir, *extra):
    return CliRunner().invoke(cli, ["report", "--experiment", store, "--out-dir", str(out_dir), *extra])


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory, mnist_dir, tracking_uri):
    """One tiny grid (10 runs) and its report, shared by the tests that only read them."""
    tmp = tmp_path_factory.mktemp("report")
    client = MlflowClient(tracking_uri)
    store = "report-tiny"
    client.create_experiment(store, artifact_location=(tmp / "artifacts").as_uri())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        # every figure of the report and of the run pages must pass the legibility check (the SVG
        # ones' overlaps are checked in Chromium)
        mp.setattr(seaborn_figures, "FIGURE_CHECKS", [seaborn_figures.check_legible])
        mp.setattr(svg, "CHECKS", [figures.check_panel])
        grid = make_grid(tmp, mnist_dir, store)
        # A run name is user data: it must come out of the report as text, never as markup.
        victim = grid.summaries[0].run_id
        client.set_tag(victim, "mlflow.runName", "<script>alert(1)</script>")
        result = report_cli(store, tmp / "reports")
    assert result.exit_code == 0, result.output
    (html,) = (tmp / "reports").glob("tiny-*.html")
    return html, grid, client


def test_report_has_every_section_and_is_logged_to_the_grid_run(tiny_report):
    html, grid, client = tiny_report
    text = html.read_text()
    for key in FIGURES:
        assert f'<figure id="{key}">' in text, key
        block = text.split(f'<figure id="{key}">', 1)[1].split("</figure>", 1)[0]
        if key in SVG_FIGURES:
            assert block.count("<svg ") == 1 and "<img " not in block, key
        else:
            assert block.count('<img alt=') == 1 and "<svg " not in block, key
    assert text.count("<tr>") == 1 + 10  # header + one row per configuration
    # SkipInit's blocks get no gradient at step 0: said, not drawn as a level line
    assert "Left out: default + SkipInit" in text
    assert "Grid <strong>tiny</strong> in experiment <strong>report-tiny</strong>" in text
    artifacts = [a.path for a in client.list_artifacts(grid.parent_run_id, "report")]
    assert artifacts == [f"report/{html.name}"]


def test_every_figure_is_non_empty_and_its_caption_names_what_it_shows(tiny_report):
    text = tiny_report[0].read_text()
    for key in FIGURES:
        block = text.split(f'<figure id="{key}">', 1)[1].split("</figure>", 1)[0]
        width = re.search(r'<(?:img|svg) [^>]*width="(\d+)"', block).group(1)  # the figure's, in CSS px
        assert int(width) > 200, key
        if key in SVG_FIGURES:
            marks = re.findall(r'<(?:polyline|image|circle) |<rect [^>]*fill="#', block)  # lines, images, dots, bars
            assert len(marks) >= 6, key
        caption = block.split("<figcaption>", 1)[1]
        assert CAPTION_NAMES[key] in caption, key


def test_every_run_has_its_own_page_linked_from_the_summary(tiny_report):
    html, grid, _ = tiny_report
    text = html.read_text()
    folder = html.with_suffix("")
    pages = sorted(folder.glob("*.html"))
    assert len(pages) == 10
    for page in pages:
        assert f'href="{folder.name}/{page.name}"' in text
        assert f'id="run-{page.stem}"' in text  # addressable from the summary row
        body = page.read_text()
        assert body.count("<svg ") == 1 and body.count("<polyline ") >= 2 and "Diagnosis" in body
        assert f'href="../{html.name}#run-{page.stem}"' in body
    assert {p.name for p in html.parent.iterdir() if p.name.startswith(".")} == set()  # nothing half-written


def test_a_run_page_heatmap_is_its_summary_table_in_magma(tiny_report):
    """The page's "where and when" image, decoded: one pixel per layer (rows, layer 0 at the bottom)
    and step, each the magma colour of its log10 ||dL/dh|| between the table's min and max,
    recomputed here from the run's own summary.parquet in MLflow."""
    html, grid, client = tiny_report
    summary = next(s for s in grid.summaries if s.outcome == "completed")
    name = client.get_run(summary.run_id).info.run_name
    body = (html.with_suffix("") / f"{slug(name)}.html").read_text()
    first_image = re.search(r'<image [^>]*href="data:image/png;base64,([^"]+)"', body).group(1)
    pixels = matplotlib.image.imread(io.BytesIO(base64.b64decode(first_image)), format="png") * 255
    table = pd.read_parquet(client.download_artifacts(summary.run_id, "gradients/summary.parquet"))
    every_layer = table.groupby("step").layer.transform("size") == table.layer.max() + 1
    values = np.log10(table[every_layer].pivot(index="layer", columns="step", values="backprop_norm").to_numpy())
    assert pixels.shape == (*values.shape, 4)
    expected = matplotlib.colormaps["magma"]((values - values.min()) / (values.max() - values.min()))
    np.testing.assert_allclose(pixels[::-1] / 255, expected, atol=1 / 255 + 1e-9)


def test_svg_panels_map_data_to_pixels_and_break_lines_at_nan():
    panel = svg.Panel(10, 20, 100, 50, xlim=(0, 4), ylim=(-1, 1))
    np.testing.assert_allclose(panel.px([0, 2, 4]), [10, 60, 110])
    np.testing.assert_allclose(panel.py([-1, 0, 1]), [70, 45, 20])  # y grows upwards
    panel.line([0, 1, 2, 3, 4], [0, 1, np.nan, 0, 1], "red")
    assert panel.svg().count("<polyline") == 2
    assert all(-1 <= t <= 1 for t in svg.ticks(-1, 1)) and len(svg.ticks(-1, 1)) >= 3
    assert svg.limits([np.nan, np.inf]) == (0.0, 1.0) and svg.limits([3, 3]) == (2.5, 3.5)
    lo, hi = svg.limits([5.4e18])  # a diverged run's one finite loss: the panel still has a height
    assert lo < 5.4e18 < hi and np.isfinite(svg.Panel(0, 0, 10, 10, (0, 1), (lo, hi)).py(5.4e18))
    assert svg.power_label(-2) == "0.01" and svg.power_label(np.log10(2)) == "2"
    assert list(map(svg.power_label, svg.log_ticks(np.log10(0.12), np.log10(2.2)))) == ["0.2", "0.5", "1", "2"]
    assert list(map(svg.power_label, svg.log_ticks(0, 18.7))) == ["1", "10000", "1e+08", "1e+12", "1e+16"]


def test_a_report_sweeps_what_a_killed_report_left_half_written(tiny_report, tracking_uri, tmp_path, monkeypatch):
    """A report killed with -9 leaves its hidden staging folder (or temp file) behind; the next
    report in that folder removes those whose process on this host is gone, and nothing else."""
    import subprocess
    import sys

    from pipeline.report import _HOST as host

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    dead = tmp_path / f".tiny-2026-01-01.{host}-{gone}.k2j4_9xa"
    (dead / "a.html").parent.mkdir()
    (dead / "a.html").write_text("half")
    dead_file = tmp_path / f".index.html.{host}-{gone}.q8w2e1rt"
    dead_file.write_text("half")
    alive = tmp_path / f".tiny-2026-01-01.{host}-{os.getppid()}.p0o9i8u7"  # a live process's: being written
    alive.mkdir()
    elsewhere = tmp_path / f".tiny-2026-01-01.otherhost-{gone}.z1x2c3v4"  # another machine's: not ours to judge
    elsewhere.mkdir()
    assert report_cli("report-tiny", tmp_path, "--run-pages", "0").exit_code == 0
    assert not dead.exists() and not dead_file.exists()
    assert alive.exists() and elsewhere.exists()


def test_index_lists_every_report_newest_first(tiny_report):
    html = tiny_report[0]
    index = (html.parent / "index.html").read_text()
    assert f'<a href="{html.name}">' in index and "<td>tiny</td>" in index and "<td>report-tiny</td>" in index


def test_gradient_flow_lines_are_the_logged_step0_norms(tiny_report):
    """The summary's gradient-flow SVG, read back: in the relu panel of its top row, the default and
    he_normal lines (one plain, unclipped run each) lie, point for point, on one affine map of the
    log10 ||dL/dh|| per layer that the runs logged to MLflow at step 0."""
    html, grid, client = tiny_report
    text = html.read_text()
    block = text.split('<figure id="gradient-flow">', 1)[1].split("</figure>", 1)[0]
    panel = block.split('<g clip-path="url(#gradient-flow-0-0)">', 1)[1].split("</g>", 1)[0]  # row 0: relu
    measured, expected = [], []
    for init in ("default", "he_normal"):
        points = re.search(rf'<polyline points="([^"]+)"[^>]*><title>{init}</title>', panel).group(1)
        measured.append([float(p.split(",")[1]) for p in points.split()])
        (run,) = [client.get_run(s.run_id) for s in grid.summaries
                  if client.get_run(s.run_id).data.params.get("activation") == "relu"
                  and client.get_run(s.run_id).data.params.get("init") == init
                  and client.get_run(s.run_id).data.params.get("clip") == "none"
                  and client.get_run(s.run_id).data.params.get("norm", "none") == "none"]
        layers = sorted(k for k in run.data.metrics if k.startswith("grad/backprop_norm/L"))
        norms = [next(m.value for m in client.get_metric_history(run.info.run_id, k) if m.step == 0) for k in layers]
        expected.append(np.log10(norms))
    y, v = np.concatenate(measured), np.concatenate(expected)
    assert len(measured[0]) == len(expected[0]) == TINY_BASE["depth"]
    slope, offset = np.polyfit(v, y, 1)
    assert slope < 0  # larger values are drawn higher up, at smaller y
    np.testing.assert_allclose(y, slope * v + offset, atol=0.15)  # drawn to 0.1 px


def test_draw_returns_results_in_task_order_from_both_kinds_of_worker_and_raises_a_tasks_error():
    tasks = [Seaborn(operator.add, 1, 2), functools.partial(operator.mul, 3, 4), Seaborn(str.upper, "a"),
             functools.partial(pow, 2, 5)]
    with workers() as drawing:
        if drawing is None:
            pytest.skip("one core or no fork: everything is drawn in the report's process")
        assert draw(tasks, drawing) == [3, 12, "A", 32]
        assert draw([Seaborn(os.getpid), functools.partial(os.getpid)], drawing)[0] != os.getpid()  # elsewhere
    for failing in (Seaborn(operator.truediv, 1, 0), functools.partial(operator.truediv, 1, 0)):
        with pytest.raises(ZeroDivisionError), workers() as drawing:
            draw([failing, functools.partial(abs, -1)], drawing)


def test_the_legibility_check_catches_overlaps_and_linear_decades():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.text(0.5, 0.5, "one label")
    ax.text(0.5, 0.5, "another label")
    with pytest.raises(figures.IllegibleFigure, match="overlaps"):
        seaborn_figures.check_legible(fig)
    plt.close(fig)
    fig, ax = plt.subplots()
    ax.plot([0, 1, 2], [1.0, 10.0, 1e5])
    with pytest.raises(figures.IllegibleFigure, match="not log"):
        seaborn_figures.check_legible(fig)
    ax.set_yscale("log")
    seaborn_figures.check_legible(fig)
    plt.close(fig)
    fig, ax = plt.subplots(layout="constrained")  # not cropped when saved: what lies beyond the edge is lost
    fig.text(0.98, 0.5, "past the edge")
    with pytest.raises(figures.IllegibleFigure, match="cut off"):
        seaborn_figures.check_legible(fig)
    plt.close(fig)
    panel = svg.Panel(0, 0, 100, 100, (0, 2), (0, 2e5))
    panel.line([0, 1, 2], [1.0, 10.0, 1e5], "red")
    with pytest.raises(figures.IllegibleFigure, match="not log"):
        figures.check_panel(panel, log_y=False)
    figures.check_panel(panel, log_y=True)


def test_strings_from_mlflow_are_escaped(tiny_report):
    html = tiny_report[0]
    text = html.read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<script>alert(1)</script>" not in text
    (page,) = [p for p in html.with_suffix("").glob("*.html") if "alert" in p.read_text()]
    body = page.read_text()  # its title, heading and the SVG's aria-label
    assert body.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 3 and "<script>" not in body


def test_report_is_self_contained(tiny_report):
    html = tiny_report[0]
    for page in [html, *html.with_suffix("").glob("*.html")]:
        body = page.read_text().split("<body>", 1)[1].replace('xmlns="http://www.w3.org/2000/svg"', "")  # a name
        for reference in ("http://", "https://", 'src="/'):
            assert reference not in body, (page.name, reference)
        assert re.findall(r"url\((?!#)", body) == [], page.name  # url(#id): a clip path in the page itself


def test_empty_experiment_is_a_clear_message(store, tmp_path):
    result = report_cli(store, tmp_path)
    assert result.exit_code == 1
    assert "has no grid runs" in result.output and "Traceback" not in result.output
    unknown = report_cli("no-such-experiment-xyz", tmp_path)
    assert unknown.exit_code == 1 and "no experiment 'no-such-experiment-xyz'" in unknown.output
    bad_id = report_cli(store, tmp_path, "--grid-run", "0" * 32)
    assert bad_id.exit_code == 1 and "no run" in bad_id.output


def test_grid_without_finished_runs_reports_what_is_missing(store, tmp_path, mnist_dir):
    from pipeline import tracking

    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps(SPEC))
    client = tracking.get_client()
    _, parent = tracking.open_grid_run(client, GridSpec.from_yaml(path), store)  # a grid killed before any run
    tracking.close_grid_run(client, parent, {}, 0.0, "KILLED")
    result = report_cli(store, tmp_path / "out")
    assert result.exit_code == 0, result.output
    text = next((tmp_path / "out").glob("tiny-*.html")).read_text()
    assert "has no finished runs" in text and text.count("no finished run</li>") == 10


def test_run_missing_its_statistics_artifact_is_named(store, tmp_path, mnist_dir):
    grid = make_grid(tmp_path, mnist_dir, store, {**SPEC, "axes": {"activation": ["relu", "tanh"]}})
    older, victim = (MlflowClient().get_run(s.run_id) for s in grid.summaries[:2])
    # a run recorded before gradbench wrote summary.parquet: drawn from its full layer table
    folder = Path(older.info.artifact_uri.removeprefix("file://")) / "gradients"
    (folder / "summary.parquet").unlink()
    folder = Path(victim.info.artifact_uri.removeprefix("file://")) / "gradients"
    (folder / "summary.parquet").unlink()
    (folder / "layer_stats.parquet").unlink()
    result = report_cli(store, tmp_path / "out")
    assert result.exit_code == 0, result.output
    html = next((tmp_path / "out").glob("tiny-*.html"))
    text = html.read_text()
    assert f"{victim.info.run_name}: no gradients/summary.parquet or gradients/layer_stats.parquet artifact" in text
    assert older.info.run_name not in text.split("Not shown")[1].split("</div>")[0]
    page = html.with_suffix("") / f"{older.info.run_name}.html"
    assert page.read_text().count("<svg ") == 1


def test_run_pages_beyond_the_limit_go_to_the_most_telling_runs(tiny_report, tracking_uri, tmp_path, monkeypatch):
    html, grid, client = tiny_report
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    assert report_cli("report-tiny", tmp_path, "--run-pages", "x3").exit_code == 2
    result = report_cli("report-tiny", tmp_path, "--run-pages", "3")
    assert result.exit_code == 0, result.output
    (capped,) = tmp_path.glob("tiny-*.html")
    text = capped.read_text()
    pages = {p.stem for p in capped.with_suffix("").glob("*.html")}
    assert len(pages) == 3 and "run pages for 7 of 10 runs" in text
    # the most vanishing and the most exploding run (of the figures) have theirs
    runs = [client.get_run(r.run_id) for r in grid.summaries if r.outcome != "diverged"]
    ratio = {slug(r.info.run_name): r.data.metrics["grad/first_last_ratio_init"] for r in runs}
    for extreme in (min(ratio.values()), max(ratio.values())):  # clipped twins tie at step 0
        assert {name for name, r in ratio.items() if r == extreme} & pages
    # every summary row stays addressable, linked or not
    assert len(re.findall(r'<td id="run-', text)) == 10
    assert sum(f'href="{capped.stem}/{p}.html"' in text for p in pages) == 3


# -- in a real browser ------------------------------------------------------------------------------


OVERLAPPING_TEXTS = """() => {
  const boxes = Array.from(document.querySelectorAll('svg text')).map(t => [t.textContent, t.getBoundingClientRect()]);
  const found = [];
  boxes.forEach(([a, p], i) => boxes.slice(i + 1).forEach(([b, q]) => {
    const dx = Math.min(p.right, q.right) - Math.max(p.left, q.left), dy = Math.min(p.bottom, q.bottom) - Math.max(p.top, q.top);
    if (dx > 1 && dy > 2) found.push(a + ' / ' + b);  // touching edges are fine
  }));
  return found;
}"""


TEXTS_OUTSIDE = """() => Array.from(document.querySelectorAll('svg text')).filter(t => {
  const p = t.getBoundingClientRect(), q = t.ownerSVGElement.getBoundingClientRect();
  return p.left < q.left - 1 || p.right > q.right + 1 || p.top < q.top - 1 || p.bottom > q.bottom + 1;
}).map(t => t.textContent)"""


def test_the_svg_text_checks_find_overlapping_and_cut_texts(browser, tmp_path):
    drawing = svg.document(200, 100, [svg._text(50, 50, "hello"), svg._text(56, 52, "world"),
                                      svg._text(150, 90, "apart"), svg._text(195, 60, "cut off")],
                           "two texts on each other, one past the edge")
    (tmp_path / "o.html").write_text(f"<!DOCTYPE html><html><body>{drawing}</body></html>")
    page = browser.new_page()
    page.goto((tmp_path / "o.html").as_uri())
    assert page.evaluate(OVERLAPPING_TEXTS) == ["hello / world"]
    assert page.evaluate(TEXTS_OUTSIDE) == ["cut off"]
    page.close()


def test_report_renders_offline_in_chromium(tiny_report, browser, tmp_path):
    html = tiny_report[0]
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    errors, requests = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(html.as_uri())
    widths = page.evaluate("Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
    assert len(widths) == len(FIGURES) - len(SVG_FIGURES) and all(w > 0 for w in widths)
    # drawn at 2x: each image's pixels are twice the CSS width it is shown at (sharp when zoomed)
    shown = page.evaluate("Array.from(document.images).map(i => i.width)")
    assert all(n >= 1.9 * w for n, w in zip(widths, shown))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for key in FIGURES:  # one screenshot per section, kept as a test artifact
        page.locator(f"figure#{key}").screenshot(path=str(ARTIFACTS / f"report-{key}.png"))
        assert (ARTIFACTS / f"report-{key}.png").stat().st_size > 10_000, key
    # the SVG figures: their images decode, no two of their texts overlap, none is cut by the drawing's edge
    assert page.evaluate("Array.from(document.querySelectorAll('svg image')).every(i => i.getBBox().width > 0)")
    assert page.evaluate(OVERLAPPING_TEXTS) == []
    assert page.evaluate(TEXTS_OUTSIDE) == []
    assert errors == []
    assert requests == [html.as_uri()]  # the page itself, nothing else
    # the summary table sorts on click: test accuracy ascending, then descending
    header = page.locator("#summary th", has_text="test_acc")
    header.click()
    col = page.evaluate("Array.from(document.querySelectorAll('#summary th')).findIndex(h => h.textContent == 'test_acc')")
    values = page.evaluate(f"Array.from(document.querySelectorAll('#summary tbody tr')).map(r => parseFloat(r.cells[{col}].textContent))")
    assert values == sorted(values)
    page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
    assert (ARTIFACTS / "report.png").stat().st_size > 50_000
    for run_page in sorted(html.with_suffix("").glob("*.html")):
        page.goto(run_page.as_uri())
        # the hand-drawn SVG: its images decode, and no two of its texts overlap as Chromium lays them out
        assert page.evaluate("Array.from(document.querySelectorAll('svg image')).every(i => i.getBBox().width > 0)")
        overlaps = page.evaluate(OVERLAPPING_TEXTS)
        assert overlaps == [], (run_page.name, overlaps)
        assert page.evaluate(TEXTS_OUTSIDE) == [], run_page.name
    page.screenshot(path=str(ARTIFACTS / "run-page.png"), full_page=True)
    assert errors == []
    page.close()


@pytest.fixture
def mlflow_server(tracking_uri, tmp_path):
    server = MlflowServer(tracking_uri, tmp_path / "served-artifacts")
    yield server.url
    server.stop()


@pytest.mark.e2e
def test_mlflow_ui_lists_the_grid_and_offers_layer_metrics(tiny_report, browser, mlflow_server, tmp_path):
    _, grid, client = tiny_report
    parent = client.get_run(grid.parent_run_id)
    exp_id = parent.info.experiment_id
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(f"{mlflow_server}/#/experiments/{exp_id}/runs")
    page.wait_for_selector("text=tiny", timeout=60_000)  # the grid's parent run, children nested under it
    page.screenshot(path=str(tmp_path / "experiment.png"))
    kids = [s.run_id for s in grid.summaries[:3]]
    page.goto(f"{mlflow_server}/#/compare-runs?runs={json.dumps(kids)}&experiments={json.dumps([exp_id])}")
    page.wait_for_selector("text=grad/backprop_norm/L00", timeout=120_000)  # the UI is slow under CI load
    body = page.inner_text("body")
    # the metric table is virtualized: the first screenful holds these, in alphabetical order
    for name in ("clip/active", "grad/backprop_norm/L01", "grad/backprop_norm/L03"):
        assert name in body, name
    page.close()
