"""Switching neurons off and on: scale chosen neurons by a factor and measure the answer.

Modes:
- "last":    multiply the neurons' activations at the answer position(s) only;
- "all":     multiply them at every position of the prompt;
- "weights": multiply the neurons' output weight vectors (columns of the down projection) by the
             factor, which acts at every position and equals "all" (the paper's weights variant).
Factor 0 suppresses, 2 amplifies.  Every change is undone when the call returns, also on errors.

`intervene_many` evaluates many neuron sets in one batched pass ("last" and "all"), which the
degeneracy grid needs; in "last" mode each set is one single-token row over the cached prompt
prefix, starting at the lowest layer the set touches (see dkn.forward; the runner of each prompt is
kept on the LoadedModel by dkn.forward.answer_runner).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from dkn.forward import answer_runner, rows_per_pass
from dkn.hooks import edit_neurons
from dkn.models import LoadedModel
from dkn.neurons import Neuron, check_in_range
from dkn.query import Query, Step, make_query

MODES = ("last", "all", "weights")


@dataclass(frozen=True)
class InterventionResult:
    prob_before: float
    prob_after: float
    top_before: list[tuple[str, float]]  # next tokens at the first answer position, most likely first
    top_after: list[tuple[str, float]]
    neurons: tuple[Neuron, ...]
    factor: float
    mode: str

    @property
    def relative_change(self) -> float:
        """(P_after - P_before) / P_before: -1 means the answer is gone, +1 means its probability doubled."""
        return (self.prob_after - self.prob_before) / self.prob_before if self.prob_before > 0 else 0.0


def intervene(
    lm: LoadedModel,
    prompt: str,
    answer: str,
    neurons: Iterable[Neuron],
    factor: float = 0.0,
    mode: str = "last",
    top_k: int = 10,
) -> InterventionResult:
    """Scale `neurons` by `factor` and compare the answer's probability and the top next tokens."""
    query = make_query(lm, prompt, answer)
    neurons = tuple(Neuron(*n) for n in neurons)
    _check(lm, neurons, mode)
    before, after = _step_distributions(lm, query, [(), neurons], [1.0, float(factor)], mode)  # [n_steps][vocab]
    return InterventionResult(
        _answer_prob(query, before),
        _answer_prob(query, after),
        _top_tokens(lm, before[0], top_k),
        _top_tokens(lm, after[0], top_k),
        neurons,
        factor,
        mode,
    )


def intervene_many(
    lm: LoadedModel,
    prompt: str,
    answer: str,
    neuron_sets: Sequence[Iterable[Neuron]],
    factor: float | Sequence[float] = 0.0,
    mode: str = "last",
) -> tuple[float, np.ndarray]:
    """(P(answer) unchanged, [n_sets] P(answer) with each set scaled by `factor`), batched.  `factor` is one
    number for every set or one per set (a dose-response curve is one call: each row its own factor)."""
    probs, _ = intervene_many_top1(lm, prompt, answer, neuron_sets, factor, mode)
    return float(probs[0]), probs[1:]


def intervene_many_top1(
    lm: LoadedModel,
    prompt: str,
    answer: str,
    neuron_sets: Sequence[Iterable[Neuron]],
    factor: float | Sequence[float] = 0.0,
    mode: str = "last",
) -> tuple[np.ndarray, np.ndarray]:
    """Like `intervene_many`, plus the top-1 next token at the first answer position:
    (probs [1 + n_sets], top1 ids [1 + n_sets]); row 0 is the unchanged model."""
    query = make_query(lm, prompt, answer)
    sets = [tuple(Neuron(*n) for n in s) for s in neuron_sets]
    for s in sets:
        _check(lm, s, mode)
    factors = [1.0, *row_factors(factor, len(sets))]  # row 0: the unchanged model
    dists = _step_distributions(lm, query, [()] + sets, factors, mode)
    probs = np.array([_answer_prob(query, d) for d in dists])
    top1 = np.array([int(d[0].argmax()) for d in dists])
    return probs, top1


