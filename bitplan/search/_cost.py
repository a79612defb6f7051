"""Cost models: decode latency per option, additive over decisions, behind one small interface.

The search asks a cost model for one latency (ms per decoded token) per decision and option plus a fixed
part for everything no plan changes; a plan's latency is their sum. That is how measured hardware profiles
work too (one kernel per unit shape and format, one attention per layer and KV format: see
``bitplan.profiles``), so the search, its budgets and its knapsack do not care which model stands behind.

Until a hardware profile exists for the device, :class:`BytesCostModel` stands in, and says so in every
report: batch-1 decoding is memory-bound, so it charges each option its bytes read per token over one
bandwidth. It cannot see kernel overheads (small shapes, 3-bit unpacking, dequantization arithmetic) --
which is exactly what the profiles issue measures. A *ratio* budget (``0.6x``) does not depend on the
bandwidth at all, since every term scales by it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bitplan.search._space import SearchSpace

__all__ = ["BytesCostModel", "CostModel", "LatencyTable"]


@dataclass(frozen=True)
class LatencyTable:
    """Per decision, ms per token for each option; plus the fixed ms of everything else.

    ``exact``: where a plan's latency is not quite a sum over decisions (a layer's activation format
    changes which kernel its linears run), a picklable callable giving the exact figure for a choice; the
    study's objectives and budgets use it, the knapsack seeds the additive part.
    """

    per_option: list[np.ndarray]
    fixed_ms: float
    source: str  # what the numbers are: "bytes-based estimate (...)" or "measured profile ..."
    exact: Callable[[Sequence[int]], float] | None = None

    def additive(self, index: Sequence[int]) -> float:
        return self.fixed_ms + float(sum(a[j] for a, j in zip(self.per_option, index, strict=True)))

    def total(self, index: Sequence[int]) -> float:
        return self.exact(list(index)) if self.exact is not None else self.additive(index)

    def reference(self) -> float:
        """Latency of the all-16-bit choice (option 0 everywhere)."""
        return self.total([0] * len(self.per_option))


class CostModel(ABC):
    """Decode latency of every option of a search space."""

    name: str = "cost model"

    @abstractmethod
    def latency(self, space: SearchSpace) -> LatencyTable:
        """ms per decoded token at ``space.batch`` sequences and ``space.context`` cached tokens."""

    def kernel_latency(self) -> Callable[[Any, Any], float | None] | None:
        """How to rank kernels when a plan is applied to be timed (``apply_plan(latency=...)``), so the
        measured plan runs the kernels this cost model priced; None: the static preference."""
        return None


@dataclass(frozen=True)
class BytesCostModel(CostModel):
    """Stand-in latency: bytes read per decoded token / ``bandwidth`` (GB/s). Clearly an estimate."""

    bandwidth_gbs: float = 20.0
    name: str = "bytes"

    def latency(self, space: SearchSpace) -> LatencyTable:
        ms_per_byte = 1e3 / (self.bandwidth_gbs * 1e9)
        g = space.graph
        per: list[np.ndarray] = []
        for d, bits, kvb in zip(space.decisions, space.arrays("storage_bits"), space.arrays("kv_bytes"), strict=True):
            if d.kind == "weight":
                per.append(bits / 8 * ms_per_byte)  # every weight read once per step (shared by the batch)
            elif d.kind == "head":  # a tied head's packed embedding copy is stored, but a step reads one row of it
                per.append(np.array([o.nominal_bits * d.params for o in d.options]) / 8 * ms_per_byte)
            elif d.kind == "kv":
                per.append(kvb * ms_per_byte)  # the whole cache read once per step
            else:
                per.append(np.zeros(len(d.options)))  # activation formats move no weight bytes
        # Everything not decided is read once per step too: undecided units, norms and the lm_head. The input
        # embedding reads one row, so an untied embedding matrix costs nothing; a tied one is the head.
        embedding = 0 if g.tied_embeddings else 2 * g.vocab_size * g.hidden_size
        fixed_bytes = space.fixed_weight_bytes - embedding + space.fixed_kv_bytes()
        return LatencyTable(per, fixed_bytes * ms_per_byte,
                            f"bytes-based estimate at {self.bandwidth_gbs:g} GB/s (no hardware profile)")  # fmt: skip
