"""KIVI-style asymmetric integer quantization of attention key / value tensors ``[B, H, T, D]``.

Why two axes (KIVI, Liu et al. 2024): keys have a few *outlier channels* -- head dimensions whose magnitude
is large for every token (RoPE keeps them in place) -- so one scale per token would be stretched by those
channels and crush the rest. Keys are therefore quantized **per channel**: ``group`` consecutive tokens of one
channel share a (scale, offset), and an outlier channel only costs its own resolution. Values have no such
channel structure and are consumed as a per-token weighted sum, so they are quantized **per token**, in groups
of ``min(group, D)`` channels. A per-channel side needs whole groups of tokens, which is why the cache
(:mod:`bitplan.kvcache`) keeps the newest tokens in 16 bits until a group is full.

Storage follows :class:`bitplan.formats.KVFormat` exactly: codes bit-packed densely along the head dim
(``D * bits / 8`` bytes per token and head), one fp16 scale and one fp16 offset per group, decoded as
``x = scale * q + offset``. The offset is rounded *down* and the scale *up* to fp16 and the codes are computed
against those stored values, so every in-range element decodes within half a stored step; a constant group
gets scale 0 and decodes exactly whenever its value is representable in fp16 (always for fp16 inputs), never NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from bitplan.quantizers.packing import pack_bits, unpack_bits

__all__ = [
    "Axis",
    "QuantizedKV",
    "cat_kv",
    "dequantize_kv",
    "fake_quantize_kv",
    "quantize_kv",
    "slice_kv",
]

Axis = Literal["channel", "token"]
_FP16_MAX = 65504.0


@dataclass(frozen=True)
class QuantizedKV:
    """Packed K or V: ``codes`` uint8 ``[B, H, T, D*bits/8]``; ``scales``/``offsets`` fp16, shaped
    ``[B, H, T/group, D]`` per channel or ``[B, H, T, D/group]`` per token. ``shape`` is the decoded shape."""

    codes: Tensor
    scales: Tensor
    offsets: Tensor
    bits: int
    axis: Axis
    group: int
    shape: tuple[int, int, int, int]

    @property
    def num_tokens(self) -> int:
        return self.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes plus fp16 scales and offsets (``elements*bits/8 + 4*groups``)."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.offsets))

    def map_batch(self, fn: Callable[[Tensor], Tensor]) -> QuantizedKV:
        """Apply a batch-dim operation (index_select, repeat_interleave, ...) to every stored tensor; lossless."""
        codes = fn(self.codes)
        b = codes.shape[0]
        return replace(
            self, codes=codes, scales=fn(self.scales), offsets=fn(self.offsets), shape=(b, *self.shape[1:])
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> QuantizedKV:
        return self.map_batch(lambda t: t.to(device, non_blocking=non_blocking))


def _effective_group(shape: Sequence[int], bits: int, axis: str, group: int) -> int:
    if len(shape) != 4:
        raise ValueError(f"expected a [B, H, T, D] tensor, got shape {tuple(shape)}")
    if not 2 <= bits <= 8:
        raise ValueError(f"KV quantization bits must be 2-8 (16 means unquantized), got {bits}")
    if group < 1:
        raise ValueError(f"group must be positive, got {group}")
    t, d = shape[2], shape[3]
    if d % 8:
        raise ValueError(f"head_dim {d} is not a multiple of 8, cannot bit-pack")
    if axis == "channel":
        if t % group:
            raise ValueError(f"per-channel quantization needs whole groups: {t} tokens, group {group}")
        return group
    if axis == "token":
        g = min(group, d)
        if d % g:
            raise ValueError(f"per-token group {g} does not divide head_dim {d}")
        return g
    raise ValueError(f"axis must be 'channel' or 'token', got {axis!r}")


def _fp16_toward(x: Tensor, down: bool) -> Tensor:
    """Round fp32 ``x`` to fp16 towards -inf (``down``) or +inf, clamped to the finite fp16 range."""
    x = x.clamp(-_FP16_MAX, _FP16_MAX)
    h = x.to(torch.float16)
    wrong = h.float() > x if down else h.float() < x
    limit = torch.full_like(h, float("-inf") if down else float("inf"))
    return torch.where(wrong, torch.nextafter(h, limit), h)


def _grouped(x: Tensor, axis: str, g: int) -> Tensor:
    """View ``[B,H,T,D]`` so that the reduced dim of each group is dim 3 (channel) or dim 4 (token)."""
    b, h, t, d = x.shape
    return x.reshape(b, h, t // g, g, d) if axis == "channel" else x.reshape(b, h, t, d // g, g)


def quantize_kv(x: Tensor, bits: int, axis: Axis = "channel", group: int = 32) -> QuantizedKV:
    """Min-max asymmetric quantization of ``x [B, H, T, D]`` (see the module docstring for the layout)."""
    g = _effective_group(x.shape, bits, axis, group)
    qmax = (1 << bits) - 1
    xg = _grouped(x.float(), axis, g)
    red = 3 if axis == "channel" else 4
    lo = xg.amin(dim=red, keepdim=True)
    hi = xg.amax(dim=red, keepdim=True)
    offset = _fp16_toward(lo, down=True)
    scale = _fp16_toward((hi - offset.float()) / qmax, down=False)
    s, o = scale.float(), offset.float()
    # s == 0 only for a constant group whose value is exact in fp16, where x - o == 0: divide by 1 instead.
    q = torch.round((xg - o) / torch.where(s > 0, s, 1.0)).clamp_(0, qmax).to(torch.uint8)
    codes = pack_bits(q.reshape(x.shape), bits)
    return QuantizedKV(
        codes=codes,
        scales=scale.squeeze(red).contiguous(),
        offsets=offset.squeeze(red).contiguous(),
        bits=bits,
        axis=axis,
        group=g,
        shape=tuple(x.shape),  # type: ignore[arg-type]
    )


def dequantize_kv(q: QuantizedKV, dtype: torch.dtype = torch.float32) -> Tensor:
    """Decode ``scale * q + offset`` (in fp32) back to ``[B, H, T, D]`` in ``dtype``."""
    b, h, t, d = q.shape
    codes = unpack_bits(q.codes, q.bits, d).float()
    red = 3 if q.axis == "channel" else 4
    x = _grouped(codes, q.axis, q.group) * q.scales.float().unsqueeze(red) + q.offsets.float().unsqueeze(red)
    return x.reshape(b, h, t, d).to(dtype)


def fake_quantize_kv(x: Tensor, bits: int, axis: Axis = "channel", group: int = 32) -> Tensor:
    """Quantize then dequantize, in ``x``'s dtype (bits=16 returns ``x`` unchanged)."""
    if bits == 16:
        return x
    return dequantize_kv(quantize_kv(x, bits, axis, group), x.dtype)


