"""Benchmark: facts per minute of an experiment run on Ray with 1 and 2 workers, against the plain local run.

Every configuration runs the same experiment on the same facts, from an empty store each time (so
every fact is computed), one torch thread per worker and in the local run.  Rounds interleave the
configurations (their order rotates each round) because the machine may be shared; medians and
ratios are reported, with the scaling efficiency

    efficiency(N workers) = rate(N workers) / (N x rate(1 worker))      (and / (N x rate(local)))

Ray start-up and the workers' model loading are timed separately and left out of the rates (they are
paid once per run, not per fact).  The local Ray is started with one logical CPU per worker of every
pool (3 for workers 1,2), so that the pools can stay up between rounds; each worker still runs one
thread.  Prints a table and writes bench/results/scale.{json,md}.

    nice -n 10 .venv/bin/python bench/bench_scale.py                       # default model, 4 facts, 1 round
    .venv/bin/python bench/bench_scale.py --facts 12 --rounds 3            # on an idle machine
    .venv/bin/python bench/bench_scale.py --model path/to/folder --experiment robustness
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch

from dkn.cache import ResultStore
from dkn.experiments import runner
from dkn.experiments.distributed import ClusterSpec, WorkerPool
from dkn.models import load_model

OUT = Path(__file__).resolve().parent / "results"
LOCAL = "local (1 thread)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="'default' or a local model folder")
    parser.add_argument("--experiment", default="complexity")
    parser.add_argument("--dataset", default="builtin")
    parser.add_argument("--facts", type=int, default=4, help="facts per run (the experiment's limit)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    parser.add_argument("--param", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--nice", type=int, default=10, help="lower this process's priority (and Ray's) first")
    args = parser.parse_args()
    if args.nice:
        os.nice(args.nice)
    torch.set_num_threads(1)
    counts = [int(n) for n in args.workers.split(",")]
    runner._write_static = lambda figure, stem: False  # no Kaleido/Chromium in the timings
    load_before = os.getloadavg()
    lm = load_model(args.model, device="cpu")
    params = runner.make_params(args.experiment, args.param)

    start = time.perf_counter()
    ray.init(num_cpus=sum(counts), include_dashboard=False, log_to_driver=False)
    startup = {"ray_init_s": time.perf_counter() - start}
    pools = {}
    try:
        for n in counts:
            start = time.perf_counter()
            pools[f"Ray, {n} worker{'s' * (n > 1)}"] = WorkerPool(lm, ClusterSpec(workers=n, threads=1))
            startup[f"pool_{n}_ready_s"] = time.perf_counter() - start
        configs = [LOCAL, *pools]
        runs = {c: [] for c in configs}
        summaries = {}
        with tempfile.TemporaryDirectory(prefix="dkn-bench-scale-") as tmp:
            for r in range(args.rounds):
                order = configs[r % len(configs) :] + configs[: r % len(configs)]
                for config in order:
                    folder = Path(tmp) / f"{r}-{configs.index(config)}"
                    start = time.perf_counter()
                    report, _ = runner.run_experiment(
                        args.experiment,
                        lm,
                        args.dataset,
                        limit=args.facts,
                        params=params,
                        store=ResultStore(folder / "results.sqlite"),
                        out_dir=folder / "out",
                        command="bench",
                        cluster=pools.get(config),
                    )
                    seconds = time.perf_counter() - start
                    runs[config].append(seconds)
                    summaries[config] = report.summary
                    print(
                        f"round {r + 1}: {config:<16} {seconds:7.1f} s  {60 * args.facts / seconds:6.2f} facts/min",
                        flush=True,
                    )
    finally:
        for pool in pools.values():
            pool.close()
        ray.shutdown()
    result = _result(args, lm, counts, runs, startup, summaries, load_before)
    OUT.mkdir(exist_ok=True)
    (OUT / "scale.json").write_text(json.dumps(result, indent=2))
    (OUT / "scale.md").write_text(_markdown(result))
    print(_markdown(result))


def _result(args, lm, counts, runs, startup, summaries, load_before) -> dict:
    rates = {c: 60 * args.facts / statistics.median(s) for c, s in runs.items()}
    one = rates.get("Ray, 1 worker")
    rows = []
    for config, rate in rates.items():
        n = 1 if config == LOCAL else int(config.split(", ")[1].split()[0])
        rows.append(
            {
                "config": config,
                "workers": 0 if config == LOCAL else n,
                "seconds": runs[config],
                "median_s": statistics.median(runs[config]),
                "facts_per_min": rate,
                "speedup_vs_local": rate / rates[LOCAL],
                "efficiency_vs_1_worker": rate / (n * one) if one and config != LOCAL else None,
                "efficiency_vs_local": rate / (n * rates[LOCAL]) if config != LOCAL else None,
            }
        )
    reference = _results_json(summaries[LOCAL])
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "load_average_before": load_before[0],
        "load_average_after": os.getloadavg()[0],
        "shared_machine_note": (
            "other jobs shared these cores: compare the ratios, not the absolute rates"
            if max(load_before[0], os.getloadavg()[0]) > 1.5
            else "the machine was otherwise idle"
        ),
        "niced": args.nice,
        "model": lm.label,
        "experiment": args.experiment,
        "dataset": args.dataset,
        "facts": args.facts,
        "rounds": args.rounds,
        "params": args.param,
        "startup": startup,
        "rows": rows,
        "same_summary_as_local": {c: _results_json(s) == reference for c, s in summaries.items()},
    }


def _results_json(summary: dict) -> str:
    """The summary as JSON without its timings (keys ending in "seconds": the run's stage timings, which a Ray
    run's driver does not have and no two runs share), so that equal results compare equal."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not k.endswith("seconds")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return json.dumps(strip(summary), sort_keys=True, default=str)


def _markdown(result: dict) -> str:
    lines = [
        f"# Experiment throughput on Ray: {result['experiment']} on {result['model']}",
        "",
        (
            f"{result['date']}, {result['machine']}, {result['cores']} cores, torch {result['torch']}, "
            f"ray {result['ray']}; {result['facts']} facts of `{result['dataset']}` per run, "
            f"{result['rounds']} round(s), one torch thread per worker; niced by {result['niced']}; load "
            f"average {result['load_average_before']:.1f} before, {result['load_average_after']:.1f} after."
        ),
        "",
        f"**{result['shared_machine_note']}.**",
        "",
        "| configuration | median s | facts/min | x local | efficiency vs 1 worker | efficiency vs local |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        eff1 = "" if row["efficiency_vs_1_worker"] is None else f"{row['efficiency_vs_1_worker']:.0%}"
        effl = "" if row["efficiency_vs_local"] is None else f"{row['efficiency_vs_local']:.0%}"
        lines.append(
            f"| {row['config']} | {row['median_s']:.1f} | {row['facts_per_min']:.2f} | "
            f"{row['speedup_vs_local']:.2f} | {eff1} | {effl} |"
        )
    start = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f} s" for k, v in result["startup"].items())
    same = ", ".join(f"{c}: {'yes' if v else 'NO'}" for c, v in result["same_summary_as_local"].items())
    lines += [
        "",
        f"Paid once per run, left out of the rates: {start}.",
        "",
        f"Same summary as the local run (exact JSON, timings left out): {same}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
