"""Decode attention that reads a :class:`~bitplan.kvcache.MixedKVLayer` in place, without dequantizing it.

Why: the plan gives every layer its own K bits and V bits (KVTuner-style: 2, 3, 4, 8 or 16 each), stored
KIVI-style -- K per channel (``group`` consecutive tokens share a scale/offset per channel, so an outlier
channel only costs its own resolution), V per token (groups of channels of one token, matching the per-token
weighted sum that consumes it), and the newest tokens kept exact in a 16-bit residual (the recent window, plus
a per-channel group still filling up). The cache's own ``update`` hands attention the whole past dequantized
to 16 bits, which spends the memory traffic the quantization saved. :func:`decode_attention` instead reads,
per (batch, kv head, split of the sequence):

* the packed storage as the cache holds it -- ``QuantizedKV.codes`` (uint8, ``bits``-bit codes packed 8 per
  ``bits`` bytes, little-endian, along the head dim), ``scales`` and ``offsets`` (fp16, per channel-group of
  tokens for K, per channel-group of a token for V; either axis works on either side), or the raw tensor of a
  16-bit side -- decoding ``scale * q + offset`` in registers, with K's and V's bits/axis/group as
  independent compile-time constants (one compiled variant per layer format);
* then the residual (``layer.keys`` / ``layer.values``) as is;

with online softmax in fp32, all query heads of one kv head (GQA) in one program, and flash-decoding split-K
over the sequence plus a small reduction kernel when there are few (batch, kv head) pairs for a long context.
Nothing is re-laid out: the kernel reads exactly the cache's bytes.

Decode protocol: append the new token first (``layer.update(k, v)``, whose returned tensors the caller may
ignore), then ``decode_attention(q, layer)`` attends over everything the layer holds, the new token included.

:func:`reference_decode_attention` (dequantize with :func:`~bitplan.quantizers.kv.dequantize_kv`, append the
residual, softmax in fp32) is the yardstick and the CPU path. Importing this module never imports Triton.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

import torch
from torch import Tensor

from bitplan.quantizers.kv import QuantizedKV, dequantize_kv

__all__ = ["decode_attention", "reference_decode_attention", "triton_available"]

_Stored = QuantizedKV | Tensor | None
_MIN_SPLIT_TOKENS = 256  # below this a split's fixed cost outweighs the parallelism it adds
_MAX_SPLITS = 64


def _parts(layer: Any) -> tuple[_Stored, _Stored, Tensor, Tensor]:
    """``(stored K, stored V, residual K, residual V)`` of a MixedKVLayer (or a plain DynamicLayer)."""
    if hasattr(layer, "_parts"):  # MixedKVLayer; raises if used before its first update
        k_side, v_side, keys, values = layer._parts()
        return k_side.data, v_side.data, keys, values
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if keys is None or values is None or not getattr(layer, "is_initialized", True):
        raise RuntimeError(f"{layer!r} is used before its first update")
    return None, None, keys, values


def _num_tokens(x: _Stored) -> int:
    if x is None:
        return 0
    return x.num_tokens if isinstance(x, QuantizedKV) else x.shape[-2]


def _check(q: Tensor, layer: Any) -> tuple[_Stored, _Stored, Tensor, Tensor]:
    k_st, v_st, k_res, v_res = _parts(layer)
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"decode attention takes q [batch, heads, 1, head_dim], got {tuple(q.shape)}")
    b, hq, _, d = q.shape
    kb, hkv, _, kd = k_res.shape
    if (kb, kd) != (b, d) or v_res.shape[:2] != (b, hkv) or v_res.shape[-1] != d:
        raise ValueError(f"q {tuple(q.shape)} does not match the cache's K/V {tuple(k_res.shape)}")
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of the cache's {hkv} kv heads")
    if _num_tokens(k_st) != _num_tokens(v_st):
        raise ValueError("stored K and V hold different numbers of tokens")
    if _num_tokens(k_st) + k_res.shape[-2] == 0:
        raise ValueError("the cache holds no tokens to attend to")
    return k_st, v_st, k_res, v_res


def _decoded(stored: _Stored, residual: Tensor) -> Tensor:
    if stored is None:
        return residual.float()
    past = dequantize_kv(stored, torch.float32) if isinstance(stored, QuantizedKV) else stored.float()
    return torch.cat([past, residual.float()], dim=-2)


def reference_decode_attention(q: Tensor, layer: Any, scale: float | None = None) -> Tensor:
    """Softmax attention of ``q [B, Hq, 1, D]`` over everything ``layer`` holds, in fp32; returns q's dtype.

    Stored tokens are dequantized with :func:`~bitplan.quantizers.kv.dequantize_kv`, the 16-bit residual is
    appended; query head ``h`` reads kv head ``h // (Hq / Hkv)`` (transformers' ``repeat_kv``)."""
    k_st, v_st, k_res, v_res = _check(q, layer)
    k, v = _decoded(k_st, k_res), _decoded(v_st, v_res)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.float() @ k.transpose(-1, -2)) * scale
    return (torch.softmax(scores, dim=-1) @ v).to(q.dtype)


