"""PARAREL (Elazar et al. 2021): `templates/P*.jsonl` (paraphrased patterns) + `facts/P*.jsonl`."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from dkn.datasets.base import (
    BadRows,
    DatasetError,
    Fact,
    clean_answer,
    clean_prompt,
    data_root,
    grouped_facts,
    log,
    need_dir,
    read_jsonl,
    rel_sort_key,
    take,
)

_Y_AT_END = re.compile(r"\s*\[Y\]\s*\.?\s*$")


def _pararel_prompt_templates(path: Path, bad: BadRows) -> list[str]:
    """Templates of one relation whose [Y] ends the sentence, with [Y] and the
    final " ." stripped, [X] kept as the subject slot."""
    out = []
    for lineno, obj in read_jsonl(path):
        if not bad.require(lineno, obj, ["pattern"]):
            continue
        pattern = obj["pattern"]
        if "[X]" not in pattern or not _Y_AT_END.search(pattern) or pattern.count("[Y]") != 1:
            continue
        t = _Y_AT_END.sub("", pattern)
        if t not in out:
            out.append(t)
    return out


def load_pararel(
    root: str | os.PathLike | None = None,
    relations: Iterable[str] | str | None = None,
    limit: int | None = None,
    strict: bool = False,
) -> list[Fact]:
    """PARAREL facts: `root/templates/P*.jsonl` (patterns) + `root/facts/P*.jsonl`.

    Only templates whose `[Y]` ends the sentence are used (left-to-right cloze);
    a relation needs at least 2 of them, otherwise it is skipped (or, if asked
    for by name, an error).  All objects of one (subject, relation) pair are
    grouped into `answers`, in file order.  Facts are ordered by relation
    number, then by first appearance in the facts file.  `limit` caps the total.
    `root` defaults to `<data root>/pararel`.
    """
    root_p = need_dir(Path(root) if root is not None else data_root() / "pararel", "PARAREL folder")
    tdir = need_dir(root_p / "templates", "PARAREL templates folder")
    fdir = need_dir(root_p / "facts", "PARAREL facts folder")
    available = sorted((p.stem for p in tdir.glob("P*.jsonl")), key=rel_sort_key)
    if isinstance(relations, str):
        relations = [r.strip() for r in relations.split(",") if r.strip()]
    explicit = relations is not None
    wanted = list(dict.fromkeys(relations)) if explicit else available
    for r in wanted:
        if r not in available:
            raise DatasetError(
                f"PARAREL has no templates for relation {r!r} in {tdir}. "
                f"Relations with templates: {', '.join(available)}"
            )
    facts: list[Fact] = []
    for rel in sorted(wanted, key=rel_sort_key):
        tbad = BadRows(tdir / f"{rel}.jsonl", strict)
        templates = _pararel_prompt_templates(tdir / f"{rel}.jsonl", tbad)
        tbad.summary()
        if len(templates) < 2:
            msg = (
                f"PARAREL relation {rel} has {len(templates)} template(s) ending with [Y]; "
                "at least 2 are needed for left-to-right paraphrases"
            )
            if explicit:
                raise DatasetError(msg + ". Pick another relation.")
            log.info("%s; skipping it", msg)
            continue
        fpath = fdir / f"{rel}.jsonl"
        if not fpath.exists():
            if explicit:
                raise DatasetError(f"PARAREL relation {rel}: facts file {fpath} is missing.")
            log.info("PARAREL relation %s has templates but no facts file; skipping it", rel)
            continue
        fbad = BadRows(fpath, strict)
        pairs = [
            (obj["sub_label"].strip(), clean_answer(obj["obj_label"]))
            for lineno, obj in read_jsonl(fpath)
            if fbad.require(lineno, obj, ["sub_label", "obj_label"])
        ]
        fbad.summary()
        facts += grouped_facts(
            pairs,
            rel,
            "pararel",
            lambda sub, templates=templates: tuple(clean_prompt(t.replace("[X]", sub)) for t in templates),
        )
        if limit is not None and len(facts) >= limit:
            break
    return take(facts, limit)


def load_named(arg: str, root: Path, limit: int | None, strict: bool) -> list[Fact]:
    """ "pararel" (every relation with >= 2 cloze templates) or "pararel:P36,P19"."""
    return load_pararel(root / "pararel", relations=arg or None, limit=limit, strict=strict)


def detect(p: Path, peek) -> bool:
    if p.is_dir():
        return (p / "templates").is_dir() and (p / "facts").is_dir()
    first = peek(p) if p.suffix.lower() in (".jsonl", ".ndjson", ".txt", "") else None
    if isinstance(first, dict) and ("pattern" in first or "sub_label" in first):
        raise DatasetError(
            f"{p} is one PARAREL file; give the PARAREL folder (with templates/ and facts/), "
            f"or the name 'pararel:{p.stem}'."
        )
    return False


def load_path(p: Path, limit: int | None, strict: bool) -> list[Fact]:
    return load_pararel(p, limit=limit, strict=strict)
