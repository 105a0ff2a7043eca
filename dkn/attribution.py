"""Attribution of an answer's probability to every MLP neuron of every layer.

Integrated gradients (Dai et al. 2022): for neuron (l, i) with activation a and
baseline b at the answer position,
    score(l, i) = (a - b) * sum_k w_k * dP/dh(l, i) at h = b + alpha_k (a - b),
scaling one layer at a time while every other layer runs freely.  Cheaper
alternatives: gradient x activation, and the activation itself.

Speed: the prompt's prefix (all tokens before the answer position) is run once
and its key/value cache reused; then every (layer, alpha) pair becomes one
single-token row of one batched forward and backward pass, chunked to bound
memory.  `reference_loop=True` gives the plain per-layer loop over full
prompts, which the tests and the benchmark compare against.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from dkn import __version__
from dkn.forward import AnswerPositionRunner, rows_per_pass
from dkn.hooks import edit_neurons, record_neurons
from dkn.integration import integration_points
from dkn.models import LoadedModel
from dkn.neurons import Neuron
from dkn.query import Query, Step, make_query

METHODS = ("ig", "grad_x_act", "activation")
BASELINES = ("zero", "amig")
Progress = Callable[[int, int], None]   # (done, total)


@dataclass(frozen=True)
class AttributionParams:
    method: str = "ig"              # one of METHODS
    steps: int = 20                 # m, integrated gradients only
    rule: str = "midpoint"          # see dkn.integration.RULES
    baseline: str = "zero"          # "zero" (Dai et al.) or "amig" (Chen et al.)
    site: str = "post"              # "post": after the activation (dkn's neuron); "pre": the scripts' choice
    multiplier: str = "delta"       # "delta": a - b (correct IG); "activation": a (the scripts' choice)
    combine: str = "sum"            # over the tokens of a multi-token answer: "sum" or "mean"

    @classmethod
    def faithful(cls, **overrides) -> "AttributionParams":
        """The authors' script choices (pre-activation, AMIG baseline, left Riemann, m = 10, multiplier a)."""
        return replace(cls(steps=10, rule="left", baseline="amig", site="pre", multiplier="activation"), **overrides)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown attribution method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.baseline not in BASELINES:
            raise ValueError(f"unknown baseline {self.baseline!r}: use one of {', '.join(BASELINES)}")
        if self.combine not in ("sum", "mean"):
            raise ValueError(f"unknown combine {self.combine!r}: use 'sum' or 'mean'")
        if self.multiplier not in ("delta", "activation"):
            raise ValueError(f"unknown multiplier {self.multiplier!r}: use 'delta' or 'activation'")
        integration_points(self.rule, self.steps)  # raises on a bad rule or step count


@dataclass(frozen=True)
class Attribution:
    """Scores of one prompt/answer pair: numpy only, picklable, cacheable."""

    scores: np.ndarray              # [n_layers, d_mlp]
    prob: float                     # P(answer | prompt): product over answer tokens, gold-prefix conditioned
    token_probs: tuple[float, ...]  # one per answer token
    baseline_probs: np.ndarray      # [n_layers, n_answer_tokens]: P(token) with layer l at its baseline
    prompt: str
    answer: str
    answer_tokens: tuple[str, ...]
    params: AttributionParams
    model: str = ""
    fingerprint: str = ""
    seconds: float = 0.0
    cached: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.scores.shape[0]

    @property
    def d_mlp(self) -> int:
        return self.scores.shape[1]

    @property
    def completeness_gap(self) -> np.ndarray:
        """[n_layers]: per layer, sum of scores minus the sum over tokens of P(x) - P(baseline).
        Zero for exact integrated gradients with the "delta" multiplier; shrinks as steps grow."""
        target = (np.asarray(self.token_probs)[None, :] - self.baseline_probs).sum(1)
        if self.params.combine == "mean":
            target = target / len(self.token_probs)
        return self.scores.sum(1) - target

    def top(self, k: int = 20) -> list[tuple[Neuron, float]]:
        flat = np.argsort(self.scores, axis=None)[::-1][:k]
        layers, index = np.unravel_index(flat, self.scores.shape)
        return [(Neuron(int(l), int(i)), float(self.scores[l, i])) for l, i in zip(layers, index)]


