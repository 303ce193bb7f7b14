"""The report stage. Fast tier: every summary figure drawn in this process from a synthetic store
(benchmarks/perf/synthetic_store.py, read back through collect), checked for legibility, its
numbers against the data, its caption in the template; the run page. End-to-end tier (--e2e): a
real tiny grid, its report through the CLI, and the report and MLflow UI in headless Chromium."""

import base64
import functools
import importlib.util
import io
import json
import math
import operator
import os
import re
from pathlib import Path

import matplotlib
import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from matplotlib.backends.backend_agg import FigureCanvasAgg
from mlflow import MlflowClient

from pipeline import theory
from pipeline.cli import cli
from pipeline.config import GridSpec, RunConfig, from_dict
from pipeline.grid import run_grid
from pipeline.report import _run_page, figure, render
from pipeline.report.collect import collect
from pipeline.report.figures import Pick, drawn, figure_tasks, telling_runs, time_tasks
from pipeline.report.runpage import page_names, slug
from pipeline.report.workers import Seaborn, draw, workers
from pipeline.run import profile_table
from tests.conftest import REPO, MlflowServer

TINY_BASE = {"depth": 4, "width": 16, "train_subset": 640, "batch_size": 64, "max_steps": 8, "log_every": 2}
SPEC = {
    "name": "tiny",
    "base": TINY_BASE,
    "axes": {"activation": ["relu", "tanh"], "init": ["default", "he_normal"],
             "clipping": [{"clip": "none"}, {"clip": "norm", "clip_threshold": 0.5}]},
    "include": [{"activation": "relu", "init": "default", "norm": "batch"},
                {"activation": "tanh", "init": "default", "residual": "skipinit"}],
}
# the synthetic grid of the fast tier: made-up statistics in the real layout, 18 runs
SYNTHETIC = {"name": "synthetic-grid", "base": {"width": 16},
             "axes": {"activation": ["relu", "tanh"], "init": ["default", "he_normal"], "depth": [3, 6],
                      "clip": ["none", "norm"]},
             "include": [{"activation": "relu", "init": "default", "depth": 6, "norm": "batch"},
                         {"activation": "tanh", "init": "default", "depth": 6, "residual": "skipinit"}]}
FIGURES = ["accuracy", "gradient-flow", "signal", "gradient-signal", "jacobian", "remedies", "layer-step", "histograms",
           "training", "clipping", "outcomes"]
PAPER_FIGURES = ["schoenholz", "yang2019", "depth", "pennington2017"]
# What each figure's caption must name (a figure says what its caption says).
CAPTION_NAMES = {"accuracy": "test accuracy", "gradient-flow": "dL/dh", "remedies": "normalization",
                 "jacobian": "singular value", "signal": "correlation", "gradient-signal": "GSNR",
                 "layer-step": "each layer", "histograms": "log10|dL/dW|", "training": "loss", "clipping": "clipping",
                 "outcomes": "diagnosed", "schoenholz": "xi_c", "yang2019": "BatchNorm", "depth": "depth",
                 "pennington2017": "singular values"}
ARTIFACTS = Path(os.environ.get("GRADBENCH_TEST_ARTIFACTS", REPO / "test-artifacts"))


def report_cli(store, out_dir, *extra):
    return CliRunner().invoke(cli, ["report", "--experiment", store, "--out-dir", str(out_dir), *extra])


def _synthetic_store():
    path = REPO / "benchmarks" / "perf" / "synthetic_store.py"
    spec = importlib.util.spec_from_file_location("synthetic_store", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, tracking_uri):
    """A synthetic grid of 18 runs in the session's store, and what collect reads of it."""
    tmp = tmp_path_factory.mktemp("synthetic")
    MlflowClient(tracking_uri).create_experiment("report-synthetic", artifact_location=(tmp / "artifacts").as_uri())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        _synthetic_store().build(18, 30, "report-synthetic", echo=lambda line: None,
                                 raw=json.loads(json.dumps(SYNTHETIC)))
        data = collect("report-synthetic", folder=str(tmp / "downloads"))
        yield data, MlflowClient(tracking_uri)


@pytest.fixture
def drawn_figures(monkeypatch):
    """The matplotlib figures that encode turns into Figures from now on, each checked for legibility."""
    found = []
    monkeypatch.setattr(figure, "FIGURE_CHECKS", [figure.check_legible, found.append])
    return found


