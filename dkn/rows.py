"""The attribution row engine: many edited copies ("rows") of one answer position, forward and backward.

A row sets one layer's MLP hidden vector at the answer position to a chosen value and runs the rest of
the model freely; integrated gradients needs one row per (layer, alpha) pair, P at the baseline one row
per layer.  `RowJob` holds what every row of one answer token shares (the model, the prompt, the token,
the neuron site, the clean activations and the baseline, the fast runner when there is one, and the
bounds of one pass); the functions here turn rows into gradients and probabilities:

- `integrated_grads`: every (layer, alpha) pair as one row of a few batched passes (the fast path);
- `adaptive_integrated_grads`: the trapezoid rule refined per layer where its error estimate is large;
- `reference_integrated_grads`: the plain per-layer loop over full prompts (the tests' reference);
- `baseline_probs`: P(target) with each layer alone at its baseline.

With a runner (causal prompts whose answer is the last token, see dkn.forward) a row is a single token
over the shared prefix; without one it is the whole prompt.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from dkn import integration
from dkn.forward import AnswerPositionRunner, rows_per_pass
from dkn.hooks import edit_neurons
from dkn.integration import (
    halved_trapezoid_weights,
    integration_points,
    intervals_needed,
    new_trapezoid_nodes,
    refined_trapezoid,
    richardson_error,
)
from dkn.models import LoadedModel
from dkn.query import Step

Progress = Callable[[int, int], None]  # (done, total)
_PINNED: contextvars.ContextVar = contextvars.ContextVar("dkn_pinned", default=None)  # layer -> neuron indices


@contextmanager
def pinned(neurons: Iterable[tuple[int, int]]) -> Iterator[None]:
    """Within the block (this thread or task only), every row that scales a pinned neuron's layer holds it
    (layer, index) at its clean activation while the rest of the layer follows the path (rows of other layers
    let it respond): integrated gradients then attributes a layer's other neurons with these on, so none of
    them borrows a pinned neuron's effect (dkn.backup pins a fact's necessary carriers).  A pinned neuron's own
    integrated-gradients score is 0; the "activation" method and the gradient at the actual activations ignore
    pins."""
    by_layer: dict[int, list[int]] = {}
    for layer, index in neurons:
        by_layer.setdefault(int(layer), []).append(int(index))
    token = _PINNED.set({layer: tuple(sorted(set(ix))) for layer, ix in by_layer.items()})
    try:
        yield
    finally:
        _PINNED.reset(token)


@dataclass(frozen=True)
class RowJob:
    """What every row of one answer token shares."""

    lm: LoadedModel
    ids: torch.Tensor  # [1, T] the prompt (+ gold answer prefix)
    step: Step  # the answer token: its position and target id
    site: str  # "post" or "pre" (see dkn.hooks)
    acts: torch.Tensor  # [L, d_mlp] float32 clean activations at the answer position
    base: torch.Tensor  # [L, d_mlp] float32 baseline
    runner: AnswerPositionRunner | None = None
    max_rows: int | None = None  # bounds of one pass (None: the LoadedModel's)
    memory_budget: int | None = None

    @property
    def n_layers(self) -> int:
        return self.lm.n_layers


@torch.inference_mode()
def baseline_probs(job: RowJob) -> np.ndarray:
    """[L]: P(target) when layer l alone is set to its baseline at the answer position (one row per layer)."""
    layers = torch.arange(job.n_layers, device=job.acts.device)
    logits = _row_logits(job, layers, job.base.clone())  # [L, vocab]: row l sets layer l
    return logits.float().softmax(-1)[layers, job.step.target].cpu().numpy()


def integrated_grads(job: RowJob, alphas: np.ndarray, weights: np.ndarray, progress: Progress | None = None):
    """([L, d] sum_k w_k dP/dh(l) at h(l) = b + alpha_k (a - b), [L] P with layer l at its baseline).
    Rows are (layer, alpha) pairs in layer-major order, evaluated in passes bounded by the job's
    max_rows / memory_budget (see dkn.forward.rows_per_pass).  When the rule has no alpha = 0 point, one
    is added with weight 0, so that P(baseline) comes from the same pass."""
    sums, base_probs = _every_layer_sums(job, alphas, weights[None], progress)
    return sums[0], base_probs


def adaptive_integrated_grads(
    job: RowJob,
    m: int,
    multiplier: torch.Tensor,
    tolerance: float | None = None,
    max_intervals: int | None = None,
    progress: Progress | None = None,
):
    """The trapezoid rule with its intervals chosen per layer: ([L, d] integral of dP/dh(l), [L] P with
    layer l at its baseline, [L] intervals used).  Every layer starts at m intervals (one batched pass);
    a layer's error, in score units (`multiplier` [L, d] times the gradient sums), is estimated from the
    nested rule over m / 2 intervals (dkn.integration.richardson_error); each layer whose largest error
    exceeds `tolerance` times the largest score gets the intervals that should bring it under, all such
    layers in one further pass, for at most ADAPTIVE_MAX_ROUNDS passes (the last refinement is not estimated
    again: a layer at ADAPTIVE_MAX_INTERVALS may still be over the tolerance).  `tolerance` and `max_intervals`
    default to dkn.integration's ADAPTIVE_TOLERANCE and ADAPTIVE_MAX_INTERVALS (read at call time)."""
    tolerance = integration.ADAPTIVE_TOLERANCE if tolerance is None else tolerance
    max_intervals = integration.ADAPTIVE_MAX_INTERVALS if max_intervals is None else max_intervals
    alphas, weights = integration_points("trapezoid", m)
    sums, base_probs = _every_layer_sums(job, alphas, np.stack([weights, halved_trapezoid_weights(m)]), progress)
    fine, coarse = sums[0].cpu().numpy(), sums[1].cpu().numpy()  # [L, d] each
    scale = multiplier.cpu().numpy()  # [L, d]
    intervals, ratio = np.full(job.n_layers, m), np.full(job.n_layers, 2)
    done = job.n_layers * m  # rows so far (for `progress`)
    for _ in range(integration.ADAPTIVE_MAX_ROUNDS):
        top = max(float(np.abs(scale * fine).max()), 1e-30)
        error = richardson_error(scale * fine, scale * coarse, ratio[:, None]).max(1) / top  # [L]
        error = np.nan_to_num(error, nan=0.0, posinf=np.finfo(np.float32).max)  # NaN: left as is; inf: the cap
        target = np.array([intervals_needed(e, tolerance, n, max_intervals) for e, n in zip(error, intervals)])
        todo = np.flatnonzero(target > intervals)
        if todo.size == 0:
            break
        nodes = [new_trapezoid_nodes(int(intervals[l]), int(target[l])) for l in todo]
        row_layer = np.concatenate([np.full(len(n), l) for l, n in zip(todo, nodes)])  # [R], ascending
        new_sum = np.zeros_like(fine)
        grads = _rows_grads(job, row_layer, np.concatenate(nodes))  # [R, d]
        done += len(row_layer)
        if progress is not None:
            progress(done, done)  # a refinement pass: its rows were not known in advance
        np.add.at(new_sum, row_layer, grads.cpu().numpy())
        coarse[todo] = fine[todo]
        fine[todo] = refined_trapezoid(fine[todo], intervals[todo, None], target[todo, None], new_sum[todo])
        ratio[todo], intervals[todo] = target[todo] // intervals[todo], target[todo]
    return torch.from_numpy(fine).to(job.acts), base_probs, intervals


