"""A transformers ``Cache`` whose layers each store K and V in their own :class:`~bitplan.formats.KVFormat`.

Why: the plan picks K and V bits per layer (KVTuner-style), so a single-format cache such as transformers'
``QuantizedCache`` cannot express it. Each quantized layer follows KIVI: keys per channel (outlier channels
keep their own scale), values per token, and the newest tokens wait in a 16-bit *residual* buffer -- a
per-channel group can only be quantized once all its ``group`` tokens exist, and the ``recent`` newest tokens
are kept exact on purpose because attention leans hardest on them.

Flush rule (the same for K and V, so both sides always hold the same tokens): after each ``update``, once the
residual holds at least ``recent + u`` tokens, its oldest ``k * u`` tokens beyond the recent window move to
packed storage, where ``u`` is the group size if a quantized side is per-channel and 1 otherwise (a per-token
side can go token by token). A 16-bit side is flushed too but never quantized: it keeps the input dtype.

Sink tokens (``KVFormat.sink``): the first ``sink`` tokens of the sequence never leave the 16-bit buffer.
They sit at its front (``keys[..., :sink, :]``), the residual proper follows, and packed storage starts at
token ``sink``, so per-channel groups are aligned to ``sink + k * group``. Decode attention is a sum over
keys, indifferent to their order, so readers of the layer's bytes (:mod:`bitplan.kernels.attention`) take
the 16-bit buffer as it is; ``update`` hands its caller the tokens in sequence order.

``update`` returns, for attention, the dequantized storage as it was *before* the call, followed by the
residual and the new tokens in the input dtype. The tokens of the current forward pass therefore attend to
each other exactly and read their *past* through quantized K/V -- KIVI's prefill/decode behaviour, and the
fake-quant evaluation protocol (score each window with the previous windows in the cache).
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer

from bitplan.errors import FormatError
from bitplan.formats import KVFormat, parse_kv
from bitplan.loading import CACHE_KWARGS
from bitplan.quantizers.kv import QuantizedKV, cat_kv, dequantize_kv, quantize_kv, slice_kv

__all__ = [
    "MixedKVLayer",
    "MixedPrecisionKVCache",
    "cache_for",
    "install_kv_plan",
    "kv_cache_for",
    "kv_geometry",
    "uninstall_kv_plan",
]

_HOOK = "_prepare_cache_for_generation"


def _as_format(fmt: KVFormat | str) -> KVFormat:
    if isinstance(fmt, KVFormat):
        return fmt
    if isinstance(fmt, str):
        return parse_kv(fmt)
    raise FormatError(f"expected a KVFormat or a KV format string, got {type(fmt).__name__}")


def _nbytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class _Side:
    """The flushed tokens of one side (K or V): packed codes, or the raw tensor when the side is 16-bit."""

    def __init__(self, bits: int, axis: str, group: int) -> None:
        self.bits, self.axis, self.group = bits, axis, group
        self.data: QuantizedKV | Tensor | None = None

    @property
    def num_tokens(self) -> int:
        if self.data is None:
            return 0
        return self.data.num_tokens if isinstance(self.data, QuantizedKV) else self.data.shape[-2]

    @property
    def nbytes(self) -> int:
        return self.data.nbytes if isinstance(self.data, QuantizedKV) else _nbytes(self.data)

    def append(self, chunk: Tensor) -> None:
        if self.bits == 16:
            raw = self.data if isinstance(self.data, Tensor) else None
            self.data = chunk.clone() if raw is None else torch.cat([raw, chunk], dim=-2)
            return
        q = quantize_kv(chunk, self.bits, self.axis, self.group)  # type: ignore[arg-type]
        self.data = q if self.data is None else cat_kv([self.data, q])  # type: ignore[list-item]

    def read(self, dtype: torch.dtype, start: int = 0, end: int | None = None) -> Tensor | None:
        """Tokens ``[start, end)`` decoded to ``dtype`` (None when nothing is stored)."""
        if self.data is None:
            return None
        end = self.num_tokens if end is None else end
        if isinstance(self.data, QuantizedKV):
            part = self.data if (start, end) == (0, self.num_tokens) else slice_kv(self.data, start, end)
            return dequantize_kv(part, dtype)
        return self.data[..., start:end, :].to(dtype)

    def truncate(self, keep: int) -> None:
        if self.data is None or keep >= self.num_tokens:
            return
        if keep == 0:
            self.data = None
        elif isinstance(self.data, QuantizedKV):
            self.data = slice_kv(self.data, 0, keep)
        else:
            self.data = self.data[..., :keep, :].clone()

    def map_batch(self, fn: Callable[[Tensor], Tensor]) -> None:
        if isinstance(self.data, QuantizedKV):
            self.data = self.data.map_batch(fn)
        elif self.data is not None:
            self.data = fn(self.data)


class MixedKVLayer(CacheLayerMixin):
    """One decoder layer's cache in its own :class:`KVFormat` (see the module docstring for the flush rule).

    ``keys`` / ``values`` hold only the 16-bit residual; the older tokens live packed in the two sides.
    ``crop`` into packed storage dequantizes the affected groups back into the residual (a lossy round trip,
    hence ``is_croppable = False``).
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, fmt: KVFormat | str, **kwargs: Any) -> None:
        super().__init__()
        self.fmt = _as_format(fmt)
        per_channel = any(b < 16 and ax == "channel" for b, ax in (self.fmt.side("k"), self.fmt.side("v")))
        self.flush_unit = self.fmt.group_size if per_channel else 1
        self._k: _Side | None = None
        self._v: _Side | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.fmt})"

    # -- lifecycle ------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.num_heads, self.head_dim = key_states.shape[1], key_states.shape[-1]
        for dim in {key_states.shape[-1], value_states.shape[-1]}:
            self.fmt.check_applicable(dim)
        kb, kax = self.fmt.side("k")
        vb, vax = self.fmt.side("v")
        self._k = _Side(kb, kax, self.fmt.effective_group("k", key_states.shape[-1]))
        self._v = _Side(vb, vax, self.fmt.effective_group("v", value_states.shape[-1]))
        self.keys = key_states[..., :0, :].clone()
        self.values = value_states[..., :0, :].clone()
        self.is_initialized = True

    def reset(self) -> None:
        self._k = self._v = None
        self.keys = self.values = None
        self.is_initialized = False

    def _parts(self) -> tuple[_Side, _Side, Tensor, Tensor]:
        if self._k is None or self._v is None or self.keys is None or self.values is None:
            raise RuntimeError(f"{self!r} is used before its first update")
        return self._k, self._v, self.keys, self.values

    # -- the hot path ---------------------------------------------------------------------------------
    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Append new tokens; return sinks + past (dequantized) + residual + new K and V in the input dtype."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k_side, v_side, old_k, old_v = self._parts()
        past_k = k_side.read(key_states.dtype)
        past_v = v_side.read(value_states.dtype)
        buf_k = torch.cat([old_k, key_states], dim=-2)
        buf_v = torch.cat([old_v, value_states], dim=-2)
        s = min(self.fmt.sink, buf_k.shape[-2])  # the sinks are the buffer's first tokens, always
        if past_k is None or past_v is None:  # both or neither: the sides always hold the same tokens
            out_k, out_v = buf_k, buf_v
        else:
            out_k = torch.cat([buf_k[..., :s, :], past_k, buf_k[..., s:, :]], dim=-2)
            out_v = torch.cat([buf_v[..., :s, :], past_v, buf_v[..., s:, :]], dim=-2)
        n_flush = max(0, buf_k.shape[-2] - s - self.fmt.recent) // self.flush_unit * self.flush_unit
        if n_flush:
            k_side.append(buf_k[..., s : s + n_flush, :])
            v_side.append(buf_v[..., s : s + n_flush, :])
            keep_k = (buf_k[..., :s, :], buf_k[..., s + n_flush :, :])
            keep_v = (buf_v[..., :s, :], buf_v[..., s + n_flush :, :])
            buf_k, buf_v = torch.cat(keep_k, dim=-2), torch.cat(keep_v, dim=-2)
        self.keys, self.values = buf_k, buf_v
        return out_k, out_v

    # -- sizes ----------------------------------------------------------------------------------------
    @property
    def stored_tokens(self) -> int:
        """Tokens in packed storage (quantized, or raw for a 16-bit side)."""
        return 0 if self._k is None else self._k.num_tokens

    @property
    def residual_tokens(self) -> int:
        """Tokens in the 16-bit buffer: the sinks (first) and the residual."""
        return 0 if self.keys is None else self.keys.shape[-2]

    @property
    def nbytes(self) -> int:
        """Bytes actually held: packed codes + fp16 scales/offsets + raw 16-bit side + residual."""
        sides = sum(s.nbytes for s in (self._k, self._v) if s is not None)
        return sides + _nbytes(self.keys) + _nbytes(self.values)

    def get_seq_length(self) -> int:
        return self.stored_tokens + self.residual_tokens if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int, *args: Any) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    # -- batch / beam operations (all exact: they only move packed bytes) -----------------------------
    def _map_batch(self, fn: Callable[[Tensor], Tensor]) -> None:
        if not self.is_initialized:
            return
        k_side, v_side, keys, values = self._parts()
        k_side.map_batch(fn)
        v_side.map_batch(fn)
        self.keys, self.values = fn(keys), fn(values)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        idx = beam_idx.to(self.device) if self.is_initialized else beam_idx
        self._map_batch(lambda t: t.index_select(0, idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def offload(self) -> None:
        self._map_batch(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized and self.keys is not None and self.keys.device != self.device:
            self._map_batch(lambda t: t.to(self.device, non_blocking=True))

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest ``-tokens_to_remove`` tokens (transformers' convention: a negative count).

        Within the residual this is exact. Cropping into packed storage dequantizes the stored tokens from
        the last flush boundary at or before the new length back into the residual (lossy: they will be
        re-quantized, with different neighbours, at the next flush)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop({tokens_to_remove}): pass a negative number of tokens to remove, as with DynamicLayer"
            )
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        k_side, v_side, keys, values = self._parts()
        keep = max(0, self.get_seq_length() - n)
        stored = self.stored_tokens
        s = min(self.fmt.sink, keys.shape[-2])  # sequence: [0, s) sinks, [s, s + stored) packed, then residual
        if keep >= s + stored:
            self.keys, self.values = keys[..., : keep - stored, :], values[..., : keep - stored, :]
            return
        if keep <= s:
            k_side.truncate(0)
            v_side.truncate(0)
            self.keys, self.values = keys[..., :keep, :].clone(), values[..., :keep, :].clone()
            return
        boundary = (keep - s) // self.flush_unit * self.flush_unit  # in packed-storage tokens
        tail_k = k_side.read(self.dtype, boundary, stored)
        tail_v = v_side.read(self.dtype, boundary, stored)
        assert tail_k is not None and tail_v is not None  # stored > keep - s >= boundary
        k_side.truncate(boundary)
        v_side.truncate(boundary)
        self.keys = torch.cat([keys[..., :s, :], tail_k[..., : keep - s - boundary, :]], dim=-2)
        self.values = torch.cat([values[..., :s, :], tail_v[..., : keep - s - boundary, :]], dim=-2)


class MixedPrecisionKVCache(Cache):
    """A cache with one :class:`KVFormat` per decoder layer; ``k16v16`` layers are plain ``DynamicLayer``s."""

    def __init__(self, formats: Sequence[KVFormat | str]) -> None:
        fmts = tuple(_as_format(f) for f in formats)
        if not fmts:
            raise FormatError("a KV plan needs one format per decoder layer, got none")
        layers: list[CacheLayerMixin] = [MixedKVLayer(f) if f.is_quantized else DynamicLayer() for f in fmts]
        super().__init__(layers=layers)  # type: ignore[arg-type]
        self.formats = fmts

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(str, self.formats))})"

    @property
    def nbytes(self) -> int:
        """Bytes held by all layers (packed codes, scales, offsets, raw sides and residuals)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, MixedKVLayer):
                total += layer.nbytes
            else:
                total += _nbytes(getattr(layer, "keys", None)) + _nbytes(getattr(layer, "values", None))
        return total

    def quantized_bytes_per_token(self, num_kv_heads: int, head_dim: int) -> float:
        """Steady-state bytes one token adds to the whole cache (per sequence), from the formats."""
        return sum(f.bytes_per_token(num_kv_heads, head_dim) for f in self.formats)

    def stored_tokens(self) -> list[int]:
        """Per layer: tokens already in packed storage (all tokens for a ``DynamicLayer``)."""
        out = []
        for layer in self.layers:
            if isinstance(layer, MixedKVLayer):
                out.append(layer.stored_tokens)
            else:
                out.append(layer.get_seq_length() if isinstance(layer, CacheLayerMixin) else 0)
        return out


# -- model integration ------------------------------------------------------------------------------------
def kv_geometry(model_or_config: Any) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a decoder from ``model.config`` (or a config)."""
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    n_heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return int(config.num_hidden_layers), int(kv_heads), int(head_dim)


