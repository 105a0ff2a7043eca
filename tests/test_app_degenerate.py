"""The Degenerate neurons page on a tiny planted model (no default model): a fact stored twice, in two layers.

Backup discovery shows both copies, the peeling curve, each group's sufficiency, R and the interactions, and
a verdict; NTC on the same knowledge neurons says which condition failed.
"""

from __future__ import annotations

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest
from test_backup import ANSWER, PROMPT, _stored_twice_in_two_layers

from tests.app_support import REPO, env_var

TIMEOUT = 120


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(cache folder, model folder): the planted model saved as a local folder, its attribution in the store."""
    root = tmp_path_factory.mktemp("dkn-degenerate-page")
    folder = root / "planted-model"
    lm = _stored_twice_in_two_layers()
    lm.model.save_pretrained(folder, safe_serialization=True)
    lm.tokenizer.save_pretrained(folder)
    with env_var("DKN_CACHE_DIR", str(root / "cache")):
        from dkn.attribution import attribute
        from dkn.cache import ResultStore
        from ui.state import Settings, get_model

        loaded = get_model(str(folder))
        attribute(loaded, PROMPT, ANSWER, Settings(steps=8).attribution_params(), store=ResultStore())
        yield root / "cache", folder


def _page(planted, monkeypatch, clusterer: str, generic=()) -> AppTest:
    from ui.state import FactChoice, Settings

    cache, folder = planted
    monkeypatch.setenv("DKN_CACHE_DIR", str(cache))
    monkeypatch.chdir(REPO)
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT)
    at.session_state["model_name"] = str(folder)
    at.run()  # the Explore page picks its default fact: replace it
    at.session_state["fact"] = FactChoice(PROMPT, ANSWER, (), "custom")
    at.session_state["settings"] = Settings(steps=8, max_prompts=1)
    at.session_state["clusterer_value"] = clusterer
    if generic:  # as the Facts compared page leaves it
        from ui.state import get_model

        at.session_state["generic_neurons"] = {
            "fingerprint": get_model(str(folder)).fingerprint,
            "neurons": set(generic),
            "facts_of": {},
            "n_facts": 3,
            "share": 0.5,
        }
    at.switch_page("app_pages/degenerate.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _text(elements) -> str:
    return " ".join(str(e.value) for e in elements)


def test_backup_discovery_shows_both_copies_peeling_sufficiency_and_interactions(planted, monkeypatch):
    at = _page(planted, monkeypatch, "backup")
    assert next(w for w in at.selectbox if w.label == "Clusterer").value == "backup"
    assert "Degenerate: any one of 2 groups can go" in _text(at.success)
    assert {m.label: m.value for m in at.metric}["Candidate groups"] == "2"
    r_value = next(m.value for m in at.metric if m.label == "Redundancy R")
    assert float(r_value) > 0.9
    specs = [c.proto.spec for c in at.get("plotly_chart")]
    assert any("round 2" in s for s in specs)  # the peeling curve, hover per round
    assert any("drop with only it left" in s for s in specs)  # sufficiency bars
    assert any("A+B" in s for s in specs)  # the interaction plot
    table = at.dataframe[0].value
    assert list(table["round"]) == [1, 2] and list(table["sufficient"]) == [True, True]
    assert set(table["neurons"]) == {"L0:N0 L0:N1", "L1:N2 L1:N3"}
    assert list(table["generic"]) == ["—", "—"]  # no facts compared yet
    assert "✅ at least 2 groups can each be switched off alone" in _text(at.markdown)


def test_ntc_on_the_same_fact_says_which_condition_failed(planted, monkeypatch):
    at = _page(planted, monkeypatch, "ntc")
    assert "no candidate group" in _text(at.warning)
    assert "❌ the method proposes at least 2 groups" in _text(at.markdown)
    assert not any(m.label == "Redundancy R" and m.value not in ("n/a",) for m in at.metric)


def test_candidate_groups_name_their_generic_members(planted, monkeypatch):
    """A neuron flagged generic on the Facts compared page is named in its group's row."""
    from dkn.neurons import Neuron

    at = _page(planted, monkeypatch, "backup", generic=[Neuron(1, 3)])
    table = at.dataframe[0].value
    by_neurons = dict(zip(table["neurons"], table["generic"]))
    assert by_neurons == {"L0:N0 L0:N1": "—", "L1:N2 L1:N3": "L1:N3"}
