"""What the unchanged model predicts for a fact, token by token: each answer token's probability and rank.

An answer such as " Paris, France" is several tokens; the model may put " Paris" first and still give the
whole answer a small product probability.  `answer_token_ranks` says, for each answer token (conditioned on
the prompt and the gold answer prefix, as everywhere in dkn), its probability and its rank among the
model's next tokens, comparing token ids (never strings, which break for sub-word answers).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from dkn.degeneracy import random_matched_sets
from dkn.hooks import edit_neurons
from dkn.interventions import MODES, intervene_many, row_edits, scaled_weights
from dkn.models import LoadedModel
from dkn.neurons import Neuron, check_in_range
from dkn.query import make_query


@dataclass(frozen=True)
class TokenPrediction:
    token: str  # decoded, e.g. " Paris"
    token_id: int
    prob: float  # P(token | prompt + earlier answer tokens)
    rank: int  # 1 = the model's top guess at that position


@torch.no_grad()
def answer_token_ranks(lm: LoadedModel, prompt: str, answer: str) -> list[TokenPrediction]:
    """One TokenPrediction per answer token; one forward pass per token (of the prompt plus its gold prefix)."""
    query = make_query(lm, prompt, answer)
    out = []
    with lm.lock:
        for step, token in zip(query.steps, query.answer_tokens):
            ids = torch.tensor([step.input_ids], device=lm.device)  # [1, T]
            dist = lm.model(input_ids=ids).logits[0, step.position].float().softmax(-1)  # [vocab]
            p = dist[step.target]
            out.append(TokenPrediction(token, step.target, float(p), int((dist > p).sum()) + 1))
    return out


@dataclass(frozen=True)
class PromptEffect:
    """What an edit does to one prompt.  Ranks, margins and KL are at the first answer position."""

    prompt: str
    p_before: float  # P(answer), product over its tokens
    p_after: float
    rank_before: int  # rank of the answer's first token (1 = top)
    rank_after: int
    margin_before: float  # answer logit minus the best other token's logit (< 0: not the top guess)
    margin_after: float
    kl: float  # KL(unedited || edited) of the next-token distribution, in nats
    kl_random: float  # the same for as many random neurons in the same layers, scaled the same way
    top_after: str  # the edited model's top next token
    broken: bool  # the edit breaks the output (see edit_effects)


def _margin(logits: torch.Tensor, target: int) -> float:
    others = logits.clone()
    others[target] = -float("inf")
    return float(logits[target] - others.max())


@torch.no_grad()
def _first_step_logits(lm, step, sets, factor, mode) -> torch.Tensor:
    """[len(sets), vocab] float32 logits at the first answer position with each set scaled."""
    if mode == "weights":
        rows = []
        for s in sets:
            with scaled_weights(lm, s, factor) if s else nullcontext():
                ids = torch.tensor([step.input_ids], device=lm.device)  # [1, T]
                rows.append(lm.model(input_ids=ids).logits[0, step.position])  # [vocab]
        return torch.stack(rows).float()
    ids = torch.tensor([step.input_ids], device=lm.device).expand(len(sets), -1)  # [rows, T]
    position = step.position if mode == "last" else None
    with edit_neurons(lm, row_edits(lm, sets, factor, position)):
        return lm.model(input_ids=ids).logits[:, step.position].float()  # [rows, vocab]


def edit_effects(
    lm: LoadedModel,
    prompts: Sequence[str],
    answer: str,
    neurons: Sequence[Neuron],
    factor: float = 0.0,
    mode: str = "last",
    top_k: int = 10,
    seed: int = 0,
) -> list[PromptEffect]:
    """For each prompt: P and rank of the answer before and after scaling `neurons` by `factor`, the logit
    margin to the runner-up, and the KL divergence from the unedited next-token distribution, beside the KL
    of a random control (as many random neurons in the same layers).  The edit `broken` flags an output the
    edit wrecked: the edited model's top token is none of the unedited top_k, and its KL is above 1 nat and
    over 5 times the random control's."""
    if mode not in MODES:
        raise ValueError(f"unknown intervention mode {mode!r}: use one of {', '.join(MODES)}")
    neurons = tuple(Neuron(*n) for n in neurons)
    check_in_range(neurons, lm.n_layers, lm.d_mlp)
    random_set = random_matched_sets(lm, neurons, set(neurons), 1, seed)[0] if neurons else ()
    out = []
    for prompt in prompts:
        query = make_query(lm, prompt, answer)
        step = query.steps[0]
        logits = _first_step_logits(lm, step, [(), neurons, random_set], factor, mode)  # [3, vocab]
        logp = logits.log_softmax(-1)
        kl = (logp[0].exp() * (logp[0] - logp[1:])).sum(-1).clamp(min=0.0)  # [2]: edited, random (>= 0)
        ranks = [int((logits[r] > logits[r, step.target]).sum()) + 1 for r in (0, 1)]
        p0, probs = intervene_many(lm, prompt, answer, [neurons], factor, mode)
        top_before = set(logits[0].topk(top_k).indices.tolist())
        top_after = int(logits[1].argmax())
        broken = top_after not in top_before and float(kl[0]) > max(1.0, 5 * float(kl[1]))
        out.append(
            PromptEffect(
                prompt,
                p0,
                float(probs[0]),
                ranks[0],
                ranks[1],
                _margin(logits[0], step.target),
                _margin(logits[1], step.target),
                float(kl[0]),
                float(kl[1]),
                lm.tokenizer.decode([top_after]),
                broken,
            )
        )
    return out


__all__ = ["PromptEffect", "TokenPrediction", "answer_token_ranks", "edit_effects"]