def _picks(data):
    return [Pick(label, run, data.table(run.run_id), data.histograms(run.run_id))
            for label, run in telling_runs(data.runs)]


@pytest.fixture(scope="module")
def summary(synthetic):
    """Every summary figure of the synthetic grid, drawn here in this process (the legibility check
    sees each one): (the Figures, the matplotlib figures they were encoded from, by key)."""
    data, _ = synthetic
    tasks = figure_tasks(data.runs, data.layers, data.signal, _picks(data), data.profiles)
    assert all(isinstance(task, Seaborn) for task in tasks)  # every one drawn in a seaborn process
    drawn_here = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(figure, "FIGURE_CHECKS", [figure.check_legible, drawn_here.append])
        figures = [task() for task in tasks]
    assert None not in figures and len(drawn_here) == len(figures)
    return figures, {f.key: fig for f, fig in zip(figures, drawn_here)}


def _axes(fig, title: str):
    (ax,) = [ax for ax in fig.axes if ax.get_title() == title]
    return ax


def _lines(ax) -> dict[str, np.ndarray]:
    """label -> (x, y) of the labelled lines of an axes."""
    return {line.get_label(): np.array([line.get_xdata(), line.get_ydata()], dtype=float) for line in ax.get_lines()
            if not line.get_label().startswith("_")}


# -- fast tier: the figures, from a synthetic store ---------------------------------------------------


def test_every_summary_figure_is_legible_and_its_caption_says_what_it_shows(synthetic, summary):
    data, _ = synthetic
    figures, _ = summary
    assert [f.key for f in figures] == FIGURES
    html = render(data, len(data.runs), figures, None)
    for f in figures:
        block = html.split(f'<figure id="{f.key}">', 1)[1].split("</figure>", 1)[0]
        assert block.count("<img ") == 1 and f.width > 200 and base64.b64decode(f.png_base64)[:4] == b"\x89PNG"
        caption = block.split("<figcaption>", 1)[1].split("</figcaption>", 1)[0]
        assert CAPTION_NAMES[f.key] in caption and len(caption) > 100 + len(f.notes), f.key
    assert "<svg" not in html  # the summary draws no SVG


@pytest.mark.parametrize("key", ["gradient-flow", "signal", "gradient-signal", "training", "outcomes"])
def test_a_figure_that_does_not_fit_its_texts_fails_the_check(synthetic, summary, key):
    """The real figures, made illegible: at 0.4 of its width a figure runs its texts together."""
    fig = summary[1][key]
    FigureCanvasAgg(fig)  # encode closed it: pyplot took its canvas away
    size = fig.get_size_inches()
    fig.set_size_inches(size * [0.4, 1])
    try:
        with pytest.raises(figure.IllegibleFigure):
            figure.check_legible(fig)
    finally:
        fig.set_size_inches(size)


def test_every_paper_figure_has_its_caption():
    """A paper's figures are captioned by the same template as the summary's, by key."""
    from pipeline.report import _environment

    captions = _environment().get_template("captions.html.j2").make_module({"min_steps": 10})
    for key in PAPER_FIGURES:
        text = str(captions.caption(figure.Figure(key, "", "", 0)))
        assert CAPTION_NAMES[key] in text and len(text) > 80, key
    assert str(captions.caption(figure.Figure("no-such-key", "", "", 0, "a note"))).strip() == "a note"


