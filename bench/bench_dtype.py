"""Why the sensitivity compute dtype is chosen per device: bf16 vs fp32 matmul speed on this CPU.

    .venv/bin/python bench/bench_dtype.py

Times ``x @ w`` for the GEMM shapes a scoring pass of the main model runs (2048 tokens x hidden 576 into
the fused gate/up projection) in float32 and bfloat16, median of a few
calls after a warm-up, and records what ``bitplan.loading.compute_dtype_for("cpu")`` picks here.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import stamp, write_section  # noqa: E402

from bitplan.loading import compute_dtype_for, has_fast_bf16  # noqa: E402

SHAPES = [(2048, 576, 3072)]


def _ms(a: torch.Tensor, b: torch.Tensor, reps: int) -> float:
    a @ b  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for m, k, n in SHAPES:
        a, b = torch.randn(m, k), torch.randn(k, n)
        f32 = _ms(a, b, 5)
        b16 = _ms(a.bfloat16(), b.bfloat16(), 3)
        rows.append((m, k, n, f32, b16))
        print(f"{m}x{k} @ {k}x{n}: fp32 {f32:.1f} ms, bf16 {b16:.1f} ms ({b16 / f32:.1f}x)", flush=True)
    body = [
        "## CPU: bfloat16 vs float32 matmul (why `--compute-dtype auto`)",
        "",
        stamp().rstrip(),
        f"- native bf16 here (AMX or AVX-512 BF16): {has_fast_bf16('cpu')}; `compute_dtype_for('cpu')` = "
        f"{str(compute_dtype_for('cpu')).removeprefix('torch.')}; median of 5 (fp32) / 3 (bf16) calls after one warm-up",
        "",
        "| GEMM (M x K @ K x N) | fp32 ms | bf16 ms | bf16 / fp32 |",
        "|---|---:|---:|---:|",
        *[f"| {m}x{k} @ {k}x{n} | {f:.1f} | {b:.1f} | {b / f:.1f}x |" for m, k, n, f, b in rows],
    ]
    write_section("cpu-bf16", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
