"""Choosing knowledge neurons from attribution scores.

Coarse neurons of one prompt: score > t * the maximum score over all layers and
neurons (Dai et al.; t = 0.2).  Refined neurons of a fact: coarse in more than
a share p of its paraphrased prompts, optionally minus the neurons that are
coarse for unrelated (negative) facts.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dkn.neurons import Neuron


@dataclass(frozen=True)
class KnowledgeNeurons:
    neurons: tuple[Neuron, ...]          # sorted by mean score, highest first
    scores: tuple[float, ...]            # mean score over the prompts, same order
    counts: tuple[int, ...]              # in how many prompts each neuron was coarse
    n_prompts: int
    t: float
    p: float

    def as_records(self) -> list[dict]:
        return [{"layer": n.layer, "neuron": n.index, "score": s, "count": c}
                for n, s, c in zip(self.neurons, self.scores, self.counts)]


def coarse_neurons(scores: np.ndarray, t: float = 0.2) -> list[Neuron]:
    """Neurons with score > t * max(scores); scores: [n_layers, d_mlp].  Empty if no score is positive."""
    if not 0 <= t <= 1:
        raise ValueError(f"threshold t must be in [0, 1], got {t}")
    top = float(scores.max())
    if top <= 0:
        return []
    layers, index = np.nonzero(scores > t * top)
    return [Neuron(int(l), int(i)) for l, i in zip(layers, index)]


def refine(score_maps: Sequence[np.ndarray], t: float = 0.2, p: float = 0.5,
           negative_maps: Sequence[np.ndarray] = ()) -> KnowledgeNeurons:
    """Refined knowledge neurons of one fact from its prompts' score maps ([n_layers, d_mlp] each).
    A neuron is kept when it is coarse in more than p * n_prompts prompts (for a single prompt: its
    coarse neurons), and dropped when it is coarse in any negative map."""
    if not score_maps:
        raise ValueError("refine needs the scores of at least one prompt")
    if not 0 <= p < 1:
        raise ValueError(f"share p must be in [0, 1), got {p}")
    counts = Counter(n for scores in score_maps for n in coarse_neurons(scores, t))
    negatives = {n for scores in negative_maps for n in coarse_neurons(scores, t)}
    needed = p * len(score_maps)
    kept = [n for n, c in counts.items() if c > needed and n not in negatives]
    mean = np.mean(np.stack(score_maps), axis=0)                          # [n_layers, d_mlp]
    kept.sort(key=lambda n: -mean[n.layer, n.index])
    return KnowledgeNeurons(tuple(kept), tuple(float(mean[n.layer, n.index]) for n in kept),
                            tuple(counts[n] for n in kept), len(score_maps), t, p)


def find_knowledge_neurons(lm, prompts: Sequence[str], answer: str, params=None, *, t: float = 0.2,
                           p: float = 0.5, negative_prompts: Sequence[tuple[str, str]] = (), store=None,
                           progress=None) -> KnowledgeNeurons:
    """Attribute each prompt (cached in `store`) and refine.  negative_prompts: (prompt, answer) pairs."""
    from dkn.attribution import attribute

    jobs = [(q, answer) for q in prompts] + list(negative_prompts)
    maps = []
    for i, (prompt, ans) in enumerate(jobs):
        sub = None if progress is None else (lambda d, n, i=i: progress(i * n + d, len(jobs) * n))
        maps.append(attribute(lm, prompt, ans, params, store=store, progress=sub).scores)
    return refine(maps[: len(prompts)], t, p, maps[len(prompts):])
