"""Exporters, checked with each consumer's own matching rule (written here from the consumers' code, not bitplan's).

* vLLM (compressed_tensors/utils.py): ``re.match`` of ``re:`` targets against vLLM's module name -- the fused
  ``...qkv_proj`` / ``...gate_up_proj`` -- and, for fused modules, against every shard name; ``ignore`` likewise.
* GPTQModel / vLLM gptq: ``dynamic`` keys in order, ``re.match``, first match wins, ``-:`` skips.
* llama-quantize: each pattern lowercased and ``std::regex_search`` (unanchored) against GGUF tensor names.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from bitplan.errors import BitplanError
from bitplan.export import ExportError, export, gguf_type, read_export
from bitplan.formats import parse_weight
from bitplan.graph import build_graph
from bitplan.plan import Plan, uniform_plan


def _assign(plan: Plan, formats: list[str], seed: int = 0, acts: list[str] | None = None, kv: list[str] | None = None) -> Plan:
    """``plan`` with each unit's format drawn from ``formats`` (and each layer's acts / KV from the lists)."""
    rng = random.Random(seed)
    d = plan.to_dict()
    for layer in d["layers"]:
        for unit in layer["weights"].values():
            unit["format"] = rng.choice(formats)
        if acts:
            layer["acts"] = rng.choice(acts)
        if kv:
            layer["kv"] = rng.choice(kv)
    return Plan.from_dict(d)


_BLOCK = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def _per_tensor(fused: Plan, model: Any) -> Plan:
    """``fused``'s formats (and acts / KV) written per tensor: what a fusing runtime can still load."""
    d = uniform_plan(model, "w4g64", granularity="tensor").to_dict()
    for layer, src in zip(d["layers"], fused.to_dict()["layers"], strict=True):
        layer["acts"], layer["kv"] = src["acts"], src["kv"]
        for local, unit in layer["weights"].items():
            parent, leaf = local.rsplit(".", 1)
            unit["format"] = src["weights"][f"{parent}.{_BLOCK.get(leaf, leaf)}"]["format"]
    return Plan.from_dict(d)


def _vllm_names(graph: Any) -> list[tuple[str, list[str]]]:
    """(vLLM module name, its checkpoint shards) for every linear vLLM builds (fused where it fuses)."""
    out = []
    for layer in graph.layers:
        groups = dict(layer.fused_groups)
        owner = {m: f for f, ms in groups.items() for m in ms}
        done = set()
        for lin in layer.linears:
            f = owner.get(lin.local)
            if f is None:
                out.append((lin.path, [lin.path]))
            elif f not in done:
                done.add(f)
                out.append((f"{layer.path}.{f}", [f"{layer.path}.{m}" for m in groups[f]]))
    return out


def _ct_match(name: str, target: str) -> bool:
    return bool(re.match(target[3:], name)) if target.startswith("re:") else name == target


def _check_vllm_matching(config: dict[str, Any], graph: Any) -> None:
    """Every vLLM module matches exactly one target or one ignore entry, and so does every shard, in the same group."""
    groups = list(config["config_groups"].values())
    for name, shards in _vllm_names(graph):
        for n in [name, *shards]:
            hits = [i for i, g in enumerate(groups) for t in g["targets"] if _ct_match(n, t)]
            ignored = [t for t in config["ignore"] if _ct_match(n, t)]
            assert len(hits) + len(ignored) == 1, (n, hits, ignored)
            if n == name:
                expect = (hits, bool(ignored))
            assert (hits, bool(ignored)) == expect, (n, name)  # shards agree with their fused module
    assert any(_ct_match("lm_head", t) for t in config["ignore"]) or any(
        _ct_match("lm_head", t) for g in groups for t in g["targets"]
    )


