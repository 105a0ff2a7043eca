"""The on-disk result store: one SQLite file that remembers computed results.

This module owns everything about caching results between runs and processes:

* `make_key` turns everything that changes a result (model, fingerprint, prompt,
  answer, method, params, library version, ...) into a stable sha256 key.
* `ResultStore` keeps, per key, a JSON `meta` dict plus named numpy arrays.
  Nothing is ever pickled: arrays travel as an `.npz` blob (`np.savez`, read
  back with `allow_pickle=False`), meta as UTF-8 JSON, and a sha256 checksum
  over both guards against corruption.

The database lives at `dkn.paths.cache_dir() / results.sqlite` (`$DKN_CACHE_DIR`,
else the checkout's `cache/`, else the user cache folder) unless a path is given.
It runs in WAL mode with a busy timeout so several processes and threads (e.g.
Streamlit sessions) can write at once; each
thread gets its own connection.  A corrupt entry is logged, deleted and treated
as a miss; a file that is not a database is moved aside to
`<name>.corrupt-<timestamp>` and a fresh one is created.  A column whose type was changed
(e.g. the blob turned into TEXT) counts as corrupt: the entry is deleted and recomputed.

A store that cannot be written (a read-only folder or file) falls back to read-only use with one
warning: stored results are still read, new ones are not kept.  A database file deleted while the
store is open (e.g. `rm -rf cache/` mid-run) is noticed at the next operation, logged, and created
afresh, so later results are not written into the deleted file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dkn import paths
from dkn.errors import DknError

log = logging.getLogger(__name__)

DEFAULT_NAME = "results.sqlite"
BUSY_TIMEOUT_S = 30.0
SCHEMA_VERSION = 1
_CORRUPTION_CODES = ("SQLITE_NOTADB", "SQLITE_CORRUPT")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key      TEXT PRIMARY KEY,
    kind     TEXT NOT NULL DEFAULT '',
    created  REAL NOT NULL,
    meta     BLOB NOT NULL,
    blob     BLOB NOT NULL,
    checksum TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS results_kind ON results (kind, created);
"""

Arrays = dict[str, np.ndarray]
Compute = Callable[[], "tuple[dict, Mapping[str, np.ndarray] | None]"]


@dataclass(frozen=True)
class Entry:
    """One stored result: JSON meta, named arrays, and when it was written."""

    meta: dict
    arrays: Arrays
    created: float


class CorruptEntry(ValueError):
    """A stored row whose checksum, JSON or npz blob does not check out."""


class CacheError(DknError):
    """The cache location cannot be used at all; the message says what to do."""


# --------------------------------------------------------------------- keys


def make_key(**parts: Any) -> str:
    """sha256 hex of a canonical JSON of `parts` (stable across processes).

    Dict order is irrelevant; tuples/lists/sets, numpy scalars and arrays,
    paths, bytes, dataclasses and None are all handled.  `1` and `1.0` give
    different keys on purpose (they are different parameters to Python).
    """
    text = json.dumps(_canonical(parts), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _canonical(obj: Any) -> Any:
    """Turn `obj` into plain JSON types, deterministically."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj  # NaN/inf are written as JSON's NaN/Infinity extensions
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((_canonical(v) for v in obj), key=_sort_text)
    return _canonical_other(obj)


def _canonical_other(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return _canonical(obj.item())
    if isinstance(obj, np.ndarray):
        return {
            "__ndarray__": obj.dtype.str,
            "shape": list(obj.shape),
            "sha256": hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest(),
        }
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (bytes, bytearray)):
        return {"__bytes__": bytes(obj).hex()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _canonical(dataclasses.asdict(obj))
    raise TypeError(f"make_key cannot use a {type(obj).__name__}: pass JSON-like values")


def _sort_text(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


# ----------------------------------------------------------------- encoding


def _check_json_native(obj: Any, where: str = "meta") -> None:
    """Raise TypeError unless `obj` survives a JSON round trip unchanged."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_json_native(v, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} has a non-str key {k!r}; JSON would turn it into a string")
            _check_json_native(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where} is a {type(obj).__name__}; store only dict/list/str/int/float/bool/None")


def _encode(meta: dict, arrays: Mapping[str, np.ndarray]) -> tuple[bytes, bytes, str]:
    """(meta JSON bytes, npz blob, checksum) for one entry."""
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, not {type(meta).__name__}")
    _check_json_native(meta)
    meta_bytes = json.dumps(meta, ensure_ascii=False, allow_nan=True).encode("utf-8")
    buffer = io.BytesIO()
    np.savez(buffer, **{name: _plain_array(name, a) for name, a in arrays.items()})
    blob = buffer.getvalue()
    return meta_bytes, blob, _checksum(meta_bytes, blob)


def _plain_array(name: str, value: Any) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.hasobject:
        raise TypeError(f"array {name!r} has dtype object; it would need pickling")
    return array


def _checksum(meta_bytes: bytes, blob: bytes) -> str:
    digest = hashlib.sha256(len(meta_bytes).to_bytes(8, "little"))
    digest.update(meta_bytes)
    digest.update(blob)
    return digest.hexdigest()


