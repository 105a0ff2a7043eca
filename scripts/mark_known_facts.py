#!/usr/bin/env python
"""Measure which built-in facts the default model knows, and record it.

For every built-in fact and every prompt, run the model once and compare the
greedy top-1 next token with the first token of " " + answer (the main
answer).  `known_by_default` is set to whether the *first* prompt is answered;
the data file (`dkn/data/builtin_facts.json`) is rewritten with the results,
and the accuracy per relation and per template is printed.

    python scripts/mark_known_facts.py /path/to/model-folder [--dry-run] [--show-misses]

The model folder is a Hugging Face safetensors folder (config.json,
model.safetensors, tokenizer.json), loaded with AutoModelForCausalLM /
AutoTokenizer on the CPU in float32.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dkn.datasets import BUILTIN_FACTS_PATH, builtin_facts

log = logging.getLogger("mark_known_facts")


def write_builtin(data: dict, path: Path) -> None:
    """Write the facts file readably: one fact per line."""
    lines = ["{"]
    for key, value in data.items():
        if key != "relations":
            lines.append(f" {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)},")
    lines.append(' "relations": {')
    rels = list(data["relations"].items())
    for ri, (rel, spec) in enumerate(rels):
        lines.append(f"  {json.dumps(rel)}: {{")
        lines.append(f'   "templates": {json.dumps(spec["templates"], ensure_ascii=False)},')
        lines.append('   "facts": [')
        facts = spec["facts"]
        for fi, f in enumerate(facts):
            comma = "," if fi < len(facts) - 1 else ""
            lines.append(f"    {json.dumps(f, ensure_ascii=False)}{comma}")
        lines.append("   ]")
        lines.append("  }" + ("," if ri < len(rels) - 1 else ""))
    lines.append(" }")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="folder with the default model (safetensors + tokenizer)")
    ap.add_argument("--facts", default=str(BUILTIN_FACTS_PATH), help="built-in facts file to mark")
    ap.add_argument("--dry-run", action="store_true", help="print results, do not rewrite the file")
    ap.add_argument("--show-misses", action="store_true", help="print each missed prompt and the model's guess")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()

    path = Path(args.facts)
    facts = builtin_facts(path=path)
    data = json.loads(path.read_text(encoding="utf-8"))

    # One forward pass per batch of prompts, right-padded: a causal model never
    # attends to the padding after a prompt, so the logits at each prompt's
    # last real token are exactly those of the prompt alone.
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    jobs = [(fact, i, p) for fact in facts for i, p in enumerate(fact.prompts)]
    top1: dict[tuple[str, int], int] = {}
    with torch.no_grad():
        for start in range(0, len(jobs), args.batch_size):
            batch = jobs[start : start + args.batch_size]
            enc = tok([p for _, _, p in batch], return_tensors="pt", padding=True)
            logits = model(**enc).logits
            last = enc.attention_mask.sum(dim=1) - 1
            tops = logits[torch.arange(len(batch)), last].argmax(dim=-1).tolist()
            for (fact, i, _), t in zip(batch, tops):
                top1[(fact.id, i)] = t

    per_rel: dict[str, list] = {}
    known: dict[str, bool] = {}
    for fact in facts:
        target = tok(" " + fact.answer, add_special_tokens=False).input_ids[0]
        hits = []
        for i, prompt in enumerate(fact.prompts):
            top = top1[(fact.id, i)]
            hits.append(top == target)
            if args.show_misses and top != target:
                print(f"  miss {fact.relation:15s} {prompt!r:60s} -> {tok.decode([top])!r} (want {fact.answer!r})")
        known[fact.id] = hits[0]
        per_rel.setdefault(fact.relation, []).append(hits)

    total_known = sum(known.values())
    print(f"{'relation':16s} {'facts':>5s} {'known':>5s}  per-template accuracy")
    for rel, rows in per_rel.items():
        n = len(rows)
        k = sum(r[0] for r in rows)
        per_t = [sum(r[i] for r in rows) / n for i in range(len(rows[0]))]
        print(f"{rel:16s} {n:5d} {k:5d}  " + " ".join(f"{a:.2f}" for a in per_t))
    print(f"{'total':16s} {len(facts):5d} {total_known:5d}  ({total_known / len(facts):.0%} known on the first prompt)")

    if not args.dry_run:
        for rel, spec in data["relations"].items():
            for f in spec["facts"]:
                f["known_by_default"] = known[f"builtin/{rel}/{f['subject']}"]
        write_builtin(data, path)
        log.info("wrote known_by_default into %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
