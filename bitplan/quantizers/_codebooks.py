"""Non-uniform code tables: NF4 (QLoRA) and float8 e4m3.

NF4's 16 levels are the published QLoRA constants: quantiles of a standard normal, rescaled to [-1, 1],
with an exact zero and asymmetric halves (8 positive levels, 7 negative, plus 0). Encoding is
nearest-level, done with ``bucketize`` on the 15 midpoints, so it is one vectorised op whatever the size.

fp8 is e4m3 "fn" (no infinities, max finite 448). Codes are the raw e4m3 bytes viewed as ``uint8``; the
two NaN patterns (0x7F, 0xFF) are never produced because values are clamped to +-448 before the cast
(torch saturates on CPU today, but the cast's overflow behaviour is not something to lean on).
"""

from __future__ import annotations

import torch

__all__ = ["FP8_MAX", "NF4_LEVELS", "fp8_decode", "fp8_encode", "nf4_decode", "nf4_encode"]

NF4_LEVELS: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
FP8_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn


def _levels(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def nf4_encode(x: torch.Tensor) -> torch.Tensor:
    """Index of the nearest NF4 level for each element of ``x`` (already divided by its absmax scale)."""
    levels = _levels(x.device)
    mids = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(x.float(), mids).to(torch.uint8)


def nf4_decode(codes: torch.Tensor) -> torch.Tensor:
    """NF4 level values (float32) for ``uint8`` codes in 0..15."""
    return _levels(codes.device)[codes.long()]


def fp8_encode(x: torch.Tensor) -> torch.Tensor:
    """Round ``x`` (already divided by its scale) to e4m3 and return the bytes as ``uint8``."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(torch.uint8)


def fp8_decode(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of e4m3 bytes stored as ``uint8``."""
    return codes.contiguous().view(FP8_DTYPE).float()
