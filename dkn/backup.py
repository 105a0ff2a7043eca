"""Backup discovery: conditional attribution rounds, which see what integrated gradients cannot.

Integrated gradients scales one layer at a time while every other layer stays on, so when two
groups of neurons each carry the answer on their own, scaling either barely moves P and neither
scores high: the redundant storage that the degeneracy test looks for is exactly what one
attribution misses.  Self-repair ("hydra effect", McGrath et al. 2023) is the other side of the same
coin: switch the first carriers off and others take over.  So, in rounds:

1. round 1: the given knowledge neurons (or, without them, the coarse neurons of an attribution);
2. suppress every neuron found so far, and attribute again *on the suppressed model*: the coarse
   neurons of that attribution (score > t x the top score, at most `max_neurons`, never one already
   found) are the backups that now carry the fact: the next round;
3. repeat until P(answer) with everything found so far suppressed has dropped by more than
   `threshold_high` (the fact is gone), no new neuron is found, or `rounds` rounds are done.

Necessary carriers are held out of the first round when that round removes the fact (it would end the
rounds before any backup is seen, with nothing for it to be redundant with): a neuron of the round whose
suppression alone, in the unchanged model, removes the fact (drop > `threshold_high`) is kept on and listed
as the round's `carriers` (a prompt's top knowledge neuron is often such a carrier, feeding every pathway).
The round is then the rest of the given neurons; when every given neuron is a carrier, or the round came
from an attribution, it is chosen again, with the coarse threshold relative to the best of the rest, from an
attribution that holds every carrier at its clean activation on the integration paths (dkn.rows.pinned):
scaling a layer scales its carrier too, and without the pin the carrier's layer-mates borrow its effect (one
batched intervention per screen; at most `max_neurons` carriers; a round of nothing but carriers is kept,
empty, to report them).  Later rounds keep the carriers pinned and
never choose them.  Held out only when needed: a backup that wakes only when a whole group is off can make a
group harmless whose members are each harmful alone (the planted default model's pathway A), and a round
that can go keeps such members.

A round is not yet a pathway: it can hold parts of two parallel pathways (both carried the fact once the
earlier rounds were off), miss a pathway's upstream neurons (whose effect runs through a member already
found, so suppressing that member hid them) and carry noise.  `pathways` turns the rounds into whole
pathways, each step with every other component suppressed:
a. split: two members each harmless alone (drop < threshold_low) whose joint suppression removes the fact
   (drop > threshold_high) lie on parallel pathways: the two sides of each connected, bipartite graph of
   such pairs are two parts (a non-bipartite one stays one part); members in no such pair are dropped
   (every single and pair in one batched intervention, split into passes by the memory budget).  With three
   or more pathways in one round no pair removes the fact; then a member, or two members, with which the
   rest of the round can go (relative change < threshold_low) form a part;
b. complete: attribute with every other part suppressed, so that this part's pathway alone carries the
   fact, and add the coarse neurons of that attribution (upstream members included; never a carrier);
c. prune: keep the members whose suppression alone (the other split parts still off) removes the fact,
   i.e. the pathway's links; a part with no such member is kept whole;
d. keep the parts that carry the fact with every other part off: the fact survives them off (relative drop
   < threshold_high), and this part off too removes it (a further relative drop > threshold_high).
Parts are made disjoint (a neuron stays in the first).  On the planted tiny models (bench/
bench_degeneracy_recall.py) this is what lets backup discovery recover every planted pathway.

Each pathway is one candidate component, which dkn.degeneracy then tests like any other group; P after
each round is the "peeling" curve.  During the rounds, neurons are suppressed (set to 0) where the
degeneracy test suppresses them (`params.mode`: at the answer position by default, or at every position),
inside a context manager around dkn.attribution.attribute; pinning is the one thing the attribution engine
does for the rounds (dkn.rows.pinned).
(Until this round the rounds always suppressed at every position; on the planted default model that
removes facts whose backup was trained to take over at the answer position, bench/results/
degeneracy_recall.md.)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import networkx as nx
import numpy as np
import torch

from dkn.hooks import edit_neurons
from dkn.models import LoadedModel
from dkn.neurons import Neuron, check_in_range

if TYPE_CHECKING:
    from dkn.degeneracy import DegeneracyParams, Round


@contextmanager
def suppressed(
    lm: LoadedModel, neurons: Iterable[Neuron], site: str = "post", mode: str = "all", positions: Sequence[int] = ()
) -> Iterator[None]:
    """Within the block, `neurons` output 0 (hooks removed on exit, also on errors): with mode "all" (or
    "weights") at every position; with "last" at the answer position only, as dkn.interventions' "last":
    for a causal model the last position of every pass (a full prompt's last token, or the single token of
    the runner's rows) except the runner's prefix run (dkn.forward.in_prefix_run), for a masked model
    `positions` (the answer's mask positions)."""
    from dkn.forward import in_prefix_run, no_kept_runners

    if mode not in ("all", "weights", "last"):
        raise ValueError(f"unknown suppression mode {mode!r}: use 'all', 'weights' or 'last'")
    if mode == "last" and lm.family.masked_lm and not positions:
        raise ValueError("suppression at the answer position of a masked model needs the answer's positions")
    neurons = tuple(Neuron(*n) for n in neurons)
    check_in_range(neurons, lm.n_layers, lm.d_mlp)
    by_layer: dict[int, list[int]] = {}
    for n in neurons:
        by_layer.setdefault(n.layer, []).append(n.index)
    # "weights" zeroes a neuron's weights in dkn.interventions: for its output that is every position
    rows = (list(positions) if lm.family.masked_lm else [-1]) if mode == "last" else [slice(None)]

    def zero(index: list[int]):
        def edit(h):  # h: [B, T, d_mlp]
            if mode == "last" and in_prefix_run():
                return h
            mask = torch.ones(h.shape[-2:], device=h.device, dtype=h.dtype)  # [T, d_mlp]
            for row in rows:  # a position, or every position
                mask[row, index] = 0
            return h * mask

        return edit

    with no_kept_runners(), edit_neurons(lm, {layer: zero(index) for layer, index in by_layer.items()}, site):
        yield


def attribute_suppressed(
    lm: LoadedModel,
    prompt: str,
    answer: str,
    neurons: Sequence[Neuron],
    params=None,
    mode: str = "all",
    pinned: Sequence[Neuron] = (),
):
    """dkn.attribution.attribute with `neurons` suppressed (`mode` as in `suppressed`) and the `pinned` neurons
    held at their clean activations on every integration path (dkn.rows.pinned); never cached: the store's
    key knows about neither."""
    from dkn.attribution import attribute
    from dkn.query import make_query
    from dkn.rows import pinned as pinned_on_paths

    steps = make_query(lm, prompt, answer).steps
    if mode == "last" and lm.family.masked_lm and len(steps) > 1:
        # intervene's "last" zeroes each answer token's own mask position in that token's pass; the hook here
        # cannot tell the passes apart
        raise ValueError(
            "attribution with neurons off at the answer position of a masked model needs a one-token answer; "
            "use mode 'all' for multi-token answers"
        )
    positions = [step.position for step in steps] if lm.family.masked_lm else []
    with suppressed(lm, neurons, mode=mode, positions=positions), pinned_on_paths(pinned):
        return attribute(lm, prompt, answer, params, store=None)


def discover(
    lm: LoadedModel, prompt: str, answer: str, params: DegeneracyParams, first_round: Sequence[Neuron] = ()
) -> tuple[Round, ...]:
    """The rounds of backup discovery (see the module docstring); thresholds and limits from `params`:
    threshold_high (the fact is gone; a carrier), backup_rounds, backup_t, backup_max_neurons,
    backup_attribution."""
    from dkn.degeneracy import Round
    from dkn.interventions import intervene_many

    found: list[Neuron] = []
    carriers: list[Neuron] = []
    rounds: list[Round] = []
    prob0, _ = intervene_many(lm, prompt, answer, [], 0.0, params.mode)
    prob_before = prob0
    given = tuple(dict.fromkeys(Neuron(*n) for n in first_round))[: params.backup_max_neurons]

    def after(new: Sequence[Neuron]) -> tuple[float, float]:  # (P, relative drop) with found + new off
        _, [prob] = intervene_many(lm, prompt, answer, [tuple(found) + tuple(new)], 0.0, params.mode)
        return float(prob), float((prob0 - prob) / prob0) if prob0 > 0 else 0.0

    for k in range(params.backup_rounds):
        if k == 0 and given:
            new, new_scores = given, (float("nan"),) * len(given)
        else:
            new, new_scores = _attributed_round(lm, prompt, answer, params, found, carriers, set(found) | set(carriers))
        if not new:
            break
        prob_after, drop = after(new)
        held: tuple[Neuron, ...] = ()
        if k == 0 and drop > params.threshold_high:  # the first round removes the fact: hold out its carriers
            new, new_scores, held = _round_without_carriers(lm, prompt, answer, (new, new_scores), bool(given), params)
            carriers += held
            if not new:  # nothing but carriers: an empty round still reports them
                rounds.append(Round((), (), prob0, prob0, 0.0, held))
                break
            prob_after, drop = after(new)
        found += new
        rounds.append(Round(tuple(new), tuple(new_scores), prob_before, prob_after, drop, held))
        prob_before = prob_after
        if drop > params.threshold_high:
            break
    return tuple(rounds)


def _round_without_carriers(lm, prompt, answer, first, given: bool, params):
    """(the first round's neurons, their scores, the carriers held out of it), from `first` = (neurons, scores),
    the first choice (the given neurons when `given`, else the coarse neurons of the unchanged model's
    attribution), less each carrier (see the module docstring).  Whenever carriers were held out of a choice
    that came from an attribution, and when every given neuron is a carrier, the round is chosen again from an
    attribution with every carrier so far pinned (dkn.rows.pinned); at most `max_neurons` carriers."""
    held: list[Neuron] = []
    new, new_scores = first
    while True:
        if not new:
            return (), (), tuple(held)
        drops = _drops_with(lm, prompt, answer, (), [(n,) for n in new], params.mode)
        carrier = drops > params.threshold_high
        fresh = [n for n, c in zip(new, carrier) if c][: params.backup_max_neurons - len(held)]
        held += fresh
        kept = [(n, v) for n, v, c in zip(new, new_scores, carrier) if not c and n not in held]
        if (kept and (given or not fresh)) or len(held) >= params.backup_max_neurons:
            return tuple(n for n, _ in kept), tuple(v for _, v in kept), tuple(held)
        given = False  # choose again from an attribution with the carriers pinned
        new, new_scores = _attributed_round(lm, prompt, answer, params, (), held, set(held))


def _attributed_round(lm, prompt, answer, params, off, pins, exclude: set[Neuron]):
    """(neurons, scores): the coarse neurons (round_neurons) of an attribution with `off` suppressed and `pins`
    pinned (attribute_suppressed, `params.backup_attribution`, `params.mode`), none of them in `exclude`."""
    scores = attribute_suppressed(lm, prompt, answer, off, params.backup_attribution, params.mode, pinned=pins).scores
    return round_neurons(scores, exclude, params.backup_t, params.backup_max_neurons)


def round_neurons(
    scores: np.ndarray, exclude: set[Neuron], t: float, max_neurons: int
) -> tuple[tuple[Neuron, ...], tuple[float, ...]]:
    """The coarse neurons of one round among those not in `exclude`: score > t x the best score outside
    `exclude`, highest first, at most `max_neurons`; scores [n_layers, d_mlp].  Empty when no score outside
    `exclude` is positive."""
    from dkn.selection import coarse_neurons

    rest = np.array(scores, dtype=float, copy=True)  # [n_layers, d_mlp]
    for n in exclude:
        rest[n.layer, n.index] = 0.0  # never coarse, and not the reference
    chosen = [n for n in coarse_neurons(rest, t) if n not in exclude]
    chosen.sort(key=lambda n: -scores[n.layer, n.index])
    chosen = chosen[:max_neurons]
    return tuple(chosen), tuple(float(scores[n.layer, n.index]) for n in chosen)


def pathways(
    lm: LoadedModel, prompt: str, answer: str, rounds: Sequence[Round], params: DegeneracyParams
) -> tuple[tuple[tuple[Neuron, ...], int], ...]:
    """(pathway, the 1-based round it came from) for each pathway in the rounds: split, complete, prune
    (see the module docstring); suppression and thresholds from `params`."""
    parts: list[tuple[tuple[Neuron, ...], int]] = []
    groups = [tuple(r.neurons) for r in rounds if r.neurons]
    carriers = set(held_carriers(rounds))  # kept on, never added to a pathway
    for k, group in enumerate(groups):
        others = [n for j, g in enumerate(groups) if j != k for n in g]
        parts += [(part, k + 1) for part in _split(lm, prompt, answer, group, others, params)]
    completed = []
    for k, (part, origin) in enumerate(parts):
        others = [n for j, (p, _) in enumerate(parts) if j != k for n in p]
        new, _ = _attributed_round(lm, prompt, answer, params, others, tuple(carriers), set(others) | carriers)
        whole = tuple(dict.fromkeys(part + new))
        completed.append((_prune(lm, prompt, answer, whole, others, params), origin))
    completed = _carrying(lm, prompt, answer, completed, params)
    seen: set[Neuron] = set()
    out = []
    for part, origin in completed:
        part = tuple(n for n in part if n not in seen)
        seen |= set(part)
        if part:
            out.append((part, origin))
    return tuple(out)


def held_carriers(rounds: Sequence[Round]) -> tuple[Neuron, ...]:
    """Every necessary carrier the rounds held out (kept on throughout), in the order they were found."""
    return tuple(n for r in rounds for n in r.carriers)


def _carrying(lm, prompt, answer, parts, params):
    """The parts that carry the fact once every other part is off: with the others off the fact survives
    (relative drop < threshold_high), and switching this part off too removes it (a further relative drop
    > threshold_high).  A backup pathway is what carries the fact once the others are gone; rounds taken after
    the carriers were held out can hold only small contributions that add up (their union removes the fact
    although none stores it), which would otherwise pass as groups that can each go.  All parts when fewer than
    two; repeated until no part is dropped (the others of each part change when one goes)."""
    while len(parts) >= 2:
        groups = [part for part, _ in parts]
        everything = tuple(n for g in groups for n in g)
        # the other parts, less this part's own members (completed parts can share a neuron)
        own = [set(g) for g in groups]
        others = [
            tuple(n for j, g in enumerate(groups) if j != k for n in g if n not in own[k]) for k in range(len(groups))
        ]
        drops = _drops_with(lm, prompt, answer, (), others + [everything], params.mode)  # from the unchanged P
        left, gone = drops[:-1], drops[-1]
        further = (gone - left) / np.maximum(1 - left, 1e-12)  # this part off too, relative to the others off
        kept = [p for p, d, f in zip(parts, left, further) if d < params.threshold_high and f > params.threshold_high]
        if len(kept) == len(parts):
            break
        parts = kept
    return parts


def _drops_with(lm, prompt, answer, others: Sequence[Neuron], sets: list[tuple[Neuron, ...]], mode: str) -> np.ndarray:
    """Relative drop of P, suppressed as `mode` says, for `others` plus each set, against `others` alone (one
    batched intervention; dkn.interventions splits its rows into passes that fit the memory budget)."""
    from dkn.interventions import intervene_many

    base = tuple(others)
    _, probs = intervene_many(lm, prompt, answer, [base] + [base + s for s in sets], 0.0, mode)
    p0 = probs[0]
    return (p0 - probs[1:]) / p0 if p0 > 0 else np.zeros(len(sets))


def _split(lm, prompt, answer, group, others, params) -> list[tuple[Neuron, ...]]:
    """The parts of `group` that lie on parallel pathways (members harmless alone, jointly removing the fact
    with one of another part); the whole group when no pair says so.  Members in no such pair are dropped.
    Three or more pathways in one group have no such pair (any two members off leave a third pathway on):
    then the parts are the members that carry the fact on their own, the rest of the group off (`_co_carriers`)."""
    group = list(group)
    if len(group) < 2:
        return [tuple(group)]
    pairs = list(itertools.combinations(range(len(group)), 2))
    sets = [(n,) for n in group] + [(group[i], group[j]) for i, j in pairs]
    drops = _drops_with(lm, prompt, answer, others, sets, params.mode)
    single, joint = drops[: len(group)], drops[len(group) :]
    parallel = {
        (i, j)
        for (i, j), d in zip(pairs, joint)
        if abs(single[i]) < params.threshold_low and abs(single[j]) < params.threshold_low and d > params.threshold_high
    }
    if not parallel:
        return _co_carriers(lm, prompt, answer, group, others, pairs, params) or [tuple(group)]
    graph = nx.Graph(parallel)  # an edge: two members on parallel pathways
    parts = []
    for component in sorted(nx.connected_components(graph), key=min):
        sub = graph.subgraph(component)
        # two pathways: the two sides of a bipartite component (a missed pair does not merge them)
        sides = nx.bipartite.sets(sub) if nx.is_bipartite(sub) else (component,)
        parts += [tuple(group[i] for i in sorted(side)) for side in sides]
    return sorted(parts, key=lambda part: group.index(part[0]))


def _co_carriers(lm, prompt, answer, group, others, pairs, params) -> list[tuple[Neuron, ...]]:
    """Parts of `group` that each carry the fact with every other member (and `others`) off, i.e. the rest can go
    (|relative change| < threshold_low): a member that does so alone is a part; two members that do so together,
    neither alone, are one part (a pathway of two steps; connected pairs, one part; longer pathways are not
    recognised).  Only for a group whose suppression removes the fact.  At least two parts, or none (empty: the
    group cannot be split so)."""
    everyone = tuple(group)
    keep = lambda kept: tuple(n for n in everyone if n not in kept)  # noqa: E731  suppress all but `kept`
    sets = [keep({n}) for n in group] + [keep({group[i], group[j]}) for i, j in pairs] + [everyone]
    drops = _drops_with(lm, prompt, answer, others, sets, params.mode)
    if drops[-1] <= params.threshold_high:  # the whole group can go: it holds no pathway the fact needs
        return []
    alone = [abs(d) < params.threshold_low for d in drops[: len(group)]]
    graph = nx.Graph()
    graph.add_nodes_from(i for i, ok in enumerate(alone) if ok)
    graph.add_edges_from(
        (i, j)
        for (i, j), d in zip(pairs, drops[len(group) :])
        if abs(d) < params.threshold_low and not alone[i] and not alone[j]
    )
    parts = [tuple(group[i] for i in sorted(c)) for c in sorted(nx.connected_components(graph), key=min)]
    return parts if len(parts) >= 2 else []


def _prune(lm, prompt, answer, part, others, params) -> tuple[Neuron, ...]:
    """The members of `part` whose suppression alone (with `others` off) removes the fact; all of `part` when
    none does (a part that is redundant inside)."""
    drops = _drops_with(lm, prompt, answer, others, [(n,) for n in part], params.mode)
    links = tuple(n for n, d in zip(part, drops) if d > params.threshold_high)
    return links or tuple(part)
