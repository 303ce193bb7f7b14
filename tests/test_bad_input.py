"""Bad input, table-driven: every case exits 2 (usage) with a message that names the culprit, never
a traceback, and leaves the store as it was (no run created, none left RUNNING).

More cases of each class live beside the feature they guard (test_cli, test_grid, test_data)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from tests.conftest import runs_of

SPEC_OK = "base: {depth: 3, width: 8, max_steps: 2, train_subset: 64, batch_size: 32}\n"
SPECS = {
    "not-utf8.yaml": b"\xff\xfe\x00 name: x\n",
    "int-key.yaml": SPEC_OK.encode() + b"axes:\n  1: [2]\n",
    "empty.yaml": b"",
    "name-null.yaml": b"name: null\nbase: {depth: 3}\n",
    "bn-last-one.yaml": b"name: bn\nbase: {norm: batch, batch_size: 64, train_subset: 641}\n",
    "reduced-bad.yaml": SPEC_OK.encode() + b"reduced: {max_steps: -1}\n",
    "only-name.yaml": b"name: nothing\n",
    "bad-yaml.yaml": b"axes: [unclosed\n",
    "list.yaml": b"- depth: 3\n",
    "axis-scalar.yaml": SPEC_OK.encode() + b"axes: {depth: 3}\n",
    "zero-seeds.yaml": SPEC_OK.encode() + b"seeds: 0\n",
    "include-typo.yaml": SPEC_OK.encode() + b"include: [{widht: 3}]\n",
    "nan.yaml": b"base: {lr: .nan}\n",
    "inf.yaml": b"axes: {init_std: [1.0, .inf]}\n",
    "unknown-paper.yaml": SPEC_OK.encode() + b"reproduces: smith1999\n",
    "bad-norm.yaml": SPEC_OK.encode() + b"axes: {norm: [none, group]}\n",
    "bad-reduced.yaml": SPEC_OK.encode() + b"reduced: {max_step: 1}\n",
    "alias-bomb.yaml": b"a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\ng: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]\naxes: {depth: *g}\n",  # a billion laughs: 10^7 values from 70 written
    "huge.yaml": SPEC_OK.encode() + b"# " + b"x" * 1_000_001 + b"\n",
    "many-seeds.yaml": SPEC_OK.encode() + b"seeds: 100000000\n",
    "many-configs.yaml": SPEC_OK.encode() + b"axes: {depth: [3, 4, 5, 6, 7, 8, 9, 10, 11, 12], width: [8, 9, 10, 11, 12, "
                         b"13, 14, 15, 16, 17]}\nseeds: 1001\n",
    "deep.yaml": SPEC_OK.encode() + b"axes: {depth: [3, 100000]}\n",
    "wide.yaml": SPEC_OK.encode() + b"axes: {width: [8, 10000000]}\n",
    "no-fit.yaml": b"base: {depth: 1000, width: 16384, device: cpu}\n",
    "seeds-neg.yaml": SPEC_OK.encode() + b"seeds: [0, -1]\n",
    "axes-key-typo.yaml": SPEC_OK.encode() + b"axes: {activaton: [relu]}\n",
    "unknown-top.yaml": SPEC_OK.encode() + b"basis: {depth: 3}\n",
    "name-list.yaml": SPEC_OK.encode() + b"axes: {depth: []}\n",
    # a grid name becomes a run name, a tag and part of a report's file name
    "name-up.yaml": SPEC_OK.encode() + b"name: ../../etc\n",
    "name-slash.yaml": SPEC_OK.encode() + b"name: a/b\n",
    "name-backslash.yaml": SPEC_OK.encode() + b"name: 'a\\\\b'\n",
    "name-long.yaml": SPEC_OK.encode() + b"name: " + b"x" * 10_000 + b"\n",
    "name-control.yaml": SPEC_OK.encode() + b'name: "bell\\aring"\n',
    "name-newline.yaml": SPEC_OK.encode() + b'name: "two\\nlines"\n',
    "name-dots.yaml": SPEC_OK.encode() + b"name: '..'\n",
    "tab\tin-file-name.yaml": SPEC_OK.encode(),  # no name: key, and its file's name is no grid name
    # device and precision errors found after expansion name the file and the key, as the others do
    "tf32-base.yaml": b"base: {depth: 3, precision: tf32, device: cpu}\n",
    "tf32-axis.yaml": b"base: {depth: 3, device: cpu}\naxes: {precision: [fp32, tf32]}\n",
    "tf32-include.yaml": b"base: {depth: 3, device: cpu}\ninclude: [{precision: tf32}]\n",
    "mps-base.yaml": b"base: {depth: 3, device: mps}\n",
    "ok.yaml": SPEC_OK.encode(),
}

# (command line, culprit named in the message); {tmp} is the test's folder, {afile} a plain file
CASES = [
    ("train --experiment ''", "--experiment"),
    ("train --experiment '   '", "--experiment"),
    ("train --experiment $'a\\nb'", "--experiment"),
    ("train --device mps", "--device"),
    ("train --device cuda:x", "--device"),
    ("train --data-dir {afile}/data", "--data-dir"),
    ("train --norm group", "--norm"),
    ("train --residual highway", "--residual"),
    ("train --residual plain --residual-scale -1", "--residual-scale"),
    ("train --bias-std nan", "--bias-std"),
    ("train --lr inf", "--lr"),
    ("train --lr -inf", "--lr"),
    ("train --init-std nan", "--init-std"),
    ("train --momentum 1", "--momentum"),
    ("train --depth 0", "--depth"),
    ("train --depth 2.5", "--depth"),
    ("train --width -3", "--width"),
    ("train --clip foo", "--clip"),
    ("train --precision fp8", "--precision"),
    ("train --optimizer rmsprop", "--optimizer"),
    ("train --activation swish", "--activation"),
    ("train --log-every -1", "--log-every"),
    ("train --batch-size 0", "--batch-size"),
    ("train --epochs 0", "--epochs"),
    ("train --max-steps -1", "--max-steps"),
    ("train --seed -1", "--seed"),
    ("train --train-subset 60001", "--train-subset"),
    ("train --source {tmp}/nowhere", "--source"),
    ("prepare --data-dir {afile}", "--data-dir"),
    ("prepare --source {afile}", "--source"),
    ("report --out-dir {afile}/reports", "--out-dir"),
    ("report --experiment ''", "--experiment"),
    ("grid {tmp}/no-such.yaml", "no-such.yaml"),
    ("grid {tmp}/not-utf8.yaml", "not UTF-8"),
    ("grid {tmp}/int-key.yaml", "axes.1"),
    ("grid {tmp}/empty.yaml", "empty"),
    ("grid {tmp}/only-name.yaml", "empty"),
    ("grid {tmp}/bad-yaml.yaml", "not valid YAML"),
    ("grid {tmp}/list.yaml", "mapping"),
    ("grid {tmp}/axis-scalar.yaml", "axes.depth"),
    ("grid {tmp}/zero-seeds.yaml", "seeds"),
    ("grid {tmp}/include-typo.yaml", "include.widht"),
    ("grid {tmp}/nan.yaml", "base.lr"),
    ("grid {tmp}/inf.yaml", "axes.init_std"),
    ("grid {tmp}/unknown-paper.yaml", "reproduces"),
    ("grid {tmp}/bad-norm.yaml", "axes.norm"),
    ("grid {tmp}/bad-reduced.yaml", "reduced.max_step"),
    ("grid {tmp}/bad-norm.yaml --workers 0", "--workers"),
    ("grid {tmp}/bad-norm.yaml --workers inf", "--workers"),
    ("grid {tmp}/bad-norm.yaml --workers 1.5", "--workers"),
    ("grid {tmp}/bad-norm.yaml --workers 100000", "1 to 256"),
    ("grid {tmp}/bad-norm.yaml --workers lots", "nor auto"),
    ("grid {tmp}/ok.yaml --overlap on --workers 2", "--overlap on records beside one local process"),
    ("grid {tmp}/empty.yaml --reduced", "empty"),
    # bounded resources: refused before any run exists, with the figures
    ("train --depth 100000", "--depth"),
    ("train --width 10000000", "--width"),
    ("train --batch-size 100000", "--batch-size"),
    ("train --depth 1000 --width 16384 --device cpu", "GiB"),
    ("train --arch lstm --sequence pixels --width 16384 --device cpu", "--width/--sequence: lstm of width 16384 over pixels"),
    ("train --arch rnn --recurrent-gain nan", "--recurrent-gain"),
    ("grid {tmp}/alias-bomb.yaml", "alias"),
    ("grid {tmp}/huge.yaml", "over the limit"),
    ("grid {tmp}/many-seeds.yaml", "seeds"),
    ("grid {tmp}/many-configs.yaml", "100,100 configurations"),
    ("grid {tmp}/deep.yaml", "axes.depth"),
    ("grid {tmp}/wide.yaml", "axes.width"),
    ("grid {tmp}/no-fit.yaml", "GiB"),
    ("grid {tmp}/seeds-neg.yaml", "seeds"),
    ("grid {tmp}/axes-key-typo.yaml", "activaton"),
    ("grid {tmp}/unknown-top.yaml", "basis"),
    ("grid {tmp}/name-list.yaml", "axes.depth"),
    ("grid {tmp}/name-null.yaml", "name: must be a non-empty string"),
    ("grid {tmp}/bn-last-one.yaml", "base.batch_size: BatchNorm needs at least 2 examples"),
    ("grid {tmp}/reduced-bad.yaml --reduced", "reduced.max_steps"),
    ("train --precision fp16 --device cuda", "--device"),
    ("train --precision tf32 --device cpu", "tf32 needs a CUDA GPU"),  # it would be fp32 under another name
    ("train --norm batch --batch-size 1", "BatchNorm needs at least 2 examples in every batch"),
    ("train --clip agc --clip-threshold 0", "--clip-threshold"),
    ("train --init-gain nan --init orthogonal", "--init-gain"),
    ("grid {tmp}/name-up.yaml", "name: no path separators or control characters, got '../../etc'"),
    ("grid {tmp}/name-slash.yaml", "name: no path separators"),
    ("grid {tmp}/name-backslash.yaml", "name: no path separators"),
    ("grid {tmp}/name-long.yaml", "name: at most 200 characters, got 10,000"),
    ("grid {tmp}/name-control.yaml", "name: no path separators or control characters"),
    ("grid {tmp}/name-newline.yaml", "name: no path separators or control characters"),
    ("grid {tmp}/name-dots.yaml", "name: not only dots"),
    ("grid '{tmp}/tab\tin-file-name.yaml'", "give a name: key"),
    ("grid {tmp}/name-up.yaml --reduced", "name: no path separators"),
    ("grid {tmp}/tf32-base.yaml", "tf32-base.yaml: base.precision: tf32 needs a CUDA GPU"),
    ("grid {tmp}/tf32-axis.yaml", "tf32-axis.yaml: axes.precision: tf32 needs a CUDA GPU"),
    ("grid {tmp}/tf32-include.yaml", "tf32-include.yaml: include[0].precision: tf32 needs"),
    ("grid {tmp}/mps-base.yaml", "mps-base.yaml: base.device: device 'mps'"),
    ("bench --device mps", "--device"),
    ("bench --out {afile}/perf.json", "--out"),
]


@pytest.mark.parametrize("line, culprit", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_usage_error_that_names_the_culprit(line, culprit, store, tmp_path, mnist_dir):
    import shlex

    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for name, content in SPECS.items():
        (tmp_path / name).write_bytes(content)
    args = shlex.split(line.replace("$'a\\nb'", "PLACEHOLDER").format(tmp=tmp_path, afile=afile))
    args = ["a\nb" if a == "PLACEHOLDER" else a for a in args]
    if args[0] in ("train", "grid") and "--data-dir" not in args:
        args += ["--data-dir", str(mnist_dir)]
    if "--experiment" not in args and args[0] not in ("prepare", "bench"):
        args += ["--experiment", store]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert culprit in result.output, result.output
    assert "Traceback" not in result.output
    assert runs_of(store) == []  # nothing created, so nothing left RUNNING or duplicated


@pytest.mark.parametrize("uri, says", [
    ("sqlite:///{tmp}/corrupt.db", "file is not a database"),  # a file that is not SQLite
    ("{tmp}/plain-folder", "filesystem tracking backend"),  # a plain path: MLflow's retired file store
    ("sqlite:///{tmp}/{afile}/mlflow.db", "File exists"),  # its folder is a file
    ("http://127.0.0.1:{port}", "127.0.0.1"),  # a tracking server that is not there
])
@pytest.mark.parametrize("command", ["train", "report"])
def test_a_failing_tracking_store_exits_1_naming_the_store(uri, says, command, tmp_path, mnist_dir, monkeypatch):
    """A failing environment, not bad input: exit 1, the store's URI and its own words, no traceback."""
    from tests.conftest import free_port

    (tmp_path / "corrupt.db").write_text("not a database")
    (tmp_path / "afile").write_text("a file")
    uri = uri.format(tmp=tmp_path, afile="afile", port=free_port())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a server that is not there: no minutes of retries
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    args = ["train", "--depth", "3", "--width", "8", "--max-steps", "2", "--train-subset", "64", "--data-dir",
            str(mnist_dir)] if command == "train" else ["report", "--out-dir", str(tmp_path / "reports")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, (result.output, result.exception)
    assert uri in result.output and says in result.output, result.output
    assert "Traceback" not in result.output


def test_a_tracking_server_that_is_not_there_is_said_within_seconds(tmp_path, monkeypatch):
    """With MLflow's own retry settings unset (7 retries, backoff 2: minutes), gradbench's bounds
    make a refused connection an exit 1 naming the URI within seconds."""
    import time

    from tests.conftest import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(name, "")  # recorded, so that what gradbench sets is undone after the test
        monkeypatch.delenv(name)
    start = time.monotonic()
    result = CliRunner().invoke(cli, ["report", "--out-dir", str(tmp_path / "reports")])
    assert result.exit_code == 1 and uri in result.output, result.output
    assert time.monotonic() - start < 30



def _cap_sqlite(dbapi_connection, _record):
    """Each new SQLite connection may grow its file by no page (max_page_count): a write that needs
    one fails as on a full disk, with SQLite's own error (SQLITE_FULL, "database or disk is full")."""
    if type(dbapi_connection).__module__.startswith("sqlite3"):
        cursor = dbapi_connection.cursor()
        (pages,) = cursor.execute("PRAGMA page_count").fetchone()
        cursor.execute(f"PRAGMA max_page_count = {max(pages, 1)}")
        cursor.close()


@pytest.mark.parametrize("case, command", [("new store", "train"), ("new store", "report"), ("new store", "grid"),
                                           ("existing store", "grid")])
def test_a_store_on_a_full_disk_exits_1_saying_the_disk_is_full(case, command, tmp_path, mnist_dir, monkeypatch):
    """Exit 1, "the disk is full" with the store's URI (it was SQLAlchemy's autoflush hint), no
    traceback; a new store is left as it was (no file), an existing one with no run RUNNING."""
    import subprocess
    import sys

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    if case == "existing store":  # made by another process: this one opens its first connection capped
        subprocess.run([sys.executable, "-c", f"from mlflow import MlflowClient; MlflowClient({uri!r}).create_experiment("
                        f"'full', artifact_location={(tmp_path / 'artifacts').as_uri()!r})"], check=True, timeout=120)
    (tmp_path / "spec.yaml").write_text(SPEC_OK)
    args = {"train": ["train", "--depth", "3", "--width", "8", "--max-steps", "2", "--train-subset", "64"],
            "grid": ["grid", str(tmp_path / "spec.yaml"), "--no-progress"],
            "report": ["report", "--out-dir", str(tmp_path / "reports")]}[command]
    if command != "report":
        args += ["--data-dir", str(mnist_dir)]
    event.listen(Engine, "connect", _cap_sqlite)
    try:
        result = CliRunner().invoke(cli, [*args, "--experiment", "full"])
    finally:
        event.remove(Engine, "connect", _cap_sqlite)
    assert result.exit_code == 1, (result.output, result.exception)
    assert f"the tracking store {uri} failed: the disk is full (database or disk is full)" in result.output, result.output
    assert "autoflush" not in result.output and "Traceback" not in result.output
    if case == "new store":
        assert not db.exists()  # as it was: no half-made store for later commands to fail on
    else:
        assert [r for r in runs_of("full") if r.info.status == "RUNNING"] == []


def test_a_stop_exits_128_plus_its_signal_without_a_traceback(store, mnist_dir, monkeypatch):
    """Ctrl-C (Python's own KeyboardInterrupt) exits 130 and says so; the grid's words say it resumes."""
    from pipeline import run as run_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "run_group", interrupted)
    monkeypatch.setitem(__import__("pipeline.runtime").runtime._state, "last", None)  # no stop signal came
    result = CliRunner().invoke(cli, ["train", "--depth", "3", "--width", "8", "--max-steps", "2", "--train-subset",
                                      "64", "--data-dir", str(mnist_dir), "--experiment", store])
    assert result.exit_code == 130, (result.output, result.exception)
    assert "stopped by SIGINT" in result.output and "the same command resumes" in result.output
    assert "Traceback" not in result.output and "Aborted" not in result.output
