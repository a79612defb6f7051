"""Process helpers shared by the benchmarks: resident set size, giving freed heap back, fresh-process workers."""

from __future__ import annotations

import ctypes
import gc
import json
import subprocess
import sys
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


def run_worker(cmd: list[str], what: str, env: dict[str, str] | None = None) -> dict:
    """Run a benchmark worker in a fresh process (this environment, OMP_WAIT_POLICY ..., unless ``env`` is
    given) and return the JSON object it prints last; on failure show its stderr's tail and stop, naming
    ``what`` failed."""
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode or not line:
        print(done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{what} failed")
    return json.loads(line[-1])
