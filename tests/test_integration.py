"""dkn.integration: the quadrature rules, on integrals whose values are known."""

from __future__ import annotations

import numpy as np
import pytest

from dkn.integration import RULES, integration_points


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("m", [1, 2, 5, 20])
def test_points_lie_in_the_unit_interval_and_weights_sum_to_one(rule, m):
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