def _every_layer_sums(job: RowJob, alphas: np.ndarray, weight_sets: np.ndarray, progress: Progress | None):
    """([S, L, d] sum_k weight_sets[s, k] dP/dh(l) at alpha_k, for every layer l, [L] P at the baseline):
    one row per (layer, alpha), with an alpha = 0 row added (weight 0) when the points lack one, and the
    alpha = 1 rows of every layer replaced by one shared clean row when there is a runner."""
    if not np.any(alphas == 0):
        alphas, weight_sets = np.append(alphas, 0.0), np.pad(weight_sets, ((0, 0), (0, 1)))
    L, n_alpha = job.n_layers, len(alphas)
    row_layer = np.repeat(np.arange(L), n_alpha)  # [R]
    row_alpha = np.tile(np.arange(n_alpha), L)  # [R]
    at_one = np.flatnonzero(alphas == 1)
    share_clean = job.runner is not None and at_one.size > 0
    if share_clean:
        # alpha = 1 is the clean run for every layer: one shared row (the first of the first pass), whose
        # gradient at each layer comes from a zero added there, replaces L identical rows
        keep = row_alpha != at_one[0]
        row_layer, row_alpha = row_layer[keep], row_alpha[keep]
    acts = job.acts
    weights_t = torch.tensor(weight_sets, dtype=acts.dtype, device=acts.device)  # [S, n_alpha]
    sums = torch.zeros(len(weight_sets), *acts.shape, dtype=acts.dtype, device=acts.device)  # [S, L, d]
    base_probs = np.zeros(L)
    zero = int(np.flatnonzero(alphas == 0)[0])
    for start, stop, grads, probs, clean in _row_passes(job, row_layer, alphas[row_alpha], share_clean, progress):
        layers = torch.from_numpy(row_layer[start:stop]).to(acts.device)  # [B]
        ks = torch.from_numpy(row_alpha[start:stop]).to(acts.device)  # [B]
        for s in range(len(weight_sets)):
            sums[s].index_add_(0, layers, weights_t[s, ks, None] * grads)
            if clean is not None:
                sums[s] += weights_t[s, at_one[0]] * clean  # [L, d]
        at_zero = row_alpha[start:stop] == zero
        base_probs[row_layer[start:stop][at_zero]] = probs.cpu().numpy()[at_zero]
    return sums, base_probs


