"""Benchmark: `python -m dkn attribute` on an already cached fact, with and without the memo.

Before the memo, every CLI call loaded the model (torch, transformers, 517 MB of weights) just to get
its fingerprint for the cache key.  Now `dkn.memo` remembers, per model folder state, which store key a
request led to, and a repeated request is answered without importing torch.  This script measures,
interleaved in rounds (the machine may be shared: compare the ratios, not the seconds):

* `memo hit`: the cached call as it runs now;
* `no memo`: the same call with the memo entries deleted first, i.e. the old path (load the model,
  fingerprint, read the stored result) -- it then remembers again, and the next round deletes again;
* `python -c pass`: the interpreter's own start-up.

Writes bench/results/cli_cache.{json,md}.

    .venv/bin/python bench/bench_cli_cache.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import write_results

from dkn.cache import ResultStore
from dkn.memo import KIND

OUT = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
ARGS = ["-m", "dkn", "attribute", "--prompt", "The capital of France is", "--answer", "Paris", "--steps", "4", "--json"]


def _timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed: {proc.stderr}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dkn-bench-cli-") as cache:
        env = dict(os.environ, DKN_CACHE_DIR=cache, HF_HUB_OFFLINE="1")
        store = ResultStore(Path(cache) / "results.sqlite")
        compute = _timed([sys.executable, *ARGS], env)
        times: dict[str, list[float]] = {"memo hit": [], "no memo": [], "python -c pass": []}
        for _ in range(args.rounds):
            times["memo hit"].append(_timed([sys.executable, *ARGS], env))
            for key in store.keys(kind=KIND):
                store.delete(key)
            times["no memo"].append(_timed([sys.executable, *ARGS], env))
            times["python -c pass"].append(_timed([sys.executable, "-c", "pass"], env))
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "load_average": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "first_compute_s": compute,
        "rounds": args.rounds,
        "seconds": times,
        "median_s": medians,
        "no_memo_over_memo_hit": medians["no memo"] / medians["memo hit"],
    }
    lines = [
        "# A cached `python -m dkn attribute` (SmolLM2-135M, 4 IG steps)",
        "",
        f"{result['date']}, {result['cpu_count']} CPUs, load average {result['load_average'][0]:.1f} "
        "(shared machine: compare ratios)",
        "",
        "| call | median s | runs (s) |",
        "|---|---|---|",
    ]
    lines += [
        f"| {name} | {medians[name]:.2f} | {', '.join(f'{v:.2f}' for v in values)} |" for name, values in times.items()
    ]
    lines += [
        "",
        f"First (computing) call: {compute:.1f} s.  No memo / memo hit: {result['no_memo_over_memo_hit']:.1f}x.",
    ]
    write_results(OUT, "cli_cache", result, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
