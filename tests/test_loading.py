"""bitplan.loading: loading real and saved models, dtype names, and one-line errors for bad inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel, T5Config

from bitplan.errors import ModelError
from bitplan.graph import build_graph, model_fingerprint
from bitplan.loading import compute_dtype_for, has_fast_bf16, load_model, load_tokenizer, parse_dtype


def _error(*args: Any, **kwargs: Any) -> str:
    with pytest.raises(ModelError) as info:
        load_model(*args, local_files_only=True, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message and len(message) < 400
    return message


@pytest.mark.parametrize(
    ("name", "expected"),
    [("float32", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
     ("fp16", torch.float16), ("float16", torch.float16), ("auto", "auto"), ("torch.bfloat16", torch.bfloat16),
     (torch.float16, torch.float16)],
)  # fmt: skip
def test_parse_dtype(name: Any, expected: Any) -> None:
    assert parse_dtype(name) == expected


def test_parse_dtype_rejects() -> None:
    for bad in ("int8", "fp64", torch.int8):
        with pytest.raises(ModelError):
            parse_dtype(bad)


@pytest.mark.parametrize(("amx", "avx512_bf16", "fast"), [(False, False, False), (True, False, True), (False, True, True)])
def test_compute_dtype_is_bf16_only_where_native(monkeypatch: pytest.MonkeyPatch, amx: bool, avx512_bf16: bool, fast: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert has_fast_bf16("cpu") is fast
    assert compute_dtype_for("cpu") == (torch.bfloat16 if fast else torch.float32)
    assert not has_fast_bf16("meta")


def test_load_tiny(tiny_model_path: Path) -> None:
    model = load_model(tiny_model_path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32 and not model.training
    bf16 = load_model(str(tiny_model_path), "bf16")
    assert bf16.dtype == torch.bfloat16
    assert load_model(tiny_model_path, "auto").dtype == torch.float16  # as stored
    assert model_fingerprint(bf16) == model_fingerprint(model)
    with torch.no_grad():
        ids = torch.tensor([[1, 403, 407]])
        assert model(ids).logits.shape == (1, 3, 512)


def test_load_tokenizer(tiny_model_path: Path) -> None:
    tok = load_tokenizer(tiny_model_path)
    ids = tok("Once upon a time")["input_ids"]
    assert ids[0] == 1 and len(ids) > 2


def test_roundtrip_keeps_fingerprint(tmp_path: Path, make_random_lm: Any) -> None:
    model = make_random_lm("qwen2")
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, "bf16", local_files_only=True)
    assert build_graph(loaded).fingerprint == build_graph(model).fingerprint
    assert torch.equal(
        loaded.model.layers[1].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight.bfloat16()
    )


def test_bad_paths(tmp_path: Path, tiny_model_path: Path) -> None:
    assert "no such model directory" in _error(tmp_path / "missing" / "model")
    assert "no such model directory" in _error("./not/here/either")
    assert "config.json" in _error(tmp_path)  # a directory without config.json
    assert "is a file" in _error(tiny_model_path / "config.json")
    assert "empty" in _error("")


def test_hub_id_offline() -> None:
    message = _error("bitplan-test-org/no-such-model-for-tests")
    assert "bitplan-test-org/no-such-model-for-tests" in message


def test_encoder_and_encoder_decoder_dirs(tmp_path: Path) -> None:
    bert = tmp_path / "bert"
    BertModel(
        BertConfig(
            hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128, vocab_size=256
        )
    ).save_pretrained(bert)
    assert "encoder" in _error(
        bert
    )  # transformers itself would load it as BertLMHeadModel with a random head
    t5 = tmp_path / "t5"
    T5Config(d_model=64, d_ff=128, num_layers=1, num_heads=4, d_kv=16, vocab_size=256).save_pretrained(t5)
    assert "encoder-decoder" in _error(t5)


def test_missing_weights_and_broken_config(tmp_path: Path, make_random_lm: Any) -> None:
    make_random_lm("llama").config.save_pretrained(tmp_path / "noweights")
    assert "cannot load" in _error(tmp_path / "noweights")

    partial = tmp_path / "partial"
    make_random_lm("llama").save_pretrained(partial)
    state = load_file(partial / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, partial / "model.safetensors", metadata={"format": "pt"})
    message = _error(partial)
    assert "model.layers.1.mlp.down_proj.weight" in message and "random" in message

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert "config" in _error(broken)


@pytest.mark.shared_model
def test_main_model_graph(main_model_path: Path) -> None:
    model = load_model(main_model_path, "auto", local_files_only=True)
    assert model.dtype == torch.float16
    g = build_graph(model)
    assert (g.architecture, g.num_layers, g.hidden_size, g.vocab_size) == ("LlamaForCausalLM", 30, 576, 49152)
    assert (g.num_attention_heads, g.num_kv_heads, g.head_dim) == (9, 3, 64)
    assert g.tied_embeddings and g.total_params == 134_515_008
    assert (
        len(g.units()) == 30 * 4
        and g.unit_map()["layers.29.self_attn.qkv_proj"].out_features == 576 + 2 * 192
    )
