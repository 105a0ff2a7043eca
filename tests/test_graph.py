"""dkn.graph: the edge definitions (static, functional, faithful) on hand-built and tiny random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from dkn.graph import (
    build_graph,
    connection_strengths,
    functional_strengths,
    norm_gain,
    static_strengths,
)
from dkn.hooks import edit_neurons, record_neurons
from dkn.models import wrap_model
from dkn.neurons import Neuron
from dkn.query import make_query
from dkn.topology import ntc_components

PROMPT, ANSWER = "the capital of france is", "paris"


@pytest.mark.parametrize(
    "family, norm_path, offset",
    [
        ("llama", "post_attention_layernorm", 0.0),
        ("gpt2", "ln_2", 0.0),
        ("gemma3_text", "pre_feedforward_layernorm", 1.0),
    ],
)
def test_the_next_blocks_norm_gain_is_folded_into_in_b(family, norm_path, offset):
    """w = out_A . (g * in_B) with g the gain of the norm B's MLP reads through (Gemma: 1 + weight)."""
    lm = tiny_model(family)
    torch.manual_seed(1)
    norm = lm.blocks[1].get_submodule(norm_path)
    with torch.no_grad():
        norm.weight.uniform_(0.2, 3.0)
    assert torch.allclose(norm_gain(lm, 1), norm.weight.float() + offset, atol=1e-5)
    src, dst = [Neuron(0, 1), Neuron(0, 4)], [Neuron(1, 2), Neuron(1, 5)]
    folded = connection_strengths(lm, src, dst, fold_norm=True)
    out = lm.output_vectors(0)[[1, 4]].float()  # [2, d_model]
    ins = lm.input_vectors(1)[0][[2, 5]].float()  # [2, d_model]
    expected = (out * (norm.weight.float() + offset)[None]) @ ins.T
    assert np.allclose(folded, expected.detach().numpy(), rtol=1e-4, atol=1e-6)
    assert not np.allclose(folded, connection_strengths(lm, src, dst, fold_norm=False), rtol=1e-2)


def test_static_graph_links_any_two_layers_and_sums_paths_as_products():
    """T = W + W^2 (3 layers): the direct residual link of layers 0 and 2 plus the path through layer 1."""
    lm = tiny_model("llama")
    neurons = [Neuron(0, 0), Neuron(1, 3), Neuron(2, 5)]
    t = static_strengths(lm, neurons, max_span=3)
    w = lambda a, b: connection_strengths(lm, [a], [b], fold_norm=True)[0, 0]
    w01, w12, w02 = w(neurons[0], neurons[1]), w(neurons[1], neurons[2]), w(neurons[0], neurons[2])
    assert t[0, 1] == pytest.approx(w01, rel=1e-5) and t[1, 2] == pytest.approx(w12, rel=1e-5)
    assert t[0, 2] == pytest.approx(w02 + w01 * w12, rel=1e-5)
    assert t[1, 0] == 0 and t[2, 0] == 0
    g = build_graph(lm, [neurons[0], neurons[2]], max_span=3, edge="static")  # no KN in layer 1
    assert np.isfinite(g.distance[0, 1]) and g.strength[0, 1] == pytest.approx(w02, rel=1e-5)
    assert np.isinf(build_graph(lm, [neurons[0], neurons[2]], max_span=3, edge="faithful").distance[0, 1])


def _two_pairs_two_layers_apart():
    """A 3-layer LLaMA model: neuron (0, i) writes direction v_i, neuron (2, i) reads v_i (i = 0, 1), all else 0.
    Two pairs linked only across a gap of two layers, by the residual stream.  (0, 0) and (0, 1) read the last
    prompt token's embedding, so they fire on the prompt."""
    lm = tiny_model("llama")
    d = lm.model.config.hidden_size
    basis = torch.eye(d)
    last = lm.model.model.embed_tokens.weight[lm.tokenizer.convert_tokens_to_ids("is")].detach().clone()
    with torch.no_grad():
        for layer in lm.model.model.layers:
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                proj.weight.zero_()
        l0, l2 = lm.model.model.layers[0], lm.model.model.layers[2]
        for i, v in enumerate((basis[5], basis[6])):
            l0.mlp.down_proj.weight[:, i] = 2.0 * v
            l2.mlp.gate_proj.weight[i] = 1.5 * v
            l2.mlp.up_proj.weight[i] = 1.5 * v
            l0.mlp.gate_proj.weight[i] = last
            l0.mlp.up_proj.weight[i] = last
    return wrap_model(lm.model, lm.tokenizer, name="two-pairs")


