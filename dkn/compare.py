"""Facts compared: which knowledge neurons are about a fact, and which turn up for every fact (generic).

The same few neurons can top the attribution of unrelated facts (a large-norm neuron of layer 0, say).
`kn_overlap` takes the knowledge neurons of several facts and gives the overlap matrix (how many neurons
each pair shares, and the Jaccard index) and, per neuron, the share of the facts it is a knowledge neuron
of; `Overlap.generic` lists the neurons found in at least `min_share` of the facts (and in 2 or more).

`knockout_without_generic` is the selection option that drops the generic neurons (the negative examples
of Dai et al.: neurons shared with unrelated facts) and shows what it does to the knockout: P(answer) with
every knowledge neuron suppressed, with only the fact-specific ones, and with only the generic ones.

`neuron_detail` describes one neuron on one prompt: its activation at the answer position, the change of
the answer's first-token logit per unit of activation through the unembedding (dkn.vocab's logit-lens
view), and their product, its direct effect on the answer logit (later layers ignored).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dkn.hooks import record_neurons
from dkn.models import LoadedModel
from dkn.neurons import Neuron, check_in_range
from dkn.query import make_query
from dkn.vocab import neuron_logits


@dataclass(frozen=True)
class Overlap:
    facts: tuple[str, ...]
    shared: np.ndarray  # [F, F] int: knowledge neurons facts i and j share (diagonal: own count)
    jaccard: np.ndarray  # [F, F] float: shared / union (1 on the diagonal; 0 for two empty sets)
    share: dict[Neuron, float]  # neuron -> share of the facts it is a knowledge neuron of
    facts_of: dict[Neuron, tuple[str, ...]]  # neuron -> those facts

    def generic(self, min_share: float = 0.5) -> tuple[Neuron, ...]:
        """Neurons that are knowledge neurons of >= min_share of the facts and of at least 2 facts, most
        shared first."""
        hits = [n for n, s in self.share.items() if s >= min_share and len(self.facts_of[n]) >= 2]
        return tuple(sorted(hits, key=lambda n: (-self.share[n], n)))

    def table(self, min_share: float = 0.5) -> list[dict]:
        generic = set(self.generic(min_share))
        return [
            {
                "neuron": f"L{n.layer}:N{n.index}",
                "layer": n.layer,
                "index": n.index,
                "share": self.share[n],
                "facts": len(self.facts_of[n]),
                "generic": n in generic,
                "of": ", ".join(self.facts_of[n]),
            }
            for n in sorted(self.share, key=lambda n: (-self.share[n], n))
        ]


def kn_overlap(knowledge_neurons: Mapping[str, Sequence[Neuron]]) -> Overlap:
    """The overlap of the knowledge neurons of several facts (fact name -> its knowledge neurons)."""
    if len(knowledge_neurons) < 2:
        raise ValueError("comparing facts needs at least 2 facts")
    names = tuple(knowledge_neurons)
    sets = [{Neuron(*n) for n in knowledge_neurons[f]} for f in names]
    F = len(names)
    shared = np.zeros((F, F), dtype=int)
    jaccard = np.zeros((F, F))
    for i in range(F):
        for j in range(F):
            both, either = len(sets[i] & sets[j]), len(sets[i] | sets[j])
            shared[i, j] = both
            jaccard[i, j] = both / either if either else (1.0 if i == j else 0.0)
    facts_of: dict[Neuron, tuple[str, ...]] = {}
    for name, s in zip(names, sets):
        for n in s:
            facts_of[n] = facts_of.get(n, ()) + (name,)
    share = {n: len(fs) / F for n, fs in facts_of.items()}
    return Overlap(names, shared, jaccard, share, facts_of)


@dataclass(frozen=True)
class NeuronDetail:
    neuron: Neuron
    activation: float  # at the answer position (the prompt's last token for causal LMs)
    logit_per_unit: float  # change of the answer's first-token logit per unit of activation (logit lens)
    direct_effect: float  # activation * logit_per_unit
    answer_token: str


@torch.no_grad()
def neuron_detail(lm: LoadedModel, prompt: str, answer: str, neuron: Neuron) -> NeuronDetail:
    """One neuron on one prompt: activation, logit change per unit, direct effect on the answer logit."""
    neuron = Neuron(*neuron)
    check_in_range([neuron], lm.n_layers, lm.d_mlp)
    step = make_query(lm, prompt, answer).steps[0]
    ids = torch.tensor([step.input_ids], device=lm.device)  # [1, T]
    with lm.lock, record_neurons(lm, [neuron.layer]) as records:
        lm.model(input_ids=ids)
    activation = float(records[neuron.layer][0, step.position, neuron.index])  # records: [1, T, d_mlp]
    per_unit = float(neuron_logits(lm, neuron)[step.target])
    return NeuronDetail(neuron, activation, per_unit, activation * per_unit, lm.tokenizer.decode([step.target]))


@dataclass(frozen=True)
class GenericKnockout:
    prob: float  # P(answer), unchanged model
    all_kn: float  # P(answer) with every knowledge neuron suppressed
    specific: float  # ... with only the fact-specific ones (the generic ones dropped from the set)
    generic_only: float  # ... with only the generic ones
    specific_neurons: tuple[Neuron, ...]
    generic_neurons: tuple[Neuron, ...]

    def drop(self, p: float) -> float:
        """Relative drop of P(answer): 1 means the answer is gone."""
        return (self.prob - p) / self.prob if self.prob > 0 else 0.0

    def table(self) -> list[dict]:
        return [
            {"knocked out": name, "neurons": len(ns), "p_answer": p, "drop": self.drop(p)}
            for name, ns, p in (
                ("every knowledge neuron", self.specific_neurons + self.generic_neurons, self.all_kn),
                ("fact-specific only (generic dropped)", self.specific_neurons, self.specific),
                ("generic only", self.generic_neurons, self.generic_only),
            )
        ]


def knockout_without_generic(
    lm: LoadedModel, prompt: str, answer: str, neurons: Sequence[Neuron], generic: Sequence[Neuron], mode: str = "last"
) -> GenericKnockout:
    """Suppress the knowledge neurons `neurons` with and without the generic ones (one batched pass)."""
    from dkn.interventions import intervene_many

    neurons = tuple(Neuron(*n) for n in neurons)
    generic_set = {Neuron(*n) for n in generic}
    specific = tuple(n for n in neurons if n not in generic_set)
    shared = tuple(n for n in neurons if n in generic_set)
    prob, (p_all, p_specific, p_generic) = intervene_many(lm, prompt, answer, [neurons, specific, shared], 0.0, mode)
    return GenericKnockout(float(prob), float(p_all), float(p_specific), float(p_generic), specific, shared)


__all__ = ["GenericKnockout", "NeuronDetail", "Overlap", "kn_overlap", "knockout_without_generic", "neuron_detail"]
