"""Dataset runs on a Ray cluster: the per-fact steps of an experiment spread over model copies.

This module owns everything Ray-specific; the rest of dkn never imports Ray.

* `ClusterSpec` says how to run: how many workers, which cluster (`address`: "auto", "HOST:PORT", or
  None to start a local Ray with this machine's cores), threads and device per worker.
* `worker_pool(lm, spec)` connects (or starts Ray), starts one actor per worker, and closes them (and a
  Ray it started) on exit.  Each actor loads the model once, by the name the driver loaded it with (a
  local folder, "default", a Hugging Face id), pins its torch threads and its GPU if the cluster has
  GPUs, and checks that its weights have the driver's fingerprint.
* `WorkerPool.map` is what `Context.each` calls for the items the store does not have yet: facts are
  handed out one at a time to whichever worker is free (a `ray.wait` loop), and results come back as
  they finish.  The **driver alone** writes them to the SQLite store, so a killed run resumes exactly
  like a local one.

How a step's function reaches a worker: `Context.each(step, items, fn)` receives closures such as
`lambda f: fact_record(ctx, f, params)`.  `_Shipper` pickles them with cloudpickle but replaces every
`Context` and `LoadedModel` inside by a reference, which the worker resolves to its own model and to a
`_WorkerStore`: it reads the driver's store file where the node can see it and keeps what the step
writes (attribution caches) in memory; those writes travel back with the record and the driver stores
them too, so the store ends up as a local run would leave it.

Faults: an actor that dies (killed, out of memory, node lost) is restarted by Ray and the fact it held
is retried on it (`max_retries` times); the other workers' facts are not touched.  A ValueError inside
a step is recorded as {"error": ...} for that item, as in a local run; any other exception stops the
run with the worker's traceback.
"""

from __future__ import annotations

import io
import logging
import math
import os
import pickle
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dkn import __version__
from dkn.cache import Entry, ResultStore
from dkn.errors import DknError
from dkn.experiments.runner import Context
from dkn.models import LoadedModel, ModelLoadError, load_model


class ClusterError(DknError, RuntimeError):
    """The cluster cannot run the steps: Ray missing or not reachable, a worker that cannot start or keeps dying."""


try:
    import ray
    from ray import cloudpickle
except ModuleNotFoundError as err:  # Ray is the optional extra "distributed"
    raise ClusterError(
        "running on a cluster needs Ray: pip install 'dkn[distributed]' (or ray from requirements.txt)"
    ) from err

log = logging.getLogger(__name__)

ItemHook = Callable[[str, str], None]  # (step, item key), called on the worker before each item
START_TIMEOUT_S = 1800.0  # loading a large model on every worker can take minutes