@pytest.fixture
def llama(make_random_lm: Any) -> Any:
    return make_random_lm("llama", hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("granularity", ["fused", "tensor"])
def test_compressed_tensors_round_trip_and_vllm_matching(llama: Any, tmp_path: Path, granularity: str) -> None:
    graph = build_graph(llama)
    # formats drawn per fused block, so that shards agree at tensor granularity too
    plan = _assign(uniform_plan(llama, "w4g64a"), ["w4g64a", "w8c", "w4g128", "fp8", "bf16", "w8ca"], seed=3, acts=["a16", "a8t"])
    plan = (plan if granularity == "fused" else _per_tensor(plan, llama)).validate(graph)
    result = export(plan, "compressed-tensors", tmp_path / "qc.json")
    config = json.loads((tmp_path / "qc.json").read_text())["quantization_config"]
    _check_vllm_matching(config, graph)
    assert config["format"] == "mixed-precision" and len(config["config_groups"]) == result.summary["groups"] > 2
    assert all(t.startswith("re:^") and t.endswith("$") for g in config["config_groups"].values() for t in g["targets"])
    back = read_export("compressed-tensors", tmp_path / "qc.json", plan)
    assert [str(c) for _, c in back.unit_choices()] == [str(c) for _, c in plan.unit_choices()]
    assert back.act_formats() == plan.act_formats()


def test_compressed_tensors_refusals_and_kv(llama: Any, tmp_path: Path) -> None:
    tensor = uniform_plan(llama, "w4g64a", granularity="tensor").to_dict()
    tensor["layers"][1]["weights"]["self_attn.k_proj"]["format"] = "w8c"
    with pytest.raises(ExportError, match=r"layers\.1: a fusing runtime loads q_proj, k_proj, v_proj as one qkv_proj.*k_proj=w8c"):
        export(Plan.from_dict(tensor), "compressed-tensors")
    mixed_kv = _assign(uniform_plan(llama, "w4g64a"), ["w4g64a"], kv=["k4v2", "k8v8"], seed=1)
    with pytest.raises(ExportError, match="per layer.*--no-kv"):
        export(mixed_kv, "compressed-tensors")
    r = export(mixed_kv, "compressed-tensors", kv=False)
    assert any("not exported" in n for n in r.notes)
    r = export(uniform_plan(llama, "w4g64a", kv="k8v8"), "compressed-tensors")
    assert json.loads(r.files[""])["quantization_config"]["kv_cache_scheme"]["type"] == "float"
    with pytest.raises(ExportError, match="one bit width for K and V"):
        export(uniform_plan(llama, "w4g64a", kv="k4v4"), "compressed-tensors")
    for fmt, near in (("nf4g64", "w4g64"), ("w4g32ad8", "w4g32a")):
        plan = uniform_plan(llama, fmt)
        with pytest.raises(ExportError, match=f"--approximate to export it as {near}"):
            export(plan, "compressed-tensors", tmp_path / "x.json")
        assert not (tmp_path / "x.json").exists()  # nothing written on refusal
        r = export(plan, "compressed-tensors", approximate=True)
        assert r.notes and f"exported as {near}" in r.notes[0]
    r = export(uniform_plan(llama, "w3g64a"), "compressed-tensors")
    assert any("vLLM cannot run it: 3-bit weights" in n for n in r.notes)


@pytest.mark.parametrize("granularity", ["fused", "tensor"])
def test_gptqmodel_round_trip_with_both_name_forms(llama: Any, tmp_path: Path, granularity: str) -> None:
    graph = build_graph(llama)
    plan = _assign(uniform_plan(llama, "w4g64", granularity="fused"), ["w4g64", "w4g64", "w3g64a", "w8c", "w2g32", "bf16"], seed=5)
    plan = (plan if granularity == "fused" else _per_tensor(plan, llama)).validate(graph)
    export(plan, "gptqmodel", tmp_path / "quantize_config.json")
    config = json.loads((tmp_path / "quantize_config.json").read_text())
    keys = list(config["dynamic"])
    assert keys == sorted(keys, key=lambda k: not k.startswith("-:"))  # skips first (vLLM keeps the order)
    assert all(k[2:].startswith("^") and k.endswith("$") for k in keys)

    def scheme(name: str) -> Any:  # GPTQModel's dynamic_get, first match wins
        for k, o in config["dynamic"].items():
            if re.match(k[2:], name):
                return None if k.startswith("-:") else (o["bits"], o["group_size"], o["sym"])
        return config["bits"], config["group_size"], config["sym"]

    for name, shards in _vllm_names(graph):  # vLLM's fused name and GPTQModel's shard names agree
        assert len({scheme(n) for n in [name, *shards]}) == 1, name
    back = read_export("gptqmodel", tmp_path / "quantize_config.json", plan)
    assert [str(c) for _, c in back.unit_choices()] == [str(c) for _, c in plan.unit_choices()]


def test_gptqmodel_targets_and_refusals(llama: Any) -> None:
    plan = uniform_plan(llama, "w3g64")
    with pytest.raises(ExportError, match=r"w3g64 cannot run in a GPTQ marlin target \(4/8 bits, symmetric, group -1/32/64/128\)"):
        export(plan, "gptqmodel", target="marlin")
    export(plan, "gptqmodel", target="torch")
    with pytest.raises(ExportError, match="cannot run in a GPTQ marlin target"):
        export(uniform_plan(llama, "w4g64a"), "gptqmodel", target="marlin")
    with pytest.raises(ExportError, match="unknown GPTQ target"):
        export(plan, "gptqmodel", target="exllama9")
    with pytest.raises(ExportError, match="weight-only.*a8t"):
        export(uniform_plan(llama, "w8c", "a8t"), "gptqmodel")
    with pytest.raises(ExportError, match="no KV cache.*--no-kv"):
        export(uniform_plan(llama, "w4g64", kv="k4v2"), "gptqmodel")
    with pytest.raises(ExportError, match="GPTQ configs take 2, 3, 4 or 8 bits"):
        export(uniform_plan(llama, "w6g64"), "gptqmodel")
    with pytest.raises(ExportError, match="GPTQ has no fp8"):
        export(uniform_plan(llama, "fp8"), "gptqmodel")


@pytest.mark.parametrize(("fmt", "row", "expect"), [
    ("w4g32a", 576, ("q4_1", True)), ("w4g32", 576, ("q4_0", True)), ("w4g32ad6", 1536, ("q4_k", True)),
    ("w4g32ad6", 576, ("q4_1", False)),  # a k-quant layout on a row llama.cpp cannot block: the 32-block type
    ("w4g64a", 576, ("q4_1", False)), ("w4g64a", 1536, ("q4_k", False)), ("w4g64", 1536, ("q4_k", False)),
    ("w3g64a", 576, ("q4_0", False)), ("w3g64a", 1536, ("q3_k", False)), ("w3g16d6", 1536, ("q3_k", True)),
    ("w2g64a", 1536, ("q2_k", False)), ("w2g64a", 576, ("q4_0", False)), ("w8c", 576, ("q8_0", False)),
    ("w6g64", 1536, ("q6_k", False)), ("w6g64", 576, ("q8_0", False)), ("w5g32a", 576, ("q5_1", True)),
    ("nf4g64", 576, ("iq4_nl", False)), ("fp8", 576, ("q8_0", False)), ("bf16", 576, ("bf16", True)),
    ("w4g32", 40, ("f16", False)),
])  # fmt: skip
def test_gguf_type_mapping(fmt: str, row: int, expect: tuple[str, bool]) -> None:
    t, exact = gguf_type(parse_weight(fmt), row)
    assert (t.name, exact) == expect
    if t.bits < 16:
        assert row % t.block == 0 and t.bits >= parse_weight(fmt).bits  # fits, never fewer code bits


@pytest.mark.parametrize("granularity", ["fused", "tensor"])
def test_llamacpp_round_trip(llama: Any, tmp_path: Path, granularity: str) -> None:
    exact = ["w4g32", "w4g32a", "w5g32", "w5g32a", "w8g32", "w4g32ad6", "w5g32ad6", "w3g16d6", "bf16"]
    plan = _assign(uniform_plan(llama, "w4g32", granularity=granularity), exact, seed=2).validate(build_graph(llama))
    result = export(plan, "llama.cpp", tmp_path / "types.txt")
    assert result.summary["exact"] == result.summary["tensors"]
    back = read_export("llama.cpp", tmp_path / "types.txt", plan)
    assert [str(c) for _, c in back.unit_choices()] == [str(c) for _, c in plan.unit_choices()]
    companion = json.loads((tmp_path / "types.txt.json").read_text())
    assert companion["plan_bits_per_weight"] == companion["gguf_bits_per_weight"] == round(plan.summary().avg_weight_bits, 4)
    assert "--tensor-type-file types.txt" in companion["command"]


def _main_meta_model(path: Path) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))


