"""The command line: `python -m dkn COMMAND ...` (see `python -m dkn --help`).

Every command prints human-readable output, or one JSON object with --json.
Bad arguments exit with status 2 and a one-line reason; other tools rely on
the command names and JSON keys, so change them only with care.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from dkn.neurons import parse_neurons

log = logging.getLogger("dkn")


def _dumps(obj) -> str:
    """Strict JSON: NaN and infinities (e.g. a mean over no facts) become null."""
    def clean(x):
        if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(json.loads(json.dumps(obj, default=str))), allow_nan=False)


class UsageError(Exception):
    """A user error: printed as one line, exit status 2."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.run(args) or 0
    except (UsageError, ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"dkn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dkn {args.command}: interrupted; completed results are kept in the cache", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dkn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = _command(sub, "attribute", "attribute an answer's probability to every MLP neuron", run_attribute)
    _model_args(p)
    _fact_args(p)
    _attribution_args(p)
    p.add_argument("--top", type=int, default=20, help="how many top neurons to print (20)")

    p = _command(sub, "intervene", "suppress or amplify neurons and compare the answer's probability", run_intervene)
    _model_args(p)
    _fact_args(p)
    p.add_argument("--suppress", default="", help="neurons to multiply by 0, as LAYER:INDEX,LAYER:INDEX")
    p.add_argument("--amplify", default="", help="neurons to multiply by --factor (default 2)")
    p.add_argument("--factor", type=float, default=None, help="factor for --amplify (2) or for --suppress (0)")
    p.add_argument("--mode", choices=("last", "all", "weights"), default="last",
                   help="answer position only, every position, or through the weights")
    p.add_argument("--top-k", type=int, default=10)

    p = _command(sub, "neurons", "the refined knowledge neurons of a fact over its paraphrases", run_neurons)
    _model_args(p)
    p.add_argument("--fact-prompts", nargs="+", required=True, help="paraphrased prompts of one fact")
    p.add_argument("--answer", required=True)
    p.add_argument("--t", type=float, default=0.2, help="coarse threshold: share of the maximum score (0.2)")
    p.add_argument("--p", type=float, default=0.5, help="refined: coarse in more than this share of prompts (0.5)")
    _attribution_args(p)

    _add_late_commands(sub)
    p = _command(sub, "prepare-default", "convert the offline default model to safetensors (once)", run_prepare)
    return parser


def _command(sub, name, help_text, run):
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(run=run)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _model_args(p):
    p.add_argument("--model", default="default",
                   help="'default', 'gemma3-270m' (after `make gemma`), a Hugging Face id, or a local folder")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="auto (default: CUDA, else MPS, else CPU), cpu, cuda or mps")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="weights' precision (float32); attribution accumulates in float32 anyway")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")


def _fact_args(p):
    p.add_argument("--prompt", required=True)
    p.add_argument("--answer", required=True)


def _attribution_args(p):
    p.add_argument("--method", choices=("ig", "grad_x_act", "activation"), default="ig")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rule", default="midpoint", help="left, right, midpoint, trapezoid, linspace or gauss")
    p.add_argument("--baseline", choices=("zero", "amig"), default="zero")
    p.add_argument("--faithful", action="store_true", help="the DKN authors' script choices (see docs)")
    p.add_argument("--no-cache", action="store_true", help="recompute and do not store")
    p.add_argument("--max-rows", type=_positive_int, default=None, help="at most this many tokens per batched pass (512)")
    p.add_argument("--memory-budget", type=_memory_size, default=None,
                   help="activations one batched pass may keep, e.g. 512MB or 2GB (1GB); results do not change")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _memory_size(text: str) -> int:
    """'2GB', '512MB', '1.5G' or a plain number of bytes -> bytes."""
    units = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30}
    number = text.strip().lower().rstrip("bgkm")
    unit = text.strip().lower()[len(number):]
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
    from dkn.attribution import attribute

    lm = _load(args)
    result = attribute(lm, args.prompt, args.answer, _params(args), store=_store(args),
                       progress=_progress(args, "integrated gradients"))
    top = [{"layer": n.layer, "neuron": n.index, "score": s} for n, s in result.top(args.top)]
    out = {"model": lm.name, "prompt": result.prompt, "answer": result.answer, "prob": result.prob,
           "n_layers": lm.n_layers, "d_mlp": lm.d_mlp, "top": top, "seconds": result.seconds,
           "cached": result.cached, "answer_tokens": list(result.answer_tokens)}
    if args.json:
        print(_dumps(out))
        return 0
    print(f"{lm.label}: P({result.answer!r} | {result.prompt!r}) = {result.prob:.4f}  "
          f"[{'cached' if result.cached else f'{result.seconds:.2f} s'}]")
    for row in top:
        print(f"  L{row['layer']:>3} N{row['neuron']:>6}  {row['score']:+.5f}")
    return 0


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
    out = {"prob_before": r.prob_before, "prob_after": r.prob_after, "relative_change": r.relative_change,
           "top_before": [[t, p] for t, p in r.top_before], "top_after": [[t, p] for t, p in r.top_after],
           "factor": factor, "mode": args.mode, "neurons": [str(n) for n in r.neurons]}
    if args.json:
        print(_dumps(out))
        return 0
    print(f"P(answer): {r.prob_before:.4f} -> {r.prob_after:.4f} ({r.relative_change:+.1%}), "
          f"{len(r.neurons)} neurons x {factor:g}, mode {args.mode}")
    for (tb, pb), (ta, pa) in zip(r.top_before, r.top_after):
        print(f"  {tb!r:>16} {pb:.4f}   {ta!r:>16} {pa:.4f}")
    return 0


