"""Running an experiment over a dataset: resumable steps, progress, and the report on disk.

A run is identified by a hash of the experiment, model fingerprint, dataset,
limit, seed and parameters; rerunning the same command resumes it, because
every completed item is stored under (run id, step, item) in the ResultStore.
Output goes to `dkn.paths.results_dir()/<experiment>/<model>/` by default: records.jsonl, one
CSV per table, the figures (HTML, and PNG/SVG when a browser is available for
Kaleido) and report.md.

With a cluster (`run_experiment(..., cluster=ClusterSpec(workers=N))`, the CLI's --workers), the
items of every step are computed on Ray actors (dkn.experiments.distributed) and this process, the
driver, still writes each result to the store as it arrives: the same run id, the same resume.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import logging
import shlex
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from dkn import __version__
from dkn.attribution import AttributionParams
from dkn.cache import ResultStore, make_key
from dkn.datasets import DatasetError, Fact, load_dataset
from dkn.experiments.timing import StageTimes
from dkn.jsonsafe import jsonable
from dkn.models import LoadedModel
from dkn.paths import results_dir

log = logging.getLogger(__name__)

EXPERIMENTS = {
    "acquisition": "dkn.experiments.acquisition",
    "robustness": "dkn.experiments.robustness",
    "enhancement": "dkn.experiments.enhancement",
    "fact_checking": "dkn.experiments.fact_checking",
    "evolvability": "dkn.experiments.evolvability",
    "complexity": "dkn.experiments.complexity",
}
ProgressFn = Callable[[str, int, int], None]  # (step label, done, total)


@dataclass
class Report:
    """What an experiment returns: tables (name -> pandas DataFrame), figures (name -> plotly Figure),
    Markdown text for the report, and a JSON-able summary."""

    summary: dict
    tables: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)
    markdown: str = ""


@dataclass
class Context:
    lm: LoadedModel
    store: ResultStore
    run_id: str
    seed: int = 0
    progress: ProgressFn | None = None
    computed: int = 0  # items computed in this run (not taken from the store)
    pool: Any = None  # a distributed.WorkerPool: compute items on Ray workers
    stages: StageTimes = field(default_factory=StageTimes)  # wall time per stage (dkn.experiments.timing)

    def each(
        self, step: str, items: Iterable[tuple[str, Any]], fn: Callable[[Any], dict], report: bool = True
    ) -> list[dict]:
        """fn(item) for every (key, item), resumably: finished items come from the store.  A ValueError
        (bad fact, unusable prompt) is recorded as {"error": message} for that item and the run goes on.
        With a pool, the missing items are computed on its workers and stored here as they arrive.
        `report=False`: no progress lines (the caller reports its own)."""
        items = list(items)
        if not report:
            progress, self.progress = self.progress, None
            try:
                return self.each(step, items, fn)
            finally:
                self.progress = progress
        if self.pool is not None:
            return self._each_on_pool(step, items, fn)
        results = []
        for done, (key, item) in enumerate(items):
            store_key = make_key(run=self.run_id, step=step, item=key)
            entry = self.store.get(store_key)
            if entry is None:
                try:
                    record = fn(item)
                except ValueError as err:
                    log.warning("%s: %s skipped: %s", step, key, err)
                    record = {"error": str(err)}
                self.store.put(store_key, record, kind=f"run:{self.run_id}")
                self.computed += 1
            else:
                record = entry.meta
            results.append(record)
            if self.progress is not None:
                self.progress(step, done + 1, len(items))
        return results

    def _each_on_pool(self, step: str, items: list[tuple[str, Any]], fn: Callable[[Any], dict]) -> list[dict]:
        keys = [make_key(run=self.run_id, step=step, item=key) for key, _ in items]
        results: list[dict | None] = []
        for store_key in keys:
            entry = self.store.get(store_key)
            results.append(None if entry is None else entry.meta)
        jobs = [(i, str(items[i][0]), items[i][1]) for i, r in enumerate(results) if r is None]
        done = len(items) - len(jobs)
        if self.progress is not None and done:
            self.progress(step, done, len(items))
        for i, outcome in self.pool.map(step, fn, jobs, getattr(self.store, "path", None)):
            if outcome["error"] is not None:
                log.warning("%s: %s skipped: %s", step, items[i][0], outcome["error"])
            for key, meta, arrays, kind in outcome["writes"]:  # the worker's caches (attributions)
                self.store.put(key, meta, arrays, kind=kind)
            self.store.put(keys[i], outcome["record"], kind=f"run:{self.run_id}")
            results[i] = outcome["record"]
            self.computed += 1
            done += 1
            if self.progress is not None:
                self.progress(step, done, len(items))
        return results


def experiment_module(name: str):
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}: use one of {', '.join(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name])


def run_experiment(
    name: str,
    lm: LoadedModel,
    dataset: str,
    *,
    limit: int | None = None,
    seed: int = 0,
    params: Any = None,
    store: ResultStore | None = None,
    out_dir: str | Path | None = None,
    progress: ProgressFn | None = None,
    command: str | None = None,
    facts: list[Fact] | None = None,
    cluster: Any = None,
) -> tuple[Report, Path]:
    """Run (or resume) experiment `name` on `dataset` and write its report; returns (report, folder).
    `facts`: the dataset already loaded by `load_facts(dataset)` (the CLI checks it before loading the model).
    `cluster`: a distributed.ClusterSpec (a pool is started for this run and closed after it) or an open
    distributed.WorkerPool; None runs every step in this process."""
    module = experiment_module(name)
    params = params or module.Params()
    facts = load_facts(dataset) if facts is None else facts
    if not facts:
        raise DatasetError(f"dataset {dataset!r} has no facts")
    store = store or ResultStore()
    run_id = run_key(name, lm, dataset, seed, params)
    ctx = Context(lm, store, run_id, seed, progress)
    report = _run_module(module, ctx, facts, params, limit, cluster)
    report.summary["stage_seconds"] = ctx.stages.as_dict()
    report.markdown += ctx.stages.markdown()
    out = Path(out_dir) if out_dir else results_dir() / name / _slug(lm.name)
    manifest = {
        "experiment": name,
        "model": lm.name,
        "model_label": lm.label,
        "fingerprint": lm.fingerprint,
        "dataset": dataset,
        "limit": limit,
        "seed": seed,
        "params": jsonable(params),
        "run_id": run_id,
        "version": __version__,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": command or "python -m dkn " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }
    write_report(out, report, manifest)
    return report, out


def run_key(name: str, lm: LoadedModel, dataset: str, seed: int, params: Any) -> str:
    """The id under which a run's per-fact steps are stored (what a rerun resumes from).  It holds the library's
    attribution defaults, which `attribution=None` in the params stands for: when a default changes (the
    integration rule did), a rerun computes afresh instead of resuming results of the old default."""
    return make_key(
        experiment=name,
        model=lm.name,
        fingerprint=lm.fingerprint,
        dataset=dataset,
        seed=seed,
        params=jsonable(params),
        attribution_defaults=asdict(AttributionParams()),
        version=__version__,
    )[:16]


def _run_module(module, ctx: Context, facts: list[Fact], params: Any, limit: int | None, cluster: Any) -> Report:
    if cluster is None:
        return module.run(ctx, facts, params, limit)
    from dkn.experiments.distributed import ClusterSpec, worker_pool

    if not isinstance(cluster, ClusterSpec):  # an open pool
        ctx.pool = cluster
        return module.run(ctx, facts, params, limit)
    with worker_pool(ctx.lm, cluster) as pool:
        ctx.pool = pool
        return module.run(ctx, facts, params, limit)


def make_params(name: str, settings: Iterable[str] = (), full: bool = False) -> Any:
    """An experiment's Params: its defaults (or `Params.full()`, GPU-size settings, when asked and offered),
    with "field=value" settings applied; tuple fields take comma-separated values ("models=default,gemma3-270m")."""
    import dataclasses
    import typing

    cls = experiment_module(name).Params
    if full and not hasattr(cls, "full"):
        raise ValueError(f"experiment {name!r} has no full-size settings")
    params = cls.full() if full else cls()
    hints = typing.get_type_hints(cls)
    changes = {}
    for item in settings:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in {f.name for f in fields(cls)}:
            raise ValueError(
                f"bad setting {item!r} for {name}: use FIELD=VALUE with FIELD one of "
                f"{', '.join(f.name for f in fields(cls))}"
            )
        changes[key] = _parse_setting(text.strip(), hints[key], getattr(params, key))
    return dataclasses.replace(params, **changes)


def _parse_setting(text: str, hint, current) -> Any:
    import typing

    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if text.lower() in ("none", "null") and type(None) in typing.get_args(hint):
        return None
    if isinstance(current, tuple) or typing.get_origin(hint) is tuple:
        return tuple(t.strip() for t in text.split(",") if t.strip())
    kind = args[0] if args else hint
    if kind is bool:
        return text.lower() in ("1", "true", "yes", "on")
    if kind in (int, float, str):
        return kind(text)
    raise ValueError(f"setting {text!r}: this field cannot be set from the command line")


def load_facts(spec: str) -> list[Fact]:
    """One dataset, or several joined by "+" ("builtin+pararel+rome"), interleaved round-robin so that a
    limit draws evenly from each."""
    sources = [load_dataset(part.strip()) for part in spec.split("+") if part.strip()]
    if not sources:
        raise DatasetError("no dataset given: use builtin, pararel, rome, lre, templama or a file path")
    merged = []
    for i in range(max(len(s) for s in sources)):
        merged += [s[i] for s in sources if i < len(s)]
    return merged


def write_report(out: Path, report: Report, manifest: dict) -> None:
    """report.md, summary.json, tables as CSV, figures as HTML (+ PNG/SVG when Kaleido can run)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(
        json.dumps({"manifest": manifest, "summary": report.summary}, indent=2, default=str)
    )
    for name, table in report.tables.items():
        table.to_csv(out / f"{name}.csv", index=False)
    images = []
    for name, figure in report.figures.items():
        figure.write_html(out / f"{name}.html", include_plotlyjs="cdn")
        images.append(name if _write_static(figure, out / name) else None)
    header = (
        f"# {manifest['experiment']} on {manifest['model_label']}\n\n"
        f"- command: `{manifest['command']}`\n- model fingerprint: `{manifest['fingerprint']}`\n"
        f"- dataset: `{manifest['dataset']}` (limit {manifest['limit']}), seed {manifest['seed']}\n"
        f"- dkn {manifest['version']}, {manifest['date']}\n\n"
    )
    figures = "".join(f"\n![{n}]({n}.png)\n" for n in images if n)
    tables = "".join(f"\n### {name}\n\n{_markdown_table(t)}\n" for name, t in report.tables.items())
    (out / "report.md").write_text(header + report.markdown + "\n" + tables + figures)


