"""Additive proxy check on a tiny random Llama whose single-unit KLs are really measured."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
import torch

from bitplan.apply import apply_plan
from bitplan.eval import ReferenceLogProbs, evaluate
from bitplan.formats import parse_kv, parse_weight
from bitplan.graph import build_graph
from bitplan.plan import UnitChoice
from bitplan.sensitivity._additivity import additivity_check, mixed_plan, predicted_kl, random_mixed_plans
from bitplan.sensitivity._calib import CalibData
from bitplan.sensitivity._rows import ScoreRow
from tests._models import make_random_lm

WEIGHTS = ("w2g64a", "w4g64a")
KV = ("k2v2", "k16v2", "k4v4")
FISHER_BIAS = 1.3  # synthetic "fisher" rows: the measured KL times this, weights only


@pytest.fixture(scope="module")
def setup() -> dict[str, Any]:
    """Model, 2 windows of 64 tokens, and rows measured one unit at a time with ``evaluate``."""
    model = make_random_lm("llama")
    graph = build_graph(model)
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    ref = ReferenceLogProbs(model, tokens, 64, progress=False)

    def kl(plan: Any) -> float:
        q = apply_plan(copy.deepcopy(model), plan, kernels="reference")  # the format, not a kernel's rounding
        return float(evaluate(q, tokens=tokens, window=64, reference=ref, progress=False).kl)

    rows = []
    for u in graph.units("fused"):
        for w in WEIGHTS:
            s = kl(mixed_plan(graph, weights={u.name: UnitChoice(parse_weight(w))}))
            rows.append(ScoreRow(u.name, u.layer, "weight", w, "rtn", "kl", s, params=u.numel))
            rows.append(ScoreRow(u.name, u.layer, "weight", w, "rtn", "fisher", s * FISHER_BIAS, params=u.numel))
    for layer in range(graph.num_layers):
        for f in KV:
            rows.append(ScoreRow(f"layers.{layer}.kv", layer, "kv", f, "", "kl", kl(mixed_plan(graph, kv={layer: parse_kv(f)}))))
    return {"model": model, "graph": graph, "tokens": tokens, "rows": rows}


def test_random_plans_deterministic_and_drawn_from_rows(setup: dict[str, Any]) -> None:
    graph, rows = setup["graph"], setup["rows"]
    a = random_mixed_plans(graph, rows, n=12, seed=3)
    b = random_mixed_plans(graph, rows, n=12, seed=3)
    c = random_mixed_plans(graph, rows, n=12, seed=4)
    assert [p.to_dict() for p in a] == [p.to_dict() for p in b]
    assert [p.to_dict() for p in a] != [p.to_dict() for p in c]
    weights, kvs = set(), set()
    for p in a:
        assert p.validate(graph) == p
        weights.update(str(ch.format) for _, ch in p.unit_choices())
        kvs.update(str(k) for k in p.kv_formats())
        assert {str(x) for x in p.act_formats()} == {"a16"}
    assert weights == {"bf16", *WEIGHTS} and kvs == {"k16v16", *KV}  # every option (and 16-bit) appears
    pred = [predicted_kl(p, rows, "kl") for p in a]
    assert max(pred) > 10 * min(pred)  # aggressiveness spreads the plans from mild to harsh
    aggr = [p.metadata["aggressiveness"] for p in a]
    assert aggr == sorted(aggr) and aggr[0] < 0.1 and aggr[-1] > 0.9


def test_random_plans_tensor_granularity() -> None:
    model = make_random_lm("llama")
    rows = [ScoreRow("layers.0.self_attn.q_proj", 0, "weight", "w4g64a", "rtn", "kl", 0.1)]
    plans = random_mixed_plans(model, rows, n=3, seed=0)
    assert all(p.granularity == "tensor" for p in plans)
    with pytest.raises(KeyError, match="does not have"):
        random_mixed_plans(model, [ScoreRow("layers.9.mlp.up", 9, "weight", "w4g64a", "rtn", "kl", 0.1)], n=1)


def test_predicted_kl(setup: dict[str, Any]) -> None:
    graph, rows = setup["graph"], setup["rows"]
    assert predicted_kl(mixed_plan(graph), rows, "kl") == 0.0
    unit = "layers.1.mlp.down_proj"
    row = next(r for r in rows if r.unit == unit and r.format == "w2g64a" and r.method == "kl")
    one = mixed_plan(graph, weights={unit: UnitChoice(parse_weight("w2g64a"))})
    assert predicted_kl(one, rows, "kl") == pytest.approx(row.score)
    assert predicted_kl(one, rows, "fisher") == pytest.approx(row.score * FISHER_BIAS)
    two = mixed_plan(graph, weights={unit: UnitChoice(parse_weight("w2g64a"))}, kv={0: parse_kv("k2v2")})
    kv = next(r.score for r in rows if r.unit == "layers.0.kv" and r.format == "k2v2")
    assert predicted_kl(two, rows, "kl") == pytest.approx(row.score + kv)
    with pytest.raises(KeyError, match=r"layers\.1\.mlp\.down_proj.*w3g64a"):
        predicted_kl(mixed_plan(graph, weights={unit: UnitChoice(parse_weight("w3g64a"))}), rows, "kl")
    with pytest.raises(KeyError, match=r"layers\.0\.kv.*k2v2"):
        predicted_kl(two, rows, "fisher")  # fisher has no KV rows


def test_additivity_end_to_end(setup: dict[str, Any]) -> None:
    model, rows, tokens = setup["model"], setup["rows"], setup["tokens"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = additivity_check(model, rows, tokens, n_plans=10, seed=0, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # model untouched
    assert len(rep.records) == 10 and rep.tokens == 2 * 63 and rep.window == 64
    assert set(rep.stats) == {"kl", "fisher"}
    assert rep.metadata["borrowed"] == {"fisher": {"kv": "kl"}}
    kl = rep.stats["kl"]
    assert kl.spearman > 0.8, rep.summary()
    assert kl.pearson_log > 0.8 and 0.5 < kl.median_ratio < 2.0 and kl.median_rel_err < 0.5
    assert rep.stats["fisher"].median_ratio > kl.median_ratio  # the biased weight scores show through
    for r in rep.records:
        assert r.measured >= 0 and set(r.predicted) == {"kl", "fisher"}
        assert 2.0 < r.avg_bits <= 16.0 and r.kv_bytes > 0
    json.dumps(rep.to_dict())
    text = rep.summary()
    assert "kl: spearman" in text and "fisher (kv from kl)" in text


def test_additivity_given_plans_and_calib(setup: dict[str, Any]) -> None:
    model, graph, rows = setup["model"], setup["graph"], setup["rows"]
    calib = CalibData(setup["tokens"])
    unit = "layers.0.self_attn.o_proj"
    plans = [mixed_plan(graph), mixed_plan(graph, weights={unit: UnitChoice(parse_weight("w2g64a"))})]
    rep = additivity_check(model, rows, calib, plans=plans, methods=("kl",), progress=False)
    assert [r.measured for r in rep.records][0] == 0.0  # the 16-bit plan is the reference
    row = next(r.score for r in rows if r.unit == unit and r.format == "w2g64a" and r.method == "kl")
    assert rep.records[1].measured == pytest.approx(row, rel=1e-4)  # single unit: sum == measurement
    assert math.isnan(rep.stats["kl"].spearman)  # two plans: too few for a rank correlation
    with pytest.raises(ValueError, match="no rows scored"):
        additivity_check(model, rows, calib, plans=plans, methods=("hessian",), progress=False)
