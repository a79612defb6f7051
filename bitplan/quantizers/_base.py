"""The quantized-weight container, the quantizer base class and registry, and the one encode/decode path.

A method (rtn, rtn-mse, hqq, gptq, awq, smoothquant) only *chooses* per-group scales and offsets. Turning
(weight, scales, offsets) into codes, and codes back into weights, happens here, once, so every method
rounds, clamps and packs identically and a plan's byte count is the packed model's byte count.

fp16 parameters. Scales and offsets are stored as fp16 (see ``bitplan.formats``); they are computed in
fp32 and the codes are always chosen against the fp16-*rounded* values, so dequantization reproduces
exactly what the encoder assumed. Min-max parameters round in a direction: the asymmetric offset rounds
down and the scale rounds up, so a group's extreme values still land inside the code range. (Rounding to
nearest can clip the largest weight by a whole step when the scale is an fp16 subnormal, which happens
for small groups at 8 bits.) Scales are clamped away from zero, so an all-zero group encodes to the code
of 0 and decodes to exact zeros instead of 0/0 = NaN.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch

from bitplan._registry import Registry
from bitplan.errors import BitplanError, FormatError
from bitplan.formats import WeightFormat
from bitplan.quantizers import _dq
from bitplan.quantizers._codebooks import FP8_MAX, fp8_decode, fp8_encode, nf4_decode, nf4_encode
from bitplan.quantizers.packing import pack_bits, packed_numel, unpack_bits

__all__ = [
    "WEIGHT_QUANTIZERS",
    "QuantizedWeight",
    "WeightQuantizer",
    "decode_groups",
    "double_quantize",
    "encode_groups",
    "get_weight_quantizer",
    "group_sq_error",
    "group_view",
    "minmax_params",
    "register_weight_quantizer",
    "row_chunks",
    "to_fp16",
]

FP16_MAX = 65504.0
FP16_MIN_SCALE = 2.0**-24  # smallest positive fp16 (subnormal)


# -- fp16 parameters ------------------------------------------------------------------------------
def to_fp16(x: torch.Tensor, direction: int = 0) -> torch.Tensor:
    """fp32 -> fp16, to nearest (``direction=0``), or rounded up (``+1``) / down (``-1``) when inexact."""
    h = x.float().clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
    if direction:
        inexact = h.float() < x if direction > 0 else h.float() > x
        toward = torch.full_like(h, float("inf") if direction > 0 else float("-inf"))
        h = torch.where(inexact, torch.nextafter(h, toward), h)
    return h


def _scale16(scale: torch.Tensor, direction: int) -> torch.Tensor:
    return to_fp16(scale.float().clamp(FP16_MIN_SCALE, FP16_MAX), direction)


def minmax_params(
    lo: torch.Tensor, hi: torch.Tensor, fmt: WeightFormat
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp16 ``(scales, offsets)`` whose grid covers ``[lo, hi]`` per group (``lo``/``hi``: ``[..., n_groups]``).

    Symmetric int uses the smallest scale that holds both ends on the signed grid ``-2**(b-1)..2**(b-1)-1``
    (a negative extreme may use the extra level); nf4 and fp8 use the absmax.
    """
    lo, hi = lo.float(), hi.float()
    if fmt.kind == "int" and not fmt.symmetric:
        offsets = to_fp16(lo, -1)
        return _scale16((hi - offsets.float()) / (2**fmt.bits - 1), +1), offsets
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    if fmt.kind == "int":
        half = 2 ** (fmt.bits - 1)
        return _scale16(torch.maximum(hi / (half - 1), -lo / half), +1), None
    absmax = torch.maximum(hi, -lo)
    if fmt.kind == "nf4":
        return _scale16(absmax, +1), None
    if fmt.kind == "fp8":
        return _scale16(absmax / FP8_MAX, +1), None
    raise FormatError(f"{fmt}: not a quantized weight format")


