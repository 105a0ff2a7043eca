"""Where each supported architecture keeps its MLP neurons, kept as data.

A neuron is one unit of the MLP hidden vector after the activation function:
the input of the down/output projection.  For each model family this table
says where the layers are, which module reads that hidden vector (the output
projection, whose *input* we hook), which modules write it (the input
projections: their weight rows are a neuron's input vectors), which module
holds the pre-activation (the authors' `faithful` hook point), and how the
config names the sizes.  Nothing outside this module tests architecture names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.model_type values it covers
    layers: str  # dotted path of the ModuleList of blocks
    down_proj: str  # in a block: reads the hidden vector [.., d_mlp] -> [.., d_model]
    up_projs: tuple[str, ...]  # in a block: write the hidden vector [.., d_model] -> [.., d_mlp]
    pre_activation: str  # in a block: the module whose output the authors' scripts hook
    d_mlp_keys: tuple[str, ...]  # config attributes for the MLP width, first non-None wins
    d_mlp_fallback_multiple: int = 4  # d_mlp = multiple * hidden_size when all keys are None
    gated: bool = False  # hidden = act(gate(x)) * up(x): up_projs = (gate, up)
    masked_lm: bool = False  # answer at the mask token, bidirectional: no prefix cache
    conv1d: bool = False  # GPT-2 style Conv1D weights, stored [in, out]
    head: tuple[str, ...] = ()  # modules between the last block and the unembedding (absent ones skipped)
    post_mlp_norm: str = ""  # in a block: a norm applied to the MLP output (Gemma 2/3), absent: none


FAMILIES: tuple[Family, ...] = (
    Family(
        "gpt2",
        ("gpt2",),
        "transformer.h",
        "mlp.c_proj",
        ("mlp.c_fc",),
        "mlp.c_fc",
        ("n_inner",),
        conv1d=True,
        head=("transformer.ln_f",),
    ),
    Family(
        "gpt-j",
        ("gptj",),
        "transformer.h",
        "mlp.fc_out",
        ("mlp.fc_in",),
        "mlp.fc_in",
        ("n_inner",),
        head=("transformer.ln_f",),
    ),
    Family(
        "gpt-neo",
        ("gpt_neo",),
        "transformer.h",
        "mlp.c_proj",
        ("mlp.c_fc",),
        "mlp.c_fc",
        ("intermediate_size",),
        head=("transformer.ln_f",),
    ),
    Family(
        "gpt-neox",
        ("gpt_neox",),
        "gpt_neox.layers",
        "mlp.dense_4h_to_h",
        ("mlp.dense_h_to_4h",),
        "mlp.dense_h_to_4h",
        ("intermediate_size",),
        head=("gpt_neox.final_layer_norm",),
    ),
    Family(
        "opt",
        ("opt",),
        "model.decoder.layers",
        "fc2",
        ("fc1",),
        "fc1",
        ("ffn_dim",),
        head=("model.decoder.final_layer_norm", "model.decoder.project_out"),
    ),
    Family(
        "llama",
        ("llama", "mistral", "qwen2", "qwen3"),
        "model.layers",
        "mlp.down_proj",
        ("mlp.gate_proj", "mlp.up_proj"),
        "mlp.gate_proj",
        ("intermediate_size",),
        gated=True,
        head=("model.norm",),
    ),
    Family(
        "gemma",
        ("gemma", "gemma2", "gemma3_text"),
        "model.layers",
        "mlp.down_proj",
        ("mlp.gate_proj", "mlp.up_proj"),
        "mlp.gate_proj",
        ("intermediate_size",),
        gated=True,
        head=("model.norm",),
        post_mlp_norm="post_feedforward_layernorm",
    ),
    Family(
        "bert",
        ("bert",),
        "bert.encoder.layer",
        "output.dense",
        ("intermediate.dense",),
        "intermediate.dense",
        ("intermediate_size",),
        masked_lm=True,
    ),
    Family(
        "roberta",
        ("roberta",),
        "roberta.encoder.layer",
        "output.dense",
        ("intermediate.dense",),
        "intermediate.dense",
        ("intermediate_size",),
        masked_lm=True,
    ),
)

SUPPORTED = ", ".join(sorted({t for f in FAMILIES for t in f.model_types}))


def family_of(model_type: str) -> Family:
    """The family for a config's `model_type`, or a ValueError naming the supported ones."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ValueError(
        f"unsupported model family {model_type!r}: dkn supports {SUPPORTED}. "
        "Add a row to dkn/families.py to support another decoder or masked LM."
    )


def d_mlp_of(config, family: Family) -> int:
    for key in family.d_mlp_keys:
        value = getattr(config, key, None)
        if value is not None:
            return int(value)
    return family.d_mlp_fallback_multiple * int(config.hidden_size)


def as_linear_weight(module: nn.Module, family: Family) -> torch.Tensor:
    """The module's weight as [out_features, in_features], whatever its storage (Conv1D is [in, out])."""
    return module.weight.T if family.conv1d else module.weight
