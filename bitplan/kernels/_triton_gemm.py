"""Triton GEMMs for group-wise integer weights: W{2,3,4,8}A16 (dequantize in registers) and W8A8 (int8 dot).

Imported lazily by :mod:`bitplan.kernels._gpu` (never by ``import bitplan``); the layouts it reads are
built there with torch ops. ``x [M, K] @ W[N, K].T`` with ``W`` held as:

* ``qweight`` int32 ``[K*b/32, N]``: word ``(j, n)`` holds codes ``k = j*P .. j*P+P-1`` of output ``n``
  (``P = 32/b``) at bits ``(k % P) * b``; one K-tile of ``BLOCK_K`` rows loads ``[BLOCK_K/P, BLOCK_N]``
  words, contiguous along N. 3-bit codes are two planes: the low 2 bits in ``qweight`` (``P = 16``) and
  the high bit in ``qweight_hi`` (``P = 32``), exactly 3 bits per weight.
* ``scales`` (and ``zeros`` for asymmetric formats) fp16 ``[groups, N]``; ``w = s*q + z`` (asymmetric,
  ``z`` is the canonical offset) or ``w = s*(q - 2**(b-1))`` (symmetric), computed in fp32 as the
  reference decoder does, then rounded to the activation dtype for ``tl.dot``.
* W8A8: ``qweight`` int8 ``[K, N]`` (the code minus 128), ``scales`` fp16 ``[groups, N]``.

Paths, picked by autotuning configs keyed on an M bucket (1, 2-16, 17-64, >64), N, K and the format:

* ``BLOCK_M == 1`` (M = 1): a GEMV with fp32 (int32 for W8A8) multiply-adds, no tensor cores;
* ``BLOCK_M == 16`` (M <= 16): ``tl.dot`` with split-K across programs, partial sums atomically added
  into a zeroed fp32 buffer (the M <= 16 buckets always get one; split-K 1 stores into it plainly);
* larger M: a plain ``tl.dot`` GEMM storing in the output dtype.

Under ``TRITON_INTERPRET=1`` (the CPU interpreter, for tests) each bucket has one config, so autotuning
never benchmarks, and ``tl.dot`` operands are upcast to fp32 (the interpreter multiplies bfloat16 bit
patterns as integers, triton-lang/triton#11584) after rounding the weight to the activation dtype, so
the numbers are those a GPU computes.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

from bitplan.kernels._triton_ops import ADD as _ADD  # tl.reduce combine functions; why: see _triton_ops
from bitplan.kernels._triton_ops import MAX as _MAX

__all__ = ["INTERPRET", "m_bucket", "quantize_act", "w8a8_matmul", "wa16_matmul"]

# as triton.jit saw it when this module was imported: the kernels below are interpreted iff this is True
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def m_bucket(m: int) -> int:
    """The autotuning bucket of ``M`` rows: 1 (GEMV), 2 (2-16, split-K), 3 (17-64), 4 (> 64)."""
    return 1 if m <= 1 else 2 if m <= 16 else 3 if m <= 64 else 4


def _cfg(bm: int, bn: int, bk: int, sk: int = 1, warps: int = 4, stages: int = 3) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=warps, num_stages=stages
    )


def _configs() -> dict[int, list[triton.Config]]:
    if INTERPRET:  # one per bucket: no benchmarking; split-K exercised in the two small buckets
        return {
            1: [_cfg(1, 32, 32, 2)],
            2: [_cfg(16, 32, 32, 2)],
            3: [_cfg(32, 32, 32)],
            4: [_cfg(64, 64, 64)],
        }
    return {
        1: [
            _cfg(1, bn, bk, sk, w, 2)
            for bn, bk, w in ((64, 128, 4), (128, 64, 4), (256, 32, 4), (128, 128, 8), (64, 256, 8))
            for sk in (1, 4)
        ],
        2: [
            _cfg(16, bn, bk, sk, 4, 3)
            for bn, bk in ((64, 64), (64, 128), (128, 64), (128, 128))
            for sk in (1, 2, 4, 8)
        ],
        3: [
            _cfg(bm, bn, bk, 1, 4, st)
            for bm, bn, bk, st in (
                (32, 64, 64, 4),
                (32, 128, 64, 3),
                (64, 64, 64, 4),
                (64, 128, 32, 4),
                (64, 128, 64, 3),
            )
        ],
        4: [
            _cfg(bm, bn, bk, 1, w, st)
            for bm, bn, bk, w, st in (
                (64, 128, 32, 4, 4),
                (64, 128, 64, 4, 3),
                (128, 128, 32, 8, 3),
                (128, 64, 64, 4, 3),
                (128, 256, 32, 8, 3),
                (64, 256, 32, 8, 4),
            )
        ],
    }


_CONFIGS = _configs()
_ALL_CONFIGS = [c for b in sorted(_CONFIGS) for c in _CONFIGS[b]]


def _block_k_for_group(group: int) -> int:
    """The largest power of two (<= 256) dividing ``group``: a K-tile then lies inside one group."""
    return min(group & -group, 256)


def _prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    """The configs of the call's M bucket (``configs`` is all of them); W8A8 with groups caps ``BLOCK_K`` to a divisor of the group."""
    args = {**named_args, **kwargs}
    mine = _CONFIGS[int(args["M_BUCKET"])]
    if args.get("PER_TILE_SCALE"):
        cap = _block_k_for_group(int(args["GROUP"]))
        seen: dict[tuple[Any, ...], triton.Config] = {}
        for c in mine:
            kw = dict(c.kwargs, BLOCK_K=min(c.kwargs["BLOCK_K"], cap))
            key = (*sorted(kw.items()), c.num_warps, c.num_stages)
            seen.setdefault(key, triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
        mine = list(seen.values())
    return mine


def _autotune(*key: str) -> Any:
    """Autotune over the bucket's configs, per (M bucket, N, K, ``key``...) and the tensors' dtypes."""
    return triton.autotune(
        configs=_ALL_CONFIGS,
        key=["M_BUCKET", "N", "K", *key],
        prune_configs_by={"early_config_prune": _prune},
        reset_to_zero=["c_ptr"],
    )


# -- W{2,3,4,8}A16 ----------------------------------------------------------------------------------
@_autotune("BITS", "GROUP", "HAS_ZERO")
@triton.jit
def _wa16_kernel(
    x_ptr, q_ptr, qhi_ptr, s_ptr, z_ptr, c_ptr,
    M, N, K, stride_xm, stride_cm,
    M_BUCKET,  # noqa: N803 - the autotuning key (unused in the body)
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    pid_m = pid % num_m  # programs sharing a weight tile run side by side
    pid_n = pid // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_per = ((K + SPLIT_K - 1) // SPLIT_K + BLOCK_K - 1) // BLOCK_K * BLOCK_K
    k_lo = pid_k * k_per
    k_hi = tl.minimum(k_lo + k_per, K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        w_mask = k_mask[:, None] & n_mask[None, :]
        # -- codes [BLOCK_K, BLOCK_N] --
        if BITS == 3:
            lo = tl.load(q_ptr + (offs_k // 16)[:, None] * N + offs_n[None, :], mask=w_mask, other=0)
            hi = tl.load(qhi_ptr + (offs_k // 32)[:, None] * N + offs_n[None, :], mask=w_mask, other=0)
            q = ((lo >> ((offs_k % 16) * 2)[:, None]) & 3) | (((hi >> (offs_k % 32)[:, None]) & 1) << 2)
        else:
            words = tl.load(
                q_ptr + (offs_k // (32 // BITS))[:, None] * N + offs_n[None, :], mask=w_mask, other=0
            )
            q = (words >> ((offs_k % (32 // BITS)) * BITS)[:, None]) & ((1 << BITS) - 1)
        # -- scales (and zeros): one row per tile when the tile lies inside a group --
        if GROUP % BLOCK_K == 0:
            g = k0 // GROUP
            s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            if HAS_ZERO:
                z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        else:
            gp = (offs_k // GROUP)[:, None] * N + offs_n[None, :]
            s = tl.load(s_ptr + gp, mask=w_mask, other=0.0).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(z_ptr + gp, mask=w_mask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            w = q.to(tl.float32) * s + z
        else:
            w = (q.to(tl.float32) - (1 << (BITS - 1))) * s
        # -- multiply --
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)  # fmt: skip
        if BLOCK_M >= 16:
            wc = w.to(a.dtype)
            if UPCAST_DOT:
                acc += tl.dot(a.to(tl.float32), wc.to(tl.float32))
            else:
                acc += tl.dot(a, wc)
        else:
            acc += tl.reduce(a.to(tl.float32)[:, :, None] * w[None, :, :], 1, _ADD)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    c_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)
    else:
        tl.atomic_add(c_ptrs, acc, mask=c_mask)


# -- W8A8 -------------------------------------------------------------------------------------------
@triton.jit
def _round_half_even(v):
    """``torch.round`` for ``|v| < 2**22``: adding and removing 1.5 * 2**23 rounds to an integer, ties to even."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _quant_act_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, BLOCK: tl.constexpr):
    """One row: ``s = max(absmax / 127, 1e-12)`` (fp32), ``q = clamp(round(x / s), -127, 127)`` as int8."""
    row = tl.program_id(0)
    amax = tl.full((BLOCK,), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    s = tl.maximum(tl.math.div_rn(tl.reduce(amax, 0, _MAX), 127.0), 1e-12)
    tl.store(s_ptr + row, s)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        r = _round_half_even(tl.math.div_rn(x, s))
        r = tl.minimum(tl.maximum(r, -127.0), 127.0)
        tl.store(q_ptr + row * K + offs, r.to(tl.int8), mask=offs < K)


@_autotune("GROUP", "PER_TILE_SCALE")  # the pruned BLOCK_K depends on the group
@triton.jit
def _w8a8_kernel(
    xq_ptr, xs_ptr, q_ptr, s_ptr, c_ptr,
    M, N, K, stride_cm,
    M_BUCKET,  # noqa: N803 - the autotuning key (unused in the body)
    GROUP: tl.constexpr, PER_TILE_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    pid_m = pid % num_m
    pid_n = pid // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_per = ((K + SPLIT_K - 1) // SPLIT_K + BLOCK_K - 1) // BLOCK_K * BLOCK_K
    k_lo = pid_k * k_per
    k_hi = tl.minimum(k_lo + k_per, K)
    acc_i = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        a = tl.load(
            xq_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0
        )
        w = tl.load(
            q_ptr + offs_k[:, None] * N + offs_n[None, :], mask=k_mask[:, None] & n_mask[None, :], other=0
        )
        if BLOCK_M >= 16:
            part = tl.dot(a, w, out_dtype=tl.int32)
        else:
            part = tl.reduce(a.to(tl.int32)[:, :, None] * w.to(tl.int32)[None, :, :], 1, _ADD)
        if PER_TILE_SCALE:  # groups: BLOCK_K divides GROUP, so the tile has one scale row
            s = tl.load(s_ptr + (k0 // GROUP) * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            acc += part.to(tl.float32) * s[None, :]
        else:
            acc_i += part
    if not PER_TILE_SCALE:  # one scale per output channel
        s = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc = acc_i.to(tl.float32) * s[None, :]
    xs = tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)
    acc = acc * xs[:, None]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    c_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)
    else:
        tl.atomic_add(c_ptrs, acc, mask=c_mask)


# -- launchers ---------------------------------------------------------------------------------------
def _target(
    m: int, n: int, dtype: torch.dtype, out2: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Where a kernel writes: a zeroed fp32 buffer for the split-K buckets, else ``out2`` or a new tensor."""
    if m_bucket(m) <= 2:
        if out2 is not None and out2.dtype == torch.float32:
            return out2.zero_()
        return torch.zeros(m, n, dtype=torch.float32, device=device)
    if out2 is not None and out2.dtype == dtype:
        return out2
    return torch.empty(m, n, dtype=dtype, device=device)


def _grid(m: int, n: int) -> Any:
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])


def wa16_matmul(
    x2: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    bits: int,
    group: int,
    out_features: int,
    out2: torch.Tensor | None,
) -> torch.Tensor:
    """``x2 [M, K]`` (fp16/bf16/fp32, unit stride along K) times the prepared weight; ``[M, N]``.

    The result is ``out2`` when it could be written in place, else a new tensor (fp32 for M <= 16).
    """
    m, k = x2.shape
    n = out_features
    c = _target(m, n, x2.dtype, out2, x2.device)
    q = tensors["qweight"]
    qhi = tensors.get("qweight_hi", q)
    s = tensors["scales"]
    z = tensors.get("zeros", s)
    _wa16_kernel[_grid(m, n)](
        x2, q, qhi, s, z, c, m, n, k, x2.stride(0), c.stride(0), m_bucket(m),
        BITS=bits, GROUP=group, HAS_ZERO="zeros" in tensors, UPCAST_DOT=INTERPRET,
    )  # fmt: skip
    return c


def quantize_act(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 codes ``[M, K]`` and fp32 scales ``[M]`` of ``x2 [M, K]`` (``fake_quantize_act`` a8t)."""
    m, k = x2.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x2.device)
    s = torch.empty(m, dtype=torch.float32, device=x2.device)
    if m:
        block = min(1024, triton.next_power_of_2(max(k, 16)))
        _quant_act_kernel[(m,)](x2, q, s, k, x2.stride(0), BLOCK=block)
    return q, s


def w8a8_matmul(
    x2: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    group: int,
    per_channel: bool,
    out_features: int,
    out2: torch.Tensor | None,
) -> torch.Tensor:
    """``x2 [M, K]`` quantized per token to int8, times the int8 weight; ``[M, N]`` (see :func:`wa16_matmul`)."""
    m, k = x2.shape
    n = out_features
    xq, xs = quantize_act(x2)
    c = _target(m, n, x2.dtype, out2, x2.device)
    _w8a8_kernel[_grid(m, n)](
        xq, xs, tensors["qweight"], tensors["scales"], c, m, n, k, c.stride(0), m_bucket(m),
        GROUP=group, PER_TILE_SCALE=not per_channel,
    )  # fmt: skip
    return c
