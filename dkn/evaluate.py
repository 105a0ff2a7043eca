"""Does the model know a fact?  Plain next-token checks used to filter datasets.

A fact counts as known when the model's most likely next token after the prompt
is the first token of one of its answers (with the separating space).
"""

from __future__ import annotations

import torch

from dkn.models import LoadedModel
from dkn.query import first_answer_tokens


@torch.no_grad()
def next_token_distribution(lm: LoadedModel, prompt: str) -> torch.Tensor:
    """[vocab] P(next token | prompt) for a causal LM."""
    ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]], device=lm.device)
    with lm.lock:
        logits = lm.model(input_ids=ids).logits[0, -1]
    return logits.float().softmax(-1)


def answers_correctly(lm: LoadedModel, prompt: str, answers: tuple[str, ...] | list[str]) -> bool:
    """Top-1 next token (or the mask's top-1 for masked LMs) is the first token of any answer."""
    firsts = set(first_answer_tokens(lm, prompt, answers))
    if not firsts:
        return False
    if lm.family.masked_lm:
        from dkn.interventions import intervene

        result = intervene(lm, prompt, answers[0], [], 1.0, "last", top_k=1)
        top = lm.tokenizer.convert_tokens_to_ids(lm.tokenizer.tokenize(result.top_before[0][0]))
        return bool(set(top) & firsts)
    return int(next_token_distribution(lm, prompt).argmax()) in firsts


@torch.no_grad()
def answers_correctly_many(lm: LoadedModel, items, batch_size: int = 32) -> list[bool]:
    """`answers_correctly` for many (prompt, answers) pairs of a causal LM, in right-padded batches
    (the same top-1 test; batching can only flip exact near-ties of the top two logits)."""
    if lm.family.masked_lm:
        return [answers_correctly(lm, p, a) for p, a in items]
    firsts, ids = [], []
    for prompt, answers in items:
        firsts.append(set(first_answer_tokens(lm, prompt, answers)))
        ids.append(lm.tokenizer(prompt)["input_ids"])
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    out = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        width = max(len(x) for x in chunk)
        batch = torch.full((len(chunk), width), pad, dtype=torch.long)  # [B, T]
        mask = torch.zeros_like(batch)
        for b, x in enumerate(chunk):
            batch[b, : len(x)], mask[b, : len(x)] = torch.tensor(x), 1
        with lm.lock:
            logits = lm.model(input_ids=batch.to(lm.device), attention_mask=mask.to(lm.device)).logits
        last = torch.tensor([len(x) - 1 for x in chunk], device=logits.device)
        top = logits[torch.arange(len(chunk), device=logits.device), last].argmax(-1)  # [B]
        out += [int(t) in f for t, f in zip(top.tolist(), firsts[start : start + batch_size])]
    return out
