"""Shared set-up of the app tests: a private cache folder whose result store holds the default fact, and
the Streamlit server that serves the app from it (the browser tests and bench/bench_app.py).

The folder links `models/` to the repository's converted default model (so nothing is converted again)
and gets its own `results.sqlite`.  Attributions the repository's own store already holds are copied
(same key: same model fingerprint, prompt, answer, parameters and version); the rest are computed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
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


def idle(page, timeout_s: float = 240, settle_s: float = 0.5, poll_s: float = 0.3) -> None:
    """Wait until the app's script run has finished in the Playwright `page` (the status widget shows no
    'Running' and no spinner is left): first `settle_s`, then a look every `poll_s`, for `timeout_s` at most."""
    end = time.time() + timeout_s
    time.sleep(settle_s)
    while time.time() < end:
        if (
            page.locator("[data-testid='stStatusWidget'] :text('Running')").count() == 0
            and page.locator("[data-testid='stSpinner']").count() == 0
        ):
            return
        time.sleep(poll_s)
    raise AssertionError("the app kept running")


def open_app(page, url: str, timeout_ms: int = 180_000, wait=idle) -> None:
    """Go to `url` in `page` and wait, `timeout_ms` at most, for the app's first section ("1 · The fact": the
    model has loaded), then until the script run has finished (`wait`, the `idle` above by default)."""
    page.goto(url)
    page.wait_for_selector("text=1 · The fact", timeout=timeout_ms)
    wait(page)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@contextmanager
def streamlit_server(cache: Path, health_checks: int = 120, **env: str) -> Iterator[str]:
    """Serve app.py from the cache folder `cache` (DKN_CACHE_DIR; extra environment variables in `env`);
    yields its URL once /_stcore/health answers "ok" and stops the server on exit.  Its output goes to
    `cache/streamlit.log`.  Raises RuntimeError with the log's tail when the app does not start within
    `health_checks` attempts."""
    port = free_port()
    log_path = cache / "streamlit.log"
    env = dict(os.environ, DKN_CACHE_DIR=str(cache), BROWSER_PATH=CHROMIUM, **env)
    command = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port)]
    command += ["--server.headless", "true", "--server.address", "localhost"]
    command += ["--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"]
    url = f"http://localhost:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            for _ in range(health_checks):
                try:
                    if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                        break
                except OSError:
                    time.sleep(0.5)
            else:
                raise RuntimeError("the app did not start: " + log_path.read_text()[-2000:])
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
