"""The command line: `python -m dkn COMMAND ...` (see `python -m dkn --help`).

Every command prints human-readable output, or one JSON object with --json.
Bad arguments exit with status 2 and a one-line reason; other tools rely on
the command names and JSON keys, so change them only with care.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
import traceback
from dataclasses import asdict

from dkn import jsonsafe, options
from dkn.errors import USER_ERRORS, UsageError
from dkn.neurons import parse_neurons

log = logging.getLogger("dkn")


def _dumps(obj) -> str:
    """Strict JSON: NaN and infinities (e.g. a mean over no facts) become null."""
    return jsonsafe.dumps(obj)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_rule_and_steps(parser, args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.run(args) or 0
    except USER_ERRORS as err:  # the project's own errors and bad values; anything else is a bug
        if args.verbose:
            traceback.print_exc()
        print(f"dkn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dkn {args.command}: interrupted; completed results are kept in the cache", file=sys.stderr)
        return 130


def _check_rule_and_steps(parser, args) -> None:
    """A step count the rule cannot take (an odd one for the adaptive rule) is refused before any model loads."""
    from dkn.integration import integration_points

    if getattr(args, "rule", None) is None or getattr(args, "faithful", False):
        return
    steps = args.steps if args.steps is not None else options.default_steps(args.rule)
    try:
        integration_points(args.rule, steps)
    except ValueError as err:
        parser.error(str(err))


# -- argument types: bad numbers are refused by argparse with a sentence (exit status 2) -------------------
def positive_int(text: str) -> int:
    """An int >= 1 (counts: --top, --top-k, --limit, --steps)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def finite_float(text: str) -> float:
    """A float that is neither NaN nor infinite (factors, thresholds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def share(text: str) -> float:
    """A finite float in [0, 1] (the shares t and p)."""
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value:g}")
    return value


def answer_text(text: str) -> str:
    """An answer as typed: trailing newlines and whitespace (e.g. from `$(cat file)`) are not part of it."""
    return text.rstrip()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dkn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = _command(sub, "attribute", "attribute an answer's probability to every MLP neuron", run_attribute)
    _model_args(p)
    _fact_args(p)
    _attribution_args(p)
    p.add_argument("--top", type=positive_int, default=20, help="how many top neurons to print (20)")

    p = _command(sub, "intervene", "suppress or amplify neurons and compare the answer's probability", run_intervene)
    _model_args(p)
    _fact_args(p)
    p.add_argument("--suppress", default="", help="neurons to multiply by 0, as LAYER:INDEX,LAYER:INDEX")
    p.add_argument("--amplify", default="", help="neurons to multiply by --factor (default 2)")
    p.add_argument("--factor", type=finite_float, default=None, help="factor for --amplify (2) or for --suppress (0)")
    p.add_argument(
        "--mode",
        choices=options.MODES,
        default="last",
        help="answer position only, every position, or through the weights",
    )
    p.add_argument("--top-k", type=positive_int, default=10, help="how many top tokens to list (10)")

    p = _command(sub, "neurons", "the refined knowledge neurons of a fact over its paraphrases", run_neurons)
    _model_args(p)
    p.add_argument("--fact-prompts", nargs="+", required=True, help="paraphrased prompts of one fact")
    p.add_argument("--answer", required=True, type=answer_text)
    p.add_argument("--t", type=share, default=0.2, help="coarse threshold: share of the maximum score (0.2)")
    p.add_argument("--p", type=share, default=0.5, help="refined: coarse in more than this share of prompts (0.5)")
    _attribution_args(p)

    _add_late_commands(sub)
    _add_plant_command(sub)
    p = _command(sub, "prepare-default", "convert the offline default model to safetensors (once)", run_prepare)
    _command(sub, "paths", "show the folders dkn uses (cache, models, results, data)", run_paths)
    return parser


def _command(sub, name, help_text, run):
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(run=run)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _model_args(p):
    p.add_argument(
        "--model",
        default="default",
        help="'default', 'gemma3-270m' (after `make gemma`), a Hugging Face id, or a local folder",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=options.DEVICES,
        help="auto (default: CUDA, else MPS, else CPU), cpu, cuda or mps",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=options.DTYPES,
        help="weights' precision (float32); attribution accumulates in float32 anyway",
    )
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")


def _fact_args(p):
    p.add_argument("--prompt", required=True)
    p.add_argument("--answer", required=True, type=answer_text)


def _attribution_args(p):
    p.add_argument("--method", choices=options.METHODS, default="ig")
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help=f"points of the rule ({options.DEFAULT_STEPS} for {options.DEFAULT_RULE}, "
        f"{options.OTHER_RULES_STEPS} for the others)",
    )
    p.add_argument(
        "--rule",
        choices=options.RULES,
        default=options.DEFAULT_RULE,
        help=f"the quadrature rule ({options.DEFAULT_RULE})",
    )
    p.add_argument("--baseline", choices=options.BASELINES, default="zero")
    p.add_argument("--faithful", action="store_true", help="the DKN authors' script choices (see docs)")
    p.add_argument("--no-cache", action="store_true", help="recompute and do not store")
    p.add_argument(
        "--max-rows", type=positive_int, default=None, help="at most this many tokens per batched pass (512)"
    )
    p.add_argument(
        "--memory-budget",
        type=_memory_size,
        default=None,
        help="activations one batched pass may keep, e.g. 512MB or 2GB (1GB); results do not change",
    )


def _memory_size(text: str) -> int:
    """'2GB', '512MB', '1.5G' or a plain number of bytes -> bytes."""
    units = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30}
    number = text.strip().lower().rstrip("bgkm")
    unit = text.strip().lower()[len(number) :]
    try:
        size = float(number) * units[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size: write e.g. 512MB or 2GB") from None
    if not size >= 1:
        raise argparse.ArgumentTypeError(f"the memory budget must be positive, got {text!r}")
    return int(size)


def _load(args):
    from dkn.models import load_model

    start = time.perf_counter()
    lm = load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    log.info("loaded %s in %.1f s", lm.label, time.perf_counter() - start)
    if getattr(args, "max_rows", None) is not None:
        lm.max_rows = args.max_rows
    if getattr(args, "memory_budget", None) is not None:
        lm.memory_budget = args.memory_budget
    return lm


def _params(args):
    from dkn.attribution import AttributionParams

    if args.faithful:
        return AttributionParams.faithful()
    return AttributionParams(method=args.method, steps=args.steps, rule=args.rule, baseline=args.baseline)


def _store(args):
    from dkn.cache import ResultStore

    return None if args.no_cache else ResultStore()


def _progress(args, label: str):
    """A progress bar on stderr for humans; nothing with --json."""
    if args.json or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar = tqdm(total=1, desc=label, unit="row", leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return update


def run_attribute(args) -> int:
    from dkn import memo

    store = _store(args)
    request = _attribute_request(args)
    out = _cached_attribution(store, args, request)
    if out is None:
        from dkn.attribution import attribute, attribution_key
        from dkn.query import make_query

        lm = _load(args)
        params = _params(args)
        result = attribute(
            lm, args.prompt, args.answer, params, store=store, progress=_progress(args, "integrated gradients")
        )
        out = _attribution_out(
            lm.name,
            lm.label,
            result.prompt,
            result.answer,
            result.prob,
            result.scores,
            result.seconds,
            result.cached,
            result.answer_tokens,
            args.top,
            params=asdict(result.params),
            extra=result.extra,
        )
        memo.remember(
            store,
            "attribute",
            args.model,
            request,
            {
                "key": attribution_key(lm, make_query(lm, args.prompt, args.answer), params),
                "label": lm.label,
                "fingerprint": lm.fingerprint,
            },
        )
    if args.json:
        print(_dumps({k: v for k, v in out.items() if k != "label"}))
        return 0
    took = "cached" if out["cached"] else f"{out['seconds']:.2f} s"
    print(f"{out['label']}: P({out['answer']!r} | {out['prompt']!r}) = {out['prob']:.4f}  [{took}]")
    for row in out["top"]:
        print(f"  L{row['layer']:>3} N{row['neuron']:>6}  {row['score']:+.5f}")
    return 0


def _attribute_request(args) -> dict:
    """Everything of an `attribute` call that decides its stored result (the memo's key)."""
    return {
        "prompt": args.prompt,
        "answer": args.answer,
        "method": args.method,
        "steps": args.steps,
        "rule": args.rule,
        "baseline": args.baseline,
        "faithful": args.faithful,
        "dtype": getattr(args, "dtype", None),
    }


def _cached_attribution(store, args, request: dict) -> dict | None:
    """The output of a remembered `attribute` request, read from the store without loading the model."""
    from dkn import memo

    remembered = memo.recall(store, "attribute", args.model, request)
    entry = store.get(remembered["key"]) if remembered else None
    if entry is None:
        return None
    m = entry.meta
    log.info("answered from the cache without loading %s", args.model)
    return _attribution_out(
        args.model,
        remembered.get("label", args.model),
        m["prompt"],
        m["answer"],
        m["prob"],
        entry.arrays["scores"],
        m["seconds"],
        True,
        m["answer_tokens"],
        args.top,
        params=m.get("params", {}),
        extra=m.get("extra", {}),
    )


def _attribution_out(
    model, label, prompt, answer, prob, scores, seconds, cached, answer_tokens, top, *, params: dict, extra: dict
) -> dict:
    """The `attribute` command's output; `params` the AttributionParams as a dict, `extra` what the rule reports
    (the adaptive rule: its intervals per layer, one list per answer token)."""
    from dkn.neurons import top_neurons

    n_layers, d_mlp = scores.shape  # scores: [n_layers, d_mlp]
    rows = [{"layer": n.layer, "neuron": n.index, "score": s} for n, s in top_neurons(scores, top)]
    return {
        "model": model,
        "label": label,
        "prompt": prompt,
        "answer": answer,
        "prob": prob,
        "n_layers": n_layers,
        "d_mlp": d_mlp,
        "top": rows,
        "seconds": seconds,
        "cached": cached,
        "answer_tokens": list(answer_tokens),
        "params": params,
        **({"intervals": extra["intervals"]} if "intervals" in extra else {}),
    }


def run_intervene(args) -> int:
    from dkn.interventions import intervene

    suppress, amplify = parse_neurons(args.suppress), parse_neurons(args.amplify)
    if not suppress and not amplify:
        raise UsageError("give neurons with --suppress or --amplify, e.g. --suppress 12:345,3:7")
    if suppress and amplify:
        raise UsageError("give either --suppress or --amplify, not both")
    factor = args.factor if args.factor is not None else (0.0 if suppress else 2.0)
    lm = _load(args)
    r = intervene(lm, args.prompt, args.answer, suppress or amplify, factor, args.mode, args.top_k)
    out = {
        "prob_before": r.prob_before,
        "prob_after": r.prob_after,
        "relative_change": r.relative_change,
        "top_before": [[t, p] for t, p in r.top_before],
        "top_after": [[t, p] for t, p in r.top_after],
        "factor": factor,
        "mode": args.mode,
        "neurons": [str(n) for n in r.neurons],
    }
    if args.json:
        print(_dumps(out))
        return 0
    print(
        f"P(answer): {r.prob_before:.4f} -> {r.prob_after:.4f} ({r.relative_change:+.1%}), "
        f"{len(r.neurons)} neurons x {factor:g}, mode {args.mode}"
    )
    for (tb, pb), (ta, pa) in zip(r.top_before, r.top_after):
        print(f"  {tb!r:>16} {pb:.4f}   {ta!r:>16} {pa:.4f}")
    return 0


def _knowledge_neurons(lm, args, prompts: list[str], **options):
    """`find_knowledge_neurons` for `prompts` and --answer with the attribution, -t/-p, store and progress flags."""
    from dkn.selection import find_knowledge_neurons

    return find_knowledge_neurons(
        lm,
        prompts,
        args.answer,
        _params(args),
        t=args.t,
        p=args.p,
        store=_store(args),
        progress=_progress(args, "attribution"),
        **options,
    )


def run_neurons(args) -> int:
    lm = _load(args)
    start = time.perf_counter()
    kns = _knowledge_neurons(lm, args, args.fact_prompts)
    out = {
        "model": lm.name,
        "answer": args.answer,
        "prompts": args.fact_prompts,
        "t": args.t,
        "p": args.p,
        "knowledge_neurons": kns.as_records(),
        "seconds": time.perf_counter() - start,
    }
    if args.json:
        print(_dumps(out))
        return 0
    print(f"{len(kns.neurons)} knowledge neurons (coarse in > {args.p:.0%} of {kns.n_prompts} prompts, t = {args.t}):")
    for row in out["knowledge_neurons"]:
        print(f"  L{row['layer']:>3} N{row['neuron']:>6}  {row['score']:+.5f}  ({row['count']}/{kns.n_prompts})")
    return 0


def _add_plant_command(sub) -> None:
    p = _command(
        sub, "plant", "build the default model with planted degenerate facts (constructed for demonstration)", run_plant
    )
    p.add_argument("--out", default=None, help="output folder (default cache/planted/default-twice)")
    p.add_argument("--facts", type=int, default=6, help="how many facts to store twice (6)")
    p.add_argument("--controls", type=int, default=2, help="single-pathway and additive controls, each (2)")
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps (150; about 4 min on 2 cores)")
    p.add_argument(
        "--pathway-a",
        choices=("fewest", "knowledge_neurons", "all_knowledge_neurons"),
        default="fewest",
        help="pathway A: the fewest top knowledge neurons that carry the fact (fewest), all of the fact's "
        "knowledge neurons before B's layers (knowledge_neurons), or all of them in any layer",
    )
    p.add_argument(
        "--design",
        choices=("backup", "copies"),
        default="backup",
        help="backup (the default): pathway A is the fact's own knowledge neurons and B learns to take over when A "
        "is off; copies: two copies of the fact in random neurons of layers 10-11 and 20-21, each enough alone "
        "(--pathway-a does not apply)",
    )
    p.add_argument("--b-per-layer", type=int, default=4, help="pathway B's (or each copy's) neurons per layer (4)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cpu)")


def run_plant(args) -> int:
    from dkn.planted import PlantParams, build_planted_default, read_manifest

    if args.facts < 1 or args.controls < 0 or args.steps < 1 or args.b_per_layer < 1:
        raise UsageError("--facts, --steps and --b-per-layer must be >= 1 and --controls >= 0")
    params = PlantParams(
        n_degenerate=args.facts,
        n_single=args.controls,
        n_additive=args.controls,
        steps=args.steps,
        a_choice=args.pathway_a,
        design=args.design,
        b_per_layer=args.b_per_layer,
    )
    say = (lambda msg: print(msg, file=sys.stderr)) if not args.json else (lambda msg: None)
    folder = build_planted_default(args.out, params, device=args.device, log=say)
    facts = read_manifest(folder)
    if args.json:
        print(_dumps({"folder": str(folder), "facts": [f.as_json() for f in facts]}))
    else:
        print(
            f"planted model ready in {folder}; load it with --model {folder} (or 'planted-default' for the "
            "default location)"
        )
    return 0


def run_prepare(args) -> int:
    from dkn.models import prepare_default_model

    folder = prepare_default_model()
    print(_dumps({"folder": str(folder)}) if args.json else f"default model ready in {folder}")
    return 0


def run_paths(args) -> int:
    from dkn import __version__, paths

    folders = dict(paths.describe(), version=__version__)
    if args.json:
        print(_dumps(folders))
        return 0
    for name, folder in folders.items():
        print(f"{name:>9}  {folder or '-'}")
    return 0


def _add_late_commands(sub) -> None:
    p = _command(sub, "dkn", "knowledge neurons, their degenerate groups, and the degeneracy test", run_dkn)
    _model_args(p)
    _fact_args(p)
    p.add_argument("--paraphrase", action="append", default=[], help="another prompt of the same fact (repeat)")
    p.add_argument(
        "--clusterer",
        choices=options.CLUSTERERS,
        default="ntc",
        help="amig: AMIG's pair definition; backup: conditional attribution rounds",
    )
    p.add_argument("--edge", choices=options.EDGES, default="static", help="graph edge definition")
    p.add_argument("--max-span", type=positive_int, default=3, help="graph: most layers apart two neurons are linked")
    p.add_argument(
        "--require-sufficiency",
        action="store_true",
        help="also demand that each group alone (the others off) keeps the fact",
    )
    p.add_argument("--backup-rounds", type=positive_int, default=4, help="backup discovery: most rounds")
    p.add_argument("--t", type=share, default=0.2)
    p.add_argument("--p", type=share, default=0.5)
    p.add_argument("--per-layer", action="store_true", help="selection: threshold t x the max of each layer")
    p.add_argument("--threshold-low", type=share, default=0.05)
    p.add_argument("--threshold-high", type=share, default=0.3)
    p.add_argument("--mode", choices=options.MODES, default="last")
    _attribution_args(p)

    p = _command(sub, "experiment", "run an analysis experiment over a dataset (resumable)", run_experiment_cmd)
    p.add_argument("name", choices=options.EXPERIMENTS, help="the experiment to run")
    _model_args(p)
    p.add_argument(
        "--dataset",
        default="builtin",
        help="builtin, pararel[:P36], rome, lre[:name], templama[:test|wrong], a file, or several joined by +",
    )
    p.add_argument("--limit", type=positive_int, default=None, help="at most this many facts the model answers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default results/NAME/MODEL)")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="change one of the experiment's Params (repeatable), e.g. steps=50 or models=default,gemma3-270m",
    )
    p.add_argument(
        "--full", action="store_true", help="the experiment's full-size settings (for a GPU), where it has them"
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="run the per-fact steps on Ray with this many model copies (default: in this process)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="auto|HOST:PORT",
        help="join this Ray cluster (with --workers); default: start a local one with this machine's cores",
    )


