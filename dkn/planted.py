"""Planted ground truth: models whose degenerate storage is known by construction.

Two kinds of planted models, both described by `PlantedFact`s (prompt, answer, kind, neuron groups):

- **Tiny hand-wired models** (`tiny_planted_model`): a small randomly initialised GPT-2, LLaMA or GPT-NeoX
  whose attention writes nothing, whose other MLP neurons are weak noise, and whose fact ("the capital of
  france is" -> "paris") is written by 1-3 disjoint neuron groups, each in its own layers.  Every group
  member reads the prompt's last-token direction and writes the answer's unembedding direction; members
  of one group also share a private residual direction, so the knowledge-neuron graph links them and
  nothing links two groups.  Kinds:
  * "degenerate": 2-3 groups, each strong enough alone (any one off: P barely changes; all off: gone);
  * "single":     one group (a single pathway: switching it off removes the fact);
  * "additive":   2 groups whose contributions add up to the answer (each one is needed).
  With `carrier=True` one more neuron, in a layer of its own before the groups, reads the prompt and feeds
  every group: a shared necessary carrier (off, the fact is gone whichever groups are on), as the default
  model's own prompt-specific neurons are for its planted pathways.  It is in no group.
- **The default model with planted redundancy** (`plant_default`): SmolLM2-135M whose own knowledge neurons
  of a fact stay as they are (pathway A, chosen to end before the last layers), while a second, disjoint set
  of neurons in the last layers (pathway B: after A, it reads whether A wrote the answer) is trained with
  neuron-restricted fine-tuning (`dkn.finetune`) to carry the fact when A is suppressed at the answer position,
  with KL terms that keep the fact's distribution and unrelated prompts unchanged.  Controls: facts left with
  their single pathway, and facts where B adds a fixed amount to the answer's logit whether A is on or not
  (two additive pathways, each needed).  A second design (`PlantParams.design = "copies"`) stores a fact twice
  in random neurons of two distant layer pairs, each copy trained to add `copy_boost` nats to the answer's logit
  on its own (either copy saturates P, as in the tiny models), controls with one copy or two additive ones;
  the fact's own knowledge neurons are left as they are.  Each planted fact is verified through
  `dkn.interventions` and the measured drops are written to a JSON manifest beside the weights.
  `load_planted("planted-default")` builds it on first use under `cache/planted/`.

These are constructed for demonstration and for the recall benchmark (bench/bench_degeneracy_recall.py):
they are not natural models, and say so in their label.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dkn.models import PLANTED_MODEL, LoadedModel, cache_dir, wrap_model
from dkn.neurons import Neuron

KINDS = ("degenerate", "single", "additive")
DESIGNS = ("backup", "copies")  # how plant_default plants a fact (PlantParams.design)
TINY_FAMILIES = ("gpt2", "llama", "gpt_neox")
TINY_PROMPT, TINY_ANSWER = "the capital of france is", "paris"
PLANTED_DEFAULT = PLANTED_MODEL
PLANTED_DEFAULT_LABEL = "default model with facts stored twice — constructed for demonstration"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class PlantedFact:
    prompt: str
    answer: str
    kind: str  # "degenerate", "single" or "additive"
    groups: tuple[tuple[Neuron, ...], ...]  # the planted pathways (disjoint neuron groups)
    drops: dict = field(default_factory=dict)  # measured relative drops: {"A": .., "B": .., "all": ..}
    verified: bool = True  # the measured drops satisfy the kind's definition
    carriers: tuple[Neuron, ...] = ()  # planted neurons every pathway needs (in no group)

    @property
    def neurons(self) -> tuple[Neuron, ...]:
        return tuple(n for g in self.groups for n in g)

    def as_json(self) -> dict:
        d = asdict(self)
        d["groups"] = [[[n.layer, n.index] for n in g] for g in self.groups]
        d["carriers"] = [[n.layer, n.index] for n in self.carriers]
        return d

    @classmethod
    def from_json(cls, d: dict) -> PlantedFact:
        groups = tuple(tuple(Neuron(int(a), int(b)) for a, b in g) for g in d["groups"])
        carriers = tuple(Neuron(int(a), int(b)) for a, b in d.get("carriers", ()))
        drops, verified = dict(d.get("drops", {})), bool(d.get("verified", True))
        return cls(d["prompt"], d["answer"], d["kind"], groups, drops, verified, carriers)


@dataclass
class PlantedModel:
    lm: LoadedModel
    facts: tuple[PlantedFact, ...]
    info: dict = field(default_factory=dict)  # how it was built: timings, KL on unrelated prompts, ...


# =====================================================================================================
# tiny hand-wired models
# =====================================================================================================
TINY_WORDS = (
    "the capital of france is paris germany berlin italy rome spain madrid city country a an and in on "
    "it was new york london tokyo red blue green sky grass sea sun moon king queen"
).split()

_TINY_CONFIGS = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": 32, "n_head": 4, "n_positions": 64}, "n_layer", "n_inner"),
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64},
        "num_hidden_layers",
        "intermediate_size",
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        {"hidden_size": 32, "num_attention_heads": 4, "max_position_embeddings": 64},
        "num_hidden_layers",
        "intermediate_size",
    ),
}


def tiny_word_tokenizer():
    """A word-level tokenizer over TINY_WORDS (whole words, no merges), built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "<eos>"]
    vocab = {w: i for i, w in enumerate(specials + list(TINY_WORDS) + [".", ","])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="<eos>")


