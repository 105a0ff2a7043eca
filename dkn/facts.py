"""Facts: the one fact type used everywhere in `dkn`, our built-in facts, and
loaders for real fact datasets.

This module owns:

* `Fact` -- a frozen record: a subject, a relation, one or more valid answers and
  one or more left-to-right cloze prompts whose continuation is the answer
  ("The capital of France is" -> "Paris").  Prompts never end with a space and
  answers never start with one; the model is expected to continue with
  " " + answer.
* `builtin_facts()` -- our own hand-written facts (`dkn/data/builtin_facts.json`),
  each relation with several paraphrase templates, marked with whether the
  default model answers them (`scripts/mark_known_facts.py` measures that).
* Loaders for real datasets, kept outside the project (default folder:
  `$DKN_DATA`, else `../shared/data` next to the repository):
  `load_pararel`, `load_rome`, `load_lre`, `load_templama`, plus
  `load_user_file` for the user's own CSV / JSONL, and `load_dataset`, which
  takes a dataset name ("pararel:P36", "lre:country_capital_city", ...) or a
  path and picks the right loader.

Every loader returns facts in a deterministic order.  Problems are reported as
`DatasetError` (a `ValueError`) with a message that says what to do.  A row
with missing fields is skipped with a logged warning by default (the number
skipped is logged once per file); pass `strict=True` to raise instead.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

log = logging.getLogger(__name__)

__all__ = [
    "Fact",
    "DatasetError",
    "DATASET_NAMES",
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

#: Names `load_dataset` accepts (each may take a ":..." suffix, see there).
DATASET_NAMES = ("builtin", "pararel", "rome", "lre", "templama")

#: Where our hand-written facts live.
BUILTIN_FACTS_PATH = Path(__file__).resolve().parent / "data" / "builtin_facts.json"

_SOURCES = ("builtin", "pararel", "rome", "lre", "templama", "user")


class DatasetError(ValueError):
    """A fact file is missing, unreadable, malformed, or a dataset name is unknown."""


# --------------------------------------------------------------------------- #
# The fact type
# --------------------------------------------------------------------------- #


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


# --------------------------------------------------------------------------- #
# Shared helpers
# --------------------------------------------------------------------------- #


def default_data_root() -> Path:
    """`$DKN_DATA` if set, else `../shared/data` relative to the repository root
    (the parent of the `dkn` package folder)."""
    env = os.environ.get("DKN_DATA")
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parent.parent
    return (repo_root.parent / "shared" / "data").resolve()


def _root(data_root: str | os.PathLike | None) -> Path:
    return Path(data_root).expanduser() if data_root is not None else default_data_root()


def _need(path: Path, what: str, kind: str) -> Path:
    """`path` if it exists and is a `kind` ("file" or "folder"), else a DatasetError saying what to do."""
    if not path.exists():
        raise DatasetError(
            f"{what} not found: {path} does not exist. Give the right {kind}, or set DKN_DATA "
            f"to the folder that holds the datasets (default {default_data_root()})."
        )
    if not (path.is_file() if kind == "file" else path.is_dir()):
        raise DatasetError(f"{what}: {path} is not a {kind}.")
    return path


def _need_file(path: Path, what: str) -> Path:
    return _need(path, what, "file")


def _need_dir(path: Path, what: str) -> Path:
    return _need(path, what, "folder")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: cannot read it as UTF-8 text ({e}); save the file as UTF-8.") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read it ({e.strerror or e}).") from None


def _read_json(path: Path) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{path}: corrupt JSON at line {e.lineno}, column {e.colno}: {e.msg}. "
            "Fix or re-download the file."
        ) from None


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed object) for each non-blank line."""
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(
                f"{path}: corrupt JSON on line {lineno} (column {e.colno}): {e.msg}. "
                "Each line must be one JSON object; fix or re-download the file."
            ) from None


class _BadRows:
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

    def summary(self) -> None:
        if self.count:
            log.warning("%s: skipped %d bad %s(s)", self.path, self.count, self.unit)


