"""CPU kernels on torch's int4 GEMM (``_weight_int4pack_mm_for_cpu``): 4-bit, widened 2/3-bit, compact 2/3-bit.

torch's op multiplies bf16 activations by nibbles ``q`` held in its own packed layout and decodes
``w = (q - 8) * scale + zero`` per group of 32, 64, 128 or 256 inputs (checked empirically; a ``zero`` in
weight units, like our offset). Our formats map onto it exactly up to the bf16 rounding of the pair:

    nibble = q + 8 - 2**(b-1)      (q at 4 bits, q + 6 at 2 bits, q + 4 at 3 bits)
    scale  = s
    zero   = o + 2**(b-1) * s      (asymmetric)      0      (symmetric)

Why the shifted nibble: the code's centre then sits on torch's 8, so the zero is the group's midpoint,
small for LLM weights. With the code itself as the nibble, a 2-bit zero is ``o + 8*s``, several times
the group's range, and its bf16 rounding alone cost 4% relative error. (The shifted nibble stays below
16, so adding the shift to a whole 64-bit word of nibbles never carries.)

The pair is stored bf16 ``[groups, out, 2]``: 4 bytes a group, the plan's bytes for asymmetric formats and
2 more than a symmetric format's single fp16 scale (``resident_nbytes`` says so, and ``kernels="auto"``
then keeps the reference kernel for it). The op wants the output count divisible by 16; other shapes are
padded with zero rows (counted in the resident bytes).

Three kernels:

* ``int4pack``: 4-bit formats, the op as is.
* ``int4pack-wide``: 2/3-bit codes widened to nibbles once -- as fast as 4 bits, but holds 4 bits a weight.
* ``int4pack-expand``: 2/3-bit codes kept at their own width and expanded into the op's packed bytes on
  every call, a row chunk (≈1 MiB of nibbles, cache-resident) at a time. The int4 stream is re-laid as
  64-bit words so expansion is 4 (2-bit) or 6 (3-bit) whole-tensor integer ops: a 2-bit word ``P`` holds
  the low 2 bits of two nibble words (``lo = P & 0x33..``, ``hi = (P >> 2) & 0x33..``); 3-bit adds a
  1-bit plane of which each word supplies bit 2 of the nibbles of four words; the shift is added along
  the way. It holds the
  plan's bytes, at the cost of the expansion: at M=1, 2x ``int4pack-wide``'s latency at 2 bits and 3x at
  3 bits (0.6x / 1.1x dense fp32 on 4096x4096, 1.0-2.4x / 1.4-3.1x on the main model's small linears, where
  per-op overhead dominates; the reference kernel is 12-19x).

Priorities (lower = preferred) follow M=1 latency on the development CPU (Xeon, AVX-512/AMX, 2 threads);
see ``bitplan/kernels/_cpu.py`` for the whole CPU order.
"""

from __future__ import annotations

import torch

from bitplan.formats import ActFormat, WeightFormat
from bitplan.kernels._base import Kernel, LinearSpec, Prepared, WeightSource, _finish, register_kernel
from bitplan.quantizers._base import QuantizedWeight

__all__ = [
    "Int4PackExpandKernel",
    "Int4PackKernel",
    "Int4PackWideKernel",
    "code_shift",
    "int4_scales_zeros",
    "int4pack_available",
]

GROUPS = (32, 64, 128, 256)  # the op's group sizes
ROW_ALIGN = 16  # the op's output-count divisor
CHUNK_BYTES = 1 << 20  # int4 bytes one expansion step writes (cache-resident)
_M3 = 0x3333333333333333  # bits 0-1 of every nibble
_M1 = 0x1111111111111111  # bit 0 of every nibble
_M6 = 0x6666666666666666  # 6 in every nibble


def int4pack_available() -> bool:
    aten = torch.ops.aten
    return hasattr(aten, "_weight_int4pack_mm_for_cpu") and hasattr(aten, "_convert_weight_to_int4pack_for_cpu")


