"""LRE relation files (Hernandez et al. 2024, relations/data/factual): one JSON file per relation."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from dkn.datasets.base import (
    BadRows,
    DatasetError,
    Fact,
    clean_answer,
    data_root,
    decode_escapes,
    fill,
    grouped_facts,
    need_dir,
    need_file,
    read_json,
    take,
)


def _lre_files(p: Path) -> list[Path]:
    if p.is_dir():
        files = sorted(p.glob("*.json"))
        if not files:
            raise DatasetError(f"LRE folder {p} holds no *.json relation files.")
        return files
    return [need_file(p, "LRE relation file")]


def load_lre(
    path_or_dir: str | os.PathLike | None = None,
    relations: Iterable[str] | str | None = None,
    limit: int | None = None,
    strict: bool = False,
) -> list[Fact]:
    """LRE relation files (`{"name", "prompt_templates": ["The capital city of {} is"],
    "samples": [{"subject", "object"}]}`); a folder loads every `*.json` in it
    (sorted by name).  The relation is the file name without `.json`
    ("country_capital_city").  Double-escaped objects ("Bras\\\\u00edlia") are
    decoded.  Objects of the same subject are grouped into `answers`.
    `relations` picks files by that name.  Defaults to `<data root>/lre`."""
    p = Path(path_or_dir) if path_or_dir is not None else data_root() / "lre"
    if not p.exists():
        need_dir(p, "LRE data")
    files = _lre_files(p)
    if relations is not None:
        if isinstance(relations, str):
            relations = [r.strip() for r in relations.split(",") if r.strip()]
        names = {f.stem: f for f in files}
        missing = [r for r in relations if r not in names]
        if missing:
            raise DatasetError(
                f"LRE has no relation {', '.join(map(repr, missing))} in {p}. Available: {', '.join(sorted(names))}"
            )
        files = [names[r] for r in dict.fromkeys(relations)]
    facts: list[Fact] = []
    for f in files:
        data = read_json(f)
        if not isinstance(data, dict) or "samples" not in data:
            raise DatasetError(f"{f}: not an LRE relation file (needs 'prompt_templates' and 'samples')")
        templates = [t for t in (data.get("prompt_templates") or []) if isinstance(t, str) and "{}" in t]
        if not templates:
            raise DatasetError(f"{f}: no 'prompt_templates' with a '{{}}' subject slot")
        rel = f.stem
        bad = BadRows(f, strict, unit="sample")
        pairs = [
            (decode_escapes(row["subject"]).strip(), clean_answer(decode_escapes(row["object"])))
            for i, row in enumerate(data.get("samples") or [])
            if bad.require(i, row, ["subject", "object"])
        ]
        bad.summary()
        facts += grouped_facts(
            pairs, rel, "lre", lambda sub, templates=templates: tuple(fill(t, sub) for t in templates)
        )
        if limit is not None and len(facts) >= limit:
            break
    return take(facts, limit)


def load_named(arg: str, root: Path, limit: int | None, strict: bool) -> list[Fact]:
    """ "lre" (every relation file) or "lre:country_capital_city"."""
    return load_lre(root / "lre", relations=arg or None, limit=limit, strict=strict)


def detect(p: Path, peek) -> bool:
    if p.is_dir():
        jsons = sorted(p.glob("*.json"))
        return bool(jsons) and isinstance(peek(jsons[0]), dict) and "prompt_templates" in peek(jsons[0])
    data = peek(p) if p.suffix.lower() == ".json" else None
    return isinstance(data, dict) and "prompt_templates" in data and "samples" in data


def load_path(p: Path, limit: int | None, strict: bool) -> list[Fact]:
    return load_lre(p, limit=limit, strict=strict)
