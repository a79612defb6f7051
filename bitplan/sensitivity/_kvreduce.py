"""Shrink the KV search space from the measured KV rows: prune dominated pairs, cluster similar layers.

KVTuner (Li et al., 2025) makes layer-wise mixed-precision KV search tractable with two reductions that
it tables by hand per model: (1) *intra-layer pruning* -- of all (K bits, V bits) pairs only those on the
layer's memory/error Pareto front are worth choosing; (2) *inter-layer clustering* -- layers that react
alike to KV quantization can share one decision, which shrinks the search from ``pairs ** layers`` to
``pairs ** clusters``. Here both are derived from the sensitivity table instead, so they hold for
any model the profiler has seen, and the search can use them without a per-model table.

Cost is :meth:`KVFormat.bytes_per_token` (exact steady-state bytes, scales and offsets included), error
is the row's score (nats/token of KL when quantizing only that layer's cache). The unquantized
``k16v16`` is always an option (score 0, most bytes); it is implicit and never listed in ``kept``.

A finding of KVTuner is that K is much more sensitive than V (keys feed the softmax, whose output is
exponentially sensitive to logit errors, and per-channel outliers live in K); :func:`k_vs_v` checks
that claim layer by layer on the measured rows.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from bitplan.formats import KVFormat, parse_kv
from bitplan.sensitivity._rows import ScoreRow

__all__ = [
    "DEFAULT_CLUSTER_THRESHOLD",
    "KVReduction",
    "cluster_layers",
    "k_vs_v",
    "kv_scores",
    "prune_dominated",
    "reduce_kv",
]

# Layers are tied when their log10-score profiles differ by less than log10(2) decades (RMS over the
# common pairs, averaged over cluster members): "within a factor of 2". Measured KL from a few thousand
# tokens is noisy by tens of percent, so a tighter threshold splits layers on noise; a looser one ties
# layers whose best pair plainly differs (a factor of 4 in error moves a pair across a bit width).
DEFAULT_CLUSTER_THRESHOLD = math.log10(2.0)
# Floor added before taking logs, relative to the median score of the table (see _profiles).
_EPS_FRACTION = 0.01
_EPS_MIN = 1e-12
_REFERENCE = "k16v16"


def kv_scores(rows: Sequence[ScoreRow], method: str | None = None) -> dict[int, dict[str, float]]:
    """``{layer: {kv format: score}}`` from the rows with kind ``kv`` (duplicates averaged).

    ``method=None`` accepts the table only if its KV rows use one scoring method: mixing measured KL
    with Fisher estimates in one Pareto front or profile would compare unlike numbers.
    """
    kv = [r for r in rows if r.kind == "kv" and (method is None or r.method == method)]
    methods = sorted({r.method for r in kv})
    if method is None and len(methods) > 1:
        raise ValueError(f"KV rows use several scoring methods ({', '.join(methods)}); pass method=")
    acc: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in kv:
        if not math.isfinite(r.score):
            raise ValueError(f"{r.unit} {r.format} ({r.method}): score {r.score} is not finite")
        fmt = parse_kv(r.format)
        if fmt.is_quantized:  # a k16v16 row (score ~0) is the reference, not an option
            acc[r.layer][str(fmt)].append(r.score)
    return {layer: {f: sum(v) / len(v) for f, v in sorted(d.items())} for layer, d in sorted(acc.items())}


def _pareto(scores: Mapping[str, float], num_kv_heads: int, head_dim: int) -> list[str]:
    """The formats of ``scores`` that no other option (``k16v16`` included) dominates, cheapest first."""
    cost = {f: parse_kv(f).bytes_per_token(num_kv_heads, head_dim) for f in scores}
    options = [(cost[f], scores[f]) for f in scores]
    options.append((KVFormat().bytes_per_token(num_kv_heads, head_dim), 0.0))
    kept = []
    for f, s in scores.items():
        c = cost[f]
        dominated = any(oc <= c and os_ <= s and (oc < c or os_ < s) for oc, os_ in options)
        if not dominated:
            kept.append(f)
    return sorted(kept, key=lambda f: (cost[f], scores[f], f))


def prune_dominated(
    rows: Sequence[ScoreRow], *, num_kv_heads: int, head_dim: int, method: str | None = None
) -> dict[int, list[str]]:
    """Per layer, the KV pairs kept after dropping the Pareto-dominated ones, cheapest first.

    A pair is dropped when another pair of the same layer -- or the implicit ``k16v16`` (score 0, the most
    bytes) -- costs no more bytes per token, has no more error, and is strictly better in one of the two.
    Exact ties (same bytes, same score) dominate neither way and are both kept: which one is "the same"
    is the search's business, not a reason to lose an option. A pair with a negative score (possible only
    for noisy estimates) is kept if it is cheaper than everything at least as good.
    """
    return {
        layer: _pareto(scores, num_kv_heads, head_dim) for layer, scores in kv_scores(rows, method).items()
    }


def _profiles(scores: Mapping[int, Mapping[str, float]], eps: float | None) -> tuple[list[int], np.ndarray]:
    """Layers and their profiles: ``log10(score + eps)`` over the pairs every layer has.

    ``eps`` defaults to 1% of the median positive score of the table, so that scores far below the
    typical pair (below measurement noise) compress together instead of spreading over many decades, and
    the clustering is invariant to a common scale of all scores.
    """
    layers = sorted(scores)
    common = sorted(set.intersection(*(set(scores[layer]) for layer in layers)))
    if not common:
        raise ValueError("the layers have no scored KV pair in common; cannot compare their profiles")
    values = np.array([[scores[layer][f] for f in common] for layer in layers], dtype=np.float64)
    if eps is None:
        pos = values[values > 0]
        eps = max(_EPS_MIN, _EPS_FRACTION * float(np.median(pos))) if pos.size else 1.0
    return layers, np.log10(np.clip(values, 0.0, None) + eps)


def cluster_layers(
    rows: Sequence[ScoreRow],
    *,
    method: str | None = None,
    threshold: float = DEFAULT_CLUSTER_THRESHOLD,
    max_clusters: int | None = None,
    eps: float | None = None,
) -> list[list[int]]:
    """Groups of layers with alike KV sensitivity profiles, each sorted, sorted by first layer.

    Profiles are ``log10(score + eps)`` over the KV pairs common to all layers (logs: what matters for a
    choice is the *factor* between layers, and scores span decades). Distance is the RMS difference in
    decades; average-linkage agglomerative clustering (scipy) cuts at ``threshold`` decades (default:
    a factor of 2, see :data:`DEFAULT_CLUSTER_THRESHOLD`) or, with ``max_clusters``, into at most that
    many clusters. The input order is fixed (sorted layers), so the result is deterministic.
    """
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    scores = kv_scores(rows, method)
    if not scores:
        return []
    layers, prof = _profiles(scores, eps)
    if len(layers) == 1:
        return [layers]
    dist = pdist(prof, metric="euclidean") / math.sqrt(prof.shape[1])
    tree = linkage(dist, method="average")
    if max_clusters is not None:
        labels = fcluster(tree, t=max(1, max_clusters), criterion="maxclust")
    else:
        labels = fcluster(tree, t=threshold, criterion="distance")
    groups: dict[int, list[int]] = defaultdict(list)
    for layer, label in zip(layers, labels, strict=True):
        groups[int(label)].append(layer)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: g[0])


def _ranges(indices: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0-2+5"."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return "+".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


@dataclass
class KVReduction:
    """What the KV search may choose from: pairs kept per layer and layers it may tie.

    ``pairs_before`` / ``pairs_after`` are totals over the layers (scored pairs, ``k16v16`` not counted).
    """

    kept: dict[int, list[str]]
    clusters: list[list[int]]
    pairs_before: int
    pairs_after: int
    method: str = "kl"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kept": {str(k): list(v) for k, v in sorted(self.kept.items())},
            "clusters": [list(c) for c in self.clusters],
            "pairs_before": self.pairs_before,
            "pairs_after": self.pairs_after,
            "method": self.method,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KVReduction:
        return cls(
            kept={int(k): [str(f) for f in v] for k, v in data["kept"].items()},
            clusters=[[int(i) for i in c] for c in data["clusters"]],
            pairs_before=int(data["pairs_before"]),
            pairs_after=int(data["pairs_after"]),
            method=str(data.get("method", "kl")),
        )

    def summary(self) -> str:
        n = len(self.kept)
        if n == 0:
            return "no KV rows: nothing to reduce"
        per_before = self.pairs_before / n
        before = f"{per_before:.0f}" if per_before == int(per_before) else f"{per_before:.1f}"
        cl = ", ".join(_ranges(c) for c in self.clusters)
        return (
            f"kept {self.pairs_after / n:.1f} of {before} pairs per layer on average; "
            f"{n} layers in {len(self.clusters)} cluster{'s' if len(self.clusters) != 1 else ''}: {cl}"
        )


def reduce_kv(
    rows: Sequence[ScoreRow],
    num_kv_heads: int,
    head_dim: int,
    method: str = "kl",
    *,
    threshold: float = DEFAULT_CLUSTER_THRESHOLD,
    max_clusters: int | None = None,
) -> KVReduction:
    """Prune and cluster the KV rows of one scoring method (see the module docstring)."""
    scores = kv_scores(rows, method)
    kept = {layer: _pareto(s, num_kv_heads, head_dim) for layer, s in scores.items()}
    clusters = cluster_layers(rows, method=method, threshold=threshold, max_clusters=max_clusters)
    return KVReduction(
        kept=kept,
        clusters=clusters,
        pairs_before=sum(len(s) for s in scores.values()),
        pairs_after=sum(len(k) for k in kept.values()),
        method=method,
    )


def _ratio(k: float, v: float) -> float:
    k, v = max(k, 0.0), max(v, 0.0)  # a measured KL is >= 0; tiny negatives are rounding noise
    if v > 0:
        return k / v
    return math.inf if k > 0 else math.nan


def k_vs_v(rows: Sequence[ScoreRow], method: str | None = None) -> dict[int, dict[str, Any]]:
    """Per layer: is quantizing K alone worse than quantizing V alone to the same bit width?

    Compares ``kXv16`` with ``k16vX`` (same group size, axes and recent window; several layouts at one
    width are summed). Returns, for each layer with at least one such pair::

        {"bits": X (the lowest width compared), "k_score", "v_score", "ratio": k/v at X,
         "k_more_sensitive": ratio > 1 at X,
         "by_bits": {X: {"k_score", "v_score", "ratio"}, ...},   # every width present
         "k_more_sensitive_all": K is worse at every width compared}

    A ratio is ``inf`` when only K hurts and ``nan`` when neither does (then K is not "more sensitive").
    """
    out: dict[int, dict[str, Any]] = {}
    for layer, scores in kv_scores(rows, method).items():
        by_bits: dict[int, list[float]] = {}
        for f, s in scores.items():
            fmt = parse_kv(f)
            if fmt.v_bits != 16 or fmt.k_bits == 16:
                continue
            mirror = str(replace(fmt, k_bits=16, v_bits=fmt.k_bits))
            if mirror in scores:
                acc = by_bits.setdefault(fmt.k_bits, [0.0, 0.0])
                acc[0] += s
                acc[1] += scores[mirror]
        if not by_bits:
            continue
        table = {
            b: {"k_score": k, "v_score": v, "ratio": _ratio(k, v)}
            for b, (k, v) in sorted(by_bits.items())
        }
        low = min(table)
        out[layer] = {
            "bits": low,
            "k_score": table[low]["k_score"],
            "v_score": table[low]["v_score"],
            "ratio": table[low]["ratio"],
            "k_more_sensitive": bool(table[low]["ratio"] > 1),
            "by_bits": table,
            "k_more_sensitive_all": all(bool(t["ratio"] > 1) for t in table.values()),
        }
    return out
