"""Measured sensitivity: the mean KL(p_ref || p_quant) when *only one* unit / layer is quantized.

For every decision unit and weight option, every layer's activation formats and every layer's KV formats,
:func:`measured_scores` scores the calibration windows with only that quantized: the mean next-token KL to
the unquantized model and the change of the mean NLL of the true next tokens. It is the ground truth the
Fisher engine estimates, and costs one partial forward per option and batch; the tricks below only remove
work, none changes a number (beyond float rounding):

* **Reuse of activations.** One reference pass stores, per batch, the hidden state entering every decoder
  layer and the arguments the model gives each layer (rotary ``position_embeddings``, mask, ``position_ids``),
  captured with forward pre-hooks (``with_kwargs=True``). Quantizing something in layer ``l`` leaves layers
  ``< l`` as they were, so a measurement calls layers ``l..L-1``, the final norm and the head directly with
  the captured arguments: the modules, inputs and keywords of the model's own forward. This is *checked* on
  the first batch (replaying all layers must give the reference head input bit for bit); a model that fails
  falls back to full forward passes. Llama, Qwen2 and Mistral replay (so do GPT-2 and GPT-NeoX, except KV:
  their layers take no ``cache`` / ``past_key_values`` keyword, so their KV rows run the real chunked cache).
* **Logit differences through the head.** With ``q = softmax(log p + dz)``, ``KL(p||q) = log sum_v p_v e^dz_v
  - sum_v p_v dz_v`` and ``NLL_q - NLL_ref = log sum_v p_v e^dz_v - dz_y``, where ``dz = W (h - h_ref)`` (a head
  bias cancels). The reference probabilities ``p`` (fp32 logits of the reference head input) are stored once,
  so no reference logits are recomputed per row; recomputing them instead (saving the 1.6 GB that ``p`` takes
  at 16k tokens of a 49k vocabulary) doubled a row's time on SmolLM2-135M. Forming ``dz`` from the hidden
  *difference* keeps bf16 matmuls accurate (rounding relative to ``|dz|``, not to logits of ~20 whose bf16
  rounding is 0.06 nats). Stored ``p`` (fp16) is renormalised by its own sum: the KL is homogeneous of degree
  0 in ``p``, so storage rounding moves a score by a relative ~1e-3 at most (fp32 ``p`` in fp32 mode).
* **One fused vocabulary reduction** (``torch.compile``\\ d when the vocabulary has >= 16k entries; same fp32
  arithmetic as the eager fallback, ~10x faster on a busy 2-core CPU than PyTorch's memory-bound passes).
* **KV in one pass**: the chunked-cache protocol of :func:`bitplan.eval.evaluate` reproduced exactly by a
  masked two-part attention, see :mod:`bitplan.sensitivity._kvattn`. Stacking several KV formats of a layer
  along the batch (``kv_batch``) is supported and gives identical numbers, but was no faster on this CPU
  (10.2 vs 10.2-10.6 s per row), so it is off by default.
* **bf16 compute**: layers run in ``dtype`` (AMX bf16 matmuls: rows 4-6x faster than in fp32 here); reductions fp32.

The bf16 noise floor. Reference and quantized passes both run in ``dtype``, so quantizing nothing scores 0,
but once anything changes, every bf16 rounding downstream changes too. On SmolLM2-135M (16k wikitext-2 tokens)
KL(fp32 model || bf16 model) is 6.4e-4 nats (fp32 head on both), and a bf16 row overstates the fp32 one by about
8e-4 for a unit of layer 0, 5e-4 for layer 15 and 1e-4 for layer 29 (w8g64a at layer 15: 5.0e-4 in bf16 vs
1.2e-5 in fp32; w4g64a: 4.1e-3 vs 3.5e-3; w2g64a: 0.183 vs 0.182). So bf16 ranks options whose KL is well above
~1e-3 (2-3 bit weights, 2-bit KV) and cannot resolve 8-bit or most 4-bit options: use ``dtype=torch.float32``
(exact, 4-6x slower) for those.

The caller's model is left as it was (parameter dtypes and values, training flags, no hooks), also when
interrupted: every change is undone in ``finally`` blocks. Memory per calibration token: ``L`` hidden states
in ``dtype`` and ``p`` over the vocabulary (16k tokens of SmolLM2-135M: 0.57 GB + 1.6 GB in bf16).
On a CPU shared with other jobs, run with ``OMP_WAIT_POLICY=PASSIVE`` (or one thread): OpenMP threads that
spin-wait for a core another process holds made rows 3-4x slower here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from bitplan.errors import ModelError
from bitplan.formats import ActFormat, KVFormat
from bitplan.graph import Granularity, ModelGraph, Unit, build_graph
from bitplan.loading import CACHE_KWARGS, _param_device, compute_dtype_for
from bitplan.quantizers import fake_quantize_act, get_weight_quantizer
from bitplan.sensitivity._calib import CalibData
from bitplan.sensitivity._calibrated import CalibratedWeights, precompute
from bitplan.sensitivity._candidates import Candidates, WeightOption
from bitplan.sensitivity._kvattn import TwoPartKV, chunked_head_inputs, stored_before, two_part_mask
from bitplan.sensitivity._rows import Kind, ScoreRow

__all__ = ["measured_scores"]

_log = logging.getLogger("bitplan")

Key = tuple[str, str, str, str, str]
Skip = Callable[[Key], bool] | Collection[Key]
KVSpec = tuple[int, Sequence[KVFormat], int | None]  # (layer, formats stacked along the batch, chunk)

_FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm")
_HEAD_ROWS = 512  # rows of dz per head matmul + reduction (50 MB of bf16 at a 49k vocabulary)
_COMPILE_MIN_VOCAB = 16384  # below this the eager reduction is cheap and compiling (~30 s) is not worth it


# ------------------------------------------------------------------------------------------ reduction
def _kl_terms(dz: Tensor, p: Tensor, s: Tensor, y: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per token: ``KL(p || softmax(log p + dz))`` and the NLL change of target ``y`` (module docstring).

    ``log sum_v p_v e^dz_v`` is computed as ``log1p(sum_v p_v expm1(dz_v))``, whose rounding is relative to
    the small logit change, not to 1 (with ``exp``, fp32's last-bit bias alone added ~1e-8 nats per token,
    0.4% of an 8-bit option's KL). Tokens whose largest ``dz`` exceeds 60 (fp32 ``exp`` overflows at 88) are
    shifted by it first. ``p`` sums to ``s``. Accumulates in ``acc`` (fp32; fp64 for fp32 work).
    """
    z = dz.to(acc)
    pf = p.to(acc)
    s = s.to(acc)
    m = z.amax(dim=-1)
    c = torch.where(m > 60.0, m, torch.zeros_like(m))
    shift = torch.log1p((pf * torch.expm1(z - c.unsqueeze(-1))).sum(-1) / s) + c
    kl = shift - (pf * z).sum(-1) / s
    dnll = shift - z.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return kl, dnll


