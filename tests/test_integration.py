"""dkn.integration: the quadrature rules, on integrals whose values are known."""

from __future__ import annotations

import numpy as np
import pytest

from dkn.integration import (
    RULES,
    halved_trapezoid_weights,
    integration_points,
    intervals_needed,
    new_trapezoid_nodes,
    refined_trapezoid,
    richardson_error,
)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("m", [1, 2, 5, 20])
def test_points_lie_in_the_unit_interval_and_weights_sum_to_one(rule, m):
    if rule == "adaptive" and m % 2:
        with pytest.raises(ValueError, match="even number of intervals"):
            integration_points(rule, m)
        return
    alphas, weights = integration_points(rule, m)
    assert alphas.shape == weights.shape and alphas.dtype == weights.dtype == np.float64
    assert (alphas >= 0).all() and (alphas <= 1).all()
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 20])
def test_gauss_legendre_integrates_polynomials_up_to_degree_2m_minus_1_exactly(m):
    alphas, weights = integration_points("gauss", m)
    assert np.all(np.diff(alphas) > 0) and (alphas > 0).all() and (alphas < 1).all()  # interior nodes
    for degree in range(2 * m):
        assert weights @ alphas**degree == pytest.approx(1.0 / (degree + 1), rel=1e-12, abs=1e-14), degree
    if m <= 5:  # and not beyond: x^(2m) is where the rule first errs (tiny for large m)
        assert abs(weights @ alphas ** (2 * m) - 1.0 / (2 * m + 1)) > 1e-7


def test_gauss_is_far_more_accurate_than_the_peer_rule_on_a_smooth_curve():
    """A sigmoid-like path (how P moves along alpha): 6 Gauss points beat 20 linspace points tenfold."""
    f = lambda a: 1.0 / (1.0 + np.exp(-8.0 * (a - 0.6)))
    exact = (np.log1p(np.exp(8.0 * 0.4)) - np.log1p(np.exp(-8.0 * 0.6))) / 8.0
    error = {
        rule: abs(w @ f(a) - exact)
        for rule, (a, w) in (
            ("gauss6", integration_points("gauss", 6)),
            ("linspace20", integration_points("linspace", 20)),
        )
    }
    assert error["gauss6"] < error["linspace20"] / 10, error


@pytest.mark.parametrize("rule", ["left", "right", "midpoint", "trapezoid"])
def test_riemann_rules_are_exact_where_they_should_be(rule):
    alphas, weights = integration_points(rule, 4)
    assert weights @ np.ones_like(alphas) == pytest.approx(1.0)
    if rule in ("midpoint", "trapezoid"):  # exact for straight lines
        assert weights @ (3 * alphas + 1) == pytest.approx(2.5, rel=1e-12)


def test_bad_rule_or_step_count_is_rejected():
    with pytest.raises(ValueError, match="unknown integration rule 'simpson'.*gauss"):
        integration_points("simpson", 4)
    with pytest.raises(ValueError, match="at least 1 step"):
        integration_points("gauss", 0)


# -- the adaptive rule's pieces ---------------------------------------------------------------------
def _trapezoid(f, m):
    alphas, weights = integration_points("trapezoid", m)
    return weights @ f(alphas)


def test_halved_weights_are_the_coarser_trapezoid_on_the_finer_nodes():
    f = lambda a: np.exp(3 * a) * np.sin(5 * a)
    alphas, _ = integration_points("trapezoid", 8)
    assert halved_trapezoid_weights(8) @ f(alphas) == pytest.approx(_trapezoid(f, 4), rel=1e-12)
    assert (halved_trapezoid_weights(8)[1::2] == 0).all()
    with pytest.raises(ValueError, match="even"):
        halved_trapezoid_weights(5)


@pytest.mark.parametrize(("m", "finer"), [(4, 8), (4, 32), (6, 24), (2, 2)])
def test_refining_with_the_new_nodes_gives_the_finer_trapezoid(m, finer):
    f = lambda a: 1.0 / (1.0 + np.exp(-20.0 * (a - 0.37)))  # a sharp step, as layer 0 has
    new = new_trapezoid_nodes(m, finer)
    old = integration_points("trapezoid", m)[0]
    assert len(new) == finer - m and not np.isin(np.round(new * finer), np.round(old * finer)).any()
    assert np.allclose(np.sort(np.concatenate([old, new])), integration_points("trapezoid", finer)[0])
    refined = refined_trapezoid(_trapezoid(f, m), m, finer, f(new).sum())
    assert refined == pytest.approx(_trapezoid(f, finer), rel=1e-12)
    with pytest.raises(ValueError, match="do not refine"):
        new_trapezoid_nodes(4, 6)


def test_richardson_error_estimates_the_trapezoid_error_on_a_smooth_integrand():
    f, exact = np.exp, np.e - 1
    for m in (4, 8, 16):
        estimate = richardson_error(_trapezoid(f, m), _trapezoid(f, m // 2), 2)
        assert estimate == pytest.approx(abs(_trapezoid(f, m) - exact), rel=0.01), m
    estimate = richardson_error(_trapezoid(f, 16), _trapezoid(f, 4), 4)  # a jump of four
    assert estimate == pytest.approx(abs(_trapezoid(f, 16) - exact), rel=0.01)


def test_intervals_needed_doubles_until_the_error_should_be_under_the_tolerance():
    assert intervals_needed(0.005, 0.01, 4, 64) == 4  # already under
    assert intervals_needed(0.02, 0.01, 4, 64) == 8  # error / 2 needs sqrt(2) more intervals: one doubling
    assert intervals_needed(0.15, 0.01, 4, 64) == 16  # sqrt(15) ~ 3.9: two doublings
    assert intervals_needed(100.0, 0.01, 4, 64) == 64  # capped
    assert intervals_needed(100.0, 0.01, 6, 64) == 48  # capped at a multiple of 6 (nested nodes)
    assert intervals_needed(100.0, 0.01, 64, 64) == 64