def test_the_gradient_flow_draws_the_measured_means_and_the_logged_profile(synthetic, summary):
    """Its lines are the mean log10 norms of the runs at step 0; its predictions are the profiles the
    runs logged (theory/profile.parquet), anchored at the last hidden layer's measured mean, never
    recomputed; a run without a logged profile (SkipInit) has no prediction."""
    data, client = synthetic
    fig = summary[1]["gradient-flow"]
    deep = data.runs[(data.runs.depth == 6) & (data.runs["clip"] == "none")]
    predicted = 0
    for _, run in deep.iterrows():
        table = data.table(run.run_id)
        start = table[table.step == 0].sort_values("layer")
        lines = _lines(_axes(fig, f"||dL/dh|| - {run.activation}"))
        x, y = lines[run.setup]
        np.testing.assert_allclose(x, start.layer)
        np.testing.assert_allclose(y, np.log10(start.backprop_norm), rtol=1e-12)  # one run a setup: its own
        logged = client.download_artifacts(run.run_id, "theory/profile.parquet") if run.residual == "none" else None
        if logged is None:
            assert f"{run.setup}: prediction" not in lines
            continue
        profile = pd.read_parquet(logged)
        # the prediction logged is the one theory/slope_pred was fitted on
        slope = -np.polyfit(profile.layer, profile.log_norm, 1)[0]
        assert slope == pytest.approx(client.get_run(run.run_id).data.metrics["theory/slope_pred"], rel=1e-9)
        x, y = lines[f"{run.setup}: prediction"]
        anchor = np.log10(start.backprop_norm.iloc[-2])  # the last hidden layer's measured value
        np.testing.assert_allclose(x, profile.layer)
        np.testing.assert_allclose(y, anchor + profile.log_norm / math.log(10), rtol=1e-12)
        predicted += 1
    assert predicted == len(deep) - 1  # all but SkipInit's


def test_a_run_logs_the_profile_its_slope_pred_is_fitted_on_and_none_where_there_is_no_prediction():
    """run.profile_table: theory/profile.parquet, what the gradient-flow figure draws. A BatchNorm
    net's profile depends on the input moments the run measured; no hidden layer or SkipInit: none."""
    batch = RunConfig(activation="relu", depth=6, width=16, norm="batch")
    prediction = theory.predict(batch, 0.9, 0.6)
    profile = profile_table(prediction)
    assert list(profile.layer) == [0, 1, 2, 3, 4] and profile.log_norm.iloc[-1] == 0
    assert -np.polyfit(profile.layer, profile.log_norm, 1)[0] == pytest.approx(prediction.finite_slope, rel=1e-12)
    assert not np.allclose(profile.log_norm, theory.predict(batch).log_norms)  # default moments differ
    assert profile_table(theory.predict(RunConfig(depth=6, residual="skipinit"))) is None


def test_the_heatmaps_are_the_telling_runs_tables(synthetic, summary):
    """layer x step: each image is log10 ||dL/dh|| of its run's summary table, layer 0 in the bottom row."""
    data, _ = synthetic
    picks = _picks(data)
    fig = summary[1]["layer-step"]
    images = [ax.images[0] for ax in fig.axes if ax.images and ax.get_title()]
    assert len(images) == len(picks)
    for image, pick in zip(images, picks):
        table = pick.table
        every_layer = table.groupby("step").layer.transform("size") == table.layer.max() + 1
        expected = np.log10(table[every_layer].pivot(index="layer", columns="step", values="backprop_norm").to_numpy())
        np.testing.assert_allclose(image.get_array(), expected)
        assert image.origin == "lower"


def test_the_training_curves_are_the_mean_over_seeds_per_step(synthetic, summary):
    data, _ = synthetic
    fig = summary[1]["training"]
    deep = data.layers[(data.layers.depth == 6) & (data.layers["clip"] == "none") & (data.layers.layer == 0)]
    for activation in ("relu", "tanh"):
        ax = _axes(fig, f"loss - {activation}")
        mine = deep[deep.activation == activation]
        expected = {setup: rows.sort_values("step") for setup, rows in mine.groupby("setup")}
        curves = [line for line in ax.get_lines() if len(line.get_xdata()) > 1]
        assert len(curves) == len(expected)
        for line in curves:  # seaborn draws them in hue order
            matches = [rows for rows in expected.values() if np.allclose(line.get_ydata(), rows.loss)]
            assert len(matches) == 1 and np.array_equal(line.get_xdata(), matches[0].step)


def test_the_legibility_check_catches_overlaps_cut_texts_and_linear_decades():
    fig, ax = plt.subplots()
    ax.text(0.5, 0.5, "one label")
    ax.text(0.5, 0.5, "another label")
    with pytest.raises(figure.IllegibleFigure, match="overlaps"):
        figure.check_legible(fig)
    plt.close(fig)
    fig, ax = plt.subplots()
    ax.plot([0, 1, 2], [1.0, 10.0, 1e5])
    with pytest.raises(figure.IllegibleFigure, match="not log"):
        figure.check_legible(fig)
    ax.set_yscale("log")
    figure.check_legible(fig)
    plt.close(fig)
    fig, ax = plt.subplots(layout="constrained")  # not cropped when saved: what lies beyond the edge is lost
    fig.text(0.98, 0.5, "past the edge")
    with pytest.raises(figure.IllegibleFigure, match="cut off"):
        figure.check_legible(fig)
    plt.close(fig)
    fig = plt.figure(layout="constrained")  # a subfigure's title is a text of the figure too
    top, _ = fig.subfigures(2, 1)
    top.suptitle("a subfigure's title")
    fig.text(0.5, 0.98, "written over it", ha="center", va="top")
    with pytest.raises(figure.IllegibleFigure, match="subfigure's title"):
        figure.check_legible(fig)
    plt.close(fig)


