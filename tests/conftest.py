"""Shared fixtures.

`default_lm` is the real default model (SmolLM2-135M), loaded once per session from the converted
safetensors under `cache/models/`.  `load_model("default")` finds that folder through
`dkn.models.cache_dir()`, which honours DKN_CACHE_DIR, so DKN_CACHE_DIR is *not* redirected for it;
tests that would write results get an explicit `ResultStore` under tmp_path (`store`) or the
`isolated_cache_dir` fixture instead.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:          # `import tiny_models` from every test module
    sys.path.insert(0, str(TESTS))


@pytest.fixture(scope="session")
def default_lm():
    from dkn.models import cache_dir, load_model

    folder = cache_dir() / "models" / "smollm2-135m-instruct"
    if not (folder / "model.safetensors").exists():
        pytest.skip(f"the converted default model is missing from {folder}: run `make setup`")
    return load_model("default", device="cpu")


@pytest.fixture
def store(tmp_path):
    from dkn.cache import ResultStore

    return ResultStore(tmp_path / "store" / "results.sqlite")


@pytest.fixture
def isolated_cache_dir(tmp_path, monkeypatch):
    """DKN_CACHE_DIR pointing at an empty tmp folder, for code that writes the default cache
    (never combine with the default model: it is read from the cache folder)."""
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
