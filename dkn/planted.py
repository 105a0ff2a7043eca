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
- **The default model with planted redundancy** (`plant_default`): SmolLM2-135M whose own knowledge neurons
  of a fact stay as they are (pathway A), while a second, disjoint set of neurons in distant layers
  (pathway B) is trained with neuron-restricted fine-tuning (`dkn.finetune`) to carry the fact when A is
  suppressed at the answer position, with KL terms that keep the fact's distribution and unrelated prompts
  unchanged.  Controls: facts left with their single pathway, and facts where B adds a fixed amount to the
  answer's logit whether A is on or not (two additive pathways, each needed).  Each planted fact is
  verified through `dkn.interventions` and the measured drops are written to a JSON manifest beside the
  weights.  `load_planted("planted-default")` builds it on first use under `cache/planted/`.

These are constructed for demonstration and for the recall benchmark (bench/bench_degeneracy_recall.py):
they are not natural models, and say so in their label.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from dkn.models import LoadedModel, cache_dir, wrap_model
from dkn.neurons import Neuron

KINDS = ("degenerate", "single", "additive")
TINY_FAMILIES = ("gpt2", "llama", "gpt_neox")
TINY_PROMPT, TINY_ANSWER = "the capital of france is", "paris"
PLANTED_DEFAULT = "planted-default"
PLANTED_DEFAULT_LABEL = "default model with facts stored twice — constructed for demonstration"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class PlantedFact:
    prompt: str
    answer: str
    kind: str                                   # "degenerate", "single" or "additive"
    groups: tuple[tuple[Neuron, ...], ...]      # the planted pathways (disjoint neuron groups)
    drops: dict = field(default_factory=dict)   # measured relative drops: {"A": .., "B": .., "all": ..}
    verified: bool = True                       # the measured drops satisfy the kind's definition

    @property
    def neurons(self) -> tuple[Neuron, ...]:
        return tuple(n for g in self.groups for n in g)

    def as_json(self) -> dict:
        d = asdict(self)
        d["groups"] = [[[n.layer, n.index] for n in g] for g in self.groups]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "PlantedFact":
        groups = tuple(tuple(Neuron(int(a), int(b)) for a, b in g) for g in d["groups"])
        return cls(d["prompt"], d["answer"], d["kind"], groups, dict(d.get("drops", {})), bool(d.get("verified", True)))


@dataclass
class PlantedModel:
    lm: LoadedModel
    facts: tuple[PlantedFact, ...]
    info: dict = field(default_factory=dict)    # how it was built: timings, KL on unrelated prompts, ...


# =====================================================================================================
# tiny hand-wired models
# =====================================================================================================
TINY_WORDS = ("the capital of france is paris germany berlin italy rome spain madrid city country a an "
              "and in on it was new york london tokyo red blue green sky grass sea sun moon king queen").split()