def _validated(model: Any, formats: Sequence[KVFormat | str] | Any) -> list[KVFormat]:
    if isinstance(formats, (str, os.PathLike)):  # a KV plan file (bitplan export --to kv) or a plan JSON
        from bitplan.export import read_kv_formats

        formats = read_kv_formats(formats)
    if hasattr(formats, "kv_formats"):
        formats = formats.kv_formats()
    fmts = [_as_format(f) for f in formats]
    n_layers, _, head_dim = kv_geometry(model)
    if len(fmts) != n_layers:
        raise FormatError(f"KV plan has {len(fmts)} formats but the model has {n_layers} decoder layers")
    for i, f in enumerate(fmts):
        try:
            f.check_applicable(head_dim)
        except FormatError as e:
            raise FormatError(f"layer {i}: {e}") from None
    return fmts


def kv_cache_for(model: Any, formats_or_plan: Sequence[KVFormat | str] | Any) -> MixedPrecisionKVCache:
    """A fresh cache for ``model`` from a list of formats, a plan (any object with ``kv_formats()``), or the
    path of a KV plan file (``bitplan export --to kv``, YAML or JSON) or plan JSON. Pass it to ``generate()`` as
    ``past_key_values=``."""
    return MixedPrecisionKVCache(_validated(model, formats_or_plan))