_compiled: Callable[..., tuple[Tensor, Tensor]] | None = None


def _reducer(vocab: int, compile: bool | None) -> Callable[..., tuple[Tensor, Tensor]]:
    global _compiled
    if compile is False or (compile is None and vocab < _COMPILE_MIN_VOCAB):
        return _kl_terms
    if _compiled is None:
        _compiled = cast(Callable[..., tuple[Tensor, Tensor]], torch.compile(_kl_terms, dynamic=True))
    return _compiled


# ------------------------------------------------------------------------------------------ model state
@contextlib.contextmanager
def _working_state(model: nn.Module, dtype: torch.dtype) -> Iterator[dict[int, Tensor]]:
    """Eval mode, floating parameters cast to ``dtype`` in place; yields ``id(param) -> original data``.

    Undone on exit whatever happens: the original tensors are put back (not cast back: no rounding).
    """
    flags = {m: m.training for m in model.modules()}
    params = list(model.parameters())
    originals = {id(p): p.data for p in params}
    try:
        model.eval()
        with torch.no_grad():
            for p in params:
                if p.is_floating_point() and p.dtype != dtype:
                    p.data = p.data.to(dtype)
        yield originals
    finally:
        for p in params:
            p.data = originals[id(p)]
        for m, flag in flags.items():
            m.training = flag


