"""tracking.py against a real SQLite store: what concurrent runs do to shared rows."""

from __future__ import annotations

import os
import threading
import uuid

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline import tracking
from pipeline.config import RunConfig
from pipeline.results import SUMMARY_POINTS, summary_table
from pipeline.run import run_group
from tests.conftest import MlflowServer, runs_of


def test_runs_that_log_the_same_new_dataset_at_once_all_get_it(tracking_uri, tmp_path):
    # MLflow looks the dataset up, then inserts it: runs starting together both miss it and all
    # but one hit the unique constraint (seen in CI with --workers 2). Without the retry this
    # failed in most rounds of 8 threads; a few fresh experiments make a miss very unlikely.
    client = MlflowClient(tracking_uri)
    for _ in range(4):
        exp = client.create_experiment(f"race-{uuid.uuid4().hex[:8]}", artifact_location=tmp_path.as_uri())
        runs = [client.create_run(exp).info.run_id for _ in range(8)]
        barrier = threading.Barrier(len(runs))
        errors: list[Exception] = []

        def link(run_id: str, barrier: threading.Barrier, errors: list[Exception]) -> None:
            barrier.wait()
            try:
                tracking.log_dataset(client, run_id, str(tmp_path), "0123abcd")
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=link, args=(r, barrier, errors)) for r in runs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        for run_id in runs:
            (linked,) = client.get_run(run_id).inputs.dataset_inputs
            assert (linked.dataset.name, linked.dataset.digest) == ("mnist", "0123abcd")


def test_other_store_errors_are_not_retried(tracking_uri, tmp_path):
    client = MlflowClient(tracking_uri)
    missing = uuid.uuid4().hex
    with pytest.raises(MlflowException, match=missing):
        tracking.log_dataset(client, missing, str(tmp_path), "0123abcd")


