"""Shared by the benchmark scripts: median wall time of a call after one warm-up, and writing a result as
NAME.json and NAME.md."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: lazy initialisation, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_results(folder: Path, name: str, result: dict, markdown: str) -> None:
    """Write `result` as folder/NAME.json (indented) and the report `markdown` as folder/NAME.md."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(result, indent=2))
    (folder / f"{name}.md").write_text(markdown)
