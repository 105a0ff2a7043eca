"""The Streamlit pages, driven by streamlit.testing (no browser): widgets exist, a cached fact renders its
heatmap and graph, toggling a BDC changes the shown probability, bad input shows an error message.

Uses the real default model and a private result store seeded with the default fact (France -> Paris).
"""

from __future__ import annotations

import os
import re

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest

from tests.app_support import FRANCE, REPO, env_var, make_cache_dir, seed_store

pytestmark = pytest.mark.real_model
TIMEOUT = 180


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    root = make_cache_dir(tmp_path_factory.mktemp("dkn-app-cache"))
    with env_var("DKN_CACHE_DIR", str(root)):
        from dkn.cache import ResultStore
        from ui.state import get_model

        lm = get_model("default")  # the app's own cached loader: AppTest runs share it
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
    assert len(charts(at)) >= 2  # heatmap and per-layer summary
    heatmap = charts(at)[0].proto.spec
    assert '"heatmap"' in heatmap and "neuron %{x}" in heatmap
    assert any("Model source" == r.label for r in at.sidebar.radio)
    assert any("Export all" in b.label for b in at.sidebar.get("download_button"))


def test_degenerate_page_shows_graph(app):
    at = app.run()
    at.switch_page("app_pages/degenerate.py").run()
    no_exceptions(at)
    assert at.title[0].value == "Degenerate knowledge neurons"
    assert any(w.label == "Clusterer" for w in at.selectbox)
    assert any(m.label == "Redundancy R" for m in at.metric)
    specs = [c.proto.spec for c in charts(at)]
    assert any("BDC A" in s for s in specs)  # the graph colours nodes by group
    assert len(specs) >= 2  # graph and barcode
    assert len(at.dataframe) >= 1  # the candidate table


def _p_after(at) -> str:
    return next(m.value for m in at.metric if m.label == "P(answer) after")


def test_intervene_toggle_changes_probability(app):
    at = app.run()
    at.switch_page("app_pages/intervene.py").run()
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
    write_report(
        folder,
        Report(
            {"n_facts": 1}, tables={"t": pd.DataFrame([{"method": "ntc", "drop": 0.5}])}, markdown="A test report.\n"
        ),
        {
            "experiment": "acquisition",
            "model": "default",
            "model_label": "test model",
            "fingerprint": "x",
            "dataset": "builtin",
            "limit": 1,
            "seed": 0,
            "params": {},
            "run_id": "r",
            "version": "0",
            "date": "2999-01-01T00:00:00",
            "command": "python -m dkn experiment acquisition",
        },
    )
    at = app.run()
    at.switch_page("app_pages/experiments.py").run()
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
    next(t for t in at.text_input if t.label == "Answer").input("Paris " * 20).run()  # too many tokens
    no_exceptions(at)
    assert "cannot be used" in texts(at.error)


def test_bad_model_shows_error(app):
    app.session_state["model_name"] = os.path.join(str(REPO), "app.py")  # a file, not a model folder
    at = app.run()
    no_exceptions(at)
    assert "is a file" in texts(at.error) and "No model is loaded" in texts(at.error)
    at.switch_page("app_pages/intervene.py").run()
    no_exceptions(at)
    assert "No model is loaded" in texts(at.error)


# ------------------------------------------------------------------ issue 12 §2: nothing typed takes it down
def _type_fact(at, prompt: str, answer: str):
    next(r for r in at.radio if r.label == "Where the fact comes from").set_value("Type your own").run()
    next(t for t in at.text_input if t.label == "Prompt").input(prompt).run()
    next(t for t in at.text_input if t.label == "Answer").input(answer).run()
    return at


def _run_label(at) -> str:
    return next(b.label for b in at.button if b.label.startswith(("Run attribution", "Attribution done")))


def test_long_prompt_refused_before_the_model_runs(app):
    from dkn.query import MAX_PROMPT_TOKENS

    at = _type_fact(app.run(), " ".join(["word"] * 3000), "Paris")
    no_exceptions(at)
    assert "tokens long" in texts(at.error) and f"at most {MAX_PROMPT_TOKENS}" in texts(at.error)
    assert not any(b.label.startswith("Run attribution") for b in at.button)  # stopped before attribution
    assert not at.metric  # and before the prediction


