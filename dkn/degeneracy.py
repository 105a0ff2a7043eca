"""Degenerate knowledge neurons: cluster a fact's knowledge neurons and test the groups.

Pipeline for one fact (Chen et al. 2024, with the authors' script defects fixed):
1. knowledge neurons (dkn.selection) -> their weight graph (dkn.graph);
2. a clusterer (dkn.topology: NTC and baselines; or AMIG's pairwise test here)
   proposes candidate groups (base degenerate components, BDCs) of >= 2 neurons;
3. the whole subset grid of candidates is evaluated in one batched intervention:
   every subset up to `max_grid_bdcs` groups, else singles, leave-one-out and all;
4. the functional test: the candidates whose suppression alone lowers P by less
   than `threshold_low` form the DKN if there are >= 2 of them and suppressing
   them all lowers P by more than `threshold_high`.  Both conditions are enforced.

Beyond the yes/no test, the degeneracy index DI = (union drop - largest single
drop) / union drop says how close a fact is to degenerate (1: no group matters
alone but all together do; 0: one group explains the whole effect), and the
groups' combination is classed as redundant (the union removes more than the
singles add up to), additive, or each necessary (the union removes less than the
singles add up to: each group matters on its own).  A random control suppresses
as many random neurons, matched by layer, over several seeds.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from dkn.graph import KnowledgeGraph, build_graph
from dkn.interventions import intervene_many
from dkn.models import LoadedModel
from dkn.neurons import Neuron
from dkn.topology import CLUSTERERS, ntc_components

CLUSTERER_NAMES = tuple(CLUSTERERS) + ("amig",)
Group = tuple[Neuron, ...]


@dataclass(frozen=True)
class DegeneracyParams:
    clusterer: str = "ntc"
    threshold_low: float = 0.05       # a single BDC may lower P by less than this (relative drop)
    threshold_high: float = 0.3       # all BDCs together must lower P by more than this
    max_span: int = 3                 # graph: longest layer gap bridged by a path
    gated_input: str = "gate"         # graph: input vector of gated MLPs
    mode: str = "last"                # how neurons are suppressed (see dkn.interventions)
    max_grid_bdcs: int = 6            # full subset grid up to this many BDCs
    max_bdcs: int = 12                # more candidates than this: keep the most persistent / largest
    random_seeds: int = 5             # random-neuron control
    amig_top: int = 20                # AMIG pairwise: how many top knowledge neurons to pair
    seed: int = 0

    def validate(self) -> None:
        if self.clusterer not in CLUSTERER_NAMES:
            raise ValueError(f"unknown clusterer {self.clusterer!r}: use one of {', '.join(CLUSTERER_NAMES)}")
        if not 0 <= self.threshold_low <= self.threshold_high <= 1:
            raise ValueError("thresholds must satisfy 0 <= threshold_low <= threshold_high <= 1")


@dataclass(frozen=True)
class Candidate:
    members: Group
    single_drop: float                 # relative drop of P when this group alone is suppressed
    passed: bool                       # single_drop < threshold_low
    reason: str
    persistence: float | None = None   # NTC only
    birth: float | None = None
    death: float | None = None


@dataclass(frozen=True)
class DegeneracyResult:
    prompt: str
    answer: str
    prob: float                                    # P(answer) unchanged
    knowledge_neurons: tuple[Neuron, ...]
    kn_scores: tuple[float, ...]
    graph: KnowledgeGraph | None
    candidates: tuple[Candidate, ...]              # every tested group, passed or not
    subset_drops: tuple[tuple[tuple[int, ...], float], ...]   # (candidate indices, relative drop)
    union_drop: float                              # all candidates suppressed together
    dkn: tuple[Group, ...]                         # the BDCs of the DKN (empty if not degenerate)
    dkn_union_drop: float                          # the DKN's BDCs suppressed together
    degenerate: bool
    degeneracy_index: float
    combination: str                               # redundant / additive / each necessary / no effect / n/a
    random_control: dict                           # {"mean", "std", "n", "drops"}
    verdict: str                                   # one sentence for people
    params: DegeneracyParams
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def bdcs(self) -> tuple[Group, ...]:
        return tuple(c.members for c in self.candidates)

    @property
    def single_drops(self) -> tuple[float, ...]:
        return tuple(c.single_drop for c in self.candidates)

    def as_json(self) -> dict:
        """The CLI's `dkn` JSON object (other tools rely on these keys)."""
        group = lambda g: [{"layer": n.layer, "neuron": n.index} for n in g]   # noqa: E731
        return {
            "prompt": self.prompt, "answer": self.answer, "prob": self.prob, "clusterer": self.params.clusterer,
            "knowledge_neurons": [{"layer": n.layer, "neuron": n.index, "score": s}
                                  for n, s in zip(self.knowledge_neurons, self.kn_scores)],
            "bdcs": [group(c.members) for c in self.candidates],
            "single_drops": list(self.single_drops),
            "candidate_status": [{"passed": c.passed, "reason": c.reason, "persistence": c.persistence}
                                 for c in self.candidates],
            "subset_drops": [{"subset": list(s), "drop": d} for s, d in self.subset_drops],
            "union_drop": self.union_drop,
            "dkn": [group(g) for g in self.dkn],
            "dkn_union_drop": self.dkn_union_drop,
            "degenerate": self.degenerate,
            "degeneracy_index": self.degeneracy_index,
            "combination": self.combination,
            "random_control": {k: v for k, v in self.random_control.items()},
            "verdict": self.verdict,
            "seconds": self.seconds,
        }