def _write_static(figure, stem: Path) -> bool:
    try:
        figure.write_image(str(stem) + ".png", scale=2)
        figure.write_image(str(stem) + ".svg")
        return True
    except Exception as err:  # no browser for Kaleido: the HTML figure is still written
        log.warning("PNG/SVG export of %s skipped (%s); install Chromium for static images", stem.name, err)
        return False


def _markdown_table(table) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_") or "model"


def known_records(ctx: Context, facts: list[Fact]) -> list[dict]:
    """The "known" step of each fact, stored and resumable: {"known": the model's top-1 after the first prompt
    is the first token of an answer}, or {"error": ...} for a fact it cannot be asked.  The one step every
    experiment's fact filter uses, so a fact is checked once per run and model; no progress lines (the
    callers report what they are looking for)."""
    from dkn.evaluate import answers_correctly

    return ctx.each(
        "known",
        [(f.id, f) for f in facts],
        lambda f: {"known": answers_correctly(ctx.lm, f.prompt, f.answers)},
        report=False,
    )


def known_facts(ctx: Context, facts: list[Fact], limit: int | None) -> list[Fact]:
    """The facts the model answers (top-1 is the first token of an answer), up to `limit`, in order.
    Checked lazily in the dataset's order and stored, so large datasets cost only what is needed."""
    chosen = []
    chunk = 1 if ctx.pool is None else 4 * ctx.pool.workers  # on a cluster: a few facts per worker at once
    needed = len(facts) if limit is None else min(limit, len(facts))
    for start in range(0, len(facts), chunk):
        part = facts[start : start + chunk]
        records = known_records(ctx, part)
        found = [fact for fact, record in zip(part, records) if record.get("known")]
        chosen += found
        if ctx.progress is None:
            pass
        elif limit is None:  # every fact is checked: count the checks
            ctx.progress("facts checked", min(start + chunk, len(facts)), len(facts))
        elif found:  # a line per chunk that answered, so that the ETA counts the misses in between
            ctx.progress("facts the model answers", min(len(chosen), needed), needed)
        if limit is not None and len(chosen) >= limit:
            chosen = chosen[:limit]
            break
    if not chosen:
        raise DatasetError("the model answers none of this dataset's facts: choose another dataset or model")
    return chosen


__all__ = [
    "EXPERIMENTS",
    "Context",
    "Report",
    "experiment_module",
    "known_facts",
    "known_records",
    "load_facts",
    "make_params",
    "past_runs",
    "run_experiment",
    "write_report",
]


def past_runs(*roots: str | Path) -> list[dict]:
    """Every finished run under `roots` (folders holding summary.json), newest first:
    {"folder", "manifest", "summary"}.  Unreadable folders are skipped with a warning."""
    runs = []
    for root in roots:
        for path in sorted(Path(root).glob("**/summary.json")):
            try:
                data = json.loads(path.read_text())
                runs.append({"folder": path.parent, "manifest": data["manifest"], "summary": data["summary"]})
            except (OSError, ValueError, KeyError) as err:
                log.warning("skipping %s: %s", path, err)
    return sorted(runs, key=lambda r: r["manifest"].get("date", ""), reverse=True)
