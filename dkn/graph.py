"""The knowledge-neuron graph: how strongly one knowledge neuron feeds another.

Neuron A (layer l) writes its output vector out_A (a column of the down projection) into the
residual stream; neuron B (a later layer l') reads the stream through its input vector in_B (a row
of the input projection), after the block's normalisation.  Three edge definitions (`edge`):

- "faithful": the paper's (and the authors' scripts'): w(A, B) = out_A . in_B for adjacent layers
  only, no normalisation; layers further apart, up to `max_span`, are joined by the cheapest path
  (sum of distances 1/|w|) through one knowledge neuron in each layer between.  A path's distance is
  always longer than each of its edges, so single linkage never uses it: with this definition NTC
  gives the same groups for every max_span (kept for comparison only).
- "static" (default): the linearised effect of A on B's pre-activation through the residual stream
  and the knowledge neurons, from the weights alone.  The direct link is w(A, B) = out_A . (g_B * in_B)
  for ANY two layers l < l' (the residual stream carries out_A to every later block), with g_B the
  gain of the normalisation that B's MLP reads through (RMSNorm / LayerNorm weight, folded into
  in_B).  Paths through intermediate knowledge neurons add their products of weights:
  T = W + W^2 + W^3 + ... = (I - W)^-1 - I (W is nilpotent: layers only increase), so a strong
  two-step path makes two neurons *closer*, as it should.  Pairs more than `max_span` layers apart
  stay unconnected.
- "functional": prompt-specific: w(A, B) = a_A * d(pre-activation of B) / d(a_A) at the answer
  position of this prompt, by automatic differentiation through the real model (every norm,
  attention at that position, and every path, not only those through knowledge neurons).

Distance d = 1/|w| (inf when w = 0); same-layer pairs are unconnected.  The sign of w is kept: an
edge is excitatory (w > 0) or inhibitory (w < 0).  For gated MLPs (LLaMA, Gemma:
hidden = act(gate x) * (up x)) the input vector is chosen by `gated_input`: "gate" (the row whose
pre-activation the activation function reads), "up", or "both" (the two strengths added); the
functional edge always reads the pre-activation module (gate).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dkn.models import LoadedModel
from dkn.neurons import Neuron, check_in_range

GATED_INPUTS = ("gate", "up", "both")
EDGES = ("static", "functional", "faithful")
# the normalisation each family's MLP reads through, in a block (data, like dkn.families)
MLP_NORMS = {
    "gpt2": "ln_2",
    "gpt-neo": "ln_2",
    "gpt-j": "ln_1",
    "gpt-neox": "post_attention_layernorm",
    "opt": "final_layer_norm",
    "llama": "post_attention_layernorm",
    "gemma": "pre_feedforward_layernorm",
    "bert": "attention.output.LayerNorm",
    "roberta": "attention.output.LayerNorm",
}


@dataclass(frozen=True)
class KnowledgeGraph:
    neurons: tuple[Neuron, ...]
    distance: np.ndarray  # [n, n] symmetric, inf = unconnected, 0 on the diagonal
    strength: np.ndarray  # [n, n] signed, symmetric: the edge weight (see `edge`), 0 unconnected
    max_span: int
    gated_input: str
    edge: str = "faithful"

    def edges(self) -> list[tuple[int, int, float]]:
        """(i, j, signed strength) for every connected pair i < j."""
        i, j = np.nonzero(np.triu(np.isfinite(self.distance), k=1))
        return [(int(a), int(b), float(self.strength[a, b])) for a, b in zip(i, j)]


def connection_strengths(
    lm: LoadedModel,
    sources: Sequence[Neuron],
    targets: Sequence[Neuron],
    gated_input: str = "gate",
    fold_norm: bool = False,
) -> np.ndarray:
    """[len(sources), len(targets)]: w = out_A . in_B (sources in one layer, targets in one later layer);
    with `fold_norm`, in_B is scaled by the gain of the normalisation B's MLP reads through."""
    layer = sources[0].layer
    out = lm.output_vectors(layer)[[n.index for n in sources]]  # [nA, d_model]
    ins = _input_vectors(lm, targets[0].layer, [n.index for n in targets], gated_input)  # [nB, d_model]
    with torch.no_grad():
        ins = ins.float()
        if fold_norm:
            ins = ins * norm_gain(lm, targets[0].layer)[None, :]
        return (out.float() @ ins.T).cpu().numpy()


