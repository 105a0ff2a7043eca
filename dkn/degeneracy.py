"""Degenerate knowledge neurons: propose groups of a fact's knowledge neurons and test them.

Pipeline for one fact (Chen et al. 2024, with the authors' script defects fixed):
1. knowledge neurons (dkn.selection) -> their graph (dkn.graph, edge definition `edge`);
2. a method proposes candidate groups (base degenerate components, BDCs):
   - a clusterer of dkn.topology (NTC and the paper's baselines) on the graph's distances;
   - "amig": AMIG's own definition (Chen et al., AAAI 2024): two *neurons*, each harmless alone, whose
     joint suppression removes the fact; the pair is the DKN and its two neurons are its components;
   - "backup": conditional attribution rounds (dkn.backup), turned into whole pathways (split, completed
     and pruned with the other components suppressed); each pathway is one component;
3. the subset grid of candidates is evaluated in one batched intervention: every subset up to
   `max_grid_bdcs` groups, else the singles, the leave-one-outs and the whole set; the union of the
   groups that pass is always evaluated too, whatever the grid size;
4. the functional test: a group passes when suppressing it alone changes P by less than
   `threshold_low` in either direction (|relative change|; the signed drop is kept); the fact is
   degenerate when >= 2 groups pass and suppressing all of them lowers P by more than
   `threshold_high`.  Sufficiency (a BDC can express the fact on its own) is measured for every
   group: the drop with every *other* group suppressed; with `require_sufficiency` each passing
   group must keep that drop below `threshold_high` too.

Beyond the yes/no test, interaction measures from the grid (drops v(S), v(empty) = 0):
- redundancy R = (U - sum of single drops) / U, U the union drop: > 0 redundant (the union removes
  more than the singles add up to), ~0 additive, < 0 each necessary;
- the Moebius (Harsanyi) interaction m(S) = sum over T subset of S of (-1)^(|S|-|T|) v(T) of every
  subset, for a full grid (<= `max_grid_bdcs` groups): m({i}) are the single drops, m({i, j}) > 0
  means i and j stand in for each other.
The former "degeneracy index" (union - largest single) / union is kept as `excess_over_largest`
(the share of the union drop that the largest group alone does not explain); it is 1 - 1/k for k
additive groups, so it does not measure redundancy.  A random control suppresses as many random
neurons, matched by layer, over several seeds.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dkn.graph import EDGES, KnowledgeGraph, build_graph
from dkn.interventions import intervene_many
from dkn.models import LoadedModel
from dkn.neurons import Neuron
from dkn.topology import CLUSTERERS, ntc_components

CLUSTERER_NAMES = tuple(CLUSTERERS) + ("amig", "backup")
Group = tuple[Neuron, ...]
Subset = tuple[int, ...]


@dataclass(frozen=True)
class DegeneracyParams:
    clusterer: str = "ntc"  # one of CLUSTERER_NAMES
    threshold_low: float = 0.05  # a single BDC may change P by less than this (|relative change|)
    threshold_high: float = 0.3  # all BDCs together must lower P by more than this
    require_sufficiency: bool = False  # also demand: each passing BDC alone (others off) keeps drop < high
    edge: str = "static"  # graph edge definition: "static", "functional" or "faithful" (dkn.graph)
    max_span: int = 3  # graph: longest layer gap bridged by a path
    gated_input: str = "gate"  # graph: input vector of gated MLPs
    mode: str = "last"  # how neurons are suppressed (see dkn.interventions)
    max_grid_bdcs: int = 6  # full subset grid up to this many BDCs
    max_bdcs: int = 12  # more candidates than this: keep the most persistent / largest
    random_seeds: int = 5  # random-neuron control
    amig_top: int = 20  # AMIG pairwise: how many top knowledge neurons to pair
    backup_rounds: int = 4  # backup discovery: at most this many rounds
    backup_t: float = 0.2  # backup discovery: coarse threshold of each round's attribution
    backup_max_neurons: int = 20  # backup discovery: at most this many neurons per round (top scores)
    backup_attribution: object = None  # backup discovery: dkn.attribution.AttributionParams (None: defaults)
    backup_pathways: bool = True  # backup discovery: split, complete and prune the rounds (dkn.backup.pathways)
    seed: int = 0

    def validate(self) -> None:
        if self.clusterer not in CLUSTERER_NAMES:
            raise ValueError(f"unknown clusterer {self.clusterer!r}: use one of {', '.join(CLUSTERER_NAMES)}")
        if self.edge not in EDGES:
            raise ValueError(f"unknown edge definition {self.edge!r}: use one of {', '.join(EDGES)}")
        if not 0 <= self.threshold_low <= self.threshold_high <= 1:
            raise ValueError("thresholds must satisfy 0 <= threshold_low <= threshold_high <= 1")
        if self.backup_rounds < 1 or self.backup_max_neurons < 1:
            raise ValueError("backup_rounds and backup_max_neurons must be at least 1")
        if not 0 <= self.backup_t <= 1:
            raise ValueError(f"backup_t must be in [0, 1], got {self.backup_t}")


@dataclass(frozen=True)
class Candidate:
    members: Group
    single_drop: float  # signed relative drop of P when this group alone is suppressed
    passed: bool  # |single_drop| < threshold_low
    reason: str
    persistence: float | None = None  # NTC only
    birth: float | None = None
    death: float | None = None
    alone_drop: float = float("nan")  # relative drop with every OTHER group suppressed (only this one left)
    sufficient: bool = False  # alone_drop < threshold_high: it expresses the fact on its own
    round: int | None = None  # backup discovery: the round that found it (1-based)


@dataclass(frozen=True)
class Round:
    """One round of backup discovery: the neurons found with all earlier rounds' neurons suppressed."""

    neurons: Group
    scores: tuple[float, ...]
    prob_before: float  # P(answer) with the earlier rounds suppressed (what was attributed)
    prob_after: float  # P(answer) with this round suppressed too
    drop_after: float  # relative drop of P from the unchanged model after this round
    carriers: Group = ()  # held out of this round: each alone removes the fact (kept on; dkn.backup)


