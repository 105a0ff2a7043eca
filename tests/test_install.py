"""`pip install .` (not editable) into a fresh virtual environment gives a working `dkn` command whose
folders point where they should: results into the user cache, never into site-packages or the checkout.

Offline and quick: the venv is made without pip, and sees this environment's packages (torch, pip,
setuptools, ...) through a .pth file, so only dkn itself is built and installed (`--no-deps
--no-build-isolation --no-index`).  The source is copied first, so the build writes nothing into the
working tree.  Also: the single-sourced version and the folders of `dkn.paths` in a checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, venv bin folder, an environment with a private HOME) after `pip install .`."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    shutil.copytree(REPO / "dkn", src / "dkn", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_outer_env.pth").write_text("\n".join(sorted(outer)) + "\n")  # plain paths: no editable finders
    home = tmp / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DKN_", "PYTHON", "XDG_"))}
    env.update(
        HOME=str(home), HF_HUB_OFFLINE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="1"
    )
    _run(
        [str(py), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", str(src)],
        cwd=tmp,
        env=env,
    )
    return py, venv / "bin", env, site, tmp


def test_console_script_and_folders(installed):
    py, bin_, env, site, tmp = installed
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    assert _run([str(bin_ / "dkn"), "--help"], cwd=elsewhere, env=env).stdout.startswith("usage:")
    folders = json.loads(_run([str(bin_ / "dkn"), "paths", "--json"], cwd=elsewhere, env=env).stdout)
    package = Path(folders["package"])
    assert package == site / "dkn" and (package / "data" / "builtin_facts.json").is_file()  # package data shipped
    assert folders["checkout"] == ""
    home = Path(env["HOME"])
    assert Path(folders["cache"]) == home / ".cache" / "dkn"
    assert Path(folders["models"]) == home / ".cache" / "dkn" / "models"
    assert Path(folders["results"]) == elsewhere / "results"
    assert not Path(folders["cache"]).is_relative_to(site) and not Path(folders["cache"]).is_relative_to(REPO)
    version = _run(
        [str(py), "-c", "import importlib.metadata as m, dkn; print(m.version('dkn'), dkn.__version__)"],
        cwd=elsewhere,
        env=env,
    ).stdout.split()
    assert version[0] == version[1] == folders["version"]
    with_env = dict(env, DKN_CACHE_DIR=str(tmp / "c"), DKN_MODELS_DIR=str(tmp / "m"), DKN_DATA=str(tmp / "d"))
    moved = json.loads(_run([str(bin_ / "dkn"), "paths", "--json"], cwd=elsewhere, env=with_env).stdout)
    assert (moved["cache"], moved["models"], moved["data"]) == (str(tmp / "c"), str(tmp / "m"), str(tmp / "d"))


def test_installed_command_attributes_and_caches_in_the_user_cache(installed):
    """A real small command from another folder: a tiny saved model, attributed, stored in ~/.cache/dkn."""
    sys.path.insert(0, str(REPO / "tests"))
    from cli_support import fact_argv, save_model_folder
    from tiny_models import tiny_model

    py, bin_, env, site, tmp = installed
    folder = save_model_folder(tiny_model("gpt2"), tmp / "tiny-model")
    work = tmp / "work"
    work.mkdir()
    fact = fact_argv("attribute", folder, "the capital of france is", "paris", "--steps", "2", "--top", "3", "--json")
    argv = [str(bin_ / "dkn"), *fact]
    first = json.loads(_run(argv, cwd=work, env=env).stdout)
    again = json.loads(_run(argv, cwd=work, env=env).stdout)
    assert (first["n_layers"], first["d_mlp"], len(first["top"])) == (3, 128, 3)
    assert first["cached"] is False and again["cached"] is True and again["top"] == first["top"]
    assert (Path(env["HOME"]) / ".cache" / "dkn" / "results.sqlite").is_file()
    assert not list(site.glob("**/results.sqlite")) and not (site / "cache").exists()
    assert sorted(p.name for p in work.iterdir()) == []  # nothing written into the cwd either
    builtin = _run(
        [str(py), "-c", "from dkn.datasets import builtin_facts; print(len(builtin_facts()))"], cwd=work, env=env
    ).stdout
    assert int(builtin) > 100


def test_checkout_folders(monkeypatch, tmp_path):
    """From a checkout: the repository's cache/, cache/models/ and results/; models never follow DKN_CACHE_DIR."""
    from dkn import paths

    for name in (paths.ENV_CACHE, paths.ENV_MODELS, paths.ENV_RESULTS, paths.ENV_DATA):
        monkeypatch.delenv(name, raising=False)
    assert paths.checkout_root() == REPO
    assert (paths.cache_dir(), paths.models_dir(), paths.results_dir()) == (
        REPO / "cache",
        REPO / "cache" / "models",
        REPO / "results",
    )
    assert paths.data_root() == (REPO.parent / "shared" / "data").resolve()
    monkeypatch.setenv(paths.ENV_CACHE, str(tmp_path / "fresh"))
    assert paths.cache_dir() == tmp_path / "fresh"
    assert paths.models_dir() == REPO / "cache" / "models"  # a fresh cache still finds the models
    assert paths.model_folder("default") == REPO / "cache" / "models" / "smollm2-135m-instruct"
    assert paths.model_folder("gpt2") is None


def test_version_is_single_sourced():
    import tomllib

    import dkn

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "dkn.__version__"
    }
    assert dkn.__version__.count(".") == 2
