"""The knowledge-neuron graph: how strongly one knowledge neuron feeds another, from the weights.

Neuron A (layer l) writes its output vector out_A (a column of the down
projection) into the residual stream; neuron B (layer l+1) reads the stream
through its input vector in_B (a row of the input projection).  Their
connection strength is w(A, B) = out_A . in_B and their distance 1/|w|.
For gated MLPs (LLaMA, Gemma: hidden = act(gate x) * (up x)) the input vector
is chosen by `gated_input`: "gate" (default: the row whose pre-activation the
activation function reads, the analogue of GPT-2's c_fc row), "up", or "both"
(the two strengths added).  Layers further apart, up to `max_span`, are joined
by the cheapest path through one knowledge neuron in each layer between;
same-layer pairs, and pairs with no such path, are unconnected (distance inf).
The sign of w is kept: an edge is excitatory (w > 0) or inhibitory (w < 0);
a path's sign is the product of its edges' signs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from dkn.models import LoadedModel
from dkn.neurons import Neuron, check_in_range

GATED_INPUTS = ("gate", "up", "both")


@dataclass(frozen=True)
class KnowledgeGraph:
    neurons: tuple[Neuron, ...]
    distance: np.ndarray     # [n, n] symmetric, inf = unconnected, 0 on the diagonal
    strength: np.ndarray     # [n, n] signed: w for adjacent layers, sign * 1/distance for paths, 0 unconnected
    max_span: int
    gated_input: str

    def edges(self) -> list[tuple[int, int, float]]:
        """(i, j, signed strength) for every connected pair i < j."""
        i, j = np.nonzero(np.triu(np.isfinite(self.distance), k=1))
        return [(int(a), int(b), float(self.strength[a, b])) for a, b in zip(i, j)]


def connection_strengths(lm: LoadedModel, sources: Sequence[Neuron], targets: Sequence[Neuron],
                         gated_input: str = "gate") -> np.ndarray:
    """[len(sources), len(targets)]: w = out_A . in_B for A in layer l, B in layer l + 1."""
    layer = sources[0].layer
    out = lm.output_vectors(layer)[[n.index for n in sources]]                       # [nA, d_model]
    ins = _input_vectors(lm, targets[0].layer, [n.index for n in targets], gated_input)   # [nB, d_model]
    with torch.no_grad():
        return (out.float() @ ins.float().T).cpu().numpy()


def _input_vectors(lm: LoadedModel, layer: int, index: list[int], gated_input: str) -> torch.Tensor:
    vectors = lm.input_vectors(layer)               # [gate, up] for gated MLPs, [in] otherwise
    if not lm.family.gated:
        return vectors[0][index]
    if gated_input == "gate":
        return vectors[0][index]
    if gated_input == "up":
        return vectors[1][index]
    if gated_input == "both":
        return vectors[0][index] + vectors[1][index]   # out . gate + out . up
    raise ValueError(f"unknown gated_input {gated_input!r}: use one of {', '.join(GATED_INPUTS)}")


def build_graph(lm: LoadedModel, neurons: Sequence[Neuron], max_span: int = 3,
                gated_input: str = "gate") -> KnowledgeGraph:
    """Distances between knowledge neurons (see the module docstring), vectorised by layer pair."""
    neurons = tuple(Neuron(*n) for n in neurons)
    check_in_range(neurons, lm.n_layers, lm.d_mlp)
    if max_span < 1:
        raise ValueError(f"max_span must be at least 1, got {max_span}")
    n = len(neurons)
    dist = np.full((n, n), np.inf)
    sign = np.zeros((n, n))
    strength = np.zeros((n, n))
    by_layer = _indices_by_layer(neurons)
    adjacent = {}                                               # layer l -> [n_l, n_{l+1}] distances
    for layer, rows in by_layer.items():
        cols = by_layer.get(layer + 1)
        if cols is None:
            continue
        w = connection_strengths(lm, [neurons[i] for i in rows], [neurons[j] for j in cols], gated_input)
        strength[np.ix_(rows, cols)] = w
        adjacent[layer] = (_inverse(np.abs(w)), np.sign(w))
    for start, rows in by_layer.items():
        d_path, s_path = None, None                            # [n_start, n_current] cheapest path so far
        for span in range(1, max_span + 1):
            step = adjacent.get(start + span - 1)
            cols = by_layer.get(start + span)
            if step is None or cols is None:
                break                                           # a layer in between holds no knowledge neuron
            d_step, s_step = step
            d_path, s_path = (d_step, s_step) if d_path is None else _min_plus(d_path, s_path, d_step, s_step)
            dist[np.ix_(rows, cols)] = d_path
            sign[np.ix_(rows, cols)] = s_path
    dist = np.minimum(dist, dist.T)
    sign = sign + sign.T
    np.fill_diagonal(dist, 0.0)
    strength = strength + strength.T
    paths = np.isfinite(dist) & (strength == 0) & (dist > 0)
    strength[paths] = sign[paths] / dist[paths]
    return KnowledgeGraph(neurons, dist, strength, max_span, gated_input)


def _indices_by_layer(neurons: Sequence[Neuron]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(neurons):
        groups.setdefault(n.layer, []).append(i)
    return groups


def _inverse(w_abs: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(w_abs > 0, 1.0 / w_abs, np.inf)


def _min_plus(d_a: np.ndarray, s_a: np.ndarray, d_b: np.ndarray, s_b: np.ndarray):
    """Cheapest two-leg paths: d [i, k] = min_j d_a[i, j] + d_b[j, k], with the sign of the chosen path."""
    total = d_a[:, :, None] + d_b[None, :, :]                  # [i, j, k]
    best = np.argmin(total, axis=1)                            # [i, k]
    i, k = np.indices(best.shape)
    return total[i, best, k], s_a[i, best] * s_b[best, k]