def test_a_run_page_shows_the_runs_own_logged_gradient_flow_plot(synthetic):
    data, client = synthetic
    run = data.runs.iloc[0]
    page = _run_page(run, data.artifacts, data.grid, "report.html", page_names(data.runs)[run.run_id])
    logged = Path(client.download_artifacts(run.run_id, "plots/gradient_flow.png")).read_bytes()
    assert f'src="data:image/png;base64,{base64.b64encode(logged).decode()}"' in page
    assert page.count("<svg ") == 1 and page.count("<polyline ") >= 2  # the training panel's two lines
    assert page.count("<image ") >= 2  # the layer x step heatmap and the histograms


def test_draw_returns_results_in_task_order_and_raises_a_tasks_error():
    tasks = [Seaborn(operator.add, 1, 2), functools.partial(operator.mul, 3, 4), Seaborn(str.upper, "a")]
    assert draw(tasks, None) == [3, 12, "A"]  # one core: everything in this process
    with pytest.raises(ZeroDivisionError):
        draw([Seaborn(operator.truediv, 1, 0)], None)


@pytest.mark.e2e
def test_the_drawing_processes_return_results_in_task_order_and_raise_a_tasks_error():
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


# -- end-to-end tier: a real tiny grid and its report ---------------------------------------------------


def make_grid(tmp_path, mnist_dir, store, spec=SPEC):
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return run_grid(GridSpec.from_yaml(path), str(mnist_dir), experiment=store, echo=lambda s: None, progress=False)


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
        # every figure of the report must pass the legibility check (the seaborn process is forked
        # from this one: it inherits the check); the run pages' SVG texts are checked in Chromium
        mp.setattr(figure, "FIGURE_CHECKS", [figure.check_legible])
        grid = make_grid(tmp, mnist_dir, store)
        # A run name is user data: it must come out of the report as text, never as markup.
        victim = grid.summaries[0].run_id
        client.set_tag(victim, "mlflow.runName", "<script>alert(1)</script>")
        result = report_cli(store, tmp / "reports")
    assert result.exit_code == 0, result.output
    (html,) = (tmp / "reports").glob("tiny-*.html")
    return html, grid, client


@pytest.mark.e2e
def test_report_has_every_section_and_is_logged_to_the_grid_run(tiny_report):
    html, grid, client = tiny_report
    text = html.read_text()
    for key in FIGURES:
        block = text.split(f'<figure id="{key}">', 1)[1].split("</figure>", 1)[0]
        assert block.count("<img ") == 1 and "<svg " not in block, key
        assert CAPTION_NAMES[key] in block.split("<figcaption>", 1)[1], key
    assert text.count("<tr>") == 1 + 10  # header + one row per configuration
    # SkipInit's blocks get no gradient at step 0: said, not drawn as a level line
    assert "Left out: default + SkipInit" in text
    assert "Grid <strong>tiny</strong> in experiment <strong>report-tiny</strong>" in text
    artifacts = [a.path for a in client.list_artifacts(grid.parent_run_id, "report")]
    assert artifacts == [f"report/{html.name}"]


