"""Grid specs, and grids run through the real CLI into a real MLflow store."""

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

from pipeline.cli import cli
from pipeline.config import (
    CLIPS,
    INITS,
    NUMBERS_VERSION,
    PAPERS,
    ConfigError,
    GridSpec,
    RunConfig,
    SpecError,
    group_key,
    reduce_spec,
)
from pipeline.grid import auto_groups, plan_groups
from tests.conftest import REPO, runs_of

TINY_BASE = {"depth": 3, "width": 16, "train_subset": 640, "batch_size": 64, "max_steps": 6, "log_every": 2}


def write_spec(tmp_path, spec: dict, name="tiny.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def children(experiment):
    return [r for r in runs_of(experiment) if "gradbench.config_hash" in r.data.tags]


def parents(experiment):
    return [r for r in runs_of(experiment) if r.data.tags.get("gradbench.role") == "grid"]


# -- spec expansion --------------------------------------------------------------------------------


def test_axes_are_crossed_over_the_base_and_seeds():
    spec = GridSpec.from_dict(
        {"base": {"depth": 4}, "axes": {"activation": ["relu", "tanh"], "init": ["default", "he_normal", "orthogonal"]},
         "seeds": 2}
    )
    assert len(spec.configs) == 2 * 3 * 2
    assert {c.depth for c in spec.configs} == {4}
    assert {(c.activation, c.init, c.seed) for c in spec.configs} == {
        (a, i, s) for a in ("relu", "tanh") for i in ("default", "he_normal", "orthogonal") for s in (0, 1)
    }


def test_exclude_matches_the_validated_configuration():
    # a key left at its default is matched too (clip: none excludes every unclipped config)
    with pytest.raises(ConfigError, match="empty"):
        GridSpec.from_dict({"axes": {"depth": [3, 4]}, "exclude": [{"clip": "none"}]})
    # values compare as the field's type: 1e-2 (a string to YAML) is 0.01
    raw = yaml.safe_load("axes: {lr: [0.01, 0.1], depth: [3]}\nexclude: [{lr: 1e-2}]")
    assert [c.lr for c in GridSpec.from_dict(raw).configs] == [0.1]
    with pytest.raises(ConfigError, match="exclude.lr"):
        GridSpec.from_dict({"axes": {"depth": [3]}, "exclude": [{"lr": "fast"}]})


def test_plan_groups_keeps_only_compatible_configs_together():
    base = RunConfig(depth=5, width=48)
    configs = [base.replace(seed=s, init=i) for s in range(3) for i in ("default", "he_normal")]
    # clip mode and threshold, lr and momentum are a member's own with SGD; Adam shares its lr and betas
    configs += [base.replace(clip="norm"), base.replace(clip="value", clip_threshold=2.0, lr=0.1, momentum=0.0)]
    configs += [base.replace(width=64), base.replace(optimizer="adam", lr=1e-3), base.replace(optimizer="adam", lr=1e-2)]
    found = plan_groups(configs, ensemble=True, max_size=4)
    assert sorted(len(g) for g in found) == [1, 1, 1, 4, 4]
    for group in found:
        assert len({group_key(c) for c in group}) == 1
    assert sorted(c.config_hash() for g in found for c in g) == sorted(c.config_hash() for c in configs)
    assert plan_groups(configs, ensemble=False) == [[c] for c in configs]


def test_auto_ensembles_group_narrow_nets_on_a_cpu_and_everything_on_cuda():
    narrow = [RunConfig(width=128, seed=s) for s in range(3)]
    wide = [RunConfig(width=1024, seed=s) for s in range(2)]
    assert sorted(map(len, auto_groups(narrow + wide, cuda=False))) == [1, 1, 3]
    assert sorted(map(len, auto_groups(narrow + wide, cuda=True))) == [2, 3]
    cell = [RunConfig(width=128, init=i, clip=c, seed=s) for i in INITS for c in CLIPS for s in range(3)]
    assert [len(g) for g in auto_groups(cell, cuda=True)] == [96]  # a cell of the standard grid: one group
    assert [len(g) for g in auto_groups(cell, cuda=False)] == [32, 32, 32]


def test_exclude_and_include_make_irregular_grids():
    spec = GridSpec.from_dict({
        "axes": {"activation": ["relu", "tanh"], "depth": [5, 10]},
        "exclude": [{"activation": "tanh", "depth": [10]}],
        "include": [{"activation": "selu", "init": "lecun_normal"}],
        "seeds": [3],
    })
    assert sorted((c.activation, c.depth, c.init) for c in spec.configs) == [
        ("relu", 5, "default"), ("relu", 10, "default"), ("selu", 10, "lecun_normal"), ("tanh", 5, "default")
    ]
    assert {c.seed for c in spec.configs} == {3}


def test_duplicate_configs_are_run_once():
    spec = GridSpec.from_dict({"axes": {"depth": [5, 5]}, "include": [{"depth": 5}]})
    assert len(spec.configs) == 1


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"axes": {"activation": ["relu", "swish"]}}, "axes.activation"),
        ({"base": {"dept": 3}}, "base.dept"),
        ({"axes": {"depth": []}}, "axes.depth"),
        ({"axez": {}}, "axez"),
        ({"include": [{"widht": 3}]}, "include.widht"),
        ({"include": [{"lr": -1}]}, "include[0].lr"),
        ({"seeds": []}, "seeds"),
        ({"seeds": [-1]}, "seeds"),
        ({"axes": {"depth": [5]}, "exclude": [{"depth": 5}]}, "axes"),
        ({}, "spec"),
        ({"name": "nothing", "seeds": 3}, "spec"),
        ({"base": {"lr": float("inf")}}, "base.lr"),
        ({"axes": {"bias_std": [0.1, float("nan")]}}, "axes.bias_std"),
        ({"name": None, "base": {"depth": 3}}, "name"),  # was a grid called "None"
        ({"name": ["a"], "base": {"depth": 3}}, "name"),
        ({"name": " ", "base": {"depth": 3}}, "name"),
        ({"base": {"depth": 3, 1: 2}}, "base.1"),  # a key that is not a string
        ({"base": {"norm": "batch", "batch_size": 1}}, "base.batch_size"),
        # the reduced budget is checked whether it is run or not, and its errors are named there
        ({"base": {"depth": 3}, "reduced": {"seeds": 0}}, "reduced.seeds"),
        ({"base": {"depth": 3}, "reduced": {"lr": "fast"}}, "reduced.lr"),
        ({"base": {"depth": 3, "norm": "batch"}, "reduced": {"batch_size": 1}}, "reduced.batch_size"),
        ({"base": {"norm": "batch", "batch_size": 32}, "reduced": {"train_subset": 65}}, "reduced"),
    ],
)
def test_spec_errors_name_the_key(raw, key):
    with pytest.raises(ConfigError) as err:
        GridSpec.from_dict(raw)
    assert err.value.key == key


