"""Mixed-precision KV cache: flush rule, exact byte accounting, batch/beam ops, generate() integration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import Cache, DynamicLayer

from bitplan.errors import FormatError
from bitplan.formats import KVFormat, parse_kv
from bitplan.kvcache import (
    MixedKVLayer,
    MixedPrecisionKVCache,
    cache_for,
    install_kv_plan,
    kv_cache_for,
    kv_geometry,
    uninstall_kv_plan,
)
from bitplan.loading import cache_kwarg
from bitplan.quantizers.kv import fake_quantize_kv

STORIES = Path(__file__).resolve().parents[1].parent / "shared/models/stories260k"
H, D = 2, 16  # kv heads, head_dim of the tiny model


def _tiny(head_dim: int = D) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=H,
        head_dim=head_dim,
        vocab_size=128,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return _tiny()


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(3, 128, (2, 48), generator=torch.Generator().manual_seed(1))


def _gen(model: LlamaForCausalLM, ids: torch.Tensor, **kw: object) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, **kw)  # type: ignore[return-value]


def _kv(
    t: int, b: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, H, t, D, generator=g).to(dtype), torch.randn(b, H, t, D, generator=g).to(dtype)


# -- one layer ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fmt", ["k4v2", "k2v2g8r8", "k4tv4g8", "k16v4g8r3", "k8v16g16r5", "k4v3s1", "k2v2g8r8s4", "k16v4g8s3", "k3v3s50"]
)
def test_layer_flush_rule_and_returned_states(fmt: str) -> None:
    f = parse_kv(fmt)
    layer = MixedKVLayer(f)
    per_channel = any(b < 16 and ax == "channel" for b, ax in (f.side("k"), f.side("v")))
    unit = f.group_size if per_channel else 1
    k_all, v_all = _kv(101, seed=3)
    seen = 0
    for n in (7, 1, 1, 30, 1, 2, 40, 1, 1, 17):
        stored_before = layer.stored_tokens
        past_k = layer._k.read(torch.float32) if layer._k is not None else None  # noqa: SLF001
        k, v = layer.update(k_all[:, :, seen : seen + n], v_all[:, :, seen : seen + n])
        seen += n
        assert k.shape == v.shape == (2, H, seen, D) and layer.get_seq_length() == seen
        # the sinks, the tokens of this call and the residual come back exact; the packed ones (tokens
        # [sink, sink + stored)) through storage, in sequence order
        s, end = min(f.sink, seen), min(f.sink, seen) + stored_before
        assert k[:, :, :s].equal(k_all[:, :, :s]) and v[:, :, :s].equal(v_all[:, :, :s])
        assert k[:, :, end:].equal(k_all[:, :, end:seen])
        assert v[:, :, end:].equal(v_all[:, :, end:seen])
        if past_k is not None:
            assert k[:, :, s:end].equal(past_k)
        expect_stored = max(0, seen - f.sink - f.recent) // unit * unit
        assert (layer.stored_tokens, layer.residual_tokens) == (expect_stored, seen - expect_stored)
    assert layer.get_mask_sizes(3) == (seen + 3, 0) and layer.get_max_length() == -1


def test_layer_storage_is_kivi_quantized() -> None:
    layer = MixedKVLayer("k4v2g8")
    k, v = _kv(32)
    layer.update(k, v)  # all 32 tokens flushed (4 whole groups of 8)
    k2, v2 = layer.update(*_kv(1, seed=9))
    assert k2[:, :, :32].equal(fake_quantize_kv(k, 4, "channel", 8))
    assert v2[:, :, :32].equal(fake_quantize_kv(v, 2, "token", 8))


def test_sink_tokens_stay_exact_and_groups_align_after_them() -> None:
    layer = MixedKVLayer("k4v2g8s3")
    k, v = _kv(3 + 16)
    layer.update(k, v)  # 3 sinks kept, 16 tokens = 2 whole K groups flushed
    assert (layer.stored_tokens, layer.residual_tokens) == (16, 3)
    plain = MixedKVLayer("k4v2g8")  # 19 tokens: 16 packed + 3 residual, the same bytes as 3 sinks + 16 packed
    plain.update(k, v)
    assert layer.nbytes == plain.nbytes
    k2, v2 = layer.update(*_kv(1, seed=9))
    assert k2[:, :, :3].equal(k[:, :, :3]) and v2[:, :, :3].equal(v[:, :, :3])
    assert k2[:, :, 3:19].equal(fake_quantize_kv(k[:, :, 3:], 4, "channel", 8))
    assert v2[:, :, 3:19].equal(fake_quantize_kv(v[:, :, 3:], 2, "token", 8))


def test_crop_with_sinks_round_trips_the_sequence() -> None:
    for keep in (0, 2, 3, 9, 20, 30):
        layer = MixedKVLayer("k8v8g8s3")
        k, v = _kv(31)
        layer.update(k, v)
        layer.crop(keep - 31)
        assert layer.get_seq_length() == keep
        k2, _ = layer.update(*_kv(1, seed=4))
        assert k2.shape[2] == keep + 1
        assert k2[:, :, : min(keep, 3)].equal(k[:, :, : min(keep, 3)])  # sinks survive any crop
        assert keep == 0 or (k2[:, :, :keep] - k[:, :, :keep]).abs().max() < 0.05  # the rest at 8-bit error


def test_sixteen_bit_side_is_never_quantized() -> None:
    layer = MixedKVLayer("k16v2g8")
    k, v = _kv(24)
    layer.update(k, v)
    k2, v2 = layer.update(*_kv(1, seed=9))
    assert layer.stored_tokens == 25  # per-token V: flush unit 1
    assert k2[:, :, :24].equal(k) and not v2[:, :, :24].equal(v)


def test_layer_nbytes_exact_fp16() -> None:
    for fmt in ("k4v2g8", "k16v4g8r3", "k3tv8g16", "k2v2r5"):
        f = parse_kv(fmt)
        layer = MixedKVLayer(f)
        k, v = _kv(77, b=3, dtype=torch.float16)
        layer.update(k[:, :, :50], v[:, :, :50])
        for i in range(50, 77):
            out_k, _ = layer.update(k[:, :, i : i + 1], v[:, :, i : i + 1])
            assert out_k.dtype == torch.float16
        residual = 3 * H * D * 2 * 2 * layer.residual_tokens  # K and V, fp16
        assert layer.nbytes == 3 * f.bytes_per_token(H, D) * layer.stored_tokens + residual, fmt
        assert layer.stored_tokens > 0 and layer.stored_tokens + layer.residual_tokens == 77


def test_layer_batch_ops_are_exact() -> None:
    k, v = _kv(45, b=3, seed=4)
    idx = torch.tensor([2, 0, 0])
    a, b = MixedKVLayer("k2v2g8r4"), MixedKVLayer("k2v2g8r4")
    a.update(k, v)
    a.reorder_cache(idx)
    b.update(k[idx], v[idx])
    nk, nv = _kv(1, b=3, seed=5)
    ka, va = a.update(nk, nv)
    kb, vb = b.update(nk, nv)
    assert ka.equal(kb) and va.equal(vb)
    a.batch_select_indices(torch.tensor([1]))
    a.batch_repeat_interleave(2)
    ka2, _ = a.update(nk[:1].repeat(2, 1, 1, 1), nv[:1].repeat(2, 1, 1, 1))
    assert ka2.shape == (2, H, 47, D) and ka2[0].equal(ka2[1]) and ka2[0, :, :46].equal(ka[1])


def test_layer_crop_and_reset() -> None:
    k, v = _kv(40)
    layer = MixedKVLayer("k4v4g8")
    layer.update(k, v[:, :, :40])  # 40 stored, 0 residual
    layer.update(k[:, :, :3], v[:, :, :3])  # + 3 residual
    layer.crop(-2)  # inside the residual: exact
    assert (layer.stored_tokens, layer.residual_tokens) == (40, 1)
    layer.crop(-5)  # into storage: groups from the last boundary come back dequantized
    assert (layer.stored_tokens, layer.residual_tokens, layer.get_seq_length()) == (32, 4, 36)
    out, _ = layer.update(*_kv(1, seed=7))
    assert out.shape[2] == 37 and out[:, :, :36].sub(k[:, :, :36]).abs().max() < 0.5
    layer.crop(0)
    with pytest.raises(ValueError, match="negative"):
        layer.crop(3)
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.nbytes == 0 and not layer.is_initialized


# -- the model-level cache -----------------------------------------------------------------------------
def _chunked_logits(model: LlamaForCausalLM, ids: torch.Tensor, cache: Cache) -> torch.Tensor:
    """Prefill 20 tokens, then decode the rest one token at a time through ``cache``."""
    with torch.no_grad():
        out = [model(ids[:, :20], use_cache=True, **{cache_kwarg(model): cache}).logits]
        out += [
            model(ids[:, i : i + 1], use_cache=True, **{cache_kwarg(model): cache}).logits
            for i in range(20, ids.shape[1])
        ]
    return torch.cat(out, 1)


def test_k16v16_identical_to_dynamic_cache(model: LlamaForCausalLM, ids: torch.Tensor) -> None:
    ref = _chunked_logits(model, ids, DynamicCache())
    assert _chunked_logits(model, ids, kv_cache_for(model, ["k16v16"] * 2)).equal(ref)
    # MixedKVLayer's raw-storage path
    raw = Cache(layers=[MixedKVLayer("k16v16g8"), MixedKVLayer("k16v16r3")])
    assert _chunked_logits(model, ids, raw).equal(ref)
    plain = _gen(model, ids[:, :10], max_new_tokens=20, do_sample=False)
    install_kv_plan(model, ["k16v16", "k16v16"])
    try:
        assert cache_for(model) is None
        assert _gen(model, ids[:, :10], max_new_tokens=20, do_sample=False).equal(plain)
        # beam search through the raw MixedKVLayer path reorders exactly like DynamicCache
        beams_ref = _gen(model, ids[:, :10], max_new_tokens=12, num_beams=3, do_sample=False)
        raw = Cache(layers=[MixedKVLayer("k16v16g8"), MixedKVLayer("k16v16g8r2")])
        beams = _gen(model, ids[:, :10], max_new_tokens=12, num_beams=3, do_sample=False, **{cache_kwarg(model): raw})
        assert beams.equal(beams_ref)
    finally:
        uninstall_kv_plan(model)


def test_quantized_logits_bounded_and_monotone(model: LlamaForCausalLM, ids: torch.Tensor) -> None:
    errs = []
    with torch.no_grad():
        ref = model(ids).logits
        for fmt in ("k8v8g8", "k4v4g8", "k2v2g8"):
            cache = kv_cache_for(model, [fmt, fmt])
            first = model(ids[:, :32], use_cache=True, **{cache_kwarg(model): cache}).logits
            assert first.equal(ref[:, :32])  # a window's own tokens attend to each other exactly
            second = model(ids[:, 32:], use_cache=True, **{cache_kwarg(model): cache}).logits
            errs.append((second - ref[:, 32:]).abs().max().item())
    assert errs[0] < 5e-3 and 0 < errs[0] < errs[1] < errs[2], errs


def test_generate_uses_installed_plan(model: LlamaForCausalLM, ids: torch.Tensor) -> None:
    prompt = ids[:, :16]
    ref = _gen(model, prompt, max_new_tokens=24, do_sample=False)
    install_kv_plan(model, ["k8v8g8", "k8v8g8"])
    try:
        out = _gen(model, prompt, max_new_tokens=24, do_sample=False, return_dict_in_generate=True)
        cache = out.past_key_values
        assert isinstance(cache, MixedPrecisionKVCache) and cache.stored_tokens() == [32, 32]
        assert out.sequences.equal(ref)  # 8-bit K/V does not change a short greedy continuation
        # an explicit cache is left alone
        own = _gen(
            model, prompt, max_new_tokens=4, return_dict_in_generate=True, **{cache_kwarg(model): DynamicCache()}
        )
        assert type(own.past_key_values) is DynamicCache
    finally:
        uninstall_kv_plan(model)
    assert "_prepare_cache_for_generation" not in vars(model) and not hasattr(model, "bitplan_kv_formats")
    again = _gen(model, prompt, max_new_tokens=4, return_dict_in_generate=True)
    assert type(again.past_key_values) is DynamicCache


def test_mixed_formats_beam_search_and_sampling(model: LlamaForCausalLM, ids: torch.Tensor) -> None:
    install_kv_plan(model, [KVFormat(8, 4), parse_kv("k2v2r8")])
    try:
        prompt = ids[:, :12]
        greedy = _gen(model, prompt, max_new_tokens=30, do_sample=False, return_dict_in_generate=True)
        assert greedy.sequences.shape == (2, 42)
        assert repr(greedy.past_key_values) == "MixedPrecisionKVCache(k8v4, k2v2r8)"
        assert greedy.past_key_values.stored_tokens() == [32, 32]
        beams = _gen(model, prompt, max_new_tokens=25, num_beams=3, num_return_sequences=2, do_sample=False)
        assert beams.shape == (4, 37)
        torch.manual_seed(0)
        sampled = _gen(model, prompt, max_new_tokens=25, do_sample=True, top_k=20, num_return_sequences=3)
        assert sampled.shape == (6, 37)
    finally:
        uninstall_kv_plan(model)


def test_cache_nbytes_matches_formats(model: LlamaForCausalLM, ids: torch.Tensor) -> None:
    fmts = [parse_kv("k4v2g8"), parse_kv("k2v2g8r8")]
    cache = kv_cache_for(model, fmts)
    with torch.no_grad():
        model(ids[:, :21], use_cache=True, **{cache_kwarg(model): cache})
        for i in range(21, 31):
            model(ids[:, i : i + 1], use_cache=True, **{cache_kwarg(model): cache})
    assert cache.stored_tokens() == [24, 16] and cache.get_seq_length() == 31
    b = ids.shape[0]
    expected = 0.0
    for f, layer in zip(fmts, cache.layers, strict=True):
        assert isinstance(layer, MixedKVLayer)
        expected += b * f.bytes_per_token(H, D) * layer.stored_tokens
        expected += b * H * D * 2 * 4 * layer.residual_tokens  # fp32 residual K and V
    assert cache.nbytes == expected
    assert cache.quantized_bytes_per_token(H, D) == sum(f.bytes_per_token(H, D) for f in fmts)


def test_cache_for_and_plan_objects(model: LlamaForCausalLM) -> None:
    assert cache_for(model) is None
    install_kv_plan(model, ["k4v4", "k16v16"])
    try:
        a, b = cache_for(model), cache_for(model)
        assert isinstance(a, MixedPrecisionKVCache) and a is not b
        assert isinstance(a.layers[0], MixedKVLayer) and type(a.layers[1]) is DynamicLayer
    finally:
        uninstall_kv_plan(model)

    class Plan:
        def kv_formats(self) -> list[KVFormat]:
            return [KVFormat(2, 2), KVFormat(8, 8)]

    assert kv_cache_for(model, Plan()).formats == (KVFormat(2, 2), KVFormat(8, 8))
    assert kv_geometry(model) == (2, H, D)


def test_validation_errors(model: LlamaForCausalLM) -> None:
    with pytest.raises(FormatError, match="3 formats but the model has 2"):
        install_kv_plan(model, ["k4v4"] * 3)
    with pytest.raises(FormatError, match="1 formats"):
        kv_cache_for(model, ["k4v4"])
    assert not hasattr(model, "bitplan_kv_formats")
    odd = _tiny(head_dim=24)  # per-token group 16 does not divide head_dim 24
    with pytest.raises(FormatError, match="layer 1: .*does not divide head_dim 24"):
        install_kv_plan(odd, ["k4v4g8", "k4v4g16"])
    with pytest.raises(FormatError, match="KV format"):
        kv_cache_for(model, ["w4g64", "k4v4"])


# -- the real tiny model ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stories() -> tuple[torch.nn.Module, torch.Tensor]:
    if not (STORIES / "config.json").is_file():
        pytest.skip(f"needs {STORIES} (the shared stories260k model is absent)")
    m = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    prompt = AutoTokenizer.from_pretrained(STORIES)("Once upon a time", return_tensors="pt").input_ids
    return m, prompt


@pytest.mark.shared_model
def test_stories_k8v8_greedy_matches(stories: tuple[torch.nn.Module, torch.Tensor]) -> None:
    m, prompt = stories
    ref = m.generate(prompt, max_new_tokens=20, do_sample=False)
    n_layers = kv_geometry(m)[0]
    for fmt in ("k8v8", "k8v8g8"):  # g8: most of the 25 tokens really are read back quantized
        install_kv_plan(m, [fmt] * n_layers)
        try:
            out = m.generate(prompt, max_new_tokens=20, do_sample=False, return_dict_in_generate=True)
        finally:
            uninstall_kv_plan(m)
        assert out.sequences.equal(ref), fmt
    assert out.past_key_values.stored_tokens()[0] == 24


@pytest.mark.shared_model
def test_stories_first_token_kl_monotone_in_bits(stories: tuple[torch.nn.Module, torch.Tensor]) -> None:
    m, prompt = stories
    ctx = m.generate(prompt, max_new_tokens=60, do_sample=False)[:, :65]  # 64 tokens of past + 1
    n_layers = kv_geometry(m)[0]
    with torch.no_grad():
        ref = m(ctx).logits[0, -1].log_softmax(-1)
        kls = []
        for bits in (8, 4, 2):
            cache = kv_cache_for(m, [KVFormat(bits, bits)] * n_layers)
            m(ctx[:, :64], use_cache=True, **{cache_kwarg(m): cache})  # two whole groups of 32: all quantized
            assert cache.stored_tokens() == [64] * n_layers
            lp = m(ctx[:, 64:], use_cache=True, **{cache_kwarg(m): cache}).logits[0, -1].log_softmax(-1)
            kls.append(float((ref.exp() * (ref - lp)).sum()))
    assert 0 < kls[0] < kls[1] < kls[2], kls
    assert kls[0] < 1e-4 and kls[2] > 10 * kls[1], kls
