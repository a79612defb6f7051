"""apply_plan: every unit really packed, sizes equal the plan's summary, the model still works."""

from __future__ import annotations

import copy
import subprocess
import sys
from typing import Any

import pytest
import torch

import bitplan
from bitplan.apply import apply_plan, held_weight_bytes
from bitplan.errors import BitplanError
from bitplan.formats import parse_weight
from bitplan.graph import build_graph
from bitplan.plan import Plan, uniform_plan
from bitplan.quantizers import QuantEmbedding, QuantLinear, get_weight_quantizer

ARCHS = ["llama", "qwen2", "mistral", "gpt_neox", "gpt2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_bytes_match_summary_on_every_architecture(make_random_lm: Any, arch: str) -> None:
    model = make_random_lm(arch).to(torch.bfloat16)  # stored 16-bit: held bytes are the real thing
    plan = uniform_plan(model, "w4g64a", "a8t", "k4v2")
    graph = build_graph(model)
    apply_plan(model, plan)
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == len(graph.units("tensor"))
    assert all(str(m.weight_format) == "w4g64a" and str(m.act_format) == "a8t" for m in quantized)
    s = plan.summary()
    held = held_weight_bytes(model)
    assert abs(held - s.weight_bytes) <= 0.01 * s.weight_bytes, (held, s.weight_bytes)
    assert sum(m.packed_nbytes for m in quantized) == s.unit_weight_bytes
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        out = model(ids).logits
    assert out.shape == (2, 40, 256) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_8bit_plan_stays_close_to_the_model(make_random_lm: Any, arch: str) -> None:
    model = make_random_lm(arch)
    ref = copy.deepcopy(model)
    apply_plan(model, uniform_plan(model, "w8c", "a16", "k8v8"))
    ids = torch.randint(0, 256, (1, 48))
    with torch.no_grad():
        a, b = ref(ids).logits, model(ids).logits
    kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="batchmean").item() / 48
    assert kl < 1e-3


def test_quality_falls_with_bits(make_random_lm: Any) -> None:
    base = make_random_lm("llama")
    ids = torch.randint(0, 256, (2, 64))
    with torch.no_grad():
        ref = base(ids).logits.log_softmax(-1)
    kls = []
    for fmt in ("w8g64a", "w4g64a", "w3g64a", "w2g64a"):
        model = copy.deepcopy(base)
        apply_plan(model, uniform_plan(model, fmt))
        with torch.no_grad():
            logp = model(ids).logits.log_softmax(-1)
        kls.append((ref.exp() * (ref - logp)).sum(-1).mean().item())
    assert kls == sorted(kls) and kls[0] < kls[-1] / 10


def test_generate_greedy_and_beam_with_mixed_kv(make_random_lm: Any) -> None:
    model = make_random_lm("llama")
    d = uniform_plan(model, "w4g64a").to_dict()
    d["layers"][0]["kv"], d["layers"][1]["kv"] = "k8v4", "k2v2r8"
    plan = Plan.from_dict(d)
    apply_plan(model, plan)
    assert [str(f) for f in model.bitplan_kv_formats] == ["k8v4", "k2v2r8"]
    ids = torch.randint(3, 256, (1, 12))
    greedy = model.generate(ids, max_new_tokens=40, do_sample=False, min_new_tokens=40)
    beam = model.generate(ids, max_new_tokens=40, num_beams=3, do_sample=False, min_new_tokens=40)
    assert greedy.shape == beam.shape == (1, 52)


@pytest.mark.parametrize("kernels", ["reference", "auto"])
def test_lm_head_on_a_tied_model(make_random_lm: Any, kernels: str) -> None:
    """A tied head's format reaches the embedding too: both packed, the same codes, the summary's bytes held."""
    model = make_random_lm("llama", tie_word_embeddings=True).to(torch.bfloat16)
    plan = uniform_plan(model, "w8c", head="w4g64a")
    assert str(plan.extra["lm_head"]) == "w4g64a"
    embed_before = model.get_input_embeddings().weight.detach().clone()
    apply_plan(model, plan, kernels=kernels)
    assert isinstance(model.lm_head, QuantLinear)
    emb = model.get_input_embeddings()
    assert isinstance(emb, QuantEmbedding) and str(emb.weight_format) == "w4g64a"
    ids = torch.arange(embed_before.shape[0])
    with torch.no_grad():
        rows = emb(ids).float()
    ref = get_weight_quantizer("rtn").quantize(embed_before.float(), parse_weight("w4g64a")).dequantize(torch.float32)
    torch.testing.assert_close(rows, ref.to(torch.bfloat16).float())
    fresh = make_random_lm("llama", tie_word_embeddings=True).to(torch.bfloat16)
    non_param = held_weight_bytes(fresh) - uniform_plan(fresh, "bf16").summary().weight_bytes  # rotary buffers
    s = model.bitplan_plan.summary()
    assert held_weight_bytes(model) - non_param == s.weight_bytes
    assert s.weight_bytes < uniform_plan(fresh, "w8c").summary().weight_bytes
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 256, (1, 8))).logits).all()


def test_a_sixteen_bit_head_keeps_the_tied_embedding(make_random_lm: Any) -> None:
    model = make_random_lm("llama", tie_word_embeddings=True).to(torch.bfloat16)
    plan = uniform_plan(model, "w8c", head="bf16")
    fresh = make_random_lm("llama", tie_word_embeddings=True).to(torch.bfloat16)
    non_param = held_weight_bytes(fresh) - uniform_plan(fresh, "bf16").summary().weight_bytes  # rotary buffers
    apply_plan(model, plan)
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)
    assert held_weight_bytes(model) - non_param == plan.summary().weight_bytes


def test_apply_refuses_a_second_plan_and_a_foreign_plan(make_random_lm: Any) -> None:
    model = make_random_lm("llama")
    other = make_random_lm("qwen2", hidden_size=128)
    with pytest.raises(BitplanError, match="another model"):
        apply_plan(model, uniform_plan(other, "w4g64a"))
    apply_plan(model, uniform_plan(model, "w4g64a"))
    with pytest.raises(BitplanError, match="already has a plan"):
        apply_plan(model, uniform_plan(make_random_lm("llama"), "w8c"))


def test_sixteen_bit_plan_changes_nothing(make_random_lm: Any) -> None:
    model = make_random_lm("gpt2")
    ref = copy.deepcopy(model)
    apply_plan(model, uniform_plan(model, "bf16"))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_public_api_is_lazy_and_complete() -> None:
    code = "import sys, bitplan; assert 'transformers' not in sys.modules and 'torch' not in sys.modules; print(len(bitplan.__all__))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for name in bitplan.__all__:
        assert getattr(bitplan, name) is not None
    assert set(bitplan.__all__) - {"__version__"} == set(bitplan._EXPORTS)
