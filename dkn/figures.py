"""Plotly figures of dkn's results: pure functions from numpy arrays and result dataclasses to
`plotly.graph_objects.Figure`.  No Streamlit, no torch: the app, the exports and notebooks share them.

Figures:
- `attribution_heatmap`  layer x neuron scores (hover: exact layer, neuron, score)
- `layer_summary`        per layer: positive score mass and the largest score
- `kn_graph`             the knowledge-neuron graph, layers left to right, nodes coloured by group
- `barcode`              the H0 persistence barcode of the graph's distances
- `degeneracy_grid`      P(answer) for every subset of groups suppressed (UpSet-style)
- `intervention_bars`    top next tokens before and after an intervention, side by side
- `probability_bars`     P(answer) for a few named conditions (e.g. before / after / random control)
Every builder also has a table form (`*_table`) for the CSV/JSON export.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dkn.neurons import Neuron, neuron_label

GROUP_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#bcbd22",
    "#17becf",
    "#393b79",
    "#637939",
    "#8c6d31",
)
NO_GROUP = "#b0b0b0"
EXCITATORY = "#2b6cb0"
INHIBITORY = "#c53030"
BASE_LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=80, b=50), font=dict(size=13))


def group_colour(i: int) -> str:
    return GROUP_COLOURS[i % len(GROUP_COLOURS)]


def group_name(i: int) -> str:
    """ "A", "B", ..., "Z", "AA", ... for group i."""
    name = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        name = chr(65 + r) + name
    return name


# ------------------------------------------------------------------ attribution
def attribution_heatmap(
    scores: np.ndarray,
    title: str = "Attribution score of every MLP neuron",
    highlight: Sequence[Neuron] = (),
    max_columns: int | None = None,
    saturate: float = 1.0,
) -> go.Figure:
    """Heatmap of scores [n_layers, d_mlp], layer 0 at the bottom, diverging colours centred at 0.
    The colour scale spans +-`saturate` x the largest |score| (default: the whole range, so that the colour
    bar reads the true top score; the hover stays exact).  The y axis spans exactly the layers.
    `max_columns` keeps, per block of columns, the entry of largest magnitude (display only; the hover
    then names the exact neuron of that entry).  `highlight` marks neurons with open circles."""
    scores = np.asarray(scores, dtype=np.float32)
    n_layers, d_mlp = scores.shape
    z, index = _downsample_columns(scores, max_columns)  # [L, c], [L, c]
    limit = float(np.abs(scores).max()) * saturate or 1.0
    x = np.arange(z.shape[1]) if index is not None else np.arange(d_mlp)
    heat = go.Heatmap(
        z=z,
        x=x,
        y=np.arange(n_layers),
        zmid=0.0,
        zmin=-limit,
        zmax=limit,
        colorscale="RdBu_r",
        customdata=index if index is not None else None,
        hovertemplate=(
            "layer %{y}<br>neuron %{customdata}<br>score %{z:.5f}<extra></extra>"
            if index is not None
            else "layer %{y}<br>neuron %{x}<br>score %{z:.5f}<extra></extra>"
        ),
        colorbar=dict(title="score", tickformat=".2g"),
    )
    fig = go.Figure(heat)
    if highlight:
        hx = [n.index for n in highlight] if index is None else [n.index * z.shape[1] // d_mlp for n in highlight]
        fig.add_trace(
            go.Scatter(
                x=hx,
                y=[n.layer for n in highlight],
                mode="markers",
                name="knowledge neurons",
                marker=dict(symbol="circle-open", size=11, color="black", line=dict(width=2)),
                customdata=[[n.layer, n.index] for n in highlight],
                hovertemplate="knowledge neuron L%{customdata[0]} N%{customdata[1]}<extra></extra>",
            )
        )
    fig.update_layout(
        **BASE_LAYOUT,
        title=title,
        height=max(320, 14 * n_layers + 120),
        xaxis_title="neuron index" + (" (columns binned for display)" if index is not None else ""),
        yaxis_title="layer",
        showlegend=bool(highlight),
        legend=dict(orientation="h", yanchor="top", y=-0.12, xanchor="right", x=1.0),
    )
    fig.update_yaxes(dtick=max(1, n_layers // 15), range=[-0.5, n_layers - 0.5])
    return fig


def _downsample_columns(scores: np.ndarray, max_columns: int | None):
    """(z [L, c], neuron index of each kept entry [L, c] or None): per bin the largest-|score| entry."""
    n_layers, d_mlp = scores.shape
    if not max_columns or d_mlp <= max_columns:
        return scores, None
    bins = math.ceil(d_mlp / max_columns)
    pad = bins * max_columns - d_mlp
    padded = np.pad(scores, ((0, 0), (0, pad)))  # [L, c * bins]
    blocks = padded.reshape(n_layers, max_columns, bins)  # [L, c, bins]
    pick = np.abs(blocks).argmax(-1)  # [L, c]
    z = np.take_along_axis(blocks, pick[..., None], -1)[..., 0]  # [L, c]
    index = np.minimum(np.arange(max_columns)[None, :] * bins + pick, d_mlp - 1)
    return z, index


def layer_table(scores: np.ndarray, t: float = 0.2) -> list[dict]:
    """Per layer: positive score mass, largest score, and how many neurons pass t * max."""
    scores = np.asarray(scores, dtype=np.float64)
    top = float(scores.max())
    rows = []
    for layer, row in enumerate(scores):
        best = int(row.argmax())
        rows.append(
            {
                "layer": layer,
                "positive_sum": float(np.clip(row, 0, None).sum()),
                "max_score": float(row[best]),
                "max_neuron": best,
                "coarse_neurons": int((row > t * top).sum()) if top > 0 else 0,
            }
        )
    return rows


def layer_summary(scores: np.ndarray, t: float = 0.2, title: str = "Attribution per layer") -> go.Figure:
    rows = layer_table(scores, t)
    layers = [r["layer"] for r in rows]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(
        go.Bar(
            x=layers,
            y=[r["positive_sum"] for r in rows],
            name="sum of positive scores",
            marker_color="#90cdf4",
            customdata=[[r["coarse_neurons"], r["max_neuron"]] for r in rows],
            hovertemplate="layer %{x}<br>positive sum %{y:.4f}<br>"
            "%{customdata[0]} neurons above t x max<extra></extra>",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=layers,
            y=[r["max_score"] for r in rows],
            name="largest score",
            mode="lines+markers",
            marker_color="#c05621",
            customdata=[r["max_neuron"] for r in rows],
            hovertemplate="layer %{x}<br>largest %{y:.4f} (neuron %{customdata})<extra></extra>",
        ),
        secondary_y=True,
    )
    fig.update_layout(
        **BASE_LAYOUT,
        title=title,
        height=340,
        xaxis_title="layer",
        bargap=0.15,
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
    )
    fig.update_yaxes(title_text="sum of positive scores", secondary_y=False)
    fig.update_yaxes(title_text="largest score", secondary_y=True, showgrid=False)
    return fig


# ------------------------------------------------------------------ graph
def graph_positions(neurons: Sequence[Neuron]) -> dict[int, tuple[float, float]]:
    """Node index -> (x, y): one column per layer that holds a neuron (x = the layer's rank, so that layers far
    apart do not leave empty space), y spread within the column (networkx multipartite layout)."""
    import networkx as nx

    g = nx.Graph()
    for i, n in enumerate(neurons):
        g.add_node(i, layer=n.layer)
    if not neurons:
        return {}
    pos = nx.multipartite_layout(g, subset_key="layer", align="vertical", scale=1.0)
    rank = {layer: r for r, layer in enumerate(sorted({n.layer for n in neurons}))}
    return {i: (float(rank[neurons[i].layer]), float(pos[i][1])) for i in g.nodes}


def node_groups(neurons: Sequence[Neuron], groups: Sequence[Sequence[Neuron]]) -> list[int]:
    """Group index of each neuron (-1: in no group)."""
    where = {Neuron(*n): gi for gi, g in enumerate(groups) for n in g}
    return [where.get(Neuron(*n), -1) for n in neurons]


def kn_graph(
    graph,
    groups: Sequence[Sequence[Neuron]] = (),
    scores: Sequence[float] | None = None,
    title: str = "Knowledge-neuron graph",
    passed: Sequence[bool] | None = None,
) -> go.Figure:
    """The graph of a `dkn.graph.KnowledgeGraph`: nodes at x = layer, coloured by group ("BDC A", ...),
    sized by attribution score; edges of adjacent-or-bridged layers, width by |strength|, blue for
    excitatory (w > 0), red dashed for inhibitory (w < 0).  `passed[i]`: group i passed the test."""
    neurons = list(graph.neurons)
    pos = graph_positions(neurons)
    fig = go.Figure()
    edges = graph.edges()
    if edges:
        top = max(abs(w) for _, _, w in edges) or 1.0
        buckets: dict[tuple[bool, int], list] = {}
        for i, j, w in edges:
            level = min(4, int(4 * abs(w) / top))  # 5 widths
            buckets.setdefault((w >= 0, level), []).append((i, j, w))
        for (positive, level), items in sorted(buckets.items()):
            xs, ys = [], []
            for i, j, _ in items:
                xs += [pos[i][0], pos[j][0], None]
                ys += [pos[i][1], pos[j][1], None]
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="lines",
                    hoverinfo="skip",
                    showlegend=False,
                    line=dict(
                        width=0.8 + 1.6 * level,
                        color=EXCITATORY if positive else INHIBITORY,
                        dash="solid" if positive else "dash",
                    ),
                    opacity=0.35 + 0.12 * level,
                )
            )
        # edge midpoints carry the hover text
        fig.add_trace(
            go.Scatter(
                x=[(pos[i][0] + pos[j][0]) / 2 for i, j, _ in edges],
                y=[(pos[i][1] + pos[j][1]) / 2 for i, j, _ in edges],
                mode="markers",
                marker=dict(size=6, color="rgba(0,0,0,0)"),
                showlegend=False,
                text=[
                    f"{neuron_label(neurons[i])} - {neuron_label(neurons[j])}<br>strength {w:+.4f} "
                    f"({'excitatory' if w >= 0 else 'inhibitory'})"
                    for i, j, w in edges
                ],
                hovertemplate="%{text}<extra></extra>",
            )
        )
        for positive in (True, False):
            fig.add_trace(
                go.Scatter(
                    x=[None],
                    y=[None],
                    mode="lines",
                    name="excitatory (w > 0)" if positive else "inhibitory (w < 0)",
                    line=dict(
                        color=EXCITATORY if positive else INHIBITORY, dash="solid" if positive else "dash", width=2
                    ),
                )
            )
    member = node_groups(neurons, groups)
    scores = list(scores) if scores is not None else [0.0] * len(neurons)
    smax = max([abs(s) for s in scores] + [1e-12])
    for gi in sorted(set(member), key=lambda g: (g < 0, g)):
        idx = [k for k, g in enumerate(member) if g == gi]
        if gi < 0:
            name = "in no group"
        else:
            status = "" if passed is None else (" (passed)" if passed[gi] else " (failed)")
            name = f"BDC {group_name(gi)}{status}"
        fig.add_trace(
            go.Scatter(
                x=[pos[k][0] for k in idx],
                y=[pos[k][1] for k in idx],
                mode="markers+text",
                name=name,
                text=[neuron_label(neurons[k]) for k in idx],
                textfont=dict(size=10),
                textposition=[_label_side(neurons, k) for k in idx],
                marker=dict(
                    size=[12 + 16 * abs(scores[k]) / smax for k in idx],
                    color=NO_GROUP if gi < 0 else group_colour(gi),
                    line=dict(width=1, color="#333"),
                ),
                customdata=[[neurons[k].layer, neurons[k].index, scores[k]] for k in idx],
                hovertemplate="layer %{customdata[0]}, neuron %{customdata[1]}<br>score %{customdata[2]:.4f}"
                f"<br>{name}<extra></extra>",
            )
        )
    layers = sorted({n.layer for n in neurons})
    # the legend below the plot: above it, it overwrote the title (also in exported images)
    fig.update_layout(
        **BASE_LAYOUT,
        title=title,
        height=500,
        legend=dict(orientation="h", yanchor="top", y=-0.14, xanchor="left", x=0.0),
    )
    fig.update_xaxes(
        title_text="layer",
        tickmode="array",
        tickvals=list(range(len(layers))),
        ticktext=[str(l) for l in layers],
        zeroline=False,
        showgrid=False,
        range=[-0.6, len(layers) - 0.4],
    )
    fig.update_yaxes(visible=False)
    return fig


def _label_side(neurons: Sequence[Neuron], k: int) -> str:
    """Alternate labels of the nodes of one layer left and right of their markers, so that the labels of
    neighbouring nodes on a busy layer do not overlap."""
    same_layer = [i for i, n in enumerate(neurons) if n.layer == neurons[k].layer]
    return "middle right" if same_layer.index(k) % 2 == 0 else "middle left"


def edge_table(graph) -> list[dict]:
    neurons = graph.neurons
    return [
        {
            "from_layer": neurons[i].layer,
            "from_neuron": neurons[i].index,
            "to_layer": neurons[j].layer,
            "to_neuron": neurons[j].index,
            "strength": w,
            "distance": float(graph.distance[i, j]),
            "sign": "excitatory" if w >= 0 else "inhibitory",
        }
        for i, j, w in graph.edges()
    ]


# ------------------------------------------------------------------ barcode
def barcode(
    bars,
    labels: Sequence[str] | None = None,
    title: str = "Persistence barcode (H0)",
    highlight: Sequence[Sequence[int]] = (),
) -> go.Figure:
    """Horizontal bars [birth, death) of `dkn.topology.Bar`s, longest-lived at the top; bars that never
    die run to the right edge with an arrow.  Bars whose members equal a `highlight` group get its colour."""
    bars = list(bars)
    finite = [b.death for b in bars if np.isfinite(b.death)] + [b.birth for b in bars]
    right = (max(finite) if finite else 1.0) * 1.15 or 1.0
    order = sorted(range(len(bars)), key=lambda k: (bars[k].death - bars[k].birth, -k))
    fig = go.Figure()
    groups = {tuple(sorted(g)): gi for gi, g in enumerate(highlight)}
    for row, k in enumerate(order):
        b = bars[k]
        end = b.death if np.isfinite(b.death) else right
        gi = groups.get(tuple(sorted(b.members)), -1)
        colour = group_colour(gi) if gi >= 0 else "#4a5568"
        label = labels[k] if labels is not None else ", ".join(map(str, b.members))
        death = f"{b.death:.3g}" if np.isfinite(b.death) else "never (inf)"
        fig.add_trace(
            go.Scatter(
                x=[b.birth, end],
                y=[row, row],
                mode="lines+markers",
                showlegend=False,
                line=dict(width=6, color=colour),
                marker=dict(
                    symbol=["line-ns", "line-ns" if np.isfinite(b.death) else "arrow-right"],
                    size=12,
                    color=colour,
                    line=dict(width=2, color=colour),
                ),
                hovertemplate=f"{label}<br>born {b.birth:.3g}, dies {death}<br>{len(b.members)} neuron(s)"
                + (f"<br>BDC {group_name(gi)}" if gi >= 0 else "")
                + "<extra></extra>",
            )
        )
    fig.update_layout(
        **BASE_LAYOUT,
        title=title,
        height=max(260, 22 * len(bars) + 120),
        xaxis_title="distance (1 / |connection strength|)",
    )
    fig.update_yaxes(
        tickmode="array",
        tickvals=list(range(len(order))),
        ticktext=[_short(labels[k] if labels is not None else f"{len(bars[k].members)} neurons") for k in order],
        title_text="",
    )
    fig.update_xaxes(range=[0, right * 1.02])
    return fig


def _short(text: str, n: int = 28) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def bar_table(bars, labels: Sequence[str] | None = None) -> list[dict]:
    return [
        {
            "label": labels[k] if labels is not None else "",
            "birth": b.birth,
            "death": b.death if np.isfinite(b.death) else None,
            "persistence": (b.death - b.birth) if np.isfinite(b.death) else None,
            "size": len(b.members),
            "members": " ".join(map(str, b.members)),
        }
        for k, b in enumerate(bars)
    ]


# ------------------------------------------------------------------ degeneracy grid
def degeneracy_grid(
    subset_probs: Sequence[tuple[Sequence[int], float]],
    prob: float,
    n_groups: int,
    names: Sequence[str] | None = None,
    title: str = "P(answer) with each subset of groups suppressed",
) -> go.Figure:
    """UpSet-style: one column per subset (groups marked by dots below), a colour strip of P(answer)
    above, with the unchanged probability as the first column."""
    names = list(names) if names is not None else [f"BDC {group_name(i)}" for i in range(n_groups)]
    subsets = [tuple(s) for s, _ in subset_probs]
    probs = [float(p) for _, p in subset_probs]
    cols = ["none"] + ["+".join(group_name(i) for i in s) for s in subsets]
    values = [prob] + probs
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.45, 0.55], vertical_spacing=0.04)
    text = [f"{v:.1%}" for v in values]
    drop = [(prob - v) / prob if prob > 0 else 0.0 for v in values]
    fig.add_trace(
        go.Heatmap(
            z=[values],
            x=cols,
            y=["P(answer)"],
            text=[text],
            texttemplate="%{text}",
            colorscale="Viridis",
            zmin=0,
            zmax=max(values + [1e-9]),
            colorbar=dict(title="P", len=0.5, y=0.78),
            customdata=[[f"{d:+.1%}" for d in [-x for x in drop]]],
            hovertemplate="suppressed: %{x}<br>P(answer) %{z:.2%}<br>change %{customdata}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    xs, ys, colours = [], [], []
    for c, s in zip(cols[1:], subsets):
        for i in range(n_groups):
            xs.append(c)
            ys.append(names[i])
            colours.append(group_colour(i) if i in s else "#e2e8f0")
    fig.add_trace(
        go.Scatter(x=xs, y=ys, mode="markers", marker=dict(size=14, color=colours), showlegend=False, hoverinfo="skip"),
        row=2,
        col=1,
    )
    for c, s in zip(cols[1:], subsets):
        if len(s) > 1:
            fig.add_trace(
                go.Scatter(
                    x=[c, c],
                    y=[names[min(s)], names[max(s)]],
                    mode="lines",
                    line=dict(color="#4a5568", width=2),
                    showlegend=False,
                    hoverinfo="skip",
                ),
                row=2,
                col=1,
            )
    fig.update_layout(**BASE_LAYOUT, title=title, height=260 + 26 * n_groups)
    fig.update_yaxes(categoryorder="array", categoryarray=list(reversed(names)), row=2, col=1)
    fig.update_xaxes(showticklabels=False, row=1, col=1)
    fig.update_xaxes(title_text="groups suppressed together", row=2, col=1)
    return fig


def grid_table(
    subset_probs: Sequence[tuple[Sequence[int], float]], prob: float, names: Sequence[str] | None = None
) -> list[dict]:
    rows = [{"subset": "none", "p_answer": prob, "relative_drop": 0.0}]
    for s, p in subset_probs:
        label = "+".join(names[i] if names else group_name(i) for i in s)
        rows.append({"subset": label, "p_answer": float(p), "relative_drop": (prob - p) / prob if prob > 0 else 0.0})
    return rows


# ------------------------------------------------------------------ interventions
def intervention_bars(
    top_before: Sequence[tuple[str, float]],
    top_after: Sequence[tuple[str, float]],
    answer_tokens: Sequence[str] = (),
    title: str = "Top next tokens",
) -> go.Figure:
    """Two horizontal bar charts (before | after), most likely token at the top, answer tokens highlighted."""
    return go.Figure(intervention_bars_spec(top_before, top_after, answer_tokens, title))


def intervention_bars_spec(
    top_before: Sequence[tuple[str, float]],
    top_after: Sequence[tuple[str, float]],
    answer_tokens: Sequence[str] = (),
    title: str = "Top next tokens",
) -> dict:
    """`intervention_bars` as a plain figure dict (st.plotly_chart draws it without plotly's validation,
    which costs more than the intervention itself on a small machine: this one redraws live)."""
    answers = {a.strip() for a in answer_tokens}
    data = []
    for col, top in ((1, top_before), (2, top_after)):
        toks = [_token_label(t) for t, _ in top][::-1]
        probs = [float(p) for _, p in top][::-1]
        colours = ["#dd6b20" if t.strip() in answers else "#4299e1" for t, _ in top][::-1]
        suffix = "" if col == 1 else "2"
        data.append(
            {
                "type": "bar",
                "x": probs,
                "y": list(range(len(toks))),
                "orientation": "h",
                "marker": {"color": colours},
                "text": [f"{p:.1%}" for p in probs],
                "textposition": "outside",
                "showlegend": False,
                "customdata": toks,
                "hovertemplate": "%{customdata}: %{x:.2%}<extra></extra>",
                "xaxis": f"x{suffix}",
                "yaxis": f"y{suffix}",
                "cliponaxis": False,
            }
        )
    top = max([p for _, p in list(top_before) + list(top_after)] + [1e-9])
    xrange = [0, min(1.0, top * 1.3)]
    n = max(len(top_before), len(top_after), 1)

    def yaxis(top_list, anchor):
        toks = [_token_label(t) for t, _ in top_list][::-1]
        return {
            "tickmode": "array",
            "tickvals": list(range(len(toks))),
            "ticktext": toks,
            "anchor": anchor,
            "automargin": True,
        }

    layout = {
        **BASE_LAYOUT,
        "title": {"text": title},
        "height": 140 + 28 * n,
        "xaxis": {"domain": [0.0, 0.41], "range": xrange, "tickformat": ".0%", "anchor": "y"},
        "xaxis2": {"domain": [0.59, 1.0], "range": xrange, "tickformat": ".0%", "anchor": "y2"},
        "yaxis": yaxis(top_before, "x"),
        "yaxis2": yaxis(top_after, "x2"),
        "annotations": [
            {
                "text": text,
                "x": x,
                "y": 1.0,
                "xref": "paper",
                "yref": "paper",
                "yanchor": "bottom",
                "showarrow": False,
                "font": {"size": 14},
            }
            for text, x in (("before", 0.205), ("after", 0.795))  # centred over each panel's x domain
        ],
    }
    layout["margin"] = {**BASE_LAYOUT["margin"], "t": 100}
    return {"data": data, "layout": layout}


def _token_label(token: str) -> str:
    """Tokens quoted, so that leading spaces show: ' Paris' -> "' Paris'"."""
    return repr(token)


def token_table(top_before: Sequence[tuple[str, float]], top_after: Sequence[tuple[str, float]]) -> list[dict]:
    rows = []
    for rank in range(max(len(top_before), len(top_after))):
        b = top_before[rank] if rank < len(top_before) else ("", None)
        a = top_after[rank] if rank < len(top_after) else ("", None)
        rows.append({"rank": rank + 1, "token_before": b[0], "p_before": b[1], "token_after": a[0], "p_after": a[1]})
    return rows


def probability_bars(
    values: Mapping[str, float], title: str = "P(answer)", errors: Mapping[str, float] | None = None
) -> go.Figure:
    """One bar per condition (e.g. unchanged / chosen neurons / random control), as percentages."""
    names = list(values)
    fig = go.Figure(
        go.Bar(
            x=names,
            y=[values[n] for n in names],
            text=[f"{values[n]:.1%}" for n in names],
            textposition="outside",
            marker_color=["#718096"] + ["#dd6b20"] * (len(names) - 1) if names else None,
            error_y=dict(type="data", array=[(errors or {}).get(n, 0.0) for n in names], visible=bool(errors)),
            hovertemplate="%{x}: %{y:.2%}<extra></extra>",
        )
    )
    top = max(list(values.values()) + [1e-9])
    fig.update_layout(
        **BASE_LAYOUT, title=title, height=320, yaxis_tickformat=".0%", yaxis_range=[0, min(1.05, top * 1.3)]
    )
    return fig


def dose_response(
    factors: Sequence[float],
    probs: Sequence[Sequence[float]],
    names: Sequence[str],
    prob: float,
    title: str = "Dose-response",
) -> go.Figure:
    """P(answer) against the factor, one line per group (probs[g][k] at factors[k]); the unchanged model's
    P as a grey dashed line, factor 1 (nothing changed) as a dotted vertical line."""
    fig = go.Figure()
    for g, (name, row) in enumerate(zip(names, probs)):
        fig.add_trace(
            go.Scatter(
                x=list(factors),
                y=list(row),
                mode="lines+markers",
                name=name,
                line=dict(color=group_colour(g)),
                hovertemplate=f"{name}<br>factor %{{x:g}}: %{{y:.2%}}<extra></extra>",
            )
        )
    fig.add_hline(
        y=prob, line=dict(color="#718096", dash="dash"), annotation_text="unchanged", annotation_position="top left"
    )
    fig.add_vline(x=1.0, line=dict(color="#a0aec0", dash="dot"))
    top = max([p for row in probs for p in row] + [prob, 1e-9])
    fig.update_layout(
        **BASE_LAYOUT,
        title=title,
        height=380,
        xaxis_title="factor",
        yaxis_title="P(answer)",
        yaxis_tickformat=".0%",
        yaxis_range=[0, min(1.0, top * 1.15)],
        legend=dict(orientation="h", yanchor="top", y=-0.2, x=0),
    )
    return fig


def overlap_matrix(
    facts: Sequence[str],
    shared: np.ndarray,
    jaccard: np.ndarray,
    title: str = "Knowledge neurons shared by each pair of facts",
) -> go.Figure:
    """Facts x facts: colour = Jaccard index of their knowledge-neuron sets, text = neurons shared
    (the diagonal: each fact's own count)."""
    labels = [_short(f, 32) for f in facts]
    fig = go.Figure(
        go.Heatmap(
            z=jaccard,
            x=labels,
            y=labels,
            zmin=0,
            zmax=1,
            colorscale="Blues",
            text=shared,
            texttemplate="%{text}",
            colorbar=dict(title="Jaccard"),
            hovertemplate="%{y}<br>%{x}<br>shared: %{text}<br>Jaccard %{z:.2f}<extra></extra>",
        )
    )
    fig.update_layout(**BASE_LAYOUT, title=title, height=200 + 36 * len(facts))
    fig.update_layout(margin=dict(l=220, r=20, t=80, b=160))
    fig.update_yaxes(autorange="reversed")
    return fig


__all__ = [
    "attribution_heatmap",
    "overlap_matrix",
    "layer_summary",
    "layer_table",
    "kn_graph",
    "edge_table",
    "graph_positions",
    "node_groups",
    "barcode",
    "bar_table",
    "degeneracy_grid",
    "grid_table",
    "intervention_bars",
    "intervention_bars_spec",
    "token_table",
    "probability_bars",
    "dose_response",
    "group_name",
    "group_colour",
]


# ------------------------------------------------------------------ degeneracy: sufficiency, interactions, peeling
def group_drop_bars(
    single_drops: Sequence[float],
    alone_drops: Sequence[float],
    threshold_low: float,
    threshold_high: float,
    title: str = "Each group: switched off alone, and left on alone",
) -> go.Figure:
    """Per group, two bars: the relative drop of P with only this group suppressed (must stay within
    +-threshold_low) and with every OTHER group suppressed (sufficiency: must stay below threshold_high)."""
    names = [f"BDC {group_name(i)}" for i in range(len(single_drops))]
    fig = go.Figure(
        [
            go.Bar(
                name="drop with it switched off",
                x=names,
                y=list(single_drops),
                marker_color="#dd6b20",
                hovertemplate="%{x}: P drops by %{y:.1%} with it off<extra></extra>",
            ),
            go.Bar(
                name="drop with only it left",
                x=names,
                y=list(alone_drops),
                marker_color="#4299e1",
                hovertemplate="%{x}: P drops by %{y:.1%} with every other group off<extra></extra>",
            ),
        ]
    )
    for y, text in ((threshold_low, "low"), (-threshold_low, ""), (threshold_high, "high")):
        fig.add_hline(y=y, line_dash="dot", line_color="#718096", annotation_text=text)
    fig.update_layout(
        **BASE_LAYOUT,
        title=title,
        barmode="group",
        height=340,
        yaxis_tickformat=".0%",
        yaxis_title="relative drop of P(answer)",
    )
    return fig


def group_drop_table(single_drops: Sequence[float], alone_drops: Sequence[float]) -> list[dict]:
    return [
        {"group": group_name(i), "drop_alone": float(s), "drop_only_it_left": float(a)}
        for i, (s, a) in enumerate(zip(single_drops, alone_drops))
    ]


def interaction_bars(
    interactions: Sequence[tuple[Sequence[int], float]],
    title: str = "Moebius (Harsanyi) interaction of every subset of groups",
) -> go.Figure:
    """One bar per subset: its Harsanyi dividend of the drop (singles: their own drop; a positive pair:
    the two groups stand in for each other; the bars add up to the drop with every group suppressed)."""
    labels = ["+".join(group_name(i) for i in s) for s, _ in interactions]
    values = [float(v) for _, v in interactions]
    fig = go.Figure(
        go.Bar(
            x=labels,
            y=values,
            marker_color=[EXCITATORY if v >= 0 else INHIBITORY for v in values],
            text=[f"{v:+.1%}" for v in values],
            textposition="outside",
            hovertemplate="%{x}: %{y:+.2%}<extra></extra>",
        )
    )
    fig.update_layout(
        **BASE_LAYOUT,
        title=title,
        height=340,
        yaxis_tickformat=".0%",
        xaxis_title="subset of groups",
        yaxis_title="interaction (share of P)",
    )
    return fig


def interaction_table(interactions: Sequence[tuple[Sequence[int], float]]) -> list[dict]:
    return [
        {"subset": "+".join(group_name(i) for i in s), "size": len(s), "interaction": float(v)} for s, v in interactions
    ]


def peeling_curve(
    peeling: Sequence[float],
    round_sizes: Sequence[int] = (),
    title: str = "Backup discovery: P(answer) after each round is switched off",
) -> go.Figure:
    """P(answer) unchanged (round 0) and after each round's neurons are suppressed on top of the earlier ones."""
    xs = list(range(len(peeling)))
    text = ["unchanged"] + [f"round {k}: {n} neurons" for k, n in enumerate(round_sizes, 1)]
    fig = go.Figure(
        go.Scatter(
            x=xs,
            y=list(peeling),
            mode="lines+markers+text",
            text=[f"{p:.1%}" for p in peeling],
            textposition="top center",
            customdata=text[: len(xs)] + [""] * (len(xs) - len(text)),
            line={"color": "#2b6cb0"},
            hovertemplate="%{customdata}<br>P(answer) %{y:.2%}<extra></extra>",
        )
    )
    fig.update_layout(
        **BASE_LAYOUT,
        title=title,
        height=320,
        yaxis_tickformat=".0%",
        yaxis_range=[0, min(1.05, max(list(peeling) + [1e-9]) * 1.25)],
        xaxis={"tickmode": "array", "tickvals": xs, "title": "rounds suppressed"},
    )
    return fig


def peeling_table(peeling: Sequence[float], round_sizes: Sequence[int] = ()) -> list[dict]:
    return [
        {"round": k, "neurons": (round_sizes[k - 1] if 0 < k <= len(round_sizes) else 0), "p_answer": float(p)}
        for k, p in enumerate(peeling)
    ]