@pytest.mark.e2e
def test_the_gradient_flow_draws_the_logged_step0_norms_and_the_logged_prediction(
        tiny_report, tracking_uri, drawn_figures, monkeypatch, tmp_path):
    """From the real grid: each plain unclipped relu run's line is the log10 ||dL/dh|| per layer it
    logged to MLflow at step 0; the BatchNorm run's prediction is the profile it logged, whose slope
    fit is its theory/slope_pred, and which differs from a recomputation with default input moments
    (what the report drew before it read the run's own)."""
    _, grid, client = tiny_report
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    data = collect("report-tiny", folder=str(tmp_path))
    drawn("init_figures", "gradient_flow", data.layers, data.profiles)
    (fig,) = drawn_figures
    lines = _lines(_axes(fig, "||dL/dh|| - relu"))
    deep = data.runs[(data.runs.activation == "relu") & (data.runs["clip"] == "none")]
    for _, run in deep.iterrows():
        history = {k: client.get_metric_history(run.run_id, k) for k in client.get_run(run.run_id).data.metrics
                   if k.startswith("grad/backprop_norm/L")}
        logged = [next(m.value for m in history[k] if m.step == 0) for k in sorted(history)]
        assert len(logged) == TINY_BASE["depth"]
        np.testing.assert_allclose(lines[run.setup][1], np.log10(logged), rtol=1e-6)
    (batch,) = deep[deep["norm"] == "batch"].itertuples()
    profile = pd.read_parquet(client.download_artifacts(batch.run_id, "theory/profile.parquet"))
    collected = data.profiles[data.profiles.run_id == batch.run_id].sort_values("layer")
    np.testing.assert_array_equal(collected.log_norm, profile.log_norm)
    assert list(profile.layer) == list(range(TINY_BASE["depth"] - 1))
    slope = -np.polyfit(profile.layer, profile.log_norm, 1)[0]
    assert slope == pytest.approx(client.get_run(batch.run_id).data.metrics["theory/slope_pred"], rel=1e-9)
    x, y = lines[f"{batch.setup}: prediction"]
    anchor = lines[batch.setup][1][-2]  # the last hidden layer's measured log10 norm
    np.testing.assert_allclose(y, anchor + profile.log_norm / math.log(10), rtol=1e-9)
    config = from_dict(json.loads(Path(client.download_artifacts(batch.run_id, "config.json")).read_text()))
    default_moments = np.array(theory.predict(config).log_norms)
    assert np.abs(default_moments - profile.log_norm.to_numpy()).max() > 1e-3


@pytest.mark.e2e
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
        assert '<figure id="gradient-flow"><img ' in body  # the run's own plots/gradient_flow.png
        assert f'href="../{html.name}#run-{page.stem}"' in body
    assert {p.name for p in html.parent.iterdir() if p.name.startswith(".")} == set()  # nothing half-written


@pytest.mark.e2e
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


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_index_lists_every_report_newest_first(tiny_report):
    html = tiny_report[0]
    index = (html.parent / "index.html").read_text()
    assert f'<a href="{html.name}">' in index and "<td>tiny</td>" in index and "<td>report-tiny</td>" in index


@pytest.mark.e2e
def test_strings_from_mlflow_are_escaped(tiny_report):
    html = tiny_report[0]
    text = html.read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<script>alert(1)</script>" not in text
    (page,) = [p for p in html.with_suffix("").glob("*.html") if "alert" in p.read_text()]
    body = page.read_text()  # its title, heading, the images' alt text and the SVG's aria-label
    assert body.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 3 and "<script>" not in body


@pytest.mark.e2e
def test_report_is_self_contained(tiny_report):
    html = tiny_report[0]
    for page in [html, *html.with_suffix("").glob("*.html")]:
        body = page.read_text().split("<body>", 1)[1].replace('xmlns="http://www.w3.org/2000/svg"', "")  # a name
        for reference in ("http://", "https://", 'src="/'):
            assert reference not in body, (page.name, reference)
        assert re.findall(r"url\(", body) == [], page.name


@pytest.mark.e2e
def test_empty_experiment_is_a_clear_message(store, tmp_path):
    result = report_cli(store, tmp_path)
    assert result.exit_code == 1
    assert "has no grid runs" in result.output and "Traceback" not in result.output
    unknown = report_cli("no-such-experiment-xyz", tmp_path)
    assert unknown.exit_code == 1 and "no experiment 'no-such-experiment-xyz'" in unknown.output
    bad_id = report_cli(store, tmp_path, "--grid-run", "0" * 32)
    assert bad_id.exit_code == 1 and "no run" in bad_id.output


@pytest.mark.e2e
def test_grid_without_finished_runs_reports_what_is_missing(store, tmp_path):
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