def _clean_prompt(p: str) -> str:
    return " ".join(p.split())  # collapse whitespace, no trailing space


def _clean_answer(a: str) -> str:
    return a.strip()


def _limit(facts: list[Fact], limit: int | None) -> list[Fact]:
    if limit is None:
        return facts
    if limit < 0:
        raise DatasetError(f"limit must be >= 0, got {limit}")
    return facts[:limit]


def _rel_sort_key(rel: str) -> tuple:
    m = re.fullmatch(r"P(\d+)", rel)
    return (0, int(m.group(1)), rel) if m else (1, 0, rel)


_UNICODE_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})(?:\\u([dD][c-fC-F][0-9a-fA-F]{2}))?")


def _decode_escapes(s: str) -> str:
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


def _fill(template: str, subject: str) -> str:
    """Put the subject into a template ("{subject}" or "{}"); capitalise the start."""
    p = template.replace("{subject}", subject).replace("{}", subject)
    p = _clean_prompt(p)
    return p[:1].upper() + p[1:]


def _check_unique(facts: Iterable[Fact], where: str) -> None:
    seen: set[str] = set()
    for f in facts:
        if f.id in seen:
            raise DatasetError(f"{where}: duplicate fact id {f.id!r}; fact ids must be unique.")
        seen.add(f.id)


# --------------------------------------------------------------------------- #
# Built-in facts
# --------------------------------------------------------------------------- #


def builtin_facts(known_only: bool = False, path: str | os.PathLike | None = None) -> list[Fact]:
    """Our hand-written facts, in file order (relation by relation).

    The data file maps each relation to its paraphrase templates
    ("The capital of {subject} is") and its facts (subject, answer or answers,
    known_by_default).  `known_only=True` keeps the facts the default model
    answers on the first prompt.
    """
    p = Path(path) if path is not None else BUILTIN_FACTS_PATH
    data = _read_json(_need_file(p, "built-in facts file"))
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
                    answers=tuple(_clean_answer(a) for a in answers),
                    prompts=tuple(_fill(t, subject) for t in templates),
                    source="builtin",
                    known_by_default=item.get("known_by_default"),
                )
            )
    _check_unique(facts, str(p))
    if known_only:
        facts = [f for f in facts if f.known_by_default]
    return facts


# --------------------------------------------------------------------------- #
# PARAREL
# --------------------------------------------------------------------------- #

_Y_AT_END = re.compile(r"\s*\[Y\]\s*\.?\s*$")


def _pararel_prompt_templates(path: Path, bad: _BadRows) -> list[str]:
    """Templates of one relation whose [Y] ends the sentence, with [Y] and the
    final " ." stripped, [X] kept as the subject slot."""
    out = []
    for lineno, obj in _read_jsonl(path):
        if not bad.require(lineno, obj, ["pattern"]):
            continue
        pattern = obj["pattern"]
        if "[X]" not in pattern or not _Y_AT_END.search(pattern) or pattern.count("[Y]") != 1:
            continue
        t = _Y_AT_END.sub("", pattern)
        if t not in out:
            out.append(t)
    return out


def _grouped_facts(pairs, relation: str, source: str, prompts_for) -> list[Fact]:
    """One Fact per subject of (subject, answer) pairs, all of its distinct answers in first-seen order;
    prompts_for(subject) gives its prompts."""
    grouped: dict[str, list[str]] = {}
    for subject, answer in pairs:
        answers = grouped.setdefault(subject, [])
        if answer not in answers:
            answers.append(answer)
    return [Fact(id=f"{source}/{relation}/{subject}", subject=subject, relation=relation, answers=tuple(answers),
                 prompts=prompts_for(subject), source=source) for subject, answers in grouped.items()]


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
    root_p = _need_dir(Path(root) if root is not None else default_data_root() / "pararel", "PARAREL folder")
    tdir = _need_dir(root_p / "templates", "PARAREL templates folder")
    fdir = _need_dir(root_p / "facts", "PARAREL facts folder")
    available = sorted((p.stem for p in tdir.glob("P*.jsonl")), key=_rel_sort_key)
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
    for rel in sorted(wanted, key=_rel_sort_key):
        tbad = _BadRows(tdir / f"{rel}.jsonl", strict)
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
        fbad = _BadRows(fpath, strict)
        pairs = [(obj["sub_label"].strip(), _clean_answer(obj["obj_label"]))
                 for lineno, obj in _read_jsonl(fpath) if fbad.require(lineno, obj, ["sub_label", "obj_label"])]
        fbad.summary()
        facts += _grouped_facts(pairs, rel, "pararel",
                                lambda sub: tuple(_clean_prompt(t.replace("[X]", sub)) for t in templates))
        if limit is not None and len(facts) >= limit:
            break
    return _limit(facts, limit)


