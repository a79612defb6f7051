"""Scale migration folded into the op before (AWQ's scale search, SmoothQuant) in the layer-wise pass."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

import bitplan
from bitplan._smooth import fold, input_groups
from bitplan.errors import BitplanError
from bitplan.graph import build_graph
from bitplan.quantizers import QuantLinear

from .test_layerwise import _kl, _tokens


def _loud(model: Any, seed: int = 0) -> Any:
    """Real LLMs have a few loud hidden channels; give the random model some (in the norms' weights)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                idx = torch.randperm(p.numel(), generator=g)[:4]
                p[idx] *= 12.0
    return model


def test_input_groups_of_a_llama_layer(make_random_lm: Callable[..., Any]) -> None:
    gqa = make_random_lm("llama")  # 4 query heads, 2 value heads
    groups = {g.consumers: g for g in input_groups(gqa, build_graph(gqa), 0)}
    pre = "model.layers.0"
    qkv = tuple(f"{pre}.self_attn.{n}_proj" for n in "qkv")
    assert groups[qkv].producer == f"{pre}.input_layernorm" and groups[qkv].producer_kind == "norm"
    assert groups[(f"{pre}.mlp.gate_proj", f"{pre}.mlp.up_proj")].producer == f"{pre}.post_attention_layernorm"
    assert groups[(f"{pre}.mlp.down_proj",)].producer == f"{pre}.mlp.up_proj"
    o = groups[(f"{pre}.self_attn.o_proj",)]
    assert o.producer is None and "one-to-one" in o.why_not  # one value row feeds two heads' columns
    mha = make_random_lm("llama", num_key_value_heads=4)
    o = {g.consumers: g for g in input_groups(mha, build_graph(mha), 1)}[("model.layers.1.self_attn.o_proj",)]
    assert o.producer == "model.layers.1.self_attn.v_proj"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
def test_folding_any_scale_keeps_the_float_model(arch: str, make_random_lm: Callable[..., Any]) -> None:
    model = make_random_lm(arch, **({"num_key_value_heads": 4} if arch != "gpt_neox" else {}))
    ids = _tokens(model, 2, 5)
    before = model(ids).logits
    graph = build_graph(model)
    g = torch.Generator().manual_seed(1)
    folded = 0
    for i in range(graph.num_layers):
        for grp in input_groups(model, graph, i):
            if grp.producer is not None:
                n = model.get_submodule(grp.consumers[0]).weight.shape[1]
                fold(model, grp, torch.rand(n, generator=g) * 4 + 0.25)
                folded += 1
    assert folded >= 2 * graph.num_layers
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)


def _apply(model: Any, fmt: str, method: str, calib: torch.Tensor, acts: str = "a16") -> Any:
    plan = bitplan.uniform_plan(model, fmt, acts, method=method)
    return bitplan.apply_plan(copy.deepcopy(model), plan, kernels="reference", calib=calib)


def test_awq_beats_rtn_with_loud_channels(make_random_lm: Callable[..., Any]) -> None:
    model = _loud(make_random_lm("llama"))
    calib, held_out = _tokens(model, 8, 0), _tokens(model, 4, 1)
    awq = _apply(model, "w3g32a", "awq", calib)
    rtn = _apply(model, "w3g32a", "rtn", calib)
    assert {m.method for m in awq.modules() if isinstance(m, QuantLinear)} == {"awq"}
    ours, base = _kl(model, awq, held_out), _kl(model, rtn, held_out)
    assert ours < 0.8 * base, (ours, base)


def test_smoothquant_w8a8_beats_plain_w8a8_with_loud_channels(make_random_lm: Callable[..., Any]) -> None:
    model = _loud(make_random_lm("llama", num_key_value_heads=4))
    calib, held_out = _tokens(model, 8, 0), _tokens(model, 4, 1)
    sq = _apply(model, "w8c", "smoothquant", calib, "a8t")
    rtn = _apply(model, "w8c", "rtn", calib, "a8t")
    ours, base = _kl(model, sq, held_out), _kl(model, rtn, held_out)
    assert ours < 0.8 * base, (ours, base)


def test_architectures_without_foldable_inputs_still_quantize(make_random_lm: Callable[..., Any]) -> None:
    model = make_random_lm("gpt2")  # Conv1D, ln_1 / ln_2: no known fold; AWQ is then clipping only
    q = _apply(model, "w4g16a", "awq", _tokens(model, 2, 0))
    assert all(m.method == "awq" for m in q.modules() if isinstance(m, QuantLinear))
    assert _kl(model, q, _tokens(model, 2, 1)) < 0.5


def test_awq_and_smoothquant_on_one_input_is_an_error(make_random_lm: Callable[..., Any]) -> None:
    model = make_random_lm("llama")
    plan = bitplan.uniform_plan(model, "w8c", "a8t", method="smoothquant", granularity="tensor")
    first = plan.layers[0]
    unit = "self_attn.q_proj"
    choice = type(first.weights[unit])(first.weights[unit].format, "awq")
    layer = type(first)(first.index, {**first.weights, unit: choice}, first.acts, first.kv)
    mixed = plan.__class__(plan.model, (layer, *plan.layers[1:]), plan.shapes, plan.granularity, plan.extra, plan.metadata)
    with pytest.raises(BitplanError, match="awq and smoothquant units read the same input"):
        bitplan.apply_plan(copy.deepcopy(model), mixed, kernels="reference", calib=_tokens(model, 2, 0))
