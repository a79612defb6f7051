"""The output head's sensitivity rows: measured KL of quantizing lm_head (and a tied embedding) alone."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

import bitplan
from bitplan.eval import ReferenceLogProbs, evaluate
from bitplan.formats import parse_weight
from bitplan.graph import build_graph
from bitplan.plan import UnitChoice
from bitplan.sensitivity import CalibData, Candidates, profile
from bitplan.sensitivity._additivity import mixed_plan
from bitplan.sensitivity._head import head_scores

WINDOW = 32


def _calib(model: Any, n: int = 3) -> CalibData:
    g = torch.Generator().manual_seed(1)
    return CalibData(torch.randint(0, model.config.vocab_size, (n, WINDOW), generator=g))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # an untied head, and a head tied to the embedding
def test_head_rows_equal_the_kl_of_the_plan_that_quantizes_only_the_head(
    arch: str, make_random_lm: Callable[..., Any]
) -> None:
    model = make_random_lm(arch)
    graph = build_graph(model)
    assert graph.tied_embeddings == (arch == "gpt2")
    calib = _calib(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = head_scores(
        model, calib, Candidates.parse(["w8c", "w4g32a", "w2g32a@hqq"], [], []), batch_size=2, progress=False
    )
    assert [(r.format, r.quantizer) for r in rows] == [("w8c", "rtn"), ("w4g32a", "rtn"), ("w2g32a", "hqq")]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # restored exactly
    assert isinstance(model.get_submodule(graph.lm_head.path), torch.nn.Linear)
    tokens = calib.windows.reshape(-1)
    ref = ReferenceLogProbs(model, tokens, WINDOW, progress=False)
    for r in rows:
        plan = mixed_plan(graph, weights={"lm_head": UnitChoice(parse_weight(r.format), r.quantizer)})
        q = bitplan.apply_plan(copy.deepcopy(model), plan, kernels="reference")
        res = evaluate(
            q, tokens=tokens, max_tokens=tokens.numel(), window=WINDOW, reference=ref, progress=False
        )
        assert r.score == pytest.approx(res.kl, rel=1e-4, abs=1e-9), r
        assert r.unit == "lm_head" and r.kind == "weight" and r.method == "kl" and r.layer == -1
        assert r.tokens == calib.tokens and r.params == graph.lm_head.numel
    assert 0 < rows[0].score < rows[1].score < rows[2].score


def test_profile_scores_the_head_as_its_own_kind(make_random_lm: Callable[..., Any], tmp_path: Any) -> None:
    model = make_random_lm("llama")
    calib, cands = _calib(model, 2), Candidates.parse(["w4g32a"], [], [])
    with_head = profile(
        model, calib, cands, kinds=("weight", "head"), output=tmp_path / "t.parquet", progress=False
    )
    heads = [r for r in with_head.rows if r.unit == "lm_head"]
    assert len(heads) == 1 and heads[0].method == "kl" and heads[0].format == "w4g32a"
    assert any(r.unit != "lm_head" and r.method == "fisher" for r in with_head.rows)  # weights stay Fisher
    without = profile(model, calib, cands, kinds=("weight",), progress=False)
    assert not [r for r in without.rows if r.unit == "lm_head"]
    # reused as is: the saved table has every expected row
    again = profile(
        model, calib, cands, kinds=("weight", "head"), output=tmp_path / "t.parquet", progress=False
    )
    assert [r.key for r in again.rows] == [r.key for r in with_head.rows]
