"""Benchmark: the cost of interventions against a plain forward pass, on the default model.

Targets (issue "Engine"), answer-position mode: one intervention costs no more than
1.5x a plain forward pass of the same prompt; 64 neuron sets cost no more than 4x.
Prints a table and writes bench/results/interventions.{json,md}.

    .venv/bin/python bench/bench_interventions.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
from pathlib import Path

import torch
from timing import median_seconds

from dkn.forward import answer_runner
from dkn.interventions import intervene, intervene_many
from dkn.models import load_model
from dkn.neurons import Neuron
from dkn.query import make_query

PROMPT, ANSWER = "The capital of France is", "Paris"
OUT = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    lm = load_model("default")
    ids = torch.tensor([lm.tokenizer(PROMPT)["input_ids"]])
    neurons = [
        Neuron(l, i)
        for l, i in [
            (0, 1297),
            (24, 1005),
            (29, 778),
            (29, 1066),
            (27, 1392),
            (8, 412),
            (29, 1285),
            (29, 922),
            (21, 402),
            (0, 885),
            (12, 77),
            (16, 900),
        ]
    ]
    groups = [neurons[i::6] for i in range(6)]
    sixty_four = [
        tuple(n for i in s for n in groups[i]) for r in range(0, 7) for s in itertools.combinations(range(6), r)
    ][:64]  # every subset of 6

    def plain():
        with torch.no_grad():
            lm.model(input_ids=ids)

    step = make_query(lm, PROMPT, ANSWER).steps[0]
    answer_runner(lm, step)  # built once per prompt and kept, as in the app
    rows = {
        "plain forward (full prompt, 1 row)": median_seconds(plain, args.repeats),
        "intervene_many, 1 set (answer position)": median_seconds(
            lambda: intervene_many(lm, PROMPT, ANSWER, [neurons], 0.0, "last"), args.repeats
        ),
        "intervene(), before + after + top-k": median_seconds(
            lambda: intervene(lm, PROMPT, ANSWER, neurons, 0.0, "last"), args.repeats
        ),
        "intervene_many, 64 sets (answer position)": median_seconds(
            lambda: intervene_many(lm, PROMPT, ANSWER, sixty_four, 0.0, "last"), args.repeats
        ),
        "intervene_many, 64 sets, every position (full rows)": median_seconds(
            lambda: intervene_many(lm, PROMPT, ANSWER, sixty_four, 0.0, "all"), max(3, args.repeats // 3)
        ),
    }

    # dose-response of 3 groups over 17 factors: the baseline loops over the factors (one batched call each,
    # as before this round); dose_response is one call with a factor per row
    from dkn.custom_groups import DOSE_FACTORS, dose_response

    three = groups[:3]
    rows["dose-response, 3 groups x 17 factors, one call per factor (baseline)"] = median_seconds(
        lambda: [intervene_many(lm, PROMPT, ANSWER, three, f, "last") for f in DOSE_FACTORS], args.repeats
    )
    rows["dose-response, 3 groups x 17 factors, one call (dose_response)"] = median_seconds(
        lambda: dose_response(lm, PROMPT, ANSWER, three), args.repeats
    )

    def cold():
        lm.runners.clear()
        intervene_many(lm, PROMPT, ANSWER, [neurons], 0.0, "last")

    rows["intervene_many, 1 set, first call on a new prompt (builds the prefix cache)"] = median_seconds(
        cold, args.repeats
    )

    base = rows["plain forward (full prompt, 1 row)"]
    one = rows["intervene_many, 1 set (answer position)"]
    many = rows["intervene_many, 64 sets (answer position)"]
    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "model": lm.label,
        "prompt": PROMPT,
        "seconds": rows,
        "ratio_one_set": one / base,
        "ratio_64_sets": many / base,
        "target_one_set": 1.5,
        "target_64_sets": 4.0,
        "pass": one / base <= 1.5 and many / base <= 4.0,
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "interventions.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# Intervention cost on {lm.label}",
        "",
        f"{result['date']}, {result['machine']}, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}",
        "",
        "| what | median ms | x plain forward |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v * 1000:.1f} | {v / base:.2f} |" for k, v in rows.items()]
    lines += [
        "",
        f"One set: {one / base:.2f}x (target <= 1.5x); 64 sets: {many / base:.2f}x (target <= 4x): "
        f"{'PASS' if result['pass'] else 'FAIL'}",
    ]
    (OUT / "interventions.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