def attribute(
    lm: LoadedModel,
    prompt: str,
    answer: str,
    params: AttributionParams | None = None,
    *,
    store=None,
    max_rows: int | None = None,
    memory_budget: int | None = None,
    reference_loop: bool = False,
    progress: Progress | None = None,
) -> Attribution:
    """Attribute P(answer | prompt) to every neuron; reads and writes `store` (a dkn.cache.ResultStore) if given.
    One batched pass holds at most `max_rows` tokens and about `memory_budget` bytes of activations
    (defaults: `lm.max_rows`, `lm.memory_budget`); neither changes the result."""
    params = params or AttributionParams()
    params.validate()
    query = make_query(lm, prompt, answer)
    if store is not None:
        key = attribution_key(lm, query, params)
        entry = store.get(key)
        if entry is not None:
            return _from_entry(entry, params)
    start = time.perf_counter()
    limits = (max_rows, memory_budget)
    result = _compute(lm, query, params, limits=limits, reference_loop=reference_loop, progress=progress)
    result = replace(result, seconds=time.perf_counter() - start)
    if store is not None:
        store.put(key, _meta(result), {"scores": result.scores, "baseline_probs": result.baseline_probs}, kind="attribution")
    return result


def attribution_key(lm: LoadedModel, query: Query, params: AttributionParams) -> str:
    from dkn.cache import make_key

    return make_key(kind="attribution", model=lm.name, fingerprint=lm.fingerprint, prompt=query.prompt,
                    answer=query.answer, params=asdict(params), version=__version__)


def _meta(result: Attribution) -> dict:
    return {"prob": result.prob, "token_probs": list(result.token_probs), "prompt": result.prompt,
            "answer": result.answer, "answer_tokens": list(result.answer_tokens), "model": result.model,
            "fingerprint": result.fingerprint, "seconds": result.seconds, "params": asdict(result.params)}


def _from_entry(entry, params: AttributionParams) -> Attribution:
    m = entry.meta
    return Attribution(entry.arrays["scores"], m["prob"], tuple(m["token_probs"]), entry.arrays["baseline_probs"],
                       m["prompt"], m["answer"], tuple(m["answer_tokens"]), params, m["model"], m["fingerprint"],
                       m["seconds"], cached=True)


def _compute(lm, query: Query, params: AttributionParams, *, limits, reference_loop, progress) -> Attribution:
    per_step = []
    for i, step in enumerate(query.steps):
        step_progress = None if progress is None else _sub_progress(progress, i, len(query.steps))
        per_step.append(_attribute_step(lm, step, params, limits, reference_loop, step_progress))
    scores = np.stack([s for s, _, _ in per_step])                          # [n_tokens, n_layers, d_mlp]
    scores = scores.sum(0) if params.combine == "sum" else scores.mean(0)   # [n_layers, d_mlp]
    token_probs = tuple(float(p) for _, p, _ in per_step)
    baseline_probs = np.stack([b for _, _, b in per_step], axis=1)         # [n_layers, n_tokens]
    return Attribution(scores.astype(np.float32), float(np.prod(token_probs)), token_probs, baseline_probs,
                       query.prompt, query.answer, query.answer_tokens, params, lm.name, lm.fingerprint)


def _sub_progress(progress: Progress, index: int, count: int) -> Progress:
    return lambda done, total: progress(index * total + done, count * total)