def _pad_rows(n: int) -> int:
    return -(-n // ROW_ALIGN) * ROW_ALIGN


def _int_codes_ok(fmt: WeightFormat, bits: tuple[int, ...]) -> bool:
    return fmt.kind == "int" and fmt.bits in bits and fmt.group_size in GROUPS


def code_shift(bits: int) -> int:
    """What is added to a ``bits``-bit code to make its nibble: centres the code on torch's 8."""
    return 8 - 2 ** (bits - 1)


def int4_scales_zeros(qw: QuantizedWeight, rows: int | None = None) -> torch.Tensor:
    """bf16 ``[groups, rows, 2]`` (scale, zero) for torch's ``(nibble - 8) * scale + zero``; extra rows are zero."""
    fmt = qw.fmt
    s = qw.scales.float()
    o = qw.offsets.float() if qw.offsets is not None else -(2 ** (fmt.bits - 1)) * s
    sz = torch.stack([s, o + 2 ** (fmt.bits - 1) * s], dim=-1)  # [out, groups, 2], fp32, one rounding
    rows = rows or qw.out_features
    if rows > qw.out_features:
        sz = torch.nn.functional.pad(sz, (0, 0, 0, 0, 0, rows - qw.out_features))
    return sz.transpose(0, 1).to(torch.bfloat16).contiguous()


def _int4_packed(codes: torch.Tensor, rows: int) -> torch.Tensor:
    """torch's int4 layout ``uint8 [rows, in/2]`` for unpacked codes ``[out, in]`` (< 16), zero-padded rows."""
    q = codes.to(torch.int32)
    if rows > q.shape[0]:
        q = torch.nn.functional.pad(q, (0, 0, 0, rows - q.shape[0]))
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)


def _bf16_2d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()


def _int4_mm(x2: torch.Tensor, packed: torch.Tensor, group: int, sz: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group, sz)


