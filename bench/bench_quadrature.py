"""Accuracy per pass of each integration rule, and the speed-up over knowledge-neurons at equal accuracy.

Part 1 (default model): for each fact, integrated-gradients scores with a 512-point midpoint rule are the
reference; every (rule, points) of the grid is scored against it: the max relative error
(max |s - ref| / max |ref|), the mean relative error (mean |s - ref| / mean |ref|) and the Jaccard index
of the top-20 neurons, averaged over facts, against the cost (rows per layer, which is what one pass
costs, and the measured seconds).  The default rule is the cheapest one at least as accurate as the
peer's rule (knowledge-neurons: 20 evenly spaced points from 0 to 1, our "linspace") on all three
measures.

Part 2 (random GPT-2-small, the shape of bench_attribution.py): ours with the peer's rule vs ours with
the chosen rule, interleaved in one process on the 5- and 29-token prompts; the speed-up over the peer
is the peer's time from bench/results/attribution.json (measured by bench_attribution.py) over ours with
the chosen rule, and, less sensitive to the load of a shared machine, that file's peer/ours ratio at 20
points times our measured linspace-20 / chosen ratio.

    nice -n 10 .venv/bin/python bench/bench_quadrature.py                 # 20 facts (long on 2 cores)
    nice -n 10 .venv/bin/python bench/bench_quadrature.py --facts 4 --skip-speed

Writes bench/results/quadrature.json and bench/results/quadrature.md; an interrupted part 1 resumes from
bench/results/quadrature.partial.json (the facts it finished, same reference and facts).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

RESULTS = ROOT / "bench" / "results"
PARTIAL = RESULTS / "quadrature.partial.json"  # the facts finished so far; a rerun resumes from it
GRID = {
    "linspace": (10, 20),
    "left": (20,),
    "right": (20,),
    "midpoint": (3, 5, 10, 20),
    "trapezoid": (5, 6, 8, 10, 20),
    "gauss": (2, 3, 4, 5, 6, 8, 10),
    "adaptive": (4, 6, 8),
}
REFERENCES = ROOT / "cache" / "bench" / "quadrature-reference"  # reference scores, kept for reruns (not committed)
PEER = ("linspace", 20)
TOP = 20


def rows_per_layer(rule: str, points: int, result=None) -> float:
    """Rows one layer costs on the fast path: the points, plus an alpha = 0 row when the rule has none
    (P at the baseline), minus the alpha = 1 row when the rule has one (shared by every layer).  The
    adaptive rule's depend on the prompt: its intervals per layer, averaged (from `result.extra`)."""
    from dkn.integration import integration_points

    if rule == "adaptive":
        return float(np.mean(result.extra["intervals"])) if result is not None else float(points)
    alphas, _ = integration_points(rule, points)
    return len(alphas) + (0 if np.any(alphas == 0) else 1) - (1 if np.any(alphas == 1) else 0)


def reference_scores(lm, prompt: str, answer: str, points: int) -> np.ndarray:
    """Midpoint-`points` scores of one fact, computed once and kept under cache/bench/ (a rerun with a
    changed grid costs the rules only)."""
    import hashlib

    from dkn.attribution import AttributionParams, attribute

    key = hashlib.sha256(f"{lm.fingerprint}|{prompt}|{answer}|midpoint-{points}".encode()).hexdigest()[:20]
    path = REFERENCES / f"{key}.npy"
    if path.exists():
        return np.load(path)
    scores = attribute(lm, prompt, answer, AttributionParams(steps=points, rule="midpoint")).scores
    REFERENCES.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, scores)
    tmp.replace(path)  # never a half-written reference
    return scores


def errors(scores: np.ndarray, reference: np.ndarray) -> dict:
    diff = np.abs(scores - reference)
    top = lambda s: set(np.argsort(s, axis=None)[::-1][:TOP].tolist())  # noqa: E731
    a, b = top(scores), top(reference)
    return {
        "max_rel": float(diff.max() / np.abs(reference).max()),
        "mean_rel": float(diff.mean() / np.abs(reference).mean()),
        "jaccard": len(a & b) / len(a | b),
    }


