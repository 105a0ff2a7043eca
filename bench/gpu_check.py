"""On a machine with CUDA: every attribution rule/method/baseline, every intervention mode and the
degeneracy grid on the default model, on CUDA and on the CPU; compares the results and prints the speed.

    .venv/bin/python bench/gpu_check.py                 # exits 2 with a message when there is no CUDA
    .venv/bin/python bench/gpu_check.py --dtype bfloat16

Writes bench/results/gpu_check.json and bench/results/gpu_check.md.  Exit status 1 when a CUDA result
disagrees with the CPU one beyond the tolerances printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT, ANSWER = "The capital of France is", "Paris"
NEURONS = [(20, 100), (25, 7), (29, 1000)]
# float32 on both sides: different kernels and summation orders only
TOLERANCE = {
    "float32": {"scores_corr": 0.999, "prob_rel": 1e-3},
    "bfloat16": {"scores_corr": 0.99, "prob_rel": 5e-2},
    "float16": {"scores_corr": 0.99, "prob_rel": 5e-2},
}


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def _cases():
    from dkn.attribution import BASELINES, METHODS, AttributionParams
    from dkn.integration import RULES

    for method in METHODS:
        for baseline in BASELINES:
            for rule in RULES if method == "ig" else ("midpoint",):
                yield (
                    f"attribute {method}/{baseline}/{rule}",
                    AttributionParams(method=method, rule=rule, baseline=baseline),
                )


def run(lm, label: str) -> dict:
    from dkn.attribution import attribute
    from dkn.degeneracy import DegeneracyParams, analyse
    from dkn.interventions import MODES, intervene_many
    from dkn.neurons import Neuron

    out = {}
    for name, params in _cases():
        attribute(lm, PROMPT, ANSWER, params)  # warm-up
        result, seconds = _timed(lambda p=params: attribute(lm, PROMPT, ANSWER, p))
        out[name] = {"scores": result.scores, "prob": result.prob, "seconds": seconds}
        print(f"  [{label}] {name}: {seconds:.2f} s", flush=True)
    sets = [[Neuron(*n)] for n in NEURONS] + [[Neuron(*n) for n in NEURONS]]
    for mode in MODES:
        for factor in (0.0, 2.0):
            (clean, probs), seconds = _timed(lambda m=mode, f=factor: intervene_many(lm, PROMPT, ANSWER, sets, f, m))
            out[f"intervene {mode} x{factor:g}"] = {"probs": np.append(clean, probs), "seconds": seconds}
    top = attribute(lm, PROMPT, ANSWER).top(12)
    neurons, scores = [n for n, _ in top], [s for _, s in top]
    grid, seconds = _timed(lambda: analyse(lm, PROMPT, ANSWER, neurons, scores, DegeneracyParams(random_seeds=3)))
    out["degeneracy grid"] = {"probs": np.array([grid.union_drop, *grid.single_drops]), "seconds": seconds}
    return out


def compare(cpu: dict, gpu: dict, tol: dict) -> list[dict]:
    rows = []
    for name, c in cpu.items():
        g = gpu[name]
        row = {"check": name, "cpu_s": c["seconds"], "cuda_s": g["seconds"], "speedup": c["seconds"] / g["seconds"]}
        if "scores" in c:
            corr = float(np.corrcoef(c["scores"].ravel(), g["scores"].ravel())[0, 1])
            rel = abs(g["prob"] - c["prob"]) / c["prob"]
            row.update(scores_corr=corr, prob_rel=rel, ok=bool(corr >= tol["scores_corr"] and rel <= tol["prob_rel"]))
        else:
            diff = float(np.max(np.abs(c["probs"] - g["probs"]) / np.maximum(np.abs(c["probs"]), 1e-6)))
            row.update(max_rel=diff, ok=bool(diff <= tol["prob_rel"] * 10))
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=tuple(TOLERANCE))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device is visible to torch (torch.cuda.is_available() is False); "
            "run this on a machine with an NVIDIA GPU. Nothing was measured.",
            file=sys.stderr,
        )
        return 2
    from dkn.models import load_model

    print(f"CPU (float32) vs CUDA ({args.dtype}) on the default model, {torch.cuda.get_device_name(0)}")
    cpu = run(load_model("default", device="cpu"), "cpu")
    gpu = run(load_model("default", device="cuda", dtype=args.dtype), "cuda")
    rows = compare(cpu, gpu, TOLERANCE[args.dtype])
    report = {
        "device": torch.cuda.get_device_name(0),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "tolerance": TOLERANCE[args.dtype],
        "rows": rows,
    }
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "gpu_check.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"# CUDA vs CPU on the default model ({report['device']}, CUDA weights {args.dtype})",
        "",
        "| check | CPU s | CUDA s | speed-up | agreement | ok |",
        "|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        agree = (
            f"corr {r['scores_corr']:.5f}, P rel {r['prob_rel']:.1e}"
            if "scores_corr" in r
            else f"max rel {r['max_rel']:.1e}"
        )
        lines.append(
            f"| {r['check']} | {r['cpu_s']:.2f} | {r['cuda_s']:.3f} | {r['speedup']:.1f}x | {agree} | "
            f"{'yes' if r['ok'] else 'NO'} |"
        )
    (results / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