class _Int4Base(Kernel):
    bits: tuple[int, ...] = (4,)

    def supports(self, fmt: WeightFormat, device: torch.device, shape: tuple[int, int], act: ActFormat) -> bool:
        return device.type == "cpu" and _int_codes_ok(fmt, self.bits) and int4pack_available()

    def compute_dtype(self, x_dtype: torch.dtype) -> torch.dtype:
        return torch.bfloat16  # the op's fp32 path is 10-20x slower on this CPU; activations go to bf16

    def _sz_nbytes(self, spec: LinearSpec) -> int:
        fmt = spec.weight
        return 4 * _pad_rows(spec.out_features) * (spec.in_features // fmt.effective_group(spec.in_features))


class _Int4Full(_Int4Base):
    """The weight held as torch's packed nibbles (4 bits a weight) + bf16 (scale, zero)."""

    def resident_nbytes(self, spec: LinearSpec) -> int:
        return _pad_rows(spec.out_features) * spec.in_features // 2 + self._sz_nbytes(spec)

    def prepare(self, weight: WeightSource, spec: LinearSpec) -> Prepared:
        assert isinstance(weight, QuantizedWeight)
        rows = _pad_rows(spec.out_features)
        packed = _int4_packed(weight.int_codes() + code_shift(spec.weight.bits), rows)
        return Prepared(self.name, spec, {"packed": packed, "sz": int4_scales_zeros(weight, rows)})

    def matmul(self, x: torch.Tensor, prepared: Prepared, out: torch.Tensor | None = None) -> torch.Tensor:
        t, spec = prepared.tensors, prepared.spec
        x2 = _bf16_2d(x)
        if x2.shape[0] == 0:
            return _finish(x2.new_empty(0, spec.out_features), x, out)
        y = _int4_mm(x2, t["packed"], spec.weight.group_size, t["sz"])  # type: ignore[arg-type]
        if y.shape[1] != spec.out_features:
            y = y[:, : spec.out_features]
        return _finish(y, x, out)


@register_kernel("int4pack")
class Int4PackKernel(_Int4Full):
    """4-bit integer formats, groups 32-256, asymmetric or symmetric (W4A16, bf16 math)."""

    priority = 10
    bits = (4,)


@register_kernel("int4pack-wide")
class Int4PackWideKernel(_Int4Full):
    """2/3-bit integer formats widened to 4-bit nibbles at prepare time: fast, but holds 4 bits a weight."""

    priority = 11
    bits = (2, 3)


# -- compact 2/3-bit codes, expanded into the int4 layout per call --------------------------------
def _chunk_rows(spec: LinearSpec) -> list[tuple[int, int]]:
    """Row ranges (multiples of 16 rows, the last one padded) of ≈ CHUNK_BYTES of nibbles each."""
    rows = _pad_rows(spec.out_features)
    step = max(64, (CHUNK_BYTES * 2 // spec.in_features) // 64 * 64)
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


def _compress(words: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """int64 words of unshifted code nibbles (< 2**bits) -> the compact planes :func:`_expand` inverts."""
    if bits == 2:
        w = words.view(2, -1)
        return [(w[0] & _M3) | ((w[1] & _M3) << 2)]
    w = words.view(4, -1)
    p2 = torch.cat([(w[0] & _M3) | ((w[2] & _M3) << 2), (w[1] & _M3) | ((w[3] & _M3) << 2)])
    p1 = sum(((w[k] >> 2) & _M1) << k for k in range(4))
    return [p2, p1]  # type: ignore[list-item]


_SHIFTS = torch.arange(4, dtype=torch.int64).view(4, 1)


def _expand(planes: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_compress`, plus the code shift, into the int64 buffer ``out`` (4 or 6 ops)."""
    p2 = planes[0]
    halves = out.view(2, -1)  # lo words from p2's bits 0-1, hi words from its bits 2-3 (sign bits masked off)
    torch.bitwise_and(p2, _M3, out=halves[0])
    torch.bitwise_right_shift(p2, 2, out=halves[1]).bitwise_and_(_M3)
    if len(planes) == 1:
        return out.add_(_M6)  # nibble = code + 6 (<= 9: no carry)
    # 3-bit: bit 2 of each nibble of quarter k is bit k of the p1 word's nibble (b); adding 4 * (b + 1)
    # to the low 2 bits makes the nibble code + 4 (<= 11: no carry)
    top = torch.bitwise_right_shift(planes[1].view(1, -1), _SHIFTS)
    top.bitwise_and_(_M1).add_(_M1)
    return out.view(4, -1).add_(top, alpha=4).view(-1)


@register_kernel("int4pack-expand")
class Int4PackExpandKernel(_Int4Base):
    """2/3-bit integer formats at their own width, expanded to torch's int4 layout chunk by chunk per call."""

    priority = 25  # after the int8 kernels: slower than them at M=1 (only int4pack-wide competes with it)
    bits = (2, 3)

    def resident_nbytes(self, spec: LinearSpec) -> int:
        return _pad_rows(spec.out_features) * spec.in_features * spec.weight.bits // 8 + self._sz_nbytes(spec)

    def prepare(self, weight: WeightSource, spec: LinearSpec) -> Prepared:
        assert isinstance(weight, QuantizedWeight)
        bits = spec.weight.bits
        rows = _pad_rows(spec.out_features)
        codes = weight.int_codes()
        sz = int4_scales_zeros(weight, rows)
        chunks = _chunk_rows(spec)
        planes: list[list[torch.Tensor]] = [[], []]
        sz_chunks = []
        for r0, r1 in chunks:
            part = codes[r0 : min(r1, spec.out_features)]
            packed = _int4_packed(part, r1 - r0)  # unshifted: _expand adds the shift
            for i, p in enumerate(_compress(packed.view(torch.int64).flatten(), bits)):
                planes[i].append(p)
            sz_chunks.append(sz[:, r0:r1].flatten())
        tensors = {"p2": torch.cat(planes[0]), "sz": torch.cat(sz_chunks)}
        if bits == 3:
            tensors["p1"] = torch.cat(planes[1])
        return Prepared(self.name, spec, tensors, {"chunks": tuple(chunks)})

    def matmul(self, x: torch.Tensor, prepared: Prepared, out: torch.Tensor | None = None) -> torch.Tensor:
        t, spec = prepared.tensors, prepared.spec
        k, n, g = spec.in_features, spec.out_features, spec.weight.group_size
        assert g is not None
        x2 = _bf16_2d(x)
        y = x2.new_empty(x2.shape[0], n)
        if x2.shape[0] == 0:
            return _finish(y, x, out)
        chunks = prepared.meta["chunks"]
        step = chunks[0][1] - chunks[0][0]
        buf = torch.empty(step * k // 16, dtype=torch.int64)
        p2, p1, sz = t["p2"], t.get("p1"), t["sz"]
        groups = k // g
        for r0, r1 in chunks:
            rows = r1 - r0
            words = rows * k // 16  # int64 words of nibbles in this chunk
            lo, hi = r0 * k // 16, r1 * k // 16
            if p1 is None:
                planes = [p2[lo // 2 : hi // 2]]
            else:
                planes = [p2[lo // 2 : hi // 2], p1[lo // 4 : hi // 4]]
            nib = _expand(planes, buf[:words]).view(torch.uint8).view(rows, k // 2)
            part = _int4_mm(x2, nib, g, sz[2 * groups * r0 : 2 * groups * r1].view(groups, rows, 2))
            y[:, r0 : min(r1, n)] = part[:, : min(r1, n) - r0]
        return _finish(y, x, out)