def _facts(n: int):
    try:
        from dkn.facts import builtin_facts
    except ImportError:  # after the facts module became a package
        from dkn.datasets import builtin_facts
    facts = builtin_facts(known_only=True)
    by_relation: dict[str, list] = {}
    for f in facts:
        by_relation.setdefault(f.relation, []).append(f)
    picked = []  # round-robin over relations: varied facts
    while len(picked) < min(n, len(facts)):
        for group in by_relation.values():
            if group and len(picked) < n:
                picked.append(group.pop(0))
    return picked


def accuracy(n_facts: int, reference_points: int) -> dict:
    from dkn.attribution import AttributionParams, attribute
    from dkn.models import load_model

    lm = load_model("default", device="cpu")
    per = {f"{rule}-{m}": [] for rule, ms in GRID.items() for m in ms}
    seconds = {key: [] for key in per}
    facts = _facts(n_facts)
    done = _resumable(facts, reference_points, per)
    if done:
        part = json.loads(PARTIAL.read_text())
        per, seconds = part["per_fact"], part["seconds"]
        print(f"resuming after {done} facts from {PARTIAL.name}", flush=True)
    for i, fact in enumerate(facts):
        if i < done:
            continue
        start = time.perf_counter()
        ref = reference_scores(lm, fact.prompts[0], fact.answers[0], reference_points)
        print(
            f"fact {i + 1}/{len(facts)} {fact.prompts[0]!r} -> {fact.answers[0]!r}: reference "
            f"{time.perf_counter() - start:.0f} s",
            flush=True,
        )
        for rule, ms in GRID.items():
            for m in ms:
                result = attribute(lm, fact.prompts[0], fact.answers[0], AttributionParams(steps=m, rule=rule))
                per[f"{rule}-{m}"].append({**errors(result.scores, ref), "rows": rows_per_layer(rule, m, result)})
                seconds[f"{rule}-{m}"].append(result.seconds)
        PARTIAL.write_text(
            json.dumps(
                {
                    "facts": [[f.prompts[0], f.answers[0]] for f in facts[: i + 1]],
                    "reference": f"midpoint-{reference_points}",
                    "per_fact": per,
                    "seconds": seconds,
                }
            )
        )
    return summarise(per, seconds, [[f.prompts[0], f.answers[0]] for f in facts], f"midpoint-{reference_points}")


def _resumable(facts, reference_points: int, per: dict) -> int:
    """How many facts an interrupted run finished with the same reference, facts (in order) and rules: those
    are taken from PARTIAL instead of being computed again (0 when there is nothing to resume)."""
    if not PARTIAL.exists():
        return 0
    try:
        part = json.loads(PARTIAL.read_text())
    except json.JSONDecodeError:
        return 0
    n = len(part.get("facts", []))
    same = (
        part.get("reference") == f"midpoint-{reference_points}"
        and part["facts"] == [[f.prompts[0], f.answers[0]] for f in facts[:n]]
        and set(part.get("per_fact", {})) == set(per)
        and all(len(v) == n for v in part["per_fact"].values())
    )
    return n if same else 0


def summarise(per: dict, seconds: dict, facts: list, reference: str) -> dict:
    """The table over facts, the peer's row and the chosen rule (cheapest at least as accurate)."""
    table = []
    for rule, ms in GRID.items():
        for m in ms:
            key = f"{rule}-{m}"
            rows = per[key]
            table.append(
                {
                    "rule": rule,
                    "points": m,
                    "rows_per_layer": float(np.mean([r.get("rows", rows_per_layer(rule, m)) for r in rows])),
                    "max_rel": float(np.mean([r["max_rel"] for r in rows])),
                    "max_rel_worst": float(np.max([r["max_rel"] for r in rows])),
                    "mean_rel": float(np.mean([r["mean_rel"] for r in rows])),
                    "jaccard": float(np.mean([r["jaccard"] for r in rows])),
                    "seconds_median": float(np.median(seconds[key])) if seconds.get(key) else None,
                }
            )
    PARTIAL.unlink(missing_ok=True)
    peer = next(r for r in table if (r["rule"], r["points"]) == PEER)
    as_good = [
        r
        for r in table
        if r["max_rel"] <= peer["max_rel"] and r["mean_rel"] <= peer["mean_rel"] and r["jaccard"] >= peer["jaccard"]
    ]
    chosen = cheapest(as_good)
    return {
        "facts": facts,
        "reference": reference,
        "table": table,
        "peer_rule": peer,
        "chosen": chosen,
        "per_fact": per,
        "seconds": seconds,
    }