def _tiny_random_model(family: str, n_layers: int, d_mlp: int, seed: int) -> LoadedModel:
    import transformers

    if family not in _TINY_CONFIGS:
        raise ValueError(f"unknown tiny family {family!r}: use one of {', '.join(_TINY_CONFIGS)}")
    config_name, model_name, kwargs, layers_key, mlp_key = _TINY_CONFIGS[family]
    tokenizer = tiny_word_tokenizer()
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer),
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=2,
        tie_word_embeddings=False,
        **{layers_key: n_layers, mlp_key: d_mlp},
        **kwargs,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    return wrap_model(model, tokenizer, name=f"planted-tiny-{family}")


def _directions(d_model: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """[k, d_model] orthonormal directions, each orthogonal to the all-ones vector (LayerNorm's centring
    leaves them as they are)."""
    basis = torch.randn(d_model, k + 1, generator=generator)
    basis[:, 0] = 1.0
    q, _ = torch.linalg.qr(basis)  # [d_model, k + 1]
    return q[:, 1:].T.contiguous()


def _orthogonal_direction(dirs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[d_model] a unit direction orthogonal to `dirs` [k, d_model] (orthonormal) and to the all-ones vector."""
    d_model = dirs.shape[1]
    v = torch.randn(d_model, generator=generator)
    ones = torch.full((d_model,), d_model**-0.5)
    for u in (*dirs, ones):
        v -= (v @ u) * u
    return v / v.norm()


def _is_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Norm")


def _mlp_weights(lm: LoadedModel, layer: int) -> list[torch.Tensor]:
    """The weight matrices of the layer's MLP projections (inputs and output)."""
    return [m.weight for m in lm.up_projs(layer) + [lm.down_proj(layer)]]


def tiny_planted_model(
    family: str = "llama",
    kind: str = "degenerate",
    n_groups: int = 2,
    *,
    layers_per_group: int = 2,
    extra_layers: int = 0,
    d_mlp: int = 64,
    noise: float = 0.05,
    carrier: bool = False,
    seed: int = 0,
) -> PlantedModel:
    """A tiny model of `family` that stores TINY_PROMPT -> TINY_ANSWER in `n_groups` disjoint neuron groups.
    Group g is a chain of one neuron in each of the layers [g * layers_per_group, (g + 1) * layers_per_group):
    the first reads the last prompt token's direction, each next one reads its predecessor's private
    direction, the last writes the answer's unembedding direction, so every member of a group is needed
    for the group to work.  kind "degenerate": each group alone carries the fact; "additive": the groups'
    contributions add up (each needed); "single": one group (n_groups is ignored).  Every other MLP neuron
    gets weak random weights (`noise`); `extra_layers` more layers hold only such neurons.  `carrier`: layer 0
    holds one more neuron that reads the last prompt token and writes the direction every group's first member
    reads (a shared necessary carrier, `PlantedFact.carriers`); the groups start at layer 1."""
    if kind not in KINDS:
        raise ValueError(f"unknown planted kind {kind!r}: use one of {', '.join(KINDS)}")
    n_groups = 1 if kind == "single" else n_groups
    if not 1 <= n_groups <= 3 or (kind != "single" and n_groups < 2):
        raise ValueError("plant 2 or 3 groups for 'degenerate' and 'additive' (the 'single' kind has 1)")
    if not 1 <= layers_per_group <= 4 or extra_layers < 0:
        raise ValueError(
            f"layers_per_group must be between 1 and 4 and extra_layers >= 0, got {layers_per_group}, {extra_layers}"
        )
    first = int(carrier)  # the groups' first layer
    lm = _tiny_random_model(family, first + n_groups * layers_per_group + extra_layers, d_mlp, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    d_model = lm.unembedding().shape[1]
    n_private = n_groups * (layers_per_group - 1)
    dirs = _directions(d_model, 2 + n_private, gen)  # [2 + n_private, d_model]
    e_last, r_answer = dirs[0], dirs[1]
    private = dirs[2:].reshape(n_groups, layers_per_group - 1, d_model)  # [n_groups, steps - 1, d_model]
    shared = _orthogonal_direction(dirs, gen) if carrier else None  # what the carrier writes
    rng = np.random.default_rng(seed)
    groups = tuple(
        tuple(Neuron(first + g * layers_per_group + s, int(rng.integers(d_mlp))) for s in range(layers_per_group))
        for g in range(n_groups)
    )
    carriers = (Neuron(0, int(rng.integers(d_mlp))),) if carrier else ()
    _wire(lm, groups, carriers, e_last, r_answer, shared, private, noise, gen)
    _calibrate_head(lm, r_answer, kind, groups)
    lm.fingerprint = _refingerprint(lm)
    lm.name = lm.label = f"planted-tiny-{family}-{kind}-{n_groups}{'-carrier' if carrier else ''}-{seed}"
    fact = PlantedFact(TINY_PROMPT, TINY_ANSWER, kind, groups, carriers=carriers)
    info = {"family": family, "seed": seed, "noise": noise, "carrier": carrier}
    return PlantedModel(lm, (_measured(lm, fact),), info)


@torch.no_grad()
def _wire(
    lm: LoadedModel, groups, carriers, e_last, r_answer, shared, private, noise: float, gen: torch.Generator
) -> None:
    """Attention and biases off, noise neurons, the planted chains (fed by the carrier, if any, through
    `shared`), the trigger embedding."""
    last = lm.tokenizer.convert_tokens_to_ids(TINY_PROMPT.split()[-1])
    reserved = torch.cat(
        [e_last[None], r_answer[None], private.reshape(-1, private.shape[-1])] + ([shared[None]] if carriers else [])
    )  # [k, d_model]
    for layer in range(lm.n_layers):
        block = lm.blocks[layer]
        norms = {id(p) for m in block.modules() if _is_norm(m) for p in m.parameters()}
        for p in block.parameters():
            if id(p) not in norms:
                p.zero_()  # attention writes nothing, no biases
        for w in _mlp_weights(lm, layer):
            w.normal_(0, noise, generator=gen)
        if carriers:  # every group reads the carrier's direction, with a high gain: no noise neuron writes it
            out = lm.output_vectors(layer)  # [d_mlp, d_model], a view of the down proj
            out -= (out @ shared)[:, None] * shared
    emb = lm.model.get_input_embeddings().weight  # [vocab, d_model]
    emb.normal_(0, 0.05, generator=gen)
    emb -= (emb @ reserved.T) @ reserved  # keep the reserved directions free
    emb[last] = 3.0 * e_last
    positions = getattr(getattr(lm.model, "transformer", None), "wpe", None)  # GPT-2's learned positions
    if positions is not None:
        positions.weight.zero_()
    entry = shared if carriers else e_last  # what every group's first member reads
    wiring = [(n, e_last, shared) for n in carriers]  # (neuron, what it reads, what it writes)
    for g, group in enumerate(groups):
        reads = [entry] + list(private[g])  # what step s reads
        writes = list(private[g]) + [r_answer]  # what step s writes
        wiring += list(zip(group, reads, writes))
    for n, read, write in wiring:
        for w in lm.input_vectors(n.layer):  # [d_mlp, d_model] views
            w[n.index] = read
        lm.output_vectors(n.layer)[n.index] = write  # [d_model], a view of the down proj
    _calibrate_chains(lm, sorted(n for n, _, _ in wiring))


@torch.no_grad()
def _calibrate_chains(
    lm: LoadedModel, neurons: list[Neuron], pre_target: float = 4.0, write_target: float = 0.5
) -> None:
    """Layer by layer, scale each planted neuron's input vectors so that its pre-activation on the prompt is
    `pre_target`, and its output vector so that it writes `write_target` into the residual stream: small
    beside the trigger embedding (norm 3), so that the final norm does not couple the groups."""
    from dkn.hooks import record_neurons

    ids = torch.tensor([lm.tokenizer(TINY_PROMPT)["input_ids"]], device=lm.device)  # [1, T]
    for n in neurons:
        with record_neurons(lm, [n.layer], site="pre") as pre:
            lm.model(input_ids=ids)
        value = float(pre[n.layer][0, -1, n.index])
        if abs(value) < 1e-6:
            raise RuntimeError(f"planted neuron {n} does not see its input: the construction failed")
        for w in lm.input_vectors(n.layer):
            w[n.index] *= pre_target / abs(value)
        with record_neurons(lm, [n.layer], site="post") as post:
            lm.model(input_ids=ids)
        lm.output_vectors(n.layer)[n.index] *= write_target / float(post[n.layer][0, -1, n.index])


def _answer_probability(lm: LoadedModel, sets: Sequence[Sequence[Neuron]]) -> np.ndarray:
    from dkn.interventions import intervene_many

    prob, probs = intervene_many(lm, TINY_PROMPT, TINY_ANSWER, list(sets), 0.0)
    return np.concatenate([[prob], probs])


@torch.no_grad()
def _calibrate_head(lm: LoadedModel, r_answer: torch.Tensor, kind: str, groups) -> None:
    """Scale the answer's unembedding row (along r_answer) so that: degenerate — every group left alone
    gives P >= 0.995; single — P >= 0.995; additive — all groups together give P = 0.8."""
    answer = lm.tokenizer.convert_tokens_to_ids(TINY_ANSWER)
    head = lm.unembedding()  # [vocab, d_model]
    head.mul_(0.1)
    base_row = head[answer].clone()

    def probs(scale: float) -> np.ndarray:
        head[answer] = base_row + scale * r_answer
        others = [tuple(n for j, g in enumerate(groups) if j != i for n in g) for i in range(len(groups))]
        return _answer_probability(lm, others)  # [P all on, P each group kept alone]

    if kind == "additive":
        target = lambda p: p[0] >= 0.8  # noqa: E731
    elif kind == "degenerate":
        target = lambda p: p[1:].min() >= 0.995  # noqa: E731
    else:
        target = lambda p: p[0] >= 0.995  # noqa: E731
    lo, hi = 0.0, 1.0
    while not target(probs(hi)):
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise RuntimeError("the planted groups do not move the answer: the construction failed")
    for _ in range(14):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if target(probs(mid)) else (mid, hi)
    probs(hi)


def _refingerprint(lm: LoadedModel) -> str:
    from dkn.models import fingerprint

    return fingerprint(lm.model)


def _measured(lm: LoadedModel, fact: PlantedFact, mode: str = "last") -> PlantedFact:
    """The fact with its measured drops (each group off, all off, and the carriers off if it has any;
    suppressed as `mode` says, see dkn.interventions) and whether they fit its kind (carriers: their
    suppression must remove the fact)."""
    from dataclasses import replace

    from dkn.interventions import intervene_many

    sets = list(fact.groups) + [fact.neurons] + ([fact.carriers] if fact.carriers else [])
    prob, probs = intervene_many(lm, fact.prompt, fact.answer, sets, 0.0, mode)
    drops = (prob - probs) / prob if prob > 0 else np.zeros(len(sets))
    k = len(fact.groups)
    names = [chr(ord("A") + i) for i in range(k)]
    measured = {"p": float(prob), **{n: float(d) for n, d in zip(names, drops)}, "all": float(drops[k])}
    verified = satisfies_kind(fact.kind, list(drops[:k]), float(drops[k]))
    if fact.carriers:
        measured["carriers"] = float(drops[k + 1])
        verified = verified and measured["carriers"] > 0.3
    return replace(fact, drops=measured, verified=verified)


def measure_planted(lm: LoadedModel, fact: PlantedFact, mode: str = "last") -> PlantedFact:
    """`fact` measured again on `lm`: its drops and `verified` under suppression mode `mode`."""
    return _measured(lm, fact, mode)


def satisfies_kind(
    kind: str, single_drops: Sequence[float], all_drop: float, low: float = 0.05, high: float = 0.3
) -> bool:
    """degenerate: every |single drop| < low and all > high; single: the one group's drop > high;
    additive: every single drop > low (each needed) and all > high."""
    if kind == "degenerate":
        return len(single_drops) >= 2 and all(abs(d) < low for d in single_drops) and all_drop > high
    if kind == "single":
        return all_drop > high
    if kind == "additive":
        return len(single_drops) >= 2 and all(d > low for d in single_drops) and all_drop > high
    raise ValueError(f"unknown planted kind {kind!r}: use one of {', '.join(KINDS)}")


# =====================================================================================================
# the default model with planted redundancy
# =====================================================================================================
@dataclass(frozen=True)
class PlantParams:
    """How `plant_default` plants its facts (the defaults keep a CPU build to a few minutes)."""

    design: str = "backup"  # "backup": A = the fact's own knowledge neurons, B learns to take over when A is off;
    #   "copies": two copies of the fact in random neurons of distant layers (copy_layers), each adding copy_boost to
    #   the answer's logit on its own, so that either one saturates P (the tiny models' construction, trained)
    n_degenerate: int = 6  # facts stored twice
    n_single: int = 2  # controls: the model's own single pathway, nothing planted ("copies": one copy)
    n_additive: int = 2  # controls: B adds to the answer's logit, A and B each needed ("copies": the copies add up)
    b_layers: int = 2  # pathway B (and each copy): this many adjacent layers ...
    b_per_layer: int = 4  # ... with this many neurons each
    a_choice: str = "fewest"  # pathway A: "fewest" of the fact's top knowledge neurons (below), or
    #   "knowledge_neurons": all of them (those before B's layers, at most max_a_kn), the issue's "its own
    #   knowledge neurons", which is what an instrument that starts from the knowledge neurons can see, or
    #   "all_knowledge_neurons": all of them in any layer (B's layers included: B reads the earlier ones'
    #   absence), so that no knowledge neuron of the fact is left outside both pathways
    max_a: int = 6  # "fewest": at most this many of the fact's top knowledge neurons ...
    a_drop: float = 0.5  # ... the fewest whose suppression lowers P by more than this (both choices: A must)
    max_a_kn: int = 40
    additive_boost: float = 1.386  # additive controls: B adds log(4) to the answer's logit
    copy_layers: tuple[int, int] = (10, 20)  # "copies": the first layer of each copy (each copy: b_layers layers)
    copy_boost: float = 5.0  # "copies": what each copy adds to the answer's logit (nats; additive controls: ...
    additive_copy_boost: float = 1.0  # ... this much each, so that each copy is needed)
    max_prompt_tokens: int = 10  # short prompts keep the CPU cost down
    n_unrelated: int = 6  # unrelated prompts in the KL term ...
    n_heldout: int = 16  # ... and held out to report the KL on
    steps: int = 150  # 60 verified 5 of the 10 planted facts (1 of 6 degenerate), 150 verifies 8 (4 of 6)
    lr: float = 2e-2
    kl_weight: float = 1.0  # weight of the unrelated prompts' KL
    answer_weight: float = 10.0  # weight of the squared log-probability error of the answer
    attribution_steps: int = 5  # IG steps when looking for pathway A (cheap; A is then checked directly) ...
    attribution_rule: str = "midpoint"  # ... and their rule: fixed, so a new library default does not move A
    seed: int = 0

    def __post_init__(self) -> None:
        if self.design not in DESIGNS:
            raise ValueError(f"unknown planting design {self.design!r}: use one of {', '.join(DESIGNS)}")
        first, second = self.copy_layers
        if self.design == "copies" and not 0 <= first <= first + self.b_layers <= second:
            raise ValueError(
                f"copy_layers {self.copy_layers} with {self.b_layers} layers each overlap: the second copy must "
                "start after the first one's layers"
            )


# the expected drops of a "copies" fact (if training were exact) must clear the degeneracy test's thresholds
# (0.05 and 0.3) by this much: training is not exact
COPY_DROP_LOW, COPY_DROP_HIGH = 0.03, 0.4


def copies_fit(kind: str, prob: float, params: PlantParams) -> bool:
    """Whether a fact the unchanged model gives P = `prob` can hold planted copies of `kind`: with each copy adding
    its boost to the answer's logit, the expected drops fit the kind with a margin (COPY_DROP_LOW/HIGH):
    degenerate: one copy off < 3%, both off > 40%; additive: each off > 10%, both off > 40%; single: off > 40%."""
    if not 0 < prob < 1:
        return False
    logit = float(np.log(prob / (1 - prob)))
    raised = lambda boost: 1 / (1 + np.exp(-(logit + boost)))  # noqa: E731  P with the answer's logit raised
    if kind == "single":
        return 1 - prob / raised(params.copy_boost) > COPY_DROP_HIGH
    boost = params.additive_copy_boost if kind == "additive" else params.copy_boost
    one_off, all_off = 1 - raised(boost) / raised(2 * boost), 1 - prob / raised(2 * boost)
    if kind == "additive":
        return one_off > 0.1 and all_off > COPY_DROP_HIGH
    return one_off < COPY_DROP_LOW and all_off > COPY_DROP_HIGH


@dataclass
class _Row:
    ids: list[int]  # prompt tokens; the answer is predicted at the last one
    suppressed: tuple[Neuron, ...]  # switched off at the last position
    target: torch.Tensor | None = None  # [vocab] next-token distribution to match
    answer: int | None = None  # token whose log-probability is matched closely (fact rows)
    weight: float = 1.0
    target_suppressed: tuple[Neuron, ...] = ()  # switched off in the unchanged model to make the target
    boost: float = 0.0  # added to the answer's logit in the target


def plant_default(lm: LoadedModel, params: PlantParams = PlantParams(), facts=None, log=print) -> PlantedModel:
    """Plant redundancy into (a copy of) `lm`, normally the default model: see the module docstring.
    facts: candidate Facts or (prompt, answer) pairs (default: the built-in facts the model knows); those
    not chosen serve as the unrelated prompts.  Returns the planted model with
    every fact's measured drops, and info with the KL on held-out unrelated prompts and the timings."""
    from dkn.datasets import builtin_facts
    from dkn.finetune import fresh_copy

    start = time.perf_counter()
    facts = list(facts) if facts is not None else builtin_facts(known_only=True)
    candidates, others = _split_candidates(lm, facts, params)
    if params.design == "copies" and params.copy_layers[1] + params.b_layers > lm.n_layers:
        raise ValueError(
            f"the copies' layers {params.copy_layers} (+{params.b_layers}) do not fit in the model's {lm.n_layers} "
            "layers: plant them earlier"
        )
    chosen = (_choose_copies if params.design == "copies" else _choose_pathways)(lm, candidates, params, log)
    if not chosen:
        raise RuntimeError(
            "no candidate fact qualified for planting: "
            + (
                "each needs a P that either copy can saturate and that both copies off lower by > 40%"
                if params.design == "copies"
                else f"each needs >= 2 knowledge neurons whose suppression lowers P by more than {params.a_drop:.0%}"
            )
            + "; give other facts"
        )
    planted_prompts = {c["prompt"] for c in chosen}
    others = [o for o in others if o[0] not in planted_prompts]
    scan_s = time.perf_counter() - start
    planted = fresh_copy(lm)
    rng = np.random.default_rng(params.seed)
    taken = {n for c in chosen for n in c["kns"]}
    for c in chosen:
        if params.design == "copies":
            firsts = params.copy_layers[: 1 if c["kind"] == "single" else 2]
            c["copies"] = tuple(_pick_neurons(lm, range(f, f + params.b_layers), taken, params, rng) for f in firsts)
            c["trained"] = tuple(n for g in c["copies"] for n in g)
        elif c["kind"] != "single":
            c["B"] = c["trained"] = _pick_b(lm, c["A"], taken, params, rng)
        taken |= set(c.get("trained", ()))
    unrelated, heldout = (
        others[: params.n_unrelated],
        others[params.n_unrelated : params.n_unrelated + params.n_heldout],
    )
    rows = _training_rows(lm, chosen, unrelated, params)
    trained_neurons = sorted(n for c in chosen for n in c.get("trained", ()))
    from dkn.finetune import train_masked

    def loss(step: int) -> torch.Tensor:
        value = _rows_loss(planted, rows, params)
        if step % 10 == 0:
            log(f"  step {step}: loss {float(value.detach()):.4f} ({time.perf_counter() - start:.0f} s)")
        return value

    trained = train_masked(planted, loss, trained_neurons, steps=params.steps, lr=params.lr, seed=params.seed)
    log(
        f"trained {len(trained_neurons)} neurons ({trained.n_params} weights) for {params.steps} steps in "
        f"{trained.seconds:.0f} s; loss {trained.losses[0]:.3f} -> {trained.losses[-1]:.3f}"
    )
    out = []
    for c in chosen:
        groups = c["copies"] if "copies" in c else (tuple(c["A"]),) + ((tuple(c["B"]),) if "B" in c else ())
        out.append(_measured(planted, PlantedFact(c["prompt"], c["answer"], c["kind"], groups)))
    kl = _kl_on(lm, planted, heldout)
    planted.name, planted.label = PLANTED_DEFAULT, PLANTED_DEFAULT_LABEL
    info = {
        "base_model": lm.name,
        "base_fingerprint": lm.fingerprint,
        "params": asdict(params),
        "kl_heldout": kl,
        "heldout_prompts": [p for p, _ in heldout],
        "losses": list(trained.losses),
        "n_trained_weights": trained.n_params,
        "scan_seconds": scan_s,
        "train_seconds": trained.seconds,
        "seconds": time.perf_counter() - start,
        "n_verified": sum(f.verified for f in out),
    }
    return PlantedModel(planted, tuple(out), info)


def _split_candidates(lm: LoadedModel, facts, params: PlantParams):
    """(candidate (prompt, answer) pairs: single-token answers, short prompts; the rest as unrelated pairs)."""
    from dkn.query import QueryError, make_query

    candidates, others, seen = [], [], set()
    for f in facts:
        prompt, answer = (f.prompt, f.answer) if hasattr(f, "prompt") else f
        if prompt in seen:
            continue
        seen.add(prompt)
        try:
            q = make_query(lm, prompt, answer)
        except QueryError:
            continue
        short = len(q.steps) == 1 and len(q.steps[0].input_ids) <= params.max_prompt_tokens
        (candidates if short else others).append((prompt, answer))
    # unrelated prompts: the long ones, then the candidates from the end of the list (the facts are chosen
    # from its start; one chosen late can also appear here, which only adds a "keep it unchanged" row)
    return candidates, others + candidates[::-1]


def _choose_pathways(lm: LoadedModel, candidates, params: PlantParams, log) -> list[dict]:
    """Walk the candidates; for each, pathway A = the fewest (>= 2) top knowledge neurons whose suppression
    lowers P by more than a_drop; assign kinds until each kind has its count."""
    from dkn.attribution import AttributionParams, attribute
    from dkn.interventions import intervene_many
    from dkn.selection import coarse_neurons

    need = {"degenerate": params.n_degenerate, "additive": params.n_additive, "single": params.n_single}
    chosen = []
    for prompt, answer in candidates:
        if not any(need.values()):
            break
        attribution = AttributionParams(steps=params.attribution_steps, rule=params.attribution_rule)
        scores = attribute(lm, prompt, answer, attribution).scores
        kns = sorted(coarse_neurons(scores, 0.2), key=lambda n: -scores[n.layer, n.index])
        # A ends early enough for B to sit after it (B then reads A's output at the answer position and can
        # learn to write the answer only when A is off; a B before A could only add a fixed amount)
        early = [n for n in kns if n.layer < lm.n_layers - params.b_layers - 1]
        if params.a_choice == "knowledge_neurons":
            prefixes = [tuple(early[: params.max_a_kn])] if len(early) >= 2 else []
        elif params.a_choice == "all_knowledge_neurons":
            head = kns[: params.max_a_kn]
            prefixes = [tuple(head)] if len(head) >= 2 and any(n in early for n in head) else []
        elif params.a_choice == "fewest":
            prefixes = [tuple(early[:k]) for k in range(2, min(params.max_a, len(early)) + 1)]
        else:
            raise ValueError(
                f"unknown a_choice {params.a_choice!r}: use 'fewest', 'knowledge_neurons' or 'all_knowledge_neurons'"
            )
        if not prefixes:
            continue
        prob, probs = intervene_many(lm, prompt, answer, prefixes, 0.0)
        drops = (prob - probs) / prob
        good = [p for p, d in zip(prefixes, drops) if d > params.a_drop]
        if not good:
            continue
        # additive controls need room for B to raise P; degenerate facts and singles take any
        kind = next(
            (k for k in ("degenerate", "additive", "single") if need[k] and (k != "additive" or prob < 0.6)), None
        )
        if kind is None:
            continue
        need[kind] -= 1
        chosen.append({"prompt": prompt, "answer": answer, "kind": kind, "A": good[0], "kns": kns, "p": prob})
        log(f"  {kind:10s} {prompt!r} -> {answer!r}: P = {prob:.3f}, A = {' '.join(map(str, good[0]))}")
    if any(need.values()):
        log(f"  fewer facts than asked for qualified: still missing {need}")
    return chosen


def _choose_copies(lm: LoadedModel, candidates, params: PlantParams, log) -> list[dict]:
    """Walk the candidates; give each the first kind that still needs facts and that its P fits (copies_fit), until
    each kind has its count; "kns": the fact's coarse knowledge neurons, which no copy may take."""
    from dkn.attribution import AttributionParams, attribute
    from dkn.selection import coarse_neurons

    need = {"degenerate": params.n_degenerate, "additive": params.n_additive, "single": params.n_single}
    chosen = []
    for prompt, answer in candidates:
        if not any(need.values()):
            break
        attribution = attribute(
            lm, prompt, answer, AttributionParams(steps=params.attribution_steps, rule=params.attribution_rule)
        )
        kind = next(
            (k for k in ("degenerate", "additive", "single") if need[k] and copies_fit(k, attribution.prob, params)),
            None,
        )
        if kind is None:
            continue
        need[kind] -= 1
        kns = tuple(coarse_neurons(attribution.scores, 0.2))
        chosen.append({"prompt": prompt, "answer": answer, "kind": kind, "kns": kns, "p": attribution.prob})
        log(f"  {kind:10s} {prompt!r} -> {answer!r}: P = {attribution.prob:.3f}")
    if any(need.values()):
        log(f"  fewer facts than asked for qualified: still missing {need}")
    return chosen


def _pick_neurons(lm: LoadedModel, layers, taken: set[Neuron], params: PlantParams, rng) -> tuple[Neuron, ...]:
    """b_per_layer random neurons in each of `layers`, none of them in `taken`."""
    chosen = []
    for layer in layers:
        pool = [i for i in range(lm.d_mlp) if Neuron(layer, i) not in taken]
        chosen += [Neuron(layer, int(i)) for i in rng.choice(pool, size=params.b_per_layer, replace=False)]
    return tuple(chosen)


def _pick_b(lm: LoadedModel, a: Sequence[Neuron], taken: set[Neuron], params: PlantParams, rng) -> tuple[Neuron, ...]:
    """Pathway B: random neurons in the model's last `b_layers` layers (after all of A's layers, so that B reads
    whether A wrote the answer; for "all_knowledge_neurons", after A's first layer), none of them a knowledge
    neuron of any planted fact or another fact's B."""
    start = lm.n_layers - params.b_layers
    reaches = min(n.layer for n in a) if params.a_choice == "all_knowledge_neurons" else max(n.layer for n in a)
    if start <= reaches + 1:
        raise ValueError(
            f"pathway A reaches layer {reaches}: B's {params.b_layers} layers do not "
            "fit after it with a layer between; plant fewer B layers"
        )
    return _pick_neurons(lm, range(start, start + params.b_layers), taken, params, rng)


def _training_rows(lm: LoadedModel, chosen, unrelated, params: PlantParams) -> list[_Row]:
    """Rows of the planting loss, with their targets computed on the unchanged model."""
    from dkn.query import make_query

    rows = []
    for c in chosen:
        step = make_query(lm, c["prompt"], c["answer"]).steps[0]
        if "copies" in c:
            rows += _copy_rows(list(step.input_ids), step.target, c["kind"], c["copies"], params)
            continue
        ids, a = list(step.input_ids), tuple(c["A"])
        kind, b = c["kind"], tuple(c.get("B", ()))
        # B's weights act at every position, but the test switches neurons off at the answer position only:
        # rows with B off there pin down that B's effect passes through the answer position (left out, B
        # learned to carry the fact from earlier positions through attention, out of the test's reach)
        if kind == "degenerate":  # with A off, B restores the original distribution
            rows += [
                _Row(ids, a, answer=step.target),
                _Row(ids, (), answer=step.target),
                _Row(ids, b, answer=step.target),
                _Row(ids, a + b, answer=step.target, target_suppressed=a),
            ]
        elif kind == "additive":  # B adds a fixed amount to the answer's logit, A on or off
            up = params.additive_boost
            rows += [
                _Row(ids, (), answer=step.target, boost=up),
                _Row(ids, a, answer=step.target, target_suppressed=a, boost=up),
                _Row(ids, b, answer=step.target),
                _Row(ids, a + b, answer=step.target, target_suppressed=a),
            ]
        else:  # single pathway: keep as it is
            rows.append(_Row(ids, (), answer=step.target))
    for prompt, _ in unrelated:
        rows.append(_Row(list(lm.tokenizer(prompt)["input_ids"]), (), weight=params.kl_weight))
    targets = _last_distributions(lm, [_Row(r.ids, r.target_suppressed) for r in rows])  # [R, vocab]
    for row, target in zip(rows, targets):
        if row.boost:
            logits = target.clamp_min(1e-30).log()
            logits[row.answer] += row.boost
            target = logits.softmax(-1)
        row.target = target
    return rows


def _copy_rows(ids: list[int], answer: int, kind: str, copies, params: PlantParams) -> list[_Row]:
    """Design "copies": the fact's rows.  Each copy on adds its boost to the answer's logit whatever the other does
    (degenerate: copy_boost each, so either one alone saturates P; additive: additive_copy_boost each; single: one
    copy); a copy off (at the answer position) takes its boost away (target: the unchanged model plus the other
    copies' boost), and every copy off leaves the unchanged model with the copies' neurons off.
    (Rows that also gave each member an equal share, so that every member is needed, did not train with 2-neuron
    copies: 0 of 6 degenerate facts verified after 300 steps.)"""
    boost = params.additive_copy_boost if kind == "additive" else params.copy_boost
    everything = tuple(n for g in copies for n in g)
    rows = [_Row(ids, (), answer=answer, boost=boost * len(copies))]
    if len(copies) > 1:
        rows += [_Row(ids, g, answer=answer, boost=boost * (len(copies) - 1)) for g in copies]
    rows.append(_Row(ids, everything, answer=answer, target_suppressed=everything))
    return rows


def _batch(lm: LoadedModel, rows: Sequence[_Row]):
    """(ids [R, T] right-padded, attention [R, T], last positions [R], edits switching each row's
    suppressed neurons off at its last position)."""
    from dkn.finetune import pad_batch

    ids, attention = pad_batch(lm, [r.ids for r in rows])  # [R, T] each
    last = torch.tensor([len(r.ids) - 1 for r in rows], device=lm.device)  # [R]
    layers = sorted({n.layer for r in rows for n in r.suppressed})
    multipliers = {layer: torch.ones(ids.shape[0], ids.shape[1], lm.d_mlp, device=lm.device) for layer in layers}
    for i, r in enumerate(rows):
        for n in r.suppressed:
            multipliers[n.layer][i, len(r.ids) - 1, n.index] = 0.0  # [R, T, d_mlp]
    edits = {layer: (lambda h, m=m: h * m.to(h.dtype)) for layer, m in multipliers.items()}
    return ids, attention, last, edits


def _last_logits(lm: LoadedModel, rows: Sequence[_Row]) -> torch.Tensor:
    """[R, vocab] logits at each row's last position, with its suppressed neurons off."""
    from dkn.hooks import edit_neurons

    ids, attention, last, edits = _batch(lm, rows)
    with edit_neurons(lm, edits):
        logits = lm.model(input_ids=ids, attention_mask=attention).logits  # [R, T, vocab]
    return logits[torch.arange(len(rows), device=lm.device), last].float()  # [R, vocab]


@torch.no_grad()
def _last_distributions(lm: LoadedModel, rows: Sequence[_Row]) -> torch.Tensor:
    return _last_logits(lm, rows).softmax(-1)


def _rows_loss(lm: LoadedModel, rows: Sequence[_Row], params: PlantParams) -> torch.Tensor:
    """Weighted mean over rows of KL(target || model) at the last position, plus, for fact rows,
    answer_weight x (log q(answer) - log target(answer))^2."""
    logq = _last_logits(lm, rows).log_softmax(-1)  # [R, vocab]
    target = torch.stack([r.target for r in rows]).to(logq.device)  # [R, vocab]
    kl = (target * (target.clamp_min(1e-30).log() - logq)).sum(-1)  # [R]
    weights = torch.tensor([r.weight for r in rows], device=logq.device)
    loss = (weights * kl).sum() / weights.sum()
    fact = [i for i, r in enumerate(rows) if r.answer is not None]
    if fact:
        index = torch.tensor(fact, device=logq.device)
        answers = torch.tensor([rows[i].answer for i in fact], device=logq.device)
        err = logq[index, answers] - target[index, answers].clamp_min(1e-30).log()  # [n_fact]
        loss = loss + params.answer_weight * (err**2).mean()
    return loss


@torch.no_grad()
def _kl_on(base: LoadedModel, planted: LoadedModel, pairs) -> dict:
    """KL(base || planted) of the next-token distribution at the last position of each prompt (nats)."""
    if not pairs:
        return {"mean": 0.0, "max": 0.0, "n": 0}
    rows = [_Row(list(base.tokenizer(p)["input_ids"]), ()) for p, _ in pairs]
    p = _last_distributions(base, rows)
    q = _last_distributions(planted, rows)
    kl = (p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log())).sum(-1)  # [R]
    return {"mean": float(kl.mean()), "max": float(kl.max()), "n": len(rows)}


# =====================================================================================================
# on disk: build on demand under cache/planted/, load with its manifest
# =====================================================================================================
def planted_dir() -> Path:
    """Where the planted default model lives: $DKN_CACHE_DIR/planted/default-twice (never committed)."""
    return cache_dir() / "planted" / "default-twice"


def build_planted_default(
    out: str | os.PathLike | None = None, params: PlantParams = PlantParams(), device: str | None = "cpu", log=print
) -> Path:
    """Plant redundancy into the default model and save it (safetensors, tokenizer, manifest.json) to `out`,
    atomically: an interrupted build leaves nothing half-written."""
    from dkn.models import load_model

    out = Path(out) if out is not None else planted_dir()
    start = time.perf_counter()
    base = load_model("default", device=device)
    log(
        f"planting into {base.label}: {params.n_degenerate} degenerate facts, {params.n_single} single-pathway "
        f"and {params.n_additive} additive controls"
    )
    pm = plant_default(base, params, log=log)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        pm.lm.model.save_pretrained(tmp, safe_serialization=True)
        pm.lm.tokenizer.save_pretrained(tmp)
        manifest = {
            "name": PLANTED_DEFAULT,
            "label": PLANTED_DEFAULT_LABEL,
            "constructed": "for demonstration and the recall benchmark; not a natural model",
            "facts": [f.as_json() for f in pm.facts],
            "info": {**pm.info, "seconds": time.perf_counter() - start},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(
        f"{sum(f.verified for f in pm.facts)} of {len(pm.facts)} planted facts verified; KL on held-out prompts "
        f"{pm.info['kl_heldout']['mean']:.4f} nats (max {pm.info['kl_heldout']['max']:.4f}); "
        f"{time.perf_counter() - start:.0f} s; saved to {out}"
    )
    return out


def prepare_planted_default(folder: str | os.PathLike | None = None) -> Path:
    """The planted default model's folder, built on first use (a few minutes of CPU)."""
    folder = Path(folder) if folder is not None else planted_dir()
    if not (folder / MANIFEST).exists() or not (folder / "model.safetensors").exists():
        build_planted_default(folder, log=lambda msg: None)
    return folder


def read_manifest(folder: str | os.PathLike) -> tuple[PlantedFact, ...]:
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text())
        return tuple(PlantedFact.from_json(f) for f in data["facts"])
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(
            f"{path} is missing or damaged ({err}): rebuild it with `python -m dkn plant --out {Path(folder)}`"
        ) from err


def load_planted(
    name: str = PLANTED_DEFAULT, *, folder: str | os.PathLike | None = None, device: str | None = None
) -> PlantedModel:
    """The planted default model (built on first use) and its ground truth."""
    from dkn.models import load_model

    if name != PLANTED_DEFAULT:
        raise ValueError(f"unknown planted model {name!r}: use {PLANTED_DEFAULT!r}")
    folder = prepare_planted_default(folder)
    lm = load_model(str(folder), device=device)
    lm.name, lm.label = PLANTED_DEFAULT, PLANTED_DEFAULT_LABEL
    data = json.loads((folder / MANIFEST).read_text())
    return PlantedModel(lm, read_manifest(folder), data.get("info", {}))


def describe_planted(folder: str | os.PathLike | None = None) -> list[str]:
    """One line per planted fact of the planted default model (for the app's sidebar): the fact, its kind, and
    each group as LAYER:INDEX lists (the form the Intervene page's "Your own groups" accepts)."""
    folder = Path(folder) if folder is not None else planted_dir()
    lines = []
    for f in read_manifest(folder):
        groups = " · ".join(f"group {chr(ord('A') + i)}: {', '.join(map(str, g))}" for i, g in enumerate(f.groups))
        lines.append(f"{f.prompt} → {f.answer} ({f.kind}{'' if f.verified else ', not verified'}) · {groups}")
    return lines
