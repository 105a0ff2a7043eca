#!/usr/bin/env python
"""Benchmark: dkn's fast integrated gradients against the peer, EleutherAI's knowledge-neurons 0.0.2.

Run from the repository root with our venv's python:

    .venv/bin/python bench/bench_attribution.py [--repeats 3] [--skip-peer] [--skip-default-model]

What it does (see bench/README.md):
1. builds (once, idempotently) the peer's own venv at .bench-venv-peer: torch==2.13.0 (never another
   build), transformers at our venv's version, einops, tqdm, numpy, then knowledge-neurons==0.0.2 --no-deps;
2. builds (once) a randomly initialised GPT-2-small-shaped model (GPT2Config() defaults, seed 0) and a
   locally trained byte-level BPE tokenizer padded to 50257 ids, saved under cache/bench/gpt2-small-random/;
3. starts two long-lived workers, the peer in its venv and ours in .venv, each loads the model once and
   warms up once per prompt; then the driver alternates them (peer, ours, peer, ours, ...) for --repeats
   rounds per prompt, timing only the attribution call inside the worker, and reports medians, ratios and
   the Pearson correlation of the two [12, 3072] score arrays;
4. on the real default model (our venv only): the fast path (3 runs, median) against reference_loop=True
   (the plain per-layer loop, one run);
5. writes bench/results/attribution.json and bench/results/attribution.md.

Matched definitions (read from knowledge_neurons/knowledge_neurons.py and patch.py of 0.0.2):
* site: the peer hooks `transformer.h[l].mlp.c_fc`'s OUTPUT (the pre-activation, before GELU) at the last
  position -> our site="pre";
* alphas: `torch.linspace(0, 1, steps)` (both ends included), gradients summed and multiplied by
  activation / steps -> our rule="linspace" (alphas linspace(0, 1, m), weights 1/m);
* multiplier: the activation itself; with the zero baseline our "delta" (a - b) equals a -> multiplier="delta",
  baseline="zero";
* target: softmax probability of the ground truth's token at the last position (`tokenizer.encode(gt)`;
  with model_type="gpt2" only single-token answers work, so the answer is one token, given with its
  leading space as our make_query normalises it).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUR_VENV = ROOT / ".venv"
PEER_VENV = ROOT / ".bench-venv-peer"
PEER_REQUIREMENTS = ROOT / "bench" / "requirements-peer.txt"
MODEL_DIR = ROOT / "cache" / "bench" / "gpt2-small-random"
RESULTS_DIR = ROOT / "bench" / "results"
TORCH_PIN = "2.13.0"
PEER_PACKAGE = "knowledge-neurons==0.0.2"
SEED = 0
STEPS = 20
VOCAB = 50257
ANSWER = " Paris"
# name -> (prompt, expected token count, speed-up target)
PROMPTS = {
    "short": ("The capital of France is", 5, 6.0),
    "long": (
        "The old travel guide that my grandmother kept on the shelf beside the kitchen window says, "
        "in the chapter about Europe, that the capital of France is",
        29,
        20.0,
    ),
}
DEFAULT_PROMPT, DEFAULT_ANSWER = "The capital of France is", "Paris"
MATCHED = dict(steps=STEPS, rule="linspace", baseline="zero", site="pre", multiplier="delta")

TRAIN_TEXT = (
    "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid. "
    "In the old travel guide that my grandmother kept on the shelf beside the window of her small kitchen, "
    "the chapter about Europe says that the capital of France is Paris, and the chapter about Asia says "
    "that the capital of Japan is Tokyo. She read it every morning with a cup of tea and a slice of bread. "
    "Knowledge neurons store facts in the feed forward layers of a transformer language model. "
    "Integrated gradients attribute the probability of the answer to every neuron of every layer. "
)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# the peer's venv
# ---------------------------------------------------------------------------------------------------------
def our_transformers_version() -> str:
    req = ROOT / "requirements.txt"
    if req.exists():
        m = re.search(r"^\s*transformers\s*==\s*([^\s;#]+)", req.read_text(), re.M)
        if m:
            return m.group(1)
    out = subprocess.run(
        [str(OUR_VENV / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('transformers'))"],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def _base_python() -> str:
    cfg = OUR_VENV / "pyvenv.cfg"
    if cfg.exists():
        m = re.search(r"^executable\s*=\s*(.+)$", cfg.read_text(), re.M)
        if m and Path(m.group(1).strip()).exists():
            return m.group(1).strip()
    return sys.executable


def ensure_peer_venv() -> dict:
    """Create/refresh .bench-venv-peer; a marker file records what was installed so reruns are no-ops."""
    tf = our_transformers_version()
    spec = {"torch": TORCH_PIN, "transformers": tf, "peer": PEER_PACKAGE, "requirements": PEER_REQUIREMENTS.read_text()}
    marker = PEER_VENV / ".bench-installed.json"
    py = PEER_VENV / "bin" / "python"
    if marker.exists() and py.exists():
        try:
            if json.loads(marker.read_text()) == spec:
                check = subprocess.run(
                    [
                        str(py),
                        "-c",
                        "import torch, transformers, knowledge_neurons, einops;"
                        "print(torch.__version__, transformers.__version__)",
                    ],
                    capture_output=True,
                    text=True,
                )
                if check.returncode == 0:
                    log(f"peer venv up to date ({check.stdout.strip()})")
                    return spec
        except json.JSONDecodeError:
            pass
    log(f"building the peer venv at {PEER_VENV} (torch {TORCH_PIN}, transformers {tf}, {PEER_PACKAGE})")
    if not py.exists():
        subprocess.run([_base_python(), "-m", "venv", str(PEER_VENV)], check=True)
    constraints = PEER_VENV / "bench-constraints.txt"
    constraints.write_text(f"torch=={TORCH_PIN}\n")
    pip = [str(py), "-m", "pip", "install", "--quiet", "-c", str(constraints)]
    subprocess.run(pip + [f"torch=={TORCH_PIN}"], check=True)
    subprocess.run(pip + ["-r", str(PEER_REQUIREMENTS), f"transformers=={tf}"], check=True)
    subprocess.run(pip + ["--no-deps", PEER_PACKAGE], check=True)
    got = subprocess.run(
        [str(py), "-c", "import torch; print(torch.__version__)"], check=True, capture_output=True, text=True
    ).stdout.strip()
    if got.split("+")[0] != TORCH_PIN:
        raise SystemExit(f"the peer venv got torch {got}, not {TORCH_PIN}: refusing to benchmark")
    marker.write_text(json.dumps(spec, indent=1))
    return spec


# ---------------------------------------------------------------------------------------------------------
# the random GPT-2-small model and its tokenizer (built in our venv)
# ---------------------------------------------------------------------------------------------------------
def ensure_model() -> Path:
    if (MODEL_DIR / "model.safetensors").exists() and (MODEL_DIR / "tokenizer.json").exists():
        return MODEL_DIR
    import shutil
    import tempfile

    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    log(f"building the random GPT-2-small model and tokenizer under {MODEL_DIR} (once)")
    tmp = MODEL_DIR.with_name(MODEL_DIR.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # tokenizer: byte-level BPE trained on TRAIN_TEXT (every word of it becomes one token), then padded
    # with unreachable filler entries to ids 0..50255 and <|endoftext|> at 50256, like GPT-2.
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [TRAIN_TEXT] * 8, vocab_size=VOCAB - 1, min_frequency=2, special_tokens=[], show_progress=False
    )
    with tempfile.TemporaryDirectory() as d:
        vocab_file, merges_file = bpe.save_model(d)
        vocab = json.loads(Path(vocab_file).read_text())
        merges = [tuple(line.split(" ")) for line in Path(merges_file).read_text().splitlines()[1:] if line.strip()]
    n = len(vocab)
    for i in range(n, VOCAB - 1):
        vocab[f"<|bench_unused_{i}|>"] = i
    vocab["<|endoftext|>"] = VOCAB - 1
    assert sorted(vocab.values()) == list(range(VOCAB))
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
    tok.save_pretrained(tmp)
    torch.manual_seed(SEED)
    config = GPT2Config()  # 12 layers, 768 wide, 3072 MLP, vocab 50257
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(MODEL_DIR, ignore_errors=True)
    os.replace(tmp, MODEL_DIR)
    return MODEL_DIR


def check_prompts(model_dir: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    info = {}
    for name, (prompt, want, _) in PROMPTS.items():
        ids = tok(prompt)["input_ids"]
        if len(ids) != want:
            raise SystemExit(f"prompt {name!r} is {len(ids)} tokens, not {want}: adjust PROMPTS/TRAIN_TEXT")
        full = tok(prompt + ANSWER)["input_ids"]
        ans = tok.encode(ANSWER)
        if len(ans) != 1 or full != ids + ans:
            raise SystemExit(f"the answer {ANSWER!r} must be one token that does not merge with the prompt")
        info[name] = {"prompt": prompt, "tokens": len(ids), "answer": ANSWER, "answer_id": ans[0]}
    return info


# ---------------------------------------------------------------------------------------------------------
# workers: one long-lived process per side, reading JSON commands on stdin, answering on stdout
# ---------------------------------------------------------------------------------------------------------
def worker_main(side: str, model_dir: str) -> None:
    import numpy as np
    import torch
    import transformers
    from transformers import AutoTokenizer, GPT2LMHeadModel

    if os.environ.get("BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    torch.manual_seed(SEED)
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    if side == "peer":
        from knowledge_neurons import KnowledgeNeurons

        kn = KnowledgeNeurons(model, tok, model_type="gpt2", device="cpu")

        def run(prompt, answer):
            scores = kn.get_scores(prompt, answer, batch_size=STEPS, steps=STEPS, pbar=False)
            return scores.detach().cpu().numpy()
    else:
        sys.path.insert(0, str(ROOT))
        from dkn.attribution import AttributionParams, attribute
        from dkn.models import wrap_model

        lm = wrap_model(model, tok, name="gpt2-small-random")
        params = AttributionParams(**MATCHED)

        def run(prompt, answer):
            return attribute(lm, prompt, answer, params).scores

        def profile(prompt, answer):
            return ours_breakdown(lm, prompt, answer, params)

    out = sys.stdout
    sys.stdout = sys.stderr  # anything the libraries print goes to stderr, not the protocol
    hello = {
        "ready": True,
        "side": side,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "python": sys.executable,
    }
    out.write(json.dumps(hello) + "\n")
    out.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        if cmd.get("profile"):
            out.write(json.dumps(profile(cmd["prompt"], cmd["answer"])) + "\n")
            out.flush()
            continue
        t0 = time.perf_counter()
        scores = run(cmd["prompt"], cmd["answer"])
        seconds = time.perf_counter() - t0
        if cmd.get("save"):
            np.save(cmd["save"], np.asarray(scores, dtype=np.float64))
        out.write(json.dumps({"seconds": seconds, "shape": list(np.shape(scores))}) + "\n")
        out.flush()


def ours_breakdown(lm, prompt: str, answer: str, params) -> dict:
    """Where our attribution call spends its time: wall seconds per phase (dkn.attribution's helpers wrapped
    for one run, nothing in dkn changed) and the top aten ops of a second run under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    import dkn.attribution as A
    import dkn.rows as R

    phases = {
        "_clean_activations": "clean forward (record activations, P(answer))",
        "answer_runner": "runner setup (prefix KV cache, clean capture, head check)",
        "baseline_probs": "baseline probs (one extra row per layer)",
        "integrated_grads": "integrated gradients (all layer x alpha rows)",
        "_row_logits": "  of which: forward of the rows (staggered blocks + head)",
    }
    spent = dict.fromkeys(phases, 0.0)
    stack = []
    owner = {name: R if name == "_row_logits" else A for name in phases}  # where attribute() looks each up
    originals = {name: getattr(owner[name], name) for name in phases}

    def wrapped(name):
        f = originals[name]

        def g(*a, **k):
            stack.append(name)
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                dt = time.perf_counter() - t
                stack.pop()
                if name != "_row_logits" or "integrated_grads" in stack:
                    spent[name] += dt

        return g

    for name in phases:
        setattr(owner[name], name, wrapped(name))
    try:
        t0 = time.perf_counter()
        A.attribute(lm, prompt, answer, params)
        total = time.perf_counter() - t0
    finally:
        for name, f in originals.items():
            setattr(owner[name], name, f)
    rows = {phases[n]: round(v, 3) for n, v in spent.items()}
    rows["  of which: softmax + backward of the rows"] = round(spent["integrated_grads"] - spent["_row_logits"], 3)
    rows["other (query, numpy, ...)"] = round(total - sum(v for n, v in spent.items() if n != "_row_logits"), 3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        A.attribute(lm, prompt, answer, params)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    top = [{"op": e.key, "self_s": round(e.self_cpu_time_total / 1e6, 3), "calls": e.count} for e in ops]
    return {
        "total_s": round(total, 3),
        "phases_s": rows,
        "top_ops": top,
        "profiled_total_s": round(sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6, 3),
    }


class Worker:
    def __init__(self, side: str, python: Path, model_dir: Path):
        self.side = side
        env = dict(
            os.environ,
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            PYTHONUNBUFFERED="1",
        )
        self.proc = subprocess.Popen(
            [str(python), str(Path(__file__).resolve()), "--worker", side, "--model-dir", str(model_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(ROOT),
        )
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.side} worker died (exit code {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def run(self, prompt: str, answer: str, save: Path | None = None) -> float:
        self.proc.stdin.write(
            json.dumps({"prompt": prompt, "answer": answer, "save": str(save) if save else None}) + "\n"
        )
        self.proc.stdin.flush()
        return self._read()["seconds"]

    def profile(self, prompt: str, answer: str) -> dict:
        self.proc.stdin.write(json.dumps({"profile": True, "prompt": prompt, "answer": answer}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            self.proc.wait(timeout=60)


def pearson(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def bench_random_model(repeats: int, skip_peer: bool) -> dict:
    import numpy as np

    model_dir = ensure_model()
    prompts = check_prompts(model_dir)
    scratch = ROOT / "cache" / "bench" / "scores"
    scratch.mkdir(parents=True, exist_ok=True)
    workers = {}
    try:
        if not skip_peer:
            workers["peer"] = Worker("peer", PEER_VENV / "bin" / "python", model_dir)
        workers["ours"] = Worker("ours", OUR_VENV / "bin" / "python", model_dir)
        for w in workers.values():
            log(
                f"{w.side} worker ready: torch {w.info['torch']}, transformers {w.info['transformers']}, "
                f"{w.info['threads']} threads"
            )
        results = {"workers": {k: w.info for k, w in workers.items()}, "prompts": {}}
        for name, (prompt, _, target) in PROMPTS.items():
            # warm-up, once per side and prompt; its scores are the ones compared (the method is deterministic)
            for side, w in workers.items():
                s = w.run(prompt, ANSWER, save=scratch / f"{name}-{side}.npy")
                log(f"{name}: {side} warm-up {s:.2f} s")
            times = {side: [] for side in workers}
            for r in range(repeats):
                for side, w in workers.items():  # peer, ours, peer, ours, ...
                    times[side].append(w.run(prompt, ANSWER))
                    log(f"{name}: {side} run {r + 1}/{repeats} {times[side][-1]:.2f} s")
            entry = dict(
                prompts[name],
                steps=STEPS,
                target_speedup=target,
                seconds=dict(times),
                median_s={side: statistics.median(t) for side, t in times.items()},
                min_s={side: min(t) for side, t in times.items()},
            )
            ours_scores = np.load(scratch / f"{name}-ours.npy")
            entry["scores_shape"] = list(ours_scores.shape)
            if "peer" in workers:
                peer_scores = np.load(scratch / f"{name}-peer.npy")
                entry["speedup"] = entry["median_s"]["peer"] / entry["median_s"]["ours"]
                entry["speedup_of_fastest"] = min(times["peer"]) / min(times["ours"])  # less hit by contention
                entry["pass"] = entry["speedup"] >= target
                entry["pearson"] = pearson(peer_scores, ours_scores)
                entry["max_abs_diff"] = float(np.abs(peer_scores - ours_scores).max())
                entry["max_abs_score"] = float(np.abs(peer_scores).max())
                entry["top20_overlap"] = _top_overlap(peer_scores, ours_scores, 20)
            if entry.get("pass") is False or "peer" not in workers:
                entry["ours_breakdown"] = workers["ours"].profile(prompt, ANSWER)
            results["prompts"][name] = entry
        return results
    finally:
        for w in workers.values():
            w.close()


def _top_overlap(a, b, k: int) -> int:
    import numpy as np

    ta = set(np.argsort(a, axis=None)[::-1][:k].tolist())
    tb = set(np.argsort(b, axis=None)[::-1][:k].tolist())
    return len(ta & tb)


# ---------------------------------------------------------------------------------------------------------
# the real default model: fast path against the reference loop (our venv only)
# ---------------------------------------------------------------------------------------------------------
def default_worker_main(fast_runs: int) -> None:
    import numpy as np
    import torch

    if os.environ.get("BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    sys.path.insert(0, str(ROOT))
    from dkn.attribution import AttributionParams, attribute
    from dkn.models import load_model

    lm = load_model("default")
    out = {
        "model": lm.label,
        "n_layers": lm.n_layers,
        "d_mlp": lm.d_mlp,
        "threads": torch.get_num_threads(),
        "prompt": DEFAULT_PROMPT,
        "answer": DEFAULT_ANSWER,
        "prompt_tokens": len(lm.tokenizer(DEFAULT_PROMPT)["input_ids"]),
    }
    params = AttributionParams(rule="trapezoid", steps=10)  # a fixed rule: the reference loop runs those only
    attribute(lm, DEFAULT_PROMPT, DEFAULT_ANSWER, params)  # warm-up
    fast = []
    for i in range(fast_runs):
        res = attribute(lm, DEFAULT_PROMPT, DEFAULT_ANSWER, params)
        fast.append(res.seconds)
        log(f"default model: fast run {i + 1}/{fast_runs} {res.seconds:.2f} s")
    log("default model: reference loop (slow) ...")
    ref = attribute(lm, DEFAULT_PROMPT, DEFAULT_ANSWER, params, reference_loop=True)
    log(f"default model: reference loop {ref.seconds:.2f} s")
    out.update(
        params=dict(vars(res.params)),
        fast_seconds=fast,
        fast_median_s=statistics.median(fast),
        loop_seconds=ref.seconds,
        speedup=ref.seconds / statistics.median(fast),
        pearson=pearson(res.scores, ref.scores),
        max_abs_diff=float(np.abs(res.scores - ref.scores).max()),
        max_abs_score=float(np.abs(ref.scores).max()),
        prob=res.prob,
    )
    print(json.dumps(out))


def bench_default_model(fast_runs: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [
            str(OUR_VENV / "bin" / "python"),
            str(Path(__file__).resolve()),
            "--worker",
            "default",
            "--repeats",
            str(fast_runs),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=str(ROOT),
    )
    if proc.returncode != 0:
        raise SystemExit(f"the default-model worker failed (exit code {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------
def machine_info(results: dict) -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "nproc": int(nproc) if nproc.isdigit() else os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "loadavg_at_end": load,
    }


def write_reports(report: dict) -> tuple[Path, Path]:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    jpath, mpath = RESULTS_DIR / "attribution.json", RESULTS_DIR / "attribution.md"
    jpath.write_text(json.dumps(report, indent=2) + "\n")
    mpath.write_text(render_markdown(report))
    return jpath, mpath


def render_markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# Attribution benchmark: dkn vs knowledge-neurons 0.0.2",
        "",
        f"- date: {r['date']}",
        f"- machine: nproc={m['nproc']}, {m['cpu']}, {m['platform']} (load average at end: {m['loadavg_at_end']})",
        f"- versions: {_versions_line(r)}",
        f"- repeats: {r['repeats']} per side, alternated peer/ours after one warm-up each; medians; only the "
        "attribution call is timed; pass/fail is judged on the ratio of medians",
        "",
    ]
    rm = r.get("random_model")
    if rm:
        lines += [
            "## Random GPT-2-small (12 x 3072, vocab 50257, seed 0), 20 steps",
            "",
            f"Matched settings (ours): `AttributionParams({', '.join(f'{k}={v!r}' for k, v in MATCHED.items())})`; "
            "peer: `KnowledgeNeurons(model, tok, model_type='gpt2').get_scores(prompt, ' Paris', batch_size=20, "
            "steps=20)`.",
            "",
            "| prompt | tokens | peer s (median) | ours s (median) | speed-up (medians) | target | pass | "
            "speed-up (fastest runs) | Pearson r | max abs diff / max abs score | top-20 overlap |",
            "| --- | ---: | ---: | ---: | ---: | ---: | :---: | ---: | ---: | ---: | ---: |",
        ]
        for name, e in rm["prompts"].items():
            peer = e["median_s"].get("peer")
            lines.append(
                f"| {name} | {e['tokens']} | {_f(peer)} | {_f(e['median_s']['ours'])} | "
                f"{_f(e.get('speedup'), 1, 'x')} | {e['target_speedup']:.0f}x | "
                f"{'n/a' if 'pass' not in e else ('PASS' if e['pass'] else 'FAIL')} | "
                f"{_f(e.get('speedup_of_fastest'), 1, 'x')} | {_f(e.get('pearson'), 7)} | "
                f"{_f(e.get('max_abs_diff'), 3, '', 'e')} / {_f(e.get('max_abs_score'), 3, '', 'e')} | "
                f"{e.get('top20_overlap', 'n/a')} |"
            )
        lines += ["", "Raw seconds:", ""]
        for name, e in rm["prompts"].items():
            for side, ts in e["seconds"].items():
                lines.append(f"- {name} / {side}: {', '.join(f'{t:.2f}' for t in ts)}")
        lines.append("")
        for name, e in rm["prompts"].items():
            b = e.get("ours_breakdown")
            if not b:
                continue
            lines += [
                f"### Where our time goes: {name} prompt ({e['tokens']} tokens), one extra run, {b['total_s']:.2f} s",
                "",
                "| phase | s |",
                "| --- | ---: |",
            ]
            lines += [f"| {k} | {v:.3f} |" for k, v in b["phases_s"].items()]
            lines += [
                "",
                f"Top aten ops by self CPU time (a second run under torch.profiler, "
                f"{b['profiled_total_s']:.2f} s of op time):",
                "",
                "| op | self s | calls |",
                "| --- | ---: | ---: |",
            ]
            lines += [f"| `{o['op']}` | {o['self_s']:.3f} | {o['calls']} |" for o in b["top_ops"]]
            lines.append("")
    d = r.get("default_model")
    if d:
        lines += [
            f"## Real default model ({d['model']}, {d['n_layers']} x {d['d_mlp']}), our venv only",
            "",
            f"`attribute(lm, {d['prompt']!r}, {d['answer']!r})` with the {d['params']['rule']} rule, "
            f"{d['params']['steps']} points "
            f"({d['prompt_tokens']} prompt tokens): fast path vs `reference_loop=True`.",
            "",
            "| fast s (median) | loop s (1 run) | speed-up | Pearson r | max abs diff / max abs score |",
            "| ---: | ---: | ---: | ---: | ---: |",
            f"| {_f(d['fast_median_s'])} | {_f(d['loop_seconds'])} | {_f(d['speedup'], 1, 'x')} | "
            f"{_f(d['pearson'], 7)} | {_f(d['max_abs_diff'], 3, '', 'e')} / {_f(d['max_abs_score'], 3, '', 'e')} |",
            "",
            f"Fast runs: {', '.join(f'{t:.2f}' for t in d['fast_seconds'])} s.",
            "",
        ]
    if r.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in r["notes"]] + [""]
    return "\n".join(lines)


def _versions_line(r: dict) -> str:
    parts = []
    for side, info in (r.get("random_model") or {}).get("workers", {}).items():
        parts.append(f"{side}: torch {info['torch']}, transformers {info['transformers']}, {info['threads']} threads")
    if r.get("peer_venv"):
        parts.append(f"peer package {r['peer_venv']['peer']}")
    return "; ".join(parts) or f"torch/transformers of {OUR_VENV}"


def _f(x, digits: int = 2, suffix: str = "", fmt: str = "f") -> str:
    return "n/a" if x is None else f"{x:.{digits}{fmt}}{suffix}"


def print_table(r: dict) -> None:
    rm = r.get("random_model")
    if rm:
        print(
            f"\n{'prompt':<8}{'tokens':>7}{'peer s':>10}{'ours s':>10}{'speed-up':>10}{'target':>8}"
            f"{'pass':>6}{'pearson':>12}"
        )
        for name, e in rm["prompts"].items():
            print(
                f"{name:<8}{e['tokens']:>7}{_f(e['median_s'].get('peer')):>10}{_f(e['median_s']['ours']):>10}"
                f"{_f(e.get('speedup'), 1, 'x'):>10}{e['target_speedup']:>7.0f}x"
                f"{('n/a' if 'pass' not in e else ('PASS' if e['pass'] else 'FAIL')):>6}"
                f"{_f(e.get('pearson'), 7):>12}   (fastest runs: {_f(e.get('speedup_of_fastest'), 1, 'x')})"
            )
    d = r.get("default_model")
    if d:
        print(
            f"\ndefault model ({d['model']}): fast {d['fast_median_s']:.2f} s (median of "
            f"{len(d['fast_seconds'])}), loop {d['loop_seconds']:.2f} s, speed-up {d['speedup']:.1f}x, "
            f"pearson {d['pearson']:.7f}"
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side and prompt (default 3)")
    ap.add_argument("--skip-peer", action="store_true", help="time only our side on the random model")
    ap.add_argument("--skip-default-model", action="store_true", help="skip the real default model")
    ap.add_argument("--threads", type=int, help="torch threads in every worker (default: torch's, = cores)")
    ap.add_argument("--worker", choices=("peer", "ours", "default"), help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "default":
        default_worker_main(args.repeats)
        return 0
    if args.worker:
        worker_main(args.worker, args.model_dir)
        return 0

    if args.threads:
        os.environ["BENCH_THREADS"] = str(args.threads)
    report = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "repeats": args.repeats,
        "matched_params": MATCHED,
        "notes": [],
    }
    if not args.skip_peer:
        report["peer_venv"] = ensure_peer_venv()
        report["peer_venv"].pop("requirements", None)
    report["random_model"] = bench_random_model(args.repeats, args.skip_peer)
    if not args.skip_default_model:
        report["default_model"] = bench_default_model(args.repeats)
    report["machine"] = machine_info(report)
    print_table(report)
    jpath, mpath = write_reports(report)
    print(f"\nwrote {jpath.relative_to(ROOT)} and {mpath.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
