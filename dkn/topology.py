"""Clustering knowledge neurons from a distance matrix: pure math, no model.

This module owns everything between "a distance matrix over n knowledge
neurons" and "groups of neurons" (candidate Base Degenerate Components):

- the 0-dimensional persistent homology of the single-linkage (Vietoris-Rips)
  filtration: `h0_barcode` (every point born at 0, the textbook diagram),
  `group_barcode` (the paper's view: a group of neurons is born at its first
  edge), and the merge history `merge_tree` / `clusters_at`;
- Neurological Topology Clustering: `ntc_components` (the principled form) and
  `ntc_faithful` (the authors' script, defect included, for comparison);
- the paper's baseline clusterers `hierarchical`, `dbscan`, `kmeans`;
- the registry `CLUSTERERS` of all of them by name ("amig" lives elsewhere: it
  needs the model).

Input everywhere: `dist`, a symmetric float array [n, n] of non-negative
distances, `np.inf` for unconnected pairs (e.g. same-layer neurons). The
diagonal is ignored (read as 0). Neurons are referred to by row index.

Ties between equal distances are broken by the pair's (row, column) order, so
every result is deterministic.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "Bar",
    "Merge",
    "Component",
    "CLUSTERERS",
    "check_distances",
    "h0_barcode",
    "group_barcode",
    "merge_tree",
    "clusters_at",
    "ntc_threshold",
    "ntc_components",
    "ntc_faithful",
    "hierarchical",
    "dbscan",
    "dbscan_eps",
    "kmeans",
]

Members = tuple[int, ...]


# ---------------------------------------------------------------- results
@dataclass(frozen=True)
class Bar:
    """One bar of an H0 barcode: a component alive on [birth, death)."""

    birth: float
    death: float  # np.inf for a component that never merges
    members: Members  # the component that dies at `death` (all of it for survivors)


@dataclass(frozen=True)
class Merge:
    """One step of the single-linkage dendrogram: `left` and `right` join at `height`."""

    height: float
    left: Members  # the side holding the smaller neuron index
    right: Members

    @property
    def members(self) -> Members:
        return tuple(sorted(self.left + self.right))


@dataclass(frozen=True)
class Component:
    """A group of knowledge neurons found by NTC (a candidate BDC)."""

    members: Members
    birth: float  # its first internal edge
    death: float  # the distance at which it merges into something else; inf if never
    persistence: float = field(init=False)  # death - birth

    def __post_init__(self) -> None:
        object.__setattr__(self, "persistence", self.death - self.birth)

    @property
    def size(self) -> int:
        return len(self.members)


# ---------------------------------------------------------------- input
def check_distances(dist: np.ndarray) -> np.ndarray:
    """Return `dist` as a float [n, n] array with a zero diagonal, or raise ValueError."""
    d = np.array(dist, dtype=float)  # copy: callers' arrays are never modified
    if d.size == 0:
        d = d.reshape(0, 0)  # [] and np.zeros((0, 0)) both mean "no neurons"
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"dist must be a square [n, n] matrix, got shape {d.shape}")
    if np.isnan(d).any():
        raise ValueError("dist contains NaN: use np.inf for unconnected pairs")
    if (d < 0).any():
        raise ValueError("dist contains negative values: distances must be >= 0")
    np.fill_diagonal(d, 0.0)
    if not np.allclose(d, d.T, rtol=1e-9, atol=1e-12):
        raise ValueError("dist is not symmetric: dist[i, j] must equal dist[j, i]")
    return np.minimum(d, d.T)  # exactly symmetric


def _sorted_finite_edges(d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Finite pairs i < j, ascending by distance, ties by (i, j): (i [m], j [m], w [m])."""
    i, j = np.triu_indices(d.shape[0], k=1)  # row-major, so a stable sort keeps (i, j) order
    w = d[i, j]
    keep = np.isfinite(w)
    i, j, w = i[keep], j[keep], w[keep]
    order = np.argsort(w, kind="stable")
    return i[order], j[order], w[order]


def _finite_offdiag(d: np.ndarray) -> np.ndarray:
    """Finite distances of the pairs i < j: [m]."""
    w = d[np.triu_indices(d.shape[0], k=1)]
    return w[np.isfinite(w)]