def test_max_span_changes_the_static_clustering_when_it_should():
    lm = _two_pairs_two_layers_apart()
    neurons = [Neuron(0, 0), Neuron(0, 1), Neuron(2, 0), Neuron(2, 1)]
    groups = lambda g: sorted(tuple(sorted(neurons[i] for i in c.members)) for c in ntc_components(g.distance))
    assert groups(build_graph(lm, neurons, max_span=1, edge="static")) == []  # a gap of 2: unconnected
    assert groups(build_graph(lm, neurons, max_span=2, edge="static")) == [
        (Neuron(0, 0), Neuron(2, 0)),
        (Neuron(0, 1), Neuron(2, 1)),
    ]
    # the paper's graph only bridges gaps through knowledge neurons in between: none here, whatever the span
    assert groups(build_graph(lm, neurons, max_span=3, edge="faithful")) == []


def test_a_strong_two_step_path_pulls_its_ends_together_in_the_static_graph_only():
    """In the faithful graph a path's distance d_ij + d_jk is longer than its edges, so single linkage
    ignores it; in the static graph a path adds w_ij * w_jk to the ends' strength."""
    lm = tiny_model("llama")
    neurons = [Neuron(0, 0), Neuron(1, 3), Neuron(2, 5)]
    faithful = [build_graph(lm, neurons, max_span=s, edge="faithful") for s in (1, 3)]
    merges = [sorted(np.round(np.sort(g.distance[np.triu_indices(3, 1)])[:2], 9)) for g in faithful]
    assert merges[0] == merges[1]  # the span-2 path never becomes an MST edge
    static = [build_graph(lm, neurons, max_span=s, edge="static") for s in (1, 2)]
    assert np.isinf(static[0].distance[0, 2]) and np.isfinite(static[1].distance[0, 2])
    w01 = static[1].strength[0, 1]
    w12 = static[1].strength[1, 2]
    direct = connection_strengths(lm, [neurons[0]], [neurons[2]], fold_norm=True)[0, 0]
    assert static[1].strength[0, 2] == pytest.approx(direct + w01 * w12, rel=1e-5)


def test_functional_edge_is_activation_times_the_derivative_of_b_pre_activation():
    """Checked against a finite difference of B's pre-activation when A's activation is nudged."""
    lm = tiny_model("llama")
    a, b = Neuron(0, 2), Neuron(2, 7)
    w = functional_strengths(lm, PROMPT, ANSWER, [a, b])
    step = make_query(lm, PROMPT, ANSWER).steps[0]
    ids = torch.tensor([step.input_ids])

    def pre_b(delta):
        def nudge(h):
            h = h.clone()
            h[0, step.position, a.index] += delta
            return h

        with (
            torch.no_grad(),
            edit_neurons(lm, {a.layer: nudge}),
            record_neurons(lm, [b.layer], "pre") as pre,
            record_neurons(lm, [a.layer]) as post,
        ):
            lm.model(input_ids=ids)
            return float(pre[b.layer][0, step.position, b.index]), float(post[a.layer][0, step.position, a.index])

    eps = 1e-3
    (p_plus, _), (p_minus, _), (_, act) = pre_b(eps), pre_b(-eps), pre_b(0.0)
    assert w[0, 1] == pytest.approx(act * (p_plus - p_minus) / (2 * eps), rel=2e-2, abs=1e-6)
    assert w[1, 0] == 0.0


def test_functional_edges_ignore_a_neuron_that_is_silent_on_this_prompt():
    """Neuron (0, 2)'s output is aligned with what (2, 0) reads, but it never fires on the prompt: the static
    graph groups them, the functional one does not."""
    lm = _two_pairs_two_layers_apart()
    d = lm.model.config.hidden_size
    with torch.no_grad():
        lm.model.model.layers[0].mlp.down_proj.weight[:, 2] = 4.0 * torch.eye(d)[5]  # input weights stay 0
    neurons = [Neuron(0, 0), Neuron(0, 2), Neuron(2, 0)]
    static = build_graph(lm, neurons, max_span=2, edge="static")
    functional = build_graph(lm, neurons, max_span=2, edge="functional", prompt=PROMPT, answer=ANSWER)
    assert np.isfinite(static.distance[1, 2])
    assert np.isinf(functional.distance[1, 2]) and np.isfinite(functional.distance[0, 2])
    with pytest.raises(ValueError, match="prompt"):
        build_graph(lm, neurons, edge="functional")


def test_edge_definitions_offered_by_the_front_ends_match_the_graph():
    from dkn import options
    from dkn.graph import EDGES

    assert options.EDGES == EDGES