def cat_kv(parts: Sequence[QuantizedKV]) -> QuantizedKV:
    """Concatenate along the token dim (same bits, axis, group, batch, heads and head_dim)."""
    if not parts:
        raise ValueError("cat_kv needs at least one part")
    first = parts[0]
    key = (first.bits, first.axis, first.group, first.shape[:2], first.shape[3])
    if any((p.bits, p.axis, p.group, p.shape[:2], p.shape[3]) != key for p in parts):
        raise ValueError("cat_kv: parts differ in format or shape")
    if len(parts) == 1:
        return first
    t = sum(p.num_tokens for p in parts)
    b, h, _, d = first.shape
    return replace(
        first,
        codes=torch.cat([p.codes for p in parts], dim=2),
        scales=torch.cat([p.scales for p in parts], dim=2),
        offsets=torch.cat([p.offsets for p in parts], dim=2),
        shape=(b, h, t, d),
    )


def slice_kv(q: QuantizedKV, start: int, end: int) -> QuantizedKV:
    """Tokens ``[start, end)``; for a per-channel side both bounds must be group boundaries."""
    b, h, t, d = q.shape
    if not 0 <= start <= end <= t:
        raise ValueError(f"token range [{start}, {end}) outside [0, {t})")
    if q.axis == "channel":
        if start % q.group or end % q.group:
            raise ValueError(
                f"per-channel slice [{start}, {end}) must fall on multiples of the group {q.group}"
            )
        s0, s1 = start // q.group, end // q.group
    else:
        s0, s1 = start, end
    return replace(
        q,
        codes=q.codes[:, :, start:end].clone(),
        scales=q.scales[:, :, s0:s1].clone(),
        offsets=q.offsets[:, :, s0:s1].clone(),
        shape=(b, h, end - start, d),
    )