# ---------------------------------------------------------------- merge history
class _Forest:
    """Union-find that also keeps each component's sorted member list."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))
        self.members: dict[int, list[int]] = {x: [x] for x in range(n)}

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, ra: int, rb: int) -> None:
        if len(self.members[ra]) < len(self.members[rb]):
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.members[ra] = sorted(self.members[ra] + self.members.pop(rb))


def _history(d: np.ndarray) -> tuple[list[tuple[float, Members, Members]], list[Members]]:
    """Kruskal on the finite edges: the merges (height, a, b) with min(a) < min(b),
    ascending, and the final connected components (sorted by first member)."""
    forest = _Forest(d.shape[0])
    merges = []
    for u, v, h in zip(*_sorted_finite_edges(d)):
        ra, rb = forest.find(int(u)), forest.find(int(v))
        if ra == rb:
            continue
        a, b = tuple(forest.members[ra]), tuple(forest.members[rb])
        merges.append((float(h), *sorted((a, b))))
        forest.union(ra, rb)
    finals = sorted(tuple(m) for m in forest.members.values())
    return merges, finals


def merge_tree(dist: np.ndarray) -> list[Merge]:
    """The single-linkage dendrogram: every merge, ascending by height.

    n - c merges for c connected components of the finite graph; pairs at
    distance inf never merge.
    """
    merges, _ = _history(check_distances(dist))
    return [Merge(h, a, b) for h, a, b in merges]


def clusters_at(dist: np.ndarray, height: float, *, min_size: int = 1) -> list[Members]:
    """Single-linkage clusters at a cut: components of the graph of edges <= height."""
    d = check_distances(dist)
    forest = _Forest(d.shape[0])
    for h, a, b in _history(d)[0]:
        if h > height:
            break
        forest.union(forest.find(a[0]), forest.find(b[0]))
    return sorted(tuple(m) for m in forest.members.values() if len(m) >= min_size)


# ---------------------------------------------------------------- barcodes
def h0_barcode(dist: np.ndarray) -> list[Bar]:
    """The H0 barcode of the Vietoris-Rips filtration, every point born at 0.

    At each merge the elder rule kills one side: with equal births, the smaller
    component dies (equal sizes: the one without the smaller neuron index);
    its bar carries its members. Each connected component of the finite graph
    survives as a bar [0, inf) holding all its members. Finite deaths are the
    single-linkage merge heights. Ordered by death, survivors last.
    """
    merges, finals = _history(check_distances(dist))
    bars = [Bar(0.0, h, a if len(a) < len(b) else b) for h, a, b in merges]
    return bars + [Bar(0.0, np.inf, comp) for comp in finals]


def _younger(a: Members, b: Members, births: dict[int, float]) -> Members:
    """Elder rule for groups: the later-born dies; then the smaller; then b."""
    ka, kb = (births[a[0]], -len(a)), (births[b[0]], -len(b))
    return a if ka > kb else b


def group_barcode(dist: np.ndarray) -> list[Bar]:
    """The paper's view of H0: a group of neurons is born at its first edge.

    Single neurons are not groups: two of them joining give birth to a group; a
    neuron joining a group is absorbed. When two groups meet, the younger
    (elder rule, see `_younger`) dies there with its members. Groups that never
    meet another one survive: [birth, inf). Ordered by death, survivors last.
    """
    merges, finals = _history(check_distances(dist))
    births: dict[int, float] = {}  # first member -> birth of its group
    bars = []
    for h, a, b in merges:
        if a[0] in births and b[0] in births:
            y = _younger(a, b, births)
            bars.append(Bar(births[y[0]], h, y))
        _join_births(births, a, b, h)
    return bars + [Bar(births[c[0]], np.inf, c) for c in finals if c[0] in births]


def _join_births(births: dict[int, float], a: Members, b: Members, h: float) -> None:
    """Birth of a merged group (keyed by its first member, which is a[0])."""
    old = [births.pop(k) for k in (a[0], b[0]) if k in births]
    births[a[0]] = min(old) if old else h


# ---------------------------------------------------------------- NTC
def ntc_threshold(dist: np.ndarray, persistence_quantile: float = 0.5) -> float:
    """Default persistence threshold: a quantile of the finite merge heights
    (the median by default, i.e. the median bar of `h0_barcode`); 0 if none."""
    return _quantile_threshold(_history(check_distances(dist))[0], persistence_quantile)


def _quantile_threshold(merges: list[tuple[float, Members, Members]], q: float) -> float:
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"persistence_quantile must be in [0, 1], got {q}")
    heights = [h for h, _, _ in merges]
    return float(np.quantile(heights, q)) if heights else 0.0


def ntc_components(
    dist: np.ndarray,
    *,
    min_size: int = 2,
    persistence_quantile: float = 0.5,
    threshold: float | None = None,
) -> list[Component]:
    """Long-lived groups of the single-linkage filtration (persistence-based
    clustering, the ToMATo rule of Chazal, Guibas, Oudot & Skraba 2013, with
    the paper's births: a group is born at its first edge).

    Rule. Walk the merges upwards (Kruskal order). A group is born when two
    single neurons join. When two groups meet at height h, the meeting is
    *significant* if both have >= `min_size` members and both have lived longer
    than the threshold tau: h - birth > tau for each (the elder rule makes this
    the younger group's persistence). Then neither is merged away: each side
    that has not already been emitted becomes a Component(members at h, birth,
    death=h). Any other meeting just merges (a short-lived group or a neuron is
    absorbed by the group it joins), and what joins an already-emitted group
    later is left out (noise). A group that never has a significant meeting
    (its connected component's top, death inf) is emitted whole if it has
    >= `min_size` members: pairs at inf never merge, so such groups are
    long-lived by definition.

    tau = `threshold` if given, else the `persistence_quantile` quantile of the
    finite merge heights (default the median, after the paper's median rule).

    Every Component is a node of the single-linkage tree, they are disjoint,
    and each has persistence > tau. Sorted by persistence, descending (ties:
    by members).

    Why this rule: with birth = first internal edge, a parent cluster is
    always at least as persistent as its children, so "the most persistent
    maximal clusters" would always be whole connected components. ToMATo keeps
    the paper's notions (birth at the first edge, death at the merge, one
    threshold on persistence, read off the barcode), is non-overlapping by
    construction, scale-free (unlike one global cut at the largest gap) and
    needs no density (unlike HDBSCAN's excess of mass, in 1/distance units).
    """
    if min_size < 2:
        raise ValueError(f"min_size must be >= 2 (a single neuron has no first edge), got {min_size}")
    merges, finals = _history(check_distances(dist))
    tau = _quantile_threshold(merges, persistence_quantile) if threshold is None else float(threshold)
    births: dict[int, float] = {}  # first member -> birth of its group
    emitted: set[int] = set()  # first members of groups that hold emitted components
    out: list[Component] = []
    for h, a, b in merges:
        if _significant(a, b, h, births, tau, min_size):
            out += [Component(m, births[m[0]], h) for m in (a, b) if m[0] not in emitted]
            emitted.add(a[0])
        elif b[0] in emitted:
            emitted.add(a[0])
        emitted.discard(b[0])
        _join_births(births, a, b, h)
    out += [
        Component(c, births[c[0]], np.inf)
        for c in finals
        if len(c) >= min_size and c[0] in births and c[0] not in emitted
    ]
    return sorted(out, key=lambda c: (-c.persistence, c.members))


def _significant(a: Members, b: Members, h: float, births: dict[int, float], tau: float, min_size: int) -> bool:
    """Do groups a and b both have >= min_size members and persistence > tau at h?"""
    return all(len(m) >= min_size and m[0] in births and h - births[m[0]] > tau for m in (a, b))


def ntc_faithful(dist: np.ndarray, *, edge_fraction: float = 0.2, min_size: int = 2) -> list[Component]:
    """The authors' NTC script, DEFECT INCLUDED, for comparison only.

    A hand-written union-find over the lowest `edge_fraction` of the finite
    distances (pairs i < j sorted ascending; the first int(fraction * m) of the
    m edges are kept); a component is born at its first edge. The defect
    (reference section 7): every component's death is the largest kept edge of
    the whole graph, not the height at which it merges, so "persistence" only
    measures how early a component started. Components of size >= `min_size`
    whose persistence exceeds the median birth time (over all components with
    an edge) are kept. Sorted by persistence, descending.
    """
    d = check_distances(dist)
    i, j, w = _sorted_finite_edges(d)
    k = int(edge_fraction * len(w))
    if k == 0:
        return []
    death = float(w[k - 1])  # the defect: one death time shared by all components
    parent = list(range(d.shape[0]))
    birth: dict[int, float] = {}
    for u, v, h in zip(i[:k], j[:k], w[:k]):
        ru, rv = _uf_find(parent, int(u)), _uf_find(parent, int(v))
        if ru != rv:
            parent[rv] = ru
            old = [birth.pop(r) for r in (ru, rv) if r in birth]
            birth[ru] = min(old) if old else float(h)
    groups: dict[int, list[int]] = {}
    for x in range(d.shape[0]):
        groups.setdefault(_uf_find(parent, x), []).append(x)
    median_birth = float(np.median(list(birth.values())))
    out = [
        Component(tuple(m), birth[r], death)
        for r, m in groups.items()
        if r in birth and len(m) >= min_size and death - birth[r] > median_birth
    ]
    return sorted(out, key=lambda c: (-c.persistence, c.members))


def _uf_find(parent: list[int], x: int) -> int:
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


# ---------------------------------------------------------------- baselines
def _labels_to_clusters(labels: np.ndarray, min_size: int = 2) -> list[Members]:
    """Group indices by label; drop noise (-1) and groups smaller than min_size."""
    groups: dict[int, list[int]] = {}
    for x, lab in enumerate(labels.tolist()):
        if lab != -1:
            groups.setdefault(lab, []).append(x)
    return sorted(tuple(g) for g in groups.values() if len(g) >= min_size)


def hierarchical(dist: np.ndarray, *, quantile: float = 0.7) -> list[Members]:
    """Average-linkage clustering cut at the `quantile` of the finite distances.

    inf is replaced by n^2 * (max finite) + 1, large enough that two clusters
    with any unconnected pair between them average above every possible cut,
    as a true inf would.
    """
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    d = check_distances(dist)
    finite = _finite_offdiag(d)
    if d.shape[0] < 2 or finite.size == 0:
        return []
    n = d.shape[0]
    filled = np.where(np.isfinite(d), d, n * n * finite.max() + 1.0)  # [n, n]
    z = linkage(squareform(filled, checks=False), method="average")  # [n-1, 4]
    cut = float(np.quantile(finite, quantile))
    return _labels_to_clusters(fcluster(z, t=cut, criterion="distance"))


def dbscan_eps(dist: np.ndarray) -> float | None:
    """Median over rows of each row's smallest nonzero finite distance (None if no row has one)."""
    d = check_distances(dist)
    masked = np.where(np.isfinite(d) & (d > 0), d, np.inf)  # [n, n]
    nearest = masked.min(axis=1) if d.size else np.array([])  # [n]
    nearest = nearest[np.isfinite(nearest)]
    return float(np.median(nearest)) if nearest.size else None


def dbscan(dist: np.ndarray, *, eps: float | None = None, min_samples: int | None = None) -> list[Members]:
    """DBSCAN on the precomputed distances.

    eps defaults to `dbscan_eps` (median nearest nonzero distance),
    min_samples to max(2, round(0.03 n)). inf is replaced by a value above eps.
    """
    from sklearn.cluster import DBSCAN

    d = check_distances(dist)
    n = d.shape[0]
    eps = dbscan_eps(d) if eps is None else float(eps)
    if n < 2 or eps is None:
        return []
    min_samples = max(2, round(0.03 * n)) if min_samples is None else int(min_samples)
    finite_max = _finite_offdiag(d).max()
    filled = np.where(np.isfinite(d), d, 2.0 * max(finite_max, eps) + 1.0)  # [n, n]
    labels = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(filled)
    return _labels_to_clusters(labels)


def kmeans(
    dist: np.ndarray, seed: int = 0, *, k: int | None = None, n_components: int | None = None, inf_scale: float = 10.0
) -> list[Members]:
    """k-means on the PCA of the distance rows.

    inf becomes `inf_scale` x the largest finite distance; k defaults to
    max(2, round(0.1 n)) (capped at n), n_components to min(n, 10). A matrix
    with no finite pair has no structure to cluster: [].
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    d = check_distances(dist)
    n = d.shape[0]
    finite = _finite_offdiag(d)
    if n < 2 or finite.size == 0:
        return []
    k = min(n, max(2, round(0.1 * n)) if k is None else int(k))
    n_components = min(n, 10) if n_components is None else min(n, int(n_components))
    rows = np.where(np.isfinite(d), d, inf_scale * max(finite.max(), 1e-12))  # [n, n]
    coords = PCA(n_components=n_components, random_state=seed).fit_transform(rows)  # [n, n_components]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer distinct rows than k: ConvergenceWarning
        labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(coords)
    return _labels_to_clusters(labels)


# ---------------------------------------------------------------- registry
def _ntc_members(dist: np.ndarray) -> list[Members]:
    return [c.members for c in ntc_components(dist)]


def _ntc_faithful_members(dist: np.ndarray) -> list[Members]:
    return [c.members for c in ntc_faithful(dist)]


CLUSTERERS: dict[str, Callable[[np.ndarray], list[Members]]] = {
    "ntc": _ntc_members,
    "ntc_faithful": _ntc_faithful_members,
    "hierarchical": hierarchical,
    "dbscan": dbscan,
    "kmeans": kmeans,
}
