"""Hardware profiles: what profile_hw measures, resume, refusal of foreign profiles, predict's sum, the cost model."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch

import bitplan
from bitplan.cli import main
from bitplan.errors import BitplanError, DataError
from bitplan.graph import build_graph
from bitplan.profiles import (
    HardwareProfile,
    HWRow,
    ProfileCostModel,
    ProfileIndex,
    _measure,
    device_fingerprint,
    load_profile,
    predict,
    profile_hw,
)
from bitplan.search import SearchSpace

SMALL = dict(contexts=(16, 48), chunk=16, weights=("bf16", "w8c", "w4g32a"), acts=("a16", "a8t"), kv=("k16v16", "k4v2"),
             budget_s=0.005, new_tokens=4, progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def model(make_random_lm: Any) -> Any:
    return make_random_lm("llama", num_hidden_layers=2)


@pytest.fixture(scope="module")
def profiled(model: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[HardwareProfile, Path]:
    path = tmp_path_factory.mktemp("hw") / "hw.parquet"
    torch.set_num_threads(1)
    return profile_hw(model, output=path, **SMALL), path  # type: ignore[arg-type]


def test_profile_covers_every_option_and_round_trips(model: Any, profiled: tuple[HardwareProfile, Path]) -> None:
    hw, path = profiled
    graph = build_graph(model)
    shapes = {(m.out_features, m.in_features) for u in graph.units("tensor") for m in u.members}
    lin = hw.by_part("linear")
    for phase in ("decode", "prefill"):
        for shape in shapes:
            for w in ("bf16", "w8c", "w4g32a"):
                for a in ("a16", "a8t"):
                    rows = [r for r in lin if (r.phase, r.out_features, r.in_features, r.weight, r.act) == (phase, *shape, w, a)]
                    assert rows, (phase, shape, w, a)
                    assert all(r.median_ms > 0 and r.p10_ms <= r.median_ms <= r.p90_ms and r.reps >= 7 for r in rows)
        assert any(r.name == "lm_head" and r.phase == phase for r in lin)
    assert {r.m for r in lin if r.phase == "prefill"} == {16}
    bf16 = [r for r in lin if r.weight == "bf16" and r.act == "a16"]
    assert {r.kernel for r in bf16} == {"torch"}
    assert {r.kernel for r in lin if r.weight == "w4g32a"} >= {"int4pack", "reference"}  # every kernel that runs it
    skel = {(r.phase, r.context, r.kv) for r in hw.by_part("skeleton")}
    assert skel == {("decode", 16, "k16v16"), ("decode", 48, "k16v16"), ("decode", 16, "k4v2"), ("decode", 48, "k4v2"), ("prefill", 16, "k16v16")}
    assert {r.name for r in hw.by_part("fixed")} >= {"embedding", "norm", "sampling"}
    again = HardwareProfile.load(path)
    assert again == hw and again.meta.device == device_fingerprint("cpu")
    meta = json.loads(pq.read_schema(path).metadata[b"bitplan"])
    assert meta["kind"] == "bitplan-hw-profile" and meta["schema_version"] == 1 and meta["device"]["torch"] == torch.__version__
    assert not path.with_name(path.name + ".partial").exists()


def test_interrupted_profile_resumes_without_duplicates(model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "hw.parquet"
    real, calls = _measure._linear_rows, {"n": 0}

    def flaky(*a: Any, **k: Any) -> list[HWRow]:
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(_measure, "_linear_rows", flaky)
    with pytest.raises(KeyboardInterrupt):
        profile_hw(model, output=path, **SMALL)  # type: ignore[arg-type]
    assert not path.exists() and len(list(path.with_name(path.name + ".partial").glob("part-*.parquet"))) == 8
    calls["n"] = 100
    hw = profile_hw(model, output=path, **SMALL)  # type: ignore[arg-type]
    keys = [r.key for r in hw.rows]
    assert len(keys) == len(set(keys))
    assert calls["n"] == 100 + len(_measure._linear_work(build_graph(model), *_formats(), 1, 16)) - 8


def _formats() -> tuple[list[Any], list[Any]]:
    from bitplan.formats import ActFormat, parse_act, parse_weight

    return [parse_weight(w) for w in SMALL["weights"]], list(dict.fromkeys([ActFormat(), *(parse_act(a) for a in SMALL["acts"])]))  # type: ignore[attr-defined]


def _foreign(hw: HardwareProfile, path: Path) -> Path:
    other = dataclasses.replace(hw.meta.device, name="Some Other CPU", units=hw.meta.device.units + 62)
    dataclasses.replace(hw, meta=dataclasses.replace(hw.meta, device=other)).save(path)
    return path


def test_a_foreign_profile_is_refused(profiled: tuple[HardwareProfile, Path], tmp_path: Path) -> None:
    hw, _ = profiled
    path = _foreign(hw, tmp_path / "foreign.parquet")
    with pytest.raises(BitplanError, match="measured on Some Other CPU .* but this device is") as e:
        load_profile(path)
    assert str(device_fingerprint("cpu")) in str(e.value)
    assert load_profile(path, allow_foreign=True).meta.device.name == "Some Other CPU"


def test_another_openmp_wait_policy_is_another_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    here = device_fingerprint("cpu")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    passive = device_fingerprint("cpu")
    assert passive.omp == "OMP_WAIT_POLICY=PASSIVE" and passive != here
    with pytest.raises(BitplanError, match="OMP_WAIT_POLICY=PASSIVE.* but this device is .*OpenMP defaults"):
        passive.check_matches(here)
    # a profile written before the field existed reads as unknown settings: refused, never silently trusted
    old = {k: v for k, v in here.to_dict().items() if k != "omp"}
    with pytest.raises(BitplanError, match="unknown OpenMP settings"):
        type(here).from_dict(old).check_matches(here)


def test_paired_decode_ms_times_each_model_per_round(model: Any) -> None:
    from bitplan.profiles import paired_decode_ms

    q = bitplan.apply_plan(copy.deepcopy(model), bitplan.uniform_plan(model, "w4g32a", kv="k4v4"), kernels="reference")
    times = paired_decode_ms([model, q], context=24, new=3, rounds=2)
    assert len(times) == 2 and all(len(t) == 2 and all(ms > 0 for ms in t) for t in times)
    with pytest.raises(BitplanError, match="rounds"):
        paired_decode_ms([model], context=24, new=3, rounds=0)


def test_predict_sums_measured_rows(model: Any, profiled: tuple[HardwareProfile, Path]) -> None:
    hw, _ = profiled
    graph = build_graph(model)
    idx = ProfileIndex(hw)
    plan = bitplan.uniform_plan(model, "w4g32a", "a8t", "k4v2")
    p = predict(plan, hw, graph, context=32)
    members = [(m.out_features, m.in_features) for u in graph.units("tensor") for m in u.members]
    lin = sum(idx.linear_ms("decode", s, bitplan.formats.parse_weight("w4g32a"), bitplan.formats.parse_act("a8t"))[0] - idx.stub["decode"] for s in members)
    skel = idx.skeleton_ms("decode", 32)
    kv = idx.skeleton_ms("decode", 32, "k4v2") - skel
    assert p.breakdown["skeleton"] == pytest.approx(skel) and p.breakdown["linears"] == pytest.approx(lin)
    assert p.breakdown["kv"] == pytest.approx(kv) and p.decode_ms == pytest.approx(skel + lin + kv)
    # interpolation is linear between the measured contexts
    lo, hi = idx.skeleton_ms("decode", 16), idx.skeleton_ms("decode", 48)
    assert skel == pytest.approx(lo + (hi - lo) * (32 - 16) / (48 - 16))
    assert sum(p.kernels.values()) == len(members)
    # weight bytes as the model holds them: unquantized tensors at the profiled dtype (float32 here), not 16 bits
    from bitplan.apply import held_weight_bytes

    held = held_weight_bytes(bitplan.apply_plan(copy.deepcopy(model), plan))
    assert hw.meta.dtype == "float32" and p.weight_bytes > plan.summary().weight_bytes
    assert abs(p.weight_bytes - held) <= 256 and p.kv_bytes == plan.summary().kv_bytes_per_token * 32
    assert p.peak_bytes > p.weight_bytes + p.kv_bytes
    with pytest.raises(BitplanError, match="measured at batch 1"):
        predict(plan, hw, graph, batch=4)
    with pytest.raises(BitplanError, match="no decode timing for .* w3g64a/a16"):
        predict(bitplan.uniform_plan(model, "w3g64a"), hw, graph)
    with pytest.raises(BitplanError, match="skeleton timing with KV k2v2"):
        predict(bitplan.uniform_plan(model, "w8c", kv="k2v2"), hw, graph)


def test_kernel_choice_follows_measured_latency(model: Any, profiled: tuple[HardwareProfile, Path]) -> None:
    hw, _ = profiled
    idx = ProfileIndex(hw)
    fast = idx.kernel_latency()
    applied = bitplan.apply_plan(copy.deepcopy(model), bitplan.uniform_plan(model, "w4g32a"), latency=fast)
    for m in applied.modules():
        if isinstance(m, bitplan.quantizers.QuantLinear):
            rows = idx.kernel_rows("decode", (m.out_features, m.in_features), m.weight_format, m.act_format)
            eligible = [r for r in rows if bitplan.kernels.get_kernel(r.kernel).holds_plan_bytes(m.spec)]
            assert m.kernel == min(eligible, key=lambda r: r.median_ms).kernel


def test_cost_model_charges_what_predict_says(model: Any, profiled: tuple[HardwareProfile, Path]) -> None:
    from tests.search._synth import synth_table

    hw, _ = profiled
    graph = build_graph(model)
    table = synth_table(graph, weights=("w8c", "w4g32a"))
    space = SearchSpace.from_table(table, graph, acts=["a8t"], kv=["k4v2"], context=32, prune_kv=False)
    lat = ProfileCostModel(hw).latency(space)
    assert "measured profile" in lat.source
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        idx = [int(torch.randint(len(d.options), (1,), generator=g)) for d in space.decisions]
        want = predict(space.to_plan(idx), hw, graph, context=32).decode_ms
        assert lat.total(idx) == pytest.approx(want)
    no_acts = [0 if d.kind == "act" else 1 for d in space.decisions]  # without activation decisions: additive is exact
    assert lat.additive(no_acts) == pytest.approx(lat.total(no_acts))
    assert lat.reference() == pytest.approx(predict(space.to_plan([0] * len(space.decisions)), hw, graph, context=32).decode_ms)


def test_cli_profile_hw_and_predict(tmp_path: Path, make_random_lm: Any, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = tmp_path / "m"
    make_random_lm("llama", num_hidden_layers=1).save_pretrained(model_dir)
    hw = tmp_path / "hw.parquet"
    code = main(["profile-hw", "--model", str(model_dir), "--context", "16", "--chunk", "8", "--weights", "bf16,w4g32a",
                 "--acts", "a16", "--kv", "k16v16", "--budget", "0.005", "-o", str(hw), "--json"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["rows"] == len(HardwareProfile.load(hw).rows)
    plan = tmp_path / "p.json"
    assert main(["plan", "uniform", "--model", str(model_dir), "--weights", "w4g32a", "-o", str(plan)]) == 0
    capsys.readouterr()
    code = main(["predict", "--model", str(model_dir), "--plan", str(plan), "--profile", str(hw), "--context", "16", "--json"])
    pred = json.loads(capsys.readouterr().out)
    assert code == 0 and pred["decode_ms"] > 0 and pred["context"] == 16 and set(pred["breakdown"]) >= {"skeleton", "linears"}
    foreign = _foreign(HardwareProfile.load(hw), tmp_path / "foreign.parquet")
    code = main(["predict", "--model", str(model_dir), "--plan", str(plan), "--profile", str(foreign), "--json"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.startswith("error: hardware profile") and "Some Other CPU" in err and err.count("\n") == 1
    assert main(["predict", "--model", str(model_dir), "--plan", str(plan), "--profile", str(foreign), "--allow-foreign-profile", "--json"]) == 0
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(hw.read_bytes()[:200])
    capsys.readouterr()
    code = main(["predict", "--model", str(model_dir), "--plan", str(plan), "--profile", str(broken)])
    assert code == 2 and "not a readable Parquet file" in capsys.readouterr().err


def test_profile_rejects_bad_settings(model: Any) -> None:
    with pytest.raises(BitplanError, match="at least 1"):
        profile_hw(model, contexts=(0,), progress=False)
    with pytest.raises(DataError, match="not a bitplan hardware profile"):
        from bitplan.profiles._table import ProfileMeta

        ProfileMeta.from_dict({"kind": "x"}, "p.parquet")