_TINY_CONFIGS = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_head=4, n_positions=64), "n_layer", "n_inner"),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                                      max_position_embeddings=64), "num_hidden_layers",
              "intermediate_size"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(hidden_size=32, num_attention_heads=4,
                                                             max_position_embeddings=64), "num_hidden_layers",
                 "intermediate_size"),
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
    config = getattr(transformers, config_name)(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=2,
                                                bos_token_id=2, tie_word_embeddings=False,
                                                **{layers_key: n_layers, mlp_key: d_mlp}, **kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    return wrap_model(model, tokenizer, name=f"planted-tiny-{family}")


def _directions(d_model: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """[k, d_model] orthonormal directions, each orthogonal to the all-ones vector (LayerNorm's centring
    leaves them as they are)."""
    basis = torch.randn(d_model, k + 1, generator=generator)
    basis[:, 0] = 1.0
    q, _ = torch.linalg.qr(basis)                                         # [d_model, k + 1]
    return q[:, 1:].T.contiguous()


def _is_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Norm")


def _mlp_weights(lm: LoadedModel, layer: int) -> list[torch.Tensor]:
    """The weight matrices of the layer's MLP projections (inputs and output)."""
    return [m.weight for m in lm.up_projs(layer) + [lm.down_proj(layer)]]


def tiny_planted_model(family: str = "llama", kind: str = "degenerate", n_groups: int = 2, *,
                       layers_per_group: int = 2, d_mlp: int = 64, noise: float = 0.05,
                       seed: int = 0) -> PlantedModel:
    """A tiny model of `family` that stores TINY_PROMPT -> TINY_ANSWER in `n_groups` disjoint neuron groups.
    Group g is a chain of one neuron in each of the layers [g * layers_per_group, (g + 1) * layers_per_group):
    the first reads the last prompt token's direction, each next one reads its predecessor's private
    direction, the last writes the answer's unembedding direction, so every member of a group is needed
    for the group to work.  kind "degenerate": each group alone carries the fact; "additive": the groups'
    contributions add up (each needed); "single": one group (n_groups is ignored).  Every other MLP neuron
    gets weak random weights (`noise`)."""
    if kind not in KINDS:
        raise ValueError(f"unknown planted kind {kind!r}: use one of {', '.join(KINDS)}")
    n_groups = 1 if kind == "single" else n_groups
    if not 1 <= n_groups <= 3 or (kind != "single" and n_groups < 2):
        raise ValueError("plant 2 or 3 groups for 'degenerate' and 'additive' (the 'single' kind has 1)")
    if not 1 <= layers_per_group <= 4:
        raise ValueError(f"layers_per_group must be between 1 and 4, got {layers_per_group}")
    lm = _tiny_random_model(family, n_groups * layers_per_group, d_mlp, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    d_model = lm.unembedding().shape[1]
    n_private = n_groups * (layers_per_group - 1)
    dirs = _directions(d_model, 2 + n_private, gen)                      # [2 + n_private, d_model]
    e_last, r_answer = dirs[0], dirs[1]
    private = dirs[2:].reshape(n_groups, layers_per_group - 1, d_model)  # [n_groups, steps - 1, d_model]
    rng = np.random.default_rng(seed)
    groups = tuple(tuple(Neuron(g * layers_per_group + s, int(rng.integers(d_mlp))) for s in range(layers_per_group))
                   for g in range(n_groups))
    _wire(lm, groups, e_last, r_answer, private, noise, gen)
    _calibrate_head(lm, r_answer, kind, groups)
    lm.fingerprint = _refingerprint(lm)
    lm.name = lm.label = f"planted-tiny-{family}-{kind}-{n_groups}-{seed}"
    fact = PlantedFact(TINY_PROMPT, TINY_ANSWER, kind, groups)
    return PlantedModel(lm, (_measured(lm, fact),), {"family": family, "seed": seed, "noise": noise})


@torch.no_grad()
def _wire(lm: LoadedModel, groups, e_last, r_answer, private, noise: float, gen: torch.Generator) -> None:
    """Attention and biases off, noise neurons, the planted chains, the trigger embedding."""
    last = lm.tokenizer.convert_tokens_to_ids(TINY_PROMPT.split()[-1])
    reserved = torch.cat([e_last[None], r_answer[None], private.reshape(-1, private.shape[-1])])   # [k, d_model]
    for layer in range(lm.n_layers):
        block = lm.blocks[layer]
        norms = {id(p) for m in block.modules() if _is_norm(m) for p in m.parameters()}
        for p in block.parameters():
            if id(p) not in norms:
                p.zero_()                                                 # attention writes nothing, no biases
        for w in _mlp_weights(lm, layer):
            w.normal_(0, noise, generator=gen)
    emb = lm.model.get_input_embeddings().weight                         # [vocab, d_model]
    emb.normal_(0, 0.05, generator=gen)
    emb -= (emb @ reserved.T) @ reserved                                  # keep the reserved directions free
    emb[last] = 3.0 * e_last
    positions = getattr(getattr(lm.model, "transformer", None), "wpe", None)   # GPT-2's learned positions
    if positions is not None:
        positions.weight.zero_()
    for g, group in enumerate(groups):
        reads = [e_last] + list(private[g])                               # what step s reads
        writes = list(private[g]) + [r_answer]                            # what step s writes
        for n, read, write in zip(group, reads, writes):
            for w in lm.input_vectors(n.layer):                           # [d_mlp, d_model] views
                w[n.index] = read
            lm.output_vectors(n.layer)[n.index] = write                   # [d_model], a view of the down proj
    _calibrate_chains(lm, sorted(n for g in groups for n in g))


@torch.no_grad()
def _calibrate_chains(lm: LoadedModel, neurons: list[Neuron], pre_target: float = 4.0,
                      write_target: float = 0.5) -> None:
    """Layer by layer, scale each planted neuron's input vectors so that its pre-activation on the prompt is
    `pre_target`, and its output vector so that it writes `write_target` into the residual stream: small
    beside the trigger embedding (norm 3), so that the final norm does not couple the groups."""
    from dkn.hooks import record_neurons

    ids = torch.tensor([lm.tokenizer(TINY_PROMPT)["input_ids"]], device=lm.device)   # [1, T]
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
    head = lm.unembedding()                                               # [vocab, d_model]
    head.mul_(0.1)
    base_row = head[answer].clone()

    def probs(scale: float) -> np.ndarray:
        head[answer] = base_row + scale * r_answer
        others = [tuple(n for j, g in enumerate(groups) if j != i for n in g) for i in range(len(groups))]
        return _answer_probability(lm, others)                            # [P all on, P each group kept alone]

    if kind == "additive":
        target = lambda p: p[0] >= 0.8                                    # noqa: E731
    elif kind == "degenerate":
        target = lambda p: p[1:].min() >= 0.995                          # noqa: E731
    else:
        target = lambda p: p[0] >= 0.995                                  # noqa: E731
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


def _measured(lm: LoadedModel, fact: PlantedFact) -> PlantedFact:
    """The fact with its measured drops (each group off, all off) and whether they fit its kind."""
    from dkn.interventions import intervene_many

    sets = list(fact.groups) + [fact.neurons]
    prob, probs = intervene_many(lm, fact.prompt, fact.answer, sets, 0.0)
    drops = (prob - probs) / prob if prob > 0 else np.zeros(len(sets))
    names = [chr(ord("A") + i) for i in range(len(fact.groups))]
    measured = {"p": float(prob), **{n: float(d) for n, d in zip(names, drops)}, "all": float(drops[-1])}
    return PlantedFact(fact.prompt, fact.answer, fact.kind, fact.groups, measured,
                       satisfies_kind(fact.kind, list(drops[:-1]), float(drops[-1])))


def satisfies_kind(kind: str, single_drops: Sequence[float], all_drop: float, low: float = 0.05,
                   high: float = 0.3) -> bool:
    """degenerate: every |single drop| < low and all > high; single: the one group's drop > high;
    additive: every single drop > low (each needed) and all > high."""
    if kind == "degenerate":
        return len(single_drops) >= 2 and all(abs(d) < low for d in single_drops) and all_drop > high
    if kind == "single":
        return all_drop > high
    if kind == "additive":
        return len(single_drops) >= 2 and all(d > low for d in single_drops) and all_drop > high
    raise ValueError(f"unknown planted kind {kind!r}: use one of {', '.join(KINDS)}")
