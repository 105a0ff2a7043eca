"""Facts and the datasets they come from: the one `Fact` type, and one loader module per source.

* `base`: `Fact` (a subject, a relation, valid answers, left-to-right cloze prompts), `DatasetError`,
  and what every loader shares (reading files with clear messages, skipping bad rows).
* `builtin`: our hand-written facts; `pararel`, `rome`, `lre`, `templama`: the real datasets, read
  from `dkn.paths.data_root()` (`$DKN_DATA`) and never copied into the project; `user`: the user's own
  CSV / JSONL / JSON files.

`load_dataset(name_or_path)` looks a name up in `SOURCES`, the registry of those modules (each has
`load_named(arg, root, limit, strict)`; "pararel:P36" passes "P36" as arg), or detects the format of a
file or folder by asking each source's `detect(path, peek)` in `DETECTION_ORDER`.  To add a source,
write a module with `load_named`, `detect` and `load_path`, and add it to `SOURCES`.

Every loader returns facts in a deterministic order.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

from dkn.datasets import base, builtin, lre, pararel, rome, templama, user
from dkn.datasets.base import DatasetError, Fact, read_json, read_jsonl
from dkn.datasets.builtin import BUILTIN_FACTS_PATH, builtin_facts
from dkn.datasets.lre import load_lre
from dkn.datasets.pararel import load_pararel
from dkn.datasets.rome import load_rome
from dkn.datasets.templama import load_templama
from dkn.datasets.user import load_user_file

#: Named sources: the name `load_dataset` accepts (each may take a ":..." argument) -> its module.
SOURCES: dict[str, ModuleType] = {
    "builtin": builtin,
    "pararel": pararel,
    "rome": rome,
    "lre": lre,
    "templama": templama,
}
#: Names `load_dataset` accepts.
DATASET_NAMES = tuple(SOURCES)
#: The order in which a file or folder's format is detected (the user's own files last: they take anything).
DETECTION_ORDER: tuple[ModuleType, ...] = (pararel, templama, rome, lre, builtin, user)

__all__ = [
    "Fact",
    "DatasetError",
    "DATASET_NAMES",
    "SOURCES",
    "BUILTIN_FACTS_PATH",
    "default_data_root",
    "builtin_facts",
    "load_pararel",
    "load_rome",
    "load_lre",
    "load_templama",
    "load_user_file",
    "load_dataset",
]


def default_data_root() -> Path:
    """Where named datasets are read from: `dkn.paths.data_root()`."""
    return base.data_root()


def load_dataset(
    name_or_path: str | os.PathLike,
    limit: int | None = None,
    data_root: str | os.PathLike | None = None,
    strict: bool = False,
) -> list[Fact]:
    """Load facts by dataset name or from a file/folder.

    Names: "builtin", "pararel", "pararel:P36" (or "pararel:P36,P19"), "rome",
    "lre", "lre:country_capital_city", "templama" (val.jsonl), "templama:test"
    (test_answerable_gpt2.jsonl), "templama:wrong" (wrong_facts.jsonl).
    Anything else is taken as a path: a CSV/JSONL of the user's facts, or any
    of the datasets' own files/folders (the format is detected).  Named
    datasets are read from `data_root` (default `default_data_root()`).
    """
    text = str(name_or_path).strip()
    name, _, arg = text.partition(":")
    source = SOURCES.get(name.lower())
    if source is not None:  # names win over same-named folders; write "./rome" for a path
        return source.load_named(arg, base.data_root(data_root), limit, strict)
    p = Path(text).expanduser()
    if p.exists():
        return _load_path(p, limit, strict)
    if any(c in text for c in "/\\") or p.suffix:
        raise DatasetError(f"facts file not found: {p} does not exist. Check the path.")
    raise DatasetError(
        f"unknown dataset {text!r}. Valid names: {', '.join(DATASET_NAMES)} "
        "(with options like 'pararel:P36', 'lre:country_capital_city', 'templama:test'), "
        "or a path to a .csv/.jsonl file of your own facts."
    )


def _load_path(p: Path, limit: int | None, strict: bool) -> list[Fact]:
    """Detect the format of a file or folder and load it with the first source that recognises it."""
    peek = lru_cache(maxsize=None)(_peek)
    for source in DETECTION_ORDER:
        if source.detect(p, peek):
            return source.load_path(p, limit, strict)
    if p.is_dir():
        raise DatasetError(
            f"{p}: cannot tell which dataset this folder holds. Expected a PARAREL folder "
            "(templates/ and facts/), a TempLAMA folder (val.jsonl), a ROME folder "
            "(known_1000.json) or an LRE folder (*.json relation files)."
        )
    raise DatasetError(f"{p}: unknown file type {p.suffix.lower()!r}; use .csv, .jsonl or .json")


def _peek(p: Path) -> Any:
    """A file's parsed content for detection: the JSON of a .json file, the first object of a JSON-lines
    file (a DatasetError when it is empty), None for anything else."""
    suffix = p.suffix.lower()
    if not p.is_file():
        return None
    if suffix == ".json":
        return read_json(p)
    if suffix in (".jsonl", ".ndjson", ".txt", ""):
        for _, obj in read_jsonl(p):
            return obj
        raise DatasetError(f"{p}: the file is empty")
    return None