def norm_gain(lm: LoadedModel, layer: int) -> torch.Tensor:
    """[d_model] float: the elementwise gain of the normalisation that `layer`'s MLP reads through
    (ones when the family has none).  Measured by calling the module on +x and -x (x = +-1, mean 0,
    RMS 1), so RMSNorm, LayerNorm and Gemma's (1 + weight) all give their effective gain."""
    name = MLP_NORMS.get(lm.family.name)
    d_model = lm.output_vectors(layer).shape[1]
    if name is None:
        return torch.ones(d_model, device=lm.device)
    norm = lm.blocks[layer].get_submodule(name)
    weight = next(norm.parameters(), None)
    x = torch.ones(d_model, device=lm.device, dtype=weight.dtype if weight is not None else torch.float32)
    x[1::2] = -1.0  # [d_model], mean 0 (d even), RMS 1
    if d_model % 2:
        x[-1] = 0.0
    with torch.no_grad():
        diff = (norm(x[None]) - norm(-x[None]))[0].float()  # [d_model] = 2 g x
    gain = diff / (2 * x.float()).masked_fill(x == 0, 1.0)
    if d_model % 2:
        gain[-1] = gain[:-1].mean()  # an odd width: the last unit is not probed
    return gain


def _input_vectors(lm: LoadedModel, layer: int, index: list[int], gated_input: str) -> torch.Tensor:
    vectors = lm.input_vectors(layer)  # [gate, up] for gated MLPs, [in] otherwise
    if not lm.family.gated:
        return vectors[0][index]
    if gated_input == "gate":
        return vectors[0][index]
    if gated_input == "up":
        return vectors[1][index]
    if gated_input == "both":
        return vectors[0][index] + vectors[1][index]  # out . gate + out . up
    raise ValueError(f"unknown gated_input {gated_input!r}: use one of {', '.join(GATED_INPUTS)}")


def build_graph(
    lm: LoadedModel,
    neurons: Sequence[Neuron],
    max_span: int = 3,
    gated_input: str = "gate",
    *,
    edge: str = "static",
    prompt: str | None = None,
    answer: str | None = None,
) -> KnowledgeGraph:
    """Distances between knowledge neurons under the edge definition `edge` (see the module docstring).
    "functional" needs the prompt and the answer."""
    neurons = tuple(Neuron(*n) for n in neurons)
    check_in_range(neurons, lm.n_layers, lm.d_mlp)
    if max_span < 1:
        raise ValueError(f"max_span must be at least 1, got {max_span}")
    if gated_input not in GATED_INPUTS:
        raise ValueError(f"unknown gated_input {gated_input!r}: use one of {', '.join(GATED_INPUTS)}")
    if edge == "faithful":
        return _faithful_graph(lm, neurons, max_span, gated_input)
    if edge == "static":
        w = static_strengths(lm, neurons, max_span, gated_input)
    elif edge == "functional":
        if prompt is None or answer is None:
            raise ValueError("the functional edge definition is prompt-specific: give the prompt and the answer")
        w = functional_strengths(lm, prompt, answer, neurons)
    else:
        raise ValueError(f"unknown edge definition {edge!r}: use one of {', '.join(EDGES)}")
    layers = np.array([n.layer for n in neurons])
    gap = layers[None, :] - layers[:, None]  # [n, n]: l' - l
    w = np.where((gap > 0) & (gap <= max_span), w, 0.0)  # [n, n], source row -> target col
    strength = w + w.T
    dist = _inverse(np.abs(strength))
    np.fill_diagonal(dist, 0.0)
    return KnowledgeGraph(neurons, dist, strength, max_span, gated_input, edge)