def test_spec_file_errors_name_the_file(tmp_path):
    path = write_spec(tmp_path, {"axes": {"clip": ["none", "sometimes"]}})
    with pytest.raises(SpecError, match=r"tiny.yaml: axes.clip: 'sometimes' is not one of"):
        GridSpec.from_yaml(path)


@pytest.mark.parametrize("name", ["quick.yaml", "standard.yaml", "recurrent.yaml", *(f"{paper}.yaml" for paper in PAPERS)])
def test_shipped_specs_are_valid(name):
    spec = GridSpec.from_yaml(REPO / "benchmarks" / name)
    assert spec.name == name.removesuffix(".yaml")
    text = (REPO / "benchmarks" / name).read_text()
    assert text.startswith("#") and f"gradbench grid benchmarks/{name}" in text  # header with the command
    assert f"= {len(spec.configs)} runs" in text  # the header states the true run count


def test_quick_spec_covers_the_study():
    configs = GridSpec.from_yaml(REPO / "benchmarks" / "quick.yaml").configs
    assert len({c.activation for c in configs}) >= 3 and len({c.init for c in configs}) >= 4
    assert len({c.depth for c in configs}) >= 2 and {c.clip for c in configs} >= {"none", "norm"}
    # all four remedy families on the deepest nets: init, clipping, normalization, residual
    deepest = [c for c in configs if c.depth == max(c.depth for c in configs)]
    assert {c.norm for c in deepest} >= {"none", "batch"} and len({c.residual for c in deepest}) >= 2