def _rows_grads(job: RowJob, row_layer: np.ndarray, row_alpha: np.ndarray) -> torch.Tensor:
    """[R, d]: dP/dh(row_layer[r]) at h = b + row_alpha[r] (a - b), rows in ascending layer order."""
    return torch.cat([grads for _, _, grads, _, _ in _row_passes(job, row_layer, row_alpha, False, None)])


def _row_passes(job: RowJob, row_layer: np.ndarray, row_alpha: np.ndarray, share_clean: bool, progress):
    """Yields (start, stop, dP/dh [B, d], P [B], clean [L, d] or None) for the rows start:stop of each pass
    (row r sets layer row_layer[r] to b + row_alpha[r] (a - b)); with `share_clean`, the first pass also
    returns dP/dh at the clean activations of every layer (see _path_grads)."""
    T = len(job.step.input_ids)
    rows_per_chunk = rows_per_pass(job.lm, 1 if job.runner is not None else T, T, job.max_rows, job.memory_budget)
    acts, base = job.acts, job.base
    for start in range(0, len(row_layer), rows_per_chunk):
        stop = min(start + rows_per_chunk, len(row_layer))
        layers = torch.from_numpy(row_layer[start:stop]).to(acts.device)  # [B]
        alpha = torch.tensor(row_alpha[start:stop], dtype=acts.dtype, device=acts.device)[:, None]  # [B, 1]
        path = base[layers] + alpha * (acts[layers] - base[layers])  # [B, d]
        grads, probs, clean = _path_grads(job, layers, path, with_clean=share_clean and start == 0)
        yield start, stop, grads, probs, clean
        if progress is not None:
            progress(stop, len(row_layer))


def reference_integrated_grads(
    job: RowJob, alphas: np.ndarray, weights: np.ndarray, progress: Progress | None = None
) -> torch.Tensor:
    """[L, d]: the plain per-layer loop: one batch of full prompts per layer, only that layer scaled."""
    grad_sum = torch.zeros_like(job.acts)
    for layer in range(job.n_layers):
        grad_sum[layer] = one_layer_grads(job, alphas, weights, layer)
        if progress is not None:
            progress((layer + 1) * len(alphas), job.n_layers * len(alphas))
    return grad_sum


def one_layer_grads(job: RowJob, alphas: np.ndarray, weights: np.ndarray, layer: int) -> torch.Tensor:
    """[d]: sum_k w_k dP/dh(layer) at h = b + alpha_k (a - b), one batch of full prompts (no runner)."""
    full_prompts = RowJob(job.lm, job.ids, job.step, job.site, job.acts, job.base)  # no runner
    acts, base = job.acts, job.base
    alphas_t = torch.tensor(alphas, dtype=acts.dtype, device=acts.device)
    weights_t = torch.tensor(weights, dtype=acts.dtype, device=acts.device)
    path = base[layer] + alphas_t[:, None] * (acts[layer] - base[layer])  # [m, d]
    layers = torch.full((len(alphas),), layer, device=acts.device)
    grads, _, _ = _path_grads(full_prompts, layers, path)  # [m, d]
    return (weights_t[:, None] * grads).sum(0)


