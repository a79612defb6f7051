"""AWQ's weight side (activation-aware clipping) and SmoothQuant's: the parts that live in one linear.

Both methods are mostly a *model transform*: a per-input-channel scale ``s`` multiplies a linear's weight
columns and divides the op that produces its input (a norm's weight, or the rows of the linear before),
so the float model computes the same function while the quantizer sees a different weight. That transform
needs the model's structure and runs in the layer-wise pass (:mod:`bitplan._smooth`); what a single
linear's quantizer does is registered here, so plans can name the methods and the contract suite can
check them:

* ``awq`` -- the clipping search of AWQ (Lin et al. 2023, "auto_clip"): per group, shrink the range by a
  ratio from 1.0 down to 0.5 and keep the ratio with the smallest *output* error on the calibration
  inputs, ``d^T H_gg d`` for the group's error ``d`` and the group's block of ``H = X^T X / n`` (cross-group
  terms ignored, as in AWQ). Unlike ``rtn-mse`` (weight error) it keeps the loud input channels exact and
  clips where inputs are quiet. Ratio 1.0 is tried first and only a strictly better ratio replaces it, so
  it never has a larger (block-diagonal) output error than min-max rounding.
* ``smoothquant`` -- the weight of a W8A8 unit after SmoothQuant's migration (Xiao et al. 2022) is rounded
  to nearest: the method's work is the scale ``s_j = max|x_j|^a / max|W_j|^(1-a)``, applied by the pass.

Used on its own (``quantize`` with activations, or ``quantize_hessian``), each is exactly the per-linear
part: no scale migration happens without the pass that can fold it.
"""

from __future__ import annotations

import torch

from bitplan.formats import WeightFormat
from bitplan.quantizers._base import (
    QuantizedWeight,
    WeightQuantizer,
    decode_groups,
    encode_groups,
    group_view,
    minmax_params,
    register_weight_quantizer,
    row_chunks,
)
from bitplan.quantizers._gptq import hessian
from bitplan.quantizers._rtn import RTN

__all__ = ["AWQ", "SmoothQuant"]


def _output_error(wg: torch.Tensor, fmt: WeightFormat, params: tuple[torch.Tensor, torch.Tensor | None],
                  blocks: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Per-group output error ``d^T H_gg d`` ``[rows, G]`` through the real encode/decode path."""
    s, o = params
    d = decode_groups(encode_groups(wg, fmt, s, o), fmt, s, o) - wg  # [rows, G, g]
    return torch.einsum("rgi,gij,rgj->rg", d, blocks, d)


@register_weight_quantizer("awq")
class AWQ(WeightQuantizer):
    """Activation-aware clipping (the per-linear half of AWQ) for integer and nf4 formats."""

    kinds = frozenset({"int", "nf4"})
    needs_calibration = True

    def __init__(self, grid: int = 20, min_ratio: float = 0.5) -> None:
        if grid < 1 or not 0.0 < min_ratio <= 1.0:
            raise ValueError(f"awq needs grid >= 1 and 0 < min_ratio <= 1, got {grid}, {min_ratio}")
        self.grid, self.min_ratio = grid, min_ratio

    def quantize(
        self, weight: torch.Tensor, fmt: WeightFormat, *, activations: torch.Tensor | None = None
    ) -> QuantizedWeight:
        w = self._prepare(weight, fmt, activations)
        assert activations is not None
        return self._run(w, fmt, hessian(activations.to(w.device)))

    def quantize_hessian(self, weight: torch.Tensor, fmt: WeightFormat, h: torch.Tensor) -> QuantizedWeight:
        inp = weight.shape[-1]
        if tuple(h.shape) != (inp, inp):
            raise ValueError(f"the Hessian must be [{inp}, {inp}], got {tuple(h.shape)}")
        return self._run(self._prepare(weight, fmt, h), fmt, h)

    def _run(self, w: torch.Tensor, fmt: WeightFormat, h: torch.Tensor) -> QuantizedWeight:
        out, inp = w.shape
        g = fmt.effective_group(inp)
        hf = h.to(w.device, torch.float32)
        blocks = torch.stack([hf[i : i + g, i : i + g] for i in range(0, inp, g)])  # [G, g, g]
        ratios = torch.linspace(1.0, self.min_ratio, self.grid).tolist()
        scales, offsets = [], []
        for rows in row_chunks(out, inp, 1 << 20):
            wg = group_view(w[rows], fmt)
            lo, hi = wg.amin(-1), wg.amax(-1)
            best = minmax_params(lo, hi, fmt)
            err = _output_error(wg, fmt, best, blocks)
            for r in ratios[1:]:
                cand = minmax_params(lo * r, hi * r, fmt)
                e = _output_error(wg, fmt, cand, blocks)
                better = e < err
                err = torch.where(better, e, err)
                best = (torch.where(better, cand[0], best[0]),
                        None if best[1] is None or cand[1] is None else torch.where(better, cand[1], best[1]))  # fmt: skip
            scales.append(best[0])
            offsets.append(best[1])
        off = None if offsets[0] is None else torch.cat(offsets, 0)  # type: ignore[arg-type]
        return QuantizedWeight.encode(w, fmt, torch.cat(scales, 0), off, self.name)

    def __repr__(self) -> str:
        return f"AWQ(grid={self.grid}, min_ratio={self.min_ratio})"


@register_weight_quantizer("smoothquant")
class SmoothQuant(RTN):
    """Round-to-nearest of a weight whose input channels were smoothed by the layer-wise pass."""

    needs_calibration = True

    def __init__(self, alpha: float = 0.5) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"smoothquant needs 0 <= alpha <= 1, got {alpha}")
        self.alpha = alpha

    def quantize_hessian(self, weight: torch.Tensor, fmt: WeightFormat, h: torch.Tensor) -> QuantizedWeight:
        return self.quantize(weight, fmt, activations=h)  # the statistics were spent on the migration

    def __repr__(self) -> str:
        return f"SmoothQuant(alpha={self.alpha})"