@pytest.mark.parametrize("paper", PAPERS)
def test_every_paper_spec_has_a_reduced_budget(paper):
    full = GridSpec.from_yaml(REPO / "benchmarks" / f"{paper}.yaml")
    reduced = GridSpec.from_yaml(REPO / "benchmarks" / f"{paper}.yaml", reduced=True)
    assert reduced.name == f"{paper}-reduced" and reduced.reproduces == paper
    assert sum(c.total_steps for c in reduced.configs) < sum(c.total_steps for c in full.configs)
    again = GridSpec.from_dict(yaml.safe_load(reduced.source))  # the logged source rebuilds the reduced grid
    assert again.spec_hash == reduced.spec_hash and again.name == reduced.name


def test_reduced_overrides_base_and_seeds():
    raw = {"name": "g", "base": {"max_steps": 100, "width": 8}, "axes": {"depth": [3, 4]}, "seeds": 3,
           "reduced": {"max_steps": 10, "seeds": [0]}}
    spec = GridSpec.from_dict(reduce_spec(raw))
    assert spec.name == "g-reduced" and len(spec.configs) == 2
    assert {(c.max_steps, c.width, c.seed) for c in spec.configs} == {(10, 8, 0)}
    with pytest.raises(ConfigError) as err:
        GridSpec.from_dict({**raw, "reduced": {"max_step": 10}})
    assert err.value.key == "reduced.max_step"
    with pytest.raises(ConfigError) as err:  # a bad value under reduced: is named there, not as base.<key>
        reduce_spec({**raw, "reduced": {"max_steps": -1}})
    assert err.value.key == "reduced.max_steps"
    with pytest.raises(ConfigError) as err:
        reduce_spec({"axes": {"depth": [3]}})
    assert err.value.key == "reduced"


# -- grids through the CLI -------------------------------------------------------------------------


def grid_cli(spec_path, store, mnist_dir, *extra):
    return CliRunner().invoke(
        cli, ["grid", str(spec_path), "--data-dir", str(mnist_dir), "--experiment", store, "--no-progress", *extra],
        catch_exceptions=False,
    )


def test_bad_spec_exits_2_and_creates_no_parent_run(store, mnist_dir, tmp_path):
    path = write_spec(tmp_path, {"base": TINY_BASE, "axes": {"depth": [3, 1]}})
    result = grid_cli(path, store, mnist_dir)
    assert result.exit_code == 2
    assert "tiny.yaml" in result.output and "axes.depth" in result.output
    assert runs_of(store) == []
    path = write_spec(tmp_path, {"base": TINY_BASE, "axes": {"depth": [3]}})
    result = grid_cli(path, store, mnist_dir, "--reduced")  # no reduced: budget in the spec
    assert result.exit_code == 2 and "reduced" in result.output
    assert runs_of(store) == []


def test_grid_makes_one_parent_and_a_child_per_config_and_resumes(store, mnist_dir, tmp_path):
    spec = {"name": "tiny", "base": TINY_BASE, "axes": {"activation": ["relu", "tanh"]},
            "include": [{"activation": "relu", "depth": 6, "width": 64, "init": "normal", "init_std": 1.0}]}
    path = write_spec(tmp_path, spec)
    result = grid_cli(path, store, mnist_dir)
    assert result.exit_code == 0, result.output
    assert result.output.count("(run ") == 3  # one summary line per finished run
    (parent,) = parents(store)
    assert parent.info.run_name == "tiny" and parent.info.status == "FINISHED"
    kids = children(store)
    assert len(kids) == 3
    for kid in kids:
        assert kid.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert kid.data.tags["gradbench.grid"] == "tiny"
        assert kid.data.params["depth"] in ("3", "6") and kid.info.status == "FINISHED"
    # the diverging configuration is a result inside the grid, not the end of it
    assert Counter(k.data.tags["gradbench.outcome"] for k in kids) == {"completed": 2, "diverged": 1}

    again = grid_cli(path, store, mnist_dir)
    assert again.exit_code == 0 and "3 already finished, 0 to run" in again.output
    assert len(children(store)) == 3
    rerun = grid_cli(path, store, mnist_dir, "--rerun")
    assert rerun.exit_code == 0 and len(children(store)) == 6