@pytest.mark.e2e
def test_run_missing_its_statistics_artifact_is_named(store, tmp_path, mnist_dir):
    grid = make_grid(tmp_path, mnist_dir, store, {**SPEC, "axes": {"activation": ["relu", "tanh"]}})
    older, victim = (MlflowClient().get_run(s.run_id) for s in grid.summaries[:2])
    # a run recorded before gradbench wrote summary.parquet, its profile and its plot: drawn from its full layer table
    folder = Path(older.info.artifact_uri.removeprefix("file://"))
    for name in ("gradients/summary.parquet", "theory/profile.parquet", "plots/gradient_flow.png"):
        (folder / name).unlink()
    folder = Path(victim.info.artifact_uri.removeprefix("file://")) / "gradients"
    (folder / "summary.parquet").unlink()
    (folder / "layer_stats.parquet").unlink()
    result = report_cli(store, tmp_path / "out")
    assert result.exit_code == 0, result.output
    html = next((tmp_path / "out").glob("tiny-*.html"))
    text = html.read_text()
    assert f"{victim.info.run_name}: no gradients/summary.parquet or gradients/layer_stats.parquet artifact" in text
    assert older.info.run_name not in text.split("Not shown")[1].split("</div>")[0]
    page = (html.with_suffix("") / f"{older.info.run_name}.html").read_text()
    assert page.count("<svg ") == 1 and "This run logged no plots/gradient_flow.png" in page


@pytest.mark.e2e
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


# each image: decoded, drawn at 2x (its pixels twice the CSS width it is shown at), inside the page's width
IMAGES = """() => Array.from(document.images).map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0,
  ratio: i.naturalWidth / i.width, inside: i.getBoundingClientRect().right <= document.documentElement.clientWidth}))"""


@pytest.mark.e2e
def test_the_svg_text_checks_find_overlapping_and_cut_texts(browser, tmp_path):
    from pipeline.report import svg

    drawing = svg.document(200, 100, [svg.text(50, 50, "hello"), svg.text(56, 52, "world"),
                                      svg.text(150, 90, "apart"), svg.text(195, 60, "cut off")],
                           "two texts on each other, one past the edge")
    (tmp_path / "o.html").write_text(f"<!DOCTYPE html><html><body>{drawing}</body></html>")
    page = browser.new_page()
    page.goto((tmp_path / "o.html").as_uri())
    assert page.evaluate(OVERLAPPING_TEXTS) == ["hello / world"]
    assert page.evaluate(TEXTS_OUTSIDE) == ["cut off"]
    page.close()


@pytest.mark.e2e
def test_report_renders_offline_in_chromium(tiny_report, browser):
    html = tiny_report[0]
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    errors, requests = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(html.as_uri())
    images = page.evaluate(IMAGES)
    assert len(images) == len(FIGURES)
    for image in images:  # the summary's figures are PNGs at 2x that fit the page
        assert image["ok"] and image["ratio"] >= 1.9 and image["inside"], image
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for key in FIGURES:  # one screenshot per section, kept as a test artifact
        page.locator(f"figure#{key}").screenshot(path=str(ARTIFACTS / f"report-{key}.png"))
        assert (ARTIFACTS / f"report-{key}.png").stat().st_size > 10_000, key
    assert page.evaluate("document.querySelectorAll('svg').length") == 0
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
        assert [i["ok"] for i in page.evaluate(IMAGES)] == [True], run_page.name  # the run's own flow plot
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


# -- recurrent nets in a grid: the depth-wise figures leave them out, "Through time" draws them --------

RECURRENT_SPEC = {"name": "recurrent-mix", "base": {**TINY_BASE, "width": 8, "max_steps": 4, "train_subset": 256},
                  "axes": {"arch": ["mlp", "rnn", "lstm"]}, "seeds": [0, 1],
                  "include": [{"arch": "rnn", "init": "xavier_normal", "recurrent_gain": 1.5}]}
TIME_FIGURES = ["through-time", "time-slopes"]
TIME_CAPTIONS = {"through-time": "dL/dh_t", "time-slopes": "time/slope_measured"}


