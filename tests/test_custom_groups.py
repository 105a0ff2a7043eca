"""dkn.custom_groups: the user's groups tested as a grid, against a random control, and as a dose-response
curve, on a tiny random llama; each result is checked against one-at-a-time interventions."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import tiny_model

from dkn import custom_groups
from dkn.interventions import intervene
from dkn.neurons import Neuron

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT, ANSWER = "the capital of france is", "paris"
GROUPS = [(Neuron(0, 1), Neuron(0, 5)), (Neuron(1, 2),), (Neuron(2, 7), Neuron(2, 8))]


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


def _p(lm, neurons, factor, mode="last"):
    return intervene(lm, PROMPT, ANSWER, neurons, factor, mode).prob_after


@pytest.mark.parametrize("mode", ["last", "all"])
def test_grid_matches_single_interventions(lm, mode):
    grid = custom_groups.test_groups(lm, PROMPT, ANSWER, GROUPS, 0.0, mode)
    assert len(grid.subsets) == 7 and grid.n_groups == 3  # every non-empty subset of 3
    for subset, p in grid.subset_probs:
        neurons = [n for i in subset for n in GROUPS[i]]
        assert p == pytest.approx(_p(lm, neurons, 0.0, mode), rel=1e-4, abs=1e-7)
    p0 = _p(lm, [], 1.0)
    assert grid.prob == pytest.approx(p0, rel=1e-5)
    assert grid.union_drop == pytest.approx((p0 - grid.probs[-1]) / p0, rel=1e-4)
    assert 0.0 <= grid.degeneracy_index <= 1.0
    assert grid.combination in {"redundant", "additive", "each necessary", "no effect"}


def test_grid_refuses_empty_groups(lm):
    with pytest.raises(ValueError, match="at least one group"):
        custom_groups.test_groups(lm, PROMPT, ANSWER, [])
    with pytest.raises(ValueError, match="no empty group"):
        custom_groups.test_groups(lm, PROMPT, ANSWER, [(Neuron(0, 1),), ()])


def test_random_control_is_matched_and_excludes(lm):
    chosen = GROUPS[0] + GROUPS[2]
    rc = custom_groups.random_control(lm, PROMPT, ANSWER, chosen, 0.0, "last", exclude=[Neuron(0, 2)], n_seeds=4)
    assert len(rc.probs) == 4
    assert rc.mean == pytest.approx(np.mean(rc.probs)) and rc.std == pytest.approx(np.std(rc.probs))
    from dkn.degeneracy import random_matched_sets

    for s, p in zip(random_matched_sets(lm, chosen, set(chosen) | {Neuron(0, 2)}, 4, 0), rc.probs):
        assert sorted(n.layer for n in s) == sorted(n.layer for n in chosen)
        assert not set(s) & (set(chosen) | {Neuron(0, 2)})
        assert p == pytest.approx(_p(lm, s, 0.0), rel=1e-4, abs=1e-7)
    with pytest.raises(ValueError, match="choose some first"):
        custom_groups.random_control(lm, PROMPT, ANSWER, [])


def test_dose_response_is_each_factor_in_turn(lm):
    dr = custom_groups.dose_response(lm, PROMPT, ANSWER, GROUPS[:2], factors=(-1.0, 0.0, 1.0, 3.0))
    assert dr.factors == (-1.0, 0.0, 1.0, 3.0) and len(dr.probs) == 2
    p0 = _p(lm, [], 1.0)
    for g, row in zip(GROUPS[:2], dr.probs):
        assert row[2] == pytest.approx(p0, rel=1e-4)  # factor 1 changes nothing
        for f, p in zip(dr.factors, row):
            assert p == pytest.approx(_p(lm, g, f), rel=1e-4, abs=1e-7)
    assert len(dr.table(["a", "b"])) == 8
    assert custom_groups.DOSE_FACTORS[0] == -1.0 and custom_groups.DOSE_FACTORS[-1] == 3.0
    with pytest.raises(ValueError, match="finite"):
        custom_groups.dose_response(lm, PROMPT, ANSWER, GROUPS[:1], factors=(float("nan"),))


def test_dose_response_is_one_batched_pass(lm, monkeypatch):
    """The whole curve is one call of the batched intervention (a row per group and factor), not one per factor."""
    from dkn import interventions

    calls = []
    real = interventions._step_distributions

    def counted(lm_, query, sets, factors, mode):
        calls.append(len(sets))
        return real(lm_, query, sets, factors, mode)

    monkeypatch.setattr(interventions, "_step_distributions", counted)
    dr = custom_groups.dose_response(lm, PROMPT, ANSWER, GROUPS, factors=custom_groups.DOSE_FACTORS)
    assert calls == [1 + len(GROUPS) * len(custom_groups.DOSE_FACTORS)]  # the unchanged row + every (group, factor)
    assert len(dr.probs) == len(GROUPS) and all(len(r) == len(custom_groups.DOSE_FACTORS) for r in dr.probs)
