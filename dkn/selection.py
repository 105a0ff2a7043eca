"""Choosing knowledge neurons from attribution scores.

Coarse neurons of one prompt: score > t * the maximum score over all layers and neurons (Dai et al.;
t = 0.2), or, with `per_layer`, over the neuron's own layer.  Refined neurons of a fact: coarse in
more than a share p of its paraphrased prompts, with unrelated (negative) facts used in one of two ways:
- "drop" (Dai et al.): a neuron coarse for any negative fact is removed;
- "contrast": each prompt's scores minus the mean scores of the negative facts are thresholded, so a
  generic neuron that tops every fact's attribution no longer sets the threshold for everyone.

The blind spot these options answer: the threshold is relative to the *top* score, and on the default
model a few generic neurons top the attribution of unrelated facts, so one large generic score can push
every fact-specific neuron under t * max.  `generic_pushout` measures how often that happens.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dkn.neurons import Neuron

NEGATIVE_MODES = ("drop", "contrast")


@dataclass(frozen=True)
class KnowledgeNeurons:
    neurons: tuple[Neuron, ...]  # sorted by mean score, highest first
    scores: tuple[float, ...]  # mean score over the prompts, same order
    counts: tuple[int, ...]  # in how many prompts each neuron was coarse
    n_prompts: int
    t: float
    p: float
    mean_scores: np.ndarray | None = field(default=None, compare=False, repr=False)  # [n_layers, d_mlp]
    attributions: tuple = field(default=(), compare=False, repr=False)  # per prompt (find_knowledge_neurons)
    negative_attributions: tuple = field(default=(), compare=False, repr=False)
    negatives: str = "drop"
    per_layer: bool = False

    def as_records(self) -> list[dict]:
        return [
            {"layer": n.layer, "neuron": n.index, "score": s, "count": c}
            for n, s, c in zip(self.neurons, self.scores, self.counts)
        ]


def coarse_neurons(scores: np.ndarray, t: float = 0.2, per_layer: bool = False) -> list[Neuron]:
    """Neurons with score > t * max(scores) (with `per_layer`: t * the max of their own layer);
    scores: [n_layers, d_mlp].  Neurons whose reference max is not positive are never coarse."""
    if not 0 <= t <= 1:
        raise ValueError(f"threshold t must be in [0, 1], got {t}")
    top = scores.max(axis=1, keepdims=True) if per_layer else np.full((scores.shape[0], 1), scores.max())  # [L, 1]
    layers, index = np.nonzero((scores > t * top) & (top > 0))
    return [Neuron(int(l), int(i)) for l, i in zip(layers, index)]


def contrast(scores: np.ndarray, negative_maps: Sequence[np.ndarray]) -> np.ndarray:
    """[n_layers, d_mlp]: a fact's scores minus the mean scores the neurons get on unrelated facts."""
    if not len(negative_maps):
        return scores
    return scores - np.mean(np.stack(negative_maps), axis=0)


def refine(
    score_maps: Sequence[np.ndarray],
    t: float = 0.2,
    p: float = 0.5,
    negative_maps: Sequence[np.ndarray] = (),
    *,
    negatives: str = "drop",
    per_layer: bool = False,
) -> KnowledgeNeurons:
    """Refined knowledge neurons of one fact from its prompts' score maps ([n_layers, d_mlp] each).
    A neuron is kept when it is coarse in more than p * n_prompts prompts (for a single prompt: its
    coarse neurons); negative maps are used as `negatives` says (see the module docstring)."""
    if not score_maps:
        raise ValueError("refine needs the scores of at least one prompt")
    if not 0 <= p < 1:
        raise ValueError(f"share p must be in [0, 1), got {p}")
    if negatives not in NEGATIVE_MODES:
        raise ValueError(f"unknown negatives mode {negatives!r}: use one of {', '.join(NEGATIVE_MODES)}")
    judged = [contrast(s, negative_maps) for s in score_maps] if negatives == "contrast" else list(score_maps)
    counts = Counter(n for scores in judged for n in coarse_neurons(scores, t, per_layer))
    dropped = (
        {n for scores in negative_maps for n in coarse_neurons(scores, t, per_layer)} if negatives == "drop" else set()
    )
    needed = p * len(score_maps)
    kept = [n for n, c in counts.items() if c > needed and n not in dropped]
    mean = np.mean(np.stack(score_maps), axis=0)  # [n_layers, d_mlp]
    kept.sort(key=lambda n: -mean[n.layer, n.index])
    return KnowledgeNeurons(
        tuple(kept),
        tuple(float(mean[n.layer, n.index]) for n in kept),
        tuple(counts[n] for n in kept),
        len(score_maps),
        t,
        p,
        mean_scores=mean,
        negatives=negatives,
        per_layer=per_layer,
    )


