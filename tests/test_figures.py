"""dkn.figures: pure Plotly builders from numpy arrays and result dataclasses (no model needed)."""

import numpy as np
import plotly.graph_objects as go
import pytest

from dkn import figures
from dkn.graph import KnowledgeGraph
from dkn.neurons import Neuron
from dkn.topology import Bar, h0_barcode


def small_graph() -> KnowledgeGraph:
    neurons = (Neuron(1, 5), Neuron(2, 7), Neuron(2, 9), Neuron(3, 1))
    strength = np.zeros((4, 4))
    strength[0, 1] = strength[1, 0] = 2.0
    strength[0, 2] = strength[2, 0] = -0.5
    strength[1, 3] = strength[3, 1] = 1.0
    with np.errstate(divide="ignore"):
        dist = np.where(strength != 0, 1 / np.abs(strength), np.inf)
    np.fill_diagonal(dist, 0)
    return KnowledgeGraph(neurons, dist, strength, 3, "gate")


def test_heatmap_keeps_exact_hover_and_shape():
    scores = np.arange(12, dtype=np.float32).reshape(3, 4) - 5
    fig = figures.attribution_heatmap(scores, highlight=[Neuron(2, 3)])
    heat = fig.data[0]
    assert isinstance(heat, go.Heatmap)
    assert np.asarray(heat.z).shape == (3, 4)
    assert "layer %{y}" in heat.hovertemplate and "neuron %{x}" in heat.hovertemplate
    assert heat.zmid == 0
    assert list(fig.data[1].x) == [3] and list(fig.data[1].y) == [2]


def test_heatmap_downsampling_keeps_largest_entry_and_its_index():
    scores = np.zeros((2, 10), dtype=np.float32)
    scores[1, 7] = -3.0
    fig = figures.attribution_heatmap(scores, max_columns=5)
    z = np.asarray(fig.data[0].z)
    index = np.asarray(fig.data[0].customdata)
    assert z.shape == (2, 5)
    assert z[1, 3] == -3.0 and index[1, 3] == 7  # bin 3 covers neurons 6..7
    assert "neuron %{customdata}" in fig.data[0].hovertemplate


def test_layer_table_counts_coarse_neurons():
    scores = np.array([[1.0, 0.1, -2.0], [0.3, 0.25, 0.0]])
    rows = figures.layer_table(scores, t=0.2)
    assert [r["coarse_neurons"] for r in rows] == [1, 2]
    assert rows[0]["positive_sum"] == pytest.approx(1.1)
    assert rows[1]["max_neuron"] == 0
    assert len(figures.layer_summary(scores).data) == 2


def test_graph_layers_left_to_right_groups_and_signs():
    g = small_graph()
    fig = figures.kn_graph(g, groups=[(Neuron(1, 5), Neuron(2, 7))], scores=[1, 0.5, 0.2, 0.1], passed=[True])
    names = [t.name for t in fig.data if t.name]
    assert "BDC A (passed)" in names and "in no group" in names
    assert "inhibitory (w < 0)" in names and "excitatory (w > 0)" in names
    pos = figures.graph_positions(g.neurons)
    assert pos[0][0] < pos[1][0] == pos[2][0] < pos[3][0]  # columns ordered by layer
    dashed = [t for t in fig.data if t.mode == "lines" and t.line.dash == "dash" and t.x[0] is not None]
    assert dashed  # the negative edge
    assert len(figures.edge_table(g)) == 3
    assert figures.node_groups(g.neurons, [(Neuron(2, 9),)]) == [-1, -1, 0, -1]


def test_barcode_draws_every_bar_and_infinite_ones_to_the_edge():
    bars = h0_barcode(small_graph().distance)
    fig = figures.barcode(bars, labels=[str(b.members) for b in bars], highlight=[(0, 1)])
    assert len(fig.data) == len(bars) == 4
    right = fig.layout.xaxis.range[1]
    assert any(t.x[1] < right and t.x[1] > 0.99 * right / 1.02 for t in fig.data)  # the survivor runs to the edge
    rows = figures.bar_table([Bar(0.0, np.inf, (0, 1))])
    assert rows[0]["death"] is None and rows[0]["size"] == 2