@dataclass(frozen=True)
class DegeneracyResult:
    prompt: str
    answer: str
    prob: float  # P(answer) unchanged
    knowledge_neurons: tuple[Neuron, ...]
    kn_scores: tuple[float, ...]
    graph: KnowledgeGraph | None
    candidates: tuple[Candidate, ...]  # every tested group, passed or not
    subset_drops: tuple[tuple[Subset, float], ...]  # (candidate indices, signed relative drop)
    union_drop: float  # all candidates suppressed together
    dkn: tuple[Group, ...]  # the BDCs of the DKN (empty if not degenerate)
    dkn_union_drop: float  # the passing groups suppressed together
    degenerate: bool
    excess_over_largest: float  # (union - max single) / union: NOT a redundancy measure
    redundancy: float  # R = (U - sum singles) / U; nan when U <= 0 or < 2 groups
    interactions: tuple[tuple[Subset, float], ...]  # Moebius interaction of every subset (full grid only)
    combination: str  # redundant / additive / each necessary / no effect / n/a
    conditions: dict  # each condition of the test: True / False
    random_control: dict  # {"mean", "std", "n", "drops"}
    verdict: str  # one sentence for people
    params: DegeneracyParams
    rounds: tuple[Round, ...] = ()  # backup discovery only: the peeling rounds
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def bdcs(self) -> tuple[Group, ...]:
        return tuple(c.members for c in self.candidates)

    @property
    def single_drops(self) -> tuple[float, ...]:
        return tuple(c.single_drop for c in self.candidates)

    @property
    def alone_drops(self) -> tuple[float, ...]:
        return tuple(c.alone_drop for c in self.candidates)

    @property
    def degeneracy_index(self) -> float:
        """Deprecated name of `excess_over_largest` (kept so that older callers keep working)."""
        return self.excess_over_largest

    @property
    def carriers(self) -> tuple[Neuron, ...]:
        """Backup discovery only: the necessary carriers held out of its rounds (dkn.backup)."""
        from dkn.backup import held_carriers

        return held_carriers(self.rounds)

    @property
    def peeling(self) -> tuple[float, ...]:
        """P(answer) unchanged, then after each backup round: the peeling curve."""
        return (self.prob,) + tuple(r.prob_after for r in self.rounds) if self.rounds else ()

    def as_json(self) -> dict:
        """The CLI's `dkn` JSON object (other tools rely on these keys)."""

        def group(g: Group) -> list[dict]:
            return [{"layer": n.layer, "neuron": n.index} for n in g]

        return {
            "prompt": self.prompt,
            "answer": self.answer,
            "prob": self.prob,
            "clusterer": self.params.clusterer,
            "edge": self.params.edge,
            "knowledge_neurons": [
                {"layer": n.layer, "neuron": n.index, "score": s}
                for n, s in zip(self.knowledge_neurons, self.kn_scores)
            ],
            "bdcs": [group(c.members) for c in self.candidates],
            "single_drops": list(self.single_drops),
            "alone_drops": list(self.alone_drops),
            "candidate_status": [
                {
                    "passed": c.passed,
                    "sufficient": c.sufficient,
                    "reason": c.reason,
                    "persistence": c.persistence,
                    "round": c.round,
                }
                for c in self.candidates
            ],
            "subset_drops": [{"subset": list(s), "drop": d} for s, d in self.subset_drops],
            "union_drop": self.union_drop,
            "dkn": [group(g) for g in self.dkn],
            "dkn_union_drop": self.dkn_union_drop,
            "degenerate": self.degenerate,
            "conditions": dict(self.conditions),
            "sufficiency": [
                {"group": i, "alone_drop": c.alone_drop, "sufficient": c.sufficient}
                for i, c in enumerate(self.candidates)
            ],
            "redundancy": self.redundancy,
            "interactions": [{"subset": list(s), "value": v} for s, v in self.interactions],
            "excess_over_largest": self.excess_over_largest,
            "degeneracy_index": self.excess_over_largest,  # deprecated alias of excess_over_largest
            "combination": self.combination,
            "rounds": [
                {
                    "neurons": group(r.neurons),
                    "scores": list(r.scores),
                    "prob_before": r.prob_before,
                    "prob_after": r.prob_after,
                    "drop_after": r.drop_after,
                    "carriers": group(r.carriers),
                }
                for r in self.rounds
            ],
            "random_control": dict(self.random_control),
            "verdict": self.verdict,
            "seconds": self.seconds,
        }


