"""KV search-space reduction on synthetic rows: Pareto pruning, layer clustering, K-vs-V sensitivity."""

from __future__ import annotations

import json
import math
import random

import pytest

from bitplan.formats import parse_kv
from bitplan.sensitivity._kvreduce import KVReduction, cluster_layers, k_vs_v, prune_dominated, reduce_kv
from bitplan.sensitivity._rows import ScoreRow

HEADS, HEAD_DIM = 2, 64  # k4v2 and k2v4 cost the same here (128 B/token), k2v2 96 B, k16v16 512 B


def kv_row(layer: int, fmt: str, score: float, method: str = "kl") -> ScoreRow:
    return ScoreRow(f"layers.{layer}.kv", layer, "kv", fmt, "", method, score)


def cost(fmt: str) -> float:
    return parse_kv(fmt).bytes_per_token(HEADS, HEAD_DIM)


def test_cost_premises() -> None:
    assert cost("k4v2") == cost("k2v4") < cost("k4v4") < cost("k8v8") < cost("k16v16")


def test_prune_drops_dominated_pairs() -> None:
    rows = [
        kv_row(0, "k2v2", 1.0),  # cheapest: kept whatever its error
        kv_row(0, "k4v2", 0.05),
        kv_row(0, "k2v4", 0.2),  # same bytes as k4v2, more error -> dropped
        kv_row(0, "k4v4", 0.01),
        kv_row(0, "k8v8", 0.02),  # more bytes and more error than k4v4 -> dropped
        kv_row(0, "k8v4", 0.01),  # same error as k4v4, more bytes -> dropped
        kv_row(0, "k16v8", 0.001),  # dearer but better: kept
        ScoreRow("layers.0.mlp.down_proj", 0, "weight", "w2g64a", "rtn", "kl", 1e-9),  # not KV: ignored
    ]
    kept = prune_dominated(rows, num_kv_heads=HEADS, head_dim=HEAD_DIM)
    assert kept == {0: ["k2v2", "k4v2", "k4v4", "k16v8"]}  # cheapest first
    assert [cost(f) for f in kept[0]] == sorted(cost(f) for f in kept[0])


def test_prune_ties_keep_both() -> None:
    rows = [kv_row(1, "k4v2", 0.1), kv_row(1, "k2v4", 0.1)]  # same bytes, same error: neither is better
    assert prune_dominated(rows, num_kv_heads=HEADS, head_dim=HEAD_DIM) == {1: ["k2v4", "k4v2"]}


def test_prune_16bit_reference() -> None:
    # k16v16 (score 0, most bytes) is an option but is never listed; a zero-error pair that is cheaper
    # than it is kept (it dominates the reference, not the other way round), and so is a dearer zero-error
    # pair only if nothing cheaper is as good.
    rows = [kv_row(0, "k8v8", 0.0), kv_row(0, "k16v8", 0.0), kv_row(0, "k16v16", 0.0), kv_row(0, "k2v2", 0.3)]
    assert prune_dominated(rows, num_kv_heads=HEADS, head_dim=HEAD_DIM) == {0: ["k2v2", "k8v8"]}
    # a quantized pair never costs more than 16 bits, so the reference drops nothing by itself
    rows = [kv_row(0, "k16v8", 5.0)]
    assert prune_dominated(rows, num_kv_heads=HEADS, head_dim=HEAD_DIM) == {0: ["k16v8"]}


def test_prune_per_layer_and_method() -> None:
    rows = [
        kv_row(0, "k2v2", 0.5), kv_row(0, "k4v4", 0.6),  # layer 0: k4v4 dominated
        kv_row(1, "k2v2", 0.5), kv_row(1, "k4v4", 0.1),  # layer 1: both kept
        kv_row(0, "k4v4", 0.01, method="fisher"),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="several scoring methods"):
        prune_dominated(rows, num_kv_heads=HEADS, head_dim=HEAD_DIM)
    kept = prune_dominated(rows, num_kv_heads=HEADS, head_dim=HEAD_DIM, method="kl")
    assert kept == {0: ["k2v2"], 1: ["k2v2", "k4v4"]}
    assert prune_dominated(rows, num_kv_heads=HEADS, head_dim=HEAD_DIM, method="fisher") == {0: ["k4v4"]}
    with pytest.raises(ValueError, match="not finite"):
        prune_dominated([kv_row(0, "k2v2", math.nan)], num_kv_heads=HEADS, head_dim=HEAD_DIM)


PAIRS = ("k2v2", "k2v4", "k4v2", "k4v4", "k8v8", "k2v16", "k16v2", "k4v16", "k16v4")
SHAPE_A = (1.0, 0.4, 0.3, 0.05, 0.002, 0.6, 0.2, 0.03, 0.01)  # K-heavy
SHAPE_B = (1.0, 0.9, 0.1, 0.08, 0.001, 0.05, 0.9, 0.001, 0.05)  # V-heavy


