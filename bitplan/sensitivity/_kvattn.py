"""One-pass, exact simulation of one layer's quantized KV cache, for the measured sensitivity engine.

Ground truth is :func:`bitplan.eval.evaluate` with a :class:`~bitplan.kvcache.MixedPrecisionKVCache` that
quantizes only layer ``l``: each window is fed in chunks of ``c`` tokens, and each chunk reads the tokens the
cache has already *flushed* to packed storage through fake-quantized K/V, and everything newer (the 16-bit
residual and the chunk itself) exactly. Reproducing that with ``window / c`` forward passes per window would
cost 16x a plain pass at ``c = 32``; this module gets the same numbers from one pass over the window.

Why one pass is exact
---------------------
* **Which tokens are flushed is a pure function of the query position.** The first ``sink`` tokens never
  leave the 16-bit buffer; the cache flushes after each update once the residual behind them holds
  ``recent + u`` tokens (``u`` = the group size when a quantized side is per-channel, else 1), always a
  multiple of ``u`` tokens. Starting empty, the stored count before the chunk that starts at token ``s`` is
  therefore ``S = max(0, floor((s - sink - recent) / u) * u)`` (induction: the count stays a multiple of
  ``u`` and only grows), and the stored tokens are ``[sink, sink + S)``, see :func:`stored_before`.
* **A token's quantized value does not depend on when it was flushed.** Per-token sides quantize each token
  alone; per-channel sides quantize groups of ``g`` consecutive tokens, and every flush starts at ``sink``
  plus a multiple of ``u = g``, so groups always cover ``sink + [k g, (k+1) g)``. Fake-quantizing the whole
  window's K (or V) once, group-aligned from token ``sink``, gives every flushed token exactly the value the
  cache would decode for it (same :func:`~bitplan.quantizers.kv.quantize_kv` arithmetic, per row and head).
* **So attention is a masked two-part attention.** The target layer sees keys ``[K_q; K]`` and values
  ``[V_q; V]`` (``2T`` keys), and query ``i`` may see key ``t <= i`` through the quantized copy iff
  ``sink <= t < sink + S(i)`` and through the exact copy otherwise (:func:`two_part_mask`). Softmax over the
  union equals softmax over the one key set the chunked cache hands to attention: each key appears once.

The two-part keys enter through the layer's own ``past_key_values.update`` call (:class:`TwoPartKV`, a
duck-typed cache given to that one layer only) together with an explicit attention mask, so no attention
implementation is patched or registered and no config is touched. Up to floating-point rounding (the chunked
run computes K/V with different matmul shapes) the result equals the chunked evaluation; the tests check it in
fp32. Formats of the same layer can share one pass by stacking them along the batch (``fmts`` with ``per``).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from bitplan.formats import KVFormat
from bitplan.quantizers.kv import fake_quantize_kv

__all__ = [
    "TwoPartKV", "chunked_head_inputs", "eval_chunk", "eval_chunk_layout", "flush_unit", "stored_before",
    "two_part_mask",
]  # fmt: skip


def flush_unit(fmt: KVFormat) -> int:
    """Tokens per flush step of :class:`~bitplan.kvcache.MixedKVLayer` for ``fmt`` (its ``flush_unit``)."""
    from bitplan.kvcache import MixedKVLayer

    return int(MixedKVLayer(fmt).flush_unit)


def eval_chunk(fmt: KVFormat) -> int:
    """Tokens per forward pass :func:`bitplan.eval.evaluate` uses when only one layer is quantized with ``fmt``
    (after a first chunk of :func:`eval_chunk_layout` ``[0]`` tokens, if any)."""
    return eval_chunk_layout(fmt)[1]


def eval_chunk_layout(fmt: KVFormat) -> tuple[int, int]:
    """``(first, chunk)`` of :func:`bitplan.eval._chunk_layout` when only one layer is quantized with ``fmt``."""
    from bitplan.eval import _chunk_layout
    from bitplan.kvcache import MixedKVLayer

    first, chunk = _chunk_layout(SimpleNamespace(layers=[MixedKVLayer(fmt)]))
    return int(first), int(chunk)


def stored_before(fmt: KVFormat, window: int, chunk: int | None = None) -> Tensor:
    """``S[i]``: tokens in packed storage (tokens ``[sink, sink + S[i])``) when the chunk holding query ``i``
    is fed (int64 ``[window]``); ``chunk=None`` is evaluate's default layout, an int plain ``chunk``-token steps."""
    first, c = eval_chunk_layout(fmt) if chunk is None else (0, int(chunk))
    if c < 1:
        raise ValueError(f"chunk must be at least 1 token, got {c}")
    u = flush_unit(fmt)
    i = torch.arange(window)
    start = torch.where(i < first, 0, first + (i - first) // c * c) if first else i // c * c
    return (start - fmt.sink - fmt.recent).clamp_min(0) // u * u


def _allowed(mask: Tensor | None, q_len: int, device: torch.device) -> Tensor:
    """The boolean 'may attend' pattern of a captured layer mask (``None``: plain causal)."""
    if mask is None:
        return torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril_()[None, None]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2  # additive float mask: 0 = attend, dtype min = masked


def two_part_mask(
    stored: Sequence[Tensor],
    base: Tensor | None,
    q_len: int,
    *,
    per: int,
    dtype: torch.dtype,
    sinks: Sequence[int] | None = None,
) -> Tensor:
    """Mask ``[len(stored) * per (or 1), 1, T, 2T]`` over keys ``[K_q; K]`` (see the module docstring).

    ``stored[f]`` is :func:`stored_before` of format ``f`` (its batch rows are ``f*per .. (f+1)*per``) and
    ``sinks[f]`` its sink tokens (default none); ``base``
    is the mask the model built for this layer (bool, additive float or ``None`` for causal), whose pattern is
    kept (sliding windows, padding). The result has ``base``'s kind: additive float in ``dtype`` for a float
    mask (eager attention), else boolean (sdpa; ``None`` means sdpa's own causal path).
    """
    device = base.device if base is not None else stored[0].device
    allowed = _allowed(base, q_len, device)
    t = torch.arange(q_len, device=device)
    parts = []
    for f, s in enumerate(stored):
        lo = int(sinks[f]) if sinks is not None else 0
        quant = ((t[None, :] >= lo) & (t[None, :] < lo + s.to(t)[:, None]))[None, None]  # [1,1,T,T]: packed key
        m = torch.cat([allowed & quant, allowed & ~quant], dim=-1)
        parts.append(m.expand(per, *m.shape[1:]) if len(stored) > 1 else m)  # m has batch 1 or per
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    if base is not None and base.dtype != torch.bool:
        zero = torch.zeros((), dtype=dtype)
        return torch.where(out, zero, torch.finfo(dtype).min)
    return out


def _fake_side(x: Tensor, fmt: KVFormat, which: str) -> Tensor:
    """``x [B,H,T,D]`` as the cache would decode it once flushed (16-bit sides and partial groups exact)."""
    bits, axis = fmt.side(which)  # type: ignore[arg-type]
    if bits == 16 or x.shape[2] <= fmt.sink:
        return x
    sink, body = x[:, :, : fmt.sink], x[:, :, fmt.sink :]  # sinks stay exact; groups align after them
    g = fmt.effective_group(which, x.shape[-1])  # type: ignore[arg-type]
    if axis == "token":
        out = fake_quantize_kv(body, bits, "token", g)
    else:
        n = body.shape[2] // g * g  # per-channel: only whole groups are ever flushed (module docstring)
        if n == 0:
            return x
        head = fake_quantize_kv(body[:, :, :n], bits, "channel", g)
        out = head if n == body.shape[2] else torch.cat([head, body[:, :, n:]], dim=2)
    return out if not fmt.sink else torch.cat([sink, out], dim=2)


class TwoPartKV:
    """Stands in for the cache of the one target layer: ``update`` returns ``[K_q; K]`` and ``[V_q; V]``.

    With several formats, batch rows ``f*per .. (f+1)*per`` use ``fmts[f]``. Only ``update`` is provided:
    the layer receives this object as ``past_key_values`` and an explicit mask, nothing else reads it.
    """

    def __init__(self, fmts: Sequence[KVFormat], per: int) -> None:
        self.fmts = tuple(fmts)
        self.per = per

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        out: list[Tensor] = []
        for x, which in ((key_states, "k"), (value_states, "v")):
            if len(self.fmts) == 1:
                xq = _fake_side(x, self.fmts[0], which)
            else:
                xq = torch.cat(
                    [
                        _fake_side(x[f * self.per : (f + 1) * self.per], fmt, which)
                        for f, fmt in enumerate(self.fmts)
                    ]
                )
            out.append(torch.cat([xq, x], dim=2))
        return out[0], out[1]


def chunked_head_inputs(
    model: Any,
    head: Any,
    ids: Tensor,
    layer: int,
    fmts: Sequence[KVFormat],
    chunk: int | None,
    num_layers: int,
) -> Tensor:
    """Fallback for layers that take no ``past_key_values`` keyword: the real thing, as ``evaluate`` does.

    For each format, a fresh :class:`~bitplan.kvcache.MixedPrecisionKVCache` quantizing only ``layer`` is fed
    the windows chunk by chunk; returns the head inputs ``[len(fmts) * b, T, d]`` (format-major).
    """
    from bitplan.eval import _chunk_spans
    from bitplan.kvcache import MixedPrecisionKVCache
    from bitplan.loading import cache_kwarg

    kw = cache_kwarg(model)
    outs: list[Tensor] = []
    handle = head.register_forward_pre_hook(lambda m, a: outs.append(a[0].detach()))
    parts = []
    try:
        for fmt in fmts:
            cache = MixedPrecisionKVCache([fmt if i == layer else KVFormat() for i in range(num_layers)])
            first, c = eval_chunk_layout(fmt) if chunk is None else (0, chunk)
            outs.clear()
            for s, e in _chunk_spans(ids.shape[1], first, c):
                model(ids[:, s:e], **{kw: cache}, use_cache=True)
            parts.append(torch.cat(outs, dim=1))
    finally:
        handle.remove()
    return torch.cat(parts)
