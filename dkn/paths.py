"""Every folder dkn reads or writes, in one place (no other module derives paths from `__file__`).

* `cache_dir()`: the result store and other per-run caches.  `$DKN_CACHE_DIR`, else the checkout's
  `cache/` when dkn runs from a source checkout, else the user cache directory (`~/.cache/dkn` on Linux).
* `models_dir()`: converted models (hundreds of MB each).  Kept apart from the result cache so that
  pointing `DKN_CACHE_DIR` at a fresh folder never reconverts them: `$DKN_MODELS_DIR`, else the
  checkout's `cache/models/`, else `<user cache>/models`.
* `results_dir()`: experiment reports.  `$DKN_RESULTS_DIR`, else the checkout's `results/`, else
  `./results` under the current folder.
* `data_root()`: the real datasets, never copied into the project.  `$DKN_DATA`, else `../shared/data`
  next to the checkout, else `<user data dir>/data`.
* `package_data(name)`: files shipped inside the package (`dkn/data/`), valid wherever it is installed.

A "checkout" is the folder above the `dkn` package when it holds `pyproject.toml` next to it; after
`pip install .` the package lives in site-packages, where nothing may be written, so the user folders
are used instead.  This module imports nothing heavy (no torch): the CLI's cached answers rely on it.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_CACHE = "DKN_CACHE_DIR"
ENV_MODELS = "DKN_MODELS_DIR"
ENV_RESULTS = "DKN_RESULTS_DIR"
ENV_DATA = "DKN_DATA"

PACKAGE_DIR = Path(__file__).resolve().parent

#: Converted offline models: the name the user types -> the folder under `models_dir()`.
OFFLINE_MODEL_FOLDERS = {"default": "smollm2-135m-instruct", "gemma3-270m": "gemma3-270m"}


def checkout_root() -> Path | None:
    """The source checkout dkn runs from, or None when it is installed as a package."""
    root = PACKAGE_DIR.parent
    return root if (root / "pyproject.toml").is_file() else None


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser() if value else None


def user_cache_root() -> Path:
    """The platform's per-user cache folder for dkn (`~/.cache/dkn` on Linux)."""
    try:
        from platformdirs import user_cache_dir
    except ImportError:  # platformdirs is optional: fall back to the XDG default
        base = _env_path("XDG_CACHE_HOME") or Path.home() / ".cache"
        return base / "dkn"
    return Path(user_cache_dir("dkn", appauthor=False))


def _user_data_root() -> Path:
    try:
        from platformdirs import user_data_dir
    except ImportError:
        base = _env_path("XDG_DATA_HOME") or Path.home() / ".local" / "share"
        return base / "dkn"
    return Path(user_data_dir("dkn", appauthor=False))


def cache_dir() -> Path:
    """Where the result store lives (see the module docstring for the order)."""
    env = _env_path(ENV_CACHE)
    if env is not None:
        return env
    root = checkout_root()
    return root / "cache" if root is not None else user_cache_root()


def models_dir() -> Path:
    """Where converted models live; independent of `DKN_CACHE_DIR`."""
    env = _env_path(ENV_MODELS)
    if env is not None:
        return env
    root = checkout_root()
    return root / "cache" / "models" if root is not None else user_cache_root() / "models"


def model_folder(name: str) -> Path | None:
    """The converted folder of an offline model name ("default", "gemma3-270m"), else None."""
    sub = OFFLINE_MODEL_FOLDERS.get(name)
    return models_dir() / sub if sub is not None else None


def results_dir() -> Path:
    """Where experiment reports go by default."""
    env = _env_path(ENV_RESULTS)
    if env is not None:
        return env
    root = checkout_root()
    return root / "results" if root is not None else Path.cwd() / "results"


def data_root() -> Path:
    """Where the real datasets are read from."""
    env = _env_path(ENV_DATA)
    if env is not None:
        return env
    root = checkout_root()
    if root is not None:
        return (root.parent / "shared" / "data").resolve()
    return _user_data_root() / "data"


def package_data(name: str) -> Path:
    """A file shipped in the package's `data/` folder."""
    return PACKAGE_DIR / "data" / name


def describe() -> dict[str, str]:
    """Every folder, for `dkn paths` and bug reports."""
    root = checkout_root()
    return {
        "checkout": str(root) if root else "",
        "package": str(PACKAGE_DIR),
        "cache": str(cache_dir()),
        "models": str(models_dir()),
        "results": str(results_dir()),
        "data": str(data_root()),
    }
