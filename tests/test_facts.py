"""Facts: the Fact type, our built-in facts, and loaders on the real datasets
in ../shared/data (or $DKN_DATA)."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from collections import Counter

import pytest

from dkn.datasets import (
    DATASET_NAMES,
    DatasetError,
    Fact,
    builtin_facts,
    default_data_root,
    load_dataset,
    load_lre,
    load_pararel,
    load_rome,
    load_templama,
    load_user_file,
)

DATA = default_data_root()
needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"real datasets not found at {DATA} (set DKN_DATA to the shared/data folder)"
)


# --------------------------------------------------------------------------- Fact


def test_fact_is_frozen_and_has_main_answer_and_prompt():
    f = Fact("x/1", "France", "capital", ["Paris", "paris"], ["The capital of France is"], "user")
    assert f.answers == ("Paris", "paris") and isinstance(f.prompts, tuple)
    assert f.answer == "Paris" and f.prompt == "The capital of France is"
    assert f.known_by_default is None and f.wrong_answers == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.subject = "Spain"  # type: ignore[misc]
    assert hash(f) == hash(Fact("x/1", "France", "capital", ("Paris", "paris"), ("The capital of France is",), "user"))
    with pytest.raises(ValueError):
        Fact("x/2", "France", "capital", (), ("p",), "user")


# --------------------------------------------------------------------------- built-in


def test_builtin_facts_are_many_varied_and_well_formed():
    facts = builtin_facts()
    assert len(facts) >= 150
    by_rel = Counter(f.relation for f in facts)
    assert len(by_rel) >= 10
    assert len({f.id for f in facts}) == len(facts)
    for f in facts:
        assert f.source == "builtin" and f.id == f"builtin/{f.relation}/{f.subject}"
        assert len(f.prompts) >= 3, f.id
        assert len(set(f.prompts)) == len(f.prompts), f.id
        for p in f.prompts:
            assert p == p.strip() and "{" not in p and f.subject.lower() in p.lower(), p
        assert all(a == a.strip() for a in f.answers)
        assert isinstance(f.known_by_default, bool), f"{f.id} was not measured"
    known = builtin_facts(known_only=True)
    assert len(known) >= 100 and all(f.known_by_default for f in known)
    paris = next(f for f in facts if f.id == "builtin/capital/France")
    assert paris.answer == "Paris" and paris.prompt == "The capital of France is"
    assert load_dataset("builtin") == facts
    assert load_dataset("builtin", limit=5) == facts[:5]


# --------------------------------------------------------------------------- PARAREL


@needs_data
def test_pararel_capital_prompts_and_grouped_answers():
    facts = load_pararel(DATA / "pararel", relations=["P36"])
    assert {f.relation for f in facts} == {"P36"}
    # 471 rows, 463 distinct subjects: objects of one subject are grouped
    assert len(facts) == 463
    cook = next(f for f in facts if f.subject == "Cook County")
    assert cook.id == "pararel/P36/Cook County" and cook.source == "pararel"
    assert cook.answers == ("Chicago",)
    assert cook.prompt == "The capital of Cook County is"
    assert "The capital city of Cook County is" in cook.prompts
    assert all("[" not in p and not p.endswith((" ", ".")) for p in cook.prompts)
    assert len(cook.prompts) == 8  # 8 of the 14 P36 templates end with [Y]
    assert any(len(f.answers) > 1 for f in facts)
    assert load_dataset("pararel:P36", data_root=DATA) == facts


@needs_data
def test_pararel_all_relations_skip_those_with_too_few_templates():
    facts = load_pararel(DATA / "pararel")
    rels = {f.relation for f in facts}
    assert len(rels) == 35
    assert not rels & {"P37", "P1001", "P140", "P190", "P31", "P527"}
    assert len({f.id for f in facts}) == len(facts)
    with pytest.raises(DatasetError, match="P37 has 1 template"):
        load_pararel(DATA / "pararel", relations="P37")
    with pytest.raises(DatasetError, match="Relations with templates"):
        load_pararel(DATA / "pararel", relations="P9999")
    assert len(load_pararel(DATA / "pararel", limit=10)) == 10


# --------------------------------------------------------------------------- ROME / LRE / TempLAMA


@needs_data
def test_rome_known_1000():
    path = DATA / "rome" / "known_1000.json"
    records = json.loads(path.read_text())
    facts = load_rome(path)
    assert len(facts) == len(records) == 1209
    for f, r in zip(facts, records):
        assert f.prompts == (r["prompt"],)
        assert f.answer == r["attribute"] and f.subject == r["subject"] and f.relation == r["relation_id"]
    assert facts[0].id == "rome/0" and facts[0].prompt == "Vinson Massif is located in the continent of"
    assert load_dataset("rome", data_root=DATA, limit=3) == facts[:3]


@needs_data
def test_lre_decodes_double_escaped_objects():
    facts = load_lre(DATA / "lre" / "country_capital_city.json")
    brazil = next(f for f in facts if f.subject == "Brazil")
    assert brazil.answer == "Brasília"
    assert brazil.prompts == ("The capital city of Brazil is", "The capital of Brazil is")
    assert brazil.id == "lre/country_capital_city/Brazil" and brazil.relation == "country_capital_city"
    assert next(f for f in facts if f.subject == "Colombia").answer == "Bogotá"
    assert not any("\\u" in a for f in load_lre(DATA / "lre") for a in f.answers)
    assert load_dataset("lre:country_capital_city", data_root=DATA) == facts
    everything = load_dataset("lre", data_root=DATA)
    assert {f.relation for f in everything} == {p.stem for p in (DATA / "lre").glob("*.json")}
    assert len({f.id for f in everything}) == len(everything)
    with pytest.raises(DatasetError, match="country_capital_city"):
        load_dataset("lre:no_such_relation", data_root=DATA)


@needs_data
def test_templama_val_prompts_and_answers():
    facts = load_templama(DATA / "templama" / "val.jsonl")
    # 4654 queries, 1066 start with _X_ (not a left-to-right cloze)
    assert len(facts) == 4654 - 1066
    assert all("_X_" not in p for f in facts for p in f.prompts)
    f = facts[0]
    assert f.prompt == "In 2010, Gianluigi Buffon plays for"
    assert f.answers == ("Juventus FC", "Italy national association football team")
    assert f.subject == "Gianluigi Buffon" and f.relation == "P54" and f.id == "templama/Q68060_P54_2010"
    assert {x.relation for x in facts} == {"P54", "P108", "P39", "P102", "P127", "P69"}
    assert load_dataset("templama", data_root=DATA, limit=2) == facts[:2]


@needs_data
def test_templama_answerable_and_wrong_facts():
    answerable = load_dataset("templama:test", data_root=DATA)
    assert len(answerable) == 251 - 23
    assert answerable[0].prompt == "In 2010, Tom Brady plays for"
    assert answerable[0].answer == "New England Patriots"
    wrong = load_templama(DATA / "templama" / "wrong_facts.jsonl")
    w = wrong[0]
    assert w.prompt == "In 2010, Valentino Rossi plays for"
    assert w.answers == ("Yamaha Motor Racing",) and w.wrong_answers == ("Ducati Motor Holding S.p.A.",)
    assert w.subject == "Valentino Rossi" and w.relation == "P54"
    assert all(f.wrong_answers for f in wrong[:100])
    assert load_dataset(str(DATA / "templama" / "wrong_facts.jsonl"), limit=1) == wrong[:1]


@needs_data
def test_load_dataset_detects_formats_from_paths():
    assert load_dataset(DATA / "rome" / "known_1000.json", limit=2)[0].source == "rome"
    assert load_dataset(DATA / "lre", limit=2)[0].source == "lre"
    assert load_dataset(DATA / "pararel", limit=2)[0].source == "pararel"
    assert load_dataset(DATA / "templama", limit=2)[0].source == "templama"
    with pytest.raises(DatasetError, match="PARAREL folder"):
        load_dataset(DATA / "pararel" / "facts" / "P36.jsonl")


def test_default_data_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DKN_DATA", str(tmp_path))
    assert default_data_root() == tmp_path
    with pytest.raises(DatasetError, match="not found"):
        load_dataset("rome")


# --------------------------------------------------------------------------- user files


FACTS = [
    {"prompt": "The capital of France is", "answer": "Paris", "subject": "France", "relation": "capital", "id": "c1"},
    {"prompts": ["{subject} is a city in", "The city of {subject} is in"], "answer": "Japan", "subject": "Tokyo"},
]


def test_user_jsonl_round_trip(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in FACTS) + "\n\n")
    facts = load_user_file(p)
    assert [f.id for f in facts] == ["c1", "mine/2"]
    assert facts[0] == Fact("c1", "France", "capital", ("Paris",), ("The capital of France is",), "user")
    assert facts[1].prompts == ("Tokyo is a city in", "The city of Tokyo is in")
    assert facts[1].relation == "user" and facts[1].answer == "Japan"
    assert load_dataset(str(p)) == facts


def test_user_csv_round_trip_with_pipes(tmp_path):
    p = tmp_path / "mine.csv"
    with p.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "answer", "subject", "relation"])
        w.writerow(["The capital of France is |The capital city of France is ", " Paris|paris", "France", "capital"])
        w.writerow(["Tokyo is a city in", "Japan", "", ""])
    facts = load_dataset(p)
    assert len(facts) == 2
    assert facts[0].prompts == ("The capital of France is", "The capital city of France is")
    assert facts[0].answers == ("Paris", "paris")
    assert facts[0].id == "mine/2" and facts[1].id == "mine/3"  # line numbers, header = line 1
    assert facts[1].subject == "" and facts[1].relation == "user"


def test_bad_rows_are_skipped_with_a_warning_or_raise_when_strict(tmp_path, caplog):
    p = tmp_path / "bad.jsonl"
    rows = [
        FACTS[0],
        {"prompt": "The capital of Spain is"},
        {"answer": "Rome"},
        {"prompt": "Berlin is in", "answer": "Germany"},
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows))
    with caplog.at_level(logging.WARNING, logger="dkn.datasets"):
        facts = load_user_file(p)
    assert [f.answer for f in facts] == ["Paris", "Germany"]
    text = caplog.text
    assert "line 2: missing field 'answer'" in text and "line 3: missing field 'prompt'" in text
    assert "skipped 2 bad line(s)" in text
    with pytest.raises(DatasetError, match=r"line 2: missing field 'answer'"):
        load_user_file(p, strict=True)

    c = tmp_path / "bad.csv"
    c.write_text("prompt,answer\nThe capital of France is,Paris\nThe capital of Spain is,\n")
    assert len(load_user_file(c)) == 1
    with pytest.raises(DatasetError, match=r"line 3: missing field 'answer'"):
        load_user_file(c, strict=True)


def test_bad_rows_in_dataset_files(tmp_path):
    root = tmp_path / "pararel"
    (root / "templates").mkdir(parents=True)
    (root / "facts").mkdir()
    (root / "templates" / "P36.jsonl").write_text(
        '{"pattern": "The capital of [X] is [Y] ."}\n{"pattern": "[X] has its capital in [Y]."}\n'
        '{"pattern": "[Y] is the capital of [X]."}\n'
    )
    (root / "facts" / "P36.jsonl").write_text('{"sub_label": "France", "obj_label": "Paris"}\n{"sub_label": "Spain"}\n')
    facts = load_pararel(root)
    assert len(facts) == 1 and facts[0].prompts == ("The capital of France is", "France has its capital in")
    with pytest.raises(DatasetError, match=r"P36.jsonl: line 2: missing field 'obj_label'"):
        load_pararel(root, strict=True)


def test_repeated_fact_ids_keep_the_first_row_and_report_the_rest(tmp_path, caplog):
    rome = tmp_path / "known_1000.json"
    rec = {"subject": "France", "attribute": "Paris", "prompt": "The capital of France is", "known_id": 7}
    rome.write_text(json.dumps([rec, {**rec, "attribute": "Lyon"}]))
    tl = tmp_path / "val.jsonl"
    row = {"query": "Buffon plays for _X_.", "answer": [{"name": "Juventus FC"}], "date": "2010", "id": "Q1"}
    tl.write_text("\n".join(json.dumps(r) for r in (row, {**row, "answer": [{"name": "Parma"}]})))
    user = tmp_path / "facts.jsonl"
    fact = {"id": "f1", "prompt": "Berlin is in", "answer": "Germany"}
    user.write_text("\n".join(json.dumps(r) for r in (fact, {**fact, "answer": "Europe"})))
    cases = [
        (load_rome, rome, "record 1: duplicate known_id 7"),
        (load_templama, tl, "line 2: duplicate id 'templama/Q1'"),
        (load_user_file, user, "line 2: duplicate id 'f1'"),
    ]
    for load, path, problem in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dkn.datasets"):
            facts = load(path)
        assert len(facts) == 1 and facts[0].answer in ("Paris", "Juventus FC", "Germany"), load.__name__
        assert problem in caplog.text, load.__name__
        with pytest.raises(DatasetError, match=problem):
            load(path, strict=True)


def test_corrupt_json_names_the_line(tmp_path):
    p = tmp_path / "broken.jsonl"
    p.write_text(json.dumps(FACTS[0]) + "\n" + json.dumps(FACTS[1]) + '\n{"prompt": "oops",\n')
    with pytest.raises(DatasetError, match="line 3"):
        load_dataset(p)
    q = tmp_path / "broken.json"
    q.write_text('[\n {"known_id": 0,\n  "subject": "x"\n  "attribute": "y"}\n]')
    with pytest.raises(DatasetError, match="corrupt JSON at line 4"):
        load_rome(q)


def test_missing_file_and_unknown_name_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope.csv")
    with pytest.raises(DatasetError, match="does not exist"):
        load_rome(tmp_path / "nope.json")
    with pytest.raises(DatasetError) as e:
        load_dataset("wikipedia")
    for name in DATASET_NAMES:
        assert name in str(e.value)
    assert isinstance(e.value, ValueError)


def test_named_sources_come_from_the_registry(monkeypatch, tmp_path):
    """load_dataset dispatches through datasets.SOURCES (no if-chain): a registered source is found by name,
    gets its ':' argument and the data root, and detection asks each source in DETECTION_ORDER."""
    import types

    import dkn.datasets as datasets

    assert tuple(datasets.SOURCES) == DATASET_NAMES == ("builtin", "pararel", "rome", "lre", "templama")
    fact = Fact(id="toy/1", subject="x", relation="r", answers=("y",), prompts=("x is",), source="user")
    calls = []
    toy = types.SimpleNamespace(
        load_named=lambda arg, root, limit, strict: calls.append((arg, root, limit, strict)) or [fact],
        detect=lambda p, peek: p.suffix == ".toy",
        load_path=lambda p, limit, strict: [fact, fact][:limit],
    )
    monkeypatch.setitem(datasets.SOURCES, "toy", toy)
    assert load_dataset("toy:a,b", limit=3, data_root=tmp_path) == [fact]
    assert calls == [("a,b", tmp_path, 3, False)]
    monkeypatch.setattr(datasets, "DETECTION_ORDER", (toy, *datasets.DETECTION_ORDER))
    (tmp_path / "facts.toy").write_text("anything")
    assert load_dataset(str(tmp_path / "facts.toy"), limit=1) == [fact]
