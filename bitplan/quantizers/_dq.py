"""Double-quantized group parameters: each group's scale (and offset) as an ``S``-bit code times a super-scale.

Layout (see ``bitplan.formats`` for the ``d6`` / ``d8`` formats and their exact bit counts): per row, groups
are taken ``superblock_groups`` at a time; a super-block stores one fp16 super-scale for its scales and
(asymmetric formats) one for its offsets, and every group an unsigned code, so

    scale  = fp16(super_scale  * code_s)          code_s in 1 .. 2**S - 1
    offset = -fp16(super_offset * code_o)         code_o in 0 .. 2**S - 1   (offsets are <= 0)

The products are rounded to fp16 so a decoded scale is an ordinary fp16 scale: everything downstream (the
shared encode/decode path, every kernel) works unchanged on the decoded parameters, and the codes are
chosen against exactly those decoded values.

Fitting. A method (rtn, hqq, gptq...) proposes fp16 parameters per group; :func:`fit` quantizes them:
the super-scale is the block's largest parameter over ``2**S - 1`` (rounded up, so the largest fits),
each code rounds to nearest, then every group tries its neighbouring codes (+-1 on the scale and on the
offset code) and keeps the pair with the smallest squared weight error through the real encode/decode
path. Why the refinement: a rounded scale code moves the whole grid; the neighbour that moves the offset
the other way often puts the group's weights back on their levels (on SmolLM2-135M it halves the KL of
``w4g32ad6``). Scale codes stay >= 1 so no decoded scale is zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from bitplan.quantizers.packing import pack_bits, packed_numel, unpack_bits

if TYPE_CHECKING:
    from bitplan.formats import WeightFormat

__all__ = ["DoubleQuant", "fit", "unpack"]

_MIN = 2.0**-24  # smallest positive fp16


def _fp16(x: torch.Tensor, up: bool = False) -> torch.Tensor:
    h = x.float().clamp(-65504.0, 65504.0).to(torch.float16)
    if up:
        h = torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    return h


@dataclass(eq=False)
class DoubleQuant:
    """Unpacked double-quantized parameters of one ``[out, in]`` weight."""

    fmt: WeightFormat
    in_features: int
    scale_codes: torch.Tensor  # uint8 [out, groups]
    super_scales: torch.Tensor  # fp16 [out, super-blocks]
    offset_codes: torch.Tensor | None = None  # uint8 [out, groups]
    super_offsets: torch.Tensor | None = None  # fp16 [out, super-blocks]

    def _per_group(self, sup: torch.Tensor) -> torch.Tensor:
        per = self.fmt.superblock_groups(self.in_features)
        groups = self.scale_codes.shape[-1]
        return sup.float().repeat_interleave(per, dim=-1)[..., :groups]

    def decode(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """fp16 ``(scales, offsets)`` ``[out, groups]``."""
        scales = _fp16(self._per_group(self.super_scales) * self.scale_codes.float())
        if self.offset_codes is None or self.super_offsets is None:
            return scales, None
        return scales, -_fp16(self._per_group(self.super_offsets) * self.offset_codes.float())

    def pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(qparams uint8 [out, packed codes], superscales fp16 [out, super-blocks * params])``."""
        codes = [self.scale_codes] + ([] if self.offset_codes is None else [self.offset_codes])
        sup = [self.super_scales] + ([] if self.super_offsets is None else [self.super_offsets])
        bits = self.fmt.scale_bits
        assert bits is not None
        return pack_bits(torch.cat(codes, -1), bits).contiguous(), torch.cat(sup, -1).contiguous()

    def rows(self, ids: torch.Tensor) -> DoubleQuant:
        pick = (lambda t: None if t is None else t[ids])  # noqa: E731
        return DoubleQuant(self.fmt, self.in_features, self.scale_codes[ids], self.super_scales[ids],
                           pick(self.offset_codes), pick(self.super_offsets))  # fmt: skip


