"""Numeric formats: frozen, hashable, validated, each with one canonical string.

Three families, one per thing a plan decides:

* :class:`WeightFormat` -- how a linear unit's weight is stored (``w4g64a``, ``w8c``, ``nf4g64``, ``fp8``, ``bf16``).
* :class:`ActFormat` -- how a linear's input activations are quantized on the fly (``a16``, ``a8t``).
* :class:`KVFormat` -- how one attention layer's K and V cache entries are stored (``k8v8``, ``k4v2g32r128``).

Storage accounting is exact, because the search's memory budget adds these numbers up and the packed
model must hold what the plan says (checked to 1%). Conventions, shared with the packer:

* codes are bit-packed densely along each row: 8 codes in ``b`` bytes, a row padded to a multiple of
  8 codes (no padding for any real LLM width; stories260k's 172-wide MLP pads 4 codes a row);
* every scale and every offset is one 16-bit float, unless the format double-quantizes them (``d6``/``d8``);
* a group size is a multiple of 8 so that each group packs into whole bytes at any bit width;
* asymmetric formats store ``(scale, offset)`` per group and decode ``w = scale * q + offset``
  (an offset in weight units, like llama.cpp's Q4_1 "min", is well conditioned in fp16; a zero-point in
  code units is not); symmetric formats store ``scale`` alone and decode ``w = scale * (q - 2**(b-1))``.

Grammar (``parse`` errors quote it)::

    weight  bf16 | fp16                 unquantized
            w<2-8>g<G>[a]               integer, groups of G input features, symmetric or (a)symmetric
            w<2-8>c[a]                  integer, one scale per output channel
            nf4g<G> | nf4c              4-bit NormalFloat codebook, absmax scale per group / channel
            ...g<G>[a]d6 | ...g<G>[a]d8 double-quantized scales (and offsets), see below
            fp8                         float8 e4m3, one scale per output channel
    act     a16 | a8t | a4t | afp8t     none, or dynamic per-token int8 / int4 / fp8 e4m3
    kv      k<B>[c|t]v<B>[c|t][g<G>][r<R>][s<S>]
            B in {2,3,4,8,16}; K is per-channel (c) and V per-token (t) by default (KIVI);
            G = group size, default 32 (tokens for a per-channel side, head-dim channels for a
            per-token side, capped at head_dim); R = most recent tokens kept at 16 bits, default 0;
            S = first ("sink") tokens of the sequence kept at 16 bits, default 0.
            k16v16 is an unquantized cache.

Double-quantized scales (suffix ``d6`` / ``d8`` on a grouped int or nf4 format: ``w4g32ad8``, ``nf4g64d8``).
At group 32, fp16 scales and offsets cost a whole bit per weight. These formats store each group's scale
(and offset) as an unsigned ``S``-bit code times one fp16 "super-scale" per super-block (one for the
scales, one for the offsets), QLoRA's double quantization:

* ``d6`` -- llama.cpp's k-quant layout: 6-bit codes, super-blocks of 256 weights (``256 / G`` groups; G must
  divide 256). ``w4g32ad6`` is Q4_K's 4.5 bits on a 256-multiple row.
* ``d8`` -- QLoRA's layout: 8-bit codes, super-blocks of up to 256 *groups* of one row. ``w4g32ad8`` costs
  ``4 + 16/32 + 32/in`` bits: 4.52 on a 1536-wide row, 4.56 on a 576-wide one.

Super-blocks never span rows (a row's last one may be partial), so every row stays independently
decodable; a row's parameter codes are bit-packed like weight codes (padded to 8 codes a row). Offsets of a
double-quantized asymmetric format are ``<= 0`` (``offset = -superscale * code``, as k-quants store a
"min"): a group whose weights are all positive is stored on a grid that starts at 0.
Why two variants: on weights that were themselves a 4-bit grid with free fp16 scales (the main test
model), 6-bit scale codes cannot land on the source grid and cost ~1.4% perplexity at ``w4g32ad6``, while
``d8`` stays within 0.2%; ``d6`` is the cheaper, llama.cpp-compatible layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Literal

from bitplan.errors import FormatError

__all__ = [
    "ActFormat",
    "Format",
    "KVFormat",
    "WeightFormat",
    "SCALE_BITS",
    "parse",
    "parse_act",
    "parse_kv",
    "parse_weight",
]

SCALE_BITS = 16  # every scale / offset is stored as one 16-bit float
KV_BITS = (2, 3, 4, 8, 16)
KV_DEFAULT_GROUP = 32
DQ_BITS = (6, 8)  # double-quantized scale codes

WEIGHT_GRAMMAR = (
    "bf16 | fp16 | w<2-8>g<G>[a][d6|d8] | w<2-8>c[a] | nf4g<G>[d6|d8] | nf4c | fp8  (G a multiple of 8; "
    "d6/d8: double-quantized scales)"
)
ACT_GRAMMAR = "a16 | a8t | a4t | afp8t"
KV_GRAMMAR = "k<B>[c|t]v<B>[c|t][g<G>][r<R>][s<S>]  (B in 2,3,4,8,16; e.g. k8v8, k4v2, k2v2g32, k4v2r128, k3v3s1, k16v16)"

WeightKind = Literal["int", "nf4", "fp8", "float"]


def _check_group(group: int | None, what: str) -> None:
    if group is not None and (group < 8 or group % 8):
        raise FormatError(f"{what}: group size {group} must be a positive multiple of 8")


@dataclass(frozen=True)
class WeightFormat:
    """Storage format of one weight tensor. ``group_size=None`` means one scale per output channel."""

    kind: WeightKind
    bits: int
    group_size: int | None = None
    symmetric: bool = True
    float_dtype: Literal["bf16", "fp16"] = "bf16"  # only for kind == "float"
    scale_bits: int | None = None  # double-quantized scale/offset codes (6 or 8), see the module docstring

    def __post_init__(self) -> None:
        k, b = self.kind, self.bits
        if self.scale_bits is not None:
            if self.scale_bits not in DQ_BITS:
                raise FormatError(f"double-quantized scales are 6 or 8 bits, got {self.scale_bits}")
            if k not in ("int", "nf4") or self.group_size is None:
                raise FormatError("double-quantized scales (d6/d8) need a grouped int or nf4 format")
            if self.scale_bits == 6 and 256 % self.group_size:
                raise FormatError(f"d6 super-blocks hold 256 weights: group size {self.group_size} must divide 256")
        if k == "int":
            if not 2 <= b <= 8:
                raise FormatError(f"integer weight bits must be 2-8, got {b}")
            _check_group(self.group_size, f"w{b}")
        elif k == "nf4":
            if b != 4 or not self.symmetric:
                raise FormatError("nf4 is a 4-bit symmetric (absmax) codebook format")
            _check_group(self.group_size, "nf4")
        elif k == "fp8":
            if b != 8 or self.group_size is not None or not self.symmetric:
                raise FormatError("fp8 is e4m3 with one scale per output channel")
        elif k == "float":
            if b != 16 or self.group_size is not None or self.float_dtype not in ("bf16", "fp16"):
                raise FormatError("unquantized weights are bf16 or fp16")
        else:
            raise FormatError(f"unknown weight format kind {k!r}")

    # -- identity -------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> WeightFormat:
        return parse_weight(text)

    def __str__(self) -> str:
        if self.kind == "float":
            return self.float_dtype
        if self.kind == "fp8":
            return "fp8"
        gran = "c" if self.group_size is None else f"g{self.group_size}"
        dq = "" if self.scale_bits is None else f"d{self.scale_bits}"
        if self.kind == "nf4":
            return f"nf4{gran}{dq}"
        return f"w{self.bits}{gran}{'' if self.symmetric else 'a'}{dq}"

    @property
    def is_quantized(self) -> bool:
        return self.kind != "float"

    @property
    def has_offset(self) -> bool:
        return self.kind == "int" and not self.symmetric

    @property
    def compute_format(self) -> WeightFormat:
        """The format kernels compute in: the same codes with fp16 scales (``self`` unless double-quantized)."""
        return self if self.scale_bits is None else replace(self, scale_bits=None)

    def superblock_groups(self, in_features: int) -> int:
        """Groups per super-block of a double-quantized format (the last one of a row may hold fewer)."""
        if self.scale_bits is None:
            raise FormatError(f"{self}: scales are not double-quantized")
        g = self.effective_group(in_features)
        return 256 // g if self.scale_bits == 6 else 256

    def param_layout(self, in_features: int) -> tuple[int, int]:
        """``(groups, super-blocks)`` per row."""
        groups = in_features // self.effective_group(in_features)
        if self.scale_bits is None:
            return groups, 0
        return groups, -(-groups // self.superblock_groups(in_features))

    # -- applicability --------------------------------------------------------------------------
    def effective_group(self, in_features: int) -> int:
        """Number of input features that share one scale (``in_features`` when per-channel)."""
        return in_features if self.group_size is None else self.group_size

    def check_applicable(self, in_features: int) -> None:
        """Raise :class:`FormatError` unless a ``[out, in_features]`` weight can be stored in this format."""
        if not self.is_quantized:
            return
        if self.group_size is not None and in_features % self.group_size:
            raise FormatError(f"{self}: group size {self.group_size} does not divide the input features {in_features}")

    def fit_group(self, in_features: int) -> WeightFormat:
        """This format with the largest valid group size <= the requested one that divides ``in_features``.

        When no multiple of 8 does (stories260k's 172-wide MLP), the limit of the family is used: one
        scale per output channel.
        """
        if self.group_size is None or in_features % self.group_size == 0:
            return self
        for g in range(self.group_size - self.group_size % 8, 7, -8):
            if in_features % g == 0 and (self.scale_bits != 6 or 256 % g == 0):
                return replace(self, group_size=g)
        return replace(self, group_size=None, scale_bits=None)

    # -- storage --------------------------------------------------------------------------------
    def storage_bits(self, out_features: int, in_features: int) -> int:
        """Exact bits to store an ``[out_features, in_features]`` weight: codes, scales and offsets."""
        if not self.is_quantized:
            return 16 * out_features * in_features
        self.check_applicable(in_features)
        padded = in_features if self.bits == 8 else -(-in_features // 8) * 8  # whole 8-code words per row
        groups, supers = self.param_layout(in_features)
        params = 2 if self.has_offset else 1  # scale (+ offset) per group
        if self.scale_bits is None:
            return self.bits * out_features * padded + SCALE_BITS * params * groups * out_features
        codes = -(-groups * params // 8) * 8 if self.scale_bits < 8 else groups * params  # packed like weight codes
        return out_features * (self.bits * padded + self.scale_bits * codes + SCALE_BITS * params * supers)

    def bits_per_weight(self, in_features: int) -> float:
        """Average stored bits per element, scale and offset overhead included."""
        return self.storage_bits(1, in_features) / in_features


ActKind = Literal["none", "int", "fp8"]


@dataclass(frozen=True)
class ActFormat:
    """Dynamic (computed at run time) quantization of a linear's input, one scale per token."""

    kind: ActKind = "none"
    bits: int = 16

    def __post_init__(self) -> None:
        ok = (self.kind, self.bits) in {("none", 16), ("int", 8), ("int", 4), ("fp8", 8)}
        if not ok:
            raise FormatError(f"unsupported activation format kind={self.kind!r} bits={self.bits}; grammar: {ACT_GRAMMAR}")

    @classmethod
    def parse(cls, text: str) -> ActFormat:
        return parse_act(text)

    def __str__(self) -> str:
        if self.kind == "none":
            return "a16"
        return "afp8t" if self.kind == "fp8" else f"a{self.bits}t"

    @property
    def is_quantized(self) -> bool:
        return self.kind != "none"


Axis = Literal["channel", "token"]


@dataclass(frozen=True)
class KVFormat:
    """Per-layer KV cache format: K and V bits chosen separately (KIVI / KVTuner).

    A per-channel side groups ``group_size`` consecutive tokens under one scale and offset per channel,
    so up to ``group_size - 1`` newest tokens wait in 16 bits until their group is full; a per-token side
    groups ``min(group_size, head_dim)`` channels of one token. ``recent`` newest tokens always stay 16-bit.
    Quantized cache entries are asymmetric (scale + offset), as in KIVI.

    ``sink`` first tokens of the sequence also stay 16-bit. Why: decoders park attention mass on the first
    token(s) ("attention sinks", Xiao et al. 2023), whose keys and values are outliers unlike any later
    token's. Quantized, a sink both loses its own precision where it matters most and, on the per-channel K
    side, stretches the range of every channel of the group it shares with the next tokens. Keeping one or a
    few exact costs a constant ``sink`` tokens of 16-bit storage per layer, independent of the context (see
    :meth:`fixed_bytes`); on SmolLM2-135M, ``s1`` cuts the KL of uniform ``k4v3`` about 3x.
    """

    k_bits: int = 16
    v_bits: int = 16
    group_size: int = KV_DEFAULT_GROUP
    k_axis: Axis = "channel"
    v_axis: Axis = "token"
    recent: int = 0
    sink: int = 0

    def __post_init__(self) -> None:
        for side, b in (("K", self.k_bits), ("V", self.v_bits)):
            if b not in KV_BITS:
                raise FormatError(f"{side} bits must be one of {KV_BITS}, got {b}")
        for side, ax in (("K", self.k_axis), ("V", self.v_axis)):
            if ax not in ("channel", "token"):
                raise FormatError(f"{side} axis must be 'channel' or 'token', got {ax!r}")
        _check_group(self.group_size, "kv")
        if self.recent < 0:
            raise FormatError(f"recent window must be >= 0, got {self.recent}")
        if self.sink < 0:
            raise FormatError(f"sink tokens must be >= 0, got {self.sink}")

    @classmethod
    def parse(cls, text: str) -> KVFormat:
        return parse_kv(text)

    def __str__(self) -> str:
        k_ax = "" if self.k_axis == "channel" else "t"
        v_ax = "" if self.v_axis == "token" else "c"
        s = f"k{self.k_bits}{k_ax}v{self.v_bits}{v_ax}"
        if self.group_size != KV_DEFAULT_GROUP:
            s += f"g{self.group_size}"
        if self.recent:
            s += f"r{self.recent}"
        if self.sink:
            s += f"s{self.sink}"
        return s

    @property
    def is_quantized(self) -> bool:
        return self.k_bits < 16 or self.v_bits < 16

    def side(self, which: Literal["k", "v"]) -> tuple[int, Axis]:
        return (self.k_bits, self.k_axis) if which == "k" else (self.v_bits, self.v_axis)

    def effective_group(self, which: Literal["k", "v"], head_dim: int) -> int:
        _, axis = self.side(which)
        return self.group_size if axis == "channel" else min(self.group_size, head_dim)

    def check_applicable(self, head_dim: int) -> None:
        for which in ("k", "v"):
            bits, axis = self.side(which)  # type: ignore[arg-type]
            if bits == 16:
                continue
            if head_dim % 8:
                raise FormatError(f"{self}: head_dim {head_dim} is not a multiple of 8, cannot bit-pack")
            g = self.effective_group(which, head_dim)  # type: ignore[arg-type]
            if axis == "token" and head_dim % g:
                raise FormatError(f"{self}: group size {g} does not divide head_dim {head_dim}")

    def bits_per_element(self, which: Literal["k", "v"], head_dim: int) -> float:
        """Steady-state stored bits per cached element of K or V (the 16-bit waiting tokens excluded)."""
        bits, _ = self.side(which)
        if bits == 16:
            return 16.0
        return bits + 2 * SCALE_BITS / self.effective_group(which, head_dim)

    def bytes_per_token(self, num_kv_heads: int, head_dim: int) -> float:
        """Steady-state bytes one token adds to this layer's cache (K and V, all KV heads)."""
        per_elem = self.bits_per_element("k", head_dim) + self.bits_per_element("v", head_dim)
        return num_kv_heads * head_dim * per_elem / 8

    def fixed_bytes(self, num_kv_heads: int, head_dim: int) -> float:
        """Bytes this layer holds beyond ``bytes_per_token * tokens`` once the sequence is past its sinks:
        the ``sink`` first tokens stay 16-bit instead of costing the steady-state rate (0 if unquantized)."""
        if not self.is_quantized or not self.sink:
            return 0.0
        return self.sink * (KVFormat().bytes_per_token(num_kv_heads, head_dim) - self.bytes_per_token(num_kv_heads, head_dim))

    def bytes_for(self, num_kv_heads: int, head_dim: int, tokens: int) -> float:
        """Steady-state bytes of this layer's cache holding ``tokens`` tokens (one sequence): the per-token
        rate plus the sink tokens' 16-bit surplus (the 16-bit waiting tokens of a filling group excluded)."""
        if tokens <= 0:
            return 0.0
        surplus = self.fixed_bytes(num_kv_heads, head_dim)
        return tokens * self.bytes_per_token(num_kv_heads, head_dim) + (surplus * min(self.sink, tokens) / self.sink if surplus else 0.0)


Format = WeightFormat | ActFormat | KVFormat

# -- parsing ------------------------------------------------------------------------------------
_W_INT = re.compile(r"w([2-8])(?:g([1-9][0-9]*)|(c))(a?)(?:d([1-9][0-9]*))?")
_W_NF4 = re.compile(r"nf4(?:g([1-9][0-9]*)|(c))(?:d([1-9][0-9]*))?")
_KV = re.compile(r"k(2|3|4|8|16)([ct]?)v(2|3|4|8|16)([ct]?)(?:g([1-9][0-9]*))?(?:r(0|[1-9][0-9]*))?(?:s(0|[1-9][0-9]*))?")


def _bad(text: object, what: str, grammar: str, why: str = "") -> FormatError:
    reason = f" ({why})" if why else ""
    return FormatError(f"invalid {what} format {text!r}{reason}; expected {grammar}")


def parse_weight(text: str) -> WeightFormat:
    """Parse a weight format string strictly: no spaces, lower case, canonical letters only."""
    if not isinstance(text, str):
        raise _bad(text, "weight", WEIGHT_GRAMMAR, "not a string")
    try:
        if text in ("bf16", "fp16"):
            return WeightFormat("float", 16, float_dtype=text)  # type: ignore[arg-type]
        if text == "fp8":
            return WeightFormat("fp8", 8)
        if m := _W_INT.fullmatch(text):
            bits, group, _, asym, dq = m.groups()
            return WeightFormat(
                "int", int(bits), int(group) if group else None, symmetric=not asym, scale_bits=int(dq) if dq else None
            )
        if m := _W_NF4.fullmatch(text):
            group, _, dq = m.groups()
            return WeightFormat("nf4", 4, int(group) if group else None, scale_bits=int(dq) if dq else None)
    except FormatError as e:
        raise _bad(text, "weight", WEIGHT_GRAMMAR, str(e)) from None
    raise _bad(text, "weight", WEIGHT_GRAMMAR)


def parse_act(text: str) -> ActFormat:
    table = {"a16": ActFormat(), "a8t": ActFormat("int", 8), "a4t": ActFormat("int", 4), "afp8t": ActFormat("fp8", 8)}
    if isinstance(text, str) and text in table:
        return table[text]
    raise _bad(text, "activation", ACT_GRAMMAR)


def parse_kv(text: str) -> KVFormat:
    if not isinstance(text, str):
        raise _bad(text, "KV", KV_GRAMMAR, "not a string")
    m = _KV.fullmatch(text)
    if not m:
        raise _bad(text, "KV", KV_GRAMMAR)
    kb, kax, vb, vax, group, recent, sink = m.groups()
    try:
        return KVFormat(
            k_bits=int(kb),
            v_bits=int(vb),
            group_size=int(group) if group else KV_DEFAULT_GROUP,
            k_axis="token" if kax == "t" else "channel",
            v_axis="channel" if vax == "c" else "token",
            recent=int(recent) if recent else 0,
            sink=int(sink) if sink else 0,
        )
    except FormatError as e:
        raise _bad(text, "KV", KV_GRAMMAR, str(e)) from None


def parse(text: str) -> Format:
    """Parse any format string; the family is told by its first letter (k..v = KV, a = activation)."""
    if isinstance(text, str):
        if text.startswith("k"):
            return parse_kv(text)
        if text.startswith("a"):
            return parse_act(text)
    return parse_weight(text)