def _attribute_step(lm, step: Step, params, limits, reference_loop, progress):
    """(scores [n_layers, d_mlp], P(target), P(target) with each layer at baseline [n_layers]) for one token."""
    ids = torch.tensor([step.input_ids], device=lm.device)                 # [1, T]
    acts, prob = _clean_activations(lm, ids, step, params.site)             # [L, d], float
    base = _baseline(lm, ids, step, params, acts)                           # [L, d]
    runner = _runner_for(lm, ids, step, params.site)
    if params.method != "ig":
        base_probs = _baseline_probs(lm, ids, step, params.site, base, runner)   # [L]
        if params.method == "activation":
            return acts.cpu().numpy(), prob, base_probs
        grads = _grad_at(lm, ids, step, params.site, acts)                  # [L, d]
        return (acts * grads).cpu().numpy(), prob, base_probs
    alphas, weights = integration_points(params.rule, params.steps)
    if reference_loop:
        grad_sum = _reference_integrated_grads(lm, ids, step, params.site, acts, base, alphas, weights, progress)
        base_probs = _baseline_probs(lm, ids, step, params.site, base, runner)
    else:
        grad_sum, base_probs = _integrated_grads(lm, ids, step, params.site, acts, base, alphas, weights, limits,
                                                 runner, progress)          # [L, d], [L]
    multiplier = acts - base if params.multiplier == "delta" else acts
    return (multiplier * grad_sum).cpu().numpy(), prob, base_probs


@torch.inference_mode()
def _clean_activations(lm, ids, step: Step, site) -> tuple[torch.Tensor, float]:
    last = not lm.family.masked_lm and step.position == ids.shape[1] - 1
    with record_neurons(lm, site=site) as rec:
        if last:                        # the head on the answer position only
            logits = lm.model(input_ids=ids, logits_to_keep=1, use_cache=False).logits[0, -1]   # [vocab]
        else:
            logits = lm.model(input_ids=ids, use_cache=False).logits[0, step.position]
    acts = torch.stack([rec[l][0, step.position] for l in range(lm.n_layers)]).float()  # [L, d]
    return acts, float(logits.float().softmax(-1)[step.target])


@torch.inference_mode()
def _baseline(lm, ids, step: Step, params, acts) -> torch.Tensor:
    if params.baseline == "zero" or params.method != "ig":
        return torch.zeros_like(acts)
    # AMIG: mean activation at the answer position when each token in turn is replaced by end-of-text.
    replace_id = _end_of_text_id(lm.tokenizer)
    positions = [j for j in range(ids.shape[1]) if j != step.position or not lm.family.masked_lm]
    rows = ids.repeat(len(positions), 1)                                    # [n_pos, T]
    rows[torch.arange(len(positions), device=ids.device), torch.tensor(positions, device=ids.device)] = replace_id
    with record_neurons(lm, site=params.site) as rec:
        lm.model(input_ids=rows, use_cache=False)
    return torch.stack([rec[l][:, step.position].float().mean(0) for l in range(lm.n_layers)])  # [L, d]


def _end_of_text_id(tokenizer) -> int:
    for candidate in (tokenizer.eos_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id):
        if candidate is not None:
            return int(candidate)
    raise ValueError("the tokenizer has no end-of-text, separator or padding token for the AMIG baseline")


@torch.inference_mode()
def _baseline_probs(lm, ids, step: Step, site, base, runner) -> np.ndarray:
    """[L]: P(target) when layer l alone is set to its baseline at the answer position (one row per layer)."""
    L = lm.n_layers
    layers = torch.arange(L, device=lm.device)
    leaf = base.clone()                                                      # [L, d]: row l sets layer l
    logits = _row_logits(lm, ids, step, site, layers, leaf, runner)          # [L, vocab]
    return logits.float().softmax(-1)[layers, step.target].cpu().numpy()