def analyse(
    lm: LoadedModel,
    prompt: str,
    answer: str,
    neurons: Sequence[Neuron],
    scores: Sequence[float] | None = None,
    params: DegeneracyParams | None = None,
) -> DegeneracyResult:
    """Propose groups of `neurons` (a fact's knowledge neurons), run the subset grid and the degeneracy test."""
    params = params or DegeneracyParams()
    params.validate()
    start = time.perf_counter()
    neurons = tuple(Neuron(*n) for n in neurons)
    scores = tuple(float(s) for s in scores) if scores is not None else (0.0,) * len(neurons)
    rounds: tuple[Round, ...] = ()
    if params.clusterer == "backup":
        from dkn.backup import discover, pathways

        rounds = discover(lm, prompt, answer, params, first_round=neurons)
        if params.backup_pathways:
            paths = pathways(lm, prompt, answer, rounds, params)
            groups, origins = [g for g, _ in paths], [k for _, k in paths]
        else:
            kept = [(r.neurons, k + 1) for k, r in enumerate(rounds) if r.neurons]  # an empty round reports carriers
            groups, origins = [g for g, _ in kept], [k for _, k in kept]
        persistence = []
        found = tuple(dict.fromkeys(n for g in groups for n in g))
        graph = _graph(lm, prompt, answer, found or neurons, params)
    else:
        graph = _graph(lm, prompt, answer, neurons, params)
        groups, persistence = _candidate_groups(lm, prompt, answer, neurons, graph, params)
        origins = []
    groups, persistence = groups[: params.max_bdcs], persistence[: params.max_bdcs]
    grid, control, prob = _evaluate(lm, prompt, answer, groups, set(neurons), params)
    result = _assemble(
        prompt, answer, prob, neurons, scores, graph, groups, persistence, grid, control, params, rounds, origins
    )
    return _with_seconds(result, time.perf_counter() - start)


