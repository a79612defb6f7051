"""Round-to-nearest: min-max ("rtn") and per-group clipping search ("rtn-mse").

``rtn`` sets each group's grid to cover exactly its smallest and largest weight. It is the baseline
every other method must beat, and it is idempotent: re-quantizing its output reproduces the same codes.

``rtn-mse`` shrinks that range by a ratio from a grid (1.0 down to ``min_ratio``) and keeps, per group,
the ratio with the smallest squared weight error. Clipping a few large weights buys a finer step for all
the others, which pays off at low bit widths. The search runs ratio by ratio, vectorised over every
group of a row chunk, through the same encode/decode path as the final quantization, so the error it
minimises is the error it ships. Ratio 1.0 is tried first and only a strictly smaller error replaces
it, so rtn-mse is never worse than rtn on any group. fp8's error is dominated by its mantissa, not its
range, so fp8 keeps plain absmax scaling.
"""

from __future__ import annotations

import torch

from bitplan.formats import WeightFormat
from bitplan.quantizers._base import (
    BestPerGroup,
    QuantizedWeight,
    WeightQuantizer,
    group_view,
    minmax_params,
    register_weight_quantizer,
    row_chunks,
)

__all__ = ["RTN", "RTNMSE"]


def _cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if parts[0] is None else torch.cat(parts, dim=0)  # type: ignore[arg-type]


@register_weight_quantizer("rtn")
class RTN(WeightQuantizer):
    """Min-max round-to-nearest for every quantized weight format (int sym/asym, nf4, fp8)."""

    kinds = frozenset({"int", "nf4", "fp8"})

    def quantize(
        self, weight: torch.Tensor, fmt: WeightFormat, *, activations: torch.Tensor | None = None
    ) -> QuantizedWeight:
        w = self._prepare(weight, fmt, activations)
        scales, offsets = self.params(w, fmt)
        return QuantizedWeight.encode(w, fmt, scales, offsets, self.name)

    def params(self, w: torch.Tensor, fmt: WeightFormat) -> tuple[torch.Tensor, torch.Tensor | None]:
        """fp16 ``(scales, offsets)`` ``[out, n_groups]`` for float32 ``w [out, in]``."""
        wg = group_view(w, fmt)
        return minmax_params(wg.amin(-1), wg.amax(-1), fmt)


@register_weight_quantizer("rtn-mse")
class RTNMSE(RTN):
    """Round-to-nearest with a per-group clipping ratio that minimises the group's weight MSE."""

    def __init__(self, grid: int = 20, min_ratio: float = 0.5) -> None:
        if grid < 1 or not 0.0 < min_ratio <= 1.0:
            raise ValueError(f"rtn-mse needs grid >= 1 and 0 < min_ratio <= 1, got {grid}, {min_ratio}")
        self.grid = grid
        self.min_ratio = min_ratio

    def ratios(self) -> list[float]:
        return torch.linspace(1.0, self.min_ratio, self.grid).tolist()

    def params(self, w: torch.Tensor, fmt: WeightFormat) -> tuple[torch.Tensor, torch.Tensor | None]:
        if fmt.kind == "fp8":
            return super().params(w, fmt)
        scales: list[torch.Tensor] = []
        offsets: list[torch.Tensor | None] = []
        for rows in row_chunks(*w.shape):
            s, o = self._search(group_view(w[rows], fmt), fmt)
            scales.append(s)
            offsets.append(o)
        return torch.cat(scales, dim=0), _cat(offsets)

    def _search(self, wg: torch.Tensor, fmt: WeightFormat) -> tuple[torch.Tensor, torch.Tensor | None]:
        lo, hi = wg.amin(-1), wg.amax(-1)
        best = BestPerGroup(wg, fmt, *minmax_params(lo, hi, fmt))
        for r in self.ratios()[1:]:
            best.offer(*minmax_params(lo * r, hi * r, fmt))
        return best.scales, best.offsets

    def __repr__(self) -> str:
        return f"RTNMSE(grid={self.grid}, min_ratio={self.min_ratio})"