def test_degeneracy_grid_one_column_per_subset():
    subsets = [((0,), 0.5), ((1,), 0.45), ((0, 1), 0.05)]
    fig = figures.degeneracy_grid(subsets, prob=0.6, n_groups=2)
    heat = fig.data[0]
    assert list(heat.x) == ["none", "A", "B", "A+B"]
    assert heat.z[0][0] == 0.6 and heat.text[0][3] == "5.0%"
    rows = figures.grid_table(subsets, 0.6)
    assert rows[-1]["relative_drop"] == pytest.approx((0.6 - 0.05) / 0.6)


def test_intervention_bars_side_by_side():
    before = [(" Paris", 0.7), (" the", 0.1)]
    after = [(" the", 0.3), (" Paris", 0.05)]
    fig = figures.intervention_bars(before, after, answer_tokens=[" Paris"])
    assert len(fig.data) == 2
    assert list(fig.data[0].marker.color)[-1] == "#dd6b20"  # the answer, highlighted, most likely on top
    assert figures.token_table(before, after)[0] == {
        "rank": 1,
        "token_before": " Paris",
        "p_before": 0.7,
        "token_after": " the",
        "p_after": 0.3,
    }
    fig = figures.probability_bars({"unchanged": 0.7, "chosen": 0.1}, errors={"chosen": 0.02})
    assert list(fig.data[0].text) == ["70.0%", "10.0%"]


def test_group_names():
    assert [figures.group_name(i) for i in (0, 1, 25, 26)] == ["A", "B", "Z", "AA"]


def test_heatmap_scale_spans_the_top_score_and_the_layers():
    scores = np.zeros((30, 64), dtype=np.float32)
    scores[24, 5], scores[3, 7] = 0.37, -0.05
    fig = figures.attribution_heatmap(scores, highlight=[Neuron(24, 5)])
    assert fig.data[0].zmax == pytest.approx(0.37) and fig.data[0].zmin == pytest.approx(-0.37)
    assert tuple(fig.layout.yaxis.range) == (-0.5, 29.5)  # not -2..30
    assert fig.layout.legend.y < 0  # below the plot, not over the title


def test_graph_labels_use_the_one_neuron_form():
    class G:
        neurons = (Neuron(0, 767), Neuron(0, 1297), Neuron(1, 3))

        def edges(self):
            return [(0, 2, 0.5)]

    fig = figures.kn_graph(G(), groups=[(Neuron(0, 767), Neuron(1, 3))])
    texts = [t for trace in fig.data if trace.mode == "markers+text" for t in trace.text]
    assert sorted(texts) == ["L0:N1297", "L0:N767", "L1:N3"]
    sides = [p for trace in fig.data if trace.mode == "markers+text" for p in trace.textposition]
    assert "middle left" in sides and "middle right" in sides  # neighbours on a layer alternate
    assert fig.layout.legend.y < 0


def test_heatmap_table_row_l_times_d_plus_i_is_neuron_l_i():
    scores = np.arange(12, dtype=np.float32).reshape(3, 4) - 5
    table = figures.heatmap_table(scores)
    assert len(table) == 12 and list(table.columns) == ["layer", "neuron", "score"]
    row = table.iloc[2 * 4 + 3]
    assert (row["layer"], row["neuron"], row["score"]) == (2, 3, scores[2, 3])


def test_graph_barcode_labels_bars_by_neurons_and_colours_the_groups():
    graph = small_graph()
    everything = graph.neurons  # the bar that never dies holds all four neurons
    fig, rows = figures.graph_barcode(graph, [everything])
    bars = h0_barcode(graph.distance)
    assert len(fig.data) == len(bars) == len(rows)
    assert [r["label"] for r in rows] == ["L2:N7", "L3:N1", "L2:N9", "L1:N5 L2:N7 L2:N9 L3:N1"]
    colours = [t.line.color for t in fig.data]  # shortest-lived first: the never-dying bar is drawn last
    assert colours[-1] == figures.group_colour(0) and set(colours[:-1]) == {"#4a5568"}
    fig_plain, _ = figures.graph_barcode(graph)
    assert {t.line.color for t in fig_plain.data} == {"#4a5568"}  # no group: nothing highlighted
