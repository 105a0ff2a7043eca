"""Shared set-up of the app tests: a private cache folder whose result store holds the default fact.

The folder links `models/` to the repository's converted default model (so nothing is converted again)
and gets its own `results.sqlite`.  Attributions the repository's own store already holds are copied
(same key: same model fingerprint, prompt, answer, parameters and version); the rest are computed.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FRANCE = ("The capital of France is", "The capital city of France is", "The city that is the capital of France is")


def make_cache_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    models = REPO / "cache" / "models"
    models.mkdir(parents=True, exist_ok=True)
    link = root / "models"
    if not link.exists():
        link.symlink_to(models, target_is_directory=True)
    return root


def seed_store(lm, store, prompts, answer: str, params=None) -> None:
    """Make sure `store` holds the attribution of each prompt (copied from the repo store, else computed)."""
    from dkn.attribution import AttributionParams, attribute, attribution_key
    from dkn.cache import ResultStore
    from dkn.query import make_query

    params = params or AttributionParams()
    repo_store_path = REPO / "cache" / "results.sqlite"
    repo_store = ResultStore(repo_store_path) if repo_store_path.exists() else None
    for prompt in prompts:
        key = attribution_key(lm, make_query(lm, prompt, answer), params)
        if store.get(key) is not None:
            continue
        entry = repo_store.get(key) if repo_store is not None else None
        if entry is not None:
            store.put(key, entry.meta, entry.arrays, kind="attribution")
        else:
            attribute(lm, prompt, answer, params, store=store)


class env_var:
    """Set an environment variable for a block (and restore it)."""

    def __init__(self, name: str, value: str) -> None:
        self.name, self.value, self.old = name, value, None

    def __enter__(self):
        self.old = os.environ.get(self.name)
        os.environ[self.name] = self.value
        return self

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop(self.name, None)
        else:
            os.environ[self.name] = self.old
