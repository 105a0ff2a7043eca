"""Tests for dkn.cache: the SQLite result store, against a real file in tmp_path."""

from __future__ import annotations

import logging
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dkn.cache import Entry, ResultStore, default_path, make_key

N_PER_WRITER = 50


@pytest.fixture
def store(tmp_path: Path) -> ResultStore:
    return ResultStore(tmp_path / "db" / "results.sqlite")


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "scores": rng.standard_normal((30, 1536)).astype(np.float32),
        "ids": np.arange(12, dtype=np.int64).reshape(3, 4),
        "mask": np.array([True, False, True]),
        "half": np.ones((2, 3, 4), dtype=np.float16),
        "scalar": np.array(3.5),
        "empty": np.zeros((0, 7), dtype=np.float64),
        "text": np.array(["a", "bc"]),
    }


def _raw(path: Path, sql: str, params: tuple = ()) -> list[tuple]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql, params).fetchall()


# ---------------------------------------------------------------- round trip


def test_round_trip_meta_and_arrays(store: ResultStore) -> None:
    meta = {
        "model": "SmolLM2-135M",
        "n": 3,
        "score": 0.1 + 0.2,
        "ok": True,
        "none": None,
        "neurons": [[12, 345], [3, 7]],
        "nested": {"ü": "ñ", "x": [1.5, -2]},
    }
    store.put("k", meta, _arrays(), kind="ig")
    entry = store.get("k")
    assert isinstance(entry, Entry)
    assert entry.meta == meta and entry.meta["score"] == 0.1 + 0.2
    assert set(entry.arrays) == set(_arrays())
    for name, want in _arrays().items():
        got = entry.arrays[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want)
    assert abs(entry.created - time.time()) < 60


def test_empty_arrays_and_missing_key(store: ResultStore) -> None:
    assert store.get("nope") is None
    store.put("a", {"x": 1})
    store.put("b", {"y": 2}, {})
    assert store.get("a").arrays == {} and store.get("a").meta == {"x": 1}
    assert store.get("b").arrays == {}


def test_put_replaces_delete_keys_entries_clear(store: ResultStore) -> None:
    store.put("a", {"v": 1}, kind="ig")
    store.put("b", {"v": 2}, kind="cluster")
    store.put("a", {"v": 3}, {"x": np.ones(2)}, kind="ig")
    assert store.get("a").meta == {"v": 3}
    assert sorted(store.keys()) == ["a", "b"]
    assert store.keys("ig") == ["a"] and store.keys("none") == []
    assert [(k, e.meta) for k, e in store.entries("cluster")] == [("b", {"v": 2})]
    store.delete("a")
    store.delete("missing")
    assert store.keys() == ["b"]
    store.clear()
    assert store.keys() == [] and list(store.entries()) == []


def test_meta_that_would_not_round_trip_is_refused(store: ResultStore) -> None:
    for bad in ({"t": (1, 2)}, {1: "int key"}, {"a": np.float32(1)}, {"s": {1, 2}}):
        with pytest.raises(TypeError):
            store.put("k", bad)
    with pytest.raises(TypeError):
        store.put("k", {}, {"obj": np.array([object()])})
    assert store.get("k") is None


def test_hit_is_fast(store: ResultStore) -> None:
    store.put("k", {"m": 1}, {"scores": np.zeros((30, 1536), np.float32)})
    store.get("k")  # warm the connection
    start = time.perf_counter()
    for _ in range(20):
        assert store.get("k") is not None
    per_hit = (time.perf_counter() - start) / 20
    assert per_hit < 0.01, f"a hit took {per_hit * 1000:.1f} ms"


# ---------------------------------------------------------------- keys


def test_key_is_stable_and_order_free() -> None:
    a = make_key(model="m", params={"steps": 20, "batch": 4}, prompt="p", answer=None)
    b = make_key(answer=None, prompt="p", params={"batch": 4, "steps": 20}, model="m")
    assert a == b and len(a) == 64 and int(a, 16) >= 0
    assert make_key(t=(1, 2)) == make_key(t=[1, 2])
    assert make_key(x=np.int64(3), y=np.float64(0.5)) == make_key(x=3, y=0.5)
    assert make_key(x=float("nan")) == make_key(x=float("nan"))


def test_key_is_stable_across_processes() -> None:
    code = "from dkn.cache import make_key;print(make_key(model='m', params={'b': [1, 2.5, None], 'a': (3,)}, v='0.1'))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    )
    assert out.stdout.strip() == make_key(v="0.1", params={"a": [3], "b": [1, 2.5, None]}, model="m")


