"""GPTQ: round column by column and push each column's rounding error onto the columns not yet rounded.

What it minimises. For one linear with calibration inputs ``X [n, in]`` the output error of a quantized
weight is ``||X (Q - W)^T||^2 = sum_rows (q - w) H (q - w)^T`` with ``H = X^T X`` (the Hessian of that
loss up to 2/n). Round-to-nearest ignores ``H``: it treats every input channel as independent and equally
loud. GPTQ (Frantar et al. 2022, after Optimal Brain Quantization) rounds input column ``i`` and then
updates the remaining columns by ``-err_i * Hinv[i, j>i] / Hinv[i, i]``, the least-squares correction
given the correlations in ``H``, so later columns absorb what earlier ones lost. With the upper Cholesky
factor ``U`` of ``H^-1`` the updates of one column are a row of ``U``; they are applied within a block of
128 columns at once and to the rest of the matrix once per block ("lazy batch" updates: the matrix is
touched ``in / 128`` times, not ``in`` times).

Numerics, and why each choice:
* damping ``percdamp * mean(diag H)`` on the diagonal: ``H`` from a few thousand tokens is often singular
  (dead channels, more inputs than tokens in a group of heads); dead channels (``H_ii = 0``) also get
  their weights zeroed, as they never reach the output.
* everything in float64 for the Cholesky steps and float32 for the updates: ``H`` of a 1536-wide input
  spans many orders of magnitude, and a failed Cholesky leaves no usable result. If it still fails, the
  damping is raised tenfold (up to three times) before giving up.
* groups: a group's fp16 scale and offset are chosen (min-max, the same rule as ``rtn``) from the
  *updated* weights when the first column of the group is reached, as the reference implementation
  does; the codes are then produced by the one shared encode path, so the packed result decodes to
  exactly what was used for the error feedback.
* act-order (``act_order=True``): columns are visited by decreasing ``H_ii`` (the loudest inputs first,
  while the most columns are left to absorb their error). Groups are then fixed up front from the
  original weights ("static groups"), so that the stored layout stays the plain contiguous-group one every
  kernel reads -- no permutation index to store.
* double-quantized formats (``d6``/``d8``) also use static groups: a super-block's scale must be known
  before its first group is rounded, so all parameters are fixed (and double-quantized) up front.
"""

from __future__ import annotations

import torch

from bitplan.errors import BitplanError
from bitplan.formats import WeightFormat
from bitplan.quantizers._base import (
    QuantizedWeight,
    WeightQuantizer,
    decode_groups,
    double_quantize,
    encode_groups,
    minmax_params,
    register_weight_quantizer,
)
from bitplan.quantizers._rtn import RTN

__all__ = ["GPTQ", "hessian"]


def hessian(activations: torch.Tensor) -> torch.Tensor:
    """``X^T X / n`` in float64 for inputs ``[..., in]`` (flattened over every leading dim)."""
    x = activations.reshape(-1, activations.shape[-1]).double()
    return x.T @ x / max(1, x.shape[0])