# --------------------------------------------------------------------------- #
# ROME (CounterFact known_1000)
# --------------------------------------------------------------------------- #


def load_rome(path: str | os.PathLike | None = None, limit: int | None = None, strict: bool = False) -> list[Fact]:
    """ROME's `known_1000.json`: one prompt per fact (the record's `prompt`),
    answer = `attribute`, relation = `relation_id`.  In file order.
    `path` defaults to `<data root>/rome/known_1000.json`; a folder is searched
    for `known_1000.json`."""
    p = Path(path) if path is not None else default_data_root() / "rome" / "known_1000.json"
    if p.is_dir():
        p = p / "known_1000.json"
    data = _read_json(_need_file(p, "ROME known_1000.json"))
    if not isinstance(data, list):
        raise DatasetError(f"{p}: expected a JSON list of records (ROME known_1000.json format)")
    bad = _BadRows(p, strict, unit="record")
    facts: list[Fact] = []
    seen: set[str] = set()
    for i, rec in enumerate(data):
        if not bad.require(i, rec, ["subject", "attribute", "prompt"]):
            continue
        fid = f"rome/{rec.get('known_id', i)}"
        if fid in seen:
            bad.bad(i, f"duplicate known_id {rec.get('known_id')!r}")
            continue
        seen.add(fid)
        facts.append(
            Fact(
                id=fid,
                subject=rec["subject"],
                relation=str(rec.get("relation_id") or rec.get("template") or "unknown"),
                answers=(_clean_answer(rec["attribute"]),),
                prompts=(_clean_prompt(rec["prompt"]),),
                source="rome",
            )
        )
        if limit is not None and len(facts) >= limit:
            break
    bad.summary()
    return _limit(facts, limit)


# --------------------------------------------------------------------------- #
# LRE (Hernandez et al., relations/data/factual)
# --------------------------------------------------------------------------- #


def _lre_files(p: Path) -> list[Path]:
    if p.is_dir():
        files = sorted(p.glob("*.json"))
        if not files:
            raise DatasetError(f"LRE folder {p} holds no *.json relation files.")
        return files
    return [_need_file(p, "LRE relation file")]


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
    p = Path(path_or_dir) if path_or_dir is not None else default_data_root() / "lre"
    if not p.exists():
        _need_dir(p, "LRE data")
    files = _lre_files(p)
    if relations is not None:
        if isinstance(relations, str):
            relations = [r.strip() for r in relations.split(",") if r.strip()]
        names = {f.stem: f for f in files}
        missing = [r for r in relations if r not in names]
        if missing:
            raise DatasetError(
                f"LRE has no relation {', '.join(map(repr, missing))} in {p}. "
                f"Available: {', '.join(sorted(names))}"
            )
        files = [names[r] for r in dict.fromkeys(relations)]
    facts: list[Fact] = []
    for f in files:
        data = _read_json(f)
        if not isinstance(data, dict) or "samples" not in data:
            raise DatasetError(f"{f}: not an LRE relation file (needs 'prompt_templates' and 'samples')")
        templates = [t for t in (data.get("prompt_templates") or []) if isinstance(t, str) and "{}" in t]
        if not templates:
            raise DatasetError(f"{f}: no 'prompt_templates' with a '{{}}' subject slot")
        rel = f.stem
        bad = _BadRows(f, strict, unit="sample")
        pairs = [(_decode_escapes(row["subject"]).strip(), _clean_answer(_decode_escapes(row["object"])))
                 for i, row in enumerate(data.get("samples") or []) if bad.require(i, row, ["subject", "object"])]
        bad.summary()
        facts += _grouped_facts(pairs, rel, "lre", lambda sub: tuple(_fill(t, sub) for t in templates))
        if limit is not None and len(facts) >= limit:
            break
    return _limit(facts, limit)


