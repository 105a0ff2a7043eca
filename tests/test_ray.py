"""Experiments on Ray (dkn.experiments.distributed) give the local run's results.

A tiny random GPT-2 is saved to a folder so that every Ray worker can load it by name, and the
robustness experiment runs on facts that model answers (tests/test_experiments_analysis.known_rows).
The local run (one torch thread, like each worker) is the reference; a Ray run must leave the same
summary.json, tables and store entries (records and attribution caches, within float tolerance):

* through the CLI with --workers 2 and no address: it starts a local Ray with this machine's cores
  and shuts it down after the run;
* on a simulated two-node cluster (`ray.cluster_utils.Cluster`, one CPU per node, so one worker on
  each node), where a worker process is also killed (`os._exit`) in the middle of one fact: Ray
  restarts it, that fact alone is computed again, and the results are still the local run's.

Ray start-up dominates the time here (about 10-15 s per cluster on the shared 2-core machine, plus
the workers' imports), so the two-node cluster and its workers are shared by the tests that need them.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_experiments_analysis import known_rows, write_jsonl
from tiny_models import tiny_model

from dkn.cache import ResultStore, make_key
from dkn.cli import main
from dkn.experiments import robustness, runner
from dkn.experiments.distributed import (
    ClusterSpec,
    gpus_per_worker,
    ship,
    threads_per_worker,
    worker_pool,
)
from dkn.models import load_model

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.usefixtures("one_thread")
EXPERIMENT = "robustness"
SETTINGS = ["bootstrap=200"]
N_FACTS = 5


@pytest.fixture(autouse=True)
def no_static_images(monkeypatch):
    monkeypatch.setattr(runner, "_write_static", lambda figure, stem: False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, the driver's LoadedModel read from it, a dataset file of facts it answers)."""
    root = tmp_path_factory.mktemp("ray-model")
    built = tiny_model("gpt2")
    built.model.save_pretrained(root / "model")
    built.tokenizer.save_pretrained(root / "model")
    lm = load_model(str(root / "model"), device="cpu")
    assert lm.fingerprint == built.fingerprint
    return root / "model", lm, write_jsonl(root / "facts.jsonl", known_rows(lm, N_FACTS))


def run(lm, data, folder, cluster=None, progress=None, settings=SETTINGS, limit=None):
    params = runner.make_params(EXPERIMENT, settings)
    store = ResultStore(folder / "results.sqlite")
    runner.run_experiment(
        EXPERIMENT,
        lm,
        data,
        params=params,
        store=store,
        out_dir=folder / "out",
        limit=limit,
        command="test",
        cluster=cluster,
        progress=progress,
    )
    return folder


@pytest.fixture(scope="module")
def local(tiny, tmp_path_factory, one_thread):
    """The reference: the same run in this process."""
    _, lm, data = tiny
    return run(lm, data, tmp_path_factory.mktemp("local"))


