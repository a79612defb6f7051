"""Calibrated weight options in the profile: scored on the method's real weights, quantized once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from bitplan.graph import build_graph
from bitplan.sensitivity import CalibData, Candidates, parse_weight_option, profile
from bitplan.sensitivity import _calibrated as calibrated_mod

from ..test_smooth import _loud

FORMAT = "w3g32a"


@pytest.fixture(scope="module")
def model(make_random_lm: Any) -> Any:
    return _loud(make_random_lm("llama", max_position_embeddings=128))


@pytest.fixture(scope="module")
def calib() -> CalibData:
    g = torch.Generator().manual_seed(0)
    return CalibData(torch.randint(3, 256, (4, 64), generator=g), source="random")


def test_both_scorers_score_calibrated_options_from_one_quantization(
    model: Any, calib: CalibData, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = calibrated_mod.quantize_option

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(calibrated_mod, "quantize_option", counting)
    opts = [FORMAT, f"{FORMAT}@gptq", f"{FORMAT}@awq"]
    table = profile(model, calib, Candidates.parse(opts, [], []), method="both", kinds=("weight",), progress=False)
    units = {r.unit for r in table.rows}
    assert len(calls) == 2 * len(units)  # gptq + awq per unit, once for both scorers
    for method in ("kl", "fisher"):
        score = {(r.unit, r.quantizer): r.score for r in table.rows if r.method == method}
        for q in ("gptq", "awq"):
            better = sum(score[(u, q)] < score[(u, "rtn")] for u in units)
            assert better >= 0.75 * len(units), (method, q, better, len(units))
    assert table.meta.extra["timings"]["calibrated_seconds"] > 0


def test_calibrated_rows_match_apply_for_a_fused_unit(model: Any, calib: CalibData) -> None:
    """The scored weights are the ones apply_plan would compute for a unit quantized alone."""
    import copy

    import bitplan
    from bitplan.graph import build_graph

    graph = build_graph(model)
    unit = graph.layer_units(0)[0]  # qkv: reads input_layernorm, foldable
    cache = calibrated_mod.precompute(
        model, graph, calib, [(unit, Candidates.parse([f"{FORMAT}@awq"], [], []).weight_options(unit.in_features))]
    )
    (opt,) = Candidates.parse([f"{FORMAT}@awq"], [], []).weight_options(unit.in_features)
    ours = cache.dequantized(unit.name, opt)
    plan = bitplan.uniform_plan(model, "bf16")
    first = plan.layers[0]
    choice = type(first.weights[unit.local])(opt.format, "awq")
    layer = type(first)(first.index, {**first.weights, unit.local: choice}, first.acts, first.kv)
    plan = plan.__class__(plan.model, (layer, *plan.layers[1:]), plan.shapes, plan.granularity, plan.extra, plan.metadata)
    q = bitplan.apply_plan(copy.deepcopy(model), plan, kernels="reference", calib=calib)
    norm_ratio = model.get_submodule("model.layers.0.input_layernorm").weight / q.get_submodule(
        "model.layers.0.input_layernorm"
    ).weight
    for member, w in zip(unit.members, ours, strict=True):
        applied = q.get_submodule(member.path).dequantize_weight() / norm_ratio  # undo the folded scale
        torch.testing.assert_close(applied, w, rtol=1e-4, atol=1e-5)


def test_resumed_and_extended_runs_quantize_the_calibrated_options_they_still_score(
    model: Any, calib: CalibData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed during KL (Fisher rows on disk) and a table extended with a calibrated option both need the
    calibrated weights of the options they still score -- and only those."""
    from bitplan.sensitivity import _measure as measure_mod

    out = tmp_path / "sens.parquet"
    cands = Candidates(weights=(parse_weight_option("w4g32a"), parse_weight_option("w3g32a@gptq")), acts=(), kv=())
    real = measure_mod.measured_scores

    def crash_after_one_group(*args: Any, on_rows: Any = None, **kw: Any) -> Any:
        def persist(rows: Any) -> None:
            on_rows(rows)
            raise KeyboardInterrupt  # stands in for SIGKILL: Fisher's and this group's rows are on disk

        return real(*args, on_rows=persist, **kw)

    monkeypatch.setattr(measure_mod, "measured_scores", crash_after_one_group)
    with pytest.raises(KeyboardInterrupt):
        profile(model, calib, cands, method="both", kinds=("weight",), output=out, dtype=torch.float32, progress=False)
    monkeypatch.setattr(measure_mod, "measured_scores", real)
    counted: list[str] = []
    real_q = calibrated_mod.quantize_option

    def counting(*args: Any, **kwargs: Any) -> Any:
        counted.append("x")
        return real_q(*args, **kwargs)

    monkeypatch.setattr(calibrated_mod, "quantize_option", counting)
    resumed = profile(model, calib, cands, method="both", kinds=("weight",), output=out, dtype=torch.float32, progress=False)
    fresh = profile(model, calib, cands, method="both", kinds=("weight",), dtype=torch.float32, progress=False)
    assert sorted(r.key for r in resumed.rows) == sorted(r.key for r in fresh.rows)
    n_units = len(build_graph(model).units())
    assert 0 < len(counted) - n_units < n_units  # the resumed run re-quantized only the units KL still needed
    # extending a finished table with a calibrated option
    out2 = tmp_path / "ext.parquet"
    small = Candidates(weights=(parse_weight_option("w4g32a"),), acts=(), kv=())
    profile(model, calib, small, method="kl", kinds=("weight",), output=out2, dtype=torch.float32, progress=False)
    extended = profile(model, calib, cands, method="kl", kinds=("weight",), output=out2, dtype=torch.float32, progress=False)
    assert {r.quantizer for r in extended.rows} == {"rtn", "gptq"}


def test_calibrated_weights_live_in_an_unnamed_temporary_file(
    model: Any, calib: CalibData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every layer's calibrated copies are kept on disk, read back one unit at a time, and leave no file."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(calibrated_mod.tempfile, "tempdir", None)  # re-read TMPDIR
    graph = build_graph(model)
    units = graph.units()
    opts = [parse_weight_option("w4g64a@gptq"), parse_weight_option("w3g64a@awq")]
    cw = calibrated_mod.precompute(model, graph, calib, [(u, opts) for u in units])
    assert len(cw.entries) == 2 * len(units) and list(tmp_path.iterdir()) == []  # unnamed (O_TMPFILE)
    for u in units:
        for opt in opts:
            packed, s = cw.get(u.name, opt)
            assert len(packed) == len(u.members) and (s is None) == (opt.method == "gptq")
            deq = cw.dequantized(u.name, opt)
            assert all(d.shape == (m.out_features, m.in_features) for d, m in zip(deq, u.members, strict=True))
    again = calibrated_mod.precompute(model, graph, calib, [(units[0], opts[:1])])
    assert all(torch.equal(a, b) for a, b in zip(again.dequantized(units[0].name, opts[0]),
                                                 cw.dequantized(units[0].name, opts[0]), strict=True))  # fmt: skip
    cw.close()
