"""Dynamic per-token activation fake-quantization (quantize, then immediately dequantize).

Activations are quantized at run time with one scale per token (the absmax over the last dim), which is
what int8 / fp8 GEMM kernels do: a per-token scale factors out of the matmul, so the simulated result is
the result such a kernel would produce. Integer formats are symmetric on ``[-(2**(b-1)-1), 2**(b-1)-1]``
(the extra negative level is left unused, as kernels do, so the grid is symmetric around 0); fp8 uses
e4m3 with ``scale = absmax / 448``. The scale is a run-time value, so it stays fp32 (it is never stored).
Math is done in fp32 and the result is cast back to the input dtype. An all-zero token stays zero.
"""

from __future__ import annotations

import torch

from bitplan.formats import ActFormat
from bitplan.quantizers._codebooks import FP8_MAX, fp8_decode, fp8_encode

__all__ = ["act_scales", "fake_quantize_act"]

_TINY = 1e-12


def act_scales(x: torch.Tensor, fmt: ActFormat) -> torch.Tensor:
    """Per-token fp32 scales ``[..., 1]`` that ``fmt`` would use for ``x [..., features]``."""
    absmax = x.detach().float().abs().amax(dim=-1, keepdim=True)
    top = FP8_MAX if fmt.kind == "fp8" else float(2 ** (fmt.bits - 1) - 1)
    return (absmax / top).clamp_min(_TINY)


def fake_quantize_act(x: torch.Tensor, fmt: ActFormat) -> torch.Tensor:
    """``x`` rounded to ``fmt`` per token and dequantized (same shape and dtype); ``a16`` is the identity."""
    if not fmt.is_quantized:
        return x
    s = act_scales(x, fmt)
    xf = x.float() / s
    if fmt.kind == "int":
        top = 2 ** (fmt.bits - 1) - 1
        q = torch.round(xf).clamp_(-top, top)
    elif fmt.kind == "fp8":
        q = fp8_decode(fp8_encode(xf))
    else:  # pragma: no cover - ActFormat validates its kinds
        raise ValueError(f"unknown activation format {fmt}")
    return (q * s).to(x.dtype)
