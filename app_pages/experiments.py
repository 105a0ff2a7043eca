"""Experiments: the analysis framework's past runs and their reports, and small runs on the loaded model."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import streamlit as st
import streamlit.components.v1 as components

from dkn.experiments.runner import EXPERIMENTS, past_runs, run_experiment
from dkn.models import REPO_ROOT, cache_dir
from ui import state, widgets

COMMITTED = REPO_ROOT / "results"
APP_RUNS = cache_dir() / "app-runs"

st.title("Experiments")
st.markdown(
    "The paper's analyses over many facts: degeneracy of acquisition (how clusterers compare), robustness "
    "(suppression and enhancement), fact-checking, learning new facts, and model size. Full runs go through "
    "the command line, e.g. `python -m dkn experiment acquisition --dataset builtin+pararel+rome --limit 150`; "
    "every run is resumable and writes a report. Below: the reports, and small runs on the loaded model."
)

runs = past_runs(COMMITTED, APP_RUNS)
st.header("Reports")
if not runs:
    st.info(
        "No experiment has been run yet. Start a small one below, or run one from the command line.",
        icon=":material/science:",
    )
else:
    table = pd.DataFrame(
        [
            {
                "experiment": r["manifest"]["experiment"],
                "model": r["manifest"].get("model_label", ""),
                "dataset": r["manifest"]["dataset"],
                "limit": r["manifest"].get("limit"),
                "date": r["manifest"]["date"],
                "folder": str(Path(r["folder"]).relative_to(REPO_ROOT))
                if Path(r["folder"]).is_relative_to(REPO_ROOT)
                else str(r["folder"]),
            }
            for r in runs
        ]
    )
    widgets.show_table(table, "experiment_runs", key="runs_table")
    labels = [f"{row.experiment} · {row.model} · {row.dataset} · {row.date}" for row in table.itertuples()]
    chosen = st.selectbox("Report", range(len(runs)), format_func=lambda i: labels[i])
    folder = Path(runs[chosen]["folder"])
    report = folder / "report.md"
    with st.container(border=True):
        if report.exists():
            text = report.read_text()
            st.markdown(text.split("\n![")[0])  # images are shown interactively below
            st.download_button(
                "Download report.md", text, file_name=f"{folder.parent.name}-{folder.name}-report.md", key="dl_report"
            )
        for html in sorted(folder.glob("*.html")):
            st.subheader(html.stem.replace("_", " "))
            png = html.with_suffix(".png")
            if png.exists():  # the reports' HTML loads plotly.js from a CDN; the PNG works offline
                st.image(str(png), width="stretch")
            else:
                components.html(html.read_text(), height=480, scrolling=True)
            st.download_button(
                "Download interactive HTML",
                html.read_bytes(),
                file_name=html.name,
                mime="text/html",
                key=f"dl_{html.stem}",
            )

st.header("Run a small experiment")
lm = widgets.require_model()
with st.form("run_experiment"):
    c1, c2, c3, c4 = st.columns([2, 3, 1, 1])
    name = c1.selectbox("Experiment", list(EXPERIMENTS))
    dataset = c2.text_input(
        "Dataset",
        "builtin",
        help="builtin, pararel[:P36], rome, lre[:name], templama[:test|wrong], "
        "a CSV/JSONL file, or several joined by +",
    )
    limit = c3.number_input("Facts", 1, 500, 5)
    seed = c4.number_input("Seed", 0, 10_000, 0)
    r1, r2 = st.columns([1, 3])  # Ray: the per-fact steps on a cluster (dkn.experiments.distributed)
    workers = r1.number_input("Ray workers", 0, 256, 0, help="0: in this process; N: N model copies on Ray")
    ray_address = r2.text_input(
        "Ray address",
        os.environ.get("RAY_ADDRESS", ""),
        placeholder="auto or HOST:PORT",
        help="blank: start a local Ray with this machine's cores (with Ray workers > 0)",
    )
    submitted = st.form_submit_button("Run", type="primary", icon=":material/play_arrow:")
if submitted:
    with widgets.guard("the experiment"):

        def work(update):
            return run_experiment(
                name,
                lm,
                dataset,
                limit=int(limit),
                seed=int(seed),
                store=state.get_store(),
                cluster=cluster,
                out_dir=APP_RUNS / name / f"{lm.name.replace('/', '_')}-{dataset.replace('/', '_')}-{limit}-{seed}",
                progress=lambda step, done, total: update(done / max(total, 1), f"{step} {done}/{total}"),
                command=f"python -m dkn experiment {name} --model {lm.name} --dataset {dataset} "
                f"--limit {limit} --seed {seed}" + (f" --workers {workers}" * bool(workers)),
            )

        try:
            cluster = None
            if workers:
                from dkn.experiments.distributed import ClusterSpec

                cluster = ClusterSpec(workers=int(workers), address=ray_address.strip() or None)
            label = f"Running {name}" + (f" on {workers} Ray workers" if workers else "")
            report, out = widgets.run_with_progress(label, work, cancel_key="cancel_experiment")
        except RuntimeError as err:  # Ray: no cluster at that address, a worker that cannot load the model
            if not workers:
                raise
            st.error(f"The run on Ray failed: {err}", icon=":material/error:")
            st.stop()
        st.session_state["experiment_done"] = (name, report.summary)
        st.rerun()  # the new report appears in the list above at once
if st.session_state.pop("cancelled_cancel_experiment", False):
    st.info(
        "Experiment cancelled. Facts already finished are kept: running it again resumes from them.",
        icon=":material/cancel:",
    )
if "experiment_done" in st.session_state:
    done_name, summary = st.session_state["experiment_done"]
    st.success(
        f"Done: {done_name}, {summary.get('n_facts', '')} facts. Its report is listed above.",
        icon=":material/check_circle:",
    )
    st.json(summary, expanded=False)
