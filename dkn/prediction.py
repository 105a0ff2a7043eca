"""What the unchanged model predicts for a fact, token by token: each answer token's probability and rank.

An answer such as " Paris, France" is several tokens; the model may put " Paris" first and still give the
whole answer a small product probability.  `answer_token_ranks` says, for each answer token (conditioned on
the prompt and the gold answer prefix, as everywhere in dkn), its probability and its rank among the
model's next tokens, comparing token ids (never strings, which break for sub-word answers).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dkn.models import LoadedModel
from dkn.query import make_query


@dataclass(frozen=True)
class TokenPrediction:
    token: str               # decoded, e.g. " Paris"
    token_id: int
    prob: float              # P(token | prompt + earlier answer tokens)
    rank: int                # 1 = the model's top guess at that position


@torch.no_grad()
def answer_token_ranks(lm: LoadedModel, prompt: str, answer: str) -> list[TokenPrediction]:
    """One TokenPrediction per answer token; one forward pass per token (of the prompt plus its gold prefix)."""
    query = make_query(lm, prompt, answer)
    out = []
    with lm.lock:
        for step, token in zip(query.steps, query.answer_tokens):
            ids = torch.tensor([step.input_ids], device=lm.device)                     # [1, T]
            dist = lm.model(input_ids=ids).logits[0, step.position].float().softmax(-1)  # [vocab]
            p = dist[step.target]
            out.append(TokenPrediction(token, step.target, float(p), int((dist > p).sum()) + 1))
    return out


__all__ = ["TokenPrediction", "answer_token_ranks"]