@contextlib.contextmanager
def _hooks(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------------ engine
@dataclass
class _Batch:
    ids: Tensor  # [b, T]
    targets: Tensor  # [b*(T-1)] next tokens
    inputs: list[Tensor]  # hidden state entering each layer, [b, T, d] in dtype (empty without reuse)
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]]  # per layer: (args after the hidden state, kwargs)
    h_ref: Tensor  # [b*(T-1), d] reference head input at the predicting positions
    p: Tensor  # [b*(T-1), V] reference next-token probabilities (fp16; fp32 in fp32 mode)
    s: Tensor  # [b*(T-1)] fp32 sums of the stored p


def _split_call(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Tensor, tuple[Any, ...], dict[str, Any]]:
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    kw = dict(kwargs)
    return kw.pop("hidden_states"), (), kw


def _expand(obj: Any, n: int, b: int) -> Any:
    """Repeat every tensor whose batch dim is ``b`` (> 1) ``n`` times along it (format-major stacking)."""
    if torch.is_tensor(obj):
        return (
            obj.repeat(n, *([1] * (obj.dim() - 1))) if b > 1 and obj.dim() > 0 and obj.shape[0] == b else obj
        )
    if isinstance(obj, (tuple, list)):
        return type(obj)(_expand(x, n, b) for x in obj)
    if isinstance(obj, dict):
        return {k: _expand(v, n, b) for k, v in obj.items()}
    return obj