def _add_paraphrases(at, key: str, rows: list[str]):
    at.session_state[key] = {"edited_rows": {}, "added_rows": [{"paraphrase": r} for r in rows], "deleted_rows": []}
    return at.run()


def test_typed_paraphrases_are_used_and_do_not_pin_the_prompt_count(app):
    at = _type_fact(app.run(), "The capital of Japan is", "Tokyo")
    no_exceptions(at)
    assert _run_label(at) == "Run attribution on 1 prompt"
    at = _add_paraphrases(at, "para_custom_0", ["Japan's capital is", "The capital city of Japan is"])
    no_exceptions(at)
    assert _run_label(at) == "Run attribution on 3 prompts"  # was stuck at 1
    assert "2 paraphrases: the fact has 3 prompts." in texts(at.caption)  # the count is not one edit behind
    # a built-in fact chosen afterwards uses its paraphrases too
    next(r for r in at.radio if r.label == "Where the fact comes from").set_value("Built-in facts").run()
    assert _run_label(at) in ("Run attribution on 3 prompts", "Attribution done")
    # "New fact" on the typed source starts empty: the Japanese paraphrases do not carry over
    next(r for r in at.radio if r.label == "Where the fact comes from").set_value("Type your own").run()
    next(b for b in at.button if b.label == "New fact").click().run()
    no_exceptions(at)
    assert [t.value for t in at.text_input if t.label == "Prompt"] == [""]
    assert "0 paraphrases" in texts(at.caption)


def test_multi_token_answer_lists_each_token_with_its_rank(app):
    at = _type_fact(app.run(), "The capital of France is", "Paris, France")
    no_exceptions(at)
    assert "may not know this fact" not in texts(at.caption)
    table = next(d.value for d in at.dataframe if "answer token" in d.value.columns)
    assert table["answer token"].tolist()[0] == repr(" Paris")
    assert table["rank"].tolist()[0] == 1  # " Paris" is the model's top guess
    assert len(table) >= 3 and (table["probability"] > 0).all()


def test_dataset_missing_column_named_and_stale_results_cleared(app, tmp_path):
    path = tmp_path / "facts.csv"
    path.write_text("prompt,solution\nThe capital of Japan is,Tokyo\n")
    at = app.run()
    assert "Loaded from the cache at once" in texts(at.success)  # the France results are on screen
    next(r for r in at.radio if r.label == "Where the fact comes from").set_value("Dataset file").run()
    next(t for t in at.text_input if t.label == "Dataset name or file").input(str(path)).run()
    no_exceptions(at)
    assert "lacks the column answer" in texts(at.warning)
    assert "Loaded from the cache at once" not in texts(at.success)  # no stale results
    assert not charts(at)


def test_back_to_default_model_clears_the_bad_path(app):
    bad = os.path.join(str(REPO), "app.py")
    app.session_state["model_name"] = bad
    app.session_state["model_source"] = "Local folder"
    app.session_state["model_text"] = bad
    at = app.run()
    assert "is a file" in texts(at.sidebar.error)
    next(b for b in at.sidebar.button if b.label == "Back to the default model").click().run()
    no_exceptions(at)
    assert not at.error and "Loaded from the cache at once" in texts(at.success)  # the default model is back
    # the widgets' own state: the sidebar shows "Offline default" and no longer the bad path
    assert at.session_state["model_source"] == "Offline default"
    assert at.session_state["model_text"] == ""


def test_device_and_precision_are_chosen_in_the_sidebar(app):
    """The picker loads the model with the chosen weights' precision (its own cache entry and fingerprint);
    a device this machine lacks is a message in the sidebar, and "Back to the default model" undoes it."""
    at = app.run()
    float32 = at.session_state["model_device"], at.session_state["model_dtype"]
    assert float32 == ("auto", "float32")
    sidebar_select = {w.label: w for w in at.sidebar.selectbox}
    sidebar_select["Weights"].set_value("bfloat16").run()
    next(b for b in at.sidebar.button if b.label == "Load model").click().run()
    no_exceptions(at)
    assert "cpu bfloat16" in texts(at.sidebar.caption)
    assert at.session_state["model_dtype"] == "bfloat16"
    {w.label: w for w in at.sidebar.selectbox}["Device"].set_value("mps").run()  # never on Linux
    next(b for b in at.sidebar.button if b.label == "Load model").click().run()
    no_exceptions(at)
    assert "mps" in texts(at.sidebar.error).lower()
    next(b for b in at.sidebar.button if b.label == "Back to the default model").click().run()
    no_exceptions(at)
    assert (at.session_state["model_device"], at.session_state["model_dtype"]) == ("auto", "float32")
    assert "cpu float32" in texts(at.sidebar.caption) and not at.sidebar.error