@pytest.mark.e2e
def test_two_workers_produce_every_run_exactly_once(store, mnist_dir, tmp_path):
    spec = {"name": "pair", "base": TINY_BASE, "axes": {"activation": ["relu", "tanh", "elu"], "init": ["default", "he_normal"]}}
    path = write_spec(tmp_path, spec)
    result = grid_cli(path, store, mnist_dir, "--workers", "2")
    assert result.exit_code == 0, result.output
    expected = {c.config_hash() for c in GridSpec.from_yaml(path).configs}
    hashes = [k.data.tags["gradbench.config_hash"] for k in children(store)]
    assert sorted(hashes) == sorted(expected)  # no duplicate, no missing run
    assert all(k.info.status == "FINISHED" for k in children(store))
    assert all(len(k.data.metrics) > 20 for k in children(store))  # workers logged everything
    # the driver links the dataset first, so the workers find its row instead of racing to insert it
    (parent,) = parents(store)
    assert [d.dataset.name for d in parent.inputs.dataset_inputs] == ["mnist"]
    assert all(len(k.inputs.dataset_inputs) == 1 for k in children(store))


@pytest.mark.e2e
def test_grid_killed_outright_resumes_without_duplicates(store, mnist_dir, tmp_path, tracking_uri):
    spec = {"name": "killme", "base": {**TINY_BASE, "width": 64, "max_steps": 40},
            "axes": {"activation": ["relu", "tanh", "elu", "gelu"], "init": ["default", "he_normal"]}}
    path = write_spec(tmp_path, spec)
    expected = {c.config_hash() for c in GridSpec.from_yaml(path).configs}
    cmd = [sys.executable, "-m", "pipeline", "grid", str(path), "--data-dir", str(mnist_dir), "--experiment", store,
           "--no-progress"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and sum(k.info.status == "FINISHED" for k in children(store)) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = {k.data.tags["gradbench.config_hash"] for k in children(store) if k.info.status == "FINISHED"}
    assert 2 <= len(first) < len(expected)

    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{len(first)} already finished" in resumed.stdout
    finished = [k.data.tags["gradbench.config_hash"] for k in children(store) if k.info.status == "FINISHED"]
    assert sorted(finished) == sorted(expected)
    assert all(k.info.status in ("FINISHED", "FAILED") for k in children(store))  # nothing left RUNNING
    (parent,) = parents(store)  # the interrupted parent was resumed, not duplicated
    assert parent.info.status == "FINISHED"


def test_an_axis_of_mappings_sets_keys_together():
    spec = GridSpec.from_dict({"axes": {"depth": [3, 4], "clipping": [{"clip": "none"}, {"clip": "agc", "clip_threshold": 0.01}]},
                               "exclude": [{"clip": "agc", "depth": 4}]})
    assert sorted((c.depth, c.clip, c.clip_threshold) for c in spec.configs) == [
        (3, "agc", 0.01), (3, "none", 1.0), (4, "none", 1.0)]


@pytest.mark.e2e
def test_mlflow_run_main_runs_a_grid_under_the_project_run(store, mnist_dir, tmp_path):
    """`mlflow run .` (main): the project run becomes the grid's parent; children nest under it."""
    path = write_spec(tmp_path, {"name": "tiny", "base": TINY_BASE, "axes": {"activation": ["relu", "tanh"]}})
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local", "--experiment-name", store,
           "-P", f"spec={path}", "-P", f"data_dir={mnist_dir}", "-P", f"out_dir={tmp_path / 'reports'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (parent,) = parents(store)
    assert parent.info.run_name == "tiny" and parent.data.params["spec"] == str(path)
    # mlflow run ends its run after the grid's process: the next command must not mark it stale
    assert parent.info.status == "FINISHED" and "mlflow.project.entryPoint" in parent.data.tags
    kids = children(store)
    assert len(kids) == 2 and all(k.data.tags["mlflow.parentRunId"] == parent.info.run_id for k in kids)
    # ... and ends with the report, in reports/ and as an artifact of the project run
    assert list((tmp_path / "reports").glob("tiny-*.html"))
    assert [a.path for a in MlflowClient().list_artifacts(parent.info.run_id, "report")]


def test_a_spec_rebuilds_from_its_logged_source():
    spec = GridSpec.from_dict({"name": "x", "axes": {"depth": [3, 4]}, "seeds": 2})
    again = GridSpec.from_dict(yaml.safe_load(spec.source))
    assert again.spec_hash == spec.spec_hash and again.name == "x"


@pytest.mark.e2e
def test_sigterm_marks_the_open_run_killed_and_the_grid_resumes(store, mnist_dir, tmp_path, tracking_uri):
    # Runs of several seconds, so that the signal lands inside one (a short run may end before it arrives).
    spec = {"name": "term", "base": {**TINY_BASE, "width": 128, "max_steps": 1500, "train_subset": 12800,
                                     "epochs": 20, "log_every": 50},
            "axes": {"activation": ["relu", "tanh"]}}
    path = write_spec(tmp_path, spec)
    cmd = [sys.executable, "-m", "pipeline", "grid", str(path), "--data-dir", str(mnist_dir), "--experiment", store,
           "--no-progress"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(k.info.status == "RUNNING" for k in children(store)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    statuses = Counter(k.info.status for k in children(store))
    assert statuses["KILLED"] == 1 and statuses["RUNNING"] == 0
    (parent,) = parents(store)
    assert parent.info.status == "KILLED"
    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    finished = [k.data.tags["gradbench.config_hash"] for k in children(store) if k.info.status == "FINISHED"]
    assert sorted(finished) == sorted(c.config_hash() for c in GridSpec.from_yaml(path).configs)


ENSEMBLE_SPEC = {"name": "ens", "base": {"depth": 4, "width": 32, "train_subset": 640, "batch_size": 64, "max_steps": 6},
                 "axes": {"init": ["default", "xavier_normal", "he_normal"]}, "seeds": 2}


@pytest.mark.e2e
def test_grid_with_ensembles_logs_each_member_as_its_own_run(store, mnist_dir, tmp_path):
    path = write_spec(tmp_path, ENSEMBLE_SPEC)
    for mode, experiment in (("on", store), ("off", store + "-seq")):
        result = grid_cli(path, experiment, mnist_dir, "--ensemble", mode)
        assert result.exit_code == 0, result.output
    ours = {r.data.tags["gradbench.config_hash"]: r for r in children(store)}
    theirs = {r.data.tags["gradbench.config_hash"]: r for r in children(store + "-seq")}
    assert len(ours) == 6 and set(ours) == set(theirs)
    assert {r.data.tags["gradbench.group_size"] for r in ours.values()} == {"6"}
    assert len({r.data.tags["gradbench.group"] for r in ours.values()}) == 1
    assert {r.data.tags["gradbench.group_size"] for r in theirs.values()} == {"1"}
    for h, run in ours.items():
        assert run.info.status == "FINISHED"
        assert set(run.data.metrics) == set(theirs[h].data.metrics)  # exactly the metrics of a run alone
        assert run.data.params == theirs[h].data.params
        assert run.data.metrics["train/loss"] == pytest.approx(theirs[h].data.metrics["train/loss"], rel=1e-4)


@pytest.mark.e2e
def test_two_workers_train_groups(store, mnist_dir, tmp_path):
    spec = {**ENSEMBLE_SPEC, "axes": {**ENSEMBLE_SPEC["axes"], "activation": ["relu", "tanh"]}}
    path = write_spec(tmp_path, spec)
    result = grid_cli(path, store, mnist_dir, "--workers", "2", "--ensemble", "on")
    assert result.exit_code == 0, result.output
    runs = children(store)
    expected = sorted(c.config_hash() for c in GridSpec.from_yaml(path).configs)
    assert sorted(r.data.tags["gradbench.config_hash"] for r in runs) == expected  # one run per config
    assert all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.tags["gradbench.group_size"] for r in runs} == {"6"}  # one group per activation
    assert len({r.data.tags["gradbench.group"] for r in runs}) == 2
    assert len({r.data.tags["gradbench.pid"] for r in runs}) >= 1 and str(os.getpid()) not in {
        r.data.tags["gradbench.pid"] for r in runs}  # trained by the workers


def test_a_name_with_quotes_and_dots_is_data_not_syntax(store, mnist_dir, tmp_path):
    """A grid name goes into tags and the report's metadata, never into MLflow's filter language
    or a path: it runs, resumes, and reports inside --out-dir. (A path separator is refused:
    tests/test_bad_input.py.)"""
    name = "it's \"quoted\" OR 1=1 -- ..elsewhere.."
    path = write_spec(tmp_path, {"name": name, "base": TINY_BASE, "axes": {"depth": [3]}})
    for expected in ("0 already finished", "1 already finished"):
        result = grid_cli(path, store, mnist_dir)
        assert result.exit_code == 0, result.output
        assert expected in result.output
    out = tmp_path / "reports"
    result = CliRunner().invoke(cli, ["report", "--experiment", store, "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    written = [p for p in tmp_path.rglob("*.html") if "artifacts" not in p.parts]  # the store's copy aside
    assert written and all(out in p.parents and ".." not in p.name for p in written)


@pytest.mark.e2e
def test_runs_of_another_numbers_version_are_not_reused(store, mnist_dir, tmp_path):
    """A FINISHED run made by code that computed differently (another NUMBERS_VERSION) is run again,
    and the grid says so; this version's runs are reused."""
    path = write_spec(tmp_path, {"base": TINY_BASE, "axes": {"depth": [3, 4]}})
    assert grid_cli(path, store, mnist_dir).exit_code == 0
    children = [r for r in runs_of(store) if "gradbench.config_hash" in r.data.tags]
    assert {r.data.tags["gradbench.numbers_version"] for r in children} == {str(NUMBERS_VERSION)}
    MlflowClient().set_tag(children[0].info.run_id, "gradbench.numbers_version", "1")  # as if an older gradbench
    result = grid_cli(path, store, mnist_dir)
    assert result.exit_code == 0, result.output
    assert "1 already finished, 1 to run" in result.output and "another numbers version" in result.output
    finished = Counter(r.data.tags["gradbench.config_hash"] for r in runs_of(store)
                       if r.info.status == "FINISHED" and "gradbench.config_hash" in r.data.tags)
    assert sorted(finished.values()) == [1, 2]  # the old run is kept; its config ran once more


def test_a_prediction_that_overflows_is_absent_and_the_run_is_what_it_was(store, mnist_dir, tmp_path):
    """--init-std 1e300: the theory's arithmetic overflows; the run is recorded (diverged, FINISHED)
    with no theory metric and the reason in a tag, not FAILED."""
    path = write_spec(tmp_path, {"name": "extreme", "base": {**TINY_BASE, "init": "normal", "init_std": 1e300}})
    result = grid_cli(path, store, mnist_dir)
    assert result.exit_code == 0, result.output
    (run,) = children(store)
    assert run.info.status == "FINISHED" and run.data.tags["gradbench.outcome"] == "diverged"
    assert "OverflowError" in run.data.tags["gradbench.theory_absent"]
    assert not [k for k in run.data.metrics if k.startswith("theory/")]


def test_a_member_whose_record_fails_fails_alone(store, mnist_dir, tmp_path, monkeypatch):
    """In a group, one member's analysis raises: that run is FAILED and counted failed, its group's
    other members are FINISHED and counted finished (the grid's count and MLflow agree)."""
    from pipeline import run as run_module

    analyse = run_module.analyse

    def broken_for_seed_1(config, result):
        if config.seed == 1:
            raise RuntimeError("injected")
        return analyse(config, result)

    monkeypatch.setattr(run_module, "analyse", broken_for_seed_1)
    path = write_spec(tmp_path, {"name": "onefails", "base": TINY_BASE, "seeds": 3})
    result = grid_cli(path, store, mnist_dir, "--ensemble", "on")
    assert "1 failed" in result.output and "RuntimeError: injected" in result.output, result.output
    status = {int(r.data.params["seed"]): r.info.status for r in children(store)}
    assert status == {0: "FINISHED", 1: "FAILED", 2: "FINISHED"}
    assert len({r.data.tags["gradbench.group"] for r in children(store)}) == 1  # trained as one group


@pytest.mark.e2e
def test_two_grids_whose_names_slug_alike_get_a_report_each(store, mnist_dir, tmp_path):
    """Non-ASCII names all slug to 'unnamed': two such grids reported on one day must not write one
    file (and index.html must list both)."""
    out = tmp_path / "reports"
    for name in ("勾配", "градиент"):
        path = write_spec(tmp_path, {"name": name, "base": TINY_BASE, "axes": {"depth": [3]}}, name=f"{len(name)}.yaml")
        assert grid_cli(path, store, mnist_dir).exit_code == 0
        (parent,) = [p for p in parents(store) if p.data.tags["gradbench.grid"] == name]
        result = CliRunner().invoke(cli, ["report", "--experiment", store, "--grid-run", parent.info.run_id,
                                          "--out-dir", str(out)])
        assert result.exit_code == 0, result.output
    reports = sorted(p.name for p in out.glob("*.html") if p.name != "index.html")
    assert len(reports) == 2 and all(r.startswith("unnamed-") for r in reports), reports
    index = (out / "index.html").read_text()
    assert all(r in index for r in reports)