def assert_close(a, b, where="summary"):
    """Equal JSON-like values, floats within float tolerance, timings left out."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7, nan_ok=True), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), where
        for key in a:
            if not key.endswith("seconds"):  # timings, e.g. an attribution's
                assert_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_run(folder, reference, out=None):
    """Same summary.json (bar date and command), tables, stored records and attribution caches as the
    run in `reference`; `folder` holds results.sqlite and, unless `out` is given, the report in out/."""
    out = out or folder / "out"
    got, want = (json.loads((f / "summary.json").read_text()) for f in (out, reference / "out"))
    for manifest in (got["manifest"], want["manifest"]):
        del manifest["date"], manifest["command"]
    assert got["manifest"] == want["manifest"]
    assert_close(got["summary"], want["summary"])
    for csv in sorted((reference / "out").glob("*.csv")):
        pd.testing.assert_frame_equal(
            pd.read_csv(out / csv.name), pd.read_csv(csv), check_exact=False, rtol=1e-5, atol=1e-7
        )
    got_store, want_store = (dict(ResultStore(f / "results.sqlite").entries()) for f in (folder, reference))
    assert sorted(got_store) == sorted(want_store) and len(want_store) > 2 * N_FACTS
    assert sum(e.arrays != {} for e in want_store.values()) >= N_FACTS  # attributions were cached too
    for key, entry in want_store.items():
        assert_close(got_store[key].meta, entry.meta, f"store {key[:8]}")
        assert sorted(got_store[key].arrays) == sorted(entry.arrays)
        for name, array in entry.arrays.items():
            np.testing.assert_allclose(got_store[key].arrays[name], array, rtol=1e-5, atol=1e-7)


# -- no Ray needed -------------------------------------------------------------------------------------
def test_threads_and_gpus_are_shared_out_so_every_worker_fits():
    assert threads_per_worker([2], 2) == 1
    assert threads_per_worker([8], 2) == 4
    assert threads_per_worker([8, 8], 3) == 4  # 5 threads would leave one worker unplaced
    assert threads_per_worker([1, 1], 2) == 1
    with pytest.raises(ValueError, match="too few for 3 workers"):
        threads_per_worker([1, 1], 3)
    assert threads_per_worker([4, 2], 3, threads=2) == 2
    with pytest.raises(ValueError, match="do not fit"):  # asked for: refused now, not hung at start-up
        threads_per_worker([4, 2], 2, threads=3)
    assert gpus_per_worker(0, 2, None) == 0
    assert gpus_per_worker(4, 2, None) == 1
    assert gpus_per_worker(2, 3, None) == 0.5
    assert gpus_per_worker(2, 2, "cpu") == 0
    with pytest.raises(ValueError, match="workers"):
        ClusterSpec(workers=0).validate()


def test_a_shipped_step_carries_no_model(tiny, tmp_path):
    _, lm, _ = tiny
    ctx = runner.Context(lm, ResultStore(tmp_path / "s.sqlite"), "run", 0)
    params = robustness.Params()
    weights = sum(p.numel() for p in lm.model.parameters()) * 4
    payload = ship(lambda f: robustness.fact_record(ctx, f, params))
    assert len(payload) < weights / 10  # the model and the store travel as references
    assert b"fact_record" in payload and lm.fingerprint.encode() in payload


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ray-address", "auto"], "needs --workers"),
        (["--workers", "1", "--ray-address", "127.0.0.1:1"], "cannot reach"),
        (["--workers", "0"], "at least 1"),
    ],
)
def test_cli_rejects_bad_cluster_flags(argv, message, tiny, capsys):
    folder, _, data = tiny
    try:
        status = main(["experiment", EXPERIMENT, "--model", str(folder), "--dataset", data, *argv])
    except SystemExit as exit_:  # refused by argparse
        status = exit_.code
    assert status == 2
    assert message in capsys.readouterr().err
    assert not ray.is_initialized()


def test_without_ray_the_cli_says_how_to_install_it(tiny, capsys, monkeypatch):
    import sys

    folder, _, data = tiny
    monkeypatch.delitem(sys.modules, "dkn.experiments.distributed")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    assert main(["experiment", EXPERIMENT, "--model", str(folder), "--dataset", data, "--workers", "2"]) == 2
    assert "pip install 'dkn[distributed]'" in capsys.readouterr().err


# -- the app's Experiments page ------------------------------------------------------------------------
def page(tiny, tmp_path, monkeypatch, workers: int, address: str = ""):
    """The Experiments page on the tiny model, its run form filled in and submitted."""
    from streamlit.testing.v1 import AppTest

    from tests.app_support import REPO

    folder, _, data = tiny
    monkeypatch.setenv("DKN_CACHE_DIR", str(tmp_path))
    monkeypatch.chdir(REPO)
    at = AppTest.from_file(str(REPO / "app_pages" / "experiments.py"), default_timeout=600)
    at.session_state["model_name"] = str(folder)
    at.run()
    next(s for s in at.selectbox if s.label == "Experiment").set_value(EXPERIMENT)
    next(t for t in at.text_input if t.label == "Dataset").input(data)
    next(n for n in at.number_input if n.label == "Facts").set_value(N_FACTS)
    next(n for n in at.number_input if n.label == "Ray workers").set_value(workers)
    next(t for t in at.text_input if t.label == "Ray address").input(address)
    next(b for b in at.button if b.label == "Run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_page_says_when_the_cluster_cannot_be_reached(tiny, tmp_path, monkeypatch):
    at = page(tiny, tmp_path, monkeypatch, workers=2, address="127.0.0.1:1")
    errors = " ".join(e.value for e in at.error)
    assert "The run on Ray failed" in errors and "cannot reach the Ray cluster at '127.0.0.1:1'" in errors
    assert not ray.is_initialized()


# -- a local Ray started by the CLI --------------------------------------------------------------------
@pytest.mark.slow  # a Ray cluster and its workers start
def test_cli_workers_start_a_local_ray_and_give_the_local_results(tiny, local, tmp_path, monkeypatch):
    assert not ray.is_initialized(), "this test must run before the two-node cluster starts"
    folder, _, data = tiny
    monkeypatch.setenv("DKN_CACHE_DIR", str(tmp_path))  # the CLI's default store
    argv = [
        "experiment",
        EXPERIMENT,
        "--model",
        str(folder),
        "--device",
        "cpu",
        "--dataset",
        data,
        "--workers",
        "2",
        "--out",
        str(tmp_path / "out"),
        "--json",
    ]
    for setting in SETTINGS:
        argv += ["--param", setting]
    assert main(argv) == 0  # its store: tmp_path / results.sqlite
    assert_same_run(tmp_path, local)
    assert not ray.is_initialized()  # the Ray it started is shut down


# -- a simulated two-node cluster ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_nodes(tiny):
    """A two-worker pool on a two-node Ray cluster (one CPU each; `.cluster`), shared by the tests below."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        with worker_pool(tiny[1], ClusterSpec(workers=2)) as pool:
            pool.cluster = cluster
            yield pool
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow  # a Ray cluster and its workers start
def test_two_node_cluster_gives_the_local_results(tiny, local, two_nodes, tmp_path):
    _, lm, data = tiny
    assert len({w["node"] for w in two_nodes.workers_info}) == 2  # one worker on each node
    assert {w["threads"] for w in two_nodes.workers_info} == {1}
    progress = []
    folder = run(lm, data, tmp_path, cluster=two_nodes, progress=lambda *call: progress.append(call))
    assert_same_run(folder, local)
    shown = [done for step, done, total in progress if step == EXPERIMENT and total == N_FACTS]
    assert shown == list(range(1, N_FACTS + 1))  # one update per finished fact