def cheapest(rules: list[dict], tie: float = 0.05) -> dict:
    """The cheapest rule by measured seconds (median over facts), rules within `tie` of the fastest counting
    as tied (the machine's noise), the most accurate (lowest max relative error) of those winning.  Rows per
    layer alone mislead for the adaptive rule: its extra rows are in the layers it refines (on the default
    model layer 0, whose rows run through every block) and come in extra passes."""
    timed = [r for r in rules if r["seconds_median"] is not None]
    if not timed:
        return min(rules, key=lambda r: (r["rows_per_layer"], r["max_rel"]))
    fastest = min(r["seconds_median"] for r in timed)
    return min((r for r in timed if r["seconds_median"] <= (1 + tie) * fastest), key=lambda r: r["max_rel"])


def speed(chosen: tuple[str, int], repeats: int) -> dict:
    """Ours with the peer's rule vs ours with `chosen` on the random GPT-2-small, interleaved."""
    import bench_attribution as ba

    from dkn.attribution import AttributionParams, attribute
    from dkn.models import load_model

    folder = Path(os.environ.get("DKN_BENCH_GPT2", Path(tempfile.gettempdir()) / "dkn-bench-gpt2-small-random"))
    ba.MODEL_DIR = folder
    lm = load_model(str(ba.ensure_model()), device="cpu")
    peer_file = json.loads((RESULTS / "attribution.json").read_text())["random_model"]["prompts"]
    out = {}
    for name, (prompt, _, _) in ba.PROMPTS.items():
        params = {
            "peer_rule": AttributionParams(**ba.MATCHED),
            "chosen": AttributionParams(**{**ba.MATCHED, "rule": chosen[0], "steps": chosen[1]}),
        }
        times = {k: [] for k in params}
        for p in params.values():  # warm-up
            attribute(lm, prompt, ba.ANSWER.strip(), p)
        for _ in range(repeats):
            for k, p in params.items():
                times[k].append(attribute(lm, prompt, ba.ANSWER.strip(), p).seconds)
        med = {k: float(np.median(v)) for k, v in times.items()}
        ref = reference_scores(lm, prompt, ba.ANSWER.strip(), 512)  # accuracy on the timed model too
        results = {k: attribute(lm, prompt, ba.ANSWER.strip(), p) for k, p in params.items()}
        peer_s = peer_file[name]["median_s"]["peer"]
        then_ratio = peer_s / peer_file[name]["median_s"]["ours"]
        out[name] = {
            "tokens": peer_file[name]["tokens"],
            "ours_s": times,
            "ours_median_s": med,
            "peer_s_from_attribution_json": peer_s,
            "speedup_vs_peer_direct": peer_s / med["chosen"],
            "speedup_vs_peer_by_ratios": then_ratio * med["peer_rule"] / med["chosen"],
            "speedup_at_equal_work_then": then_ratio,
            "errors_vs_midpoint_512": {k: errors(r.scores, ref) for k, r in results.items()},
            "chosen_intervals_per_layer": results["chosen"].extra.get("intervals"),
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=20)
    parser.add_argument("--reference-points", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--chosen", default=None, help="skip part 1 and time this RULE-POINTS (e.g. gauss-5)")
    parser.add_argument(
        "--from-partial",
        action="store_true",
        help="part 1 from the facts finished so far (bench/results/quadrature.partial.json)",
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    report = {
        "machine": {
            "nproc": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "note": "shared machine (other jobs running): seconds are noisy, rows are not",
        }
    }
    if args.chosen:
        rule, points = args.chosen.rsplit("-", 1)
        chosen = (rule, int(points))
    elif args.from_partial:
        part = json.loads(PARTIAL.read_text())
        report["accuracy"] = summarise(part["per_fact"], part.get("seconds", {}), part["facts"], part["reference"])
        chosen = (report["accuracy"]["chosen"]["rule"], report["accuracy"]["chosen"]["points"])
    else:
        report["accuracy"] = accuracy(args.facts, args.reference_points)
        chosen = (report["accuracy"]["chosen"]["rule"], report["accuracy"]["chosen"]["points"])
    report["chosen"] = list(chosen)
    if not args.skip_speed:
        report["speed"] = speed(chosen, args.repeats)
    report["machine"]["loadavg_end"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("quadrature.json" if not args.chosen else "quadrature_speed.json")
    out.write_text(json.dumps(report, indent=2))
    md = markdown(report)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


def markdown(r: dict) -> str:
    lines = [
        "# Integration rules: accuracy per pass, and speed at equal accuracy",
        "",
        f"Machine: nproc {r['machine']['nproc']}, load average {r['machine']['loadavg_start'][0]:.1f} "
        f"at start; {r['machine']['note']}.",
        "",
    ]
    if "accuracy" in r:
        a = r["accuracy"]
        lines += [
            f"## Default model, {len(a['facts'])} facts, reference {a['reference']}",
            "",
            "| rule | points | rows per layer | max rel. error (mean over facts) | worst fact | "
            "mean rel. error | Jaccard top-20 | s (median) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for t in sorted(a["table"], key=lambda t: (t["rows_per_layer"], t["rule"])):
            lines.append(
                f"| {t['rule']} | {t['points']} | {t['rows_per_layer']:.1f} | {t['max_rel']:.2e} | "
                f"{t['max_rel_worst']:.2e} | {t['mean_rel']:.2e} | {t['jaccard']:.3f} | "
                f"{'' if t['seconds_median'] is None else format(t['seconds_median'], '.2f')} |"
            )
        c, p = a["chosen"], a["peer_rule"]
        lines += [
            "",
            f"Peer's rule (linspace-20): {p['rows_per_layer']:.0f} rows per layer, {p['seconds_median']:.2f} s. "
            f"Cheapest rule at least as accurate on all three measures (by median seconds; within 5% of the "
            f"fastest counts as a tie, won by the lower max error): **{c['rule']}-{c['points']}**, "
            f"{c['rows_per_layer']:.1f} rows per layer on average, {c['seconds_median']:.2f} s.",
            "",
        ]
    if "speed" in r:
        lines += [
            "## Random GPT-2-small (12 x 3072): ours with the chosen rule vs the peer",
            "",
            "Peer seconds are those of bench/results/attribution.json (knowledge-neurons 0.0.2, 20 steps; "
            "not rerun here).",
            "",
            "| prompt tokens | ours linspace-20 s | ours chosen s | peer s (file) | speed-up direct | "
            "speed-up by ratios | at equal work (file) |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in r["speed"].values():
            m = s["ours_median_s"]
            lines.append(
                f"| {s['tokens']} | {m['peer_rule']:.2f} | {m['chosen']:.2f} | "
                f"{s['peer_s_from_attribution_json']:.2f} | {s['speedup_vs_peer_direct']:.1f}x | "
                f"{s['speedup_vs_peer_by_ratios']:.1f}x | {s['speedup_at_equal_work_then']:.1f}x |"
            )
        lines += [
            "",
            "Accuracy on the timed model itself (against its midpoint-512 scores), and the chosen rule's "
            "intervals per layer there:",
            "",
        ]
        for s in r["speed"].values():
            e = s.get("errors_vs_midpoint_512")
            if e:
                lines.append(
                    f"- {s['tokens']} tokens: peer's rule max {e['peer_rule']['max_rel']:.2e} / mean "
                    f"{e['peer_rule']['mean_rel']:.2e} / Jaccard {e['peer_rule']['jaccard']:.2f}; chosen max "
                    f"{e['chosen']['max_rel']:.2e} / mean {e['chosen']['mean_rel']:.2e} / Jaccard "
                    f"{e['chosen']['jaccard']:.2f}; intervals {s.get('chosen_intervals_per_layer')}"
                )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