def row_factors(factor: float | Sequence[float], n_sets: int) -> list[float]:
    """One finite factor per set: `factor` repeated, or checked to be one per set."""
    factors = [float(factor)] * n_sets if np.ndim(factor) == 0 else [float(f) for f in factor]
    if len(factors) != n_sets:
        raise ValueError(f"{len(factors)} factors for {n_sets} neuron sets: give one factor, or one per set")
    if not all(np.isfinite(factors)):
        raise ValueError("factors must be finite numbers")
    return factors


def _check(lm: LoadedModel, neurons: tuple[Neuron, ...], mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown intervention mode {mode!r}: use one of {', '.join(MODES)}")
    check_in_range(neurons, lm.n_layers, lm.d_mlp)


def _answer_prob(query: Query, dists: list[torch.Tensor]) -> float:
    """Product over answer tokens of P(token | prompt + gold prefix)."""
    return float(np.prod([float(d[s.target]) for d, s in zip(dists, query.steps)]))


def _top_tokens(lm: LoadedModel, dist: torch.Tensor, k: int) -> list[tuple[str, float]]:
    values, ids = dist.topk(k)
    return [(lm.tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, ids)]


@torch.no_grad()
def _step_distributions(lm, query: Query, sets: list[tuple[Neuron, ...]], factors: list[float], mode: str):
    """[n_sets][n_steps] next-token distributions [vocab] at each answer position; set i scaled by
    factors[i]."""
    per_step = []
    for step in query.steps:
        if mode == "weights":
            per_step.append(torch.stack([_weights_dist(lm, step, s, f) for s, f in zip(sets, factors)]))
        elif mode == "last" and (runner := answer_runner(lm, step)) is not None:
            per_step.append(_runner_dists(lm, runner, sets, factors))
        else:
            per_step.append(_full_row_dists(lm, step, sets, factors, every_position=mode == "all"))
    return [[per_step[t][i] for t in range(len(query.steps))] for i in range(len(sets))]


def _runner_dists(lm, runner, sets, factors) -> torch.Tensor:
    """[n_sets, vocab]: one single-token row per set, each starting at its lowest layer."""
    starts = [min((n.layer for n in s), default=lm.n_layers) for s in sets]
    order = np.argsort(starts, kind="stable")  # rows sorted by start layer
    edits = row_edits(lm, [sets[i] for i in order], [factors[i] for i in order], position=None)
    row_start = torch.tensor([starts[i] for i in order], device="cpu")  # bookkeeping: read with .tolist()
    dists = runner.logits(row_start, edits).float().softmax(-1)  # [n_sets, vocab]
    return dists[torch.from_numpy(np.argsort(order)).to(dists.device)]  # back to the caller's order


def _full_row_dists(lm, step: Step, sets, factors, every_position: bool) -> torch.Tensor:
    """[n_sets, vocab]: one full-prompt row per set, in passes of as many rows as the model's memory budget
    and row limit allow (dkn.forward.rows_per_pass)."""
    position = None if every_position else step.position
    T = len(step.input_ids)
    chunk = rows_per_pass(lm, T, T)
    out = []
    for i in range(0, len(sets), chunk):
        part, part_factors = sets[i : i + chunk], factors[i : i + chunk]
        ids = torch.tensor([step.input_ids], device=lm.device).expand(len(part), -1)  # [rows, T]
        with edit_neurons(lm, row_edits(lm, part, part_factors, position)):
            logits = lm.model(input_ids=ids, use_cache=False).logits[:, step.position]  # [rows, vocab]
        out.append(logits.float().softmax(-1))
    return torch.cat(out)  # [n_sets, vocab]


def row_edits(
    lm: LoadedModel, sets: Sequence[tuple[Neuron, ...]], factor: float | Sequence[float], position: int | None
):
    """layer -> edit for `edit_neurons` that scales batch row r's neurons sets[r] by `factor` (one number, or
    one per row), at `position` (every position when None)."""
    factors = row_factors(factor, len(sets))
    return {layer: _scale_rows(mask, position) for layer, mask in _multipliers(lm, sets, factors).items()}


def _multipliers(lm, sets, factors) -> dict[int, torch.Tensor]:
    """layer -> [n_sets, d_mlp] of ones, with factors[r] at row r's neurons in that layer."""
    masks: dict[int, torch.Tensor] = {}
    for row, (neurons, f) in enumerate(zip(sets, factors)):
        for n in neurons:
            if n.layer not in masks:
                masks[n.layer] = torch.ones(len(sets), lm.d_mlp, device=lm.device)
            masks[n.layer][row, n.index] = f
    return masks


def _scale_rows(mask: torch.Tensor, position: int | None):
    """Edit: h [n, T, d] *= mask[:n] at `position` (every position when None).  The first n rows are
    the ones running at this layer (see AnswerPositionRunner.logits)."""

    def edit(h):
        m = mask[: h.shape[0]].to(h.device, h.dtype)  # [n, d]
        if position is None:
            return h * m[:, None, :]
        h = h.clone()
        h[:, position] = h[:, position] * m
        return h

    return edit


def _weights_dist(lm, step: Step, neurons: tuple[Neuron, ...], factor: float) -> torch.Tensor:
    ids = torch.tensor([step.input_ids], device=lm.device)
    with scaled_weights(lm, neurons, factor):
        logits = lm.model(input_ids=ids, use_cache=False).logits[0, step.position]
    return logits.float().softmax(-1)


@contextmanager
def scaled_weights(lm: LoadedModel, neurons: Iterable[Neuron], factor: float):
    """Multiply each neuron's output weight column (what it writes into the residual stream) by `factor`:
    one factor, linear in the neuron's contribution, at every position; so this equals scaling its
    activation at every position ("all" mode).  The input rows are left alone: scaling them too would
    grow the output by about factor^2 (GELU) or factor^3 (gated MLPs).  The original values are written
    back on exit, also when the body raises.  A down projection whose weights accelerate has offloaded
    (loaded at each call, `meta` in between) gets the same product as a hook scaling its input column."""
    saved, hooks = [], []
    offloaded: dict[int, list[int]] = {}
    with lm.lock, torch.no_grad():
        try:
            for n in dict.fromkeys(Neuron(*n) for n in neurons):  # a repeated neuron is scaled once
                param, index = output_column(lm, n)
                if param.device.type == "meta":
                    offloaded.setdefault(n.layer, []).append(n.index)
                    continue
                saved.append((param, index, param[index].clone()))
                param[index] *= factor
            for layer, indices in offloaded.items():
                hooks.append(lm.down_proj(layer).register_forward_pre_hook(_scale_input_columns(indices, factor)))
            yield
        finally:
            for hook in hooks:
                hook.remove()
            for param, index, value in reversed(saved):
                param[index] = value


def _scale_input_columns(indices: list[int], factor: float):
    def pre_hook(module, args):
        h = args[0].clone()  # [..., d_mlp]
        h[..., indices] = h[..., indices] * factor
        return (h, *args[1:])

    return pre_hook


def output_column(lm: LoadedModel, n: Neuron):
    """(parameter, index) of neuron n's output weight column in the down projection's storage layout."""
    down = lm.down_proj(n.layer)  # read the neuron: columns of [d_model, d_mlp]
    return down.weight, (n.index,) if lm.family.conv1d else (slice(None), n.index)


def _neuron_weight_slices(lm: LoadedModel, n: Neuron):
    """(parameter, index) pairs that hold neuron n's weights, in their storage layout: its input rows
    (and biases) and its output column (dkn.finetune trains exactly these)."""
    conv1d = lm.family.conv1d
    for module in lm.up_projs(n.layer):  # write the neuron: rows of [d_mlp, d_model]
        yield module.weight, (slice(None), n.index) if conv1d else (n.index,)
        if getattr(module, "bias", None) is not None:
            yield module.bias, (n.index,)
    yield output_column(lm, n)


neuron_weight_slices = _neuron_weight_slices  # public name (dkn.finetune trains exactly these slices)
