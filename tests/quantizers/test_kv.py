"""KIVI-style K/V quantization: error bounds, exact storage, per-channel isolation, edge cases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitplan.formats import KVFormat
from bitplan.quantizers.kv import (
    QuantizedKV,
    cat_kv,
    dequantize_kv,
    fake_quantize_kv,
    quantize_kv,
    slice_kv,
)

BITS = (2, 3, 4, 8)
AXES = ("channel", "token")


def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _expand(q: QuantizedKV, t: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-group tensor (scales / offsets) to the element shape."""
    if q.axis == "channel":
        return t.float().repeat_interleave(q.group, dim=2)
    return t.float().repeat_interleave(q.group, dim=3)


def _groups(q: QuantizedKV) -> int:
    b, h, t, d = q.shape
    return b * h * (t // q.group) * d if q.axis == "channel" else b * h * t * (d // q.group)


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("bits", BITS)
def test_error_within_half_step(bits: int, axis: str) -> None:
    x = _rand(2, 3, 64, 16) * 3
    q = quantize_kv(x, bits, axis, 32)  # type: ignore[arg-type]
    err = (dequantize_kv(q) - x).abs()
    step = _expand(q, q.scales)
    assert (err <= step / 2 + 1e-5).all()
    # the stored step is the min-max step, up to fp16 rounding
    assert step.max() <= (x.max() - x.min()) / ((1 << bits) - 1) * 1.01


def test_error_monotone_in_bits() -> None:
    x = _rand(1, 2, 128, 32, seed=1)
    for axis in AXES:
        errs = [(fake_quantize_kv(x, b, axis, 32) - x).pow(2).mean().item() for b in BITS]  # type: ignore[arg-type]
        assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-4, (axis, errs)
        assert fake_quantize_kv(x, 16, axis).equal(x)  # type: ignore[arg-type]


@pytest.mark.parametrize("group", [8, 32, 64])
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("bits", BITS)
def test_nbytes_exact(bits: int, axis: str, group: int) -> None:
    b, h, t, d = 2, 3, 64, 32
    q = quantize_kv(_rand(b, h, t, d), bits, axis, group)  # type: ignore[arg-type]
    groups = b * h * (t // group) * d if axis == "channel" else b * h * t * (d // min(group, d))
    assert q.nbytes == b * h * t * d * bits // 8 + 2 * 2 * groups
    assert _groups(q) == groups
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (b, h, t, d * bits // 8)
    assert q.scales.dtype == q.offsets.dtype == torch.float16
    # the same number the format's accounting gives per token
    fmt = KVFormat(bits, bits, group_size=group)
    which = "k" if axis == "channel" else "v"
    assert q.nbytes * 8 == pytest.approx(b * h * t * d * fmt.bits_per_element(which, d))


def test_outlier_channel_does_not_hurt_other_channels_per_channel() -> None:
    x = _rand(1, 2, 64, 16, seed=2)
    y = x.clone()
    y[..., 5] *= 100.0  # an outlier channel, as keys have
    mask = torch.ones(16, dtype=torch.bool)
    mask[5] = False
    per_ch_x = fake_quantize_kv(x, 4, "channel", 32)
    per_ch_y = fake_quantize_kv(y, 4, "channel", 32)
    assert per_ch_y[..., mask].equal(per_ch_x[..., mask])  # groups really are per channel
    per_tok_err = (fake_quantize_kv(y, 4, "token", 32) - y)[..., mask].abs().mean()
    per_ch_err = (per_ch_y - y)[..., mask].abs().mean()
    assert per_tok_err > 10 * per_ch_err  # per token, the outlier stretches everyone's scale


def test_per_token_groups_are_per_token() -> None:
    x = _rand(1, 1, 16, 32, seed=3)
    y = x.clone()
    y[:, :, 7] *= 50.0
    a, b = fake_quantize_kv(x, 3, "token", 16), fake_quantize_kv(y, 3, "token", 16)
    keep = torch.arange(16) != 7
    assert a[:, :, keep].equal(b[:, :, keep])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("axis", AXES)
def test_constant_groups_round_trip_exactly(axis: str, dtype: torch.dtype) -> None:
    for value in (0.0, 3.25, -7.5, 1e-3):
        x = torch.full((1, 2, 32, 8), value, dtype=dtype)
        for bits in BITS:
            y = fake_quantize_kv(x, bits, axis, 32)  # type: ignore[arg-type]
            assert not y.isnan().any()
            assert y.dtype == dtype
            if float(torch.tensor(value).half()) == float(x[0, 0, 0, 0]):  # representable in fp16
                assert y.equal(x), (value, bits)
            else:
                assert torch.allclose(y.float(), x.float(), rtol=1e-3)


def test_mixed_constant_and_varying_groups_no_nan() -> None:
    x = _rand(1, 1, 64, 8)
    x[:, :, :32, 2] = 0.0
    q = quantize_kv(x, 2, "channel", 32)
    y = dequantize_kv(q)
    assert not y.isnan().any() and y[:, :, :32, 2].eq(0).all()
    assert (q.scales.float() >= 0).all()


def test_fp16_input_offset_is_exact_minimum() -> None:
    x = _rand(1, 2, 32, 16, dtype=torch.float16)
    q = quantize_kv(x, 4, "token", 16)
    lo = x.float().reshape(1, 2, 32, 1, 16).amin(-1)
    assert q.offsets.float().equal(lo)  # fp16 minima need no rounding
    assert dequantize_kv(q, torch.float16).dtype == torch.float16


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    axis=st.sampled_from(AXES),
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    groups=st.integers(1, 3),
    group=st.sampled_from([8, 16, 32]),
    d=st.sampled_from([8, 16, 24, 64]),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_property_half_step_bound(
    bits: int, axis: str, b: int, h: int, groups: int, group: int, d: int, scale: float, seed: int
) -> None:
    if axis == "token" and d % min(group, d):
        return
    x = _rand(b, h, groups * group, d, seed=seed) * scale + scale / 3
    q = quantize_kv(x, bits, axis, group)  # type: ignore[arg-type]
    y = dequantize_kv(q)
    tol = 4 * torch.finfo(torch.float32).eps * x.abs().max()
    assert ((y - x).abs() <= _expand(q, q.scales) / 2 + tol).all()


def test_cat_slice_and_batch_ops_are_lossless() -> None:
    x = _rand(3, 2, 96, 16)
    for axis in AXES:
        whole = quantize_kv(x, 3, axis, 32)  # type: ignore[arg-type]
        parts = [quantize_kv(x[:, :, i : i + 32], 3, axis, 32) for i in (0, 32, 64)]  # type: ignore[arg-type]
        joined = cat_kv(parts)
        assert dequantize_kv(joined).equal(dequantize_kv(whole))
        assert joined.nbytes == whole.nbytes and joined.num_tokens == 96
        mid = slice_kv(whole, 32, 64)
        assert dequantize_kv(mid).equal(dequantize_kv(whole)[:, :, 32:64])
        idx = torch.tensor([2, 0])
        sel = whole.map_batch(lambda t, idx=idx: t.index_select(0, idx))
        assert sel.shape == (2, 2, 96, 16)
        assert dequantize_kv(sel).equal(dequantize_kv(whole)[idx])
    with pytest.raises(ValueError, match="multiples of the group"):
        slice_kv(quantize_kv(x, 3, "channel", 32), 0, 40)


def test_invalid_inputs() -> None:
    x = _rand(1, 1, 32, 16)
    with pytest.raises(ValueError, match="bits"):
        quantize_kv(x, 16, "channel", 32)
    with pytest.raises(ValueError, match="whole groups"):
        quantize_kv(x[:, :, :20], 4, "channel", 32)
    with pytest.raises(ValueError, match="multiple of 8"):
        quantize_kv(_rand(1, 1, 32, 12), 4, "token", 32)
    with pytest.raises(ValueError, match="axis"):
        quantize_kv(x, 4, "head", 32)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[B, H, T, D\]"):
        quantize_kv(x[0], 4, "token", 32)
