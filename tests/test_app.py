"""The Streamlit pages, driven by streamlit.testing (no browser): widgets exist, a cached fact renders its
heatmap and graph, toggling a BDC changes the shown probability, bad input shows an error message.

Uses the real default model and a private result store seeded with the default fact (France -> Paris).
"""
from __future__ import annotations

import os

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from tests.app_support import FRANCE, REPO, env_var, make_cache_dir, seed_store  # noqa: E402

pytestmark = pytest.mark.real_model
TIMEOUT = 180


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    root = make_cache_dir(tmp_path_factory.mktemp("dkn-app-cache"))
    with env_var("DKN_CACHE_DIR", str(root)):
        from dkn.cache import ResultStore
        from ui.state import get_model

        lm = get_model("default")          # the app's own cached loader: AppTest runs share it
        seed_store(lm, ResultStore(), FRANCE, "Paris")
        yield root


@pytest.fixture
def app(cache_dir, monkeypatch):
    monkeypatch.setenv("DKN_CACHE_DIR", str(cache_dir))
    monkeypatch.chdir(REPO)
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT)
    return at


def texts(elements) -> str:
    return " ".join(str(e.value) for e in elements)


def no_exceptions(at):
    assert not at.exception, [e.value for e in at.exception]


def charts(at):
    return at.get("plotly_chart")


def test_explore_renders_cached_fact(app):
    at = app.run()
    no_exceptions(at)
    assert not at.error, texts(at.error)
    labels = [w.label for w in at.selectbox]
    assert "Built-in fact" in labels
    fact = next(w for w in at.selectbox if w.label == "Built-in fact")
    assert fact.value == "builtin/capital/France"
    assert [t.value for t in at.text_input if t.label == "Prompt"] == ["The capital of France is"]
    assert [t.value for t in at.text_input if t.label == "Answer"] == ["Paris"]
    assert any(m.label.startswith("P(") and m.value.endswith("%") for m in at.metric)
    assert "Loaded from the cache at once" in texts(at.success)
    assert len(charts(at)) >= 2                       # heatmap and per-layer summary
    heatmap = charts(at)[0].proto.spec
    assert '"heatmap"' in heatmap and "neuron %{x}" in heatmap
    assert any("Model source" == r.label for r in at.sidebar.radio)
    assert any("Export all" in b.label for b in at.sidebar.get("download_button"))


def test_degenerate_page_shows_graph(app):
    at = app.run()
    at.switch_page("pages/degenerate.py").run()
    no_exceptions(at)
    assert at.title[0].value == "Degenerate knowledge neurons"
    assert any(w.label == "Clusterer" for w in at.selectbox)
    assert any(m.label == "Redundancy R" for m in at.metric)
    specs = [c.proto.spec for c in charts(at)]
    assert any("BDC A" in s for s in specs)          # the graph colours nodes by group
    assert len(specs) >= 2                            # graph and barcode
    assert len(at.dataframe) >= 1                     # the candidate table


def _p_after(at) -> str:
    return next(m.value for m in at.metric if m.label == "P(answer) after")


def test_intervene_toggle_changes_probability(app):
    at = app.run()
    at.switch_page("pages/intervene.py").run()
    no_exceptions(at)
    before = _p_after(at)
    boxes = [c for c in at.checkbox if c.label.startswith("BDC ")]
    assert boxes, "the default fact should have at least one candidate group"
    assert any(s.label == "Factor" for s in at.slider)
    assert any(r.label == "Where" for r in at.radio)
    for box in boxes:
        box.check()
    at.run()
    no_exceptions(at)
    after = _p_after(at)
    assert after != before
    assert float(after.rstrip("%")) < float(before.rstrip("%"))
    # amplify instead: the factor slider moves the probability the other way
    next(s for s in at.slider if s.label == "Factor").set_value(2.0)
    at.run()
    assert float(_p_after(at).rstrip("%")) > float(after.rstrip("%"))
    assert any("Degeneracy index" == m.label for m in at.metric)


def test_experiments_lists_reports_and_refuses_a_bad_dataset(app, cache_dir):
    import pandas as pd

    from dkn.experiments.runner import Report, write_report
    folder = cache_dir / "app-runs" / "acquisition" / "test-run"
    write_report(folder, Report({"n_facts": 1}, tables={"t": pd.DataFrame([{"method": "ntc", "drop": 0.5}])},
                                markdown="A test report.\n"),
                 {"experiment": "acquisition", "model": "default", "model_label": "test model", "fingerprint": "x",
                  "dataset": "builtin", "limit": 1, "seed": 0, "params": {}, "run_id": "r", "version": "0",
                  "date": "2999-01-01T00:00:00", "command": "python -m dkn experiment acquisition"})
    at = app.run()
    at.switch_page("pages/experiments.py").run()
    no_exceptions(at)
    assert [h.value for h in at.header] == ["Reports", "Run a small experiment"]
    assert "A test report." in texts(at.markdown)
    next(t for t in at.text_input if t.label == "Dataset").input("/no/such/facts.jsonl")
    next(b for b in at.button if b.label == "Run").click().run()
    no_exceptions(at)
    assert "could not be read" in texts(at.error)


def test_bad_dataset_shows_error(app):
    at = app.run()
    next(r for r in at.radio if r.label == "Where the fact comes from").set_value("Dataset file").run()
    next(t for t in at.text_input if t.label == "Dataset name or file").input("/no/such/facts.csv").run()
    no_exceptions(at)
    assert "could not be read" in texts(at.error) and "does not exist" in texts(at.error)


def test_bad_answer_shows_error(app):
    at = app.run()
    next(r for r in at.radio if r.label == "Where the fact comes from").set_value("Type your own").run()
    next(t for t in at.text_input if t.label == "Prompt").input("The capital of France is").run()
    next(t for t in at.text_input if t.label == "Answer").input("Paris " * 20).run()   # too many tokens
    no_exceptions(at)
    assert "cannot be used" in texts(at.error)


def test_bad_model_shows_error(app):
    app.session_state["model_name"] = os.path.join(str(REPO), "app.py")   # a file, not a model folder
    at = app.run()
    no_exceptions(at)
    assert "is a file" in texts(at.error) and "No model is loaded" in texts(at.error)
    at.switch_page("pages/intervene.py").run()
    no_exceptions(at)
    assert "No model is loaded" in texts(at.error)