@pytest.mark.parametrize("granularity", ["fused", "tensor"])
def test_llamacpp_patterns_on_the_main_models_tensor_list(main_model_path: Path, tmp_path: Path, granularity: str) -> None:
    """Every GGUF tensor of the main model matches exactly one line if it is a plan unit, none otherwise (under
    llama-quantize's lowercased, unanchored regex_search); 576-wide rows never get a k-quant."""
    import gguf
    from safetensors import safe_open

    model = _main_meta_model(main_model_path)
    plan = _assign(uniform_plan(model, "w4g64a", granularity=granularity, name_or_path=str(main_model_path)),
                   ["w4g64a", "w3g64a", "w4g32ad8", "w8c", "w2g64a", "bf16"], seed=7)  # fmt: skip
    result = export(plan, "llama.cpp", tmp_path / "t.txt")
    rules = [(re.compile(line.partition("=")[0].lower()), line.partition("=")[2]) for line in (tmp_path / "t.txt").read_text().split()]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, plan.model.num_layers)
    with safe_open(str(main_model_path / "model.safetensors"), "pt") as f:
        hf = list(f.keys())
    linear = 0
    for key in hf:
        g = names.get_name(key, try_suffixes=(".weight", ".bias"))
        assert g is not None, key
        hits = [t for rx, t in rules if rx.search(g)]
        is_unit = ".layers." in key and key.endswith("proj.weight")
        assert len(hits) == (1 if is_unit else 0), (g, hits)
        if is_unit:
            linear += 1
            t = hits[0]
            row = 1536 if "down_proj" in key else 576
            assert t in ("bf16", "f16") or row % {"q2_k": 256, "q3_k": 256, "q4_k": 256, "q5_k": 256, "q6_k": 256}.get(t, 32) == 0
    assert linear == 210 == result.summary["tensors"]
    companion = json.loads((tmp_path / "t.txt.json").read_text())
    assert companion["plan_bits_per_weight"] == round(plan.summary().avg_weight_bits, 4)
    assert companion["gguf_bits_per_weight"] > companion["plan_bits_per_weight"]  # 576-wide rows take wider 32-block types
    assert companion["comment"].startswith("bitplan plan for")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_kv_plan_file_round_trip_and_cache(llama: Any, tmp_path: Path, suffix: str) -> None:
    import bitplan

    plan = _assign(uniform_plan(llama, "w4g64a"), ["w4g64a"], kv=["k4v2", "k8v4g16r16", "k16v16", "k2v4s1"], seed=4)
    out = tmp_path / f"kv{suffix}"
    export(plan, "kv", out)
    text = out.read_text()
    assert ("k_bits:" in text) if suffix == ".yaml" else json.loads(text)["layers"]["0"]["k_bits"] in (2, 4, 8, 16)
    back = read_export("kv", out, plan)
    assert back.kv_formats() == plan.kv_formats()
    cache = bitplan.kv_cache_for(llama, out)  # a path works directly
    assert [layer.fmt for layer in cache.layers] == plan.kv_formats()
    ids = torch.randint(0, 256, (1, 10))
    from bitplan.loading import cache_kwarg

    gen = llama.generate(ids, **{cache_kwarg(llama): cache}, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 14)