def crash_once(marker, calls, step: str, key: str, how: str = "exit"):
    """A worker hook: log every item the worker starts; the first time it starts `key` of `step`,
    write its pid to `marker` and end the worker process on the spot (or raise, `how="raise"`)."""

    def hook(this_step: str, this_key: str) -> None:
        with open(calls, "a") as out:
            out.write(f"{this_step}\t{this_key}\t{os.getpid()}\n")
        if (this_step, this_key) == (step, key) and not marker.exists():
            marker.write_text(str(os.getpid()))
            if how == "raise":
                raise RuntimeError("simulated crash")
            os._exit(1)

    return hook


def process_gone(pid: int) -> bool:
    """No process `pid`, or only its zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "\nState:\tZ" in status.read_text()


def started(calls) -> list[str]:
    """The facts of the experiment's step that the workers started, in the hook's log."""
    rows = [line.split("\t") for line in calls.read_text().splitlines()] if calls.exists() else []
    return [key for step, key, _ in rows if step == EXPERIMENT]


@pytest.mark.slow  # a Ray cluster and its workers start
def test_a_worker_killed_mid_fact_costs_that_fact_only(tiny, local, two_nodes, tmp_path):
    _, lm, data = tiny
    marker, calls = tmp_path / "killed.pid", tmp_path / "calls.tsv"
    before = {w["pid"] for w in two_nodes.workers_info}
    two_nodes.item_hook = crash_once(marker, calls, EXPERIMENT, "t/2")
    try:
        folder = run(lm, data, tmp_path, cluster=two_nodes)
    finally:
        two_nodes.item_hook = None
    killed = int(marker.read_text())
    assert killed in before  # a worker process of the pool ...
    assert process_gone(killed)  # ... died
    after = {w["pid"] for w in ray.get([a.ready.remote() for a in two_nodes.actors])}
    assert killed not in after and len(after) == 2  # Ray restarted it as a new process
    rows = [line.split("\t") for line in calls.read_text().splitlines()]
    assert Counter(started(calls)) == {f"t/{i}": 2 if i == 2 else 1 for i in range(N_FACTS)}  # only that one again
    assert len({pid for step, key, pid in rows if (step, key) == (EXPERIMENT, "t/2")}) == 2
    assert_same_run(folder, local)


@pytest.mark.slow  # a Ray cluster and its workers start
def test_a_failed_run_resumes_without_recomputing_what_the_driver_stored(tiny, local, two_nodes, tmp_path):
    _, lm, data = tiny
    marker, calls = tmp_path / "failed.pid", tmp_path / "calls.tsv"
    two_nodes.item_hook = crash_once(marker, calls, EXPERIMENT, "t/3", how="raise")
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(lm, data, tmp_path, cluster=two_nodes)
        run_id = json.loads((local / "out" / "summary.json").read_text())["manifest"]["run_id"]
        store = ResultStore(tmp_path / "results.sqlite")
        stored = {
            f"t/{i}"
            for i in range(N_FACTS)
            if store.get(make_key(run=run_id, step=EXPERIMENT, item=f"t/{i}")) is not None
        }
        assert "t/3" not in stored and stored <= set(started(calls))
        calls.unlink()
        folder = run(lm, data, tmp_path, cluster=two_nodes)  # the hook no longer raises: marker exists
    finally:
        two_nodes.item_hook = None
    assert sorted(started(calls)) == sorted({f"t/{i}" for i in range(N_FACTS)} - stored)
    assert_same_run(folder, local)


@pytest.mark.slow  # a Ray cluster and its workers start
def test_page_runs_on_the_cluster(tiny, two_nodes, tmp_path, monkeypatch):
    node = two_nodes.cluster.add_node(num_cpus=1)  # room for the page's own worker
    try:
        at = page(tiny, tmp_path / "page", monkeypatch, workers=1)
    finally:
        two_nodes.cluster.remove_node(node)
    assert not at.error, [e.value for e in at.error]
    assert any(f"Done: {EXPERIMENT}, {N_FACTS} facts" in s.value for s in at.success)
    [out] = {p.parent for p in (tmp_path / "page" / "app-runs").glob("**/summary.json")}
    _, lm, data = tiny
    local_run = run(lm, data, tmp_path / "local", settings=[], limit=N_FACTS)  # the page's settings, here
    assert_same_run(tmp_path / "page", local_run, out)
    assert "--workers 1" in json.loads((out / "summary.json").read_text())["manifest"]["command"]
