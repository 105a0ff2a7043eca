"""Does the model know a fact?  Plain next-token checks used to filter datasets.

A fact counts as known when the model's most likely next token after the prompt
is the first token of one of its answers (with the separating space).
"""
from __future__ import annotations

import torch

from dkn.models import LoadedModel
from dkn.query import make_query


@torch.no_grad()
def next_token_distribution(lm: LoadedModel, prompt: str) -> torch.Tensor:
    """[vocab] P(next token | prompt) for a causal LM."""
    ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]], device=lm.device)
    with lm.lock:
        logits = lm.model(input_ids=ids).logits[0, -1]
    return logits.float().softmax(-1)


def answers_correctly(lm: LoadedModel, prompt: str, answers: tuple[str, ...] | list[str]) -> bool:
    """Top-1 next token (or the mask's top-1 for masked LMs) is the first token of any answer."""
    firsts = set()
    for answer in answers:
        try:
            firsts.add(make_query(lm, prompt, answer).steps[0].target)
        except ValueError:
            continue
    if not firsts:
        return False
    if lm.family.masked_lm:
        from dkn.interventions import intervene
        result = intervene(lm, prompt, answers[0], [], 1.0, "last", top_k=1)
        top = lm.tokenizer.convert_tokens_to_ids(lm.tokenizer.tokenize(result.top_before[0][0]))
        return bool(set(top) & firsts)
    return int(next_token_distribution(lm, prompt).argmax()) in firsts