# numpy parses each .npy header with ast.literal_eval.  CPython 3.11.7 keeps the AST constructor's recursion
# depth per interpreter, not per thread, so two threads parsing at once can raise a spurious
# "SystemError: AST constructor recursion depth mismatch" (fixed in later CPython releases).  The bytes passed
# their checksum, so that error is not corruption: parse under one lock and retry the few times another
# library's thread (Streamlit compiles pages with ast) still gets in the way.
_NPZ_LOCK = threading.Lock()
_NPZ_RETRIES = 3


def _load_arrays(blob: bytes) -> dict[str, np.ndarray]:
    for _ in range(_NPZ_RETRIES - 1):
        try:
            return _parse_npz(blob)
        except SystemError:
            continue
    return _parse_npz(blob)


def _parse_npz(blob: bytes) -> dict[str, np.ndarray]:
    with _NPZ_LOCK, np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def _decode(meta_bytes: bytes, blob: bytes, checksum: str, created: float, types: tuple = ("blob", "blob")) -> Entry:
    """Rebuild an Entry, raising CorruptEntry if anything does not check out.  `types`: SQLite's
    typeof() of the meta and blob columns (both must still be 'blob')."""
    if tuple(types) != ("blob", "blob") or not isinstance(meta_bytes, bytes) or not isinstance(blob, bytes):
        raise CorruptEntry(f"meta or blob column is not a blob ({', '.join(map(str, types))})")
    if _checksum(meta_bytes, blob) != checksum:
        raise CorruptEntry("checksum mismatch")
    try:
        meta = json.loads(meta_bytes.decode("utf-8"))
        arrays = _load_arrays(blob)
    except Exception as exc:  # untrusted bytes: any failure to decode is corruption
        raise CorruptEntry(f"cannot decode: {exc!r}") from exc
    if not isinstance(meta, dict):
        raise CorruptEntry("meta is not a JSON object")
    return Entry(meta=meta, arrays=arrays, created=float(created))


# -------------------------------------------------------------------- store


def default_path() -> Path:
    """`results.sqlite` in `dkn.paths.cache_dir()`."""
    return paths.cache_dir() / DEFAULT_NAME


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    name = getattr(exc, "sqlite_errorname", "")
    if name:
        return name.startswith(_CORRUPTION_CODES)
    text = str(exc).lower()
    return "not a database" in text or "malformed" in text


def _is_unwritable(exc: Exception) -> bool:
    if isinstance(exc, PermissionError):
        return True
    text = str(exc).lower()
    return "readonly" in text or "read-only" in text or "unable to open database" in text