def test_typed_neurons_survive_a_validation_error_and_none_unticks(app):
    at = app.run()
    at.switch_page("app_pages/intervene.py").run()
    typed = next(t for t in at.text_input if t.label == "Other neurons")
    typed.input("L99:N1")
    next(b for b in at.button if b.label == "Add group").click().run()
    no_exceptions(at)
    assert "out of range" in texts(at.error) or "layer" in texts(at.error)
    assert next(t for t in at.text_input if t.label == "Other neurons").value == "L99:N1"
    next(t for t in at.text_input if t.label == "Other neurons").input("L3:N7")
    next(b for b in at.button if b.label == "Add group").click().run()
    no_exceptions(at)
    assert next(t for t in at.text_input if t.label == "Other neurons").value == ""  # added: the form empties
    assert any(c.label.startswith("My group 1 · 1 neuron") for c in at.checkbox)  # not "1 neurons"
    for box in at.checkbox:
        box.check()
    at.run()
    assert _p_after(at) != next(m.value for m in at.metric if m.label == "P(answer) before")
    next(b for b in at.button if b.label == "None").click().run()
    no_exceptions(at)
    assert not any(c.value for c in at.checkbox)
    assert _p_after(at) == next(m.value for m in at.metric if m.label == "P(answer) before")


def test_facts_compared_flags_shared_neurons(app):
    from ui.state import Settings

    app.session_state["settings"] = Settings(max_prompts=1)  # one prompt a fact: France's is seeded
    app.session_state["compare_facts"] = ["builtin/capital/France", "builtin/capital/Japan"]
    at = app.run()
    at.switch_page("app_pages/compare.py").run()
    no_exceptions(at)
    assert "1 fact of 2 not attributed yet" in texts(at.info)
    next(b for b in at.button if b.label == "Attribute the 1 missing fact").click().run()
    no_exceptions(at)
    assert any(m.label == "Generic knowledge neurons" for m in at.metric)
    assert any("Knowledge neurons shared by each pair" in c.proto.spec for c in charts(at))
    table = next(d.value for d in at.dataframe if "share" in d.value.columns)
    compared = at.session_state["generic_neurons"]
    assert set(table.loc[table["generic"], "neuron"]) == {f"L{n.layer}:N{n.index}" for n in compared["neurons"]}
    assert ((table["share"] == 1.0) == table["generic"]).all()  # 2 facts, share 0.5: generic = in both
    at.switch_page("app_pages/explore.py").run()
    no_exceptions(at)
    assert any("generic" in d.value.columns for d in at.dataframe)  # the knowledge-neuron table's flag
    assert any(m.label == "Knowledge neuron of" for m in at.metric)  # the neuron detail panel
    # the selection without the generic neurons, and its effect on the knockout
    labels = {m.label for m in at.metric}
    assert {"All knowledge neurons off", "Fact-specific off", "Generic off"} <= labels
    assert any("Knockout with and without the generic neurons" in c.proto.spec for c in charts(at))
    assert any(m.label.startswith("Direct effect on the") for m in at.metric)


def test_per_prompt_effects_and_dose_response(app):
    at = app.run()
    at.switch_page("app_pages/intervene.py").run()
    for box in [c for c in at.checkbox if c.label.startswith("BDC ")]:
        box.check()
    at.run()
    next(t for t in at.toggle if t.label == "Per-prompt effects").set_value(True).run()
    no_exceptions(at)
    table = next(d.value for d in at.dataframe if "KL random" in d.value.columns)
    assert len(table) == 3  # every prompt of the fact
    assert (table["P after"] < table["P before"]).all()  # suppressing the BDCs lowers P everywhere
    next(b for b in at.button if b.label == "Dose-response").click().run()
    no_exceptions(at)
    spec = next(c.proto.spec for c in charts(at) if "Dose-response" in c.proto.spec)
    assert '"factor"' in spec and "BDC A" in spec


