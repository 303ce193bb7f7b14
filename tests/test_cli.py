"""The train stage through the real CLI into a real MLflow store, checked against DESIGN's contract."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from pipeline.cli import cli
from pipeline.config import FIELDS
from tests.conftest import REPO, runs_of

TINY = ["--depth", "4", "--width", "32", "--train-subset", "640", "--batch-size", "64", "--log-every", "3"]


def invoke(*args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, **kwargs)


def test_train_records_one_run_with_the_full_contract(store, mnist_dir, tmp_path):
    result = invoke("train", *TINY, "--activation", "tanh", "--init", "xavier_normal", "--clip", "norm",
                    "--clip-threshold", "0.5", "--data-dir", mnist_dir, "--experiment", store)
    assert result.exit_code == 0, result.output
    (run,) = runs_of(store)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "tanh-d4-w32-xavier_normal-norm0.5-b64-n640-s0"
    assert set(run.data.params) == set(FIELDS)
    assert run.data.params["clip_threshold"] == "0.5" and run.data.params["depth"] == "4"
    tags = run.data.tags
    assert tags["gradbench.outcome"] == "completed"
    assert tags["gradbench.diagnosis"] in ("healthy", "vanishing", "exploding", "dead", "saturated")
    assert len(tags["gradbench.config_hash"]) == 16

    client = MlflowClient()
    metrics = run.data.metrics
    for key in ["train/loss", "train/acc", "test/loss", "test/acc", "grad/global_norm_pre_clip",
                "grad/global_norm_post_clip", "clip/active", "final/test_acc", "grad/first_last_ratio_init",
                "theory/chi1", "theory/slope_pred", "theory/slope_measured", "theory/slope_error",
                "theory/q_error", "theory/c_error", "theory/xi_c"]:
        assert key in metrics, key
    for layer in range(4):
        for prefix in ("grad/weight_norm", "grad/backprop_norm", "update/ratio"):
            assert f"{prefix}/L{layer:02d}" in metrics
    assert "act/saturated/L02" in metrics and "act/saturated/L03" not in metrics  # hidden layers only
    # 640 images / 64 = 10 steps; stride 3 gives steps 0, 3, 6, 9 (the last step is always logged)
    history = client.get_metric_history(run.info.run_id, "grad/backprop_norm/L00")
    assert [m.step for m in history] == [0, 3, 6, 9]

    local = client.download_artifacts(run.info.run_id, "", str(tmp_path))
    config = json.loads(open(os.path.join(local, "config.json")).read())
    assert config["activation"] == "tanh" and config["clip_threshold"] == 0.5
    table = pd.read_parquet(os.path.join(local, "gradients", "layer_stats.parquet"))
    assert len(table) == 10 * 4 and table.step.nunique() == 10  # every step, whatever the stride
    # The metric logged at step 3 is the same number as in the full-resolution table.
    row = table[(table.step == 3) & (table.layer == 0)].backprop_norm.item()
    assert history[1].value == pytest.approx(row, rel=1e-6)
    signal = pd.read_parquet(os.path.join(local, "signal", "propagation.parquet"))
    assert set(signal.statistic) == {"q", "c", "zero_fraction", "gsnr"}
    assert sorted(signal.step.unique()) == [0, 5, 9]  # the histogram steps
    forward = signal[signal.statistic.isin(["q", "c"])]
    assert forward[forward.step == 0].predicted.notna().all() and forward[forward.step > 0].predicted.isna().all()
    assert len(forward) == 3 * 2 * 3  # steps x statistics x hidden layers
    gradient = signal[~signal.statistic.isin(["q", "c"])]
    assert len(gradient) == 3 * 2 * 4 and gradient.predicted.isna().all()  # steps x statistics x layers
    assert gradient.measured.notna().all() and (gradient[gradient.statistic == "gsnr"].measured > 0).all()
    for step in (0, 5, 9):  # the same numbers as metrics at the histogram steps
        value = signal.query("step == @step and layer == 2 and statistic == 'gsnr'").measured.item()
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "grad/gsnr/L02")}
        assert logged[step] == pytest.approx(value, rel=1e-6)
    # what the report reads: layer 0 (with the step's scalars) at every step, every layer at up to
    # SUMMARY_POINTS steps (here all 10): the same rows as the full table
    summary = pd.read_parquet(os.path.join(local, "gradients", "summary.parquet"))
    pd.testing.assert_frame_equal(summary, table)
    hist = np.load(os.path.join(local, "gradients", "histograms.npz"))
    assert hist["counts"].shape[:2] == (3, 4)
    assert os.path.getsize(os.path.join(local, "plots", "gradient_flow.png")) > 10_000
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "mnist" and dataset.dataset.digest


def test_normalization_and_residual_options_reach_the_run(store, mnist_dir):
    result = invoke("train", *TINY, "--norm", "layer", "--residual", "plain", "--residual-scale", "0.5",
                    "--data-dir", mnist_dir, "--experiment", store)
    assert result.exit_code == 0, result.output
    (run,) = runs_of(store)
    assert run.info.run_name == "relu-d4-w32-default-noclip-ln-res0.5-b64-n640-s0"
    params = run.data.params
    assert (params["norm"], params["residual"], params["residual_scale"]) == ("layer", "plain", "0.5")
    assert "theory/slope_pred" in run.data.metrics  # LayerNorm residual streams are predicted
    result = invoke("train", *TINY, "--residual", "skipinit", "--data-dir", mnist_dir, "--experiment", store)
    assert result.exit_code == 0, result.output
    skipinit = next(r for r in runs_of(store) if r.data.params["residual"] == "skipinit")
    # alpha = 0 at init: no gradient reaches the blocks, so there is no slope to predict or measure
    assert "theory/slope_pred" not in skipinit.data.metrics and "theory/slope_error" not in skipinit.data.metrics
    assert skipinit.data.tags["gradbench.outcome"] == "completed"


def test_diverging_run_exits_0_and_is_tagged_diverged(store, mnist_dir):
    result = invoke("train", "--activation", "relu", "--depth", "10", "--width", "64", "--init", "normal",
                    "--init-std", "1", "--max-steps", "20", "--train-subset", "640", "--batch-size", "64",
                    "--data-dir", mnist_dir, "--experiment", store)
    assert result.exit_code == 0, result.output
    assert "diverged" in result.output
    (run,) = runs_of(store)
    assert run.info.status == "FINISHED"
    assert run.data.tags["gradbench.outcome"] == "diverged"
    assert run.data.tags["gradbench.diagnosis"] == "diverged"


@pytest.mark.parametrize(
    "args, option",
    [
        (["--activation", "swish"], "--activation"),
        (["--init", "glorot"], "--init"),
        (["--clip", "maybe"], "--clip"),
        (["--depth", "1"], "--depth"),
        (["--width", "0"], "--width"),
        (["--lr", "0"], "--lr"),
        (["--lr", "-0.1"], "--lr"),
        (["--batch-size", "0"], "--batch-size"),
        (["--clip", "norm", "--clip-threshold", "0"], "--clip-threshold"),
        (["--train-subset", "60001"], "--train-subset"),
        (["--device", "tpu"], "--device"),
        (["--norm", "group"], "--norm"),
        (["--residual", "highway"], "--residual"),
        (["--residual", "plain", "--residual-scale", "0"], "--residual-scale"),
        (["--residual-scale", "nan"], "--residual-scale"),
        (["--bias-std", "nan"], "--bias-std"),
        (["--lr", "inf"], "--lr"),
        (["--source", "/no/such/folder"], "--source"),
    ],
)
def test_bad_input_exits_2_names_the_option_and_logs_nothing(store, tmp_path, args, option):
    result = invoke("train", *args, "--data-dir", tmp_path / "data", "--experiment", store)
    assert result.exit_code == 2, result.output
    assert option in result.output
    assert runs_of(store) == []
    assert not (tmp_path / "data").exists()


def test_cuda_that_is_not_there_is_a_usage_error(store, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = invoke("train", "--device", "cuda", "--data-dir", tmp_path, "--experiment", store)
    assert result.exit_code == 2 and "CUDA is not available" in result.output


def test_help_explains_every_option():
    top = invoke("--help")
    assert top.exit_code == 0 and "prepare" in top.output and "train" in top.output
    text = invoke("train", "--help").output
    for name in FIELDS:
        assert f"--{name.replace('_', '-')}" in text
    assert "sigmoid|tanh|relu" in text  # closed sets are listed


def test_python_dash_m_pipeline_is_the_same_command():
    out = subprocess.run([sys.executable, "-m", "pipeline", "train", "--help"], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    assert "--clip-threshold" in out and "Usage: gradbench train" in out


@pytest.mark.e2e
def test_mlflow_run_train_entry_point(store, mnist_dir, tmp_path):
    """`mlflow run . -e train` with a tiny budget: the project run itself holds the results, and
    the -P spellings MLflow logged first (1e-2) do not clash with the canonical ones (0.01)."""
    # As in an activated environment: the entry point's `python` is this interpreter.
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
    env = {**os.environ, "PATH": path, "GRADBENCH_MNIST_SOURCE": ""}
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "train", "--env-manager", "local",
           "--experiment-name", store, "-P", "depth=3", "-P", "width=16", "-P", "max_steps=5", "-P", "lr=1e-2",
           "-P", f"data_dir={mnist_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = runs_of(store)
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == "1e-2" and run.data.params["depth"] == "3"
    assert run.data.tags["gradbench.outcome"] == "completed"
    assert "grad/backprop_norm/L02" in run.data.metrics