def run_neurons(args) -> int:
    from dkn.selection import find_knowledge_neurons

    lm = _load(args)
    start = time.perf_counter()
    kns = find_knowledge_neurons(lm, args.fact_prompts, args.answer, _params(args), t=args.t, p=args.p,
                                 store=_store(args), progress=_progress(args, "attribution"))
    out = {"model": lm.name, "answer": args.answer, "prompts": args.fact_prompts, "t": args.t, "p": args.p,
           "knowledge_neurons": kns.as_records(), "seconds": time.perf_counter() - start}
    if args.json:
        print(_dumps(out))
        return 0
    print(f"{len(kns.neurons)} knowledge neurons (coarse in > {args.p:.0%} of {kns.n_prompts} prompts, t = {args.t}):")
    for row in out["knowledge_neurons"]:
        print(f"  L{row['layer']:>3} N{row['neuron']:>6}  {row['score']:+.5f}  ({row['count']}/{kns.n_prompts})")
    return 0


def run_prepare(args) -> int:
    from dkn.models import prepare_default_model

    folder = prepare_default_model()
    print(_dumps({"folder": str(folder)}) if args.json else f"default model ready in {folder}")
    return 0


def _add_late_commands(sub) -> None:
    p = _command(sub, "dkn", "knowledge neurons, their degenerate groups, and the degeneracy test", run_dkn)
    _model_args(p)
    _fact_args(p)
    p.add_argument("--paraphrase", action="append", default=[], help="another prompt of the same fact (repeat)")
    p.add_argument("--clusterer", default="ntc", help="ntc, ntc_faithful, hierarchical, dbscan, kmeans or amig")
    p.add_argument("--t", type=float, default=0.2)
    p.add_argument("--p", type=float, default=0.5)
    p.add_argument("--threshold-low", type=float, default=0.05)
    p.add_argument("--threshold-high", type=float, default=0.3)
    p.add_argument("--mode", choices=("last", "all", "weights"), default="last")
    _attribution_args(p)

    p = _command(sub, "experiment", "run an analysis experiment over a dataset (resumable)", run_experiment_cmd)
    p.add_argument("name", help="acquisition, robustness, enhancement, fact_checking, evolvability or complexity")
    _model_args(p)
    p.add_argument("--dataset", default="builtin",
                   help="builtin, pararel[:P36], rome, lre[:name], templama[:test|wrong], a file, or several joined by +")
    p.add_argument("--limit", type=int, default=None, help="at most this many facts the model answers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default results/NAME/MODEL)")
    p.add_argument("--param", action="append", default=[], metavar="FIELD=VALUE",
                   help="change one of the experiment's Params (repeatable), e.g. steps=50 or models=default,gemma3-270m")
    p.add_argument("--full", action="store_true", help="the experiment's full-size settings (for a GPU), where it has them")


def run_dkn(args) -> int:
    from dkn.degeneracy import DegeneracyParams, analyse
    from dkn.selection import find_knowledge_neurons

    params = DegeneracyParams(clusterer=args.clusterer, threshold_low=args.threshold_low,
                              threshold_high=args.threshold_high, mode=args.mode)
    params.validate()
    lm = _load(args)
    start = time.perf_counter()
    prompts = [args.prompt] + args.paraphrase
    kns = find_knowledge_neurons(lm, prompts, args.answer, _params(args), t=args.t, p=args.p, store=_store(args),
                                 progress=_progress(args, "attribution"))
    result = analyse(lm, args.prompt, args.answer, kns.neurons, kns.scores, params)
    out = result.as_json()
    out.update(model=lm.name, seconds=time.perf_counter() - start)
    if args.json:
        print(_dumps(out))
        return 0
    print(f"{len(kns.neurons)} knowledge neurons; clusterer {args.clusterer}: {len(result.candidates)} candidate groups")
    for i, c in enumerate(result.candidates):
        members = " ".join(str(n) for n in c.members)
        print(f"  BDC {i}: drop {c.single_drop:+.1%}  {'pass' if c.passed else 'fail'}  [{members}]")
    print(f"all groups together: drop {result.union_drop:+.1%}; random control {result.random_control['mean']:+.1%} "
          f"(sd {result.random_control['std']:.1%}, n={result.random_control['n']})")
    print(f"degeneracy index {result.degeneracy_index:.2f}, groups combine: {result.combination}")
    print(result.verdict)
    return 0


def run_experiment_cmd(args) -> int:
    from dkn.experiments.runner import experiment_module, make_params, run_experiment

    experiment_module(args.name)  # fail on a bad name before loading the model
    params = make_params(args.name, args.param, args.full)
    lm = _load(args)
    bars = {}

    def progress(step, done, total):
        if args.json or not sys.stderr.isatty():
            return
        from tqdm import tqdm
        bar = bars.get(step) or bars.setdefault(step, tqdm(total=total, desc=step, unit="item"))
        bar.total = total
        bar.n = done
        bar.refresh()

    report, out = run_experiment(args.name, lm, args.dataset, limit=args.limit, seed=args.seed, out_dir=args.out,
                                 params=params, progress=progress)
    if args.json:
        print(_dumps({"experiment": args.name, "out": str(out), "summary": report.summary}))
    else:
        print(f"{args.name}: report written to {out / 'report.md'}")
    return 0
