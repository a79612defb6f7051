"""Synthetic weights for the quantizer tests: Gaussian, heavy-tailed, with outlier rows and a zero group."""

from __future__ import annotations

import zlib

import torch

SCALE = 0.02  # a typical LLM weight standard deviation


def seed_for(name: str) -> int:
    """A different, reproducible seed per test (derived from the test's node id)."""
    return zlib.crc32(name.encode())


def gaussian(shape: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * SCALE


def student_t(shape: tuple[int, int], seed: int, df: int = 3) -> torch.Tensor:
    """Heavy-tailed weights: Student-t with ``df`` degrees of freedom, as normal / sqrt(chi2 / df)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g)
    chi2 = torch.randn((df, *shape), generator=g).square().sum(0)
    return z / (chi2 / df).sqrt() * SCALE


def with_outliers_and_zero_group(shape: tuple[int, int], seed: int, group: int = 8) -> torch.Tensor:
    """Gaussian weights where a few rows carry 20x outliers and the first ``group`` inputs of row 1 are 0."""
    w = gaussian(shape, seed)
    g = torch.Generator().manual_seed(seed + 1)
    rows = torch.randperm(shape[0], generator=g)[: max(1, shape[0] // 8)]
    cols = torch.randint(0, shape[1], (rows.numel(),), generator=g)
    w[rows, cols] = 20 * SCALE * torch.sign(torch.randn(rows.numel(), generator=g))
    w[1, :group] = 0.0
    w[2] = 0.0  # an all-zero row (every group of it is zero)
    return w