# -- the shared encode / decode path --------------------------------------------------------------
def group_view(w: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """``[..., in]`` -> ``[..., n_groups, group]`` (a view)."""
    g = fmt.effective_group(w.shape[-1])
    return w.reshape(*w.shape[:-1], w.shape[-1] // g, g)


def encode_groups(
    wg: torch.Tensor, fmt: WeightFormat, scales: torch.Tensor, offsets: torch.Tensor | None
) -> torch.Tensor:
    """Codes ``uint8 [..., G, g]`` for grouped weights ``[..., G, g]`` under fp16 ``scales``/``offsets`` ``[..., G]``."""
    s = scales.float().unsqueeze(-1)
    wg = wg.float()
    if fmt.kind == "int":
        top = 2**fmt.bits - 1
        if fmt.symmetric:
            q = torch.round(wg / s) + 2 ** (fmt.bits - 1)
        else:
            if offsets is None:
                raise ValueError(f"{fmt} needs offsets")
            q = torch.round((wg - offsets.float().unsqueeze(-1)) / s)
        return q.clamp_(0, top).to(torch.uint8)
    if fmt.kind == "nf4":
        return nf4_encode(wg / s)
    if fmt.kind == "fp8":
        return fp8_encode(wg / s)
    raise FormatError(f"{fmt}: not a quantized weight format")


def decode_groups(
    codes: torch.Tensor, fmt: WeightFormat, scales: torch.Tensor, offsets: torch.Tensor | None
) -> torch.Tensor:
    """float32 weights ``[..., G, g]`` from unpacked codes ``[..., G, g]`` (inverse of :func:`encode_groups`)."""
    s = scales.float().unsqueeze(-1)
    if fmt.kind == "int":
        if fmt.symmetric:
            return s * (codes.float() - 2 ** (fmt.bits - 1))
        if offsets is None:
            raise ValueError(f"{fmt} needs offsets")
        return s * codes.float() + offsets.float().unsqueeze(-1)
    if fmt.kind == "nf4":
        return s * nf4_decode(codes)
    if fmt.kind == "fp8":
        return s * fp8_decode(codes)
    raise FormatError(f"{fmt}: not a quantized weight format")


def group_sq_error(
    wg: torch.Tensor, fmt: WeightFormat, scales: torch.Tensor, offsets: torch.Tensor | None
) -> torch.Tensor:
    """Per-group sum of squared reconstruction error ``[..., G]`` through the exact encode/decode path."""
    deq = decode_groups(encode_groups(wg, fmt, scales, offsets), fmt, scales, offsets)
    return (deq - wg).square_().sum(-1)


class BestPerGroup:
    """The lowest-error fp16 ``(scales, offsets)`` seen so far, per group, for search-based methods."""

    def __init__(self, wg: torch.Tensor, fmt: WeightFormat, scales: torch.Tensor, offsets: torch.Tensor | None) -> None:
        self.wg, self.fmt = wg, fmt
        self.scales, self.offsets = scales, offsets
        self.err = group_sq_error(wg, fmt, scales, offsets)

    def offer(self, scales: torch.Tensor, offsets: torch.Tensor | None) -> None:
        err = group_sq_error(self.wg, self.fmt, scales, offsets)
        better = err < self.err
        self.err = torch.where(better, err, self.err)
        self.scales = torch.where(better, scales, self.scales)
        if self.offsets is not None and offsets is not None:
            self.offsets = torch.where(better, offsets, self.offsets)


def row_chunks(rows: int, cols: int, max_elems: int = 1 << 22) -> list[slice]:
    """Row slices of at most ~``max_elems`` elements, to bound the temporaries of search-based methods."""
    step = max(1, max_elems // max(cols, 1))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


# -- the container --------------------------------------------------------------------------------
@dataclass(eq=False)
class QuantizedWeight:
    """A packed ``[out, in]`` weight. ``nbytes == fmt.storage_bits(out, in) // 8`` exactly.

    ``codes``: uint8; int and nf4 codes are bit-packed along the input dim (``[out, in*bits/8]``; a width
    that is not a multiple of 8 pads each row to whole 8-code words, see ``packing``), fp8 codes are the
    e4m3 bytes (``[out, in]``). ``scales`` / ``offsets``: fp16 ``[out, n_groups]``;
    ``offsets`` only for asymmetric int formats.

    Double-quantized formats (``d6``/``d8``) store ``qparams`` (packed parameter codes) and ``superscales``
    (fp16) instead; ``scales`` / ``offsets`` then hold their decoded values, for computing, and are not
    part of the stored bytes (:meth:`storage`, :attr:`nbytes`).
    """

    fmt: WeightFormat
    shape: tuple[int, int]
    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    method: str
    qparams: torch.Tensor | None = None
    superscales: torch.Tensor | None = None

    def __post_init__(self) -> None:
        out, inp = self.shape
        fmt = self.fmt
        if not fmt.is_quantized:
            raise FormatError(f"{fmt}: not a quantized weight format")
        fmt.check_applicable(inp)
        groups = inp // fmt.effective_group(inp)
        expect = {
            "codes": ((out, packed_numel(inp, fmt.bits)), torch.uint8),
            "scales": ((out, groups), torch.float16),
        }
        if fmt.has_offset:
            expect["offsets"] = ((out, groups), torch.float16)
        elif self.offsets is not None:
            raise ValueError(f"{fmt}: symmetric formats store no offsets")
        if fmt.scale_bits is not None:
            qshape, sshape = _dq.packed_shapes(fmt, out, inp)
            expect["qparams"], expect["superscales"] = (qshape, torch.uint8), (sshape, torch.float16)
        elif self.qparams is not None or self.superscales is not None:
            raise ValueError(f"{fmt}: only double-quantized formats store qparams / superscales")
        for name, (shape, dtype) in expect.items():
            t = getattr(self, name)
            if t is None or tuple(t.shape) != shape or t.dtype != dtype:
                got = None if t is None else (tuple(t.shape), t.dtype)
                raise ValueError(f"{fmt} {self.shape}: {name} must be {dtype} {shape}, got {got}")

    @classmethod
    def from_codes(
        cls,
        fmt: WeightFormat,
        codes: torch.Tensor,
        scales: torch.Tensor,
        offsets: torch.Tensor | None,
        method: str,
        dq: _dq.DoubleQuant | None = None,
    ) -> QuantizedWeight:
        """Pack unpacked ``uint8 [out, in]`` codes (fp8: e4m3 bytes) with their fp16 parameters (a
        double-quantized format also takes the ``dq`` that ``scales`` / ``offsets`` decode from)."""
        out, inp = codes.shape
        packed = codes.to(torch.uint8).contiguous() if fmt.kind == "fp8" else pack_bits(codes, fmt.bits)
        qparams = superscales = None
        if fmt.scale_bits is not None:
            if dq is None:
                raise ValueError(f"{fmt}: a double-quantized format needs its DoubleQuant parameters")
            qparams, superscales = dq.pack()
        return cls(
            fmt,
            (out, inp),
            packed,
            scales.contiguous(),
            None if offsets is None else offsets.contiguous(),
            method,
            qparams,
            superscales,
        )

    @classmethod
    def from_storage(
        cls, fmt: WeightFormat, shape: tuple[int, int], tensors: dict[str, torch.Tensor], method: str
    ) -> QuantizedWeight:
        """The weight from its stored tensors (:meth:`storage`), decoding double-quantized parameters."""
        if fmt.scale_bits is None:
            return cls(fmt, shape, tensors["codes"], tensors["scales"], tensors.get("offsets"), method)
        qparams, superscales = tensors["qparams"], tensors["superscales"]
        scales, offsets = _dq.unpack(fmt, shape[1], qparams, superscales).decode()
        return cls(fmt, shape, tensors["codes"], scales, offsets, method, qparams, superscales)

    def storage(self) -> dict[str, torch.Tensor]:
        """The tensors that are stored: ``codes`` + ``scales`` [+ ``offsets``], or ``codes`` + ``qparams`` +
        ``superscales`` for a double-quantized format."""
        if self.qparams is not None and self.superscales is not None:
            return {"codes": self.codes, "qparams": self.qparams, "superscales": self.superscales}
        out = {"codes": self.codes, "scales": self.scales}
        if self.offsets is not None:
            out["offsets"] = self.offsets
        return out

    @classmethod
    def encode(
        cls,
        weight: torch.Tensor,
        fmt: WeightFormat,
        scales: torch.Tensor,
        offsets: torch.Tensor | None,
        method: str,
    ) -> QuantizedWeight:
        """Quantize ``weight [out, in]`` against given fp16 ``scales``/``offsets`` ``[out, n_groups]``.

        A double-quantized format first quantizes the parameters themselves (:func:`_dq.fit`), and the
        codes are chosen against the decoded ones."""
        dq = None
        if fmt.scale_bits is not None:
            dq = double_quantize(weight, fmt, scales, offsets)
            scales, offsets = dq.decode()
        codes = encode_groups(group_view(weight, fmt), fmt, scales, offsets)
        return cls.from_codes(fmt, codes.reshape(weight.shape), scales, offsets, method, dq)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    def int_codes(self) -> torch.Tensor:
        """Unpacked codes ``uint8 [out, in]`` (fp8: the e4m3 bytes)."""
        if self.fmt.kind == "fp8":
            return self.codes
        return unpack_bits(self.codes, self.fmt.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight ``[out, in]`` the codes stand for (computed in fp32, then cast to ``dtype``)."""
        codes = group_view(self.int_codes(), self.fmt)
        return decode_groups(codes, self.fmt, self.scales, self.offsets).reshape(self.shape).to(dtype)

    @property
    def nbytes(self) -> int:
        """Stored bytes (decoded parameters of a double-quantized format excluded)."""
        return sum(t.numel() * t.element_size() for t in self.storage().values())

    def to(self, device: torch.device | str) -> QuantizedWeight:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return QuantizedWeight(
            self.fmt, self.shape, self.codes.to(device), self.scales.to(device), mv(self.offsets), self.method,
            mv(self.qparams), mv(self.superscales),
        )  # fmt: skip


_DQ_FIELDS = ("scale_codes", "super_scales", "offset_codes", "super_offsets")


def _cat_opt(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if parts[0] is None else torch.cat(parts, dim=0)  # type: ignore[arg-type]


def double_quantize(
    weight: torch.Tensor, fmt: WeightFormat, scales: torch.Tensor, offsets: torch.Tensor | None
) -> _dq.DoubleQuant:
    """A method's fp16 ``scales`` / ``offsets`` of ``weight [out, in]`` quantized for a ``d6``/``d8`` format
    (:func:`bitplan.quantizers._dq.fit`, a row chunk at a time to bound its temporaries)."""
    wg = group_view(weight, fmt)
    parts = [_dq.fit(wg[r].float(), fmt, scales[r], None if offsets is None else offsets[r])
             for r in row_chunks(*weight.shape)]  # fmt: skip
    return _dq.DoubleQuant(fmt, weight.shape[1], *(_cat_opt([getattr(p, f) for p in parts]) for f in _DQ_FIELDS))  # type: ignore[arg-type]


# -- quantizer base class and registry ------------------------------------------------------------
class WeightQuantizer(ABC):
    """Chooses a :class:`QuantizedWeight` for a float weight ``[out, in]`` in a given format."""

    name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    kinds: ClassVar[frozenset[str]] = frozenset()  # WeightFormat kinds this method handles

    def supports(self, fmt: WeightFormat) -> bool:
        return fmt.is_quantized and fmt.kind in self.kinds

    @abstractmethod
    def quantize(
        self, weight: torch.Tensor, fmt: WeightFormat, *, activations: torch.Tensor | None = None
    ) -> QuantizedWeight:
        """Quantize ``weight [out, in]``; ``activations [n_tokens, in]`` are calibration inputs if needed."""

    def quantize_hessian(self, weight: torch.Tensor, fmt: WeightFormat, h: torch.Tensor) -> QuantizedWeight:
        """Quantize against the accumulated input statistics ``X^T X / n`` (layer-wise calibration); only
        calibrated methods that work from the Hessian implement it."""
        raise BitplanError(f"weight quantizer {self.name!r} does not quantize from a Hessian")

    def _prepare(
        self, weight: torch.Tensor, fmt: WeightFormat, activations: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Validate the arguments and return the weight as contiguous float32."""
        if not self.supports(fmt):
            raise FormatError(f"weight quantizer {self.name!r} does not support format {fmt}")
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(
                f"expected a 2-D float weight [out, in], got {weight.dtype} {tuple(weight.shape)}"
            )
        fmt.check_applicable(weight.shape[1])
        if self.needs_calibration and activations is None:
            raise BitplanError(f"weight quantizer {self.name!r} needs calibration activations")
        if activations is not None and activations.shape[-1] != weight.shape[1]:
            raise ValueError(
                f"activations have {activations.shape[-1]} features, the weight has {weight.shape[1]} inputs"
            )
        return weight.detach().float().contiguous()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


WEIGHT_QUANTIZERS = Registry[type[WeightQuantizer]]("weight quantizer")
Q = TypeVar("Q", bound=type[WeightQuantizer])


def register_weight_quantizer(name: str) -> Callable[[Q], Q]:
    """Class decorator: register a :class:`WeightQuantizer` under ``name`` (twice is an error)."""

    def deco(cls: Q) -> Q:
        WEIGHT_QUANTIZERS.register(name)(cls)
        cls.name = name
        return cls

    return deco


def get_weight_quantizer(name: str, **options: Any) -> WeightQuantizer:
    """An instance of the quantizer registered as ``name``; unknown names list the registered ones."""
    return WEIGHT_QUANTIZERS.get(name)(**options)