class ResultStore:
    """Thread- and process-safe key -> (meta, arrays) store in one SQLite file."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        path = Path(path).expanduser() if path is not None else default_path()
        self.path: Path = path / DEFAULT_NAME if path.is_dir() else path
        self.read_only = False  # set when the location turned out not to be writable
        self._local = threading.local()
        self._open_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ResultStore({str(self.path)!r})"

    def __reduce__(self) -> tuple:  # connections never travel; the path does
        return (ResultStore, (self.path,))

    # ---- public API

    def get(self, key: str) -> Entry | None:
        """The entry for `key`, or None on a miss or a corrupt entry."""
        # CAST: a column turned into TEXT would otherwise fail to decode as UTF-8 inside sqlite3
        row = self._query_one(
            "SELECT CAST(meta AS BLOB), CAST(blob AS BLOB), checksum, created, typeof(meta), typeof(blob) "
            "FROM results WHERE key = ?",
            (key,),
        )
        if row is None:
            return None
        try:
            return _decode(*row[:4], types=row[4:])
        except CorruptEntry as exc:
            log.warning("dkn cache: entry %s in %s is corrupt (%s); deleting it", key, self.path, exc)
            self.delete(key)
            return None

    def put(self, key: str, meta: dict, arrays: Mapping[str, np.ndarray] | None = None, kind: str = "") -> None:
        """Store (or replace) `key` atomically."""
        self._put(key, meta, arrays or {}, kind)

    def _put(self, key: str, meta: dict, arrays: Mapping[str, np.ndarray], kind: str) -> float:
        meta_bytes, blob, checksum = _encode(meta, arrays)
        created = time.time()
        self._write(
            "INSERT OR REPLACE INTO results (key, kind, created, meta, blob, checksum) VALUES (?, ?, ?, ?, ?, ?)",
            (key, kind, created, meta_bytes, blob, checksum),
        )
        return created

    def delete(self, key: str) -> None:
        self._write("DELETE FROM results WHERE key = ?", (key,))

    def clear(self) -> None:
        self._write("DELETE FROM results", ())

    def keys(self, kind: str | None = None) -> list[str]:
        """Keys, oldest first, optionally only those of one `kind`."""
        if kind is None:
            rows = self._query_all("SELECT key FROM results ORDER BY created, key", ())
        else:
            rows = self._query_all("SELECT key FROM results WHERE kind = ? ORDER BY created, key", (kind,))
        return [row[0] for row in rows]

    def entries(self, kind: str | None = None) -> Iterator[tuple[str, Entry]]:
        """(key, entry) pairs, oldest first; corrupt entries are skipped."""
        for key in self.keys(kind):
            entry = self.get(key)
            if entry is not None:
                yield key, entry

    def get_or_compute(self, key: str, compute: Compute, kind: str = "") -> tuple[Entry, bool]:
        """(entry, was_cached): the stored entry, or compute, store and return it."""
        entry = self.get(key)
        if entry is not None:
            return entry, True
        meta, arrays = compute()
        arrays = {name: _plain_array(name, a) for name, a in (arrays or {}).items()}
        created = self._put(key, meta, arrays, kind)
        fresh = json.loads(json.dumps(meta, allow_nan=True))  # the same copy a hit gives
        return Entry(meta=fresh, arrays=arrays, created=created), False

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        self._local.conn = None

    # ---- connection handling

    def _conn(self) -> sqlite3.Connection | None:
        """This thread's connection (None: read-only and no database file to read)."""
        local = self._local
        if getattr(local, "conn", None) is not None and local.pid == os.getpid() and not self._vanished():
            return local.conn
        if getattr(local, "conn", None) is not None and local.pid == os.getpid():
            log.warning(
                "dkn cache: %s was deleted while in use; creating it again (results stored before "
                "are gone, new ones are kept)",
                self.path,
            )
            self.close()
        local.conn, local.ino = self._open()
        local.pid = os.getpid()
        return local.conn

    def _vanished(self) -> bool:
        """True when the open database file was deleted or replaced by another file."""
        if self.read_only:
            return False
        try:
            return self.path.stat().st_ino != self._local.ino
        except FileNotFoundError:
            return True

    def _open(self) -> tuple[sqlite3.Connection | None, int | None]:
        with self._open_lock:
            if self.read_only:
                return self._connect_read_only()
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    return self._connect()
                except sqlite3.DatabaseError as exc:
                    if not _is_corruption(exc):
                        raise
                    self._move_aside(exc)
                    return self._connect()
            except (PermissionError, sqlite3.OperationalError) as exc:
                if not _is_unwritable(exc):
                    raise
                self.read_only = True
                log.warning(
                    "dkn cache: %s cannot be written (%s): results already stored are read, new ones are "
                    "not kept. Set DKN_CACHE_DIR to a writable folder to keep them.",
                    self.path,
                    exc,
                )
                return self._connect_read_only()

    def _connect_read_only(self) -> tuple[sqlite3.Connection | None, int | None]:
        if not self.path.is_file():
            return None, None
        uri = f"{self.path.resolve().as_uri()}?mode=ro&immutable=1"  # immutable: no -wal/-shm files needed
        try:
            return sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, check_same_thread=False), None
        except sqlite3.OperationalError as exc:
            raise CacheError(
                f"the cache {self.path} can be neither written nor read ({exc}): set DKN_CACHE_DIR to a writable folder"
            ) from exc

    def _connect(self) -> tuple[sqlite3.Connection, int]:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                conn.executescript(_SCHEMA)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            conn.close()
            raise
        return conn, self.path.stat().st_ino

    def _move_aside(self, exc: Exception) -> None:
        """Rename a damaged database (and its WAL/SHM) so a fresh one can be made."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            n += 1
        log.warning(
            "dkn cache: %s is not a usable database (%s); moved it to %s and starting a fresh one",
            self.path,
            exc,
            target,
        )
        for suffix in ("-wal", "-shm"):
            side = Path(f"{self.path}{suffix}")
            if side.exists():
                side.replace(f"{target}{suffix}")
        self.path.replace(target)

    def _recover(self, exc: sqlite3.DatabaseError) -> None:
        """After a corruption error mid-use: move the file aside once, then reconnect."""
        ino = getattr(self._local, "ino", None)
        self.close()
        with self._open_lock:
            try:
                still_same = self.path.stat().st_ino == ino
            except FileNotFoundError:
                still_same = False
            if still_same:  # nobody has replaced it yet
                self._move_aside(exc)

    def _run(self, action: Callable[[sqlite3.Connection], Any], empty: Any = None) -> Any:
        """Run `action` (`empty` when there is no database to read), recovering once from a database
        that turned out corrupt."""
        try:
            conn = self._conn()
            return empty if conn is None else action(conn)
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):
                raise
            self._recover(exc)
            conn = self._conn()
            return empty if conn is None else action(conn)

    def _query_one(self, sql: str, params: tuple) -> tuple | None:
        return self._run(lambda conn: conn.execute(sql, params).fetchone())

    def _query_all(self, sql: str, params: tuple) -> list[tuple]:
        return self._run(lambda conn: conn.execute(sql, params).fetchall(), empty=[])

    def _write(self, sql: str, params: tuple) -> None:
        if not self.read_only:
            self._conn()  # may find the location read-only (and say so once)
        if self.read_only:
            return
        try:
            self._run(lambda conn: conn.execute(sql, params))
        except sqlite3.OperationalError as exc:
            if not _is_unwritable(exc):
                raise
            self.read_only = True
            self.close()
            log.warning("dkn cache: %s became read-only (%s): new results are not kept", self.path, exc)
