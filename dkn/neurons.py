"""The one definition of a neuron used everywhere in `dkn`.

A neuron is one unit of one layer's MLP hidden vector *after* the activation
function, i.e. one input feature of the MLP's down/output projection.  It is
identified by a hashable `(layer, index)` pair, so it can be a dict key, a set
member and a graph node.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple


class Neuron(NamedTuple):
    layer: int
    index: int

    def __str__(self) -> str:  # "L12:N345", the form the CLI and app accept
        return f"{self.layer}:{self.index}"


def neuron_label(n) -> str:
    """The one label a neuron gets in figures and tables: "L12:N345" (parse_neurons reads it back)."""
    return f"L{n[0]}:N{n[1]}"


def parse_neurons(text: str) -> list[Neuron]:
    """Parse "12:345,3:7" (layer:index pairs, comma separated) into neurons, each once, in first-seen order."""
    neurons = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            layer, index = part.removeprefix("L").split(":")
            neurons.append(Neuron(int(layer), int(index.removeprefix("N"))))
        except ValueError:
            raise ValueError(
                f"cannot read neuron {part!r}: write neurons as LAYER:INDEX pairs, e.g. 12:345,3:7"
            ) from None
    return unique_neurons(neurons)


def unique_neurons(neurons: Iterable[Neuron]) -> list[Neuron]:
    """Each neuron once, in first-seen order (a neuron listed twice is switched once)."""
    return list(dict.fromkeys(Neuron(*n) for n in neurons))


def check_in_range(neurons: Iterable[Neuron], n_layers: int, d_mlp: int) -> None:
    """Raise a ValueError naming the first neuron outside [0, n_layers) x [0, d_mlp)."""
    for n in neurons:
        if not (0 <= n.layer < n_layers and 0 <= n.index < d_mlp):
            raise ValueError(
                f"neuron {n} is out of range: this model has layers 0..{n_layers - 1} "
                f"and neurons 0..{d_mlp - 1} per layer"
            )


def top_neurons(scores, k: int) -> list[tuple[Neuron, float]]:
    """The k highest-scoring neurons of a [n_layers, d_mlp] score array, highest first."""
    import numpy as np

    scores = np.asarray(scores)
    flat = np.argsort(scores, axis=None)[::-1][:k]  # [k] flat indices
    layers, index = np.unravel_index(flat, scores.shape)
    return [(Neuron(int(layer), int(i)), float(scores[layer, i])) for layer, i in zip(layers, index)]
