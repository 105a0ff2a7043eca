"""dkn.topology on hand-computed distance matrices, plus property checks
against scipy's single linkage."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.sparse.csgraph import connected_components, minimum_spanning_tree
from scipy.spatial.distance import pdist, squareform

from dkn.topology import (
    CLUSTERERS,
    Bar,
    Component,
    Merge,
    clusters_at,
    dbscan,
    dbscan_eps,
    group_barcode,
    h0_barcode,
    hierarchical,
    kmeans,
    merge_tree,
    ntc_components,
    ntc_faithful,
    ntc_threshold,
)

INF = np.inf


def sym(n: int, pairs: dict[tuple[int, int], float], default: float = INF) -> np.ndarray:
    """[n, n] matrix: `default` everywhere, 0 on the diagonal, the given pairs."""
    d = np.full((n, n), default)
    np.fill_diagonal(d, 0.0)
    for (i, j), w in pairs.items():
        d[i, j] = d[j, i] = w
    return d


# A = {0,1,2} (edges 1, 1, 1.5), B = {3,4,5} (edges 0.8, 1, 1.5), one bridge 2-3 at 6,
# every other cross pair unconnected (inf), as between same-layer neurons.
A_B = {(0, 1): 1, (1, 2): 1, (0, 2): 1.5, (3, 4): 0.8, (4, 5): 1, (3, 5): 1.5, (2, 3): 6}
TWO = sym(6, A_B)
# ... plus C = {6,7,8} (edges 0.5, 0.7, 1), at inf from A and B.
THREE = sym(9, {**A_B, (6, 7): 0.5, (7, 8): 0.7, (6, 8): 1})
# A line metric 0-1-2-3-4, unit spacing.
CHAIN = np.abs(np.subtract.outer(np.arange(5.0), np.arange(5.0)))


# ---------------------------------------------------------------- two groups
def test_two_groups_barcode_exact():
    # Kruskal: 3-4 @0.8, 0-1 @1, 1-2 @1, 4-5 @1, 2-3 @6; the smaller side dies,
    # equal sizes: the side without the smaller index.
    assert h0_barcode(TWO) == [
        Bar(0.0, 0.8, (4,)),
        Bar(0.0, 1.0, (1,)),
        Bar(0.0, 1.0, (2,)),
        Bar(0.0, 1.0, (5,)),
        Bar(0.0, 6.0, (3, 4, 5)),
        Bar(0.0, INF, (0, 1, 2, 3, 4, 5)),
    ]


def test_two_groups_merge_tree_and_cuts():
    assert merge_tree(TWO) == [
        Merge(0.8, (3,), (4,)),
        Merge(1.0, (0,), (1,)),
        Merge(1.0, (0, 1), (2,)),
        Merge(1.0, (3, 4), (5,)),
        Merge(6.0, (0, 1, 2), (3, 4, 5)),
    ]
    assert merge_tree(TWO)[-1].members == (0, 1, 2, 3, 4, 5)
    assert clusters_at(TWO, 0.9) == [(0,), (1,), (2,), (3, 4), (5,)]
    assert clusters_at(TWO, 1.0, min_size=2) == [(0, 1, 2), (3, 4, 5)]
    assert clusters_at(TWO, 6.0) == [(0, 1, 2, 3, 4, 5)]


def test_two_groups_group_barcode():
    # B is born at 0.8, A at 1; they meet at 6, the younger (A) dies.
    assert group_barcode(TWO) == [Bar(1.0, 6.0, (0, 1, 2)), Bar(0.8, INF, (0, 1, 2, 3, 4, 5))]


def test_two_groups_ntc_exact():
    # merge heights [0.8, 1, 1, 1, 6]: tau = median = 1; at 6 both groups have
    # lived > 1 (5.2 and 5), so the meeting is significant.
    assert ntc_threshold(TWO) == 1.0
    comps = ntc_components(TWO)
    assert comps == [Component((3, 4, 5), 0.8, 6.0), Component((0, 1, 2), 1.0, 6.0)]
    assert [c.persistence for c in comps] == pytest.approx([5.2, 5.0])
    assert [c.size for c in comps] == [3, 3]


def test_ntc_threshold_parameter():
    # tau above A's persistence (5): A is absorbed, one component, never dies.
    assert ntc_components(TWO, threshold=5.1) == [Component((0, 1, 2, 3, 4, 5), 0.8, INF)]
    assert ntc_components(TWO, threshold=4.9) == ntc_components(TWO)
    # quantile 1 -> tau = 6: nothing meets significantly
    assert ntc_components(TWO, persistence_quantile=1.0)[0].members == (0, 1, 2, 3, 4, 5)
    # min_size 4: groups of 3 are too small to stay apart
    assert ntc_components(TWO, min_size=4) == [Component((0, 1, 2, 3, 4, 5), 0.8, INF)]


def test_late_joiner_is_noise():
    # TWO plus neuron 6 joining B at 9, after A and B met at 6.
    d = sym(7, {**A_B, (5, 6): 9})
    assert [c.members for c in ntc_components(d)] == [(3, 4, 5), (0, 1, 2)]


def test_short_lived_group_is_absorbed():
    # A = 0-1-2 (edges 1, 1); pair {3,4} at 0.5 joins A at 1.2 having lived 0.7;
    # merge heights [0.5, 1, 1, 1.2]: tau = 1, so {3,4} is absorbed.
    d = sym(5, {(0, 1): 1, (1, 2): 1, (3, 4): 0.5, (2, 3): 1.2})
    assert ntc_components(d) == [Component((0, 1, 2, 3, 4), 0.5, INF)]


@pytest.mark.parametrize("name", ["ntc", "hierarchical", "dbscan", "kmeans"])
def test_every_clusterer_finds_the_two_groups(name):
    assert sorted(CLUSTERERS[name](TWO)) == [(0, 1, 2), (3, 4, 5)]


def test_baseline_defaults():
    # nearest nonzero distance per row: 1, 1, 1, 0.8, 0.8, 1 -> median 1
    assert dbscan_eps(TWO) == 1.0
    assert dbscan(TWO, eps=0.9) == [(3, 4)]  # 0.8 is the only pair within 0.9
    assert hierarchical(TWO, quantile=0.0) == [(3, 4)]  # cut at 0.8
    assert kmeans(TWO, seed=1) == kmeans(TWO, seed=1)


# ---------------------------------------------------------------- chain, inf
def test_chain():
    assert h0_barcode(CHAIN) == [
        Bar(0.0, 1.0, (1,)),
        Bar(0.0, 1.0, (2,)),
        Bar(0.0, 1.0, (3,)),
        Bar(0.0, 1.0, (4,)),
        Bar(0.0, INF, (0, 1, 2, 3, 4)),
    ]
    assert group_barcode(CHAIN) == [Bar(1.0, INF, (0, 1, 2, 3, 4))]
    assert ntc_components(CHAIN) == [Component((0, 1, 2, 3, 4), 1.0, INF)]


def test_three_groups_with_inf():
    # C never merges: death inf, long-lived by definition. Merge heights
    # [0.5, 0.7, 0.8, 1, 1, 1, 6]: tau = 1.
    assert ntc_threshold(THREE) == 1.0
    assert ntc_components(THREE) == [
        Component((6, 7, 8), 0.5, INF),
        Component((3, 4, 5), 0.8, 6.0),
        Component((0, 1, 2), 1.0, 6.0),
    ]
    bars = h0_barcode(THREE)
    assert [b for b in bars if b.death == INF] == [Bar(0.0, INF, (0, 1, 2, 3, 4, 5)), Bar(0.0, INF, (6, 7, 8))]
    assert sorted(b.death for b in bars if b.death < INF) == [0.5, 0.7, 0.8, 1, 1, 1, 6]
    assert group_barcode(THREE) == [
        Bar(1.0, 6.0, (0, 1, 2)),
        Bar(0.8, INF, (0, 1, 2, 3, 4, 5)),
        Bar(0.5, INF, (6, 7, 8)),
    ]


# ---------------------------------------------------------------- small n, all inf
SMALL = [np.zeros((0, 0)), np.zeros((1, 1)), sym(2, {}), sym(4, {})]


@pytest.mark.parametrize("d", SMALL, ids=["n0", "n1", "n2-inf", "all-inf"])
def test_nothing_to_cluster(d):
    n = d.shape[0]
    for name, f in CLUSTERERS.items():
        assert f(d) == [], name
    assert ntc_components(d) == []
    assert merge_tree(d) == []
    assert h0_barcode(d) == [Bar(0.0, INF, (i,)) for i in range(n)]
    assert group_barcode(d) == []


def test_empty_list_is_n0():
    assert h0_barcode([]) == []


def test_n2_finite():
    d = sym(2, {(0, 1): 3.0})
    assert h0_barcode(d) == [Bar(0.0, 3.0, (1,)), Bar(0.0, INF, (0, 1))]
    assert ntc_components(d) == [Component((0, 1), 3.0, INF)]
    assert hierarchical(d) == [(0, 1)]
    assert dbscan(d) == [(0, 1)]
    assert kmeans(d) == []  # k = 2 clusters of one neuron each
    assert ntc_faithful(d) == []  # int(0.2 * 1) = 0 edges kept


# ---------------------------------------------------------------- faithful
# 15 finite pairs: 0-1 @1, 1-2 @2, 3-4 @4, every other pair @10.
FAITHFUL = sym(6, {(0, 1): 1, (1, 2): 2, (3, 4): 4}, default=10.0)


def test_faithful_reproduces_shared_death():
    # Lowest 20%: int(0.2 * 15) = 3 edges (1, 2, 4). Components {0,1,2} born at 1,
    # {3,4} born at 4; every death = the largest kept edge = 4 (the defect);
    # median birth 2.5; persistences 3 (> 2.5, kept) and 0 (dropped).
    assert ntc_faithful(FAITHFUL) == [Component((0, 1, 2), 1.0, 4.0)]
    assert ntc_faithful(FAITHFUL)[0].persistence == 3.0
    # With 40%: 6 edges, the ties at 10 in (row, column) order: 0-2 (inside),
    # 0-3 (joins {3,4}), 0-4 (inside). One component born at 1, death 10, median
    # birth 1: persistence 9 > 1.
    assert ntc_faithful(FAITHFUL, edge_fraction=0.4) == [Component((0, 1, 2, 3, 4), 1.0, 10.0)]


def test_principled_vs_faithful_on_same_matrix():
    # Merge heights [1, 2, 4, 10, 10]: tau = 4; {0,1,2} and {3,4} meet at 10 with
    # persistences 9 and 6 (each its own death), and 5 joins afterwards: noise.
    assert ntc_components(FAITHFUL) == [Component((0, 1, 2), 1.0, 10.0), Component((3, 4), 4.0, 10.0)]


# ---------------------------------------------------------------- properties
def random_matrices():
    """Euclidean and non-metric random symmetric matrices, several seeds."""
    for seed in range(8):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(3, 30))
        yield squareform(pdist(rng.normal(size=(n, 3))))
        m = rng.random((n, n))
        m = m + m.T
        np.fill_diagonal(m, 0.0)
        yield m


@pytest.mark.parametrize("d", list(random_matrices()))
def test_h0_deaths_equal_scipy_single_linkage(d):
    z = linkage(squareform(d, checks=False), method="single")  # [n-1, 4]
    bars = h0_barcode(d)
    assert len(bars) == d.shape[0]
    assert sorted(b.death for b in bars if b.death < INF) == pytest.approx(sorted(z[:, 2]))
    assert [b.members for b in bars if b.death == INF] == [tuple(range(d.shape[0]))]
    assert [m.height for m in merge_tree(d)] == pytest.approx(sorted(z[:, 2]))
    for t in np.quantile(z[:, 2], [0.25, 0.5, 0.9]):
        labels = fcluster(z, t=t, criterion="distance")
        expected = sorted(tuple(np.flatnonzero(labels == k)) for k in np.unique(labels))
        assert clusters_at(d, t) == expected


@pytest.mark.parametrize("seed", range(6))
def test_h0_with_inf_matches_minimum_spanning_forest(seed):
    rng = np.random.default_rng(seed)
    n = 25
    d = rng.random((n, n)) + 0.1
    d = np.minimum(d, d.T)
    d[rng.random((n, n)) < 0.85] = INF
    d = np.minimum(d, d.T)
    np.fill_diagonal(d, 0.0)
    forest = minimum_spanning_tree(np.where(np.isfinite(d), d, 0.0)).toarray()
    n_comp, _ = connected_components(np.isfinite(d))
    bars = h0_barcode(d)
    assert sorted(b.death for b in bars if b.death < INF) == pytest.approx(sorted(forest[forest > 0]))
    assert sum(b.death == INF for b in bars) == n_comp


@pytest.mark.parametrize("d", list(random_matrices()))
def test_ntc_invariants(d):
    tau = ntc_threshold(d)
    comps = ntc_components(d)
    nodes = {m.members for m in merge_tree(d)}
    seen: set[int] = set()
    for c in comps:
        assert c.members in nodes and c.size >= 2 and c.persistence > tau
        assert not seen & set(c.members)
        seen |= set(c.members)
    assert [c.persistence for c in comps] == sorted((c.persistence for c in comps), reverse=True)


@pytest.mark.parametrize("d", list(random_matrices())[:6])
@pytest.mark.parametrize("name", list(CLUSTERERS))
def test_clusterers_return_disjoint_groups(d, name):
    clusters = CLUSTERERS[name](d)
    members = [x for c in clusters for x in c]
    assert len(members) == len(set(members))
    assert all(len(c) >= 2 and list(c) == sorted(c) for c in clusters)


def test_input_not_modified_and_diagonal_ignored():
    d = TWO.copy()
    d[0, 0] = INF
    ntc_components(d)
    assert d[0, 0] == INF
    assert ntc_components(d) == ntc_components(TWO)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((2, 3)), "square"),
        (np.zeros(4), "square"),
        (np.array([[0.0, 1.0], [2.0, 0.0]]), "symmetric"),
        (np.array([[0.0, -1.0], [-1.0, 0.0]]), "negative"),
        (np.array([[0.0, -INF], [-INF, 0.0]]), "negative"),
        (np.array([[0.0, np.nan], [np.nan, 0.0]]), "NaN"),
        (np.array([[0.0, 1.0], [INF, 0.0]]), "symmetric"),
    ],
)
def test_bad_input(bad, message):
    for f in [h0_barcode, group_barcode, merge_tree, ntc_components, ntc_faithful, *CLUSTERERS.values()]:
        with pytest.raises(ValueError, match=message):
            f(bad)


def test_bad_parameters():
    with pytest.raises(ValueError, match="min_size"):
        ntc_components(TWO, min_size=1)
    with pytest.raises(ValueError, match="persistence_quantile"):
        ntc_components(TWO, persistence_quantile=1.5)
