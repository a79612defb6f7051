"""Quantized checkpoints: save -> load gives the same modules, kernels and logits, bit for bit; bad input is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import bitplan
from bitplan.apply import apply_plan, kernel_counts
from bitplan.checkpoint import load, save, set_kernels
from bitplan.errors import BitplanError, ModelError
from bitplan.plan import Plan, uniform_plan
from bitplan.quantizers import QuantEmbedding, QuantLinear


def _mixed_plan(model: Any) -> Plan:
    """A tensor-granularity plan touching every storage layout: grouped asym, per-channel, nf4, double-quantized,
    16-bit, activation quantization on one layer and a mixed KV cache."""
    base = uniform_plan(model, "w4g64a", granularity="tensor").to_dict()
    cycle = ["w4g64a", "w8c", "nf4g64", "w3g32ad8", "bf16", "w4g32ad6", "w2g64"]
    i = 0
    for li, layer in enumerate(base["layers"]):
        for unit in layer["weights"].values():
            unit["format"] = cycle[i % len(cycle)]
            i += 1
        layer["kv"] = "k4v2" if li == 0 else "k8v4g16"
        layer["acts"] = "a8t" if li == 1 else "a16"
    return Plan.from_dict(base)


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox", "gpt2"])
def test_round_trip_is_bit_identical(make_random_lm: Any, tmp_path: Path, arch: str) -> None:
    model = make_random_lm(arch)
    apply_plan(model, _mixed_plan(model), kernels="reference")
    chosen = save(model, tmp_path / "ck", kernels="auto")
    assert set_kernels(model, chosen) == chosen
    assert any(k != "reference" for k in chosen.values()), chosen  # fast kernels are really exercised
    loaded = load(tmp_path / "ck")
    assert kernel_counts(loaded) == kernel_counts(model)
    ids = torch.randint(0, 256, (2, 40))
    assert torch.equal(_logits(model, ids), _logits(loaded, ids))
    q = {n: (str(m.weight_format), str(m.act_format), m.method) for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    q2 = {n: (str(m.weight_format), str(m.act_format), m.method) for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert q == q2
    assert loaded.bitplan_plan.to_dict()["layers"] == model.bitplan_plan.to_dict()["layers"]
    # the mixed KV cache comes back too: greedy generation through it is identical
    prompt = ids[:1, :12]
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **kw), loaded.generate(prompt, **kw))


def test_packed_bytes_on_disk_are_the_plans(make_random_lm: Any, tmp_path: Path) -> None:
    from safetensors import safe_open

    model = make_random_lm("llama").to(torch.bfloat16)
    plan = uniform_plan(model, "w4g32ad8", granularity="tensor")
    apply_plan(model, plan, kernels="reference")
    save(model, tmp_path / "ck")
    total = 0
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        for n in names:
            if n.rsplit(".", 1)[-1] in ("codes", "qparams", "superscales"):
                t = f.get_tensor(n)
                total += t.numel() * t.element_size()
    assert total == model.bitplan_plan.summary().unit_weight_bytes
    assert not any(n.endswith(".weight") and ".layers." in n and "proj" in n for n in names)  # no float copies


def test_tied_head_and_embedding_round_trip(make_random_lm: Any, tmp_path: Path) -> None:
    model = make_random_lm("llama", tie_word_embeddings=True)
    apply_plan(model, uniform_plan(model, "w4g64a", head="w8g64"), kernels="reference")
    save(model, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True  # the network the plan's fingerprint was taken on
    loaded = load(tmp_path / "ck")
    assert isinstance(loaded.get_submodule("model.embed_tokens"), QuantEmbedding)
    assert loaded.config.tie_word_embeddings is False
    ids = torch.randint(0, 256, (1, 30))
    assert torch.equal(_logits(model, ids), _logits(loaded, ids))


def test_unquantized_tied_head_stays_one_parameter(make_random_lm: Any, tmp_path: Path) -> None:
    model = make_random_lm("llama", tie_word_embeddings=True).to(torch.bfloat16)
    apply_plan(model, uniform_plan(model, "w4g64a"), kernels="reference")
    save(model, tmp_path / "ck")
    loaded = load(tmp_path / "ck")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    meta = json.loads((tmp_path / "ck" / "bitplan.json").read_text())
    assert meta["dtype"] == "bfloat16" and meta["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}


def test_calibrated_plan_round_trip(make_random_lm: Any, tmp_path: Path) -> None:
    model = make_random_lm("llama")
    calib = torch.randint(0, 256, (4, 32))
    apply_plan(model, uniform_plan(model, "w3g32a", method="awq"), kernels="reference", calib=calib)
    save(model, tmp_path / "ck", kernels="auto")
    set_kernels(model, "auto")
    loaded = load(tmp_path / "ck")
    ids = torch.randint(0, 256, (2, 24))
    assert torch.equal(_logits(model, ids), _logits(loaded, ids))  # folded AWQ scales (norm weights) saved too
    assert {m.method for m in loaded.modules() if isinstance(m, QuantLinear)} == {"awq"}


def test_load_with_another_kernel_policy(make_random_lm: Any, tmp_path: Path) -> None:
    model = make_random_lm("llama")
    apply_plan(model, uniform_plan(model, "w4g64a"), kernels="reference")
    save(model, tmp_path / "ck", kernels="auto")
    fast = load(tmp_path / "ck")
    ref = load(tmp_path / "ck", kernels="reference")
    assert set(kernel_counts(ref)) == {"reference"} and "reference" not in kernel_counts(fast)
    ids = torch.randint(0, 256, (1, 16))
    assert torch.equal(_logits(model, ids), _logits(ref, ids))  # the model as saved ran the reference kernel
    torch.testing.assert_close(_logits(fast, ids), _logits(ref, ids), atol=0.05, rtol=0.05)


def test_save_refuses_what_it_cannot_write(make_random_lm: Any, tmp_path: Path) -> None:
    model = make_random_lm("llama")
    with pytest.raises(BitplanError, match="no plan applied"):
        save(model, tmp_path / "a")
    apply_plan(model, uniform_plan(model, "w4g64a"))  # auto kernels: canonical buffers released
    with pytest.raises(BitplanError, match="kernels='reference'"):
        save(model, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    fresh = make_random_lm("llama")
    apply_plan(fresh, uniform_plan(fresh, "w4g64a"), kernels="reference")
    with pytest.raises(BitplanError, match="not a bitplan checkpoint"):
        save(fresh, other)
    assert (other / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_a_checkpoint_whole(make_random_lm: Any, tmp_path: Path) -> None:
    model = make_random_lm("llama")
    apply_plan(model, uniform_plan(model, "w8c"), kernels="reference")
    save(model, tmp_path / "ck")
    model2 = make_random_lm("llama", seed=1)
    apply_plan(model2, uniform_plan(model2, "w4g64a"), kernels="reference")
    save(model2, tmp_path / "ck")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp or backup left behind
    loaded = load(tmp_path / "ck")
    assert {str(m.weight_format) for m in loaded.modules() if isinstance(m, QuantLinear)} == {"w4g64a"}


def test_load_errors_are_one_line(make_random_lm: Any, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a bitplan checkpoint"):
        load(tmp_path / "empty")
    model = make_random_lm("llama")
    apply_plan(model, uniform_plan(model, "w4g64a"), kernels="reference")
    save(model, tmp_path / "ck")
    meta_path = tmp_path / "ck" / "bitplan.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "schema_version": 99}))
    with pytest.raises(ModelError, match="schema_version 99"):
        load(tmp_path / "ck")
    meta_path.write_text(json.dumps(meta))
    weights = tmp_path / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelError, match="cannot read the weights"):
        load(tmp_path / "ck")


def test_public_api() -> None:
    assert bitplan.save is save and bitplan.load is load and bitplan.set_kernels is set_kernels