def _with_seconds(result: DegeneracyResult, seconds: float) -> DegeneracyResult:
    from dataclasses import replace

    return replace(result, seconds=seconds)


def _graph(lm, prompt, answer, neurons, params) -> KnowledgeGraph | None:
    if len(neurons) < 2:
        return None
    return build_graph(lm, neurons, params.max_span, params.gated_input, edge=params.edge, prompt=prompt, answer=answer)


def _evaluate(lm, prompt, answer, groups: list[Group], kns: set[Neuron], params):
    """({subset: signed relative drop}, random-control drops, P unchanged).  The grid of `grid_subsets`, then
    the union of the groups that pass alone when the grid does not hold it (one more batched pass)."""
    subsets = grid_subsets(len(groups), params.max_grid_bdcs)
    union_all = tuple(n for g in groups for n in g)
    control_sets = random_matched_sets(lm, union_all, kns | set(union_all), params.random_seeds, params.seed)
    sets = [_members(groups, s) for s in subsets] + control_sets
    if not sets:
        return {}, np.array([]), _prob(lm, prompt, answer)
    prob, probs = intervene_many(lm, prompt, answer, sets, 0.0, params.mode)
    drops = relative_drops(prob, probs)
    grid = {s: float(d) for s, d in zip(subsets, drops[: len(subsets)])}
    passing = tuple(i for i in range(len(groups)) if abs(grid[(i,)]) < params.threshold_low)
    if passing and passing not in grid:
        _, [p] = intervene_many(lm, prompt, answer, [_members(groups, passing)], 0.0, params.mode)
        grid[passing] = float(relative_drops(prob, np.array([p]))[0])
    return grid, drops[len(subsets) :], prob


def _members(groups: list[Group], subset: Subset) -> Group:
    return tuple(n for i in subset for n in groups[i])


def _prob(lm, prompt, answer) -> float:
    prob, _ = intervene_many(lm, prompt, answer, [], 0.0, "last")
    return prob


def relative_drops(prob: float, probs: np.ndarray) -> np.ndarray:
    """(P0 - P) / P0 for each row; 0 when P0 is 0."""
    return (prob - probs) / prob if prob > 0 else np.zeros_like(probs)


def grid_subsets(n_groups: int, max_grid: int = 6) -> list[Subset]:
    """Non-empty subsets of range(n_groups) to evaluate: all of them up to `max_grid` groups,
    otherwise the singles, the leave-one-outs (each group left alone: sufficiency) and the whole set."""
    everything = tuple(range(n_groups))
    if n_groups == 0:
        return []
    if n_groups <= max_grid:
        return [s for r in range(1, n_groups + 1) for s in itertools.combinations(everything, r)]
    singles = [(i,) for i in everything]
    leave_one_out = [tuple(j for j in everything if j != i) for i in everything]
    return singles + leave_one_out + [everything]


def random_matched_sets(
    lm: LoadedModel, neurons: Sequence[Neuron], exclude: set[Neuron], n_seeds: int, seed: int = 0
) -> list[Group]:
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
        pairs = amig_pairs(lm, prompt, answer, neurons[: params.amig_top], params)
        return ([(pairs[0][0],), (pairs[0][1],)] if pairs else []), []  # the strongest pair; its neurons: BDCs
    if params.clusterer == "ntc":
        components = ntc_components(graph.distance)
        return (
            [tuple(neurons[i] for i in c.members) for c in components],
            [(c.persistence, c.birth, c.death) for c in components],
        )
    clusters = CLUSTERERS[params.clusterer](graph.distance)
    clusters = sorted(clusters, key=len, reverse=True)
    return [tuple(neurons[i] for i in c) for c in clusters], []


