"""Attribution of an answer's probability to every MLP neuron of every layer.

Integrated gradients (Dai et al. 2022): for neuron (l, i) with activation a and
baseline b at the answer position,
    score(l, i) = (a - b) * sum_k w_k * dP/dh(l, i) at h = b + alpha_k (a - b),
scaling one layer at a time while every other layer runs freely.  Cheaper
alternatives: gradient x activation, and the activation itself.

Speed: the prompt's prefix (all tokens before the answer position) is run once
and its key/value cache reused; then every (layer, alpha) pair becomes one
single-token row of one batched forward and backward pass, chunked to bound
memory (the row engine: dkn.rows).  `reference_loop=True` gives the plain per-layer loop over full
prompts, which the tests and the benchmark compare against.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from dkn import __version__
from dkn.forward import answer_runner
from dkn.hooks import edit_neurons, record_neurons
from dkn.integration import integration_points
from dkn.models import LoadedModel
from dkn.neurons import Neuron
from dkn.options import DEFAULT_RULE, default_steps
from dkn.query import Query, Step, make_query
from dkn.rows import RowJob, adaptive_integrated_grads, baseline_probs, integrated_grads, reference_integrated_grads

METHODS = ("ig", "grad_x_act", "activation")
BASELINES = ("zero", "amig")
Progress = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True)
class AttributionParams:
    method: str = "ig"  # one of METHODS
    steps: int | None = None  # m points of `rule`, integrated gradients only; None: the rule's default
    rule: str = DEFAULT_RULE  # see dkn.integration.RULES (dkn.options: why this default)
    baseline: str = "zero"  # "zero" (Dai et al.) or "amig" (Chen et al.)
    site: str = "post"  # "post": after the activation (dkn's neuron); "pre": the scripts' choice
    multiplier: str = "delta"  # "delta": a - b (correct IG); "activation": a (the scripts' choice)
    combine: str = "sum"  # over the tokens of a multi-token answer: "sum" or "mean"

    @classmethod
    def faithful(cls, **overrides) -> AttributionParams:
        """The authors' script choices (pre-activation, AMIG baseline, left Riemann, m = 10, multiplier a)."""
        return replace(cls(steps=10, rule="left", baseline="amig", site="pre", multiplier="activation"), **overrides)

    def __post_init__(self) -> None:
        if self.steps is None:  # resolved here, so that cache keys always hold the number
            object.__setattr__(self, "steps", default_steps(self.rule))

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

    scores: np.ndarray  # [n_layers, d_mlp]
    prob: float  # P(answer | prompt): product over answer tokens, gold-prefix conditioned
    token_probs: tuple[float, ...]  # one per answer token
    baseline_probs: np.ndarray  # [n_layers, n_answer_tokens]: P(token) with layer l at its baseline
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
        arrays = {"scores": result.scores, "baseline_probs": result.baseline_probs}
        store.put(key, _meta(result), arrays, kind="attribution")
    return result


def attribution_key(lm: LoadedModel, query: Query, params: AttributionParams) -> str:
    from dkn.cache import make_key

    return make_key(
        kind="attribution",
        model=lm.name,
        fingerprint=lm.fingerprint,
        prompt=query.prompt,
        answer=query.answer,
        params=asdict(params),
        version=__version__,
    )


def _meta(result: Attribution) -> dict:
    return {
        "prob": result.prob,
        "token_probs": list(result.token_probs),
        "prompt": result.prompt,
        "answer": result.answer,
        "answer_tokens": list(result.answer_tokens),
        "model": result.model,
        "fingerprint": result.fingerprint,
        "seconds": result.seconds,
        "params": asdict(result.params),
        "extra": result.extra,
    }


def _from_entry(entry, params: AttributionParams) -> Attribution:
    m = entry.meta
    return Attribution(
        entry.arrays["scores"],
        m["prob"],
        tuple(m["token_probs"]),
        entry.arrays["baseline_probs"],
        m["prompt"],
        m["answer"],
        tuple(m["answer_tokens"]),
        params,
        m["model"],
        m["fingerprint"],
        m["seconds"],
        cached=True,
        extra=m.get("extra", {}),
    )


