"""What every dataset loader shares: the `Fact` type, `DatasetError`, reading files with messages that
say what to do, skipping bad rows, and cleaning prompts and answers.

Prompts never end with a space and answers never start with one; the model is expected to continue
with " " + answer.  Problems are `DatasetError`s; a row with missing fields is skipped with a logged
warning (counted once per file) unless `strict=True`, which raises instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dkn import paths
from dkn.errors import DknError

log = logging.getLogger("dkn.datasets")


class DatasetError(DknError, ValueError):
    """A fact file is missing, unreadable, malformed, or a dataset name is unknown."""


@dataclass(frozen=True)
class Fact:
    """One fact, asked as one or more left-to-right cloze prompts.

    `answers[0]` is the main answer; the others are also accepted.  Answers
    carry no leading space ("Paris"), prompts no trailing space
    ("The capital of France is").  Lists passed in are stored as tuples.
    """

    id: str  # stable, unique within a dataset, e.g. "builtin/capital/France"
    subject: str
    relation: str  # e.g. "capital" or a Wikidata id "P36"
    answers: tuple[str, ...]  # valid answers, first = the main one
    prompts: tuple[str, ...]  # cloze prompts whose continuation is the answer
    source: str  # "builtin", "pararel", "rome", "lre", "templama", "user"
    known_by_default: bool | None = None  # measured on the default model (top-1 = first answer token)
    wrong_answers: tuple[str, ...] = field(default=())  # for fact-checking (TempLAMA wrong facts)

    def __post_init__(self) -> None:
        for name in ("answers", "prompts", "wrong_answers"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        if not self.answers or not all(isinstance(a, str) and a.strip() for a in self.answers):
            raise ValueError(f"fact {self.id!r}: needs at least one non-empty answer, got {self.answers!r}")
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise ValueError(f"fact {self.id!r}: needs at least one non-empty prompt, got {self.prompts!r}")

    @property
    def answer(self) -> str:
        """The main answer (no leading space)."""
        return self.answers[0]

    @property
    def prompt(self) -> str:
        """The first (main) prompt."""
        return self.prompts[0]


def data_root(data_root: str | os.PathLike | None = None) -> Path:
    """`data_root` if given, else `dkn.paths.data_root()` (`$DKN_DATA`, else `../shared/data` next to
    the checkout)."""
    return Path(data_root).expanduser() if data_root is not None else paths.data_root()


def need(path: Path, what: str, kind: str) -> Path:
    """`path` if it exists and is a `kind` ("file" or "folder"), else a DatasetError saying what to do."""
    if not path.exists():
        raise DatasetError(
            f"{what} not found: {path} does not exist. Give the right {kind}, or set DKN_DATA "
            f"to the folder that holds the datasets (default {data_root()})."
        )
    if not (path.is_file() if kind == "file" else path.is_dir()):
        raise DatasetError(f"{what}: {path} is not a {kind}.")
    return path


def need_file(path: Path, what: str) -> Path:
    return need(path, what, "file")


def need_dir(path: Path, what: str) -> Path:
    return need(path, what, "folder")


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: cannot read it as UTF-8 text ({e}); save the file as UTF-8.") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read it ({e.strerror or e}).") from None


def read_json(path: Path) -> Any:
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{path}: corrupt JSON at line {e.lineno}, column {e.colno}: {e.msg}. Fix or re-download the file."
        ) from None


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed object) for each non-blank line."""
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(
                f"{path}: corrupt JSON on line {lineno} (column {e.colno}): {e.msg}. "
                "Each line must be one JSON object; fix or re-download the file."
            ) from None


class BadRows:
    """Collects rows that are skipped (or raises at once when strict)."""

    def __init__(self, path: Path | str, strict: bool, unit: str = "line") -> None:
        self.path, self.strict, self.unit, self.count = path, strict, unit, 0

    def bad(self, row: int, problem: str) -> None:
        msg = f"{self.path}: {self.unit} {row}: {problem}"
        if self.strict:
            raise DatasetError(msg + " (strict mode: fix the row, or load without strict to skip it)")
        self.count += 1
        log.warning("%s; skipping it", msg)

    def require(self, row: int, obj: Any, fields: Sequence[str]) -> bool:
        """True if `obj` is a dict with each field present and non-empty."""
        if not isinstance(obj, dict):
            self.bad(row, f"expected a JSON object, got {type(obj).__name__}")
            return False
        for f in fields:
            v = obj.get(f)
            if v is None or (isinstance(v, (str, list, tuple)) and not (v.strip() if isinstance(v, str) else v)):
                self.bad(row, f"missing field {f!r}")
                return False
        return True

    def first_time(self, row: int, key: str, seen: set[str], problem: str) -> bool:
        """True the first time `key` turns up (it is then added to `seen`); a repeat is a bad row (`problem`)."""
        if key in seen:
            self.bad(row, problem)
            return False
        seen.add(key)
        return True

    def summary(self) -> None:
        if self.count:
            log.warning("%s: skipped %d bad %s(s)", self.path, self.count, self.unit)


def clean_prompt(p: str) -> str:
    return " ".join(p.split())  # collapse whitespace, no trailing space


def clean_answer(a: str) -> str:
    return a.strip()


def take(facts: list[Fact], limit: int | None) -> list[Fact]:
    if limit is None:
        return facts
    if limit < 0:
        raise DatasetError(f"limit must be >= 0, got {limit}")
    return facts[:limit]


def rel_sort_key(rel: str) -> tuple:
    m = re.fullmatch(r"P(\d+)", rel)
    return (0, int(m.group(1)), rel) if m else (1, 0, rel)


_UNICODE_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})(?:\\u([dD][c-fC-F][0-9a-fA-F]{2}))?")


def decode_escapes(s: str) -> str:
    r"""Turn left-over literal escapes ("Bras\\u00edlia") into characters ("Brasília")."""
    if "\\u" not in s:
        return s

    def sub(m: re.Match) -> str:
        hi = int(m.group(1), 16)
        if m.group(2) and 0xD800 <= hi <= 0xDBFF:
            lo = int(m.group(2), 16)
            return chr(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))
        return chr(hi) + (chr(int(m.group(2), 16)) if m.group(2) else "")

    return _UNICODE_ESCAPE.sub(sub, s)


def fill(template: str, subject: str) -> str:
    """Put the subject into a template ("{subject}" or "{}"); capitalise the start."""
    p = template.replace("{subject}", subject).replace("{}", subject)
    p = clean_prompt(p)
    return p[:1].upper() + p[1:]


def check_unique(facts: Iterable[Fact], where: str) -> None:
    seen: set[str] = set()
    for f in facts:
        if f.id in seen:
            raise DatasetError(f"{where}: duplicate fact id {f.id!r}; fact ids must be unique.")
        seen.add(f.id)


def grouped_facts(pairs, relation: str, source: str, prompts_for) -> list[Fact]:
    """One Fact per subject of (subject, answer) pairs, all of its distinct answers in first-seen order;
    prompts_for(subject) gives its prompts."""
    grouped: dict[str, list[str]] = {}
    for subject, answer in pairs:
        answers = grouped.setdefault(subject, [])
        if answer not in answers:
            answers.append(answer)
    return [
        Fact(
            id=f"{source}/{relation}/{subject}",
            subject=subject,
            relation=relation,
            answers=tuple(answers),
            prompts=prompts_for(subject),
            source=source,
        )
        for subject, answers in grouped.items()
    ]
