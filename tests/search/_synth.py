"""Synthetic sensitivity tables for a real (random-init) model graph: hand-made rows, no profiling."""

from __future__ import annotations

from typing import Any

import numpy as np

from bitplan.formats import parse_kv, parse_weight
from bitplan.graph import ModelGraph, build_graph
from bitplan.search._space import Decision, Option, SearchSpace
from bitplan.sensitivity import ScoreRow, SensitivityTable, TableMeta
from bitplan.sensitivity._rows import ScoreMethod

WEIGHTS = ("w8g64a", "w4g64a", "w3g64a@hqq", "w2g64a")
ACTS = ("a8t", "a4t")
KVS = ("k8v8", "k4v4", "k4v2", "k2v4", "k2v2")


def synth_table(
    graph: ModelGraph,
    *,
    seed: int = 0,
    method: ScoreMethod = "kl",
    extra: dict[str, Any] | None = None,
    weights: tuple[str, ...] = WEIGHTS,
) -> SensitivityTable:
    """Scores that grow as bits shrink, times a random per-unit sensitivity; ``w8g64a`` scores 0 (a tie
    with bf16: the knapsack must prefer its fewer bytes)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in graph.units("fused"):
        sens = float(rng.lognormal(0.0, 1.0))
        for label in weights:
            fmt, _, quantizer = label.partition("@")
            bits = int(fmt[1])
            score = 0.0 if bits == 8 else sens * 1e-3 * 4.0 ** (8 - bits) * float(rng.lognormal(0.0, 0.2))
            fitted = str(parse_weight(fmt).fit_group(u.in_features))
            rows.append(ScoreRow(u.name, int(u.layer or 0), "weight", fitted, quantizer or "rtn", method, score, params=u.numel))  # fmt: skip
    for i in range(graph.num_layers):
        sens = float(rng.lognormal(0.0, 1.0))
        for label in ACTS:
            rows.append(
                ScoreRow(
                    f"layers.{i}.acts", i, "act", label, "", method, sens * (1e-4 if label == "a8t" else 1e-2)
                )
            )
        for label in KVS:
            k, v = int(label[1]), int(label[3])
            score = sens * 1e-3 * (2.0 ** (8 - k) + 1.5 ** (8 - v))
            rows.append(ScoreRow(f"layers.{i}.kv", i, "kv", label, "", "kl", score))
    meta = TableMeta(
        graph.fingerprint, "random-llama", "c0ffee", "synthetic", 1024, 512, "fused", "float32",
        graph.num_kv_heads, graph.head_dim,
    )  # fmt: skip
    return SensitivityTable(rows, meta).with_extra(**(extra or {}))


def hand_space(model: Any) -> SearchSpace:
    """Every fused unit: bf16 / w4g64a / w2g64a; every layer's KV: k16v16 / k4v4 (made-up scores)."""
    graph = build_graph(model)
    decisions = []
    for u in graph.units("fused"):
        opts = [Option("bf16", 0.0, 16.0 * u.numel, 0.0, 16.0)]
        for j, w in enumerate(("w4g64a", "w2g64a")):
            bits = float(parse_weight(w).storage_bits(u.out_features, u.in_features))
            opts.append(Option(w, 0.01 * (j + 1), bits, 0.0, bits / u.numel))
        decisions.append(
            Decision(u.name, "weight", (int(u.layer or 0),), (u.name,), u.numel, u.in_features, tuple(opts))
        )
    for i in range(graph.num_layers):
        per = [parse_kv(k).bytes_per_token(graph.num_kv_heads, graph.head_dim) for k in ("k16v16", "k4v4")]
        kv_opts = (Option("k16v16", 0.0, 0.0, per[0], 16.0), Option("k4v4", 0.005, 0.0, per[1], 4.0))
        decisions.append(Decision(f"layers.{i}.kv", "kv", (i,), options=kv_opts))
    return SearchSpace(graph, tuple(decisions), "fused", 1, 256, "tiny-llama")