def _inverse_cholesky(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1`` (float64), raising the damping if ``H`` is not PD."""
    diag = torch.diagonal(h)
    damp = percdamp * float(diag.mean()) if float(diag.mean()) > 0 else 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(4):
        try:
            lower = torch.linalg.cholesky(h + damp * eye)
            hinv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(hinv, upper=True)
        except torch.linalg.LinAlgError:
            damp *= 10.0
    raise BitplanError("GPTQ: the calibration Hessian is not positive definite even with 1000x damping")


@register_weight_quantizer("gptq")
class GPTQ(WeightQuantizer):
    """GPTQ for integer formats (symmetric or asymmetric, per channel or grouped)."""

    kinds = frozenset({"int"})
    needs_calibration = True

    def __init__(self, block_size: int = 128, percdamp: float = 0.01, act_order: bool = False) -> None:
        if block_size < 1 or not 0.0 < percdamp < 1.0:
            raise ValueError(f"gptq needs block_size >= 1 and 0 < percdamp < 1, got {block_size}, {percdamp}")
        self.block_size, self.percdamp, self.act_order = block_size, percdamp, act_order

    def quantize(
        self, weight: torch.Tensor, fmt: WeightFormat, *, activations: torch.Tensor | None = None
    ) -> QuantizedWeight:
        w = self._prepare(weight, fmt, activations)
        assert activations is not None  # _prepare raised otherwise
        return self._run(w, fmt, hessian(activations.to(w.device)))

    def quantize_hessian(self, weight: torch.Tensor, fmt: WeightFormat, h: torch.Tensor) -> QuantizedWeight:
        """GPTQ against an accumulated ``H [in, in]`` (see :func:`hessian`; any positive scale works)."""
        inp = weight.shape[-1]
        if tuple(h.shape) != (inp, inp):
            raise ValueError(f"the Hessian must be [{inp}, {inp}], got {tuple(h.shape)}")
        return self._run(self._prepare(weight, fmt, h), fmt, h)  # H [in, in] stands in for the activations

    def _run(self, w: torch.Tensor, fmt: WeightFormat, h: torch.Tensor) -> QuantizedWeight:
        """The algorithm, on a prepared float32 copy ``w`` (updated in place)."""
        out, inp = w.shape
        h = h.to(w.device, torch.float64).clone()
        dead = torch.diagonal(h) <= 0
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
        g = fmt.effective_group(inp)
        n_groups = inp // g
        scales = torch.empty(out, n_groups, dtype=torch.float16, device=w.device)
        offsets = torch.empty_like(scales) if fmt.has_offset else None
        static = self.act_order or fmt.scale_bits is not None
        dq = None
        if static:  # static groups from the original weights (see the module docstring)
            s0, o0 = RTN().params(w, fmt)
            if fmt.scale_bits is not None:
                dq = double_quantize(w, fmt, s0, o0)
                s0, o0 = dq.decode()
            scales.copy_(s0)
            if offsets is not None and o0 is not None:
                offsets.copy_(o0)
        if self.act_order:
            perm = torch.argsort(torch.diagonal(h), descending=True)
        else:
            perm = torch.arange(inp, device=w.device)
        u = _inverse_cholesky(h[perm][:, perm], self.percdamp).float()
        w = w[:, perm].contiguous()
        codes = torch.empty(out, inp, dtype=torch.uint8, device=w.device)
        for b0 in range(0, inp, self.block_size):
            b1 = min(b0 + self.block_size, inp)
            wb = w[:, b0:b1].clone()
            err = torch.zeros_like(wb)
            ub = u[b0:b1, b0:b1]
            for j in range(b1 - b0):
                col = int(perm[b0 + j])  # the original input column
                grp = col // g
                if not static and col % g == 0:  # a new group: its grid from the updated weights
                    rest = (
                        wb[:, j : j + g]
                        if j + g <= b1 - b0
                        else torch.cat([wb[:, j:], w[:, b1 : b0 + j + g]], 1)
                    )
                    s, o = minmax_params(rest.amin(-1, keepdim=True), rest.amax(-1, keepdim=True), fmt)
                    scales[:, grp] = s[:, 0]
                    if offsets is not None and o is not None:
                        offsets[:, grp] = o[:, 0]
                s_col = scales[:, grp : grp + 1]
                o_col = None if offsets is None else offsets[:, grp : grp + 1]
                q = encode_groups(wb[:, j : j + 1].unsqueeze(1), fmt, s_col, o_col)  # [out, 1, 1]
                codes[:, col] = q[:, 0, 0]
                deq = decode_groups(q, fmt, s_col, o_col)[:, 0, 0]
                e = (wb[:, j] - deq) / ub[j, j]
                wb[:, j:] -= e.unsqueeze(1) * ub[j, j:].unsqueeze(0)
                err[:, j] = e
            w[:, b1:] -= err @ u[b0:b1, b1:]
        return QuantizedWeight.from_codes(fmt, codes, scales, offsets, self.name, dq)

    def __repr__(self) -> str:
        return f"GPTQ(block_size={self.block_size}, percdamp={self.percdamp}, act_order={self.act_order})"
