"""QuantizedWeight, the shared encode/decode path, fp16 parameter rounding and the quantizer registry."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitplan.errors import BitplanError, FormatError
from bitplan.formats import WeightFormat, parse_weight
from bitplan.quantizers import (
    WEIGHT_QUANTIZERS,
    QuantizedWeight,
    WeightQuantizer,
    get_weight_quantizer,
    register_weight_quantizer,
)
from bitplan.quantizers._base import encode_groups, group_view, minmax_params, to_fp16
from bitplan.quantizers._codebooks import NF4_LEVELS
from bitplan.quantizers._rtn import RTN


# -- an independent reference decoder ----------------------------------------------------------------
def e4m3_value(byte: int) -> float:
    sign = -1.0 if byte & 0x80 else 1.0
    exp, man = (byte >> 3) & 0xF, byte & 0x7
    if exp == 0:
        return sign * man / 8 * 2.0**-6
    return sign * (1 + man / 8) * 2.0 ** (exp - 7)


def reference_decode(
    fmt: WeightFormat, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None
) -> torch.Tensor:
    g = fmt.effective_group(codes.shape[1])
    s = scales.float().repeat_interleave(g, dim=1)
    if fmt.kind == "fp8":
        table = torch.tensor([e4m3_value(b) for b in range(256)])
        return s * table[codes.long()]
    if fmt.kind == "nf4":
        return s * torch.tensor(NF4_LEVELS)[codes.long()]
    if fmt.symmetric:
        return s * (codes.float() - 2 ** (fmt.bits - 1))
    assert offsets is not None
    return s * codes.float() + offsets.float().repeat_interleave(g, dim=1)


@st.composite
def format_and_shape(draw: st.DrawFn) -> tuple[WeightFormat, int, int]:
    kind = draw(st.sampled_from(["int", "int", "nf4", "fp8"]))
    group = draw(st.sampled_from([8, 16, None]))
    if kind == "int":
        fmt = WeightFormat("int", draw(st.integers(2, 8)), group, symmetric=draw(st.booleans()))
    elif kind == "nf4":
        fmt = WeightFormat("nf4", 4, group)
    else:
        fmt, group = WeightFormat("fp8", 8), None
    inp = draw(st.integers(1, 3)) * group if group else draw(st.integers(1, 40))  # any width per channel
    return fmt, draw(st.integers(1, 4)), inp


@settings(max_examples=80, deadline=None)
@given(format_and_shape(), st.integers(0, 2**31 - 1))
def test_pack_then_dequantize_matches_reference(case: tuple[WeightFormat, int, int], seed: int) -> None:
    fmt, out, inp = case
    gen = torch.Generator().manual_seed(seed)
    n_groups = inp // fmt.effective_group(inp)
    if fmt.kind == "fp8":
        codes = torch.randint(0, 256, (out, inp), generator=gen).to(torch.uint8)
        codes[(codes == 0x7F) | (codes == 0xFF)] = 0  # the two NaN patterns are never produced
    else:
        codes = torch.randint(0, 2**fmt.bits, (out, inp), generator=gen).to(torch.uint8)
    scales = torch.exp(torch.empty(out, n_groups).uniform_(-12, 2, generator=gen)).half()
    offsets = None
    if fmt.has_offset:  # a realistic offset: minus a zero point (in code units) times the scale
        offsets = (
            -scales.float() * torch.empty(out, n_groups).uniform_(0, 2**fmt.bits - 1, generator=gen)
        ).half()
    qw = QuantizedWeight.from_codes(fmt, codes, scales, offsets, "test")
    assert qw.nbytes == fmt.storage_bits(out, inp) // 8
    assert torch.equal(qw.int_codes(), codes)
    deq = qw.dequantize()
    torch.testing.assert_close(deq, reference_decode(fmt, codes, scales, offsets), rtol=1e-6, atol=0)
    # the encoder maps every decoded weight back to its own code
    again = encode_groups(group_view(deq, fmt), fmt, scales, offsets).reshape(out, inp)
    if fmt.kind == "fp8":  # +0 and -0 are the same weight
        again, codes = again.masked_fill(again == 0x80, 0), codes.masked_fill(codes == 0x80, 0)
    assert torch.equal(again, codes)


@settings(max_examples=200, deadline=None)
@given(st.floats(1e-9, 6e4, allow_subnormal=False))
def test_directed_fp16_rounding(x: float) -> None:
    t = torch.tensor([x], dtype=torch.float32)
    up, down, near = to_fp16(t, +1), to_fp16(t, -1), to_fp16(t)
    assert up.float() >= t and down.float() <= t
    assert torch.nextafter(down, up).float() >= up.float()  # at most one fp16 step apart
    assert near in (up, down)


def test_symmetric_scale_uses_the_extra_negative_level() -> None:
    fmt = parse_weight("w2c")  # levels -2, -1, 0, 1 (times the scale)
    w = torch.tensor([[-2.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0]])
    qw = get_weight_quantizer("rtn").quantize(w, fmt)
    assert qw.scales.item() == 1.0
    assert torch.equal(qw.dequantize(), w)
    s, _ = minmax_params(torch.tensor([-1.0]), torch.tensor([1.0]), parse_weight("w8c"))
    assert s.item() == pytest.approx(1 / 127, rel=1e-3)


def test_nf4_table() -> None:
    levels = torch.tensor(NF4_LEVELS)
    assert levels.numel() == 16 and torch.equal(levels, levels.sort().values)
    assert levels[0] == -1 and levels[7] == 0 and levels[-1] == 1


def test_quantized_weight_validates() -> None:
    fmt = parse_weight("w4g8a")
    codes, scales = torch.zeros(2, 8, dtype=torch.uint8), torch.ones(2, 2, dtype=torch.float16)
    QuantizedWeight(fmt, (2, 16), codes, scales, scales.clone(), "x")
    with pytest.raises(ValueError, match="offsets"):
        QuantizedWeight(fmt, (2, 16), codes, scales, None, "x")
    with pytest.raises(ValueError, match="codes"):
        QuantizedWeight(fmt, (2, 16), codes[:, :4], scales, scales, "x")
    with pytest.raises(ValueError, match="scales"):
        QuantizedWeight(fmt, (2, 16), codes, scales.float(), scales, "x")
    with pytest.raises(ValueError, match="no offsets"):
        QuantizedWeight(parse_weight("w4g8"), (2, 16), codes, scales, scales, "x")
    with pytest.raises(FormatError):
        QuantizedWeight(parse_weight("bf16"), (2, 16), codes, scales, None, "x")
    with pytest.raises(FormatError):
        QuantizedWeight(parse_weight("w4g16a"), (2, 24), codes, scales, scales, "x")


def test_quantized_weight_to_and_dtype() -> None:
    w = torch.randn(4, 32)
    qw = get_weight_quantizer("rtn").quantize(w, parse_weight("w4g16a")).to("cpu")
    assert qw.dequantize(torch.float16).dtype == torch.float16
    assert (qw.out_features, qw.in_features, qw.n_groups) == (4, 32, 2)


# -- registry ---------------------------------------------------------------------------------------
def test_builtin_methods_registered() -> None:
    assert {"rtn", "rtn-mse", "hqq"} <= set(WEIGHT_QUANTIZERS.names())
    for name in ("rtn", "rtn-mse", "hqq"):
        q = get_weight_quantizer(name)
        assert q.name == name and not q.needs_calibration


def test_duplicate_registration_raises() -> None:
    class Again(RTN):
        pass

    with pytest.raises(ValueError, match="duplicate weight quantizer 'rtn'"):
        register_weight_quantizer("rtn")(Again)
    assert WEIGHT_QUANTIZERS.get("rtn") is RTN and RTN.name == "rtn" and Again.name == "rtn"


def test_register_sets_name() -> None:
    @register_weight_quantizer("test-identity")
    class Identity(RTN):
        pass

    try:
        assert Identity.name == "test-identity"
        assert type(get_weight_quantizer("test-identity")) is Identity
    finally:
        WEIGHT_QUANTIZERS._items.pop("test-identity")


def test_unknown_method_lists_registered() -> None:
    with pytest.raises(BitplanError, match="unknown weight quantizer 'gptq-nope'; registered: .*hqq.*rtn"):
        get_weight_quantizer("gptq-nope")


def test_options_reach_the_quantizer() -> None:
    q = get_weight_quantizer("hqq", iters=3, fit_scale=True)
    assert q.iters == 3 and q.fit_scale  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        get_weight_quantizer("rtn", grid=3)


def test_calibration_is_checked() -> None:
    class NeedsData(RTN):
        name = "needs-data"
        needs_calibration = True

    w = torch.randn(4, 16)
    with pytest.raises(BitplanError, match="needs-data.*calibration"):
        NeedsData().quantize(w, parse_weight("w4g8"))
    with pytest.raises(ValueError, match="features"):
        NeedsData().quantize(w, parse_weight("w4g8"), activations=torch.randn(5, 8))
    assert NeedsData().quantize(w, parse_weight("w4g8"), activations=torch.randn(5, 16)).shape == (4, 16)


def test_abstract_base() -> None:
    with pytest.raises(TypeError):
        WeightQuantizer()  # type: ignore[abstract]
