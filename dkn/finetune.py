"""Fine-tuning restricted to chosen neurons' weights (the evolvability experiment).

`train_neurons(lm, facts, neurons)` teaches `lm` the facts' answers (cross-entropy
of every answer token after its prompt, conditioned on the gold prefix), updating
only the weight slices that belong to `neurons`: each neuron's input weight
vectors (the rows of the up projection, gate and up for gated MLPs, plus their
bias entries) and its output weight vector (the column of the down projection),
for every family, in the storage layout of `dkn.interventions.neuron_weight_slices`
(GPT-2's Conv1D included).  Everything else stays bit-identical: parameters
without a chosen neuron get no gradient at all, and the gradients of the others
are masked to the chosen slices, so Adam (no weight decay) leaves the remaining
entries exactly as they were.  `neurons=None` trains every parameter.

It trains in place: give it a copy (`fresh_copy(lm)`) when the original is needed
afterwards.  Dropout stays off (eval mode), so a run is a deterministic function
of the weights, the facts and the seed.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dkn.interventions import neuron_weight_slices
from dkn.models import LoadedModel, fingerprint
from dkn.neurons import Neuron, check_in_range
from dkn.query import make_query


@dataclass(frozen=True)
class TrainResult:
    losses: tuple[float, ...]  # mean loss of each optimiser step
    n_params: int  # trainable entries (masked slices, or every parameter)
    n_neurons: int | None  # None: all weights
    seconds: float


def fresh_copy(lm: LoadedModel) -> LoadedModel:
    """An independent LoadedModel with a deep copy of the weights (same tokenizer and family)."""
    with lm.lock:
        model = copy.deepcopy(lm.model)
    return LoadedModel(model, lm.tokenizer, lm.family, lm.name, lm.label, lm.fingerprint)


def neuron_masks(lm: LoadedModel, neurons: Iterable[Neuron]) -> dict[str, torch.Tensor]:
    """Parameter name -> bool mask (the parameter's shape) of the entries that hold `neurons`' weights."""
    neurons = tuple(Neuron(*n) for n in neurons)
    check_in_range(neurons, lm.n_layers, lm.d_mlp)
    names = {id(p): name for name, p in lm.model.named_parameters()}
    masks: dict[str, torch.Tensor] = {}
    for n in neurons:
        for param, index in neuron_weight_slices(lm, n):
            name = names[id(param)]
            if name not in masks:
                masks[name] = torch.zeros_like(param, dtype=torch.bool)
            masks[name][index] = True
    return masks


def encode(lm: LoadedModel, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(input ids of prompt + answer, [(position, target token)]) per (prompt, answer) pair."""
    if lm.family.masked_lm:
        raise ValueError("fine-tuning on facts supports causal LMs only")
    out = []
    for prompt, answer in pairs:
        steps = make_query(lm, prompt, answer).steps
        ids = list(steps[-1].input_ids) + [steps[-1].target]
        out.append((ids, [(s.position, s.target) for s in steps]))
    return out


def pad_batch(lm: LoadedModel, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids [B, T], attention mask [B, T]) of right-padded token sequences, on the model's device."""
    width = max(len(seq) for seq in sequences)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(sequences), width), pad, dtype=torch.long, device=lm.device)  # [B, T]
    attention = torch.zeros(len(sequences), width, dtype=torch.long, device=lm.device)  # [B, T]
    for b, seq in enumerate(sequences):
        ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long, device=lm.device)
        attention[b, : len(seq)] = 1
    return ids, attention


def answer_loss(lm: LoadedModel, batch: list[tuple[list[int], list[tuple[int, int]]]]) -> torch.Tensor:
    """Mean over examples of the mean answer-token cross-entropy; right-padded batch."""
    ids, attention = pad_batch(lm, [seq for seq, _ in batch])  # [B, T] each
    rows, cols, targets, weights = [], [], [], []
    for b, (_, steps) in enumerate(batch):
        for position, target in steps:
            rows.append(b), cols.append(position), targets.append(target), weights.append(1.0 / len(steps))
    logits = lm.model(input_ids=ids, attention_mask=attention).logits  # [B, T, V]
    index = torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)
    picked = logits[index].float()  # [n_targets, V]
    nll = torch.nn.functional.cross_entropy(picked, torch.tensor(targets, device=picked.device), reduction="none")
    return (nll * torch.tensor(weights, device=nll.device)).sum() / len(batch)


