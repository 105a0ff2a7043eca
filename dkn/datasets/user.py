"""The user's own facts: CSV/TSV with a header row, JSONL (one object a line) or a JSON list."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dkn.datasets.base import (
    BadRows,
    DatasetError,
    Fact,
    clean_answer,
    clean_prompt,
    need_file,
    read_json,
    read_jsonl,
    read_text,
    take,
)


def _split_list(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return [str(x) for x in v if x is not None and str(x).strip()]
    return [x for x in str(v).split("|") if x.strip()]


def _user_rows(p: Path) -> Iterator[tuple[int, Any]]:
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv"):
        text = read_text(p)
        try:
            reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
            if not reader.fieldnames:
                raise DatasetError(f"{p}: empty CSV file; the first line must name the columns (prompt,answer,...)")
            reader.fieldnames = [f.strip().lower() for f in reader.fieldnames]
            for row in reader:
                # line_num is the physical line just read (header = line 1)
                yield reader.line_num, {k: (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k}
        except csv.Error as e:
            raise DatasetError(f"{p}: cannot read the CSV ({e})") from None
    elif suffix == ".json":
        data = read_json(p)
        if isinstance(data, dict) and isinstance(data.get("facts"), list):
            data = data["facts"]
        if not isinstance(data, list):
            raise DatasetError(f"{p}: expected a JSON list of objects with 'prompt' and 'answer'")
        yield from enumerate(data, start=1)
    else:
        yield from read_jsonl(p)


def load_user_file(path: str | os.PathLike, limit: int | None = None, strict: bool = False) -> list[Fact]:
    """The user's own facts from CSV (header row) or JSONL (one object a line;
    a `.json` list also works).

    Columns / keys: `prompt` (or `prompts`: a list, or several prompts joined by
    `|`), `answer` (or `answers`; several joined by `|`, the first is the main
    one), optional `subject`, `relation`, `id`, `wrong_answers`.  A prompt may
    contain `{subject}` or `{}`, filled with the subject.  Missing ids become
    "<file stem>/<row>", where row is the line number (CSV: counting the header
    as line 1; JSONL: the line).  Rows without prompt or answer are skipped with
    a warning (strict=True raises, naming the row).
    """
    p = need_file(Path(path).expanduser(), "facts file")
    unit = "record" if p.suffix.lower() == ".json" else "line"
    bad = BadRows(p, strict, unit=unit)
    facts: list[Fact] = []
    seen: set[str] = set()
    for row, obj in _user_rows(p):
        if not isinstance(obj, dict):
            bad.bad(row, f"expected an object with 'prompt' and 'answer', got {type(obj).__name__}")
            continue
        prompts = _split_list(obj.get("prompts")) or _split_list(obj.get("prompt"))
        answers = _split_list(obj.get("answers")) or _split_list(obj.get("answer"))
        if not prompts:
            bad.bad(row, "missing field 'prompt'")
            continue
        if not answers:
            bad.bad(row, "missing field 'answer'")
            continue
        subject = str(obj.get("subject") or "").strip()
        if subject:
            prompts = [clean_prompt(x.replace("{subject}", subject).replace("{}", subject)) for x in prompts]
        elif any("{subject}" in x or "{}" in x for x in prompts):
            bad.bad(row, "prompt has a {subject} slot but the row has no 'subject'")
            continue
        else:
            prompts = [clean_prompt(x) for x in prompts]
        fid = str(obj.get("id") or "").strip() or f"{p.stem}/{row}"
        if not bad.first_time(row, fid, seen, f"duplicate id {fid!r}"):
            continue
        known = obj.get("known_by_default")
        if isinstance(known, str):
            known = {"true": True, "false": False}.get(known.strip().lower())
        facts.append(
            Fact(
                id=fid,
                subject=subject,
                relation=str(obj.get("relation") or "").strip() or "user",
                answers=tuple(clean_answer(a) for a in answers),
                prompts=tuple(prompts),
                source="user",
                known_by_default=known if isinstance(known, bool) else None,
                wrong_answers=tuple(clean_answer(a) for a in _split_list(obj.get("wrong_answers"))),
            )
        )
        if limit is not None and len(facts) >= limit:
            break
    bad.summary()
    return take(facts, limit)


USER_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".ndjson", ".txt", "")


def detect(p: Path, peek) -> bool:
    return p.is_file() and p.suffix.lower() in USER_SUFFIXES


def load_path(p: Path, limit: int | None, strict: bool) -> list[Fact]:
    return load_user_file(p, limit=limit, strict=strict)