def find_knowledge_neurons(
    lm,
    prompts: Sequence[str],
    answer: str,
    params=None,
    *,
    t: float = 0.2,
    p: float = 0.5,
    negative_prompts: Sequence[tuple[str, str]] = (),
    store=None,
    progress=None,
    negatives: str = "drop",
    per_layer: bool = False,
) -> KnowledgeNeurons:
    """Attribute each prompt (cached in `store`) and refine.  negative_prompts: (prompt, answer) pairs of
    unrelated facts.  The result carries the per-prompt attributions and the mean score map."""
    from dataclasses import replace

    from dkn.attribution import attribute

    jobs = [(q, answer) for q in prompts] + list(negative_prompts)
    results = []
    for i, (prompt, ans) in enumerate(jobs):
        sub = None if progress is None else (lambda d, n, i=i: progress(i * n + d, len(jobs) * n))
        results.append(attribute(lm, prompt, ans, params, store=store, progress=sub))
    maps = [a.scores for a in results]
    kns = refine(maps[: len(prompts)], t, p, maps[len(prompts) :], negatives=negatives, per_layer=per_layer)
    return replace(
        kns, attributions=tuple(results[: len(prompts)]), negative_attributions=tuple(results[len(prompts) :])
    )


@dataclass(frozen=True)
class Pushout:
    """How often generic neurons push fact-specific neurons under the coarse threshold (one map per fact)."""

    generic: tuple[Neuron, ...]  # coarse in at least `share` of the facts' maps
    lost: tuple[tuple[Neuron, ...], ...]  # per fact: coarse once the generic neurons are left out of the max
    n_facts: int

    @property
    def facts_affected(self) -> int:
        return sum(1 for lost in self.lost if lost)

    @property
    def mean_lost(self) -> float:
        return float(np.mean([len(lost) for lost in self.lost])) if self.lost else 0.0


def generic_pushout(fact_maps: Sequence[np.ndarray], t: float = 0.2, share: float = 0.25) -> Pushout:
    """Generic neurons: coarse in >= `share` of the facts and in at least 2 (a quarter by default: a neuron coarse
    for every fourth unrelated fact is not fact-specific) (one map [n_layers, d_mlp] per fact).  For each fact,
    the neurons that would be coarse if the generic neurons did not set the maximum, but are not coarse now."""
    if len(fact_maps) < 2:
        raise ValueError("generic_pushout needs the maps of at least 2 different facts")
    counts = Counter(n for scores in fact_maps for n in coarse_neurons(scores, t))
    needed = max(2.0, share * len(fact_maps))  # never a neuron of one fact only
    generic = tuple(sorted(n for n, c in counts.items() if c >= needed))
    lost = []
    for scores in fact_maps:
        masked = scores.copy()
        for n in generic:
            masked[n.layer, n.index] = -np.inf
        now = set(coarse_neurons(scores, t))
        lost.append(
            tuple(
                sorted(
                    n
                    for n in coarse_neurons(np.where(np.isfinite(masked), masked, 0.0), t)
                    if n not in now and n not in generic
                )
            )
        )
    return Pushout(generic, tuple(lost), len(fact_maps))
