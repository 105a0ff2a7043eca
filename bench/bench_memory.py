"""Peak memory of one attribution against the prompt's length, on the default model.

Each (code path, prompt length) runs in a fresh subprocess, which loads the default model, attributes
`Paris` for a prompt of N tokens ending in "The capital of France is" with the default parameters, and
reports its peak resident set size (`resource.getrusage(RUSAGE_SELF).ru_maxrss`, which includes the
model, ~0.5 GB, and Python + torch).  Code paths:

- `current`: dkn as it is (shared-prefix attention without per-row copies, rows chunked by
  `lm.memory_budget`);
- `baseline`: the code before the fix: the old attention function (a broadcast matmul that copies the
  prefix's keys/values for every row) registered in its place, and no memory budget (512 rows per pass).
  It needs ~42 MB per prompt token, so by default it runs only for the short prompts (`--baseline-max`).

    nice -n 10 .venv/bin/python bench/bench_memory.py                       # 5, 100, 500, 2000 tokens
    nice -n 10 .venv/bin/python bench/bench_memory.py --lengths 5 100 --baseline-max 100

Writes bench/results/memory.json and bench/results/memory.md.  The machine may be shared: RSS is not
sensitive to that, the seconds are.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:  # this checkout's dkn, not an installed one
    sys.path.insert(0, str(ROOT))
QUESTION, ANSWER = "The capital of France is", "Paris"
FILLER = (
    "In the long history of the continent many cities rose and fell, traders crossed the rivers, "
    "and scholars wrote about the kings, the wars and the harvests of every season. "
)


def old_shared_prefix_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs
):
    """dkn.forward.shared_prefix_attention before the fix (kept here only as the benchmark's baseline)."""
    import torch

    from dkn.forward import _PREFIX

    cache = _PREFIX.get()
    groups = query.shape[1] // key.shape[1]
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    k_new, v_new = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores_self = (query * k_new).sum(-1, keepdim=True) * scaling
    if cache.layers is None:
        scores, v_pre = scores_self, None
    else:
        k_pre, v_pre = cache.layers[module.layer_idx]
        k_pre, v_pre = k_pre.repeat_interleave(groups, 1), v_pre.repeat_interleave(groups, 1)
        scores = torch.cat([torch.matmul(query, k_pre.transpose(2, 3)) * scaling, scores_self], -1)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[..., -scores.shape[-1] :]
    weights = scores.float().softmax(-1).to(query.dtype)
    out = weights[..., -1:] * v_new
    if v_pre is not None:
        out = out + torch.matmul(weights[..., :-1], v_pre)
    return out.transpose(1, 2).contiguous(), None


def prompt_of_length(tokenizer, n_tokens: int) -> str:
    """A prompt of exactly `n_tokens` tokens (filler words, then the question)."""
    words = (FILLER * (1 + n_tokens // 20)).split()
    lo, hi = 0, len(words)
    while lo < hi:  # the most filler words that keep the prompt within n
        mid = (lo + hi + 1) // 2
        if len(tokenizer(" ".join(words[:mid] + [QUESTION]))["input_ids"]) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo] + [QUESTION]) if lo else QUESTION


def child(path: str, n_tokens: int, budget_mb: float | None) -> None:
    """Runs in the subprocess: one attribution, then one JSON line on stdout."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from dkn.attribution import attribute
    from dkn.models import load_model

    lm = load_model("default", device="cpu")
    if path == "baseline":
        from transformers import AttentionInterface

        from dkn.forward import ATTENTION_NAME

        AttentionInterface.register(ATTENTION_NAME, old_shared_prefix_attention)
        lm.memory_budget = 1 << 50
    elif budget_mb is not None:
        lm.memory_budget = int(budget_mb * 2**20)
    prompt = prompt_of_length(lm.tokenizer, n_tokens)
    tokens = len(lm.tokenizer(prompt)["input_ids"])
    after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    result = attribute(lm, prompt, ANSWER)
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is in KiB on Linux
    top = result.top(5)
    print(
        json.dumps(
            {
                "path": path,
                "tokens": tokens,
                "peak_rss_mb": peak,
                "rss_after_load_mb": after_load,
                "seconds": seconds,
                "cpu_seconds_total": usage.ru_utime + usage.ru_stime,
                "memory_budget_mb": lm.memory_budget / 2**20 if path == "current" else None,
                "prob": result.prob,
                "top5": [[n.layer, n.index, s] for n, s in top],
            }
        )
    )


def run_child(path: str, n_tokens: int, budget_mb: float | None, timeout_s: float) -> dict:
    cmd = [sys.executable, __file__, "--child", path, str(n_tokens)]
    if budget_mb is not None:
        cmd += ["--budget-mb", str(budget_mb)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, check=False)
    except subprocess.TimeoutExpired:
        return {"path": path, "tokens": n_tokens, "error": f"timed out after {timeout_s:.0f} s"}
    if done.returncode != 0:
        return {"path": path, "tokens": n_tokens, "error": f"exit {done.returncode}: {done.stderr.strip()[-300:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[5, 100, 500, 2000])
    parser.add_argument(
        "--baseline-max",
        type=int,
        default=100,
        help="run the old code path only up to this many tokens (it needs ~42 MB per token)",
    )
    parser.add_argument("--budget-mb", type=float, default=None, help="lm.memory_budget for the current path")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--child", nargs=2, metavar=("PATH", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.budget_mb)
        return 0
    rows = []
    for n in args.lengths:  # interleaved: baseline then current at each length
        paths = (["baseline"] if n <= args.baseline_max else []) + ["current"]
        for path in paths:
            row = run_child(path, n, args.budget_mb, args.timeout)
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {
        "rows": rows,
        "nproc": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "note": "peak RSS of a fresh process (model + Python + torch included); the machine was shared",
        "issue_baseline_mb": {"5": 1900, "105": 6100, "205": 10300, "3005": "killed at 22500"},
    }
    current = [r for r in rows if r["path"] == "current" and "error" not in r]
    if len(current) >= 2:
        a, b = current[0], current[-1]
        report["growth_mb_per_token"] = (b["peak_rss_mb"] - a["peak_rss_mb"]) / (b["tokens"] - a["tokens"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(report, indent=2))
    (RESULTS / "memory.md").write_text(_markdown(report))
    print(_markdown(report))
    return 0


def _maybe(x) -> str:
    return "" if x is None else f"{x:.1f}"


def _markdown(report: dict) -> str:
    lines = [
        "# Peak memory of one attribution (default model, CPU, default parameters)",
        "",
        (
            f"Fresh process per row; peak RSS includes the model and torch. {report['note']}; "
            f"nproc {report['nproc']}, load average {report['loadavg'][0]:.1f}."
        ),
        "",
        (
            "| code path | prompt tokens | peak RSS (MB) | RSS after loading (MB) | wall s "
            "| CPU s (whole process) | P(Paris) |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['path']} | {r['tokens']} | {r['error']} | | | | |")
        else:
            lines.append(
                f"| {r['path']} | {r['tokens']} | {r['peak_rss_mb']:.0f} | {r['rss_after_load_mb']:.0f} | "
                f"{r['seconds']:.1f} | {_maybe(r.get('cpu_seconds_total'))} | {r['prob']:.4f} |"
            )
    if "growth_mb_per_token" in report:
        lines += [
            "",
            (
                f"Growth of the current path between the shortest and the longest prompt: "
                f"{report['growth_mb_per_token']:.3f} MB per token."
            ),
        ]
    lines += [
        "",
        (
            "Before the fix (figures from issue 11): 5 tokens 1.9 GB, 105 tokens 6.1 GB, 205 tokens 10.3 GB, "
            "3005 tokens killed by the kernel at 22.5 GB (about 42 MB per token)."
        ),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