def _grad_at(lm, ids, step: Step, site, acts) -> torch.Tensor:
    """[L, d]: dP/dh at the actual activations of every layer, in one forward and backward pass.
    A zero leaf is added to every layer's hidden vector at the answer position, which keeps every
    path through later layers intact, so d P / d zero(l) is the full derivative at layer l."""
    zeros = torch.zeros_like(acts).requires_grad_(True)                      # [L, d]

    def perturb(layer):
        def edit(h):
            h = h.clone()
            h[0, step.position] = h[0, step.position] + zeros[layer].to(h.device, h.dtype)
            return h
        return edit

    with torch.enable_grad(), edit_neurons(lm, {l: perturb(l) for l in range(lm.n_layers)}, site):
        logits = lm.model(input_ids=ids, use_cache=False).logits[0, step.position]
        prob = logits.float().softmax(-1)[step.target]
        (grad,) = torch.autograd.grad(prob, zeros)
    return grad


def _integrated_grads(lm, ids, step, site, acts, base, alphas, weights, limits, runner, progress):
    """([L, d] sum_k w_k dP/dh(l) at h(l) = b + alpha_k (a - b), [L] P with layer l at its baseline).
    Rows are (layer, alpha) pairs in layer-major order, evaluated in chunks bounded by `limits`
    ((max_rows, memory_budget), see dkn.forward.rows_per_pass);
    without a runner (masked LMs, the reference loop) each row is the whole prompt.  When the rule has no
    alpha = 0 point, one is added with weight 0, so that P(baseline) comes from the same pass."""
    if not np.any(alphas == 0):
        alphas, weights = np.append(alphas, 0.0), np.append(weights, 0.0)
    L, n_alpha = lm.n_layers, len(alphas)
    row_layer = np.repeat(np.arange(L), n_alpha)                             # [R]
    row_alpha = np.tile(np.arange(n_alpha), L)                               # [R]
    at_one = np.flatnonzero(alphas == 1)
    if runner is not None and at_one.size:
        # alpha = 1 is the clean run for every layer: one shared row (the first of the first chunk), whose
        # gradient at each layer comes from a zero added there, replaces L identical rows
        keep = row_alpha != at_one[0]
        row_layer, row_alpha = row_layer[keep], row_alpha[keep]
    tokens_per_row = 1 if runner is not None else len(step.input_ids)
    rows_per_chunk = rows_per_pass(lm, tokens_per_row, len(step.input_ids), *limits)
    alphas_t = torch.tensor(alphas, dtype=acts.dtype, device=acts.device)
    weights_t = torch.tensor(weights, dtype=acts.dtype, device=acts.device)
    grad_sum = torch.zeros_like(acts)                                        # [L, d]
    base_probs = np.zeros(L)
    zero = int(np.flatnonzero(alphas == 0)[0])
    for start in range(0, len(row_layer), rows_per_chunk):
        layers = torch.from_numpy(row_layer[start:start + rows_per_chunk]).to(acts.device)   # [B]
        ks = torch.from_numpy(row_alpha[start:start + rows_per_chunk]).to(acts.device)        # [B]
        path = base[layers] + alphas_t[ks, None] * (acts[layers] - base[layers])             # [B, d]
        with_clean = start == 0 and runner is not None and at_one.size > 0
        grads, probs, clean = _path_grads(lm, ids, step, site, layers, path, runner, with_clean)  # [B, d], [B]
        grad_sum.index_add_(0, layers, weights_t[ks, None] * grads)
        if clean is not None:
            grad_sum += weights_t[at_one[0]] * clean                                         # [L, d]
        at_zero = (ks == zero).cpu().numpy()
        base_probs[layers.cpu().numpy()[at_zero]] = probs.cpu().numpy()[at_zero]
        if progress is not None:
            progress(min(start + rows_per_chunk, len(row_layer)), len(row_layer))
    return grad_sum, base_probs


def _reference_integrated_grads(lm, ids, step, site, acts, base, alphas, weights, progress):
    """The plain per-layer loop: one batch of full prompts per layer, only that layer scaled."""
    L, n_alpha = lm.n_layers, len(alphas)
    grad_sum = torch.zeros_like(acts)
    for layer in range(L):
        grad_sum[layer] = _one_layer(lm, ids, step, site, acts, base, alphas, weights, layer)
        if progress is not None:
            progress((layer + 1) * n_alpha, L * n_alpha)
    return grad_sum