@dataclass(frozen=True)
class ClusterSpec:
    """How to run an experiment's per-fact steps on Ray."""

    workers: int
    address: str | None = None  # "auto", "HOST:PORT", or None: a local Ray with os.cpu_count() CPUs
    threads: int | None = None  # torch threads per worker; None: the cluster's CPUs shared out evenly
    device: str | None = None  # None: "cuda" on a worker that got a GPU, else "cpu"
    max_retries: int = 3  # retries of a fact whose worker died (the worker is always restarted)
    item_hook: ItemHook | None = field(default=None, compare=False)  # tests: runs on the worker

    def validate(self) -> None:
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be a whole number >= 1, not {self.workers!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads per worker must be >= 1, not {self.threads!r}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, not {self.max_retries!r}")


def threads_per_worker(node_cpus: list[float], workers: int, threads: int | None = None) -> int:
    """Torch threads per worker (one Ray CPU each) such that all `workers` fit on nodes with these CPU
    counts: `threads` when given and it fits, else the most that fit."""
    cpus = [int(c) for c in node_cpus if c >= 1]

    def fits(n: int) -> bool:
        return sum(c // n for c in cpus) >= workers

    if threads is not None:
        if not fits(threads):
            raise ValueError(
                f"{workers} workers of {threads} threads do not fit on the Ray cluster's nodes "
                f"({', '.join(map(str, cpus)) or 'no'} CPUs): use fewer workers or threads"
            )
        return threads
    if sum(cpus) < workers:
        raise ValueError(
            f"the Ray cluster has {sum(cpus)} CPUs on {len(cpus)} node(s), too few for {workers} "
            f"workers of one thread each: use --workers {max(sum(cpus), 1)} or fewer, or add nodes"
        )
    return max(n for n in range(1, max(cpus) + 1) if fits(n))


def gpus_per_worker(total_gpus: float, workers: int, device: str | None) -> float:
    """The GPU share of each actor: a whole GPU when there are enough, else an even fraction of one."""
    if (device is not None and not str(device).startswith("cuda")) or total_gpus < 1:
        return 0.0
    return 1.0 / math.ceil(workers / int(total_gpus))


class WorkerPool:
    """Ray actors that each hold the model; `map` runs a step's items on them.  Use `worker_pool()`."""

    def __init__(self, lm: LoadedModel, spec: ClusterSpec):
        spec.validate()
        self.spec, self.item_hook = spec, spec.item_hook
        self._owns_ray = _connect(spec.address)
        try:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            cpus = [n["Resources"].get("CPU", 0) for n in nodes]
            threads = threads_per_worker(cpus, spec.workers, spec.threads)
            gpus = gpus_per_worker(sum(n["Resources"].get("GPU", 0) for n in nodes), spec.workers, spec.device)
            dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
            actor = ray.remote(_Worker).options(
                num_cpus=threads,
                num_gpus=gpus,
                max_restarts=-1,  # restarted
                max_task_retries=spec.max_retries,
                scheduling_strategy="SPREAD",
            )
            self.actors = [
                actor.remote(lm.name, lm.fingerprint, dtype, spec.device, threads) for _ in range(spec.workers)
            ]
            self.workers_info = self._ready()
        except BaseException:
            self.close()
            raise
        log.info(
            "Ray: %d workers ready (%s)",
            len(self.actors),
            ", ".join(f"pid {w['pid']} {w['device']} x{w['threads']}" for w in self.workers_info),
        )

    @property
    def workers(self) -> int:
        return len(self.actors)

    def _ready(self) -> list[dict]:
        try:
            info = ray.get([a.ready.remote() for a in self.actors], timeout=START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError as err:
            raise ClusterError(
                f"the Ray workers did not start within {START_TIMEOUT_S:.0f} s: the cluster may "
                "lack the CPUs/GPUs asked for (see `ray status`)"
            ) from err
        except ray.exceptions.RayActorError as err:
            raise ClusterError(f"a Ray worker could not start: {_cause(err)}") from err
        stale = sorted({w["version"] for w in info} - {__version__})
        if stale:  # results would be stored under this version's run id
            raise ClusterError(
                f"Ray workers run dkn {', '.join(stale)}, this driver dkn {__version__}: install "
                "the same dkn on every node"
            )
        return info

    def map(
        self,
        step: str,
        fn: Callable[[Any], dict],
        jobs: list[tuple[int, str, Any]],
        store_path: str | os.PathLike | None,
    ) -> Iterator[tuple[int, dict]]:
        """Run fn(item) for every (index, key, item) on the workers, one item per free worker; yields
        (index, outcome) as each finishes, outcome = {"record", "writes", "error", "pid", "node"}."""
        if not jobs:
            return
        payload = ray.put(ship(fn))
        queue = iter(jobs)
        running: dict = {}  # ObjectRef -> (actor, index, key)
        store = str(store_path) if store_path is not None else None

        def submit(actor) -> None:
            job = next(queue, None)
            if job is not None:
                index, key, item = job
                ref = actor.run.remote(payload, step, key, item, store, self.item_hook)
                running[ref] = (actor, index, key)

        for actor in self.actors:
            submit(actor)
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            actor, index, key = running.pop(ref)
            outcome = self._outcome(ref, step, key)
            submit(actor)  # keep the worker busy while the driver writes
            yield index, outcome

    def _outcome(self, ref, step: str, key: str) -> dict:
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError as err:  # its worker died on each of 1 + max_retries tries
            raise ClusterError(
                f"{step} {key}: the Ray worker died on this item {self.spec.max_retries + 1} times "
                f"({_cause(err)}); finished items are stored: rerun to resume"
            ) from err

    def close(self) -> None:
        """Stop the actors, and Ray itself when this pool started it."""
        for actor in getattr(self, "actors", []):
            try:
                ray.kill(actor, no_restart=True)
            except (ray.exceptions.RayError, ValueError) as err:  # already gone with its node
                log.debug("ray.kill: %s", err)
        self.actors = []
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False


@contextmanager
def worker_pool(lm: LoadedModel, spec: ClusterSpec) -> Iterator[WorkerPool]:
    """A `WorkerPool` for `lm`, closed (actors stopped, a Ray it started shut down) on exit."""
    pool = WorkerPool(lm, spec)
    try:
        yield pool
    finally:
        pool.close()


def _connect(address: str | None) -> bool:
    """Join `address`, or start a local Ray with this machine's cores; True when this call started Ray.
    An already initialised Ray (a test's cluster, a notebook's) is used as it is."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None  # ray.init would read it too
    try:
        if address:
            _check_reachable(address)
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    except ConnectionError as err:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address!r} ({err}): start one with "
            "`ray start --head` and give its address (HOST:6379), or leave out --ray-address "
            "for a local one"
        ) from err
    return True


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a HOST:PORT nobody listens on (ray.init would retry for minutes)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ConnectionError(f"nothing answers at {host}:{port}: {err}") from err


def _cause(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# -- shipping a step's function --------------------------------------------------------------------------
def ship(fn: Callable) -> bytes:
    """cloudpickle `fn` with every Context / LoadedModel it holds replaced by a reference for the worker."""
    buffer = io.BytesIO()
    _Shipper(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(fn)
    return buffer.getvalue()


class _Shipper(cloudpickle.CloudPickler):
    def reducer_override(self, obj):
        if isinstance(obj, Context):
            return _worker_context, (obj.run_id, obj.seed, obj.lm)
        if isinstance(obj, LoadedModel):
            return _worker_model, (obj.name, obj.fingerprint)
        return super().reducer_override(obj)


_WORKER: _Worker | None = None  # the actor living in this worker process


def _worker_model(name: str, fingerprint: str) -> LoadedModel:
    if _WORKER is None:
        raise ClusterError("a dkn step function was unpickled outside a dkn Ray worker")
    return _WORKER.model(name, fingerprint)


def _worker_context(run_id: str, seed: int, lm: LoadedModel) -> Context:
    return Context(lm, _WORKER.store, run_id, seed)


# -- the worker ----------------------------------------------------------------------------------------
class _WorkerStore:
    """A worker's view of the store: reads its own writes, then the driver's file where this node sees
    it; writes stay in memory until `take()` hands them to the driver, which stores them."""

    def __init__(self):
        self.path: str | None = None
        self._reader: ResultStore | None = None
        self._pending: dict[str, tuple] = {}

    def use(self, path: str | None) -> None:
        self._pending.clear()
        if path != self.path:
            self.path, self._reader = path, None

    def get(self, key: str) -> Entry | None:
        if key in self._pending:
            _, meta, arrays, _ = self._pending[key]
            return Entry(meta=meta, arrays=arrays, created=0.0)
        if self._reader is None and self.path and Path(self.path).exists():
            self._reader = ResultStore(self.path)
        return self._reader.get(key) if self._reader is not None else None

    def put(self, key: str, meta: dict, arrays=None, kind: str = "") -> None:
        self._pending[key] = (key, meta, dict(arrays or {}), kind)

    def take(self) -> list[tuple]:
        writes, self._pending = list(self._pending.values()), {}
        return writes


class _Worker:
    """One Ray actor: a model copy on pinned threads (and GPU), running shipped step functions."""

    def __init__(self, name: str, fingerprint: str, dtype: str, device: str | None, threads: int):
        global _WORKER
        import torch

        torch.set_num_threads(threads)
        self.threads = threads
        self.device = device or ("cuda" if ray.get_gpu_ids() else "cpu")
        self.dtype = getattr(torch, dtype)
        self.main = self._load(name, fingerprint)
        self.other: LoadedModel | None = None  # a second model (the complexity experiment), one at a time
        self.store = _WorkerStore()
        _WORKER = self

    def _load(self, name: str, fingerprint: str) -> LoadedModel:
        lm = load_model(name, device=self.device, dtype=self.dtype)
        if lm.fingerprint != fingerprint:
            raise ModelLoadError(
                f"the worker on {_node()} loaded {name!r} with fingerprint {lm.fingerprint}, the "
                f"driver has {fingerprint}: put the same model at the same path on every node"
            )
        return lm

    def model(self, name: str, fingerprint: str) -> LoadedModel:
        if fingerprint == self.main.fingerprint:
            return self.main
        if self.other is None or self.other.fingerprint != fingerprint:
            self.other = None
            self.other = self._load(name, fingerprint)
        return self.other

    def ready(self) -> dict:
        return {
            "pid": os.getpid(),
            "node": _node(),
            "device": str(self.main.device),
            "threads": self.threads,
            "version": __version__,
        }

    def run(
        self, payload: bytes, step: str, key: str, item: Any, store_path: str | None, hook: ItemHook | None
    ) -> dict:
        self.store.use(store_path)
        if hook is not None:
            hook(step, key)
        fn = pickle.loads(payload)
        error = None
        try:
            record = fn(item)
        except ValueError as err:  # as Context.each does locally: recorded, the run goes on
            error = str(err)
            record = {"error": error}
        return {"record": record, "writes": self.store.take(), "error": error, "pid": os.getpid(), "node": _node()}


def _node() -> str:
    return ray.get_runtime_context().get_node_id()