# --------------------------------------------------------------------------- #
# TempLAMA
# --------------------------------------------------------------------------- #

# The relation phrase after the subject in TempLAMA queries ("Tom Brady plays for _X_.").
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
    return _clean_prompt(m.group(1))


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
    p = Path(path) if path is not None else default_data_root() / "templama" / "val.jsonl"
    if p.is_dir():
        p = p / "val.jsonl"
    _need_file(p, "TempLAMA file")
    bad = _BadRows(p, strict)
    facts: list[Fact] = []
    seen: set[str] = set()
    not_cloze = 0
    for lineno, obj in _read_jsonl(p):
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
            answers = (_clean_answer(obj["obj_label"]),)
            wrong = obj.get("wrong_fact") or []
            wrong = tuple(_clean_answer(w) for w in ([wrong] if isinstance(wrong, str) else wrong) if w)
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
        if fid in seen:
            bad.bad(lineno, f"duplicate id {fid!r}")
            continue
        seen.add(fid)
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
    return _limit(facts, limit)


# --------------------------------------------------------------------------- #
# The user's own file
# --------------------------------------------------------------------------- #


def _split_list(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return [str(x) for x in v if x is not None and str(x).strip()]
    return [x for x in str(v).split("|") if x.strip()]


def _user_rows(p: Path) -> Iterator[tuple[int, Any]]:
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv"):
        text = _read_text(p)
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
        data = _read_json(p)
        if isinstance(data, dict) and isinstance(data.get("facts"), list):
            data = data["facts"]
        if not isinstance(data, list):
            raise DatasetError(f"{p}: expected a JSON list of objects with 'prompt' and 'answer'")
        yield from enumerate(data, start=1)
    else:
        yield from _read_jsonl(p)


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
    p = _need_file(Path(path).expanduser(), "facts file")
    unit = "record" if p.suffix.lower() == ".json" else "line"
    bad = _BadRows(p, strict, unit=unit)
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
            prompts = [_clean_prompt(x.replace("{subject}", subject).replace("{}", subject)) for x in prompts]
        elif any("{subject}" in x or "{}" in x for x in prompts):
            bad.bad(row, "prompt has a {subject} slot but the row has no 'subject'")
            continue
        else:
            prompts = [_clean_prompt(x) for x in prompts]
        fid = str(obj.get("id") or "").strip() or f"{p.stem}/{row}"
        if fid in seen:
            bad.bad(row, f"duplicate id {fid!r}")
            continue
        seen.add(fid)
        known = obj.get("known_by_default")
        if isinstance(known, str):
            known = {"true": True, "false": False}.get(known.strip().lower())
        facts.append(
            Fact(
                id=fid,
                subject=subject,
                relation=str(obj.get("relation") or "").strip() or "user",
                answers=tuple(_clean_answer(a) for a in answers),
                prompts=tuple(prompts),
                source="user",
                known_by_default=known if isinstance(known, bool) else None,
                wrong_answers=tuple(_clean_answer(a) for a in _split_list(obj.get("wrong_answers"))),
            )
        )
        if limit is not None and len(facts) >= limit:
            break
    bad.summary()
    return _limit(facts, limit)


# --------------------------------------------------------------------------- #
# One entry point
# --------------------------------------------------------------------------- #


def _first_jsonl_object(p: Path) -> Any:
    for _, obj in _read_jsonl(p):
        return obj
    raise DatasetError(f"{p}: the file is empty")


def _load_path(p: Path, limit: int | None, strict: bool) -> list[Fact]:
    """Detect the format of a file or folder and load it."""
    if p.is_dir():
        if (p / "templates").is_dir() and (p / "facts").is_dir():
            return load_pararel(p, limit=limit, strict=strict)
        if (p / "val.jsonl").is_file():
            return load_templama(p, limit=limit, strict=strict)
        if (p / "known_1000.json").is_file():
            return load_rome(p, limit=limit, strict=strict)
        jsons = sorted(p.glob("*.json"))
        if jsons and all(isinstance(d, dict) and "prompt_templates" in d for d in (_read_json(j) for j in jsons[:1])):
            return load_lre(p, limit=limit, strict=strict)
        raise DatasetError(
            f"{p}: cannot tell which dataset this folder holds. Expected a PARAREL folder "
            "(templates/ and facts/), a TempLAMA folder (val.jsonl), a ROME folder "
            "(known_1000.json) or an LRE folder (*.json relation files)."
        )
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return load_user_file(p, limit=limit, strict=strict)
    if suffix == ".json":
        data = _read_json(p)
        if isinstance(data, dict) and "prompt_templates" in data and "samples" in data:
            return load_lre(p, limit=limit, strict=strict)
        if isinstance(data, dict) and "relations" in data:
            return _limit(builtin_facts(path=p), limit)
        if isinstance(data, list) and data and isinstance(data[0], dict) and "attribute" in data[0] and "known_id" in data[0]:
            return load_rome(p, limit=limit, strict=strict)
        return load_user_file(p, limit=limit, strict=strict)
    if suffix in (".jsonl", ".ndjson", ".txt", ""):
        first = _first_jsonl_object(p)
        if isinstance(first, dict):
            if "query" in first or ("sentences" in first and "obj_label" in first):
                return load_templama(p, limit=limit, strict=strict)
            if "pattern" in first or "sub_label" in first:
                raise DatasetError(
                    f"{p} is one PARAREL file; give the PARAREL folder (with templates/ and facts/), "
                    f"or the name 'pararel:{p.stem}'."
                )
        return load_user_file(p, limit=limit, strict=strict)
    raise DatasetError(f"{p}: unknown file type {suffix!r}; use .csv, .jsonl or .json")


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
    key = name.lower()
    if key in DATASET_NAMES:  # names win over same-named folders; write "./rome" for a path
        root = _root(data_root)
        if key == "builtin":
            if arg:
                facts = [f for f in builtin_facts() if f.relation in arg.split(",")]
                if not facts:
                    rels = sorted({f.relation for f in builtin_facts()})
                    raise DatasetError(f"no built-in relation {arg!r}; built-in relations: {', '.join(rels)}")
                return _limit(facts, limit)
            return _limit(builtin_facts(), limit)
        if key == "pararel":
            return load_pararel(root / "pararel", relations=arg or None, limit=limit, strict=strict)
        if key == "rome":
            return load_rome(root / "rome" / "known_1000.json", limit=limit, strict=strict)
        if key == "lre":
            return load_lre(root / "lre", relations=arg or None, limit=limit, strict=strict)
        if key == "templama":
            fname = _TEMPLAMA_FILES.get(arg.lower() or "val")
            if fname is None:
                raise DatasetError(
                    f"unknown TempLAMA part {arg!r}; use one of: {', '.join(sorted(_TEMPLAMA_FILES))}"
                )
            return load_templama(root / "templama" / fname, limit=limit, strict=strict)
    p = Path(text).expanduser()
    if p.exists():
        return _load_path(p, limit, strict)
    looks_like_path = any(c in text for c in "/\\") or bool(p.suffix)
    if looks_like_path:
        raise DatasetError(f"facts file not found: {p} does not exist. Check the path.")
    raise DatasetError(
        f"unknown dataset {text!r}. Valid names: {', '.join(DATASET_NAMES)} "
        "(with options like 'pararel:P36', 'lre:country_capital_city', 'templama:test'), "
        "or a path to a .csv/.jsonl file of your own facts."
    )