def run_dkn(args) -> int:
    from dkn.degeneracy import DegeneracyParams, analyse

    params = DegeneracyParams(
        clusterer=args.clusterer,
        threshold_low=args.threshold_low,
        threshold_high=args.threshold_high,
        mode=args.mode,
        edge=args.edge,
        max_span=args.max_span,
        require_sufficiency=args.require_sufficiency,
        backup_rounds=args.backup_rounds,
        backup_attribution=_params(args),
    )
    params.validate()
    lm = _load(args)
    start = time.perf_counter()
    prompts = [args.prompt] + args.paraphrase
    kns = _knowledge_neurons(lm, args, prompts, per_layer=args.per_layer)
    result = analyse(lm, args.prompt, args.answer, kns.neurons, kns.scores, params)
    out = result.as_json()
    out.update(model=lm.name, seconds=time.perf_counter() - start)
    if args.json:
        print(_dumps(out))
        return 0
    print(
        f"{len(kns.neurons)} knowledge neurons; clusterer {args.clusterer}: {len(result.candidates)} candidate groups"
    )
    for i, c in enumerate(result.candidates):
        members = " ".join(str(n) for n in c.members)
        found = f"  round {c.round}" if c.round else ""
        print(
            f"  BDC {i}: drop alone {c.single_drop:+.1%}  {'pass' if c.passed else 'fail'}  "
            f"only it left {c.alone_drop:+.1%} {'sufficient' if c.sufficient else 'insufficient'}{found}  [{members}]"
        )
    print(
        f"all groups together: drop {result.union_drop:+.1%}; random control {result.random_control['mean']:+.1%} "
        f"(sd {result.random_control['std']:.1%}, n={result.random_control['n']})"
    )
    if result.rounds:
        print("peeling (P after each backup round): " + " -> ".join(f"{p:.4f}" for p in result.peeling))
        if result.carriers:
            print("necessary carriers held out (each alone removes the fact): " + " ".join(map(str, result.carriers)))
    print(f"redundancy R {result.redundancy:+.2f}, groups combine: {result.combination}")
    pairs = [(s, v) for s, v in result.interactions if len(s) >= 2]
    if pairs:
        print("interactions: " + ", ".join(f"{'+'.join(map(str, s))} {v:+.1%}" for s, v in pairs[:10]))
    print(result.verdict)
    return 0