# -- the Triton path -------------------------------------------------------------------------------------
_TRITON: Any = None  # the imported kernel module, False once an import failed


def _triton_module() -> Any:
    global _TRITON
    if _TRITON is None:
        try:
            from bitplan.kernels import _triton_attention

            _TRITON = _triton_attention
        except Exception:  # triton missing or broken: the reference path serves
            _TRITON = False
    return _TRITON or None


def triton_available(device: torch.device | str = "cuda") -> bool:
    """Whether the Triton kernel can run on ``device``: Triton imports, and the device is CUDA or
    ``TRITON_INTERPRET=1`` (the CPU interpreter: correct, slow; meant for tests)."""
    dev = torch.device(device)
    runnable = dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return runnable and _triton_module() is not None


def _side_args(stored: _Stored, dummy: Tensor) -> tuple[list[Any], list[int], dict[str, int]]:
    """Pointers, strides and constexprs for one stored side (a dummy 16-bit side when nothing is stored)."""
    if isinstance(stored, QuantizedKV):
        codes = stored.codes if stored.codes.stride(-1) == 1 else stored.codes.contiguous()
        scales, offsets = stored.scales.contiguous(), stored.offsets.contiguous()
        strides = [*codes.stride()[:3], *scales.stride()[:3]]
        meta = {"BITS": stored.bits, "CHANNEL": stored.axis == "channel", "GROUP": stored.group}
        return [codes, scales, offsets], strides, meta
    raw = dummy if stored is None else stored
    raw = raw if raw.stride(-1) == 1 else raw.contiguous()
    return [raw, raw, raw], [*raw.stride()[:3], 0, 0, 0], {"BITS": 16, "CHANNEL": False, "GROUP": 1}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


