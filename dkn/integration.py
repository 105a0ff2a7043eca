"""Quadrature rules for the integrated-gradients path integral (pure functions).

`integration_points(rule, m)` returns (alphas, weights): evaluate the gradient
at baseline + alpha * (input - baseline) and sum with these weights, which add
up to 1 (the path's length is carried by the multiplier, input - baseline).
"""

from __future__ import annotations

import numpy as np

RULES = ("left", "right", "midpoint", "trapezoid", "linspace", "gauss")


def integration_points(rule: str, m: int) -> tuple[np.ndarray, np.ndarray]:
    """alphas [n_points], weights [n_points] for `m` steps of `rule`:
    left/right/midpoint Riemann sums and the trapezoid rule over m intervals;
    "linspace" is m points from 0 to 1 inclusive with weight 1/m each (EleutherAI knowledge-neurons);
    "gauss" is m-point Gauss-Legendre on [0, 1], exact for polynomials of degree up to 2m - 1."""
    if m < 1:
        raise ValueError(f"integration needs at least 1 step, got {m}")
    k = np.arange(m, dtype=np.float64)
    if rule == "left":
        return k / m, np.full(m, 1.0 / m)
    if rule == "right":
        return (k + 1) / m, np.full(m, 1.0 / m)
    if rule == "midpoint":
        return (k + 0.5) / m, np.full(m, 1.0 / m)
    if rule == "trapezoid":
        weights = np.full(m + 1, 1.0 / m)
        weights[[0, -1]] /= 2
        return np.arange(m + 1, dtype=np.float64) / m, weights
    if rule == "linspace":
        return np.linspace(0.0, 1.0, m), np.full(m, 1.0 / m)
    if rule == "gauss":
        nodes, weights = np.polynomial.legendre.leggauss(m)  # on [-1, 1], weights sum to 2
        return (nodes + 1.0) / 2.0, weights / 2.0
    raise ValueError(f"unknown integration rule {rule!r}: use one of {', '.join(RULES)}")
