"""Testing groups of neurons a user chose: the subset grid, a random control, and the dose-response curve.

The app's Intervene page lets a researcher form groups from any neurons (knowledge neurons, neurons picked
on the heatmap, typed ones) and asks three questions of them, answered here so that the page only draws:

- `test_groups`: scale every subset of the groups by a factor in one batched pass, and summarise the grid
  with dkn.degeneracy's degeneracy index and combination class;
- `random_control`: scale as many random neurons, in the same layers, the same way, over several seeds;
- `dose_response`: P(answer) as each group's factor goes from -1 to 3.

Built on dkn.degeneracy's public helpers (`grid_subsets`, `relative_drops`, `random_matched_sets`) and
`dkn.interventions.intervene_many`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dkn.degeneracy import (
    combination,
    degeneracy_index,
    grid_subsets,
    random_matched_sets,
    relative_drops,
)
from dkn.interventions import intervene_many
from dkn.models import LoadedModel
from dkn.neurons import Neuron

Group = tuple[Neuron, ...]
DOSE_FACTORS = tuple(float(f) for f in np.round(np.linspace(-1.0, 3.0, 17), 2))  # steps of 0.25


@dataclass(frozen=True)
class GroupGrid:
    """Every tested subset of the groups scaled together, and what the grid says."""

    prob: float  # P(answer), unchanged model
    subsets: tuple[tuple[int, ...], ...]  # group indices switched together
    probs: tuple[float, ...]  # P(answer) with each subset scaled
    drops: tuple[float, ...]  # relative drops (P0 - P) / P0, same order
    n_groups: int
    factor: float
    mode: str

    def drop(self, subset: Sequence[int]) -> float:
        return self.drops[self.subsets.index(tuple(subset))]

    @property
    def single_drops(self) -> tuple[float, ...]:
        return tuple(self.drop((i,)) for i in range(self.n_groups))

    @property
    def union_drop(self) -> float:
        return self.drop(tuple(range(self.n_groups)))

    @property
    def degeneracy_index(self) -> float:
        return degeneracy_index(self.single_drops, self.union_drop)

    @property
    def combination(self) -> str:
        return combination(self.single_drops, self.union_drop)

    @property
    def subset_probs(self) -> list[tuple[tuple[int, ...], float]]:
        return list(zip(self.subsets, self.probs))


def test_groups(
    lm: LoadedModel,
    prompt: str,
    answer: str,
    groups: Sequence[Sequence[Neuron]],
    factor: float = 0.0,
    mode: str = "last",
    max_grid: int = 6,
) -> GroupGrid:
    """Scale every subset of `groups` (all of them up to `max_grid` groups; else singles, leave-one-outs
    and all) by `factor`, in one batched intervention."""
    groups = [tuple(Neuron(*n) for n in g) for g in groups]
    if not groups or any(not g for g in groups):
        raise ValueError("test_groups needs at least one group, and no empty group")
    subsets = grid_subsets(len(groups), max_grid)
    sets = [tuple(n for i in s for n in groups[i]) for s in subsets]
    prob, probs = intervene_many(lm, prompt, answer, sets, factor, mode)  # probs: [n_subsets]
    drops = relative_drops(prob, probs)
    return GroupGrid(
        prob,
        tuple(subsets),
        tuple(float(p) for p in probs),
        tuple(float(d) for d in drops),
        len(groups),
        float(factor),
        mode,
    )


@dataclass(frozen=True)
class RandomControl:
    """P(answer) when as many random neurons, in the same layers, are scaled the same way."""

    prob: float  # unchanged
    probs: tuple[float, ...]  # one per seed
    factor: float
    mode: str

    @property
    def mean(self) -> float:
        return float(np.mean(self.probs)) if self.probs else self.prob

    @property
    def std(self) -> float:
        return float(np.std(self.probs)) if self.probs else 0.0


def random_control(
    lm: LoadedModel,
    prompt: str,
    answer: str,
    neurons: Sequence[Neuron],
    factor: float = 0.0,
    mode: str = "last",
    exclude: Sequence[Neuron] = (),
    n_seeds: int = 5,
    seed: int = 0,
) -> RandomControl:
    """Scale `n_seeds` random neuron sets matched to `neurons` by layer (none of them in `exclude` or in
    `neurons`) by `factor`, in one batched pass."""
    neurons = tuple(Neuron(*n) for n in neurons)
    if not neurons:
        raise ValueError("the random control needs the neurons it is matched to: choose some first")
    sets = random_matched_sets(lm, neurons, set(exclude) | set(neurons), n_seeds, seed)
    prob, probs = intervene_many(lm, prompt, answer, sets, factor, mode)
    return RandomControl(prob, tuple(float(p) for p in probs), float(factor), mode)


@dataclass(frozen=True)
class DoseResponse:
    """P(answer) for each group at each factor: probs[g][k] at factors[k]."""

    prob: float
    factors: tuple[float, ...]
    probs: tuple[tuple[float, ...], ...]  # [n_groups][n_factors]
    mode: str

    def table(self, names: Sequence[str]) -> list[dict]:
        return [
            {"group": name, "factor": f, "p_answer": p}
            for name, row in zip(names, self.probs)
            for f, p in zip(self.factors, row)
        ]


def dose_response(
    lm: LoadedModel,
    prompt: str,
    answer: str,
    groups: Sequence[Sequence[Neuron]],
    factors: Sequence[float] = DOSE_FACTORS,
    mode: str = "last",
) -> DoseResponse:
    """P(answer) as each group's factor sweeps `factors` (default -1 to 3 in steps of 0.25).

    One batched intervention: a row per (group, factor), each with its own factor; in "last" mode each row
    is a single token over the cached prompt prefix ("weights" mode edits the weights, one pass per row)."""
    groups = [tuple(Neuron(*n) for n in g) for g in groups]
    if not groups or any(not g for g in groups):
        raise ValueError("dose_response needs at least one group, and no empty group")
    factors = tuple(float(f) for f in factors)
    if not factors or not all(np.isfinite(factors)):
        raise ValueError("dose_response needs finite factors")
    sets = [g for g in groups for _ in factors]  # group-major: row g * n_factors + j is group g at factors[j]
    prob, probs = intervene_many(lm, prompt, answer, sets, factors * len(groups), mode)  # [n_groups * n_factors]
    grid = probs.reshape(len(groups), len(factors))  # [n_groups, n_factors]
    return DoseResponse(prob, factors, tuple(tuple(float(p) for p in row) for row in grid), mode)


test_groups.__test__ = False  # not a pytest test, whatever imports it

__all__ = [
    "DOSE_FACTORS",
    "DoseResponse",
    "GroupGrid",
    "RandomControl",
    "dose_response",
    "random_control",
    "test_groups",
]
