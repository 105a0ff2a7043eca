"""Turning a prompt and an answer string into model inputs.

A `Query` is one prompt/answer pair, tokenised into one `Step` per answer
token: the input ids, the position whose output predicts that token, and the
token itself.  Step i is conditioned on the gold answer prefix (never on the
model's own guesses).  Causal LMs predict at the last position; masked LMs at
the i-th mask, with the earlier masks filled by the gold tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from dkn.models import LoadedModel

# Longest prompt (in tokens) that make_query accepts.  Attribution holds [steps, T, d_mlp] activations per
# layer, so a prompt of thousands of tokens would exhaust the memory of a small machine; facts are short.
# Raise it per call (max_prompt_tokens=...) or for a whole process with $DKN_MAX_PROMPT_TOKENS.
MAX_PROMPT_TOKENS = int(os.environ.get("DKN_MAX_PROMPT_TOKENS", "256") or 256)


class QueryError(ValueError):
    """The prompt or answer cannot be used; the message says what to change."""


@dataclass(frozen=True)
class Step:
    input_ids: tuple[int, ...]
    position: int  # index into input_ids whose logits predict `target`
    target: int


@dataclass(frozen=True)
class Query:
    prompt: str
    answer: str  # as tokenised, e.g. " Paris" (leading space added for word-level answers)
    steps: tuple[Step, ...]
    answer_tokens: tuple[str, ...]

    @property
    def n_answer_tokens(self) -> int:
        return len(self.steps)


def normalise_answer(prompt: str, answer: str) -> str:
    """Answers are words that follow the prompt: add the separating space unless one is there."""
    if answer[:1].isspace() or prompt[-1:].isspace():
        return answer
    return " " + answer


def make_query(
    lm: LoadedModel, prompt: str, answer: str, max_answer_tokens: int = 16, max_prompt_tokens: int | None = None
) -> Query:
    """The query of one prompt/answer pair; QueryError (saying what to change) for unusable input.
    max_prompt_tokens: longest prompt accepted, default MAX_PROMPT_TOKENS."""
    if not prompt or not prompt.strip():
        raise QueryError("the prompt is empty: type the start of a sentence whose next word is the answer")
    if not answer or not answer.strip():
        raise QueryError("the answer is empty: give the word the model should say next, e.g. 'Paris'")
    check_prompt_length(lm, prompt, max_prompt_tokens)
    answer = normalise_answer(prompt, answer)
    build = _masked_steps if lm.family.masked_lm else _causal_steps
    steps = build(lm.tokenizer, prompt, answer)
    if not steps:
        raise QueryError(f"the answer {answer!r} produced no tokens with this tokenizer")
    if len(steps) > max_answer_tokens:
        raise QueryError(
            f"the answer is {len(steps)} tokens long; dkn attributes answers of at most {max_answer_tokens} tokens"
        )
    longest = max(len(s.input_ids) for s in steps)
    if longest > lm.max_length:
        raise QueryError(
            f"prompt and answer take {longest} tokens but this model reads at most {lm.max_length}: shorten the prompt"
        )
    tokens = tuple(lm.tokenizer.decode([s.target]) for s in steps)
    return Query(prompt, answer, tuple(steps), tokens)


def prompt_tokens(lm: LoadedModel, prompt: str) -> int:
    """How many tokens the tokenizer makes of `prompt` (special tokens included)."""
    return len(lm.tokenizer(prompt)["input_ids"])


def check_prompt_length(lm: LoadedModel, prompt: str, max_prompt_tokens: int | None = None) -> int:
    """The prompt's token count; QueryError when it exceeds max_prompt_tokens (default MAX_PROMPT_TOKENS)."""
    limit = MAX_PROMPT_TOKENS if max_prompt_tokens is None else int(max_prompt_tokens)
    if limit < 1:
        raise ValueError(f"max_prompt_tokens must be at least 1, got {limit}")
    n = prompt_tokens(lm, prompt)
    if n > limit:
        raise QueryError(
            f"the prompt is {n:,} tokens long; dkn accepts prompts of at most {limit:,} tokens "
            "(a fact's prompt is one sentence): shorten it, or raise the limit with "
            "$DKN_MAX_PROMPT_TOKENS if the machine has the memory"
        )
    return n


def _causal_steps(tokenizer, prompt: str, answer: str) -> list[Step]:
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(prompt + answer)["input_ids"]
    special = set(tokenizer.all_special_ids)
    while full_ids and full_ids[-1] in special and len(full_ids) > len(prompt_ids):
        full_ids = full_ids[:-1]  # tokenizers that append an end-of-sequence token
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise QueryError(
            f"the answer {answer!r} merges with the end of the prompt when tokenised, so the prompt's tokens "
            "change: end the prompt at a word boundary (no trailing space) and start the answer with a word"
        )
    answer_ids = full_ids[len(prompt_ids) :]
    return [Step(tuple(full_ids[: len(prompt_ids) + i]), len(prompt_ids) + i - 1, t) for i, t in enumerate(answer_ids)]


def _masked_steps(tokenizer, prompt: str, answer: str) -> list[Step]:
    answer_ids = tokenizer(answer.strip(), add_special_tokens=False)["input_ids"]
    if tokenizer.mask_token is None:
        raise QueryError("this masked LM's tokenizer has no mask token")
    masks = " ".join([tokenizer.mask_token] * len(answer_ids))
    ids = tokenizer(f"{prompt.rstrip()} {masks}.")["input_ids"]
    positions = [i for i, t in enumerate(ids) if t == tokenizer.mask_token_id]
    steps = []
    for i, (pos, target) in enumerate(zip(positions, answer_ids)):
        filled = list(ids)
        for j in range(i):
            filled[positions[j]] = answer_ids[j]  # gold prefix
        steps.append(Step(tuple(filled), pos, target))
    return steps


def first_answer_tokens(lm: LoadedModel, prompt: str, answers) -> list[int]:
    """Token ids of the first token of each answer after `prompt`, in order, each once (answers that
    cannot be tokenised after this prompt are skipped).  The test "the model knows the fact" compares
    the top-1 next token with these."""
    firsts: list[int] = []
    for answer in answers:
        try:
            target = make_query(lm, prompt, answer).steps[0].target
        except ValueError:
            continue
        if target not in firsts:
            firsts.append(target)
    return firsts