def test_kv_plan_file_errors(llama: Any, tmp_path: Path) -> None:
    import bitplan

    bad = tmp_path / "kv.yaml"
    for text, match in [
        ("kind: something\n", "not a bitplan KV plan"),
        ("kind: bitplan.kv_plan\nschema_version: 7\n", "schema_version 7"),
        ("kind: bitplan.kv_plan\nschema_version: 1\nlayers: {0: {k_bits: 5, v_bits: 2}, 1: {k_bits: 4, v_bits: 2}}\n", r"layers\[0\]"),
        ("kind: bitplan.kv_plan\nschema_version: 1\nlayers: {0: {k_bits: 4, v_bits: 2}, 2: {k_bits: 4, v_bits: 2}}\n", "each once"),
        ("kind: bitplan.kv_plan\nschema_version: 1\nlayers: {0: {k_bits: 4}}\n", "missing 'v_bits'"),
        ("{unclosed", "not valid YAML"),
    ]:
        bad.write_text(text)
        with pytest.raises(BitplanError, match=match):
            bitplan.kv_cache_for(llama, bad)


def test_cli_export(llama: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bitplan.cli import main

    plan_path = tmp_path / "p.json"
    uniform_plan(llama, "w4g64a", kv="k4v2").save(plan_path)
    assert main(["export", "--plan", str(plan_path), "--to", "llama.cpp", "-o", str(tmp_path / "t.txt"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["files"] == [str(tmp_path / "t.txt"), str(tmp_path / "t.txt.json")] and out["tensors"] == 14
    assert main(["export", "--plan", str(plan_path), "--to", "kv", "-o", str(tmp_path / "kv.yaml")]) == 0
    assert "wrote" in capsys.readouterr().out
    code = main(["export", "--plan", str(plan_path), "--to", "compressed-tensors", "-o", str(tmp_path / "c.json")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "--no-kv" in err
    assert not (tmp_path / "c.json").exists()
    assert main(["export", "--plan", str(plan_path), "--to", "compressed-tensors", "--no-kv", "-o", str(tmp_path / "c.json")]) == 0
    assert "note: KV cache not exported" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["export", "--plan", str(plan_path), "--to", "onnx", "-o", str(tmp_path / "x")])
    assert e.value.code == 2


@pytest.mark.parametrize("granularity", ["fused", "tensor"])
def test_every_export_on_the_main_model(main_model_path: Path, tmp_path: Path, granularity: str) -> None:
    """The main model's plans export to all four formats at both granularities and read back where expressible."""
    model = _main_meta_model(main_model_path)
    graph = build_graph(model)
    fused = _assign(uniform_plan(model, "w4g64", name_or_path=str(main_model_path)), ["w4g64", "w8c", "w4g32", "bf16"], seed=11)
    plan = (fused if granularity == "fused" else _per_tensor(fused, model)).validate(graph)
    want = [str(c) for _, c in plan.unit_choices()]
    for to, name in (("compressed-tensors", "qc.json"), ("gptqmodel", "quantize_config.json"), ("kv", "kv.yaml")):
        export(plan, to, tmp_path / name)
        assert [str(c) for _, c in read_export(to, tmp_path / name, plan).unit_choices()] == want, to
    _check_vllm_matching(json.loads((tmp_path / "qc.json").read_text())["quantization_config"], graph)
    r = export(plan, "llama.cpp", tmp_path / "t.txt")
    assert r.summary["tensors"] == 210