class _Engine:
    """The stored reference of every calibration batch and the partial forward passes over it."""

    def __init__(self, model: nn.Module, graph: ModelGraph, calib: CalibData, *, batch_size: int,
                 dtype: torch.dtype, reuse: bool, compile: bool | None, progress: bool) -> None:  # fmt: skip
        if graph.lm_head is None:
            raise ModelError("measured sensitivity needs a model with an output projection (lm_head)")
        self.model, self.graph, self.dtype = model, graph, dtype
        self.layers = cast(nn.ModuleList, model.get_submodule(graph.layers_path))
        self.head = model.get_submodule(graph.lm_head.path)
        self.head_transposed = graph.lm_head.transposed
        base_path = graph.layers_path.rpartition(".")[0]
        base = model.get_submodule(base_path) if base_path else model
        norms = [getattr(base, n) for n in _FINAL_NORMS if isinstance(getattr(base, n, None), nn.Module)]
        self.norm: nn.Module | None = norms[0] if norms else None
        self.reuse = reuse and self.norm is not None
        self.device = next(model.parameters()).device
        self.window = calib.window
        self.tokens = calib.num_windows * (calib.window - 1)
        self.pdtype = torch.float32 if dtype == torch.float32 else torch.float16
        self.acc = torch.float64 if dtype == torch.float32 else torch.float32
        self.reduce = _reducer(graph.vocab_size, compile)
        self.batches = [self._reference(ids, first=i == 0) for i, ids in enumerate(
            tqdm(calib.batches(batch_size), desc="reference", file=sys.stderr, disable=not progress, leave=False))]  # fmt: skip
        if self.reduce is not _kl_terms:  # compile now (~30 s once per process), not inside the first row
            b0 = self.batches[0]
            self._reduce(torch.zeros_like(b0.p[:17], dtype=dtype), b0.p[:17], b0.s[:17], b0.targets[:17])
        attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
        # transformers >= 5.25 hands decoder layers their cache as ``cache``, older ones as ``past_key_values``
        keys = [next((k for k in CACHE_KWARGS if k in kw), None) for _, kw in self.batches[0].calls]
        self.cache_kwarg = keys[0] if keys and all(k == keys[0] for k in keys) else None
        self.kv_fast = self.reuse and attn in ("sdpa", "eager") and self.cache_kwarg is not None

    def _head_weight(self) -> Tensor:
        w = cast(Tensor, self.head.weight)
        return w.t() if self.head_transposed else w

    def _reference(self, ids: Tensor, first: bool) -> _Batch:
        ids = ids.to(self.device)
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        inputs: list[Tensor] = []
        final: list[Tensor] = []

        def grab(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            h, rest, kw = _split_call(args, kwargs)
            inputs.append(h.detach())
            calls.append((rest, kw))

        handles = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in self.layers]
        handles.append(self.head.register_forward_pre_hook(lambda m, a: final.append(a[0].detach())))
        with _hooks(handles):
            logits = self.model(ids, use_cache=False).logits
        name = type(self.model).__name__
        if len(inputs) != len(self.layers) or len(final) != 1:
            raise ModelError(f"{name}: expected each decoder layer and the head to run once per forward")
        if first and not torch.equal(logits, self.head(final[0])):
            raise ModelError(
                f"{name}: logits are not lm_head(hidden state) (softcapping or scaling?); unsupported"
            )
        del logits
        h_ref = final[0][:, :-1].reshape(-1, final[0].shape[-1])
        w32 = self._head_weight().float()
        bias = getattr(self.head, "bias", None)
        b32 = bias.float() if bias is not None else None
        p = torch.cat([
            F.linear(h_ref[r : r + _HEAD_ROWS].float(), w32, b32).softmax(-1).to(self.pdtype)  # fp32 logits
            for r in range(0, h_ref.shape[0], _HEAD_ROWS)
        ])  # fmt: skip
        batch = _Batch(
            ids, ids[:, 1:].reshape(-1), inputs if self.reuse else [], calls, h_ref, p, p.float().sum(-1)
        )
        if first and self.reuse:
            replay = self.final_hidden(batch, 0)
            if not torch.equal(replay, h_ref):
                diff = (replay.float() - h_ref.float()).abs().max().item()
                _log.warning("%s: replaying the decoder layers does not reproduce the forward pass (max diff %.3g); "
                             "using full forward passes (slower)", name, diff)  # fmt: skip
                self.reuse = False
                batch.inputs = []
        return batch

    def final_hidden(self, batch: _Batch, start: int, kv: KVSpec | None = None) -> Tensor:
        """Head inputs ``[F*b*(T-1), d]``: layers ``start..L-1`` from the stored input of ``start``, with ``kv``
        quantizing one layer's cache for ``F`` formats stacked along the batch."""
        if not self.reuse:
            if kv is None:
                out: list[Tensor] = []
                with _hooks([self.head.register_forward_pre_hook(lambda m, a: out.append(a[0].detach()))]):
                    self.model(batch.ids, use_cache=False)
                h = out[0]
            else:
                h = chunked_head_inputs(
                    self.model, self.head, batch.ids, kv[0], kv[1], kv[2], len(self.layers)
                )
            return h[:, :-1].reshape(-1, h.shape[-1])
        n_var = 1 if kv is None else len(kv[1])
        h = batch.inputs[start]
        b = h.shape[0]
        h = h.repeat(n_var, 1, 1) if n_var > 1 else h
        for i in range(start, len(self.layers)):
            args, kwargs = batch.calls[i]
            if n_var > 1:
                args, kwargs = _expand(args, n_var, b), _expand(kwargs, n_var, b)
            if kv is not None and i == kv[0]:
                stored = [stored_before(f, self.window, kv[2]).to(self.device) for f in kv[1]]
                mask = two_part_mask(
                    stored, batch.calls[i][1].get("attention_mask"), self.window, per=b, dtype=h.dtype,
                    sinks=[f.sink for f in kv[1]],
                )
                assert self.cache_kwarg is not None  # kv_fast: every layer call takes it
                kwargs = {**kwargs, self.cache_kwarg: TwoPartKV(kv[1], b), "attention_mask": mask}
            out_i = self.layers[i](h, *args, **kwargs)
            h = out_i[0] if isinstance(out_i, (tuple, list)) else out_i
        h = cast(nn.Module, self.norm)(h)
        return h[:, :-1].reshape(-1, h.shape[-1])

    def _reduce(self, dz: Tensor, p: Tensor, s: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        try:
            return self.reduce(dz, p, s, y, self.acc)
        except Exception as e:  # noqa: BLE001 - torch.compile unavailable (no compiler, ...): same math, eager
            if self.reduce is _kl_terms:
                raise
            _log.warning(
                "torch.compile of the KL reduction failed (%s: %s); using eager PyTorch", type(e).__name__, e
            )
            self.reduce = _kl_terms
            return _kl_terms(dz, p, s, y, self.acc)

    def score(self, batch: _Batch, h: Tensor) -> tuple[float, float]:
        """Sums of KL and NLL change over the batch's predicted tokens, for head inputs ``h`` of one variant."""
        w = self._head_weight()
        dh = (h.float() - batch.h_ref.float()).to(self.dtype)
        kl_sum = dn_sum = 0.0
        for r in range(0, dh.shape[0], _HEAD_ROWS):
            rows = slice(r, r + _HEAD_ROWS)
            kl, dn = self._reduce(F.linear(dh[rows], w), batch.p[rows], batch.s[rows], batch.targets[rows])
            kl_sum += kl.double().sum().item()
            dn_sum += dn.double().sum().item()
        return kl_sum, dn_sum

    def measure(self, start: int, kv: KVSpec | None = None) -> list[tuple[float, float]]:
        """Mean (KL, NLL change) per predicted token over all batches, one pair per KV format (or one)."""
        n_var = 1 if kv is None else len(kv[1])
        sums = [[0.0, 0.0] for _ in range(n_var)]
        for batch in self.batches:
            for v, hv in enumerate(self.final_hidden(batch, start, kv).chunk(n_var)):
                kl, dn = self.score(batch, hv)
                sums[v][0] += kl
                sums[v][1] += dn
        return [(kl / self.tokens, dn / self.tokens) for kl, dn in sums]


# ------------------------------------------------------------------------------------------ options
@contextlib.contextmanager
def _quantized_unit(
    engine: _Engine, unit: Unit, option: WeightOption, originals: dict[int, Tensor], cache: CalibratedWeights
) -> Iterator[None]:
    """Replace the unit's member weights by ``Q(W)`` dequantized to the compute dtype, then put them back.

    ``Q`` sees the model's own values (before the cast to the compute dtype), as ``apply_plan`` would;
    calibrated options come from ``cache`` (:mod:`bitplan.sensitivity._calibrated`)."""
    params = [cast(Tensor, engine.model.get_submodule(m.path).weight) for m in unit.members]
    if (unit.name, option) in cache:
        deqs = cache.dequantized(unit.name, option)
    else:
        quantizer = get_weight_quantizer(option.method)
        deqs = [quantizer.quantize(originals[id(p)].t() if m.transposed else originals[id(p)], option.format).dequantize()
                for p, m in zip(params, unit.members, strict=True)]  # fmt: skip
    swapped: list[tuple[Tensor, Tensor]] = []
    try:
        for member, param, deq in zip(unit.members, params, deqs, strict=True):
            deq = deq.to(engine.dtype)
            swapped.append((param, param.data))
            param.data = (deq.t() if member.transposed else deq).contiguous()
        yield
    finally:
        for param, data in swapped:
            param.data = data


@contextlib.contextmanager
def _quantized_acts(engine: _Engine, layer: int, fmt: ActFormat) -> Iterator[None]:
    """Fake-quantize the input of every linear of decoder layer ``layer`` per token (as ``QuantLinear`` does)."""
    hook = lambda m, a: (fake_quantize_act(a[0], fmt), *a[1:])  # noqa: E731
    with _hooks(
        [
            engine.model.get_submodule(lin.path).register_forward_pre_hook(hook)
            for lin in engine.graph.layers[layer].linears
        ]
    ):
        yield


# ------------------------------------------------------------------------------------------ driver
@dataclass
class _Group:
    """Rows computed and reported together: one unit's options, one layer's act or KV formats."""

    unit: str
    layer: int
    kind: Kind
    items: Sequence[Any]  # WeightOption / ActFormat / KVFormat still to compute
    info: Unit | None = None


def _groups(graph: ModelGraph, candidates: Candidates, kinds: Sequence[str], granularity: Granularity,
            skip: Callable[[Key], bool]) -> list[_Group]:  # fmt: skip
    out: list[_Group] = []
    for i in range(graph.num_layers):
        if "weight" in kinds:
            for unit in graph.layer_units(i, granularity):
                opts = candidates.weight_options(unit.in_features)
                opts = [o for o in opts if not skip((unit.name, "weight", str(o.format), o.method, "kl"))]
                if opts:
                    out.append(_Group(unit.name, i, "weight", opts, unit))
        for kind, suffix, fmts in (("act", "acts", candidates.acts), ("kv", "kv", candidates.kv)):
            name = f"layers.{i}.{suffix}"
            todo = [f for f in fmts if kind in kinds and not skip((name, kind, str(f), "", "kl"))]
            if todo:
                out.append(_Group(name, i, kind, todo))  # type: ignore[arg-type]
    return out


def measured_scores(
    model: nn.Module,
    calib: CalibData,
    candidates: Candidates,
    *,
    kinds: Sequence[str] = ("weight", "act", "kv"),
    granularity: Granularity = "fused",
    batch_size: int = 4,
    dtype: torch.dtype | None = None,
    skip: Skip = (),
    on_rows: Callable[[list[ScoreRow]], None] | None = None,
    progress: bool = True,
    kv_chunk: int | None = None,
    kv_batch: int = 1,
    reuse: bool = True,
    compile: bool | None = None,
    calibrated: CalibratedWeights | None = None,
) -> list[ScoreRow]:
    """Measured ``kl`` rows: the harm of quantizing only one unit / layer, for every candidate option.

    Weight rows for every decision unit (``granularity``) and option of
    ``candidates.weight_options(unit.in_features)``; ``act`` rows ``layers.{i}.acts`` (every linear input of
    layer ``i`` fake-quantized per token); ``kv`` rows ``layers.{i}.kv`` (only layer ``i``'s cache quantized,
    fed as :func:`bitplan.eval.evaluate` does: ``kv_chunk`` tokens per chunk, by default its exact chunk).
    ``score``: mean KL(p_ref || p_quant) in nats per predicted token over all windows (clamped at 0: a KL is
    negative only by rounding); ``loss_delta``: change of the mean NLL of the true next tokens.

    ``skip``: keys ``(unit, kind, format, quantizer, "kl")`` not to compute (a collection or a predicate).
    ``on_rows`` receives each finished group (all options of one unit, one layer's act or KV formats), e.g.
    to persist it. Returns the rows this call computed, layer by layer.

    ``dtype``: compute dtype; bf16 is fast but has a noise floor of ~1e-4..1e-3 nats (module docstring), fp32
    is exact. ``kv_batch``: KV formats of one layer per stacked pass. ``reuse=False`` forces full forward
    passes (what models whose layers cannot be replayed get). ``compile``: fuse the vocabulary reduction
    with ``torch.compile`` (default: for vocabularies of >= 16k). The model is unchanged afterwards, also when
    interrupted. A tqdm bar on stderr (``progress``) shows the work done, weighted by cost, with an ETA.
    Calibrated options (``@gptq``, ``@awq``...) are scored on their real weights, from ``calibrated`` or
    quantized here first (:func:`bitplan.sensitivity._calibrated.precompute`).
    """
    if batch_size < 1 or kv_batch < 1:
        raise ValueError(f"batch_size and kv_batch must be at least 1, got {batch_size}, {kv_batch}")
    if set(kinds) - {"weight", "act", "kv"}:
        raise ValueError(
            f"unknown kinds {sorted(set(kinds) - {'weight', 'act', 'kv'})}; expected weight, act, kv"
        )
    graph = build_graph(model)
    dtype = dtype or compute_dtype_for(_param_device(model))
    for fmt in candidates.kv if "kv" in kinds else ():
        fmt.check_applicable(graph.head_dim)
    keys = None if callable(skip) else set(skip)
    skipped = cast(Callable[[Key], bool], skip) if keys is None else keys.__contains__
    groups = _groups(graph, candidates, kinds, granularity, skipped)
    if not groups:
        return []
    if calibrated is None:
        work = [(cast(Unit, g.info), g.items) for g in groups if g.kind == "weight"]
        calibrated = precompute(model, graph, calib, work, progress=progress)

    rows: list[ScoreRow] = []
    with _working_state(model, dtype) as originals, torch.no_grad():
        engine = _Engine(model, graph, calib, batch_size=batch_size, dtype=dtype, reuse=reuse, compile=compile,
                         progress=progress)  # fmt: skip
        # progress in "one decoder layer over the calibration set"; the head + reduction cost ~1.5x its weights
        head_cost = (
            1.5 * graph.vocab_size * graph.hidden_size / max(1, sum(x.numel for x in graph.layers[0].linears))
        )

        def cost(layer: int) -> float:
            return graph.num_layers - (layer if engine.reuse else 0) + head_cost

        n_rows = sum(len(g.items) for g in groups)

        def tick(per_row: float, n: int) -> None:
            bar.update(per_row * n)

        bar = tqdm(total=sum(cost(g.layer) * len(g.items) for g in groups), desc="measure", file=sys.stderr,
                   disable=not progress, bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]")  # fmt: skip
        try:
            for g in groups:
                bar.set_description_str(g.unit)
                done = _run_group(
                    engine, g, originals, kv_chunk, kv_batch, functools.partial(tick, cost(g.layer)), calibrated
                )
                rows.extend(done)
                bar.set_postfix_str(f"{len(rows)}/{n_rows} rows")
                if on_rows is not None:
                    on_rows(done)
        finally:
            bar.close()
    return rows


def _run_group(engine: _Engine, g: _Group, originals: dict[int, Tensor], kv_chunk: int | None, kv_batch: int,
               tick: Callable[[int], Any], cache: CalibratedWeights) -> list[ScoreRow]:  # fmt: skip
    out: list[ScoreRow] = []

    def add(fmt: Any, quantizer: str, res: tuple[float, float], t0: float, n: int = 1, params: int = 0,
            bits: float = float("nan")) -> None:  # fmt: skip
        out.append(ScoreRow(unit=g.unit, layer=g.layer, kind=g.kind, format=str(fmt), quantizer=quantizer,
                            method="kl", score=max(0.0, res[0]), loss_delta=res[1], params=params, bits=bits,
                            tokens=engine.tokens, seconds=(time.perf_counter() - t0) / n))  # fmt: skip

    if g.kind == "weight":
        unit = cast(Unit, g.info)
        for opt in g.items:
            t0 = time.perf_counter()
            with _quantized_unit(engine, unit, opt, originals, cache):
                res = engine.measure(g.layer)[0]
            add(
                opt.format,
                opt.method,
                res,
                t0,
                params=unit.numel,
                bits=opt.format.bits_per_weight(unit.in_features),
            )
            tick(1)
    elif g.kind == "act":
        for fmt in g.items:
            t0 = time.perf_counter()
            with _quantized_acts(engine, g.layer, fmt):
                res = engine.measure(g.layer)[0]
            add(fmt, "", res, t0, bits=float(fmt.bits))
            tick(1)
    else:
        step = kv_batch if engine.kv_fast else 1
        hd = engine.graph.head_dim
        for j in range(0, len(g.items), step):
            fmts = list(g.items[j : j + step])
            t0 = time.perf_counter()
            spec = (g.layer, fmts, kv_chunk)
            if engine.kv_fast or not engine.reuse:
                results = engine.measure(g.layer, spec)
            else:  # layers replay but take no cache keyword: the real cache on full forwards
                engine.reuse = False
                try:
                    results = engine.measure(0, spec)
                finally:
                    engine.reuse = True
            for fmt, res in zip(fmts, results, strict=True):
                add(
                    fmt,
                    "",
                    res,
                    t0,
                    n=len(fmts),
                    bits=(fmt.bits_per_element("k", hd) + fmt.bits_per_element("v", hd)) / 2,
                )
            tick(len(fmts))
    return out
