"""TempLAMA (Dhingra et al. 2022): time-stamped queries, and the wrong-facts file for fact checking."""

from __future__ import annotations

import os
import re
from pathlib import Path

from dkn.datasets.base import (
    BadRows,
    DatasetError,
    Fact,
    clean_answer,
    clean_prompt,
    data_root,
    log,
    need_file,
    read_jsonl,
    take,
)

_TEMPLAMA_PHRASES = (
    " plays for ",
    " works for ",
    " is a member of the ",
    " holds the position of ",
    " is owned by ",
    " attended ",
)
_TEMPLAMA_FILES = {
    "val": "val.jsonl",
    "test": "test_answerable_gpt2.jsonl",
    "answerable": "test_answerable_gpt2.jsonl",
    "test_answerable_gpt2": "test_answerable_gpt2.jsonl",
    "wrong": "wrong_facts.jsonl",
    "wrong_facts": "wrong_facts.jsonl",
}


def _templama_stem(sentence: str) -> str | None:
    """The cloze prompt of a TempLAMA sentence ending in "_X_.", or None if
    `_X_` is not at the end (it does not fit a left-to-right model)."""
    s = sentence.strip()
    m = re.fullmatch(r"(.*?)\s*_X_\s*\.?", s, flags=re.S)
    if not m or "_X_" in m.group(1) or not m.group(1).strip():
        return None
    return clean_prompt(m.group(1))


def _templama_subject(query_stem: str) -> str:
    for phrase in _TEMPLAMA_PHRASES:
        i = (query_stem + " ").find(phrase)
        if i > 0:
            return query_stem[:i]
    return query_stem


def load_templama(path: str | os.PathLike | None = None, limit: int | None = None, strict: bool = False) -> list[Fact]:
    """TempLAMA facts.

    * `val.jsonl` / `test_answerable_gpt2.jsonl` (`{"query": "Tom Brady plays for _X_.",
      "answer": [{"name"}], "date", "id", "relation"}`): prompt = "In {date}, " + query
      with "_X_." removed; answers = all names (file order).
    * `wrong_facts.jsonl` (`{"uuid", "sentences", "relation_name", "obj_label",
      "wrong_fact"}`): prompts from `sentences`, answer `obj_label`,
      `wrong_answers` = `wrong_fact`.

    Queries where `_X_` is not at the end (e.g. "_X_ is the chair of ...",
    relations P488, P6, P286) cannot be asked left-to-right and are skipped
    (counted in an info log).  Default: `<data root>/templama/val.jsonl`; a
    folder means its `val.jsonl`.
    """
    p = Path(path) if path is not None else data_root() / "templama" / "val.jsonl"
    if p.is_dir():
        p = p / "val.jsonl"
    need_file(p, "TempLAMA file")
    bad = BadRows(p, strict)
    facts: list[Fact] = []
    seen: set[str] = set()
    not_cloze = 0
    for lineno, obj in read_jsonl(p):
        if isinstance(obj, dict) and "sentences" in obj:  # wrong-facts format
            if not bad.require(lineno, obj, ["uuid", "sentences", "obj_label"]):
                continue
            sentences = obj["sentences"] if isinstance(obj["sentences"], list) else [obj["sentences"]]
            prompts = [s for s in (_templama_stem(x) for x in sentences if isinstance(x, str)) if s]
            if not prompts:
                not_cloze += 1
                continue
            fid = f"templama/{obj['uuid']}"
            rel = str(obj.get("relation_name") or obj.get("relation") or "unknown")
            answers = (clean_answer(obj["obj_label"]),)
            wrong = obj.get("wrong_fact") or []
            wrong = tuple(clean_answer(w) for w in ([wrong] if isinstance(wrong, str) else wrong) if w)
            subject = _templama_subject(re.sub(r"^In \d{4}, ", "", prompts[0]))
        else:
            if not bad.require(lineno, obj, ["query", "answer", "date"]):
                continue
            stem = _templama_stem(obj["query"])
            if stem is None:
                not_cloze += 1
                continue
            names = []
            for a in obj["answer"] if isinstance(obj["answer"], list) else [obj["answer"]]:
                name = a.get("name") if isinstance(a, dict) else a
                if isinstance(name, str) and name.strip() and name.strip() not in names:
                    names.append(name.strip())
            if not names:
                bad.bad(lineno, "missing field 'answer[].name'")
                continue
            rel = str(obj.get("relation") or "unknown")
            fid = f"templama/{obj.get('id') or f'line{lineno}'}"
            prompts = [f"In {obj['date']}, {stem}"]
            answers, wrong = tuple(names), ()
            subject = _templama_subject(stem)
        if not bad.first_time(lineno, fid, seen, f"duplicate id {fid!r}"):
            continue
        facts.append(
            Fact(
                id=fid,
                subject=subject,
                relation=rel,
                answers=answers,
                prompts=tuple(prompts),
                source="templama",
                wrong_answers=wrong,
            )
        )
        if limit is not None and len(facts) >= limit:
            break
    bad.summary()
    if not_cloze:
        log.info("%s: skipped %d queries whose _X_ is not at the end (not a left-to-right cloze)", p, not_cloze)
    return take(facts, limit)


def load_named(arg: str, root: Path, limit: int | None, strict: bool) -> list[Fact]:
    """ "templama" (val.jsonl), "templama:test" (test_answerable_gpt2.jsonl), "templama:wrong" (wrong_facts.jsonl)."""
    fname = _TEMPLAMA_FILES.get(arg.lower() or "val")
    if fname is None:
        raise DatasetError(f"unknown TempLAMA part {arg!r}; use one of: {', '.join(sorted(_TEMPLAMA_FILES))}")
    return load_templama(root / "templama" / fname, limit=limit, strict=strict)


def detect(p: Path, peek) -> bool:
    if p.is_dir():
        return (p / "val.jsonl").is_file()
    first = peek(p) if p.suffix.lower() in (".jsonl", ".ndjson", ".txt", "") else None
    return isinstance(first, dict) and ("query" in first or ("sentences" in first and "obj_label" in first))


def load_path(p: Path, limit: int | None, strict: bool) -> list[Fact]:
    return load_templama(p, limit=limit, strict=strict)
