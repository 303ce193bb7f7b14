"""The MLproject, conda.yaml and pyproject.toml agree with each other and with RunConfig."""

import tomllib
import yaml

from pipeline.config import FIELDS, RunConfig
from tests.conftest import REPO


def test_train_entry_point_parameters_are_the_config_fields_with_their_defaults():
    project = yaml.safe_load((REPO / "MLproject").read_text())
    params = project["entry_points"]["train"]["parameters"]
    assert set(params) == set(FIELDS) | {"data_dir"}
    defaults = RunConfig()
    for name in FIELDS:
        assert str(params[name]["default"]) == str(getattr(defaults, name)), name
        assert f"--{name.replace('_', '-')} {{{name}}}" in project["entry_points"]["train"]["command"]


def test_conda_env_is_python_and_pip_with_the_package_dependencies():
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    conda_deps = [d for d in conda["dependencies"] if isinstance(d, str)]
    assert [d.split("=")[0] for d in conda_deps] == ["python", "pip"]
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert sorted(pip) == sorted(pyproject["project"]["dependencies"])