@pytest.mark.parametrize(
    "change",
    [
        {"model": "other"},
        {"fingerprint": "f2"},
        {"prompt": "q?"},
        {"answer": "B"},
        {"method": "ig2"},
        {"params": {"steps": 21, "batch": 4}},
        {"params": {"steps": 20}},
        {"params": {"steps": 20.0, "batch": 4}},
        {"version": "0.1.1"},
        {"extra": None},
    ],
)
def test_any_changed_part_changes_the_key(change: dict) -> None:
    base = dict(
        model="m",
        fingerprint="f",
        prompt="q",
        answer="A",
        method="ig",
        params={"steps": 20, "batch": 4},
        version="0.1.0",
    )
    assert make_key(**base) != make_key(**{**base, **change})


def test_key_rejects_unknown_objects() -> None:
    with pytest.raises(TypeError):
        make_key(x=object())


# ---------------------------------------------------------------- get_or_compute


def test_get_or_compute_caches(store: ResultStore) -> None:
    calls = []

    def compute():
        calls.append(1)
        return {"n": len(calls)}, {"a": np.arange(5, dtype=np.int32)}

    first, cached1 = store.get_or_compute("k", compute, kind="ig")
    second, cached2 = store.get_or_compute("k", compute, kind="ig")
    assert (cached1, cached2) == (False, True) and len(calls) == 1
    assert first.meta == second.meta == {"n": 1}
    np.testing.assert_array_equal(first.arrays["a"], second.arrays["a"])
    assert second.arrays["a"].dtype == np.int32 and store.keys("ig") == ["k"]


# ---------------------------------------------------------------- corruption


def _corrupt(path: Path, key: str, mutate) -> None:
    (blob,) = _raw(path, "SELECT blob FROM results WHERE key = ?", (key,))[0]
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE results SET blob = ? WHERE key = ?", (mutate(bytes(blob)), key))


def _flip(blob: bytes) -> bytes:
    middle = len(blob) // 2
    return blob[:middle] + bytes(b ^ 0xFF for b in blob[middle : middle + 8]) + blob[middle + 8 :]