def analyse(lm: LoadedModel, prompt: str, answer: str, neurons: Sequence[Neuron],
            scores: Sequence[float] | None = None, params: DegeneracyParams | None = None) -> DegeneracyResult:
    """Cluster `neurons` (a fact's knowledge neurons), run the subset grid and the degeneracy test."""
    params = params or DegeneracyParams()
    params.validate()
    start = time.perf_counter()
    neurons = tuple(Neuron(*n) for n in neurons)
    scores = tuple(float(s) for s in scores) if scores is not None else (0.0,) * len(neurons)
    graph = build_graph(lm, neurons, params.max_span, params.gated_input) if len(neurons) >= 2 else None
    groups, persistence = _candidate_groups(lm, prompt, answer, neurons, graph, params)
    groups, persistence = groups[: params.max_bdcs], persistence[: params.max_bdcs]
    subsets = grid_subsets(len(groups), params.max_grid_bdcs)
    union_all = tuple(n for g in groups for n in g)
    control_sets = random_matched_sets(lm, union_all, set(neurons), params.random_seeds, params.seed)
    sets = [tuple(n for i in s for n in groups[i]) for s in subsets] + control_sets
    prob, probs = intervene_many(lm, prompt, answer, sets, 0.0, params.mode) if sets else (_prob(lm, prompt, answer), np.array([]))
    drops = relative_drops(prob, probs)
    grid = {s: float(d) for s, d in zip(subsets, drops[: len(subsets)])}
    control = drops[len(subsets):]
    return _assemble(prompt, answer, prob, neurons, scores, graph, groups, persistence, grid, control, params,
                     time.perf_counter() - start)


def _prob(lm, prompt, answer) -> float:
    prob, _ = intervene_many(lm, prompt, answer, [], 0.0, "last")
    return prob


def relative_drops(prob: float, probs: np.ndarray) -> np.ndarray:
    """(P0 - P) / P0 for each row; 0 when P0 is 0."""
    return (prob - probs) / prob if prob > 0 else np.zeros_like(probs)


def grid_subsets(n_groups: int, max_grid: int = 6) -> list[tuple[int, ...]]:
    """Non-empty subsets of range(n_groups) to evaluate: all of them up to `max_grid` groups,
    otherwise the singles, the leave-one-outs and the whole set."""
    everything = tuple(range(n_groups))
    if n_groups == 0:
        return []
    if n_groups <= max_grid:
        return [s for r in range(1, n_groups + 1) for s in itertools.combinations(everything, r)]
    singles = [(i,) for i in everything]
    leave_one_out = [tuple(j for j in everything if j != i) for i in everything]
    return singles + leave_one_out + [everything]


def random_matched_sets(lm: LoadedModel, neurons: Sequence[Neuron], exclude: set[Neuron], n_seeds: int,
                        seed: int = 0) -> list[Group]:
    """For each seed, as many random neurons as `neurons`, in the same layers, none of them in `exclude`."""
    if not neurons:
        return []
    sets = []
    for s in range(n_seeds):
        rng = np.random.default_rng(seed + s)
        chosen: list[Neuron] = []
        for layer in sorted({n.layer for n in neurons}):
            count = sum(1 for n in neurons if n.layer == layer)
            pool = np.array([i for i in range(lm.d_mlp) if Neuron(layer, i) not in exclude])
            chosen += [Neuron(layer, int(i)) for i in rng.choice(pool, size=min(count, len(pool)), replace=False)]
        sets.append(tuple(chosen))
    return sets


def _candidate_groups(lm, prompt, answer, neurons, graph, params) -> tuple[list[Group], list]:
    if len(neurons) < 2 or graph is None:
        return [], []
    if params.clusterer == "amig":
        return amig_pairs(lm, prompt, answer, neurons[: params.amig_top], params), []
    if params.clusterer == "ntc":
        components = ntc_components(graph.distance)
        return ([tuple(neurons[i] for i in c.members) for c in components],
                [(c.persistence, c.birth, c.death) for c in components])
    clusters = CLUSTERERS[params.clusterer](graph.distance)
    clusters = sorted(clusters, key=len, reverse=True)
    return [tuple(neurons[i] for i in c) for c in clusters], []


