"""The search space: decisions from a sensitivity table, additive metrics that match the validated plan."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from bitplan.errors import BitplanError, DataError
from bitplan.formats import parse_weight
from bitplan.graph import ModelGraph, build_graph
from bitplan.search import SearchSpace
from bitplan.sensitivity import SensitivityTable

from ._synth import synth_table


@pytest.fixture(scope="module")
def graph(make_random_lm: Any) -> ModelGraph:
    return build_graph(make_random_lm("llama", num_hidden_layers=4))


def _random_choices(space: SearchSpace, n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(rng.integers(len(d.options))) for d in space.decisions] for _ in range(n)]


def test_decisions_and_options(graph: ModelGraph) -> None:
    space = SearchSpace.from_table(synth_table(graph), graph)
    kinds = [d.kind for d in space.decisions]
    assert kinds.count("weight") == len(graph.units("fused")) and kinds.count("act") == kinds.count("kv") == 4
    down = next(d for d in space.decisions if d.name == "layers.2.mlp.down_proj")
    assert down.labels == [
        "bf16",
        "w8g64a",
        "w4g64a",
        "w3g64a@hqq",
        "w2g64a",
    ]  # reference first, then fewer bits
    assert [d.options[0].label for d in space.decisions if d.kind != "weight"] == ["a16"] * 4 + ["k16v16"] * 4
    assert (
        space.labels(space.index({"layers.2.mlp.down_proj": "w4g64a"}))["layers.2.mlp.down_proj"] == "w4g64a"
    )
    with pytest.raises(BitplanError, match="'w5g64a' is not an option"):
        space.index({"layers.2.mlp.down_proj": "w5g64a"})
    assert "10^" in space.describe()


@pytest.mark.parametrize("batch, context", [(1, 2048), (3, 100)])
def test_metrics_match_the_validated_plan(graph: ModelGraph, batch: int, context: int) -> None:
    space = SearchSpace.from_table(synth_table(graph), graph, batch=batch, context=context)
    for idx in _random_choices(space, 12, seed=batch):
        m, plan = space.metrics(idx), space.to_plan(idx)
        summary = plan.summary()
        assert m.avg_weight_bits == pytest.approx(summary.avg_weight_bits, rel=1e-12)
        assert m.weight_bytes == summary.weight_bytes
        assert m.kv_bytes == pytest.approx(summary.kv_bytes_per_token * batch * context, rel=1e-12)
        assert m.avg_kv_bits == pytest.approx(
            np.mean([(lp.kv.k_bits + lp.kv.v_bits) / 2 for lp in plan.layers])
        )
    ref = space.metrics([0] * len(space.decisions))
    assert ref.quality == 0 and ref.avg_weight_bits == 16 and ref.avg_kv_bits == 16


def test_uniform_choices(graph: ModelGraph) -> None:
    space = SearchSpace.from_table(synth_table(graph), graph)
    idx = space.uniform(weight="w3g64a@hqq", act="a8t", kv="k4v2")
    assert idx is not None
    plan = space.to_plan(idx)
    assert {str(c.format) for _, c in plan.unit_choices()} == {"w3g64a"}
    assert {c.method for _, c in plan.unit_choices()} == {"hqq"}
    assert {str(lp.acts) for lp in plan.layers} == {"a8t"} and {str(lp.kv) for lp in plan.layers} == {"k4v2"}
    assert space.uniform(weight="w3g64a") is None  # scored with hqq only
    assert space.uniform() == [0] * len(space.decisions)


def test_label_filters(graph: ModelGraph) -> None:
    space = SearchSpace.from_table(synth_table(graph), graph, weights=["w4g64a"], acts=["a8t"], kv=["k4v4"])
    assert {tuple(d.labels) for d in space.decisions} == {
        ("bf16", "w4g64a"),
        ("a16", "a8t"),
        ("k16v16", "k4v4"),
    }
    with pytest.raises(BitplanError, match="no scores for weight option"):
        SearchSpace.from_table(synth_table(graph), graph, weights=["w5g64a"])
    only_kv = SearchSpace.from_table(synth_table(graph), graph, kinds=("kv",))
    assert {d.kind for d in only_kv.decisions} == {"kv"}


def test_weight_filter_is_fitted_per_unit_like_the_profiler(graph: ModelGraph) -> None:
    """``w3g128a@hqq`` is scored as w3g64a@hqq on the 64-wide units: the filter must keep those rows too."""
    table = synth_table(graph, weights=("w4g64a", "w3g128a@hqq"))
    space = SearchSpace.from_table(table, graph, kinds=("weight",), weights=["w3g128a@hqq"])
    widths = {u.name: u.in_features for u in graph.units("fused")}
    assert set(widths.values()) == {64, 128}
    assert sorted(d.name for d in space.decisions) == sorted(widths)
    for d in space.decisions:
        want = "w3g128a@hqq" if widths[d.name] == 128 else "w3g64a@hqq"
        assert list(d.labels) == ["bf16", want], d.name


def test_tie_clusters_share_one_kv_decision(graph: ModelGraph) -> None:
    kept = {str(i): ["k4v4", "k2v2"] for i in range(4)}
    extra = {
        "kv_reduction": {"kept": kept, "clusters": [[0, 1, 2], [3]], "pairs_before": 20, "pairs_after": 8}
    }
    table = synth_table(graph, extra=extra)
    untied = SearchSpace.from_table(table, graph)
    tied = SearchSpace.from_table(table, graph, tie_clusters=True)
    kv_untied = [d for d in untied.decisions if d.kind == "kv"]
    kv_tied = [d for d in tied.decisions if d.kind == "kv"]
    assert len(kv_untied) == 4 and [d.name for d in kv_tied] == ["layers.0-2.kv", "layers.3.kv"]
    assert kv_untied[0].labels == ["k16v16", "k4v4", "k2v2"]  # pruned to the kept pairs
    cluster = kv_tied[0]
    assert cluster.layers == (0, 1, 2)
    j = cluster.labels.index("k2v2")
    per_layer = [d.options[d.labels.index("k2v2")] for d in kv_untied[:3]]
    assert cluster.options[j].score == pytest.approx(sum(o.score for o in per_layer))
    assert cluster.options[j].kv_bytes_per_token == pytest.approx(
        sum(o.kv_bytes_per_token for o in per_layer)
    )
    plan = tied.to_plan({"layers.0-2.kv": "k2v2", "layers.3.kv": "k4v4"})
    assert [str(lp.kv) for lp in plan.layers] == ["k2v2", "k2v2", "k2v2", "k4v4"]
    idx = tied.index({"layers.0-2.kv": "k2v2", "layers.3.kv": "k4v4"})
    assert tied.metrics(idx).kv_bytes == pytest.approx(plan.summary().kv_bytes_per_token * tied.context)
    assert tied.metrics(idx).avg_kv_bits == pytest.approx((3 * 2 + 4) / 4)
    with pytest.raises(BitplanError, match="--tie-clusters"):
        SearchSpace.from_table(synth_table(graph), graph, tie_clusters=True)


def test_table_of_another_model_is_refused(graph: ModelGraph, make_random_lm: Any) -> None:
    other = build_graph(make_random_lm("llama", num_hidden_layers=3))
    with pytest.raises(DataError, match="another model") as e:
        SearchSpace.from_table(synth_table(other), graph)
    assert "\n" not in str(e.value)


def test_bad_batch_or_context(graph: ModelGraph) -> None:
    with pytest.raises(BitplanError, match="--batch and --context"):
        SearchSpace.from_table(synth_table(graph), graph, context=0)


def test_the_head_is_its_own_decision_in_memory_and_latency_not_in_avg_bits(make_random_lm: Callable[..., Any]) -> None:
    from bitplan.search._cost import BytesCostModel
    from bitplan.sensitivity import ScoreRow

    for arch in ("llama", "gpt2"):  # untied, tied
        model = make_random_lm(arch)
        graph = build_graph(model)
        head = graph.lm_head
        base = synth_table(graph)
        rows = [*base.rows, ScoreRow("lm_head", -1, "weight", "w4g64a", "rtn", "kl", 0.002, params=head.numel)]
        table = SensitivityTable(rows, base.meta)
        space = SearchSpace.from_table(table, graph, kinds=("weight", "head"))
        d = next(d for d in space.decisions if d.kind == "head")
        assert d.name == "lm_head" and d.labels == ["bf16", "w4g64a"] and d.options[1].score == 0.002
        assert "head" not in {x.kind for x in SearchSpace.from_table(table, graph, kinds=("weight",)).decisions}
        off = space.index({})
        on = space.index({"lm_head": "w4g64a"})
        packed = parse_weight("w4g64a").storage_bits(head.out_features, head.in_features)
        copies = 2 if graph.tied_embeddings else 1
        m_off, m_on = space.metrics(off), space.metrics(on)
        assert m_on.avg_weight_bits == m_off.avg_weight_bits == 16.0  # decoder units only
        assert m_off.weight_bytes - m_on.weight_bytes == pytest.approx(2 * head.numel - copies * packed / 8, abs=1)
        plan = space.to_plan(on)
        assert plan.extra["lm_head"].format == parse_weight("w4g64a")
        assert plan.summary().weight_bytes == pytest.approx(m_on.weight_bytes, abs=2)  # the plan agrees
        assert space.metrics(space.index(plan_labels(space, plan))) == m_on
        lat = BytesCostModel(bandwidth_gbs=1.0).latency(space)
        read = packed / 8 * 1e3 / 1e9  # one copy read per step, tied or not
        assert lat.total(off) - lat.total(on) == pytest.approx(2 * head.numel * 1e3 / 1e9 - read, rel=1e-9)


def plan_labels(space: SearchSpace, plan: Any) -> dict[str, str]:
    """{decision: label} of a plan made by the space (weights and head only)."""
    choices = dict(plan.unit_choices())
    return {d.name: str(choices[d.units[0]].format) for d in space.decisions if d.kind in ("weight", "head") and d.units[0] in choices}
