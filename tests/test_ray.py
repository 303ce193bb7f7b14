"""Grids on a real local Ray cluster against a real MLflow tracking server, both on 127.0.0.1."""

import os
import signal
import threading
import time

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from pipeline.cli import cli
from pipeline.config import GridSpec
from pipeline.grid import run_grid
from tests.conftest import MlflowServer

pytestmark = pytest.mark.e2e  # a real Ray cluster and tracking server
ray = pytest.importorskip("ray") if not os.environ.get("CI") else __import__("ray")

SPEC = {"name": "raygrid", "base": {"depth": 4, "width": 32, "train_subset": 1280, "batch_size": 64, "max_steps": 20},
        "axes": {"activation": ["relu", "tanh"], "init": ["default", "he_normal"]}}
# a fast MLflow client: a stopped server must fail a request in seconds, not after minutes of retries
FAST_FAIL = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


@pytest.fixture(scope="module")
def ray_cluster():
    saved = {k: os.environ.get(k) for k in FAST_FAIL}
    os.environ.update(FAST_FAIL)  # before ray.init: its workers inherit this environment
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture
def server(tmp_path, monkeypatch):
    srv = MlflowServer(f"sqlite:///{tmp_path}/server.db", tmp_path / "artifacts")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.url)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    yield srv
    srv.stop()


def children(experiment="ray"):
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
    return [r for r in runs if "gradbench.config_hash" in r.data.tags]


def finished_hashes():
    return sorted(r.data.tags["gradbench.config_hash"] for r in children() if r.info.status == "FINISHED")


def expected_hashes(spec):
    return sorted(c.config_hash() for c in spec.configs)


def test_ray_grid_runs_every_config_once_on_the_tracking_server(ray_cluster, server, mnist_dir):
    spec = GridSpec.from_dict(SPEC)
    result = run_grid(spec, str(mnist_dir), experiment="ray", executor="ray", echo=lambda s: None, progress=False)
    assert not result.failures
    assert finished_hashes() == expected_hashes(spec)
    pids = {r.data.tags["gradbench.pid"] for r in children()}
    assert str(os.getpid()) not in pids  # the runs were trained by Ray workers, not the driver
    again = run_grid(spec, str(mnist_dir), experiment="ray", executor="ray", echo=lambda s: None, progress=False)
    assert again.skipped == len(spec.configs) and not again.summaries


def test_ray_tasks_train_groups_with_ensembles_on(ray_cluster, server, mnist_dir):
    spec = GridSpec.from_dict({**SPEC, "seeds": 2})
    result = run_grid(spec, str(mnist_dir), experiment="ray", executor="ray", ensemble=True, echo=lambda s: None,
                      progress=False)
    assert not result.failures
    assert finished_hashes() == expected_hashes(spec)  # one FINISHED run per config
    runs = children()
    assert {r.data.tags["gradbench.group_size"] for r in runs} == {"4"}  # 2 inits x 2 seeds per activation
    assert len({r.data.tags["gradbench.group"] for r in runs}) == 2
    assert str(os.getpid()) not in {r.data.tags["gradbench.pid"] for r in runs}


def test_a_worker_killed_mid_run_is_retried_without_duplicates(ray_cluster, server, mnist_dir):
    # Runs of several seconds, so that the kill lands inside the run it was aimed at.
    spec = GridSpec.from_dict({**SPEC, "base": {**SPEC["base"], "width": 256, "max_steps": 600, "train_subset": 9600,
                                                "epochs": 5, "log_every": 50}})
    outcome = {}
    driver = threading.Thread(target=lambda: outcome.setdefault("result", run_grid(
        spec, str(mnist_dir), experiment="ray", executor="ray", echo=lambda s: None, progress=False)))
    driver.start()
    victim = None
    deadline = time.time() + 120
    while victim is None and time.time() < deadline:
        running = [r for r in children() if r.info.status == "RUNNING"]
        if running:
            victim = running[0]
            os.kill(int(victim.data.tags["gradbench.pid"]), signal.SIGKILL)  # the worker process, outright
        time.sleep(0.05)
    assert victim is not None, "no run was seen RUNNING"
    driver.join(timeout=300)
    assert not outcome["result"].failures
    assert finished_hashes() == expected_hashes(spec)  # every config exactly once
    lost = MlflowClient().get_run(victim.info.run_id)
    assert lost.info.status == "FAILED"  # the lost attempt is marked, and not counted


def test_tracking_server_down_is_a_clear_error_and_resume_completes(ray_cluster, server, mnist_dir, tmp_path):
    spec_path = tmp_path / "raygrid.yaml"
    spec_path.write_text(__import__("yaml").safe_dump(
        {**SPEC, "base": {**SPEC["base"], "width": 128, "max_steps": 100, "train_subset": 6400}}))
    args = ["grid", str(spec_path), "--executor", "ray", "--data-dir", str(mnist_dir), "--experiment", "ray",
            "--no-progress"]
    outcome = {}
    driver = threading.Thread(target=lambda: outcome.setdefault("result", CliRunner().invoke(cli, args)))
    driver.start()
    deadline = time.time() + 120
    while not any(r.info.status == "FINISHED" for r in children()) and time.time() < deadline:
        time.sleep(0.05)
    server.stop()
    driver.join(timeout=300)
    first = outcome["result"]
    assert first.exit_code == 1, first.output
    assert "tracking server" in first.output and "Traceback" not in first.output

    server.start()  # same port, same store
    resumed = CliRunner().invoke(cli, args)
    assert resumed.exit_code == 0, resumed.output
    assert finished_hashes() == expected_hashes(GridSpec.from_yaml(spec_path))
    assert not [r for r in children() if r.info.status == "RUNNING"]
