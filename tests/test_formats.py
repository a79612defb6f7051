"""Format strings: canonical round trip, strict parsing, exact storage accounting."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bitplan.errors import FormatError
from bitplan.formats import (
    ActFormat,
    KVFormat,
    WeightFormat,
    parse,
    parse_act,
    parse_kv,
    parse_weight,
)

REQUIRED = ["w4g32ad6", "w4g32ad8", "w3g64d6", "nf4g64d8", "bf16", "w8g128a", "w8c", "w4g128a", "w4g32a", "w3g128a", "w3g32a", "w2g64a", "nf4g64", "a16", "a8t", "k16v16", "k8v8", "k4v2", "k2v2g32"]

groups = st.integers(1, 64).map(lambda k: 8 * k)
int_weights = st.builds(WeightFormat, st.just("int"), st.integers(2, 8), st.one_of(st.none(), groups), st.booleans())
nf4_weights = st.builds(WeightFormat, st.just("nf4"), st.just(4), st.one_of(st.none(), groups))
float_weights = st.sampled_from([WeightFormat("float", 16, float_dtype="bf16"), WeightFormat("float", 16, float_dtype="fp16"), WeightFormat("fp8", 8)])
dq_weights = st.builds(
    WeightFormat, st.sampled_from(["int", "nf4"]), st.just(4), st.sampled_from([8, 16, 32, 64, 128, 256]), st.just(True),
    st.just("bf16"), st.sampled_from([6, 8]),
)
weights = st.one_of(int_weights, nf4_weights, float_weights, dq_weights)
acts = st.sampled_from([ActFormat(), ActFormat("int", 8), ActFormat("int", 4), ActFormat("fp8", 8)])
kvs = st.builds(
    KVFormat,
    st.sampled_from([2, 3, 4, 8, 16]),
    st.sampled_from([2, 3, 4, 8, 16]),
    groups,
    st.sampled_from(["channel", "token"]),
    st.sampled_from(["channel", "token"]),
    st.integers(0, 512),
)


@given(st.one_of(weights, acts, kvs))
def test_parse_str_round_trip(fmt: WeightFormat | ActFormat | KVFormat) -> None:
    text = str(fmt)
    assert parse(text) == fmt
    assert type(fmt).parse(text) == fmt
    assert hash(parse(text)) == hash(fmt)


@pytest.mark.parametrize("text", REQUIRED)
def test_required_strings_parse_canonically(text: str) -> None:
    expected = text.removesuffix("g32") if text.startswith("k") else text  # g32 is the KV default
    assert str(parse(text)) == expected


def test_letters_mean_what_they_suggest() -> None:
    w = parse_weight("w4g128a")
    assert (w.kind, w.bits, w.group_size, w.symmetric) == ("int", 4, 128, False)
    c = parse_weight("w8c")
    assert (c.bits, c.group_size, c.symmetric) == (8, None, True)
    assert parse_weight("nf4g64").kind == "nf4" and parse_weight("nf4g64").group_size == 64
    assert not parse_weight("bf16").is_quantized
    assert parse_act("a8t") == ActFormat("int", 8) and not parse_act("a16").is_quantized
    kv = parse_kv("k4v2")
    assert (kv.k_bits, kv.v_bits, kv.k_axis, kv.v_axis, kv.recent) == (4, 2, "channel", "token", 0)
    assert not parse_kv("k16v16").is_quantized
    assert parse_kv("k2v2g32") == parse_kv("k2v2")  # 32 is the documented default group
    assert parse_kv("k4v2r128").recent == 128
    sink = parse_kv("k4v2r128s4")
    assert (sink.recent, sink.sink, str(sink)) == (128, 4, "k4v2r128s4") and str(parse_kv("k3v3s1")) == "k3v3s1"


def test_kv_sink_bytes() -> None:
    f, plain, ref = parse_kv("k4v2s4"), parse_kv("k4v2"), parse_kv("k16v16")
    nkv, hd = 3, 64
    assert f.bytes_per_token(nkv, hd) == plain.bytes_per_token(nkv, hd)  # sinks do not change the rate
    surplus = ref.bytes_per_token(nkv, hd) - plain.bytes_per_token(nkv, hd)
    assert f.fixed_bytes(nkv, hd) == 4 * surplus and plain.fixed_bytes(nkv, hd) == 0
    assert f.bytes_for(nkv, hd, 100) == 100 * plain.bytes_per_token(nkv, hd) + 4 * surplus
    assert f.bytes_for(nkv, hd, 2) == 2 * ref.bytes_per_token(nkv, hd)  # a 2-token sequence is all sink
    assert parse_kv("k16v16s4").fixed_bytes(nkv, hd) == 0


@pytest.mark.parametrize(
    "text",
    ["", "w4", "w9g64", "w1g64", "w4g60", "w4g0", "W4g64", " w4g64", "w4g64a ", "w4g64b", "nf4g64a", "nf3g64", "fp8g64", "bf32",
     "a8", "a32", "a8c", "k5v2", "k4", "v4k4", "k4v2g4", "k4v2r-1", "k4v2s", "k4v2s1r8", "k4v2s-1", "k04v2", "w04g64", "k4v2x",
     "w4cd8", "w4cad6", "w4g32ad7", "w4g32ad06", "w4g32da8", "w4g48d6", "fp8d8", "nf4cd8", "w4g32ad", "w4g32ad16"],
)
def test_bad_strings_fail_with_the_grammar(text: str) -> None:
    with pytest.raises(FormatError) as e:
        parse(text)
    msg = str(e.value)
    assert "expected" in msg and "\n" not in msg and repr(text) in msg


def test_storage_bits_are_exact() -> None:
    # 4 bits + (16-bit scale + 16-bit offset) / 64
    assert parse_weight("w4g64a").storage_bits(10, 128) == 10 * 128 * 4 + 10 * 2 * 32
    assert parse_weight("w4g64a").bits_per_weight(576) == 4.5
    assert parse_weight("w4g64").bits_per_weight(576) == 4.25
    assert parse_weight("w8c").storage_bits(3, 576) == 3 * 576 * 8 + 3 * 16
    assert parse_weight("nf4g64").bits_per_weight(128) == 4.25
    assert parse_weight("fp8").storage_bits(4, 64) == 4 * 64 * 8 + 4 * 16
    assert parse_weight("bf16").storage_bits(7, 9) == 7 * 9 * 16
    assert parse_weight("w3g32a").bits_per_weight(64) == 4.0
    # double-quantized: per row, S-bit codes (padded to 8 codes) + one fp16 super-scale (and one for offsets)
    # per super-block; d6 = 256 weights per super-block (Q4_K's 4.5 bits), d8 = 256 groups
    assert parse_weight("w4g32ad6").bits_per_weight(1536) == 4.5
    assert parse_weight("w4g32ad6").storage_bits(3, 576) == 3 * (576 * 4 + 6 * 40 + 3 * 2 * 16)  # 36 codes pad to 40
    assert parse_weight("w4g32ad8").storage_bits(5, 576) == 5 * (576 * 4 + 8 * 36 + 2 * 16)
    assert parse_weight("w4g32ad8").bits_per_weight(8192) == 4 + 16 / 32 + 32 / 8192
    assert parse_weight("w4g32ad8").bits_per_weight(16384) == 4 + 16 / 32 + 64 / 16384  # 512 groups: 2 super-blocks
    assert parse_weight("nf4g64d8").storage_bits(2, 64 * 256) == 2 * (64 * 256 * 4 + 8 * 256 + 16)  # QLoRA
    assert parse_weight("w3g64d6").compute_format == parse_weight("w3g64")
    # KV: K per-channel groups 32 tokens, V per-token groups min(32, head_dim) channels
    kv = parse_kv("k4v2")
    assert kv.bits_per_element("k", 64) == 4 + 32 / 32
    assert kv.bits_per_element("v", 8) == 2 + 32 / 8
    assert kv.bytes_per_token(3, 64) == 3 * 64 * ((4 + 1) + (2 + 1)) / 8
    assert parse_kv("k16v16").bytes_per_token(3, 64) == 3 * 64 * 32 / 8


def test_group_fitting_and_applicability() -> None:
    w = parse_weight("w4g128a")
    assert w.fit_group(576) == parse_weight("w4g96a")  # largest multiple of 8 <= 128 dividing 576
    assert w.fit_group(1536) is w
    assert parse_weight("w8c").fit_group(100 * 8) == parse_weight("w8c")
    with pytest.raises(FormatError, match="does not divide"):
        w.check_applicable(576)
    assert parse_weight("w4g32a").fit_group(172) == parse_weight("w4ca")  # no multiple of 8 divides 172
    parse_weight("w4c").check_applicable(577)  # rows are padded to whole 8-code words
    assert parse_weight("w4c").storage_bits(2, 172) == 2 * 176 * 4 + 2 * 16
    with pytest.raises(FormatError, match="does not divide"):
        KVFormat(4, 4, group_size=48).check_applicable(64)
    KVFormat(4, 4, group_size=48).check_applicable(48)


def test_invalid_constructions_raise() -> None:
    with pytest.raises(FormatError):
        WeightFormat("int", 9, 64)
    with pytest.raises(FormatError):
        WeightFormat("nf4", 4, 64, symmetric=False)
    with pytest.raises(FormatError):
        ActFormat("int", 3)
    with pytest.raises(FormatError):
        KVFormat(5, 4)
