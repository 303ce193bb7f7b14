"""Shared fixtures: real MNIST through the offline source, a real MLflow store in a tmp dir."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = Path(os.environ.get("GRADBENCH_TEST_MNIST", REPO.parent / "shared" / "data" / "mnist"))


def pytest_addoption(parser):
    parser.addoption("--e2e", action="store_true", help="run the end-to-end tier too (tests marked e2e), as CI does")


def pytest_collection_modifyitems(config, items):
    """`pytest` runs the fast tier; `pytest --e2e` (or an explicit -m) runs what it asks for."""
    if config.getoption("--e2e") or config.getoption("markexpr"):
        return
    kept = [item for item in items if "e2e" not in item.keywords]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if "e2e" in item.keywords])
        items[:] = kept


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> str:
    """Write a uint8 IDX file (gzipped or not); return the MD5 of its uncompressed content."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    content = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(content) if gz else content)
    return hashlib.md5(content).hexdigest()


@pytest.fixture
def idx_source(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A folder with four tiny MNIST-shaped IDX files (two gzipped, two not) and their MD5s."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "source"
    folder.mkdir()
    files = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (32, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (32,)),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (8, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (8,)),
    }
    checksums = {}
    for i, (name, array) in enumerate(files.items()):
        gz = i % 2 == 0
        checksums[name] = write_idx(folder / (name + (".gz" if gz else "")), array, gz=gz)
    return folder, checksums


def require_mnist() -> None:
    """Skip without the offline MNIST copy, except under CI, where its absence fails the test."""
    if not SHARED_MNIST.is_dir():
        message = f"offline MNIST not found at {SHARED_MNIST} (set GRADBENCH_TEST_MNIST)"
        if os.environ.get("CI"):
            pytest.fail(f"tests that read MNIST must run in CI: {message}")
        pytest.skip(message)


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    """The real MNIST, prepared once per session from the offline copy beside the repo."""
    require_mnist()
    from pipeline import data

    data_dir = tmp_path_factory.mktemp("data")
    data.prepare(data_dir, str(SHARED_MNIST))
    return data_dir


@pytest.fixture(scope="session")
def mnist(mnist_dir):
    """Real MNIST as CPU tensors, loaded once per session."""
    import torch

    from pipeline import data

    return data.load(mnist_dir, torch.device("cpu"))


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    """One real SQLite MLflow store per session (schema creation costs seconds); tests isolate
    themselves by experiment name."""
    uri = "sqlite:///" + str(tmp_path_factory.mktemp("mlflow") / "mlflow.db")
    from mlflow import MlflowClient

    MlflowClient(uri).search_experiments()  # create the schema once, before any test races on it
    return uri


@pytest.fixture
def store(tracking_uri, monkeypatch, tmp_path) -> str:
    """Point MLflow at the session store, with a fresh experiment for this test whose artifacts
    live in the test's tmp dir (MLflow's default would be ./mlruns wherever the test runs)."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    name = f"test-{uuid.uuid4().hex[:8]}"
    MlflowClient(tracking_uri).create_experiment(name, artifact_location=(tmp_path / "artifacts").as_uri())
    return name


def runs_of(experiment: str):
    """All runs of an experiment (none if it does not exist)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id], max_results=10_000)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium through playwright. Skips locally without one; CI must have it."""
    missing = None
    if CHROMIUM is None:
        missing = "no chromium on PATH"
    else:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            missing = "playwright is not installed"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests must run in CI: {missing}")
        pytest.skip(missing)
    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 over a backend store; stop() and start() keep its port."""

    def __init__(self, backend_uri: str, artifacts: Path, port: int | None = None):
        self.backend_uri, self.artifacts, self.port = backend_uri, artifacts, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_uri,
             "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2)
                return
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.stop()
                    pytest.fail("mlflow server did not start")
                time.sleep(0.3)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
