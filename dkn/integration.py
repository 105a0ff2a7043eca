"""Quadrature rules for the integrated-gradients path integral (pure functions).

`integration_points(rule, m)` returns (alphas, weights): evaluate the gradient
at baseline + alpha * (input - baseline) and sum with these weights, which add
up to 1 (the path's length is carried by the multiplier, input - baseline).

"adaptive" is the trapezoid rule with a number of intervals chosen per layer: the rows engine
(dkn.rows.adaptive_integrated_grads) starts every layer at m intervals, estimates each layer's error from
the nested m/2-interval rule, and refines only the layers whose estimate exceeds ADAPTIVE_TOLERANCE
(on the default model that is layer 0, whose integrand has sharp features; bench/results/quadrature.md).
The functions below that serve it are pure.
"""

from __future__ import annotations

import numpy as np

RULES = ("left", "right", "midpoint", "trapezoid", "linspace", "gauss", "adaptive")
ADAPTIVE_TOLERANCE = 0.01  # a layer is refined while its estimated error exceeds this share of the top score
ADAPTIVE_MAX_INTERVALS = 64  # per layer
ADAPTIVE_MAX_ROUNDS = 3  # refinement passes after the first


def integration_points(rule: str, m: int) -> tuple[np.ndarray, np.ndarray]:
    """alphas [n_points], weights [n_points] for `m` steps of `rule`:
    left/right/midpoint Riemann sums and the trapezoid rule over m intervals;
    "linspace" is m points from 0 to 1 inclusive with weight 1/m each (EleutherAI knowledge-neurons);
    "gauss" is m-point Gauss-Legendre on [0, 1], exact for polynomials of degree up to 2m - 1;
    "adaptive" gives its first level, the trapezoid rule over m intervals (m even)."""
    if m < 1:
        raise ValueError(f"integration needs at least 1 step, got {m}")
    if rule == "adaptive":
        if m % 2:
            raise ValueError(
                f"the adaptive rule needs an even number of intervals (it halves them), got {m}: give an even "
                "--steps (e.g. 4 or 6), or a fixed rule such as --rule trapezoid"
            )
        return integration_points("trapezoid", m)
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


def halved_trapezoid_weights(m: int) -> np.ndarray:
    """[m + 1]: the trapezoid rule over m / 2 intervals written on the nodes of the m-interval rule
    (zero on the odd nodes): the nested coarser estimate that the adaptive rule compares with."""
    if m % 2:
        raise ValueError(f"halving needs an even number of intervals, got {m}")
    weights = np.zeros(m + 1)
    weights[::2] = integration_points("trapezoid", m // 2)[1]
    return weights


def new_trapezoid_nodes(m: int, finer: int) -> np.ndarray:
    """The nodes of the trapezoid rule over `finer` intervals that the rule over m intervals lacks
    (`finer` a multiple of m), ascending."""
    if finer % m:
        raise ValueError(f"{finer} intervals do not refine {m}")
    k = np.arange(1, finer)
    return k[k % (finer // m) != 0] / finer


def refined_trapezoid(coarse: np.ndarray, m: int, finer: int, new_sum: np.ndarray) -> np.ndarray:
    """The trapezoid rule over `finer` intervals from the rule over m (`coarse`) and the sum of the
    integrand over new_trapezoid_nodes(m, finer) (`new_sum`): T_M = (m / M) T_m + (1 / M) sum(new)."""
    return (m / finer) * coarse + new_sum / finer


def richardson_error(fine: np.ndarray, coarse: np.ndarray, ratio: float) -> np.ndarray:
    """Estimated error of the trapezoid rule `fine`, from the rule with `ratio` times fewer intervals
    (the trapezoid rule's error falls as the square of the interval): |fine - coarse| / (ratio^2 - 1)."""
    return np.abs(fine - coarse) / (ratio**2 - 1)


def intervals_needed(error: float, tolerance: float, m: int, max_intervals: int) -> int:
    """How many intervals bring an error `error` at m intervals under `tolerance` (error ~ 1 / intervals^2),
    rounded up to m times a power of two and capped at `max_intervals` (m when it is already under)."""
    if error <= tolerance:
        return m
    doublings = max(1, int(np.ceil(np.log2(np.sqrt(error / tolerance)))))
    finer = m
    while doublings and finer * 2 <= max_intervals:
        finer, doublings = finer * 2, doublings - 1
    return finer
