"""What one batched pass costs beyond its rows: the most that merging paraphrases' rows could save.

Issue 9 asks whether the attribution of a fact's paraphrases should share one batched pass over all their
rows instead of one call per prompt.  A merged pass does the same arithmetic on the same rows (each row's
cost does not depend on which prompt it belongs to); what it saves is the fixed cost of each pass (Python,
hooks, kernel launches, the per-pass setup of `dkn.rows`).  This script measures that fixed cost directly on
the default model: the same attribution (the same rows) split into 1, 2, 3, 4 and 6 passes with `max_rows`,
median of `--repeats` runs each, and a least-squares line seconds = a + b x passes.  The slope b is the
cost of one extra pass; merging the rows of n paraphrases saves at most (n - 1) x b per fact beyond what
splitting by the memory budget already costs, printed as a share of the n separate attributions.

    nice -n 10 .venv/bin/python bench/bench_passes.py [--repeats 3]

Writes bench/results/passes.json and bench/results/passes.md.  Run it on an idle machine: the slope is
a small difference of two timings.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_quadrature import rows_per_layer  # noqa: E402
from timing import median_seconds, write_results  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PROMPT, ANSWER = "The capital of France is", "Paris"
PASSES = (1, 2, 3, 4, 6)
PARAPHRASES = 3  # the experiments attribute up to 3 prompts per fact


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    from dkn.attribution import AttributionParams, attribute
    from dkn.models import load_model

    torch.set_num_threads(os.cpu_count() or 1)
    lm = load_model("default", device="cpu")
    params = AttributionParams()
    n_rows = lm.n_layers * rows_per_layer(params.rule, params.steps) + 1  # (layer, alpha) rows + the shared clean one
    reference = attribute(lm, PROMPT, ANSWER, params, max_rows=10 * n_rows).scores
    rows = []
    for k in PASSES:
        max_rows = -(-n_rows // k)  # ceil: k passes
        scores = attribute(lm, PROMPT, ANSWER, params, max_rows=max_rows).scores
        seconds = median_seconds(lambda m=max_rows: attribute(lm, PROMPT, ANSWER, params, max_rows=m), args.repeats)
        rows.append(
            {
                "passes": k,
                "max_rows": max_rows,
                "seconds": seconds,
                "max_abs_diff": float(np.abs(scores - reference).max()),  # the split changes nothing
            }
        )
        print(f"{k} passes of <= {max_rows} rows: {seconds:.3f} s", flush=True)
    x = np.array([r["passes"] for r in rows], float)
    y = np.array([r["seconds"] for r in rows], float)
    slope, intercept = np.polyfit(x, y, 1)
    one = rows[0]["seconds"]
    saving = (PARAPHRASES - 1) * max(slope, 0.0) / (PARAPHRASES * one)
    result = {
        "model": lm.label,
        "prompt": PROMPT,
        "rows": n_rows,
        "repeats": args.repeats,
        "nproc": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "table": rows,
        "seconds_per_extra_pass": float(slope),
        "intercept_s": float(intercept),
        "paraphrases": PARAPHRASES,
        "max_saving_share": float(saving),
    }
    lines = [
        "# The fixed cost of one batched pass (what merging paraphrases could save)",
        "",
        f"{lm.label}, `{PROMPT}` -> `{ANSWER}`, default attribution ({n_rows} rows), median of {args.repeats}; "
        f"nproc {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        "| passes | rows per pass | s | max abs diff of scores vs one pass |",
        "|---:|---:|---:|---:|",
        *(f"| {r['passes']} | {r['max_rows']} | {r['seconds']:.3f} | {r['max_abs_diff']:.1e} |" for r in rows),
        "",
        f"Fit: seconds = {intercept:.3f} + {slope:.4f} x passes. One extra pass costs {1e3 * slope:.1f} ms; "
        f"merging the rows of {PARAPHRASES} paraphrases into the passes of one would save at most "
        f"{(PARAPHRASES - 1) * 1e3 * max(slope, 0):.0f} ms of {PARAPHRASES * one:.2f} s "
        f"(**{100 * saving:.1f}%**).",
        "",
    ]
    write_results(RESULTS, "passes", result, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