class InterruptedClient(MlflowClient):
    """The real client over the real store, interrupted (as by Ctrl-C or SIGTERM) on the n-th
    log_batch: the window between creating a run and logging its params."""

    def __init__(self, uri: str, at_call: int):
        super().__init__(uri)
        self.calls, self.at_call = 0, at_call

    def log_batch(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at_call:
            raise KeyboardInterrupt
        return super().log_batch(*args, **kwargs)


def test_an_interrupt_while_a_run_starts_leaves_it_killed_not_running(store, tracking_uri):
    client = InterruptedClient(tracking_uri, at_call=1)
    with pytest.raises(KeyboardInterrupt):
        tracking.RunLogger.start(RunConfig(), experiment=store, client=client)
    (run,) = runs_of(store)
    assert run.info.status == "KILLED"


def test_an_interrupt_while_an_ensemble_starts_ends_every_opened_run(store, tracking_uri, mnist):
    client = InterruptedClient(tracking_uri, at_call=2)  # the second member's params
    configs = [RunConfig(seed=s, depth=2, width=8) for s in range(3)]
    with pytest.raises(KeyboardInterrupt):
        run_group(configs, mnist, experiment=store, client=client)
    assert sorted(r.info.status for r in runs_of(store)) == ["KILLED", "KILLED"]


def test_the_default_stride_keeps_a_run_near_its_metric_budget_and_the_curves_whole(store, mnist):
    """--log-every 0: the per-step curves finer than the per-layer ones, about METRIC_BUDGET
    values in all, step 0 and the last step in every curve; counted from the store itself."""
    config = RunConfig(depth=6, width=16, batch_size=64, max_steps=250, device="cpu")  # log_every 0
    (summary,) = run_group([config], mnist, experiment=store)
    client = MlflowClient()
    run = client.get_run(summary.run_id)
    per_run = {"final", "theory", "signal", "jacobian", "run", "test"}  # one value per run or per evaluation
    curves = {k: [m.step for m in client.get_metric_history(run.info.run_id, k)]
              for k in run.data.metrics if k.split("/")[0] not in per_run and "first_last" not in k}
    step_curve, layer_curve = curves["train/loss"], curves["grad/backprop_norm/L00"]
    assert step_curve[0] == layer_curve[0] == 0 and step_curve[-1] == layer_curve[-1] == 249
    # half the budget each, the last step on top of the stride: 250 / 5 = 50 points -> stride
    # ceil(250 / 49) = 6; 250 / (3 x 6 layers + 5 hidden act) = 10 points -> stride ceil(250 / 9) = 28
    assert step_curve == [*range(0, 250, 6), 249]
    assert layer_curve == [*range(0, 250, 28), 249]
    assert len(step_curve) > 2 * len(layer_curve)
    # zero fraction and GSNR of each layer at the three histogram steps (0, 125, 249) come on top
    assert curves["grad/gsnr/L00"] == curves["grad/zero_fraction/L05"] == [0, 125, 249]
    values = sum(len(steps) for steps in curves.values())
    assert values == 5 * 43 + 23 * 10 + 2 * 6 * 3 <= tracking.METRIC_BUDGET, values


def test_the_summary_table_keeps_layer_0_at_every_step_and_every_layer_at_evenly_spaced_steps():
    steps, layers = 1000, 3
    table = pd.DataFrame({"step": np.repeat(np.arange(steps), layers), "layer": np.tile(np.arange(layers), steps),
                          "backprop_norm": np.arange(steps * layers, dtype=float)})
    summary = summary_table(table)
    assert (summary[summary.layer == 0].step.to_numpy() == np.arange(steps)).all()
    for layer in (1, 2):
        kept = summary[summary.layer == layer].step.to_numpy()
        # 150 steps, 999/149 = 6.7 apart, the first and the last included
        assert len(kept) == SUMMARY_POINTS == 150 and kept[0] == 0 and kept[-1] == steps - 1
        assert set(np.diff(kept)) == {6, 7}
    merged = summary.merge(table, on=["step", "layer"], suffixes=("", "_full"))
    assert len(merged) == len(summary) == 1000 + 2 * 150
    assert (merged.backprop_norm == merged.backprop_norm_full).all()  # rows of the table, untouched
    short = table[table.step < 40]
    pd.testing.assert_frame_equal(summary_table(short), short)  # a short run: every row


@pytest.mark.e2e  # starts a tracking server
def test_artifact_files_read_a_local_store_in_place_and_download_from_a_server(tmp_path, monkeypatch):
    """The report reads artifacts through ArtifactFiles: a server's are downloaded once into the
    folder, where the artifact's own path says (a file left elsewhere would read as missing)."""
    (tmp_path / "up" / "gradients").mkdir(parents=True)
    (tmp_path / "up" / "gradients" / "summary.parquet").write_bytes(b"the bytes")
    server = MlflowServer(f"sqlite:///{tmp_path}/server.db", tmp_path / "served")
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        client = MlflowClient()
        run_id = client.create_run(client.create_experiment("files")).info.run_id
        client.log_artifacts(run_id, str(tmp_path / "up"))
        uri = client.get_run(run_id).info.artifact_uri
        files = tracking.ArtifactFiles({run_id: uri}, str(tmp_path / "downloads"))
        path = files.get(run_id, "gradients/summary.parquet")
        assert path == tmp_path / "downloads" / run_id / "gradients" / "summary.parquet"
        assert path.read_bytes() == b"the bytes"
        assert files.get(run_id, "gradients/histograms.npz") is None
    finally:
        server.stop()
    local = tracking.ArtifactFiles({"r": str(tmp_path / "up")})  # a local store: its own file, no copy
    assert local.get("r", "gradients/summary.parquet") == tmp_path / "up" / "gradients" / "summary.parquet"


RACE = "from pipeline import tracking; tracking.experiment_id(tracking.get_client(), 'race')"


@pytest.mark.e2e
@pytest.mark.parametrize("attempt", [1, 2, 3])
def test_commands_that_open_a_new_store_at_once_all_succeed_and_leave_it_whole(tmp_path, attempt):
    """Four processes open one new SQLite store at the same moment (plain MLflow clients fail here
    with alembic errors, and may leave the store broken for every later command)."""
    import subprocess
    import sys

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    procs = [subprocess.Popen([sys.executable, "-c", RACE], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    errors = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert [e.name for e in client.search_experiments()] == ["race", "Default"]  # whole, one experiment made once


def test_a_running_run_is_stale_only_once_its_process_and_its_recorder_are_gone(store, tmp_path):
    """fail_stale_runs and live_children read both pids a run may carry: the process that opened
    it and the grid's recorder that took it over (--overlap)."""
    import socket
    import subprocess
    import sys

    client = MlflowClient()
    exp = client.get_experiment_by_name(store).experiment_id
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now (not reused within this test in practice)
    parent = client.create_run(exp).info.run_id
    tags = {"gradbench.config_hash": "abc", "gradbench.host": socket.gethostname(), "gradbench.pid": str(dead.pid),
            "mlflow.parentRunId": parent}
    taken = client.create_run(exp, tags={**tags, "gradbench.recorder_pid": str(os.getpid())}).info.run_id
    orphan = client.create_run(exp, tags=tags).info.run_id
    assert tracking.fail_stale_runs(client, exp) == 1
    assert client.get_run(orphan).info.status == "FAILED"
    assert client.get_run(taken).info.status == "RUNNING"  # its recorder (this process) lives
    assert [r.info.run_id for r in tracking.live_children(client, exp, parent)] == []  # this process is not "another"
    client.set_tag(taken, "gradbench.recorder_pid", str(dead.pid))
    assert tracking.fail_stale_runs(client, exp) == 1 and client.get_run(taken).info.status == "FAILED"