def packed_shapes(fmt: WeightFormat, out: int, in_features: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of ``(qparams, superscales)`` for an ``[out, in_features]`` weight."""
    groups, supers = fmt.param_layout(in_features)
    k = 2 if fmt.has_offset else 1
    assert fmt.scale_bits is not None
    return (out, packed_numel(groups * k, fmt.scale_bits)), (out, supers * k)


def unpack(fmt: WeightFormat, in_features: int, qparams: torch.Tensor, superscales: torch.Tensor) -> DoubleQuant:
    """Inverse of :meth:`DoubleQuant.pack`."""
    groups, supers = fmt.param_layout(in_features)
    assert fmt.scale_bits is not None
    if fmt.has_offset:
        codes = unpack_bits(qparams, fmt.scale_bits, 2 * groups)
        return DoubleQuant(fmt, in_features, codes[..., :groups], superscales[..., :supers],
                           codes[..., groups:], superscales[..., supers:])  # fmt: skip
    return DoubleQuant(fmt, in_features, unpack_bits(qparams, fmt.scale_bits, groups), superscales)


def _blocks(x: torch.Tensor, per: int) -> torch.Tensor:
    """``[out, groups]`` -> ``[out, super-blocks, per]`` (the last block zero-padded)."""
    pad = -x.shape[-1] % per
    return torch.nn.functional.pad(x, (0, pad)).reshape(x.shape[0], -1, per)


def _codes(values: torch.Tensor, per: int, top: int, lowest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Super-scales (fp16, rounded up) and nearest codes of non-negative ``values [out, groups]``."""
    blocks = _blocks(values, per)
    sup = _fp16((blocks.amax(-1) / top).clamp(min=_MIN), up=True)
    codes = torch.round(blocks / sup.float().unsqueeze(-1)).clamp(lowest, top)
    return sup, codes.reshape(values.shape[0], -1)[:, : values.shape[1]]


def fit(wg: torch.Tensor, fmt: WeightFormat, scales: torch.Tensor, offsets: torch.Tensor | None) -> DoubleQuant:
    """Double-quantize a method's fp16 ``scales`` / ``offsets`` ``[out, groups]`` for grouped weights ``wg``."""
    from bitplan.quantizers._base import group_sq_error

    assert fmt.scale_bits is not None
    in_features = wg.shape[-1] * wg.shape[-2]
    per, top = fmt.superblock_groups(in_features), 2**fmt.scale_bits - 1
    s = scales.float()
    o = None
    if offsets is not None:  # offsets must be <= 0: an all-positive group's grid restarts at 0
        o = offsets.float()
        levels = 2**fmt.bits - 1
        s = torch.where(o > 0, (o + s * levels) / levels, s)
        o = o.clamp(max=0)
    sup_s, sc = _codes(s, per, top, 1)
    sup_o, oc = (None, None) if o is None else _codes(-o, per, top, 0)

    def params(sc: torch.Tensor, oc: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        dq = DoubleQuant(fmt, in_features, sc, sup_s, oc, sup_o)
        return dq.decode()

    best_err = group_sq_error(wg, fmt, *params(sc, oc))
    best_sc, best_oc = sc.clone(), None if oc is None else oc.clone()
    for ds in (-1, 0, 1):
        for do in (-1, 0, 1) if oc is not None else (0,):
            if ds == do == 0:
                continue
            sc2 = (sc + ds).clamp(1, top)
            oc2 = None if oc is None else (oc + do).clamp(0, top)
            err = group_sq_error(wg, fmt, *params(sc2, oc2))
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_sc = torch.where(better, sc2, best_sc)
            if best_oc is not None and oc2 is not None:
                best_oc = torch.where(better, oc2, best_oc)
    u8 = torch.uint8
    return DoubleQuant(fmt, in_features, best_sc.to(u8), sup_s, None if best_oc is None else best_oc.to(u8), sup_o)