def static_strengths(
    lm: LoadedModel, neurons: Sequence[Neuron], max_span: int = 3, gated_input: str = "gate"
) -> np.ndarray:
    """[n, n] (row: source, column: later target): the linearised effect through the residual stream and the
    knowledge neurons, T = (I - W)^-1 - I, with W the direct norm-folded links of every pair l < l' that
    are at most `max_span` layers apart."""
    n = len(neurons)
    direct = np.zeros((n, n))
    by_layer = _indices_by_layer(neurons)
    for src_layer, rows in by_layer.items():
        for dst_layer, cols in by_layer.items():
            if 0 < dst_layer - src_layer <= max_span:
                direct[np.ix_(rows, cols)] = connection_strengths(
                    lm, [neurons[i] for i in rows], [neurons[j] for j in cols], gated_input, fold_norm=True
                )
    return np.linalg.solve(np.eye(n) - direct, np.eye(n)) - np.eye(n) if n else direct


def functional_strengths(lm: LoadedModel, prompt: str, answer: str, neurons: Sequence[Neuron]) -> np.ndarray:
    """[n, n] (row: source, column: later target): a_A * d pre_B / d a_A at the first answer position,
    by one forward pass and one backward pass per target layer's neurons."""
    from dkn.hooks import edit_neurons, record_neurons
    from dkn.query import make_query

    step = make_query(lm, prompt, answer).steps[0]
    ids = torch.tensor([step.input_ids], device=lm.device)  # [1, T]
    layers = sorted({n.layer for n in neurons})
    leaves = {l: torch.zeros(lm.d_mlp, device=lm.device, requires_grad=True) for l in layers}  # [d_mlp] each

    def add_leaf(layer):
        def edit(h):  # h: [1, T, d_mlp]
            h = h.clone()
            h[0, step.position] = h[0, step.position] + leaves[layer].to(h.dtype)
            return h

        return edit

    w = np.zeros((len(neurons), len(neurons)))
    with (
        torch.enable_grad(),
        edit_neurons(lm, {l: add_leaf(l) for l in layers}, "post"),
        record_neurons(lm, layers, "post") as post,
        record_neurons(lm, layers, "pre") as pre,
    ):
        lm.model(input_ids=ids)
        for j, target in enumerate(neurons):
            sources = [l for l in layers if l < target.layer]
            if not sources:
                continue
            value = pre[target.layer][0, step.position, target.index]
            grads = torch.autograd.grad(value, [leaves[l] for l in sources], retain_graph=True, allow_unused=True)
            by_layer = dict(zip(sources, grads))
            for i, src in enumerate(neurons):
                g = by_layer.get(src.layer)
                if g is not None:
                    act = float(post[src.layer][0, step.position, src.index].detach())
                    w[i, j] = act * float(g[src.index])
    return w


def _faithful_graph(lm, neurons, max_span, gated_input) -> KnowledgeGraph:
    """The paper's graph: adjacent-layer weights, cheapest paths through one KN per layer between."""
    n = len(neurons)
    dist = np.full((n, n), np.inf)
    sign = np.zeros((n, n))
    strength = np.zeros((n, n))
    by_layer = _indices_by_layer(neurons)
    adjacent = {}  # layer l -> [n_l, n_{l+1}] distances
    for layer, rows in by_layer.items():
        cols = by_layer.get(layer + 1)
        if cols is None:
            continue
        w = connection_strengths(lm, [neurons[i] for i in rows], [neurons[j] for j in cols], gated_input)
        strength[np.ix_(rows, cols)] = w
        adjacent[layer] = (_inverse(np.abs(w)), np.sign(w))
    for start, rows in by_layer.items():
        d_path, s_path = None, None  # [n_start, n_current] cheapest path so far
        for span in range(1, max_span + 1):
            step = adjacent.get(start + span - 1)
            cols = by_layer.get(start + span)
            if step is None or cols is None:
                break  # a layer in between holds no knowledge neuron
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
    return KnowledgeGraph(neurons, dist, strength, max_span, gated_input, "faithful")


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
    total = d_a[:, :, None] + d_b[None, :, :]  # [i, j, k]
    best = np.argmin(total, axis=1)  # [i, k]
    i, k = np.indices(best.shape)
    return total[i, best, k], s_a[i, best] * s_b[best, k]