def _path_grads(job: RowJob, layers: torch.Tensor, path: torch.Tensor, with_clean: bool = False):
    """Row r sets layer layers[r] to path[r] at the answer position.  Returns dP/dh there [B, d], P [B],
    and, with `with_clean` (runner only), dP/dh at the clean activations of every layer [L, d] from one
    extra row that runs the clean model with a zero added to every layer."""
    leaf = path.detach().clone().requires_grad_(True)  # [B, d]
    zeros = (
        torch.zeros(job.n_layers, path.shape[1], dtype=path.dtype, device=path.device, requires_grad=True)
        if with_clean
        else None
    )  # [L, d]
    with torch.enable_grad():
        logits = _row_logits(job, layers, leaf, zeros)  # [B (+1), vocab]
    target = job.step.target
    with torch.no_grad():  # dP_t/dz_v = P_t (1[v = t] - p_v), written out: cheaper than autograd's
        p = logits.float().softmax(-1)  # [B (+1), vocab]
        prob = p[:, target].clone()  # [B (+1)]
        grad_logits = p.mul_(-prob[:, None])
        grad_logits[:, target] += prob
    # rows are independent, so the vector-Jacobian product gives each row its own dP_r/dh_r
    inputs = (leaf,) if zeros is None else (leaf, zeros)
    grads = torch.autograd.grad(logits, inputs, grad_outputs=grad_logits.to(logits.dtype))
    if zeros is None:
        return grads[0], prob, None
    clean_grads = grads[1]  # [L, d]
    for layer, cols in (_PINNED.get() or {}).items():  # a pinned neuron is on no path: no gradient
        clean_grads[layer, list(cols)] = 0
    return grads[0], prob[1:], clean_grads


def _row_logits(job: RowJob, layers: torch.Tensor, values: torch.Tensor, zeros=None) -> torch.Tensor:
    """[B, vocab]: answer-position logits when row r sets layer layers[r] (ascending) to values[r] [B, d].
    With `zeros` [L, d] (runner only), a first extra row runs the clean model plus zeros[l] at every layer."""
    offset = 0 if zeros is None else 1
    position = 0 if job.runner is not None else job.step.position  # runner rows are single tokens
    pins = _PINNED.get() or {}
    edits = {}
    for layer in range(job.n_layers) if zeros is not None else torch.unique(layers).tolist():
        rows = torch.nonzero(layers == layer).squeeze(1) + offset  # [n_l]
        keep = None
        if layer in pins:
            cols = torch.tensor(pins[layer], device=job.acts.device)
            keep = (cols, job.acts[layer, cols])  # [k], [k]: the pinned neurons' clean activations
        edits[layer] = _splice(rows, position, values, offset, None if zeros is None else zeros[layer], keep)
    if job.runner is not None:
        starts = layers if zeros is None else torch.cat([layers.new_zeros(1), layers])
        return job.runner.logits(starts, edits)
    with edit_neurons(job.lm, edits, job.site):
        out = job.lm.model(input_ids=job.ids.expand(len(layers), -1), use_cache=False)
    return out.logits[:, job.step.position]


def _splice(rows: torch.Tensor, pos: int, values: torch.Tensor, offset: int = 0, add_to_first=None, keep=None):
    """Edit: rows `rows` take values[rows - offset] at `pos`, except the columns of `keep` = (cols [k], values
    [k]), which take those values; with `add_to_first` [d], row 0 gets it added."""

    def edit(h):  # h: [B, T, d]
        h = h.clone()
        at = rows.to(h.device)
        if len(rows):
            h[at, pos] = values[rows - offset].to(h.device, h.dtype)
        if add_to_first is not None:
            h[0, pos] = h[0, pos] + add_to_first.to(h.device, h.dtype)
        if keep is not None and len(at):
            cols, kept = keep
            h[at[:, None], pos, cols.to(h.device)[None, :]] = kept.to(h.device, h.dtype)
        return h

    return edit