def cache_for(model: Any) -> MixedPrecisionKVCache | None:
    """A fresh cache if a KV plan is installed on ``model`` and quantizes some layer, else None."""
    fmts = getattr(model, "bitplan_kv_formats", None)
    if not fmts or not any(f.is_quantized for f in fmts):
        return None
    return MixedPrecisionKVCache(fmts)


def _prepare_cache_with_plan(
    self: Any, generation_config: Any, model_kwargs: dict, *args: Any, **kwargs: Any
) -> Any:
    # Let transformers do all its own validation and choices first, then swap in our cache only where it
    # made its *default* one (a plain, non-offloaded DynamicCache) because the caller passed no cache.
    had_cache = any(model_kwargs.get(k) is not None for k in CACHE_KWARGS)
    result = type(self)._prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs)
    key = next((k for k in CACHE_KWARGS if model_kwargs.get(k) is not None), None)
    made = model_kwargs.get(key) if key else None
    if not had_cache and type(made) is DynamicCache and not made.offloading:
        cache = cache_for(self)
        if cache is not None:
            if getattr(generation_config, "is_assistant", False):
                cache.activate_past_recording()
            model_kwargs[key] = cache  # type: ignore[index]
    return result


def install_kv_plan(model: Any, formats: Sequence[KVFormat | str] | Any) -> None:
    """Record per-layer KV formats on ``model`` and make ``generate()`` use a fresh mixed cache by default.

    Hook: ``generate`` (transformers 5.x) builds its cache in ``self._prepare_cache_for_generation(...)``, after
    input expansion for beams/samples and with the resolved generation config. We shadow that method on the
    *instance* with a wrapper that calls the class's own implementation and only replaces the default
    ``DynamicCache`` it creates. This leaves explicit ``past_key_values``, ``use_cache=False`` and any
    ``cache_implementation`` (static, offloaded, quantized) untouched, needs no subclassing or patching of
    the class (other instances are unaffected), and is undone by deleting one instance attribute.
    """
    model.bitplan_kv_formats = _validated(model, formats)
    object.__setattr__(model, _HOOK, types.MethodType(_prepare_cache_with_plan, model))


def uninstall_kv_plan(model: Any) -> None:
    """Undo :func:`install_kv_plan` (no-op if none is installed)."""
    if _HOOK in vars(model):
        object.__delattr__(model, _HOOK)
    if "bitplan_kv_formats" in vars(model):
        object.__delattr__(model, "bitplan_kv_formats")
