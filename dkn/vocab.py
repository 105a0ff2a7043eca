"""Vocabulary projection of a neuron: which next tokens its output weight vector promotes and demotes.

A neuron (l, i) with activation a adds a * out_i to the residual stream, where
out_i is row i of `LoadedModel.output_vectors(l)` [d_mlp, d_model].  Read
through the model's head (the final norm, plus any projection, as listed in
`Family.head`) and the unembedding [vocab, d_model], out_i moves the next-token
logits by U @ head(out_i) per unit of positive activation: the largest entries
are the tokens it promotes, the smallest the ones it demotes (a logit-lens view
of one weight vector; it ignores every later layer).
"""

from __future__ import annotations

import torch

from dkn.models import LoadedModel
from dkn.neurons import Neuron, check_in_range

TokenLogits = list[tuple[str, float]]


def neuron_logits(lm: LoadedModel, neuron: Neuron, through_norm: bool = True) -> torch.Tensor:
    """[vocab] float32 on the CPU: the unembedding applied to the neuron's output vector."""
    neuron = Neuron(*neuron)
    check_in_range([neuron], lm.n_layers, lm.d_mlp)
    with lm.lock, torch.no_grad():  # the lock: "weights" interventions scale weights in place
        vector = lm.output_vectors(neuron.layer)[neuron.index].detach().clone()  # [d_model]
        if through_norm:
            vector = lm.through_head(vector[None, None, :])[0, 0]  # as a batch of one
        unembedding = lm.unembedding()  # [vocab, d_model]
        logits = unembedding.float() @ vector.float().to(unembedding.device)  # [vocab]
    return logits.cpu()


def project_neuron(
    lm: LoadedModel, neuron: Neuron, k: int = 10, through_norm: bool = True
) -> tuple[TokenLogits, TokenLogits]:
    """(promoted, demoted): the k tokens whose logits the neuron's output vector raises most, most first,
    and the k it lowers most, lowest first; each as (decoded token, logit change per unit activation)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    logits = neuron_logits(lm, neuron, through_norm)
    k = min(k, logits.numel())
    top = logits.topk(k)
    bottom = (-logits).topk(k)
    decode = lambda i: lm.tokenizer.decode([int(i)])  # noqa: E731
    promoted = [(decode(i), float(v)) for v, i in zip(top.values, top.indices)]
    demoted = [(decode(i), -float(v)) for v, i in zip(bottom.values, bottom.indices)]
    return promoted, demoted


__all__ = ["project_neuron", "neuron_logits"]