def train_neurons(
    lm: LoadedModel,
    facts,
    neurons: Iterable[Neuron] | None = None,
    *,
    steps: int = 20,
    lr: float = 1e-3,
    seed: int = 0,
    batch_size: int | None = None,
) -> TrainResult:
    """Adam on the chosen neurons' weight slices (every weight when `neurons` is None), in place.
    facts: Facts (trained on their first prompt) or (prompt, answer) pairs.  One step = one minibatch
    of `batch_size` examples (all of them when None), drawn in a seeded shuffled order."""
    pairs = [(f.prompt, f.answer) if hasattr(f, "prompts") else (f[0], f[1]) for f in facts]
    if not pairs:
        raise ValueError("nothing to train on: give at least one fact")
    examples = encode(lm, pairs)
    rng = np.random.default_rng(seed)
    batch_size = batch_size or len(examples)
    order: list[int] = []

    def loss(_step: int) -> torch.Tensor:
        nonlocal order
        if len(order) < batch_size:
            order += list(rng.permutation(len(examples)))
        batch, order = [examples[i] for i in order[:batch_size]], order[batch_size:]
        return answer_loss(lm, batch)

    return train_masked(lm, loss, neurons, steps=steps, lr=lr, seed=seed)


def train_masked(
    lm: LoadedModel,
    loss: Callable[[int], torch.Tensor],
    neurons: Iterable[Neuron] | None = None,
    *,
    steps: int = 20,
    lr: float = 1e-3,
    seed: int = 0,
) -> TrainResult:
    """Adam (no weight decay) on the chosen neurons' weight slices (every weight when `neurons` is None),
    in place, minimising `loss(step)` (a scalar tensor computed with `lm.model`) for `steps` steps."""
    if steps < 1 or lr <= 0:
        raise ValueError(f"steps must be >= 1 and lr > 0, got steps={steps}, lr={lr}")
    model = lm.model
    start = time.perf_counter()
    if neurons is None:
        masks, n_neurons = {}, None
        trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
        n_params = sum(p.numel() for p in trained.values())
    else:
        neurons = tuple(neurons)
        masks, n_neurons = neuron_masks(lm, neurons), len(set(neurons))
        params = dict(model.named_parameters())
        trained = {name: params[name] for name in masks}
        n_params = int(sum(int(m.sum()) for m in masks.values()))
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    hooks = []
    losses = []
    with lm.lock:
        try:
            for name, p in model.named_parameters():
                p.requires_grad_(name in trained)
            for name, mask in masks.items():
                keep = mask.to(trained[name].device)
                hooks.append(trained[name].register_hook(lambda g, keep=keep: g.masked_fill(~keep, 0.0)))
            model.eval()  # no dropout: deterministic updates
            torch.manual_seed(seed)
            optimiser = torch.optim.Adam(list(trained.values()), lr=lr, weight_decay=0.0)
            for step in range(steps):
                optimiser.zero_grad(set_to_none=True)
                value = loss(step)
                value.backward()
                optimiser.step()
                losses.append(float(value.detach()))
        finally:
            for hook in hooks:
                hook.remove()
            for name, p in model.named_parameters():
                p.requires_grad_(flags[name])
                p.grad = None
            model.eval()
        lm.fingerprint = fingerprint(model)
    return TrainResult(tuple(losses), n_params, n_neurons, time.perf_counter() - start)


__all__ = [
    "TrainResult",
    "fresh_copy",
    "neuron_masks",
    "train_neurons",
    "train_masked",
    "pad_batch",
    "answer_loss",
    "encode",
]