@pytest.fixture(scope="module")
def recurrent_grid(tmp_path_factory, mnist_dir, tracking_uri):
    """A real grid of MLP (depth 4), vanilla RNN and LSTM runs (width 8, 4 steps; 8 runs), its report
    through the CLI, and what collect reads of it (~20 s of a core: the e2e tier)."""
    tmp = tmp_path_factory.mktemp("recurrent")
    MlflowClient(tracking_uri).create_experiment("report-recurrent", artifact_location=(tmp / "artifacts").as_uri())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mp.setattr(figure, "FIGURE_CHECKS", [figure.check_legible])  # every figure of the report legible
        grid = make_grid(tmp, mnist_dir, "report-recurrent", RECURRENT_SPEC)
        result = report_cli("report-recurrent", tmp / "reports")
        data = collect("report-recurrent", folder=str(tmp / "downloads"))
    assert result.exit_code == 0, result.output
    (html,) = (tmp / "reports").glob("recurrent-mix-*.html")
    return html, grid, data, MlflowClient(tracking_uri)


@pytest.mark.e2e
def test_a_grid_with_recurrent_and_mlp_runs_has_a_through_time_section(recurrent_grid):
    html, grid, data, _ = recurrent_grid
    assert all(s.outcome != "failed" for s in grid.summaries) and len(data.runs) == 8
    text = html.read_text()
    section = text.split('<section id="through-time">', 1)[1].split("</section>", 1)[0]
    for key in TIME_FIGURES:
        block = section.split(f'<figure id="{key}">', 1)[1].split("</figure>", 1)[0]
        assert block.count("<img ") == 1 and TIME_CAPTIONS[key] in block.split("<figcaption>", 1)[1], key
    for key in ("accuracy", "gradient-flow", "training", "outcomes"):  # the MLPs' figures are still there
        assert f'<figure id="{key}">' in text.split('<section id="through-time">', 1)[0], key
    header = text.split('<table id="summary">', 1)[1].split("</thead>", 1)[0]
    assert ">arch</th>" in header and ">time_ratio</th>" in header


@pytest.mark.e2e
def test_the_depth_wise_figures_leave_the_recurrent_runs_out(recurrent_grid, drawn_figures):
    """A recurrent run's depth param (reset to 10) is no depth: with MLPs of depth 4 beside them, every
    figure about depth is drawn from the MLPs alone; the telling runs are MLPs; outcomes count the
    recurrent runs by arch, not by depth."""
    _, _, data, _ = recurrent_grid
    mlps = data.runs[data.runs.arch == "mlp"]
    assert set(data.runs.depth) == {4, 10} and len(mlps) == 2
    assert {run.run_id for _, run in telling_runs(data.runs)} <= set(mlps.run_id)
    picks = _picks(data)
    drawn_here = [task() for task in figure_tasks(data.runs, data.layers, data.signal, picks, data.profiles)]
    figures = {f.key: f for f in drawn_here if f is not None}
    by_key = dict(zip(figures, drawn_figures))
    assert figures["gradient-flow"].title.endswith("(depth 4)") and figures["training"].title.endswith("(depth 4)")
    start = data.layers[data.layers.run_id.isin(mlps.run_id) & (data.layers.step == 0)]
    (ax,) = [ax for ax in by_key["gradient-flow"].axes if ax.get_title().startswith("||dL/dh||")]
    lines = _lines(ax)
    assert set(lines) == {"default", "default: prediction"}  # one setup: the two MLP seeds, no recurrent run
    x, y = lines["default"]
    expected = start.assign(v=np.log10(start.backprop_norm.astype(float))).groupby("layer").v.mean()
    np.testing.assert_allclose(x, expected.index)
    np.testing.assert_allclose(y, expected.to_numpy(), rtol=1e-9)
    heatmap = by_key["accuracy"].axes[0]
    assert [t.get_text() for t in heatmap.get_xticklabels()] == ["4"]
    titles = [ax.get_title() for ax in by_key["outcomes"].axes]
    assert "by arch" in titles and "by depth (MLPs)" in titles
    (depth_ax,) = [ax for ax in by_key["outcomes"].axes if ax.get_title() == "by depth (MLPs)"]
    assert [t.get_text() for t in depth_ax.get_xticklabels()] == ["4"]
    assert sum(p.get_height() for p in depth_ax.patches) == len(mlps)


