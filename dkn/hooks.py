"""Hooks on the neurons, only ever inside context managers that remove them.

`edit_neurons` replaces a layer's MLP hidden vector [batch, pos, d_mlp] by
`edit(hidden)` for the layers given; `record_neurons` captures it.  The site is
"post" (after the activation: the input of the down projection, dkn's neuron)
or "pre" (the pre-activation module's output: the authors' scripts' choice,
used by the `faithful` setting).  Both hold the model's lock, so two threads
(two browser sessions) never see each other's hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch

from dkn.models import LoadedModel

Site = Literal["post", "pre"]
Edit = Callable[[torch.Tensor], torch.Tensor]  # [batch, pos, d_mlp] -> same shape


@contextmanager
def edit_neurons(lm: LoadedModel, edits: dict[int, Edit], site: Site = "post") -> Iterator[None]:
    handles = []
    with lm.lock:
        try:
            for layer, edit in edits.items():
                handles.append(_register(lm, layer, edit, site))
            yield
        finally:
            for handle in handles:
                handle.remove()


@contextmanager
def record_neurons(
    lm: LoadedModel, layers: list[int] | None = None, site: Site = "post"
) -> Iterator[dict[int, torch.Tensor]]:
    """Yields a dict filled during the forward pass: layer -> hidden [batch, pos, d_mlp]."""
    records: dict[int, torch.Tensor] = {}

    def recorder(layer: int) -> Edit:
        def edit(hidden: torch.Tensor) -> torch.Tensor:
            records[layer] = hidden
            return hidden

        return edit

    layers = range(lm.n_layers) if layers is None else layers
    with edit_neurons(lm, {layer: recorder(layer) for layer in layers}, site):
        yield records


def _register(lm: LoadedModel, layer: int, edit: Edit, site: Site) -> _Handles:
    """Hook one layer; the edit always sees [batch, pos, d_mlp], also in families (OPT) that flatten
    the hidden states to [batch * pos, d_mlp] inside the block: the block's input shape tells."""
    block_shape: dict[str, torch.Size] = {}

    def remember_shape(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        block_shape["value"] = hidden.shape[:-1]  # (batch, pos)

    def edit3d(hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() == 3:
            return edit(hidden)
        return edit(hidden.view(*block_shape["value"], -1)).reshape(hidden.shape)

    handles = [lm.blocks[layer].register_forward_pre_hook(remember_shape, with_kwargs=True)]
    if site == "post":

        def pre_hook(module, args, kwargs):
            return (edit3d(args[0]), *args[1:]), kwargs

        handles.append(lm.down_proj(layer).register_forward_pre_hook(pre_hook, with_kwargs=True))
    elif site == "pre":

        def hook(module, args, output):
            return edit3d(output)

        handles.append(lm.pre_activation(layer).register_forward_hook(hook))
    else:
        handles[0].remove()
        raise ValueError(f"unknown neuron site {site!r}: use 'post' (after the activation) or 'pre'")
    return _Handles(handles)


class _Handles:
    def __init__(self, handles):
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