def run_experiment_cmd(args) -> int:
    from dkn.experiments.runner import experiment_module, load_facts, make_params, run_experiment

    experiment_module(args.name)  # fail on a bad name, settings or dataset before loading the model
    params = make_params(args.name, args.param, args.full)
    facts = load_facts(args.dataset)
    cluster = _cluster(args)
    lm = _load(args)
    bars = {}
    from dkn.experiments.timing import EtaProgress

    eta = EtaProgress()  # no terminal (a long run under nohup): lines with an ETA

    def progress(step, done, total):
        if args.json:
            return
        if not sys.stderr.isatty():
            return eta(step, done, total)
        from tqdm import tqdm

        bar = bars.get(step) or bars.setdefault(step, tqdm(total=total, desc=step, unit="item"))
        bar.total = total
        bar.n = done
        bar.refresh()

    report, out = run_experiment(
        args.name,
        lm,
        args.dataset,
        limit=args.limit,
        seed=args.seed,
        out_dir=args.out,
        params=params,
        progress=progress,
        facts=facts,
        cluster=cluster,
    )
    if args.json:
        print(_dumps({"experiment": args.name, "out": str(out), "summary": report.summary}))
    else:
        print(f"{args.name}: report written to {out / 'report.md'}")
        from dkn.experiments.timing import StageTimes

        print(StageTimes.from_dict(report.summary.get("stage_seconds", {})).text())
    return 0


def _cluster(args):
    """The Ray settings of --workers / --ray-address, or None for a run in this process."""
    if args.workers is None:
        if args.ray_address:
            raise UsageError("--ray-address needs --workers N: how many model copies to run on the cluster")
        return None
    from dkn.experiments.distributed import ClusterSpec

    return ClusterSpec(workers=args.workers, address=args.ray_address, device=args.device)