@pytest.mark.e2e
def test_the_through_time_figure_draws_the_logged_norms_and_the_logged_profile(recurrent_grid, drawn_figures):
    """Each family's line is the mean over seeds of log10 ||dL/dh_t|| its runs logged at step 0
    (gradients/time_stats.parquet); the dashed line beside a vanilla RNN's is the theory/time_profile
    it logged, anchored at the last time step, never recomputed; the LSTM has none."""
    _, _, data, client = recurrent_grid
    recurrent = data.runs[data.runs.arch != "mlp"]
    drawn("time_figures", "through_time", recurrent, data.time, data.time_profiles)
    drawn("time_figures", "time_slopes", recurrent)
    fig, slopes = drawn_figures
    predicted = 0
    for family, runs in recurrent.groupby("family"):
        arch = runs.arch.iloc[0]
        ax = _axes(fig, f"{arch} - rows (28 steps)")
        stats = pd.concat([pd.read_parquet(client.download_artifacts(r, "gradients/time_stats.parquet"))
                           for r in runs.run_id])
        mean = stats[stats.step == 0].assign(v=lambda f: np.log10(f.grad_norm.astype(float))).groupby("time").v.mean()
        x, y = _lines(ax)[family]
        np.testing.assert_allclose(x, mean.index)
        np.testing.assert_allclose(y, mean.to_numpy(), rtol=1e-9)
        profiles = [pd.read_parquet(client.download_artifacts(r, "theory/time_profile.parquet"))
                    for r in runs.run_id if arch == "rnn"]
        if arch == "lstm":
            assert data.time_profiles.run_id.isin(runs.run_id).sum() == 0
            continue
        profile = pd.concat(profiles).groupby("time").log_norm.mean()
        assert profile.iloc[-1] == 0 and len(profile) == 28
        theory_lines = [line for line in ax.get_lines() if line.get_linestyle() != "-"
                        and np.allclose(line.get_ydata(), mean.iloc[-1] + profile.to_numpy() / math.log(10),
                                        rtol=1e-9)]
        assert len(theory_lines) == 1 and np.array_equal(theory_lines[0].get_xdata(), profile.index)
        predicted += 1
    assert predicted == 2  # the two RNN families
    # the slope figure's crosses are the logged theory/time_slope_pred, the mean over a family's seeds
    (left,) = [ax for ax in slopes.axes if ax.get_xlabel().startswith("slope")]
    (crosses,) = [c for c in left.collections if c.get_label() == "mean-field prediction (logged)"]
    crosses = np.sort(np.asarray(crosses.get_offsets())[:, 0])
    expected = np.sort(recurrent[recurrent.arch == "rnn"].groupby("family").time_slope_pred.mean().to_numpy())
    np.testing.assert_allclose(crosses, expected, rtol=1e-9)


def test_an_mlp_only_grid_has_no_through_time_section(synthetic, summary):
    data, _ = synthetic
    assert not (data.runs.arch != "mlp").any() and data.time.empty
    assert time_tasks(data.runs, data.time, data.time_profiles) == []
    html = render(data, len(data.runs), summary[0], None)
    assert 'id="through-time"' not in html and ">arch</th>" not in html


@pytest.mark.e2e
def test_a_recurrent_run_page_shows_its_gradient_through_time(recurrent_grid):
    html, _, data, client = recurrent_grid
    run = data.runs[data.runs.arch == "rnn"].iloc[0]
    page = (html.with_suffix("") / page_names(data.runs)[run.run_id]).read_text()
    logged = Path(client.download_artifacts(run.run_id, "plots/gradient_flow_time.png")).read_bytes()
    assert f'src="data:image/png;base64,{base64.b64encode(logged).decode()}"' in page
    assert '<figure id="gradient-flow">' not in page and "output layer" not in page
    assert f"{run.time_slope_measured:.3g}" in page and "where and when, through time" in page


@pytest.mark.e2e
def test_a_grid_of_recurrent_runs_only_reports_through_time(store, tmp_path, mnist_dir):
    spec = {**RECURRENT_SPEC, "name": "recurrent-only", "axes": {"arch": ["rnn", "gru"]}, "seeds": [0],
            "include": []}
    make_grid(tmp_path, mnist_dir, store, spec)
    result = report_cli(store, tmp_path / "out")
    assert result.exit_code == 0, result.output
    text = next((tmp_path / "out").glob("recurrent-only-*.html")).read_text()
    assert all(f'<figure id="{key}">' in text for key in TIME_FIGURES)
    for key in ("gradient-flow", "accuracy", "training", "layer-step", "remedies"):
        assert f'<figure id="{key}">' not in text, key