def amig_pairs(lm, prompt, answer, neurons: Sequence[Neuron], params: DegeneracyParams) -> list[Group]:
    """AMIG's pairwise DKNs: neurons whose suppression alone drops P by < threshold_low, paired when
    suppressing both drops it by > threshold_high; disjoint pairs, strongest joint drop first."""
    prob, singles = intervene_many(lm, prompt, answer, [(n,) for n in neurons], 0.0, params.mode)
    weak = [n for n, d in zip(neurons, relative_drops(prob, singles)) if d < params.threshold_low]
    pairs = list(itertools.combinations(weak, 2))
    if not pairs:
        return []
    _, joint = intervene_many(lm, prompt, answer, pairs, 0.0, params.mode)
    ranked = sorted(zip(relative_drops(prob, joint), pairs), key=lambda t: -t[0])
    used: set[Neuron] = set()
    chosen = []
    for drop, (a, b) in ranked:
        if drop > params.threshold_high and a not in used and b not in used:
            chosen.append((a, b))
            used |= {a, b}
    return chosen


def degeneracy_index(single_drops: Sequence[float], union_drop: float) -> float:
    """(union - max single) / union, in [0, 1]; 0 when the union removes nothing."""
    if union_drop <= 0 or not len(single_drops):
        return 0.0
    return float(np.clip((union_drop - max(single_drops)) / union_drop, 0.0, 1.0))


def combination(single_drops: Sequence[float], union_drop: float, threshold_low: float = 0.05) -> str:
    """How the groups combine: "redundant" when the union removes > 1.25x what the singles add up to,
    "each necessary" when < 0.8x, "additive" in between; "no effect" when the union removes < threshold_low."""
    if len(single_drops) < 2:
        return "n/a"
    if union_drop < threshold_low:
        return "no effect"
    total = float(np.sum(np.clip(single_drops, 0, None)))
    if total <= 0 or union_drop > 1.25 * total:
        return "redundant"
    return "each necessary" if union_drop < 0.8 * total else "additive"


def _assemble(prompt, answer, prob, neurons, scores, graph, groups, persistence, grid, control, params, seconds):
    singles = [grid[(i,)] for i in range(len(groups))]
    everything = tuple(range(len(groups)))
    union = grid.get(everything, 0.0)
    candidates = tuple(_candidate(g, d, params, persistence[i] if i < len(persistence) else None)
                       for i, (g, d) in enumerate(zip(groups, singles)))
    passing = tuple(i for i, c in enumerate(candidates) if c.passed)
    dkn_drop = grid.get(passing, np.nan) if passing else 0.0
    degenerate = len(passing) >= 2 and dkn_drop > params.threshold_high
    di = degeneracy_index(singles, union)
    comb = combination(singles, union, params.threshold_low)
    rc = {"mean": float(np.mean(control)) if len(control) else 0.0,
          "std": float(np.std(control)) if len(control) else 0.0, "n": int(len(control)),
          "drops": [float(x) for x in control]}
    verdict = _verdict(len(neurons), candidates, passing, dkn_drop, degenerate, params)
    return DegeneracyResult(prompt, answer, prob, neurons, scores, graph, candidates,
                            tuple(sorted(grid.items(), key=lambda kv: (len(kv[0]), kv[0]))), union,
                            tuple(groups[i] for i in passing) if degenerate else (),
                            float(dkn_drop) if not np.isnan(dkn_drop) else float("nan"),
                            degenerate, di, comb, rc, verdict, params, seconds)


def _candidate(group: Group, drop: float, params: DegeneracyParams, persistence) -> Candidate:
    passed = drop < params.threshold_low
    reason = (f"alone it lowers P by {drop:.1%} (< {params.threshold_low:.0%}): the rest can stand in for it"
              if passed else
              f"alone it lowers P by {drop:.1%} (>= {params.threshold_low:.0%}): it is needed, not redundant")
    p, b, d = persistence if persistence else (None, None, None)
    return Candidate(group, float(drop), passed, reason, p, b, d)


def _verdict(n_neurons, candidates, passing, dkn_drop, degenerate, params) -> str:
    if n_neurons < 2:
        return f"only {n_neurons} knowledge neuron(s): at least 2 are needed to form groups"
    if not candidates:
        return "the clusterer found no group of 2 or more connected knowledge neurons"
    if len(passing) < 2:
        return (f"not degenerate: {len(passing)} of {len(candidates)} groups can go alone without lowering P by "
                f"{params.threshold_low:.0%}; at least 2 are needed")
    if not degenerate:
        return (f"not degenerate: each of {len(passing)} groups can go alone, but all together lower P by only "
                f"{dkn_drop:.1%} (needs > {params.threshold_high:.0%})")
    return (f"degenerate: any one of {len(passing)} groups can go (each < {params.threshold_low:.0%}), "
            f"all together lower P by {dkn_drop:.1%}")