def _num_splits(n: int, pairs: int, block_t: int, device: torch.device) -> int:
    """Splits of the sequence so that about two programs per SM run (at least 256 tokens per split)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = _cdiv(2 * sms, pairs)
    return max(1, min(want, _cdiv(n, _MIN_SPLIT_TOKENS), _MAX_SPLITS, _cdiv(n, block_t)))


def _triton_decode(
    q: Tensor,
    parts: tuple[_Stored, _Stored, Tensor, Tensor],
    scale: float,
    out: Tensor,
    num_splits: int | None,
) -> Tensor:
    tk = _triton_module()
    import triton.language as tl  # available: _triton_module() succeeded

    k_st, v_st, k_res, v_res = parts
    if any(t.device != q.device for t in (k_res, v_res)):
        raise ValueError(f"q is on {q.device} but the cache is on {k_res.device}")
    b, hq, _, d = q.shape
    hkv = k_res.shape[1]
    s, r = _num_tokens(k_st), k_res.shape[-2]
    n = s + r
    k_res = k_res if k_res.stride(-1) == 1 else k_res.contiguous()
    v_res = v_res if v_res.stride(-1) == 1 else v_res.contiguous()
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_ptrs, k_strides, k_meta = _side_args(k_st, k_res)
    v_ptrs, v_strides, v_meta = _side_args(v_st, v_res)

    block_d = _pow2(d)
    # sm_90 ptxas -v, D 64/128/256, 2..8 bits: <= 255 regs, spills 0 (a few dozen bytes at most); untimed
    block_t = 32 if block_d <= 128 else 16
    num_warps = 8 if block_d >= 128 or q.dtype == torch.float32 else 4
    splits = num_splits or _num_splits(n, b * hkv, block_t, q.device)
    chunk = _cdiv(_cdiv(n, max(1, splits)), block_t) * block_t  # tokens per split, whole blocks
    splits = _cdiv(n, chunk)  # no empty split
    dot = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(q.dtype, tl.float32)
    if dot is tl.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        # the CPU interpreter's bf16 tl.dot is wrong (triton 3.x); fp32 there is exact enough
        dot = tl.float32

    one = splits == 1
    rows = b * hq * splits  # the [B*Hq, splits] partials (unused with one split: ``out`` stands in)
    part_acc = out if one else torch.empty(rows * d, device=q.device, dtype=torch.float32)
    part_m = out if one else torch.empty(rows, device=q.device, dtype=torch.float32)
    part_l = out if one else torch.empty(rows, device=q.device, dtype=torch.float32)

    tk._decode_split_kernel[(b * hkv, splits)](
        q,
        out,
        part_acc,
        part_m,
        part_l,
        *k_ptrs,
        *v_ptrs,
        k_res,
        v_res,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        *k_strides,
        *v_strides,
        *k_res.stride()[:3],
        *v_res.stride()[:3],
        s,
        r,
        chunk,
        splits,
        hkv,
        hq // hkv,
        d,
        scale * math.log2(math.e),
        K_BITS=k_meta["BITS"],
        K_CHANNEL=k_meta["CHANNEL"],
        K_GROUP=k_meta["GROUP"],
        V_BITS=v_meta["BITS"],
        V_CHANNEL=v_meta["CHANNEL"],
        V_GROUP=v_meta["GROUP"],
        BLOCK_H=_pow2(hq // hkv),
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        DOT=dot,
        ONE_SPLIT=one,
        num_warps=num_warps,
    )
    if not one:
        tk._decode_reduce_kernel[(b * hq,)](
            out,
            part_acc,
            part_m,
            part_l,
            out.stride(0),
            out.stride(1),
            hq,
            splits,
            d,
            BLOCK_S=_pow2(splits, 2),
            BLOCK_D=block_d,
            num_warps=num_warps,
        )
    return out


def decode_attention(
    q: Tensor,
    layer: Any,
    scale: float | None = None,
    *,
    kernel: Literal["auto", "triton", "reference"] = "auto",
    num_splits: int | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Attention of one decode step ``q [B, Hq, 1, D]`` over all tokens in ``layer``; returns ``[B, Hq, 1, D]``.

    ``layer`` is a :class:`~bitplan.kvcache.MixedKVLayer` (a plain ``DynamicLayer`` works too); ``Hq`` must be
    a multiple of its kv heads (GQA). ``scale`` defaults to ``1/sqrt(D)``. ``kernel="auto"`` runs Triton when
    it imports and ``q`` is on CUDA (or ``TRITON_INTERPRET=1``), else :func:`reference_decode_attention`;
    ``"triton"`` insists. ``num_splits`` overrides the split-K heuristic; ``out`` receives the result."""
    if kernel not in ("auto", "triton", "reference"):
        raise ValueError(f"kernel must be 'auto', 'triton' or 'reference', got {kernel!r}")
    parts = _check(q, layer)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    use_triton = kernel == "triton" or (kernel == "auto" and triton_available(q.device))
    if use_triton and not triton_available(q.device):
        raise RuntimeError("kernel='triton' needs Triton and a CUDA tensor (or TRITON_INTERPRET=1)")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"out must match q: {tuple(q.shape)} {q.dtype} on {q.device}")
    if not use_triton:
        res = reference_decode_attention(q, layer, scale)
        return res if out is None else out.copy_(res)
    if out is None or out.stride(-1) != 1:
        target, out_buf = out, torch.empty_like(q, memory_format=torch.contiguous_format)
    else:
        target, out_buf = None, out
    res = _triton_decode(q, parts, scale, out_buf, num_splits)
    return res if target is None else target.copy_(res)