def amig_pairs(
    lm, prompt, answer, neurons: Sequence[Neuron], params: DegeneracyParams
) -> list[tuple[Neuron, Neuron, float]]:
    """AMIG's definition of a DKN (Chen et al., AAAI 2024): two neurons, each of which alone changes P by
    less than threshold_low, whose joint suppression lowers P by more than threshold_high.
    Returns (a, b, joint drop) for every such pair, strongest joint drop first (ties: neuron order)."""
    prob, singles = intervene_many(lm, prompt, answer, [(n,) for n in neurons], 0.0, params.mode)
    weak = [n for n, d in zip(neurons, relative_drops(prob, singles)) if abs(d) < params.threshold_low]
    pairs = list(itertools.combinations(weak, 2))
    if not pairs:
        return []
    _, joint = intervene_many(lm, prompt, answer, pairs, 0.0, params.mode)
    found = [(a, b, float(d)) for (a, b), d in zip(pairs, relative_drops(prob, joint)) if d > params.threshold_high]
    return sorted(found, key=lambda t: -t[2])


# ------------------------------------------------------------------ interaction measures
def excess_over_largest(single_drops: Sequence[float], union_drop: float) -> float:
    """(union - max single) / union, in [0, 1]; 0 when the union removes nothing.  The share of the union
    drop that the largest group does not explain alone: 1 - 1/k for k additive groups, so high values do
    NOT mean redundancy (use `redundancy` for that)."""
    if union_drop <= 0 or not len(single_drops):
        return 0.0
    return float(np.clip((union_drop - max(single_drops)) / union_drop, 0.0, 1.0))


degeneracy_index = excess_over_largest  # deprecated name, kept for older callers


def redundancy(single_drops: Sequence[float], union_drop: float) -> float:
    """R = (U - sum of single drops) / U: > 0 redundant, ~0 additive, < 0 each necessary.
    nan when fewer than 2 groups or when the union removes nothing (U <= 0): there is nothing to share."""
    if len(single_drops) < 2 or union_drop <= 0:
        return float("nan")
    return float((union_drop - float(np.sum(single_drops))) / union_drop)


def moebius_interactions(grid: dict[Subset, float], n_groups: int) -> list[tuple[Subset, float]]:
    """Harsanyi dividends m(S) = sum_{T subset of S} (-1)^(|S| - |T|) v(T), v(empty) = 0, for every non-empty
    subset S of range(n_groups), from a full grid of drops v; [] when the grid lacks a subset."""
    subsets = [s for r in range(1, n_groups + 1) for s in itertools.combinations(range(n_groups), r)]
    if n_groups == 0 or any(s not in grid for s in subsets):
        return []
    out = []
    for s in subsets:
        value = sum((-1) ** (len(s) - r) * grid[t] for r in range(1, len(s) + 1) for t in itertools.combinations(s, r))
        out.append((s, float(value)))
    return out


def combination(single_drops: Sequence[float], union_drop: float, threshold_low: float = 0.05) -> str:
    """How the groups combine, from the redundancy R: "redundant" when R > 0.2 (the union removes > 1.25x
    what the singles add up to), "each necessary" when R < -0.25 (< 0.8x), "additive" in between;
    "no effect" when the union removes < threshold_low; "n/a" for fewer than 2 groups."""
    if len(single_drops) < 2:
        return "n/a"
    if union_drop < threshold_low:
        return "no effect"
    r = redundancy(single_drops, union_drop)
    if r > 0.2:
        return "redundant"
    return "each necessary" if r < -0.25 else "additive"


