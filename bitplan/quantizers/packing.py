"""Dense bit-packing of integer codes along the last dimension.

``b``-bit codes are packed 8 at a time into ``b`` bytes (little-endian within the 8-code word), so a
row of ``n`` codes takes exactly ``ceil(n / 8) * b`` bytes for any ``b`` in 1..7 (``n`` bytes at 8 bits): no padding at all when
``n`` is a multiple of 8 (every real LLM width), and at most 7 zero codes per row otherwise (stories260k's
172-wide MLP). ``WeightFormat.storage_bits`` counts the same, which is what lets the plan's byte
accounting match the packed model exactly. Packing goes through one int64 word per 8 codes (at most
64 bits), which keeps it a handful of vectorised torch ops.
"""

from __future__ import annotations

import torch

__all__ = ["pack_bits", "unpack_bits", "packed_numel"]


def packed_numel(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take (below 8 bits, rows pad to a multiple of 8 codes)."""
    return n if bits == 8 else -(-n // 8) * bits


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes ``[..., n]`` (any integer dtype) into ``uint8 [..., n*bits/8]``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1-8, got {bits}")
    *lead, n = codes.shape
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    if n % 8:
        codes = torch.nn.functional.pad(codes.to(torch.uint8), (0, 8 - n % 8))
    n8 = codes.shape[-1]
    words = codes.reshape(*lead, n8 // 8, 8).to(torch.int64)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    word = (words << shifts).sum(dim=-1, keepdim=True)  # disjoint bit ranges: sum == bitwise or
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    out = (word >> byte_shifts) & 0xFF
    return out.to(torch.uint8).reshape(*lead, n8 * bits // 8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``uint8 [..., ceil(n/8)*bits]`` -> ``uint8 [..., n]``.

    Without ``n`` every packed code is returned, padding included.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1-8, got {bits}")
    *lead, m = packed.shape
    if bits == 8:
        return packed if n is None or n == m else packed[..., :n]
    if m % bits:
        raise ValueError(f"packed last dimension {m} is not a multiple of {bits} bytes")
    if n is not None and packed_numel(n, bits) != m:
        raise ValueError(f"packed last dimension {m} does not hold {n} codes of {bits} bits")
    chunks = packed.reshape(*lead, m // bits, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (chunks << byte_shifts).sum(dim=-1, keepdim=True)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = (word >> shifts) & ((1 << bits) - 1)
    codes = codes.to(torch.uint8).reshape(*lead, (m // bits) * 8)
    return codes if n is None or n == codes.shape[-1] else codes[..., :n]
