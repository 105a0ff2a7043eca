"""Shared fixtures.

`default_lm` is the real default model (SmolLM2-135M), loaded once per session from the converted
safetensors under `dkn.paths.models_dir()` (`$DKN_MODELS_DIR`, else the checkout's `cache/models/`),
which does not depend on DKN_CACHE_DIR; tests that would write results get an explicit `ResultStore`
under tmp_path (`store`) or the `isolated_cache_dir` fixture.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # `import tiny_models` from every test module
    sys.path.insert(0, str(TESTS))


@pytest.fixture(scope="session")
def default_lm():
    from dkn.models import load_model
    from dkn.paths import model_folder

    folder = model_folder("default")
    if not (folder / "model.safetensors").exists():
        pytest.skip(f"the converted default model is missing from {folder}: run `make setup`")
    return load_model("default", device="cpu")


@pytest.fixture
def store(tmp_path):
    from dkn.cache import ResultStore

    return ResultStore(tmp_path / "store" / "results.sqlite")


@pytest.fixture
def isolated_cache_dir(tmp_path, monkeypatch):
    """DKN_CACHE_DIR pointing at an empty tmp folder, for code that writes the default cache (the
    converted models stay where they are: they live in `dkn.paths.models_dir()`)."""
    folder = tmp_path / "dkn-cache"
    folder.mkdir()
    monkeypatch.setenv("DKN_CACHE_DIR", str(folder))
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's duration: on a small shared machine that is several times faster
    for the tiny models.  Opt-in (`pytestmark = pytest.mark.usefixtures("one_thread")`), not global: the
    thread count changes float summation order, which some tolerances elsewhere are sensitive to."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models():
    """family -> a tiny random model of that family, built once per test module."""
    from tiny_models import tiny_model

    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = tiny_model(family)
        return cache[family]

    return get
