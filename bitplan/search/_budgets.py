"""Budgets: what a plan may cost, parsed from the command line and checked as Optuna constraints.

Every budget is a limit on one sum over the decisions (see :mod:`bitplan.search._space`), so a trial's
constraint values are ``metric - limit`` (feasible when <= 0, Optuna's convention) and the knapsack can
state the same limits as linear rows. Latency can be absolute (``12ms``) or relative to the all-16-bit
plan (``0.6x``); the relative form is resolved against whichever cost model the search uses.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from bitplan.errors import BitplanError

__all__ = ["Budgets", "parse_bytes", "parse_latency"]

_UNITS = {
    "": 1, "b": 1,
    "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_NUM = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"


def _positive(value: float, flag: str, text: Any) -> float:
    if not math.isfinite(value) or value <= 0:
        raise BitplanError(f"{flag} must be a positive number, got {text!r}")
    return value


def parse_bytes(text: str | float, flag: str = "--max-memory") -> float:
    """``60MB``, ``1.5GiB``, ``500kB`` or a plain number of bytes (decimal and binary units)."""
    if isinstance(text, (int, float)):
        return _positive(float(text), flag, text)
    m = re.fullmatch(_NUM + r"\s*([a-zA-Z]*)", str(text).strip())
    if m is None or m.group(2).lower() not in _UNITS:
        raise BitplanError(f"{flag}: cannot read {text!r}; use a size like 60MB, 1.5GiB or 500000000")
    return _positive(float(m.group(1)) * _UNITS[m.group(2).lower()], flag, text)


def parse_latency(text: str | float, flag: str = "--max-latency") -> tuple[float | None, float | None]:
    """``(ms, None)`` for ``12ms`` / ``12`` / ``0.5s``; ``(None, ratio)`` for ``0.6x`` (of the 16-bit plan)."""
    if isinstance(text, (int, float)):
        return _positive(float(text), flag, text), None
    m = re.fullmatch(_NUM + r"\s*(ms|s|x|)", str(text).strip().lower())
    if m is None:
        raise BitplanError(f"{flag}: cannot read {text!r}; use milliseconds (12ms) or a ratio of 16-bit (0.6x)")
    v = _positive(float(m.group(1)), flag, text)
    unit = m.group(2)
    if unit == "x":
        return None, v
    return (v * 1000.0 if unit == "s" else v), None


@dataclass(frozen=True)
class Budgets:
    """Limits on a plan; ``None`` = no limit. Memory in bytes (weights + KV at the search's batch/context)."""

    max_avg_bits: float | None = None
    max_memory: float | None = None
    max_kv_bits: float | None = None
    max_latency_ms: float | None = None
    max_latency_ratio: float | None = None  # of the all-16-bit plan's decode latency

    def __post_init__(self) -> None:
        for name, v in asdict(self).items():
            if v is not None and (not math.isfinite(v) or v <= 0):
                raise BitplanError(f"--{name.replace('_', '-').removesuffix('-ms').removesuffix('-ratio')} must be positive, got {v}")
        if self.max_latency_ms is not None and self.max_latency_ratio is not None:
            raise BitplanError("give --max-latency once: in ms or as a ratio of 16-bit, not both")

    @classmethod
    def parse(
        cls,
        max_avg_bits: str | float | None = None,
        max_memory: str | float | None = None,
        max_kv_bits: str | float | None = None,
        max_latency: str | float | None = None,
    ) -> Budgets:
        """From command-line strings (see :func:`parse_bytes`, :func:`parse_latency`)."""

        def num(v: str | float | None, flag: str) -> float | None:
            if v is None:
                return None
            try:
                return _positive(float(v), flag, v)
            except ValueError:
                raise BitplanError(f"{flag} must be a number, got {v!r}") from None

        ms, ratio = parse_latency(max_latency) if max_latency is not None else (None, None)
        return cls(
            max_avg_bits=num(max_avg_bits, "--max-avg-bits"),
            max_memory=parse_bytes(max_memory) if max_memory is not None else None,
            max_kv_bits=num(max_kv_bits, "--max-kv-bits"),
            max_latency_ms=ms,
            max_latency_ratio=ratio,
        )

    def latency_limit(self, reference_ms: float) -> float | None:
        """The latency budget in ms, given the 16-bit plan's latency under the search's cost model."""
        if self.max_latency_ratio is not None:
            return self.max_latency_ratio * reference_ms
        return self.max_latency_ms

    @property
    def has_latency(self) -> bool:
        return self.max_latency_ms is not None or self.max_latency_ratio is not None

    def latency_met(self, ms: float, ratio: float, margin: float = 0.0) -> bool | None:
        """Whether a *measured* decode latency (``ms``, and ``ratio`` to the 16-bit model timed alongside)
        meets the latency budget with ``margin`` to spare (0.03: within 97% of it); None without one. A
        ratio budget is checked on the ratio, never on ms from another run of the 16-bit model."""
        if self.max_latency_ratio is not None:
            return ratio <= self.max_latency_ratio * (1.0 - margin)
        if self.max_latency_ms is not None:
            return ms <= self.max_latency_ms * (1.0 - margin)
        return None

    def active(self) -> list[str]:
        return [k for k, v in asdict(self).items() if v is not None]

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)

    def describe(self) -> str:
        parts = []
        if self.max_avg_bits is not None:
            parts.append(f"avg weight bits <= {self.max_avg_bits:g}")
        if self.max_memory is not None:
            parts.append(f"memory <= {self.max_memory / 1e6:.1f} MB")
        if self.max_kv_bits is not None:
            parts.append(f"avg KV bits <= {self.max_kv_bits:g}")
        if self.max_latency_ms is not None:
            parts.append(f"decode latency <= {self.max_latency_ms:g} ms")
        if self.max_latency_ratio is not None:
            parts.append(f"decode latency <= {self.max_latency_ratio:g}x of 16-bit")
        return ", ".join(parts) or "no budgets"
