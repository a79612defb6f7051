"""Plans: uniform construction, JSON round trip, exact summary, and validation against a model."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from bitplan.errors import PlanError
from bitplan.formats import parse_kv, parse_weight
from bitplan.graph import build_graph
from bitplan.plan import SCHEMA_VERSION, Plan, uniform_plan


@pytest.fixture(scope="module")
def llama(make_random_lm: Any) -> Any:
    return make_random_lm("llama")


def test_uniform_plan_covers_every_unit(llama: Any) -> None:
    graph = build_graph(llama)
    plan = uniform_plan(llama, "w4g64a", "a8t", "k8v4")
    assert len(plan.layers) == graph.num_layers
    names = [n for n, _ in plan.unit_choices()]
    assert names == [u.name for u in graph.units("fused")]
    assert {str(c.format) for _, c in plan.unit_choices()} == {"w4g64a"}
    assert all(str(lp.acts) == "a8t" and str(lp.kv) == "k8v4" for lp in plan.layers)
    assert "layers.0.self_attn.qkv_proj" in names and "layers.1.mlp.gate_up_proj" in names

    tensor = uniform_plan(llama, "w4g64a", granularity="tensor")
    assert [n for n, _ in tensor.unit_choices()] == [u.name for u in graph.units("tensor")]
    assert tensor.summary() == uniform_plan(llama, "w4g64a").summary()  # same bits, other split


def test_json_round_trip(llama: Any, tmp_path: Path) -> None:
    plan = uniform_plan(llama, "w3g32a", "a16", "k4v2r16", method="hqq")
    path = tmp_path / "plan.json"
    plan.save(path)
    data = json.loads(path.read_text())
    assert data["schema_version"] == SCHEMA_VERSION and data["kind"] == "bitplan.plan"
    assert data["layers"][0]["weights"]["self_attn.qkv_proj"] == {"format": "w3g32a", "method": "hqq", "shape": [128, 64]}
    assert data["summary"]["avg_weight_bits"] == pytest.approx(3 + 32 / 32)
    loaded = Plan.load(path)
    assert loaded == plan
    assert loaded.validate(build_graph(llama)) == plan


def test_summary_is_exact(llama: Any) -> None:
    graph = build_graph(llama)
    plan = uniform_plan(llama, "w4g64a", kv="k4v2")
    s = plan.summary()
    units = graph.units()
    numel = sum(u.numel for u in units)
    bits = sum(parse_weight("w4g64a").storage_bits(u.out_features, u.in_features) for u in units)
    assert s.unit_params == numel
    assert s.unit_weight_bytes == bits // 8
    assert s.avg_weight_bits == pytest.approx(4.5)
    assert s.weight_bytes == bits // 8 + 2 * (graph.total_params - numel)
    kv = parse_kv("k4v2")
    assert s.kv_bytes_per_token == pytest.approx(graph.num_layers * kv.bytes_per_token(graph.num_kv_heads, graph.head_dim))
    bf16 = uniform_plan(llama, "bf16").summary()
    assert bf16.avg_weight_bits == 16 and bf16.weight_bytes == 2 * graph.total_params


def test_group_refit_is_recorded_and_reported(make_random_lm: Any, caplog: pytest.LogCaptureFixture) -> None:
    model = make_random_lm("llama", hidden_size=96, intermediate_size=128)  # 96-wide inputs: g64 -> g48
    with caplog.at_level(logging.WARNING, logger="bitplan"):
        plan = uniform_plan(model, "w4g64a")
    fmts = {n: str(c.format) for n, c in plan.unit_choices()}
    assert fmts["layers.0.self_attn.qkv_proj"] == "w4g48a"
    assert fmts["layers.0.mlp.down_proj"] == "w4g64a"  # 128 wide: fits as asked
    assert any("w4g48a" in note for note in plan.metadata["notes"])
    assert any("w4g48a" in r.getMessage() for r in caplog.records)


def test_lm_head_can_be_named(llama: Any) -> None:
    graph = build_graph(llama)
    d = uniform_plan(llama, "w8c").to_dict()
    d["extra"] = {"lm_head": "w4g64a"}
    plan = Plan.from_dict(d).validate(graph)
    head = graph.head_unit()
    assert head is not None and plan.shapes["lm_head"] == (head.out_features, head.in_features)
    s = plan.summary()
    assert s.unit_params == sum(u.numel for u in graph.units()) + head.numel


# -- bad plans --------------------------------------------------------------------------------
def _plan_dict(model: Any) -> dict[str, Any]:
    return uniform_plan(model, "w4g64a").to_dict()


def _mutations() -> dict[str, tuple[Any, str]]:
    def schema(d: dict[str, Any]) -> None:
        d["schema_version"] = 99

    def unknown_unit(d: dict[str, Any]) -> None:
        d["layers"][1]["weights"]["mlp.up_and_away"] = "w4g64a"

    def mixed_fused(d: dict[str, Any]) -> None:
        w = d["layers"][0]["weights"]
        del w["self_attn.qkv_proj"]
        w.update({"self_attn.q_proj": "w4g64a", "self_attn.k_proj": "w8c", "self_attn.v_proj": "w4g64a"})

    def bad_format(d: dict[str, Any]) -> None:
        d["layers"][0]["weights"]["mlp.down_proj"]["format"] = "w4g6a"

    def other_model(d: dict[str, Any]) -> None:
        d["model"]["fingerprint"] = "0123456789abcdef"

    def missing_unit(d: dict[str, Any]) -> None:
        del d["layers"][1]["weights"]["mlp.down_proj"]

    def bad_kv(d: dict[str, Any]) -> None:
        d["layers"][1]["kv"] = "k5v5"

    def partial_group(d: dict[str, Any]) -> None:
        w = d["layers"][0]["weights"]
        del w["self_attn.qkv_proj"]
        w.update({"self_attn.q_proj": "w4g64a", "self_attn.k_proj": "w4g64a"})

    def bad_group(d: dict[str, Any]) -> None:
        d["layers"][0]["weights"]["mlp.down_proj"]["format"] = "w4g96a"  # 128-wide input

    def unknown_method(d: dict[str, Any]) -> None:
        d["layers"][0]["weights"]["mlp.down_proj"]["method"] = "magic"

    return {
        "schema": (schema, "schema_version 99"),
        "unknown_unit": (unknown_unit, "unknown unit 'layers.1.mlp.up_and_away'"),
        "mixed_fused": (mixed_fused, "mixed formats"),
        "bad_format": (bad_format, "invalid weight format 'w4g6a'"),
        "other_model": (other_model, "another model"),
        "missing_unit": (missing_unit, "no format for unit(s) layers.1.mlp.down_proj"),
        "bad_kv": (bad_kv, "invalid KV format 'k5v5'"),
        "partial_group": (partial_group, "missing self_attn.v_proj"),
        "bad_group": (bad_group, "does not divide the input features 128"),
        "unknown_method": (unknown_method, "unknown method 'magic'"),
    }


@pytest.mark.parametrize("case", sorted(_mutations()))
def test_bad_plans_fail_with_one_clear_line(llama: Any, case: str) -> None:
    mutate, expected = _mutations()[case]
    d = copy.deepcopy(_plan_dict(llama))
    mutate(d)
    with pytest.raises(PlanError) as e:
        Plan.from_dict(d, source="p.json").validate(build_graph(llama))
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_fused_members_that_agree_are_folded(llama: Any) -> None:
    d = _plan_dict(llama)
    w = d["layers"][0]["weights"]
    del w["self_attn.qkv_proj"]
    w.update({m: "w8c" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")})
    plan = Plan.from_dict(d).validate(build_graph(llama))
    assert str(plan.layers[0].weights["self_attn.qkv_proj"]) == "w8c"


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="not found"):
        Plan.load(tmp_path / "nope.json")
    (tmp_path / "t.json").write_text('{"kind": "bitplan.plan", "schema_')
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(tmp_path / "t.json")
    (tmp_path / "l.json").write_text("[1, 2]")
    with pytest.raises(PlanError, match="JSON object"):
        Plan.load(tmp_path / "l.json")