def _one_layer(lm, ids, step, site, acts, base, alphas, weights, layer) -> torch.Tensor:
    alphas_t = torch.tensor(alphas, dtype=acts.dtype, device=acts.device)
    path = base[layer] + alphas_t[:, None] * (acts[layer] - base[layer])    # [m, d]
    layers = torch.full((len(alphas),), layer, device=acts.device)
    grads, _, _ = _path_grads(lm, ids, step, site, layers, path, None)      # [m, d]
    return (torch.tensor(weights, dtype=acts.dtype, device=acts.device)[:, None] * grads).sum(0)


def _path_grads(lm, ids, step, site, layers, path, runner, with_clean: bool = False):
    """Row r sets layer layers[r] to path[r] at the answer position.  Returns dP/dh there [B, d], P [B],
    and, with `with_clean` (runner only), dP/dh at the clean activations of every layer [L, d] from one
    extra row that runs the clean model with a zero added to every layer."""
    leaf = path.detach().clone().requires_grad_(True)                       # [B, d]
    zeros = (torch.zeros(lm.n_layers, path.shape[1], dtype=path.dtype, device=path.device, requires_grad=True)
             if with_clean else None)                                        # [L, d]
    with torch.enable_grad():
        logits = _row_logits(lm, ids, step, site, layers, leaf, runner, zeros)   # [B (+1), vocab]
    with torch.no_grad():               # dP_t/dz_v = P_t (1[v = t] - p_v), written out: cheaper than autograd's
        p = logits.float().softmax(-1)                                       # [B (+1), vocab]
        prob = p[:, step.target].clone()                                     # [B (+1)]
        grad_logits = p.mul_(-prob[:, None])
        grad_logits[:, step.target] += prob
    # rows are independent, so the vector-Jacobian product gives each row its own dP_r/dh_r
    inputs = (leaf,) if zeros is None else (leaf, zeros)
    grads = torch.autograd.grad(logits, inputs, grad_outputs=grad_logits.to(logits.dtype))
    if zeros is None:
        return grads[0], prob, None
    return grads[0], prob[1:], grads[1]


def _row_logits(lm, ids, step, site, layers, values, runner, zeros=None) -> torch.Tensor:
    """[B, vocab]: answer-position logits when row r sets layer layers[r] (ascending) to values[r] [B, d].
    With `zeros` [L, d] (runner only), a first extra row runs the clean model plus zeros[l] at every layer."""
    offset = 0 if zeros is None else 1
    edits = {}
    for layer in range(lm.n_layers) if zeros is not None else torch.unique(layers).tolist():
        rows = torch.nonzero(layers == layer).squeeze(1) + offset           # [n_l]
        edits[layer] = _splice(rows, 0 if runner is not None else step.position, values, offset,
                               None if zeros is None else zeros[layer])
    if runner is not None:
        starts = layers if zeros is None else torch.cat([layers.new_zeros(1), layers])
        return runner.logits(starts, edits)
    with edit_neurons(lm, edits, site):
        return lm.model(input_ids=ids.expand(len(layers), -1), use_cache=False).logits[:, step.position]


def _splice(rows: torch.Tensor, pos: int, values: torch.Tensor, offset: int = 0, add_to_first=None):
    """Edit: rows `rows` take values[rows - offset] at `pos`; with `add_to_first` [d], row 0 gets it added."""
    def edit(h):                                  # h: [B, T, d]
        h = h.clone()
        if len(rows):
            h[rows.to(h.device), pos] = values[rows - offset].to(h.device, h.dtype)
        if add_to_first is not None:
            h[0, pos] = h[0, pos] + add_to_first.to(h.device, h.dtype)
        return h
    return edit


def _runner_for(lm, ids, step: Step, site):
    """The fast answer-position runner for causal prompts whose answer position is the last token."""
    if lm.family.masked_lm or step.position != len(step.input_ids) - 1:
        return None
    return AnswerPositionRunner(lm, ids, site)
