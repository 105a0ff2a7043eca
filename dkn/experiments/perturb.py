"""Deterministic perturbations of a cloze prompt (robustness experiments).

The default kinds keep the question answerable (`KINDS`):
- "typo": two adjacent letters swapped inside one word of four or more letters;
- "filler": a filler word ("really", "actually", ...) at the start ("Really, the ...") or before the
  last word ("... France really is");
- "synonym": a word replaced by a synonym from a small fixed table (`SYNONYMS`);
the paper's three kinds change the meaning and are kept as an option (`PAPER_KINDS`):
replace a random word by a placeholder word, insert a placeholder word at a random
position, delete a random word.  Rules:

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
from collections.abc import Iterable

KINDS = ("typo", "filler", "synonym")
PAPER_KINDS = ("replace", "add", "delete")
ALL_KINDS = KINDS + PAPER_KINDS
PLACEHOLDERS = ("something", "someone", "somewhere", "thing", "stuff")
FILLERS = ("really", "actually", "indeed", "truly", "basically")
SYNONYMS = {
    "capital": "capital city",
    "city": "town",
    "country": "nation",
    "located": "situated",
    "famous": "well-known",
    "known": "recognised",
    "created": "made",
    "made": "produced",
    "produced": "made",
    "founded": "established",
    "established": "founded",
    "developed": "built",
    "built": "constructed",
    "official": "formal",
    "language": "tongue",
    "native": "original",
    "works": "is employed",
    "worked": "was employed",
    "plays": "performs",
    "played": "performed",
    "speaks": "talks",
    "spoken": "used",
    "born": "brought into the world",
    "died": "passed away",
    "member": "part",
    "part": "piece",
    "owned": "held",
    "owner": "holder",
    "headquarters": "head office",
    "headquartered": "based",
    "based": "headquartered",
    "name": "title",
    "named": "called",
    "called": "named",
    "area": "region",
    "region": "area",
    "field": "domain",
    "profession": "occupation",
    "occupation": "profession",
    "job": "occupation",
    "main": "principal",
    "largest": "biggest",
    "big": "large",
    "large": "big",
    "small": "little",
    "home": "house",
    "location": "place",
    "place": "location",
    "citizen": "national",
    "citizenship": "nationality",
    "religion": "faith",
    "released": "issued",
    "manufactured": "produced",
    "manufacturer": "maker",
    "maker": "manufacturer",
    "company": "firm",
    "music": "songs",
    "genre": "style",
    "position": "role",
    "role": "position",
    "team": "side",
    "club": "team",
    "sport": "game",
    "instrument": "tool",
    "university": "college",
    "educated": "schooled",
    "studied": "learned",
    "mother": "mom",
    "father": "dad",
    "child": "kid",
    "continent": "landmass",
    "river": "stream",
    "mountain": "mount",
    "shares": "has",
    "border": "boundary",
    "borders": "touches",
    "written": "composed",
    "wrote": "authored",
    "author": "writer",
    "writer": "author",
}


class PerturbationError(ValueError):
    """The prompt has no word that this kind of perturbation may change."""


def _norm(word: str) -> str:
    return re.sub(r"\W+", "", word).lower()


def perturb(
    prompt: str,
    kind: str,
    seed: int | str = 0,
    protect: Iterable[str] = (),
    answers: Iterable[str] = (),
    placeholders: tuple[str, ...] = PLACEHOLDERS,
) -> str:
    """The perturbed prompt (see the module docstring)."""
    if kind not in ALL_KINDS:
        raise ValueError(f"unknown perturbation {kind!r}: use one of {', '.join(ALL_KINDS)}")
    words = prompt.split()
    if not words:
        raise PerturbationError("the prompt is empty")
    rng = random.Random(f"{seed}|{kind}|{prompt}")
    protected = {_norm(w) for p in protect for w in str(p).split()} - {""}
    banned = {_norm(w) for a in answers for w in str(a).split()}
    if kind in KINDS:
        return _answerable(words, kind, rng, protected, banned, prompt)
    usable = [w for w in placeholders if _norm(w) not in banned and _norm(w) not in {_norm(x) for x in words}]
    usable = usable or [w for w in placeholders if _norm(w) not in banned]
    if not usable:
        raise PerturbationError("every placeholder word is one of the answers' words")
    free = [i for i, w in enumerate(words[:-1]) if _norm(w) not in protected]
    if kind == "add":
        i = rng.randrange(len(words))  # before word i; never after the last word
        out = words[:i] + [rng.choice(usable)] + words[i:]
    elif not free:
        raise PerturbationError(
            f"no word of {prompt!r} may be {'replaced' if kind == 'replace' else 'deleted'} "
            "(the last word and the subject are kept)"
        )
    else:
        i = rng.choice(free)
        out = words[:i] + ([rng.choice(usable)] if kind == "replace" else []) + words[i + 1 :]
    result = " ".join(out)
    if not result.strip():  # cannot happen (the last word is kept), but never return an empty prompt
        raise PerturbationError("the perturbed prompt would be empty")
    return result


def _answerable(words: list[str], kind: str, rng: random.Random, protected: set, banned: set, prompt: str) -> str:
    """typo / filler / synonym (see the module docstring); the last word is kept as it is."""
    if kind == "filler":
        fillers = [f for f in FILLERS if not ({_norm(w) for w in f.split()} & banned)]
        filler = rng.choice(fillers)
        if len(words) > 1 and rng.random() < 0.5:  # before the last word ("... France really is")
            return " ".join(words[:-1] + [filler] + words[-1:])
        first = words[0] if _norm(words[0]) in protected else words[0][:1].lower() + words[0][1:]
        return " ".join([filler[0].upper() + filler[1:] + ",", first] + words[1:])  # "Really, the capital ..."
    free = [i for i, w in enumerate(words[:-1]) if _norm(w) not in protected]
    if kind == "typo":
        free = [i for i in free if sum(c.isalpha() for c in words[i]) >= 4]
        if not free:
            raise PerturbationError(
                f"no word of {prompt!r} has four letters to swap (the last word and the subject are kept)"
            )
        i = rng.choice(free)
        word = words[i]
        spots = [
            j
            for j in range(len(word) - 1)
            if word[j].isalpha() and word[j + 1].isalpha() and word[j].lower() != word[j + 1].lower()
        ]
        if not spots:
            raise PerturbationError(f"no two different adjacent letters to swap in {word!r}")
        j = rng.choice(spots)
        return " ".join(words[:i] + [word[:j] + word[j + 1] + word[j] + word[j + 2 :]] + words[i + 1 :])
    free = [
        i
        for i in free
        if _norm(words[i]) in SYNONYMS and not ({_norm(w) for w in SYNONYMS[_norm(words[i])].split()} & banned)
    ]
    if not free:
        raise PerturbationError(
            f"no word of {prompt!r} has a synonym in the table (the last word and the subject are kept)"
        )
    i = rng.choice(free)
    word = words[i]
    synonym = SYNONYMS[_norm(word)]
    synonym = synonym[0].upper() + synonym[1:] if word[:1].isupper() else synonym
    tail = word[len(word.rstrip(".,;:!?")) :]  # keep trailing punctuation
    return " ".join(words[:i] + [synonym + tail] + words[i + 1 :])


def check_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    """The kinds, or a ValueError naming the unknown ones and the valid ones."""
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in ALL_KINDS]
    if unknown or not kinds:
        raise ValueError(
            f"unknown perturbation kinds {unknown or '(none given)'}: use some of {', '.join(ALL_KINDS)} "
            f"(default {','.join(KINDS)}; the paper's: {','.join(PAPER_KINDS)})"
        )
    return kinds


def perturb_all(
    prompt: str,
    seed: int | str = 0,
    protect: Iterable[str] = (),
    answers: Iterable[str] = (),
    kinds: Iterable[str] = KINDS,
) -> dict[str, str | None]:
    """kind -> perturbed prompt, or None where the prompt cannot be perturbed that way."""
    protect, answers = tuple(protect), tuple(answers)
    out: dict[str, str | None] = {}
    for kind in kinds:
        try:
            out[kind] = perturb(prompt, kind, seed, protect, answers)
        except PerturbationError:
            out[kind] = None
    return out
