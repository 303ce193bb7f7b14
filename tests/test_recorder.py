"""The grid's recorder (grid.Recorder, --overlap on): a second process records each group while the
driver trains the next. The record must be the one the driver makes itself, and nothing may be
lost or doubled when either process is killed or stopped while both work: every configuration
ends with exactly one FINISHED run and none is left RUNNING."""

import os
import signal
import subprocess
import time
from collections import Counter

import mlflow
import pytest
import yaml

from tests.conftest import REPO, runs_of
from tests.test_faults import _alive, _children, _exactly_once, _grid_cmd, _wait_until

pytestmark = pytest.mark.e2e

BASE = {"depth": 3, "width": 64, "train_subset": 2560, "batch_size": 64, "max_steps": 40, "log_every": 10}
# three groups (one per activation) of eight members (inits x seeds): several records to overlap
AXES = {"activation": ["relu", "tanh", "sigmoid"], "init": ["default", "xavier_normal", "he_normal", "orthogonal"]}


def _spec(tmp_path, name, **base):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": {**BASE, **base}, "axes": AXES, "seeds": [0, 1]}))
    return path


def _by_config(experiment):
    return {r.data.tags["gradbench.config_hash"]: r for r in _children(experiment) if r.info.status == "FINISHED"}


def test_the_recorder_writes_the_record_the_driver_writes(mnist_dir, tmp_path, tracking_uri, store):
    """The same grid with --overlap on and off: every run FINISHED once, with the same metrics
    (timings aside), tags and artifacts; the recorded runs carry the recorder's pid."""
    path = _spec(tmp_path, "same-record")
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    client = mlflow.MlflowClient(tracking_uri)
    client.create_experiment(f"{store}-off", artifact_location=(tmp_path / "off").as_uri())
    for experiment, overlap in ((store, "on"), (f"{store}-off", "off")):
        done = subprocess.run(_grid_cmd(path, mnist_dir, experiment, "--overlap", overlap), cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        _exactly_once(experiment, path)
    on, off = _by_config(store), _by_config(f"{store}-off")
    assert set(on) == set(off) and len(on) == 24
    timing = {"run/seconds"}
    for key, run in on.items():
        other = off[key]
        assert {k: v for k, v in run.data.metrics.items() if k not in timing} == \
               {k: v for k, v in other.data.metrics.items() if k not in timing}, run.info.run_name
        assert run.data.tags["gradbench.diagnosis"] == other.data.tags["gradbench.diagnosis"]
        assert int(run.data.tags["gradbench.recorder_pid"]) != int(run.data.tags["gradbench.pid"])
        assert "gradbench.recorder_pid" not in other.data.tags
    some = next(iter(on))
    listed = [sorted(a.path for a in client.list_artifacts(r.info.run_id, "gradients")) for r in (on[some], off[some])]
    assert listed[0] == listed[1] and listed[0], listed


def _both_at_work(experiment, seen):
    """A group being recorded (its runs taken over by the recorder) while the next one trains."""
    running = [k for k in _children(experiment) if k.info.status == "RUNNING" and k.info.run_id not in seen]
    recording = [k for k in running if "gradbench.recorder_pid" in k.data.tags]
    training = [k for k in running if "gradbench.recorder_pid" not in k.data.tags]
    return recording and training


def _long_spec(tmp_path, name):
    # long enough groups that one records while the next trains (8 records take seconds)
    return _spec(tmp_path, name, max_steps=150, train_subset=9600)


@pytest.mark.parametrize("attempt", [1, 2, 3])
def test_a_driver_killed_with_9_while_a_group_records_and_the_next_trains_resumes_exactly_once(
        mnist_dir, tmp_path, tracking_uri, store, attempt):
    """kill -9 the driver while its recorder records one group and it trains the next: the
    recorder stops with it (parent-death signal), and the same command resumes exactly once."""
    path = _long_spec(tmp_path, "killed-overlap")
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    cmd = _grid_cmd(path, mnist_dir, store, "--overlap", "on")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _wait_until(lambda: _both_at_work(store, set()), timeout=300), "no group recorded while another trained"
    recorders = {int(k.data.tags["gradbench.recorder_pid"]) for k in _children(store)
                 if "gradbench.recorder_pid" in k.data.tags}
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _wait_until(lambda: not any(_alive(pid) for pid in recorders), timeout=30), "the recorder lives on"
    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _exactly_once(store, path)


def test_a_stop_while_a_group_records_and_the_next_trains_marks_both(mnist_dir, tmp_path, tracking_uri, store):
    """SIGTERM while both processes work: exit 143 without a traceback, the runs of both groups
    that were not finished KILLED (none RUNNING), and the same command resumes exactly once."""
    path = _long_spec(tmp_path, "stopped-overlap")
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    cmd = _grid_cmd(path, mnist_dir, store, "--overlap", "on")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_until(lambda: _both_at_work(store, set()), timeout=300), "no group recorded while another trained"
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
    assert time.monotonic() - start < 30
    statuses = Counter(k.info.status for k in _children(store))
    assert statuses["RUNNING"] == 0 and statuses["KILLED"] >= 1, statuses
    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _exactly_once(store, path)


def test_a_recorder_killed_with_9_stops_the_grid_in_words_and_it_resumes(mnist_dir, tmp_path, tracking_uri, store):
    """kill -9 the recorder alone (the OOM killer would): the driver says so and exits 1, no
    traceback; the next command marks what was left RUNNING FAILED and the grid resumes exactly once."""
    path = _long_spec(tmp_path, "lost-recorder")
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    cmd = _grid_cmd(path, mnist_dir, store, "--overlap", "on")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_until(lambda: _both_at_work(store, set()), timeout=300), "no group recorded while another trained"
    (recorder,) = {int(k.data.tags["gradbench.recorder_pid"]) for k in _children(store)
                   if "gradbench.recorder_pid" in k.data.tags}
    os.kill(recorder, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "recorder process ended" in err and "Traceback" not in err, err[-3000:]
    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _exactly_once(store, path)
    assert not [r for r in runs_of(store) if r.info.status == "RUNNING"]
