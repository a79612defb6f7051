"""Process helpers shared by the benchmarks that measure memory: resident set size, and giving freed heap back."""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path


def rss_bytes() -> int:
    """This process's resident set size (``VmRSS``), 0 where /proc is missing."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def trim() -> None:
    """Collect garbage and return freed heap pages to the OS, so RSS reads what is really held."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
