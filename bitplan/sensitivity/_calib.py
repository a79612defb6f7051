"""Calibration windows: the first N tokens of a calibration text, cut into windows, plus their hash.

The hash (of the token ids, not the file) identifies the data in a sensitivity table's metadata, so a
table is reused only for the same tokens. ``skip`` windows at the start can be set aside (the search
verifies plans on a held-out tail of the calibration text that the profile did not use).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bitplan.errors import DataError

__all__ = ["CalibData", "load_calib"]


@dataclass(frozen=True)
class CalibData:
    windows: torch.Tensor  # [n, window] int64
    source: str = ""

    def __post_init__(self) -> None:
        if self.windows.dim() != 2 or self.windows.shape[0] == 0 or self.windows.shape[1] < 2:
            raise DataError(f"calibration windows must be [n >= 1, window >= 2], got {tuple(self.windows.shape)}")

    @property
    def num_windows(self) -> int:
        return int(self.windows.shape[0])

    @property
    def window(self) -> int:
        return int(self.windows.shape[1])

    @property
    def tokens(self) -> int:
        return self.windows.numel()

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.windows.to(torch.int64).numpy().tobytes()).hexdigest()[:16]

    def batches(self, batch_size: int) -> list[torch.Tensor]:
        return [self.windows[i : i + batch_size] for i in range(0, self.num_windows, batch_size)]

    def split(self, n_first: int) -> tuple[CalibData, CalibData]:
        """The first ``n_first`` windows and the rest (e.g. profile / held-out verification)."""
        if not 0 < n_first < self.num_windows:
            raise DataError(f"cannot split {self.num_windows} calibration windows at {n_first}")
        return CalibData(self.windows[:n_first], self.source), CalibData(self.windows[n_first:], self.source)


def load_calib(tokenizer: Any, path: str | Path, tokens: int, window: int = 512, *, skip_tokens: int = 0) -> CalibData:
    """``tokens`` tokens of ``path`` (after the first ``skip_tokens``) as ``tokens // window`` windows."""
    from bitplan.eval import load_tokens

    if window < 2:
        raise DataError(f"calibration window must be at least 2 tokens, got {window}")
    if tokens < window:
        raise DataError(f"--tokens {tokens} is fewer than one calibration window of {window}")
    ids = load_tokens(tokenizer, path, skip_tokens + tokens)[skip_tokens:]
    n = ids.numel() // window
    return CalibData(ids[: n * window].view(n, window).clone(), source=str(path))
