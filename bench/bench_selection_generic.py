"""How often one generic neuron pushes fact-specific knowledge neurons under the coarse threshold.

On the default model, for N built-in facts the model knows (first prompt each, integrated gradients
with the default settings, attributions cached in the default result store):
- the generic neurons: coarse (score > t x max) in at least `--share` (a quarter) of the facts;
- per fact, the neurons that would be coarse if the generic neurons did not set the maximum but are
  not coarse now (dkn.selection.generic_pushout);
- how many knowledge neurons each selection rule keeps: the global threshold, the per-layer threshold,
  and the contrast with the other facts as negative examples (leave-one-out).
No timings: the machine is shared, and this measures selection, not speed.

    nice -n 10 .venv/bin/python bench/bench_selection_generic.py --facts 12
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dkn.attribution import attribute
from dkn.cache import ResultStore, default_path
from dkn.facts import builtin_facts
from dkn.models import load_model
from dkn.selection import coarse_neurons, generic_pushout, refine


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=12)
    ap.add_argument("--t", type=float, default=0.2)
    ap.add_argument("--share", type=float, default=0.25, help="generic: coarse in at least this share of the facts")
    ap.add_argument("--out", default="bench/results/selection_generic.json")
    args = ap.parse_args()
    lm = load_model("default", device="cpu")
    store = ResultStore(default_path())
    facts = [f for f in builtin_facts() if f.known_by_default]
    # one fact per relation first, so that "unrelated" facts are really unrelated
    by_relation: dict[str, list] = {}
    for f in facts:
        by_relation.setdefault(f.relation, []).append(f)
    chosen = [fs[k] for k in range(max(map(len, by_relation.values()))) for fs in by_relation.values() if k < len(fs)][
        : args.facts
    ]
    maps = []
    for i, f in enumerate(chosen):
        maps.append(attribute(lm, f.prompts[0], f.answer, store=store).scores)
        print(f"[{i + 1}/{len(chosen)}] {f.prompts[0]!r} -> {f.answer!r}", flush=True)
    pushed = generic_pushout(maps, args.t, args.share)
    rows = []
    for i, f in enumerate(chosen):
        others = maps[:i] + maps[i + 1 :]
        rows.append(
            {
                "fact": f.id,
                "top": str(max(((n, maps[i][n]) for n in coarse_neurons(maps[i], args.t)), key=lambda x: x[1])[0]),
                "global": len(coarse_neurons(maps[i], args.t)),
                "per_layer": len(coarse_neurons(maps[i], args.t, per_layer=True)),
                "contrast": len(refine([maps[i]], args.t, 0.5, others, negatives="contrast").neurons),
                "drop": len(refine([maps[i]], args.t, 0.5, others, negatives="drop").neurons),
                "lost_to_generic": len(pushed.lost[i]),
            }
        )
    summary = {
        "facts": len(chosen),
        "t": args.t,
        "share": args.share,
        "generic": [str(n) for n in pushed.generic],
        "facts_affected": pushed.facts_affected,
        "share_affected": pushed.facts_affected / len(chosen),
        "mean_lost": pushed.mean_lost,
        "rows": rows,
        "mean_kns": {k: float(np.mean([r[k] for r in rows])) for k in ("global", "per_layer", "contrast", "drop")},
        "note": "default model, first prompt per fact, IG defaults; the machine was shared",
    }
    print(
        f"generic neurons (coarse in >= {args.share:.0%} of {len(chosen)} facts): "
        f"{', '.join(summary['generic']) or 'none'}"
    )
    print(
        f"facts where generic neurons push fact-specific ones under t x max: {pushed.facts_affected}/{len(chosen)}"
        f" ({summary['share_affected']:.0%}); neurons lost per fact: {pushed.mean_lost:.2f}"
    )
    print("mean knowledge neurons per fact: " + ", ".join(f"{k} {v:.1f}" for k, v in summary["mean_kns"].items()))
    for r in rows:
        print(
            f"  {r['fact']:<40} top {r['top']:<8} global {r['global']:>3}  per-layer {r['per_layer']:>3}  "
            f"contrast {r['contrast']:>3}  drop {r['drop']:>3}  lost {r['lost_to_generic']:>3}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
