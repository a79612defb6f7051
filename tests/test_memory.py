"""Sensitivity and apply stream one decoder layer at a time: their peak memory does not grow with depth.

One fresh process (tests/_memory_worker.py) measures each stage's extra peak RSS (``VmHWM`` after a reset,
minus the RSS before) on random llama models of 2 and 8 layers of the same width. A stage that holds one
layer's copies at a time has the same extra at both depths, up to the calibration activations it keeps per
layer (``tokens x hidden``: 0.5 MB here). The full-backward Fisher, which holds every layer's activations and
weight deltas, is measured beside them: it must grow by several layers' weights, or the measurement could
not tell the difference. ``MALLOC_MMAP_THRESHOLD_`` pins glibc's mmap threshold: by default it rises to the
largest block freed so far, after which freed layer-sized buffers stay in the heap and read as growth
(+18 MB for the streamed Fisher at 8 layers without it, +3 MB with it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (VmHWM reset)")
def test_peak_memory_does_not_grow_with_depth() -> None:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tests._memory_worker", "fisher,fisher-full,kl,apply-gptq", "2,8"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    layer, extra = got["layer_bytes"], got["extra"]
    growth = {stage: by_depth["8"] - by_depth["2"] for stage, by_depth in extra.items()}
    report = {stage: f"{growth[stage] / layer:+.2f} layers ({extra[stage]['2'] / 2**20:.0f} MB at 2)" for stage in extra}
    assert growth["fisher-full"] > 6 * layer, report  # the measurement sees depth
    for stage in ("fisher", "kl", "apply-gptq"):
        assert growth[stage] < layer, (stage, report)
    # the streamed Fisher's own extra: one layer's deltas for 3 options, its activations, the stored inputs
    assert extra["fisher"]["8"] < 6 * layer, report
