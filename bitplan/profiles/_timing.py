"""Timing that predicts what a kernel costs inside a decoding model, not in a hot loop.

Why rotate weights: a decode step reads every weight once, from memory, because the whole model does not
fit in cache. A loop calling one small linear keeps its weight in L2 and reports a speed the model never
sees. So each measurement cycles through enough independent copies of the module that their bytes exceed
the last-level cache (``ROTATE_BYTES``), and times whole passes over the copies.

Why medians and passes: the machines are shared and noisy; one pass's mean per call is the sample, the
median over passes the figure, p10/p90 the spread. Warm-up passes come first (allocator, lazy
initialisation, oneDNN/fbgemm primitive caches).

On CUDA a pass is captured in a CUDA graph when possible (launch overhead is what decode pays too, but a
graph is how serious runtimes launch) and timed with events.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["ROTATE_BYTES", "Timing", "copies_for", "quantiles", "time_passes"]

ROTATE_BYTES = 96 * 2**20  # above the last-level cache of the CPUs and GPUs we target (L2 of an H100 is 50 MB)
MAX_COPIES = 64


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    reps: int


def copies_for(nbytes: int) -> int:
    """How many copies of a ``nbytes`` module rotate past the cache (at least 1, at most ``MAX_COPIES``)."""
    return max(1, min(MAX_COPIES, -(-ROTATE_BYTES // max(1, nbytes))))


def quantiles(samples: Sequence[float]) -> Timing:
    """Median and p10/p90 of ms samples."""
    s = sorted(samples)
    n = len(s)
    return Timing(statistics.median(s), s[max(0, int(0.1 * (n - 1)))], s[min(n - 1, round(0.9 * (n - 1)))], n)


def time_passes(
    calls: Sequence[Callable[[], object]],
    *,
    device: torch.device,
    min_reps: int = 7,
    budget_s: float = 0.5,
    warmup: int = 2,
) -> Timing:
    """ms per call: each sample is one pass over ``calls`` (one per weight copy) divided by its length.

    Runs ``warmup`` passes, then passes until ``budget_s`` seconds and at least ``min_reps`` samples.
    """
    if device.type == "cuda":
        return _time_cuda(calls, min_reps=min_reps, budget_s=budget_s, warmup=warmup)
    n = len(calls)
    for _ in range(warmup):
        for c in calls:
            c()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_reps or (time.perf_counter() - start < budget_s and len(samples) < 1000):
        t = time.perf_counter()
        for c in calls:
            c()
        samples.append((time.perf_counter() - t) * 1e3 / n)
    return quantiles(samples)


def _time_cuda(calls: Sequence[Callable[[], object]], *, min_reps: int, budget_s: float, warmup: int) -> Timing:
    n = len(calls)

    def one_pass() -> None:
        for c in calls:
            c()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            one_pass()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    run: Callable[[], None] = one_pass
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            one_pass()
        run = graph.replay
    except Exception:  # noqa: BLE001  (a kernel that cannot be captured is timed eagerly)
        torch.cuda.synchronize()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_reps or (time.perf_counter() - start < budget_s and len(samples) < 1000):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        samples.append(a.elapsed_time(b) / n)
    return quantiles(samples)
