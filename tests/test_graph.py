"""bitplan.graph: decoder layers, linears, fused groups, units, accounting and fingerprints."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, T5Config, T5ForConditionalGeneration

from bitplan.errors import ModelError
from bitplan.graph import LinearInfo, ModelGraph, _fused_groups, build_graph, model_fingerprint, summarize

LLAMA_LINEARS = {
    "self_attn.q_proj": (64, 64),
    "self_attn.k_proj": (64, 32),
    "self_attn.v_proj": (64, 32),
    "self_attn.o_proj": (64, 64),
    "mlp.gate_proj": (64, 128),
    "mlp.up_proj": (64, 128),
    "mlp.down_proj": (128, 64),
}
LLAMA_FUSED = (
    ("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
)

# arch -> layers_path, linears {local: (in, out)}, fused groups, attention child, kv heads, embed, tied
EXPECTED: dict[str, dict[str, Any]] = {
    **{
        arch: dict(layers_path="model.layers", linears=LLAMA_LINEARS, fused=LLAMA_FUSED, attention="self_attn",
                   kv=2, embed="model.embed_tokens", tied=False, transposed=False, fused_units=4)
        for arch in ("llama", "qwen2", "mistral")
    },
    "gpt_neox": dict(
        layers_path="gpt_neox.layers",
        linears={"attention.query_key_value": (64, 192), "attention.dense": (64, 64),
                 "mlp.dense_h_to_4h": (64, 256), "mlp.dense_4h_to_h": (256, 64)},
        fused=(), attention="attention", kv=4, embed="gpt_neox.embed_in", tied=False, transposed=False, fused_units=4,
    ),
    "gpt2": dict(
        layers_path="transformer.h",
        linears={"attn.c_attn": (64, 192), "attn.c_proj": (64, 64), "mlp.c_fc": (64, 256), "mlp.c_proj": (256, 64)},
        fused=(), attention="attn", kv=4, embed="transformer.wte", tied=True, transposed=True, fused_units=4,
    ),
}  # fmt: skip
ARCHS = tuple(EXPECTED)


@pytest.fixture(scope="module")
def graphs(make_random_lm: Any) -> dict[str, tuple[nn.Module, ModelGraph]]:
    out = {}
    for arch in ARCHS:
        model = make_random_lm(arch)
        out[arch] = (model, build_graph(model))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_layers_and_linears(graphs: dict, arch: str) -> None:
    model, g = graphs[arch]
    exp = EXPECTED[arch]
    assert g.layers_path == exp["layers_path"]
    assert g.num_layers == 2 and [layer.index for layer in g.layers] == [0, 1]
    modules = dict(model.named_modules())
    for layer in g.layers:
        assert layer.path == f"{exp['layers_path']}.{layer.index}"
        assert {lin.local: (lin.in_features, lin.out_features) for lin in layer.linears} == exp["linears"]
        assert [lin.local for lin in layer.linears] == list(exp["linears"])  # module order
        for lin in layer.linears:
            assert lin.path == f"{layer.path}.{lin.local}"
            assert lin.transposed is exp["transposed"]
            weight = modules[lin.path].weight
            expected_shape = (
                (lin.in_features, lin.out_features) if lin.transposed else (lin.out_features, lin.in_features)
            )
            assert tuple(weight.shape) == expected_shape
        assert layer.attention == f"{layer.path}.{exp['attention']}"
        assert layer.fused_groups == exp["fused"]


@pytest.mark.parametrize("arch", ARCHS)
def test_units_at_both_granularities(graphs: dict, arch: str) -> None:
    _, g = graphs[arch]
    exp = EXPECTED[arch]
    n_lin = len(exp["linears"])
    tensor = g.units("tensor")
    fused = g.units("fused")
    assert len(tensor) == 2 * n_lin
    assert len(fused) == 2 * exp["fused_units"]
    assert g.units() == fused
    assert [u.name for u in tensor[:n_lin]] == [f"layers.0.{local}" for local in exp["linears"]]
    assert all(len(u.members) == 1 and not u.fused for u in tensor)
    # Both granularities cover every linear exactly once and the same weight count.
    for units in (tensor, fused):
        paths = [m.path for u in units for m in u.members]
        assert len(paths) == len(set(paths)) == 2 * n_lin
    assert sum(u.numel for u in tensor) == sum(u.numel for u in fused)
    assert [u.layer for u in fused] == [0] * exp["fused_units"] + [1] * exp["fused_units"]
    assert g.layer_units(1, "tensor") == tensor[n_lin:]
    assert set(g.unit_map("tensor")) == {u.name for u in tensor}
    with pytest.raises(ValueError):
        g.units("layer")  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_fused_units_llama_family(graphs: dict, arch: str) -> None:
    _, g = graphs[arch]
    units = g.unit_map()
    assert list(units)[:4] == [
        "layers.0.self_attn.qkv_proj", "layers.0.self_attn.o_proj", "layers.0.mlp.gate_up_proj", "layers.0.mlp.down_proj",
    ]  # fmt: skip
    qkv = units["layers.1.self_attn.qkv_proj"]
    assert [m.local for m in qkv.members] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    assert (qkv.layer, qkv.local, qkv.in_features, qkv.out_features) == (1, "self_attn.qkv_proj", 64, 128)
    assert qkv.numel == 64 * 128 and qkv.fused
    gate_up = units["layers.0.mlp.gate_up_proj"]
    assert (gate_up.in_features, gate_up.out_features) == (64, 256)
    assert units["layers.1.mlp.down_proj"].members[0].path == "model.layers.1.mlp.down_proj"


def test_prefix_independent_names(graphs: dict) -> None:
    assert "layers.1.mlp.c_proj" in graphs["gpt2"][1].unit_map()
    assert graphs["gpt2"][1].unit_map()["layers.1.mlp.c_proj"].members[0].path == "transformer.h.1.mlp.c_proj"
    assert "layers.1.attention.query_key_value" in graphs["gpt_neox"][1].unit_map()
    assert "layers.1.mlp.down_proj" in graphs["llama"][1].unit_map()


@pytest.mark.parametrize("arch", ARCHS)
def test_heads_and_head_dim(graphs: dict, arch: str) -> None:
    _, g = graphs[arch]
    assert (g.num_attention_heads, g.num_kv_heads, g.head_dim) == (4, EXPECTED[arch]["kv"], 16)
    assert (g.hidden_size, g.vocab_size) == (64, 256)
    assert g.model_type == arch
    assert g.architecture == type(graphs[arch][0]).__name__


def test_explicit_head_dim(make_random_lm: Any) -> None:
    g = build_graph(make_random_lm("llama", head_dim=32))
    assert g.head_dim == 32
    assert g.unit_map("tensor")["layers.0.self_attn.k_proj"].out_features == 2 * 32


@pytest.mark.parametrize("arch", ARCHS)
def test_lm_head_and_param_accounting(graphs: dict, arch: str) -> None:
    model, g = graphs[arch]
    exp = EXPECTED[arch]
    assert g.lm_head == LinearInfo("lm_head", "lm_head", 64, 256, False)
    assert g.embed_path == exp["embed"]
    assert g.tied_embeddings is exp["tied"]
    head = g.head_unit()
    assert head is not None and (head.name, head.layer, head.numel) == ("lm_head", None, 64 * 256)
    assert g.units(include_head=True)[-1] == head and "lm_head" in g.unit_map(include_head=True)
    assert "lm_head" not in g.unit_map()

    unique = {id(p): p for p in model.parameters()}
    assert g.total_params == sum(p.numel() for p in unique.values())
    counts = g.param_counts()
    assert counts["layer_units"] + counts["lm_head"] + counts["other"] == counts["total"] == g.total_params
    assert counts["layer_units"] == sum(u.numel for u in g.units())
    assert counts["lm_head"] == (0 if exp["tied"] else 64 * 256)
    # "other" computed independently: every parameter that is not a linear's weight in a layer or the head.
    unit_weights = {f"{m.path}.weight" for u in g.units() for m in u.members}
    if not g.tied_embeddings:
        unit_weights.add("lm_head.weight")
    assert counts["other"] == sum(p.numel() for n, p in model.named_parameters() if n not in unit_weights)


def test_tied_llama(make_random_lm: Any) -> None:
    model = make_random_lm("llama", tie_word_embeddings=True)
    g = build_graph(model)
    assert g.tied_embeddings and g.lm_head is not None
    assert g.param_counts()["lm_head"] == 0
    assert g.total_params == build_graph(make_random_lm("llama")).total_params - 64 * 256


def test_fingerprint_ignores_dtype_and_weights(graphs: dict, make_random_lm: Any) -> None:
    for arch in ARCHS:
        model, g = graphs[arch]
        assert len(g.fingerprint) == 16 and int(g.fingerprint, 16) >= 0
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        bf16.config.dtype = torch.bfloat16
        assert model_fingerprint(bf16) == g.fingerprint == model_fingerprint(model)
        assert model_fingerprint(make_random_lm(arch, seed=1)) == g.fingerprint  # same network, other weights


def test_fingerprint_differs_across_configs(graphs: dict, make_random_lm: Any) -> None:
    prints = {g.fingerprint for _, g in graphs.values()}
    assert len(prints) == len(ARCHS)
    base = graphs["llama"][1].fingerprint
    for overrides in (
        {"num_hidden_layers": 3},
        {"hidden_size": 128},
        {"vocab_size": 512},
        {"num_key_value_heads": 4},
        {"rms_norm_eps": 1e-5},
        {"tie_word_embeddings": True},
    ):
        assert model_fingerprint(make_random_lm("llama", **overrides)) != base, overrides


def test_describe(graphs: dict) -> None:
    text = graphs["llama"][1].describe()
    assert text == summarize(graphs["llama"][1])
    for needle in (
        "LlamaForCausalLM",
        "model.layers",
        "4 heads, 2 kv heads",
        "head_dim 16",
        "self_attn.qkv_proj",
        "layers 0-1",
        "lm_head",
        f"{graphs['llama'][1].total_params:,} total",
    ):
        assert needle in text, needle
    assert "tied to transformer.wte" in graphs["gpt2"][1].describe()
    assert "Conv1D" in graphs["gpt2"][1].describe()
    assert "self_attn.q_proj" in graphs["llama"][1].describe("tensor")


def test_fused_groups_need_all_members_with_equal_inputs() -> None:
    def lin(local: str, fin: int = 64, fout: int = 64) -> LinearInfo:
        return LinearInfo(f"m.{local}", local, fin, fout, False)

    assert _fused_groups((lin("attn.q_proj"), lin("attn.k_proj"))) == ()  # no v_proj
    assert _fused_groups((lin("a.q_proj"), lin("b.k_proj"), lin("a.v_proj"))) == ()  # different parents
    assert _fused_groups((lin("mlp.gate_proj"), lin("mlp.up_proj", fin=32))) == ()  # different in_features
    assert _fused_groups((lin("mlp.up_proj"), lin("mlp.gate_proj"))) == (
        ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
    )


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mixer = nn.Module()
        self.mixer.q_proj, self.mixer.k_proj, self.mixer.v_proj = (
            nn.Linear(8, 8),
            nn.Linear(8, 4),
            nn.Linear(8, 4),
        )
        self.ffn = nn.Linear(8, 8)


class _CustomLM(nn.Module):
    """A non-HF layout: layers under backbone.blocks, plus a decoy ModuleList of another length."""

    def __init__(self, config: Any, n: int) -> None:
        super().__init__()
        self.config = config
        self.adapters = nn.ModuleList([nn.Sequential(nn.Linear(8, 8)) for _ in range(n + 1)])
        self.backbone = nn.Module()
        self.backbone.blocks = nn.ModuleList([_Block() for _ in range(n)])


def test_structural_layer_discovery() -> None:
    config = LlamaConfig(
        hidden_size=8, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, vocab_size=16
    )
    g = build_graph(_CustomLM(config, 3))
    assert g.layers_path == "backbone.blocks" and g.num_layers == 3
    assert g.layers[2].attention == "backbone.blocks.2.mixer"
    assert [u.name for u in g.layer_units(0)] == ["layers.0.mixer.qkv_proj", "layers.0.ffn"]
    assert g.lm_head is None and g.head_unit() is None and g.embed_path is None
    assert (g.num_kv_heads, g.head_dim) == (1, 4)


def _model_error(fn: Any, *args: Any) -> str:
    with pytest.raises(ModelError) as info:
        fn(*args)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_rejects_encoders_and_non_lms() -> None:
    bert = BertModel(
        BertConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=256
        )
    )
    assert "encoder" in _model_error(build_graph, bert)
    t5 = T5ForConditionalGeneration(
        T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=256)
    )
    assert "encoder-decoder" in _model_error(build_graph, t5)
    assert "config" in _model_error(build_graph, nn.Linear(4, 4))
    no_layers = nn.Module()
    no_layers.config = LlamaConfig(num_hidden_layers=2)
    assert "decoder layers" in _model_error(build_graph, no_layers)


def test_tiny_real_model(tiny_model_path: Any) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    g = build_graph(model)
    assert (g.architecture, g.layers_path, g.num_layers) == ("LlamaForCausalLM", "model.layers", 5)
    assert (g.num_attention_heads, g.num_kv_heads, g.head_dim, g.hidden_size, g.vocab_size) == (
        8,
        4,
        8,
        64,
        512,
    )
    assert g.tied_embeddings and g.total_params == 260_032
    units = g.unit_map()
    assert len(units) == 5 * 4 and len(g.units("tensor")) == 5 * 7
    assert (units["layers.4.mlp.gate_up_proj"].out_features, units["layers.4.mlp.down_proj"].in_features) == (
        344,
        172,
    )
    assert model_fingerprint(model.to(torch.bfloat16)) == g.fingerprint
