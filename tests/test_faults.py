"""Faults with real processes against a real MLflow store: a driver killed with -9 while its
workers train, two drivers on one spec at once, `gradbench train` killed with -9. Each is
repeated three times (races hide); after each, every configuration has exactly one FINISHED run
and no run is left RUNNING."""

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from pipeline.config import GridSpec
from tests.conftest import REPO, MlflowServer, runs_of

pytestmark = pytest.mark.e2e

BASE = {"depth": 3, "width": 64, "train_subset": 2560, "batch_size": 64, "max_steps": 40, "log_every": 10}


def _children(experiment):
    return [r for r in runs_of(experiment) if "gradbench.config_hash" in r.data.tags]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) is gone for our purposes
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _grid_cmd(path, mnist_dir, experiment, *extra):
    return [sys.executable, "-m", "pipeline", "grid", str(path), "--data-dir", str(mnist_dir), "--experiment",
            experiment, "--no-progress", *extra]


def _wait_until(condition, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def _exactly_once(experiment, path):
    """Every configuration has one FINISHED run, none has two, none is RUNNING."""
    statuses = Counter(k.info.status for k in _children(experiment))
    finished = Counter(k.data.tags["gradbench.config_hash"] for k in _children(experiment) if k.info.status == "FINISHED")
    expected = {c.config_hash() for c in GridSpec.from_yaml(path).configs}
    assert set(finished) == expected and set(finished.values()) == {1}, finished
    assert statuses["RUNNING"] == 0, statuses


def test_a_driver_killed_with_9_takes_its_workers_with_it_and_resumes_exactly_once(store, mnist_dir, tmp_path,
                                                                                     tracking_uri):
    """--workers 2: kill -9 the driver while its workers train, resume at once; three times, then to
    the end. The workers stop with their driver (Linux's parent-death signal and their own check)
    instead of finishing their configurations behind the resume's back."""
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump({"name": "killed-driver", "base": BASE,
                                    "axes": {"activation": ["relu", "tanh", "elu", "gelu", "sigmoid"],
                                             "init": ["default", "he_normal"]}}))
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    cmd = _grid_cmd(path, mnist_dir, store, "--workers", "2", "--ensemble", "off")
    for _ in range(3):
        seen = {k.info.run_id for k in _children(store)}
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert _wait_until(lambda seen=seen: any(k.info.status == "RUNNING" and k.info.run_id not in seen
                                                 for k in _children(store))), "no worker started a run"
        workers = {int(k.data.tags["gradbench.pid"]) for k in _children(store) if k.info.status == "RUNNING"}
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        gone = _wait_until(lambda workers=workers: not any(_alive(pid) for pid in workers), timeout=30)
        assert gone, "orphaned workers live on"
    # the next command on the store, whatever it is, closes the dead driver's parent run
    report = subprocess.run([sys.executable, "-m", "pipeline", "report", "--experiment", store, "--out-dir",
                             str(tmp_path / "reports")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    (parent,) = [r for r in runs_of(store) if r.data.tags.get("gradbench.role") == "grid"]
    assert parent.info.status == "FAILED"
    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _exactly_once(store, path)


def test_two_drivers_on_one_spec_never_train_a_configuration_twice(store, mnist_dir, tmp_path, tracking_uri):
    """Started at the same moment (three times, each into a fresh experiment): one drives, the
    other is refused with a message naming the first (or, if it came after the end, finds nothing
    to run). Then a second driver started while the first is visibly running is refused."""
    path = tmp_path / "pair.yaml"  # short: the two start together, so they overlap anyway
    path.write_text(yaml.safe_dump({"name": "two-drivers", "base": {**BASE, "max_steps": 10},
                                    "axes": {"activation": ["relu", "tanh"]}}))
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    for round_ in range(3):
        experiment = f"{store}-{round_}"
        procs = [subprocess.Popen(_grid_cmd(path, mnist_dir, experiment), cwd=REPO, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
        outputs = [p.communicate(timeout=300) for p in procs]
        codes = sorted(p.returncode for p in procs)
        refused = [err for p, (_, err) in zip(procs, outputs) if p.returncode == 1]
        assert codes in ([0, 1], [0, 0]), outputs
        if refused:
            assert "is being run right now by pid" in refused[0] and "Traceback" not in refused[0], refused[0]
        else:  # the second came after the first had ended
            assert any("0 to run" in out for out, _ in outputs), outputs
        _exactly_once(experiment, path)

    experiment = f"{store}-late"
    path.write_text(yaml.safe_dump({"name": "two-drivers", "base": {**BASE, "width": 256, "max_steps": 5000,
                                                                     "epochs": 20, "train_subset": 25600},
                                    "axes": {"activation": ["relu", "tanh"]}}))  # long enough to start a second
    first = subprocess.Popen(_grid_cmd(path, mnist_dir, experiment), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    assert _wait_until(lambda: any(k.info.status == "RUNNING" for k in _children(experiment)))
    second = subprocess.run(_grid_cmd(path, mnist_dir, experiment), cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert second.returncode == 1 and f"pid {first.pid}" in second.stderr, second.stderr
    first.send_signal(signal.SIGTERM)  # no need to wait for the end: stopped, its open run KILLED
    assert first.wait(timeout=60) != 0
    statuses = Counter(k.info.status for k in _children(experiment))
    assert statuses["RUNNING"] == 0 and statuses["KILLED"] == 1, statuses


def test_train_killed_with_9_is_marked_failed_by_the_next_command(store, mnist_dir, tracking_uri, tmp_path):
    """SIGKILL gives a run no chance to end itself: the next command of this host that opens the
    store marks it FAILED, by its host and pid tags: a report (which then says there is no grid to
    report), then a train. Three times in all."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    cmd = [sys.executable, "-m", "pipeline", "train", "--depth", "3", "--width", "128", "--train-subset", "25600",
           "--epochs", "5", "--data-dir", str(mnist_dir), "--experiment", store]
    for i in range(3):
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert _wait_until(lambda: sum(r.info.status == "RUNNING" for r in runs_of(store)) == 1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert Counter(r.info.status for r in runs_of(store))["RUNNING"] == 1  # nobody has looked yet
        if i < 2:
            report = subprocess.run([sys.executable, "-m", "pipeline", "report", "--experiment", store,
                                     "--out-dir", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                                    timeout=120)
            assert report.returncode == 1 and "no grid runs" in report.stderr, report.stderr[-2000:]
            assert Counter(r.info.status for r in runs_of(store)) == {"FAILED": i + 1}
        else:
            quick = subprocess.run([*cmd[:-8], "--max-steps", "2", "--train-subset", "640", "--data-dir",
                                    str(mnist_dir), "--experiment", store], cwd=REPO, env=env, capture_output=True,
                                   text=True, timeout=120)
            assert quick.returncode == 0, quick.stderr[-2000:]
            assert Counter(r.info.status for r in runs_of(store)) == {"FAILED": 3, "FINISHED": 1}


def test_ctrl_c_on_a_two_worker_grid_leaves_no_run_running(store, mnist_dir, tmp_path, tracking_uri):
    """Ctrl-C in a terminal sends SIGINT to the whole process group, driver and workers: the
    workers leave it to the driver, which stops them; their open runs end KILLED, the driver
    exits without a traceback, and the same command resumes. Three times, then to the end."""
    path = tmp_path / "ctrl-c.yaml"
    path.write_text(yaml.safe_dump({"name": "ctrl-c", "base": {**BASE, "max_steps": 300, "train_subset": 12800},
                                    "axes": {"activation": ["relu", "tanh", "elu", "gelu"]}}))
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    cmd = _grid_cmd(path, mnist_dir, store, "--workers", "2", "--ensemble", "off")
    for _ in range(3):
        seen = {k.info.run_id for k in _children(store)}
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # its own process group, as a terminal's job
        started = _wait_until(lambda seen=seen: any(k.info.status == "RUNNING" and k.info.run_id not in seen
                                                    for k in _children(store)))
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert started and proc.returncode != 0
        assert "Traceback" not in err, err[-3000:]
        statuses = Counter(k.info.status for k in _children(store))
        assert statuses["RUNNING"] == 0 and statuses["KILLED"] >= 1, statuses
    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _exactly_once(store, path)


HTTP_WAITS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT")


def _signal_tree(pid: int, signum: int) -> None:
    """Send `signum` to a process and all its descendants (`mlflow server` answers from worker
    processes of its own: stopping the parent alone freezes nothing)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo = [pid]
    while todo:
        current = todo.pop()
        todo += parents.get(current, [])
        try:
            os.kill(current, signum)
        except ProcessLookupError:
            pass


@pytest.fixture
def frozen_server(tmp_path, monkeypatch):
    """A real tracking server this test can freeze (SIGSTOP: connections are accepted, nothing is
    answered, the worst case for a client) and thaw; MLflow's HTTP waits left to gradbench."""
    server = MlflowServer(f"sqlite:///{tmp_path}/server.db", tmp_path / "served")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    for name in HTTP_WAITS:
        monkeypatch.delenv(name, raising=False)
    yield server
    _signal_tree(server.proc.pid, signal.SIGCONT)
    server.stop()


def _frozen_grid(server, mnist_dir, tmp_path, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": {**BASE, "width": 128, "max_steps": 3000,
                                                           "train_subset": 25600, "epochs": 20},
                                    "axes": {"activation": ["relu", "tanh"]}}))
    env = {k: v for k, v in os.environ.items() if k not in HTTP_WAITS}
    cmd = _grid_cmd(path, mnist_dir, "frozen")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_until(lambda: any(k.info.status == "RUNNING" for k in _children("frozen"))), "no run started"
    time.sleep(1.0)
    _signal_tree(server.proc.pid, signal.SIGSTOP)
    return path, cmd, env, proc


def _thawed_resume(server, path, cmd, env):
    """The server thawed, the next command on the store marks the runs the stopped grid left RUNNING
    FAILED (its parent too), and finishes (shorter runs here, to save time): nothing is RUNNING."""
    _signal_tree(server.proc.pid, signal.SIGCONT)
    path.write_text(path.read_text().replace("max_steps: 3000", "max_steps: 30"))
    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    statuses = Counter(r.info.status for r in runs_of("frozen"))
    assert statuses["RUNNING"] == 0 and statuses["FINISHED"] >= 3, statuses


@pytest.mark.parametrize("attempt", [1, 2, 3])
def test_a_stop_ends_a_grid_in_seconds_while_its_tracking_server_is_frozen(frozen_server, mnist_dir, tmp_path,
                                                                          attempt):
    """SIGTERM while the server answers nothing: the run's end cannot be written; the write gives
    way after runtime.STOP_GRACE (it waited up to a minute before), the grid exits 143 naming the
    server, and once the server is back the next command marks the runs left RUNNING FAILED."""
    path, cmd, env, proc = _frozen_grid(frozen_server, mnist_dir, tmp_path, "stopped")
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 143, err[-3000:]
    assert elapsed < 15, elapsed
    assert f"stopped by SIGTERM without waiting for the tracking store {frozen_server.url}" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    _thawed_resume(frozen_server, path, cmd, env)


def test_a_frozen_tracking_server_is_said_within_a_minute_with_its_uri(frozen_server, mnist_dir, tmp_path):
    """No signal: the grid's next write waits gradbench's bounded time (not MLflow's minutes), then
    the grid stops (not one failure per configuration) with exit 1 naming the server's URI."""
    path, cmd, env, proc = _frozen_grid(frozen_server, mnist_dir, tmp_path, "said")
    start = time.monotonic()
    _, err = proc.communicate(timeout=180)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, err[-3000:]
    assert elapsed < 60, elapsed
    assert f"the tracking store {frozen_server.url} failed" in err and "Traceback" not in err, err[-3000:]
    _thawed_resume(frozen_server, path, cmd, env)


STOPPED_AFTER_AN_INTERRUPT = '''
import ctypes, os, signal, sys, threading, time
from pipeline import runtime
from pipeline.cli import main


def stop():
    while not runtime._state["installed"]:
        time.sleep(0.05)
    time.sleep(0.5)
    # CPython's unhandled-interrupt flag, as a stop signal leaves it when it lands inside code that
    # eval() or exec() runs from a string (namedtuple, dataclasses, lazy imports do): at exit it
    # turns any exit status into death by SIGINT
    ctypes.c_int.in_dll(ctypes.pythonapi, "_Py_UnhandledKeyboardInterrupt").value = 1
    os.kill(os.getpid(), signal.SIGTERM)


threading.Thread(target=stop, daemon=True).start()
sys.argv = ["gradbench", *sys.argv[1:]]
main()
'''


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="CPython 3.12 keeps the flag elsewhere")
def test_a_stopped_command_exits_with_its_status_whatever_the_interpreter_saw(store, mnist_dir, tmp_path):
    """A stop exits 128 + the signal's number even where CPython's unhandled-KeyboardInterrupt flag
    is set (a clean-clone CI run saw -2 after "stopped by SIGTERM", no traceback)."""
    (tmp_path / "stopme.py").write_text(STOPPED_AFTER_AN_INTERRUPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "stopme", "train", "--depth", "3", "--width", "64", "--max-steps", "100000",
           "--data-dir", str(mnist_dir), "--experiment", store]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 143, done.stderr[-3000:]
    assert "stopped by SIGTERM" in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
