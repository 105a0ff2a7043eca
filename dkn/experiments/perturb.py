"""Deterministic perturbations of a cloze prompt (robustness experiments).

Three kinds, as in the paper: replace a random word by a placeholder word, insert a
placeholder word at a random position, delete a random word.  Rules:

- the same (prompt, kind, seed) always gives the same result (`random.Random` seeded
  with a string is stable across processes);
- the last word of the prompt is never replaced or deleted, and nothing is inserted
  after it, so the prompt still ends where the answer should follow (the cloze);
- words listed in `protect` (by default the fact's subject words) are never replaced
  or deleted, so the perturbed query still names what it asks about;
- the answer is never touched: it is not part of the prompt, and a placeholder that is
  one of the answers' words is never used;
- the result is never empty; when no word may be changed, `PerturbationError` (a
  ValueError) says so.
"""
from __future__ import annotations

import random
import re
from typing import Iterable

KINDS = ("replace", "add", "delete")
PLACEHOLDERS = ("something", "someone", "somewhere", "thing", "stuff")


class PerturbationError(ValueError):
    """The prompt has no word that this kind of perturbation may change."""


def _norm(word: str) -> str:
    return re.sub(r"\W+", "", word).lower()


def perturb(prompt: str, kind: str, seed: int | str = 0, protect: Iterable[str] = (),
            answers: Iterable[str] = (), placeholders: tuple[str, ...] = PLACEHOLDERS) -> str:
    """The perturbed prompt (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"unknown perturbation {kind!r}: use one of {', '.join(KINDS)}")
    words = prompt.split()
    if not words:
        raise PerturbationError("the prompt is empty")
    rng = random.Random(f"{seed}|{kind}|{prompt}")
    protected = {_norm(w) for p in protect for w in str(p).split()} - {""}
    banned = {_norm(w) for a in answers for w in str(a).split()}
    usable = [w for w in placeholders if _norm(w) not in banned and _norm(w) not in {_norm(x) for x in words}]
    usable = usable or [w for w in placeholders if _norm(w) not in banned]
    if not usable:
        raise PerturbationError("every placeholder word is one of the answers' words")
    free = [i for i, w in enumerate(words[:-1]) if _norm(w) not in protected]
    if kind == "add":
        i = rng.randrange(len(words))                     # before word i; never after the last word
        out = words[:i] + [rng.choice(usable)] + words[i:]
    elif not free:
        raise PerturbationError(f"no word of {prompt!r} may be {'replaced' if kind == 'replace' else 'deleted'} "
                                "(the last word and the subject are kept)")
    else:
        i = rng.choice(free)
        out = words[:i] + ([rng.choice(usable)] if kind == "replace" else []) + words[i + 1:]
    result = " ".join(out)
    if not result.strip():   # cannot happen (the last word is kept), but never return an empty prompt
        raise PerturbationError("the perturbed prompt would be empty")
    return result


def perturb_all(prompt: str, seed: int | str = 0, protect: Iterable[str] = (), answers: Iterable[str] = (),
                kinds: Iterable[str] = KINDS) -> dict[str, str | None]:
    """kind -> perturbed prompt, or None where the prompt cannot be perturbed that way."""
    protect, answers = tuple(protect), tuple(answers)
    out: dict[str, str | None] = {}
    for kind in kinds:
        try:
            out[kind] = perturb(prompt, kind, seed, protect, answers)
        except PerturbationError:
            out[kind] = None
    return out