# ------------------------------------------------------------------ the test
def _assemble(
    prompt, answer, prob, neurons, scores, graph, groups, persistence, grid, control, params, rounds, origins
):
    n = len(groups)
    singles = [grid[(i,)] for i in range(n)]
    everything = tuple(range(n))
    union = grid.get(everything, 0.0)
    alone = [grid.get(tuple(j for j in everything if j != i), np.nan) if n > 1 else 0.0 for i in range(n)]
    candidates = tuple(
        _candidate(
            g,
            singles[i],
            alone[i],
            params,
            persistence[i] if i < len(persistence) else None,
            origins[i] if i < len(origins) else None,
        )
        for i, g in enumerate(groups)
    )
    passing = tuple(i for i, c in enumerate(candidates) if c.passed)
    dkn_drop = grid[passing] if passing else 0.0
    conditions = {
        "two_or_more_groups": n >= 2,
        "two_or_more_pass_alone": len(passing) >= 2,
        "together_remove_fact": bool(passing) and dkn_drop > params.threshold_high,
        "each_suffices": bool(passing) and all(candidates[i].sufficient for i in passing),
    }
    degenerate = (
        conditions["two_or_more_pass_alone"]
        and conditions["together_remove_fact"]
        and (conditions["each_suffices"] or not params.require_sufficiency)
    )
    rc = {
        "mean": float(np.mean(control)) if len(control) else 0.0,
        "std": float(np.std(control)) if len(control) else 0.0,
        "n": len(control),
        "drops": [float(x) for x in control],
    }
    extra = {}
    if params.clusterer == "amig" and n == 2:
        extra["definition"] = (
            "AMIG's definition (Chen et al., AAAI 2024): two neurons, each harmless alone, "
            "harmful together; the pair is the DKN, its neurons the components"
        )
    verdict = _verdict(len(neurons), candidates, passing, dkn_drop, degenerate, conditions, params)
    return DegeneracyResult(
        prompt,
        answer,
        prob,
        neurons,
        scores,
        graph,
        candidates,
        tuple(sorted(grid.items(), key=lambda kv: (len(kv[0]), kv[0]))),
        union,
        tuple(groups[i] for i in passing) if degenerate else (),
        float(dkn_drop),
        degenerate,
        excess_over_largest(singles, union),
        redundancy(singles, union),
        tuple(moebius_interactions(grid, n)),
        combination(singles, union, params.threshold_low),
        conditions,
        rc,
        verdict,
        params,
        tuple(rounds),
        extra=extra,
    )


def _candidate(group: Group, drop: float, alone: float, params: DegeneracyParams, persistence, origin) -> Candidate:
    passed = abs(drop) < params.threshold_low
    change = "lowers" if drop >= 0 else "raises"
    if passed:
        reason = f"alone it {change} P by {abs(drop):.1%} (< {params.threshold_low:.0%}): the rest can stand in for it"
    elif drop < 0:
        reason = (
            f"alone it raises P by {abs(drop):.1%} (>= {params.threshold_low:.0%}): "
            "switching it off changes the answer, so it is not harmless"
        )
    else:
        reason = f"alone it lowers P by {drop:.1%} (>= {params.threshold_low:.0%}): it is needed, not redundant"
    sufficient = bool(np.isfinite(alone) and alone < params.threshold_high)
    p, b, d = persistence if persistence else (None, None, None)
    return Candidate(group, float(drop), passed, reason, p, b, d, float(alone), sufficient, origin)


def _verdict(n_neurons, candidates, passing, dkn_drop, degenerate, conditions, params) -> str:
    if params.clusterer != "backup" and n_neurons < 2:
        return f"only {n_neurons} knowledge neuron(s): at least 2 are needed to form groups"
    if not candidates:
        return "the method found no candidate group"
    if not conditions["two_or_more_groups"]:
        return "not degenerate: the method found a single group, and a DKN needs at least 2"
    if len(passing) < 2:
        return (
            f"not degenerate: only {len(passing)} of {len(candidates)} groups can go alone (P changes by "
            f"< {params.threshold_low:.0%}); at least 2 are needed"
        )
    if not conditions["together_remove_fact"]:
        return (
            f"not degenerate: each of {len(passing)} groups can go alone, but all together lower P by only "
            f"{dkn_drop:.1%} (needs > {params.threshold_high:.0%})"
        )
    insufficient = [i for i in passing if not candidates[i].sufficient]
    if insufficient and params.require_sufficiency:
        return (
            f"not degenerate: {len(insufficient)} of the {len(passing)} passing groups cannot express the "
            f"fact on its own (with the other groups off P drops by >= {params.threshold_high:.0%})"
        )
    tail = (
        "; each group suffices on its own"
        if not insufficient
        else f"; {len(insufficient)} of them cannot express the fact on its own (sufficiency not required)"
    )
    return (
        f"degenerate: any one of {len(passing)} groups can go (each < {params.threshold_low:.0%}), "
        f"all together lower P by {dkn_drop:.1%}{tail}"
    )
