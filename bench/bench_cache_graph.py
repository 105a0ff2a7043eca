"""Benchmark: a cache hit against the attribution it saves, and the knowledge-neuron graph of 200 neurons.

Targets: a cache hit returns in under 5% of the compute time (issue "Engine"); the distance
matrix of 200 knowledge neurons on the default model takes well under a second (issue
"Degenerate knowledge neurons").  Prints a table and writes bench/results/cache_graph.{json,md}.

    .venv/bin/python bench/bench_cache_graph.py
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from timing import median_seconds

from dkn.attribution import attribute
from dkn.cache import ResultStore
from dkn.graph import build_graph
from dkn.models import load_model
from dkn.neurons import Neuron

OUT = Path(__file__).resolve().parent / "results"


def main() -> None:
    lm = load_model("default")
    store = ResultStore(Path(tempfile.mkdtemp()) / "bench.sqlite")
    start = time.perf_counter()
    attribute(lm, "The capital of France is", "Paris", store=store)
    compute = time.perf_counter() - start
    hit = median_seconds(lambda: attribute(lm, "The capital of France is", "Paris", store=store), 20)
    rng = np.random.default_rng(0)
    neurons = list(
        dict.fromkeys(
            Neuron(int(l), int(i)) for l, i in zip(rng.integers(0, lm.n_layers, 400), rng.integers(0, lm.d_mlp, 400))
        )
    )[:200]
    graph_s = median_seconds(lambda: build_graph(lm, neurons), 10)
    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "attribution_compute_s": compute,
        "cache_hit_s": hit,
        "hit_share_of_compute": hit / compute,
        "graph_200_neurons_s": graph_s,
        "pass": hit / compute < 0.05 and graph_s < 1.0,
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "cache_graph.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Cache hit and knowledge-neuron graph on the default model",
        "",
        f"{result['date']}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
        "",
        "| what | seconds | target |",
        "|---|---|---|",
        f"| attribution, computed (IG, 20 steps, all 46,080 neurons) | {compute:.3f} | |",
        f"| attribution, cache hit | {hit:.4f} | < 5% of computed: {100 * hit / compute:.2f}% |",
        f"| graph distance matrix, 200 neurons | {graph_s:.4f} | well under 1 s |",
        "",
        "PASS" if result["pass"] else "FAIL",
    ]
    (OUT / "cache_graph.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
