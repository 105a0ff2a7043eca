"""ROME's CounterFact `known_1000.json` (Meng et al. 2022): one prompt per fact."""

from __future__ import annotations

import os
from pathlib import Path

from dkn.datasets.base import (
    BadRows,
    DatasetError,
    Fact,
    clean_answer,
    clean_prompt,
    data_root,
    need_file,
    read_json,
    take,
)


def load_rome(path: str | os.PathLike | None = None, limit: int | None = None, strict: bool = False) -> list[Fact]:
    """ROME's `known_1000.json`: one prompt per fact (the record's `prompt`),
    answer = `attribute`, relation = `relation_id`.  In file order.
    `path` defaults to `<data root>/rome/known_1000.json`; a folder is searched
    for `known_1000.json`."""
    p = Path(path) if path is not None else data_root() / "rome" / "known_1000.json"
    if p.is_dir():
        p = p / "known_1000.json"
    data = read_json(need_file(p, "ROME known_1000.json"))
    if not isinstance(data, list):
        raise DatasetError(f"{p}: expected a JSON list of records (ROME known_1000.json format)")
    bad = BadRows(p, strict, unit="record")
    facts: list[Fact] = []
    seen: set[str] = set()
    for i, rec in enumerate(data):
        if not bad.require(i, rec, ["subject", "attribute", "prompt"]):
            continue
        fid = f"rome/{rec.get('known_id', i)}"
        if not bad.first_time(i, fid, seen, f"duplicate known_id {rec.get('known_id')!r}"):
            continue
        facts.append(
            Fact(
                id=fid,
                subject=rec["subject"],
                relation=str(rec.get("relation_id") or rec.get("template") or "unknown"),
                answers=(clean_answer(rec["attribute"]),),
                prompts=(clean_prompt(rec["prompt"]),),
                source="rome",
            )
        )
        if limit is not None and len(facts) >= limit:
            break
    bad.summary()
    return take(facts, limit)


def load_named(arg: str, root: Path, limit: int | None, strict: bool) -> list[Fact]:
    return load_rome(root / "rome" / "known_1000.json", limit=limit, strict=strict)


def detect(p: Path, peek) -> bool:
    if p.is_dir():
        return (p / "known_1000.json").is_file()
    data = peek(p) if p.suffix.lower() == ".json" else None
    first = data[0] if isinstance(data, list) and data else None
    return isinstance(first, dict) and {"attribute", "known_id"} <= set(first)


def load_path(p: Path, limit: int | None, strict: bool) -> list[Fact]:
    return load_rome(p, limit=limit, strict=strict)
