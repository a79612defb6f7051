"""Candidate options the profiler scores and the search chooses from.

A *weight option* is a (format, quantizer method) pair: the same bits quantized by RTN or by HQQ are
different options with different harm. Options are fitted to each unit (``WeightFormat.fit_group``), so
a unit whose inputs a group size does not divide gets the nearest valid one (g128 -> g96 on 576-wide
inputs) and the row in the sensitivity table names the format really used. 16-bit options are not
scored: they are the reference (score 0 by definition).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from bitplan.errors import FormatError
from bitplan.formats import ActFormat, KVFormat, WeightFormat, parse_act, parse_kv, parse_weight

__all__ = ["Candidates", "WeightOption", "parse_kv_set", "parse_weight_option"]

DEFAULT_WEIGHTS = ("w8g64a", "w4g64a", "w4g32ad8", "w4g32a", "w3g64a", "w3g32a", "w2g64a")
DEFAULT_ACTS = ("a8t", "a4t")
DEFAULT_KV_BITS = (2, 4, 8, 16)  # {2,4,8} x {2,4,8} plus pairs with one 16-bit side


@dataclass(frozen=True)
class WeightOption:
    format: WeightFormat
    method: str = "rtn"

    def __str__(self) -> str:
        return f"{self.format}@{self.method}"

    def fitted(self, in_features: int) -> WeightOption:
        fmt = self.format.fit_group(in_features)
        return self if fmt == self.format else WeightOption(fmt, self.method)


def parse_weight_option(text: str, default_method: str = "rtn") -> WeightOption:
    """``w4g64a`` or ``w4g64a@hqq``."""
    fmt, _, method = text.partition("@")
    return WeightOption(parse_weight(fmt), method or default_method)


def _kv_pairs(bits: Iterable[int], tail: str = "") -> tuple[KVFormat, ...]:
    """Every (K bits, V bits) pair of a bit set, except the unquantized k16v16 reference; ``tail`` is a KV
    format's optional suffix (``g16``, ``r128``, ``s1``) given to every pair."""
    bits = sorted(set(bits))
    return tuple(parse_kv(f"k{k}v{v}{tail}") for k in bits for v in bits if k < 16 or v < 16)


_BIT_SET = re.compile(r"([0-9]+(?:,[0-9]+)*)((?:g[0-9]+)?(?:r[0-9]+)?(?:s[0-9]+)?)")


def parse_kv_set(item: str) -> tuple[KVFormat, ...]:
    """One ``--kv`` entry: a KV format (``k4v2``), or a bit set (``2,4,8``: every K x V pair of it) with an
    optional format suffix for all its pairs (``2,3,4,8s1``: the same pairs, each keeping 1 sink token)."""
    if m := _BIT_SET.fullmatch(item):
        try:
            return _kv_pairs((int(b) for b in m.group(1).split(",")), m.group(2))
        except FormatError as e:  # name the user's entry, not the pair it expanded to
            raise FormatError(f"KV bit set {item!r}: {e}") from None
    return (parse_kv(item),)


@dataclass(frozen=True)
class Candidates:
    """What the profiler scores: weight options per unit, activation formats per layer, K/V pairs per layer."""

    weights: tuple[WeightOption, ...] = field(default_factory=lambda: tuple(parse_weight_option(s) for s in DEFAULT_WEIGHTS))
    acts: tuple[ActFormat, ...] = field(default_factory=lambda: tuple(parse_act(s) for s in DEFAULT_ACTS))
    kv: tuple[KVFormat, ...] = field(default_factory=lambda: _kv_pairs(DEFAULT_KV_BITS))

    def __post_init__(self) -> None:
        for w in self.weights:
            if not w.format.is_quantized:
                raise FormatError(f"{w.format} is the 16-bit reference, not a candidate to score")
        if any(not a.is_quantized for a in self.acts):
            raise FormatError("a16 is the reference, not a candidate activation format")
        if any(not k.is_quantized for k in self.kv):
            raise FormatError("k16v16 is the reference, not a candidate KV format")

    @classmethod
    def parse(
        cls,
        weights: Sequence[str] | None = None,
        acts: Sequence[str] | None = None,
        kv: Sequence[str] | None = None,
        *,
        method: str = "rtn",
    ) -> Candidates:
        """From strings; ``None`` keeps the default list, an empty list scores nothing of that kind.

        ``kv`` entries are KV formats (``k4v2``) or a bit set like ``2,4,8`` meaning all K x V pairs, with
        an optional format suffix for every pair (``2,3,4,8s1``), see :func:`parse_kv_set`.
        """
        default = cls()
        w = default.weights if weights is None else tuple(parse_weight_option(s, method) for s in weights)
        a = default.acts if acts is None else tuple(parse_act(s) for s in acts)
        if kv is None:
            k = default.kv
        else:
            pairs: list[KVFormat] = []
            for item in kv:
                pairs.extend(parse_kv_set(item))
            k = tuple(dict.fromkeys(pairs))
        return cls(w, a, k)

    def weight_options(self, in_features: int) -> list[WeightOption]:
        """The options as they apply to a unit with ``in_features`` inputs (fitted, deduplicated)."""
        return list(dict.fromkeys(w.fitted(in_features) for w in self.weights))

    def to_dict(self) -> dict[str, list[str]]:
        return {"weights": [str(w) for w in self.weights], "acts": [str(a) for a in self.acts], "kv": [str(k) for k in self.kv]}
