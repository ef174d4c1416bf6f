"""The project installs as a package: installed non-editable, the CLI runs and the model
architectures load from a folder outside the repository."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The working tree without what is not source (pip would also build inside the copy, not here).
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "state", "build", "*.egg-info", "__pycache__", ".*_cache"
)

pytestmark = pytest.mark.slow  # a package build and two fresh interpreters: about 20 s


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """(target folder, a folder outside the repository, the environment that imports target)."""
    tmp = tmp_path_factory.mktemp("install")
    source, target, outside = tmp / "source", tmp / "target", tmp / "outside"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation"]
    pip += ["--no-index", "--quiet", "--target", str(target), str(source)]
    subprocess.run(pip, check=True, capture_output=True, timeout=120)
    outside.mkdir()
    # The target first: the venv's editable install of this repository must not be imported.
    env = os.environ | {"PYTHONPATH": str(target)}
    return target, outside, env


def run(args: list[str], outside: Path, env: dict[str, str]) -> str:
    result = subprocess.run(args, cwd=outside, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_config_show_runs_from_the_installed_cli(installed):
    target, outside, env = installed
    (outside / "build.yaml").write_text("name: installed\nurls: urls.parquet\n")
    shown = run(
        [str(target / "bin" / "mmpipe"), "config", "show", "--config", "build.yaml"], outside, env
    )
    assert "name: installed" in shown
    assert "model: clip-scorer-tiny" in shown


def test_architectures_ship_inside_the_package(installed):
    target, outside, env = installed
    code = """
import dataprep, pipelines.cli, training.models.dvae
from training.models.clip import create_clip
from training.models.dalle import DalleConfig
from training.models.dvae import DVAEConfig

bundle = create_clip("clip-tiny")
assert bundle.name == "clip-tiny" and bundle.context_length > 0
DVAEConfig.named("dvae-tiny")
DalleConfig.named("dalle-tiny")
for module in (dataprep, pipelines.cli, training.models.dvae):
    print(module.__file__)
"""
    files = run([sys.executable, "-c", code], outside, env).split()
    assert len(files) == 3
    assert all(Path(f).is_relative_to(target) for f in files), files