@pytest.mark.parametrize(
    "mutate", [_flip, lambda b: b[: len(b) // 3], lambda b: b""], ids=["flipped", "truncated", "emptied"]
)
def test_corrupt_entry_is_a_miss_and_recomputed(store: ResultStore, caplog, mutate) -> None:
    store.put("k", {"v": 1}, _arrays())
    store.put("other", {"v": 2})
    _corrupt(store.path, "k", mutate)
    with caplog.at_level(logging.WARNING, logger="dkn.cache"):
        assert store.get("k") is None
    assert any("corrupt" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert store.keys() == ["other"]  # the bad row was deleted, the good one kept

    store.put("k", {"v": 1}, _arrays())
    _corrupt(store.path, "k", mutate)
    entry, cached = store.get_or_compute("k", lambda: ({"v": 9}, {"x": np.ones(3)}))
    assert not cached and entry.meta == {"v": 9}
    assert store.get("k").meta == {"v": 9}


def test_corrupt_meta_or_checksum_is_a_miss(store: ResultStore, caplog) -> None:
    store.put("a", {"v": 1})
    store.put("b", {"v": 2})
    with sqlite3.connect(store.path) as conn:
        conn.execute("UPDATE results SET meta = ? WHERE key = 'a'", (b"\xff\xfe{not json",))
        conn.execute("UPDATE results SET checksum = 'x' WHERE key = 'b'")
    with caplog.at_level(logging.WARNING, logger="dkn.cache"):
        assert store.get("a") is None and store.get("b") is None
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2
    assert list(store.entries()) == []


def test_garbage_database_file_is_moved_aside(tmp_path: Path, caplog) -> None:
    path = tmp_path / "results.sqlite"
    garbage = os.urandom(4096)
    path.write_bytes(garbage)
    with caplog.at_level(logging.WARNING, logger="dkn.cache"):
        store = ResultStore(path)
        assert store.get("k") is None
    aside = list(tmp_path.glob("results.sqlite.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == garbage
    assert any("moved it to" in r.getMessage() for r in caplog.records)
    store.put("k", {"v": 1}, {"a": np.ones(2)})
    assert store.get("k").meta == {"v": 1}
    assert ResultStore(path).get("k").meta == {"v": 1}


def test_database_clobbered_while_open_recovers(tmp_path: Path, caplog) -> None:
    path = tmp_path / "results.sqlite"
    store = ResultStore(path)
    store.put("k", {"v": 1})
    store.close()
    for side in ("-wal", "-shm"):
        Path(f"{path}{side}").unlink(missing_ok=True)
    path.write_bytes(b"garbage" * 1000)
    with caplog.at_level(logging.WARNING, logger="dkn.cache"):
        assert store.get("k") is None
    store.put("k", {"v": 2})
    assert store.get("k").meta == {"v": 2}
    assert len(list(tmp_path.glob("results.sqlite.corrupt-*"))) == 1


def test_malformed_page_moves_database_aside(tmp_path: Path, caplog) -> None:
    path = tmp_path / "results.sqlite"
    store = ResultStore(path)
    for i in range(20):
        store.put(f"k{i}", {"i": i}, {"a": np.ones(10)})
    store.close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'results'").fetchone()[0]
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    data = bytearray(path.read_bytes())
    data[(root - 1) * page_size : (root - 1) * page_size + 100] = b"\x55" * 100
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="dkn.cache"):
        assert ResultStore(path).get("k3") is None
    assert any("malformed" in r.getMessage() for r in caplog.records)
    assert len(list(tmp_path.glob("results.sqlite.corrupt-*"))) == 1
    fresh = ResultStore(path)
    fresh.put("k3", {"v": 1})
    assert fresh.get("k3").meta == {"v": 1}


# ---------------------------------------------------------------- locations


def test_default_location_and_env_override(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("DKN_CACHE_DIR", raising=False)
    repo = Path(__file__).resolve().parent.parent
    assert default_path() == repo / "cache" / "results.sqlite"
    monkeypatch.setenv("DKN_CACHE_DIR", str(tmp_path / "envdir"))
    store = ResultStore()
    assert store.path == tmp_path / "envdir" / "results.sqlite"
    store.put("k", {"v": 1})
    assert store.path.is_file()
    assert ResultStore(tmp_path / "envdir").path == store.path  # a folder gets the default name


def test_wal_mode(store: ResultStore) -> None:
    store.put("k", {})
    assert _raw(store.path, "PRAGMA journal_mode")[0][0] == "wal"


# ---------------------------------------------------------------- concurrency


def _write_many_store(store: ResultStore, writer: int) -> None:
    for i in range(N_PER_WRITER):
        store.put(
            f"w{writer}-{i}", {"writer": writer, "i": i}, {"a": np.full((30, 64), i, np.float32)}, kind=f"w{writer}"
        )
        if i % 10 == 0:
            assert store.get(f"w{writer}-{i}") is not None


def _write_many(path: str, writer: int) -> None:  # runs in a spawned process
    _write_many_store(ResultStore(path), writer)


def _check_all(path: Path, writers: int) -> None:
    store = ResultStore(path)
    assert len(store.keys()) == writers * N_PER_WRITER
    for w in range(writers):
        assert len(store.keys(f"w{w}")) == N_PER_WRITER
        for i in range(N_PER_WRITER):
            entry = store.get(f"w{w}-{i}")
            assert entry is not None and entry.meta == {"writer": w, "i": i}
            assert entry.arrays["a"].shape == (30, 64) and entry.arrays["a"][0, 0] == i


def test_concurrent_processes_and_threads(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "results.sqlite"  # nobody has created it yet
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(str(path), w)) for w in range(4)]
    shared = ResultStore(path)  # one store, one connection per thread
    errors: list[BaseException] = []

    def thread_writer(w: int) -> None:
        try:
            _write_many_store(shared, w)
        except BaseException as exc:  # surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=thread_writer, args=(w,)) for w in range(4, 8)]
    for job in procs + threads:
        job.start()
    for job in procs + threads:
        job.join(timeout=60)
    assert not errors
    assert [p.exitcode for p in procs] == [0] * 4
    _check_all(path, 8)


def test_store_survives_pickling(store: ResultStore) -> None:
    import pickle

    store.put("k", {"v": 1})
    clone = pickle.loads(pickle.dumps(store))
    assert clone.path == store.path and clone.get("k").meta == {"v": 1}


def test_transient_ast_error_while_parsing_is_not_corruption(store: ResultStore, monkeypatch, caplog) -> None:
    """CPython 3.11.7 can raise a spurious SystemError from ast when two threads parse .npy headers at once
    (seen in test_concurrent_processes_and_threads): the entry must be read on a retry, not deleted."""
    import dkn.cache as cache

    store.put("k", {"v": 1}, {"x": np.arange(3)})
    real = np.load
    failures = iter([True, False])

    def flaky_load(*args, **kwargs):
        if next(failures, False):
            raise SystemError("AST constructor recursion depth mismatch (before=39, after=37)")
        return real(*args, **kwargs)

    monkeypatch.setattr(cache.np, "load", flaky_load)
    with caplog.at_level(logging.WARNING, logger="dkn.cache"):
        entry = store.get("k")
    assert entry is not None and entry.arrays["x"].tolist() == [0, 1, 2]
    assert "corrupt" not in caplog.text
    monkeypatch.setattr(cache.np, "load", real)
    assert store.get("k") is not None  # still there


# ---------------------------------------------------------------- damage and odd locations


def test_blob_column_turned_text_is_recomputed_and_replaced(store: ResultStore, caplog) -> None:
    """A row whose blob became TEXT used to raise from inside sqlite3 (not UTF-8) on every get."""
    store.put("k", {"v": 1}, _arrays())
    store.put("other", {"v": 2}, {"x": np.ones(3)})
    store.close()
    with sqlite3.connect(store.path) as conn:
        conn.execute("UPDATE results SET blob = CAST(blob AS TEXT) WHERE key = 'k'")
    assert _raw(store.path, "SELECT typeof(blob) FROM results WHERE key = 'k'") == [("text",)]
    fresh = ResultStore(store.path)
    with caplog.at_level(logging.WARNING, logger="dkn.cache"):
        assert fresh.get("k") is None
    assert any("not a blob" in r.getMessage() for r in caplog.records)
    assert "k" not in fresh.keys()  # removed, not kept to fail again
    entry, cached = fresh.get_or_compute("k", lambda: ({"v": 3}, {"x": np.arange(4)}))
    assert not cached and entry.meta == {"v": 3}
    assert fresh.get("k").meta == {"v": 3} and fresh.get("other").meta == {"v": 2}
    assert _raw(store.path, "SELECT typeof(blob) FROM results WHERE key = 'k'") == [("blob",)]


def test_cache_folder_deleted_mid_run_is_recreated(tmp_path: Path, caplog) -> None:
    import shutil

    store = ResultStore(tmp_path / "cache" / "results.sqlite")
    store.put("before", {"v": 1})
    shutil.rmtree(tmp_path / "cache")  # e.g. `rm -rf cache/` while a run goes on
    with caplog.at_level(logging.WARNING, logger="dkn.cache"):
        store.put("after", {"v": 2})
    assert any("deleted while in use" in r.getMessage() for r in caplog.records)
    assert store.path.is_file()  # written to a real file again, not the unlinked one
    assert ResultStore(store.path).get("after").meta == {"v": 2}
    assert store.get("before") is None


_READ_ONLY_CHILD = """
import json, sys
from dkn.cache import ResultStore
store = ResultStore(sys.argv[1])
hit = store.get("k")
store.put("new", {"v": 2})                   # not kept, no traceback
print(json.dumps({"hit": hit.meta if hit else None, "new": store.get("new") is not None,
                  "read_only": store.read_only}))
"""


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
@pytest.mark.parametrize("where", ["existing", "missing"])
def test_read_only_cache_is_read_with_a_warning(where: str) -> None:
    """A read-only folder: stored results are still read, new ones not kept, one warning, no traceback.
    Root ignores permissions, so under root the child runs as `nobody` (setpriv)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="dkn-ro-"))  # not under tmp_path: its parents are private to root
    try:
        db = folder / "results.sqlite"
        if where == "existing":
            seed = ResultStore(db)
            seed.put("k", {"v": 1})
            seed.close()
            db.chmod(0o444)
        folder.chmod(0o555)
        cmd = [sys.executable, "-c", _READ_ONLY_CHILD, str(db)]
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without setpriv: cannot drop the permissions")
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        repo = Path(__file__).resolve().parent.parent
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=60, cwd=repo, env=dict(os.environ, PYTHONPATH=str(repo))
        )
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        assert "cannot be written" in proc.stderr and "DKN_CACHE_DIR" in proc.stderr
        out = __import__("json").loads(proc.stdout)
        assert out == {"hit": {"v": 1} if where == "existing" else None, "new": False, "read_only": True}
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder)