def _compute(lm, query: Query, params: AttributionParams, *, limits, reference_loop, progress) -> Attribution:
    per_step = []
    for i, step in enumerate(query.steps):
        step_progress = None if progress is None else _sub_progress(progress, i, len(query.steps))
        per_step.append(_attribute_step(lm, step, params, limits, reference_loop, step_progress))
    scores = np.stack([s for s, _, _, _ in per_step])  # [n_tokens, n_layers, d_mlp]
    scores = scores.sum(0) if params.combine == "sum" else scores.mean(0)  # [n_layers, d_mlp]
    token_probs = tuple(float(p) for _, p, _, _ in per_step)
    baseline_probs = np.stack([b for _, _, b, _ in per_step], axis=1)  # [n_layers, n_tokens]
    extra = {k: [e[k] for _, _, _, e in per_step] for k in per_step[0][3]}  # per answer token
    return Attribution(
        scores.astype(np.float32),
        float(np.prod(token_probs)),
        token_probs,
        baseline_probs,
        query.prompt,
        query.answer,
        query.answer_tokens,
        params,
        lm.name,
        lm.fingerprint,
        extra=extra,
    )


def _sub_progress(progress: Progress, index: int, count: int) -> Progress:
    return lambda done, total: progress(index * total + done, count * total)


def _attribute_step(lm, step: Step, params, limits, reference_loop, progress):
    """(scores [n_layers, d_mlp], P(target), P(target) with each layer at baseline [n_layers], extra) for one
    token; extra holds the adaptive rule's intervals per layer ("intervals")."""
    ids = torch.tensor([step.input_ids], device=lm.device)  # [1, T]
    runner = answer_runner(lm, step, params.site, keep=False)  # None for masked LMs
    if runner is not None and not reference_loop:  # its clean run of the answer position recorded the neurons
        acts = runner.clean_acts  # [L, d], float
        prob = float(runner.clean_logits[0].float().softmax(-1)[step.target])
    else:
        acts, prob = _clean_activations(lm, ids, step, params.site)  # [L, d], float
    base = _baseline(lm, ids, step, params, acts)  # [L, d]
    job = RowJob(lm, ids, step, params.site, acts, base, runner, *limits)
    if params.method != "ig":
        base_probs = baseline_probs(job)  # [L]
        if params.method == "activation":
            return acts.cpu().numpy(), prob, base_probs, {}
        grads = _grad_at(lm, ids, step, params.site, acts)  # [L, d]
        return (acts * grads).cpu().numpy(), prob, base_probs, {}
    multiplier = acts - base if params.multiplier == "delta" else acts  # [L, d]
    if params.rule == "adaptive":
        if reference_loop:
            raise ValueError("the reference loop runs fixed rules only: compare 'adaptive' layer by layer")
        grad_sum, base_probs, intervals = adaptive_integrated_grads(job, params.steps, multiplier, progress=progress)
        return (multiplier * grad_sum).cpu().numpy(), prob, base_probs, {"intervals": intervals.tolist()}
    alphas, weights = integration_points(params.rule, params.steps)
    if reference_loop:
        grad_sum = reference_integrated_grads(job, alphas, weights, progress)
        base_probs = baseline_probs(job)
    else:
        grad_sum, base_probs = integrated_grads(job, alphas, weights, progress)  # [L, d], [L]
    return (multiplier * grad_sum).cpu().numpy(), prob, base_probs, {}


@torch.inference_mode()
def _clean_activations(lm, ids, step: Step, site) -> tuple[torch.Tensor, float]:
    last = not lm.family.masked_lm and step.position == ids.shape[1] - 1
    with record_neurons(lm, site=site) as rec:
        if last:  # the head on the answer position only
            logits = lm.model(input_ids=ids, logits_to_keep=1, use_cache=False).logits[0, -1]  # [vocab]
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
    rows = ids.repeat(len(positions), 1)  # [n_pos, T]
    rows[torch.arange(len(positions), device=ids.device), torch.tensor(positions, device=ids.device)] = replace_id
    with record_neurons(lm, site=params.site) as rec:
        lm.model(input_ids=rows, use_cache=False)
    return torch.stack([rec[l][:, step.position].float().mean(0) for l in range(lm.n_layers)])  # [L, d]


def _end_of_text_id(tokenizer) -> int:
    for candidate in (tokenizer.eos_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id):
        if candidate is not None:
            return int(candidate)
    raise ValueError("the tokenizer has no end-of-text, separator or padding token for the AMIG baseline")


def _grad_at(lm, ids, step: Step, site, acts) -> torch.Tensor:
    """[L, d]: dP/dh at the actual activations of every layer, in one forward and backward pass.
    A zero leaf is added to every layer's hidden vector at the answer position, which keeps every
    path through later layers intact, so d P / d zero(l) is the full derivative at layer l."""
    zeros = torch.zeros_like(acts).requires_grad_(True)  # [L, d]

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