def test_link_restores_the_view_and_follows_it(app):
    app.query_params.update(
        {"fact": "builtin/capital/France", "factor": "0.5", "mode": "all", "bdc": "0", "group": "L3:N7 L4:N1"}
    )
    at = app.run()
    no_exceptions(at)
    at.switch_page("app_pages/intervene.py").run()
    no_exceptions(at)
    assert next(c for c in at.checkbox if c.label.startswith("BDC A")).value
    assert next(s for s in at.slider if s.label == "Factor").value == 0.5
    assert next(r for r in at.radio if r.label == "Where").value == "all"
    assert next(c for c in at.checkbox if c.label.startswith("My group 1")).value  # the group is back, ticked
    # and the URL follows a change
    next(s for s in at.slider if s.label == "Factor").set_value(2.0).run()
    assert at.query_params["factor"] in ("2", ["2"]) and at.query_params["bdc"] in ("0", ["0"])
    assert at.query_params["group"] in ("L3:N7 L4:N1", ["L3:N7 L4:N1"])


def test_a_link_with_a_bad_setting_says_so_and_keeps_the_rest(app):
    from dkn.options import DEFAULT_RULE

    bad_steps = "7" if DEFAULT_RULE == "adaptive" else "0"  # odd intervals / no steps: both refused
    app.query_params.update({"fact": "builtin/capital/Germany", "steps": bad_steps, "factor": "0.5"})
    at = app.run()
    no_exceptions(at)
    assert "could not be read" in texts(at.warning) and "the rest is restored" in texts(at.warning)
    assert at.session_state["fact"].prompt == "The capital of Germany is"  # read before the bad setting
    assert at.session_state["settings"].steps != int(bad_steps)


def test_export_all_builds_every_figure_with_the_intervention_and_link(app):
    import io
    import json
    import zipfile

    from ui import state, widgets

    at = app.run()
    no_exceptions(at)
    ws = next(iter(at.session_state["workspaces"].values()))
    lm = state.get_model("default")
    summary = state.summary(lm)
    intervention = {"neurons": ["L3:N7", "L20:N5"], "factor": 0.0, "mode": "last", "clusterer": "ntc"}
    data = widgets.export_all_zip(lm, ws, {}, {}, intervention, "http://x/intervene?fact=f", summary, images=False)
    zf = zipfile.ZipFile(io.BytesIO(data))
    manifest = json.loads(zf.read("manifest.json"))
    assert manifest["intervention"] == intervention and manifest["link"] == "http://x/intervene?fact=f"
    names = {n.split("/")[1].rsplit(".", 1)[0] for n in zf.namelist() if n.startswith("figures/")}
    # only the Explore page was visited, yet the graph, barcode, grid and intervention are all there
    assert {"attribution-heatmap", "layer-summary", "kn-graph-ntc", "barcode-ntc", "intervention"} <= names
    html = zf.read("figures/intervention.html").decode()
    assert summary["label"] in html and "The capital of France is" in html and "2 neurons" in html


def test_the_app_config_turns_off_streamlits_full_gc_after_every_run():
    """Streamlit's default `runner.postScriptGC` runs gc.collect() after each script run: with a model
    loaded that holds the GIL for ~250 ms while the run's messages wait unsent, most of an Intervene
    update's latency (bench/bench_app.py measures both).  The shipped config must keep it off, and the
    server must bind to localhost only."""
    import tomllib

    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["runner"]["postScriptGC"] is False
    assert config["server"]["address"] == "localhost"


def test_no_pages_folder_beside_the_app():
    """A `pages/` folder beside app.py makes Streamlit list its raw file names in the sidebar until the
    script's st.navigation has run (seconds at cold start, while the model loads); the pages live in
    `app_pages/`, and every one of them is in the navigation."""
    assert not (REPO / "pages").exists()
    listed = set(re.findall(r'st\.Page\("(app_pages/[a-z_]+\.py)"', (REPO / "app.py").read_text()))
    assert listed == {f"app_pages/{p.name}" for p in (REPO / "app_pages").glob("*.py")}