def two_cluster_rows(seed: int = 0) -> list[ScoreRow]:
    rng = random.Random(seed)
    rows = []
    for layer in range(6):
        shape, scale = (SHAPE_B, 50.0) if layer in (3, 4) else (SHAPE_A, 1.0)
        for f, s in zip(PAIRS, shape, strict=True):
            rows.append(kv_row(layer, f, 1e-3 * scale * s * math.exp(rng.gauss(0, 0.1))))  # ~10% noise
    return rows


def test_cluster_two_groups_deterministic() -> None:
    rows = two_cluster_rows()
    clusters = cluster_layers(rows)
    assert clusters == [[0, 1, 2, 5], [3, 4]]
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    assert cluster_layers(shuffled) == clusters
    assert cluster_layers([replace_score(r, 1e4) for r in rows]) == clusters  # invariant to a common scale
    assert cluster_layers(rows, threshold=100.0) == [[0, 1, 2, 3, 4, 5]]
    assert cluster_layers(rows, threshold=0.0) == [[i] for i in range(6)]
    assert cluster_layers(rows, max_clusters=2) == clusters


def replace_score(r: ScoreRow, factor: float) -> ScoreRow:
    return ScoreRow(r.unit, r.layer, r.kind, r.format, r.quantizer, r.method, r.score * factor)


def test_cluster_edge_cases() -> None:
    assert cluster_layers([]) == []
    assert cluster_layers([kv_row(7, "k2v2", 0.1)]) == [[7]]
    with pytest.raises(ValueError, match="in common"):
        cluster_layers([kv_row(0, "k2v2", 0.1), kv_row(1, "k4v4", 0.1)])
    # only the common pairs count: an extra pair in one layer does not split it off
    rows = [kv_row(0, "k2v2", 0.1), kv_row(1, "k2v2", 0.1), kv_row(1, "k8v8", 1e-9)]
    assert cluster_layers(rows) == [[0, 1]]


def test_reduce_kv_round_trip_and_summary() -> None:
    rows = two_cluster_rows() + [kv_row(0, "k2v2", 123.0, method="fisher")]
    red = reduce_kv(rows, HEADS, HEAD_DIM)
    assert red.pairs_before == 6 * len(PAIRS)
    assert red.pairs_after == sum(len(v) for v in red.kept.values()) < red.pairs_before
    assert red.clusters == [[0, 1, 2, 5], [3, 4]]
    assert red.kept == prune_dominated(rows, num_kv_heads=HEADS, head_dim=HEAD_DIM, method="kl")
    back = KVReduction.from_dict(json.loads(json.dumps(red.to_dict())))
    assert back == red
    text = red.summary()
    assert f"of {len(PAIRS)} pairs per layer" in text
    assert "6 layers in 2 clusters: 0-2+5, 3-4" in text
    assert reduce_kv(rows, HEADS, HEAD_DIM, method="fisher").kept == {0: ["k2v2"]}
    assert "nothing" in reduce_kv([], HEADS, HEAD_DIM).summary()


def test_k_vs_v() -> None:
    rows = [
        kv_row(0, "k2v16", 0.1), kv_row(0, "k16v2", 0.01), kv_row(0, "k4v16", 0.02), kv_row(0, "k16v4", 0.001),
        kv_row(1, "k2v16", 0.01), kv_row(1, "k16v2", 0.1), kv_row(1, "k4v16", 0.02), kv_row(1, "k16v4", 0.001),
        kv_row(2, "k2v16", 0.01), kv_row(2, "k4v4", 0.1),  # no V-only mirror: layer left out
        kv_row(3, "k4v16", 0.2), kv_row(3, "k16v4", 0.0),
        kv_row(4, "k4v16", 0.0), kv_row(4, "k16v4", -1e-9),  # noise: neither hurts
    ]  # fmt: skip
    out = k_vs_v(rows)
    assert set(out) == {0, 1, 3, 4}
    assert out[0]["bits"] == 2 and out[0]["ratio"] == pytest.approx(10.0)
    assert out[0]["k_more_sensitive"] and out[0]["k_more_sensitive_all"]
    assert out[0]["by_bits"][4]["ratio"] == pytest.approx(20.0)
    assert not out[1]["k_more_sensitive"] and out[1]["ratio"] == pytest.approx(0.1)
    assert not out[1]["k_more_sensitive_all"]  # K wins at 4 bits, not at 2
    assert out[3]["ratio"] == math.inf and out[3]["k_more_sensitive"]
    assert math.isnan(out[4]["ratio"]) and not out[4]["k_more_sensitive"]
