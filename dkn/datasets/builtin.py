"""Our hand-written facts (`dkn/data/builtin_facts.json`): each relation with several paraphrase
templates, each fact marked with whether the default model answers it (`scripts/mark_known_facts.py`).
"""

from __future__ import annotations

import os
from pathlib import Path

from dkn import paths
from dkn.datasets.base import (
    DatasetError,
    Fact,
    check_unique,
    clean_answer,
    fill,
    need_file,
    read_json,
    take,
)

#: Where our hand-written facts live (shipped inside the package).
BUILTIN_FACTS_PATH = paths.package_data("builtin_facts.json")


def builtin_facts(known_only: bool = False, path: str | os.PathLike | None = None) -> list[Fact]:
    """Our hand-written facts, in file order (relation by relation).

    The data file maps each relation to its paraphrase templates
    ("The capital of {subject} is") and its facts (subject, answer or answers,
    known_by_default).  `known_only=True` keeps the facts the default model
    answers on the first prompt.
    """
    p = Path(path) if path is not None else BUILTIN_FACTS_PATH
    data = read_json(need_file(p, "built-in facts file"))
    relations = data.get("relations") if isinstance(data, dict) else None
    if not isinstance(relations, dict):
        raise DatasetError(f"{p}: expected an object with a 'relations' mapping")
    facts: list[Fact] = []
    for rel, spec in relations.items():
        templates = spec.get("templates") or []
        if not templates:
            raise DatasetError(f"{p}: relation {rel!r} has no templates")
        for i, item in enumerate(spec.get("facts") or []):
            answers = item.get("answers") or [item.get("answer")]
            subject = item.get("subject")
            if not subject or not all(answers):
                raise DatasetError(f"{p}: relation {rel!r}, fact {i}: needs 'subject' and 'answer'")
            facts.append(
                Fact(
                    id=f"builtin/{rel}/{subject}",
                    subject=subject,
                    relation=rel,
                    answers=tuple(clean_answer(a) for a in answers),
                    prompts=tuple(fill(t, subject) for t in templates),
                    source="builtin",
                    known_by_default=item.get("known_by_default"),
                )
            )
    check_unique(facts, str(p))
    if known_only:
        facts = [f for f in facts if f.known_by_default]
    return facts


def load_named(arg: str, root: Path, limit: int | None, strict: bool) -> list[Fact]:
    """ "builtin" (every relation) or "builtin:capital,language" (those relations)."""
    facts = builtin_facts()
    if arg:
        facts = [f for f in facts if f.relation in arg.split(",")]
        if not facts:
            rels = sorted({f.relation for f in builtin_facts()})
            raise DatasetError(f"no built-in relation {arg!r}; built-in relations: {', '.join(rels)}")
    return take(facts, limit)


def detect(p: Path, peek) -> bool:
    data = peek(p)
    return p.suffix.lower() == ".json" and isinstance(data, dict) and "relations" in data


def load_path(p: Path, limit: int | None, strict: bool) -> list[Fact]:
    return take(builtin_facts(path=p), limit)
