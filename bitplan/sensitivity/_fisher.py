"""Fisher (second-order Taylor) sensitivity: every unit x every option from one forward + backward per batch.

What is estimated. To second order, the mean KL of the next-token distributions after a small change of
the model is ``1/2 d^T F d``, ``F`` the Fisher of the model's *own* predictive distribution (the first-order
term vanishes at the reference). Quantizing one unit changes only its output, ``dY = X (Q(W) - W)^T``, so
the form is evaluated at unit outputs (ModelOpt AutoQuantize style) with ``g_t = d log p(y) / dY_t``.

Why labels are *sampled from the model*: with ``y ~ p_ref``, ``E_y[g g^T]`` is the true Fisher, so one
sampled label per position estimates ``1/2 dY^T F dY`` -- the KL -- without bias. The data labels would give
the empirical Fisher (curvature of the loss on the text, weighting tokens the model gets wrong), which is
biased for KL. Sampling is inverse-CDF on the fp32 softmax from a seeded generator (``multinomial`` is ~8x
slower on a 49k vocabulary); ``p - onehot(y)`` goes straight into ``logits.backward``.

The quadratic form (``form``). ``"token"`` (default): ``1/2 sum_t (sum_j g_tj dY_tj)^2``, the exact rank-1
form of one sampled label, per token. It keeps the correlation between output dimensions (an error the
softmax does not see costs nothing), which ModelOpt's ``"diag"``, ``1/2 sum_tj g_tj^2 dY_tj^2``, drops. Both
drop cross-*position* terms (``dY`` at tokens ``t != t'`` reaching one prediction through attention), which
are large where attention averages an error that is coherent across tokens: ``v_proj``'s ``dW x_t`` follows
the tokens' common component. On SmolLM2-135M (w4g64a, 4k tokens) the per-token form gave 0.19-0.37x the
measured KL for ``v_proj`` (q 0.84-0.91x, k 0.6-1.6x). So a separate ``v_proj`` with an ``o_proj`` beside it
is scored at the *attention output*: per target token ``s``, ``sum_h g_O[s,h] . (A_h dV_h)[s]``, with the
attention probabilities ``A`` (the model runs eager attention to return them) and ``g_O`` the gradient at
``o_proj``'s input; every cross-source term the attention creates is kept (fused checkpoint layouts, GPT-2
``c_attn`` / NeoX ``query_key_value``, keep the per-token form). With it, fused units on SmolLM2 measured
0.67-1.12x (qkv 0.71-1.12x, was 0.21-0.68x; the rest of the shortfall is later layers' attention mixing),
a8t layers 0.89-1.18x, Spearman 0.98 (0.95 without). Squaring one sequence-wide sum instead would be
unbiased, but it is one chi-square sample per window: 0.2-1.9x with 8 windows, too noisy to rank units.

Scores sum over every (window, position) and divide by the predicted tokens (``windows * (window - 1)``;
the last position has no label), so a row is nats/token like the measured KL it estimates; >= 0 always.

Cost. Per unit x option, ``g_t . (dW x_t)`` costs ``2 * tokens * numel`` FLOPs -- the irreducible work.
A member's options are stacked into one ``[d, n * d']`` matrix: one bf16 GEMM (fp32 accumulation on AMX)
on the side with the smaller output (``X @ dW^T`` if ``out <= in``, else ``g @ dW``), then a batched dot.
``Q(W) - W`` comes from the *caller's* weights in fp32 (not the bf16 copy), once per member x option, and is
cached in ``dtype`` while its layer is scored (quantizing again per batch would add ~25% to the pass). Fused members share ``X``; their dots add per token before squaring
(``g . dY`` of the fused output).

Activations need no GEMM: ``g . (dX W^T) = (g W) . dX``, and ``g W`` is the gradient at the linear's input,
which autograd computes anyway (a full backward hook hands it over per linear). With ``dX = Q_a(X) - X``
the dots of all the layer's linears add per token before squaring: quantizing every input of the layer
(``layers.{i}.acts``); ``a4t`` is a big perturbation where second order only ranks. KV caches are not
scored here (the measured path scores ``kind="kv"``).

Memory: one decoder layer at a time. A plain ``logits.backward()`` keeps every layer's activations of a
batch alive until the gradient reaches them, and cached deltas for every unit x option: 7.9 GB beyond the
model for SmolLM2-135M (3 options, 4 x 512 tokens per batch), 19x its decoder weights. So the pass is
*layer-streamed* (activation checkpointing at decoder-layer granularity, run by hand): one no-grad forward per
batch keeps the hidden state entering every layer (``L x tokens x hidden``, as the measured engine does) and
each layer's call arguments; the sampled-label gradient at the last layer's output comes from the final norm
and the head, 256 positions at a time; then, from the last layer down, each layer is re-run with grad on its
stored input for every batch and ``backward`` takes the stored gradient at its output to the one at its
input. Only that layer's activations, its ``Q(W) - W`` (quantized once, reused for every batch, dropped when
the layer is done) and, in a ``dtype`` other than the model's, one copy of that layer exist at a time. It
costs one more layer forward per batch (~1/3 of a backward); the numbers are those of the full backward
(same seeded labels, same per-token dots; the tests compare the two). A model whose layers cannot be replayed
from their captured arguments (checked bit for bit on a prefix of the first window) or whose logits are
not ``lm_head(final_norm(h))`` falls back to the full backward, with a warning. The caller's model is not
modified (parameters frozen, hooks removed; flags, mode and attention implementation restored).
"""

from __future__ import annotations

import copy
import functools
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bitplan._layerwise import _Stop
from bitplan.graph import Granularity, ModelGraph, Unit, build_graph
from bitplan.loading import _param_device, compute_dtype_for
from bitplan.sensitivity._calib import CalibData
from bitplan.sensitivity._calibrated import CalibratedWeights, precompute
from bitplan.sensitivity._candidates import Candidates
from bitplan.sensitivity._fisher_hooks import _Scorer, _v_pairs
from bitplan.sensitivity._measure import _FINAL_NORMS, _hooks, _split_call
from bitplan.sensitivity._rows import ScoreRow

__all__ = ["FisherForm", "fisher_scores"]

FisherForm = Literal["token", "diag"]
_KINDS = ("weight", "act")
_HEAD_ROWS = 256  # positions per head forward / backward: [256, vocab] fp32 logits, probabilities and gradient
_log = logging.getLogger("bitplan")


def _set_attn(model: nn.Module, impl: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    with suppress(Exception):  # if it fails there are no attention weights: v_proj keeps the per-token form
        if callable(setter):
            setter(impl)


@contextmanager
def _frozen(model: nn.Module, eager: bool) -> Iterator[nn.Module]:
    """``model`` in eval mode with frozen parameters (and eager attention); all restored afterwards."""
    params = list(model.parameters())
    flags, training = [p.requires_grad for p in params], model.training
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    try:
        model.eval().requires_grad_(False)
        if eager and impl != "eager":
            _set_attn(model, "eager")
        yield model
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
        model.train(training)
        if eager and impl not in (None, "eager"):
            _set_attn(model, impl)


def _model_dtype(module: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


@contextmanager
def _in_dtype(module: nn.Module, dtype: torch.dtype) -> Iterator[nn.Module]:
    """``module`` itself when its floating parameters are in ``dtype``, else a ``dtype`` copy (dropped after)."""
    if all(p.dtype == dtype for p in module.parameters() if p.is_floating_point()):
        yield module
    else:
        yield copy.deepcopy(module).to(dtype)


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    """Floating tensors in ``obj`` (rotary tables, additive masks) in ``dtype``; -inf/huge clamped to its range."""
    if isinstance(obj, Tensor):
        if not obj.is_floating_point() or obj.dtype == dtype:
            return obj
        info = torch.finfo(dtype)
        return obj.clamp(info.min, info.max).to(dtype)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(x, dtype) for x in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


def _submodule(layer: nn.Module, prefix: str, path: str) -> nn.Module:
    """The module of ``layer`` (whose model path is ``prefix`` minus the dot) at model path ``path``."""
    return layer.get_submodule(path.removeprefix(prefix))


def _hidden(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _sampled_grad(logits: Tensor, u: Tensor) -> Tensor:
    """``p - onehot(y)`` for rows of logits, ``y ~ p = softmax`` by inverse CDF at uniforms ``u`` ``[rows, 1]``."""
    p = logits.detach().float().softmax(-1)
    cdf = p.cumsum(-1)
    y = torch.searchsorted(cdf, u.to(p.device) * cdf[:, -1:]).clamp_(max=p.shape[-1] - 1)
    return p.scatter_add_(-1, y, torch.full_like(y, -1.0, dtype=p.dtype)).to(logits.dtype)


def _sampled_logit_grad(logits: Tensor, gen: torch.Generator) -> Tensor:
    """``p - onehot(y)``, ``y ~ p = softmax(logits)``, at every position but the last (zero there)."""
    b, length, _ = logits.shape
    grad = torch.zeros_like(logits)
    for i in range(b):  # one window at a time bounds the fp32 temporaries
        grad[i, :-1] = _sampled_grad(logits[i, :-1], torch.rand(length - 1, 1, generator=gen))
    return grad


# ------------------------------------------------------------------------------------- layer-streamed pass
@dataclass
class _Batch:
    """One calibration batch of the layer-streamed pass."""

    inputs: list[Tensor | None]  # hidden state entering each layer, then the last layer's output [b, T, d]
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]]  # per layer: (args after the hidden state, kwargs)
    grad: Tensor | None = None  # gradient at the output of the next layer to score


def _final_norm(model: nn.Module, graph: ModelGraph) -> nn.Module | None:
    base_path = graph.layers_path.rpartition(".")[0]
    base = model.get_submodule(base_path) if base_path else model
    return next((m for n in _FINAL_NORMS if isinstance(m := getattr(base, n, None), nn.Module)), None)


def _capture(model: nn.Module, layers: nn.ModuleList, head: nn.Module, ids: Tensor) -> _Batch | None:
    """Inputs and call arguments of every layer, and the last layer's output, for one batch (no grad)."""
    inputs: list[Tensor] = []
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    last: list[Tensor] = []

    def grab(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        h, rest, kw = _split_call(args, kwargs)
        inputs.append(h.detach())
        calls.append((rest, kw))

    def stop(_m: nn.Module, _a: Any) -> None:
        raise _Stop  # the capture needs no logits (a batch's are [b, T, vocab] fp32)

    handles = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in layers]
    handles.append(layers[-1].register_forward_hook(lambda _m, _a, out: last.append(_hidden(out).detach())))
    handles.append(head.register_forward_pre_hook(stop))
    with _hooks(handles), torch.no_grad(), suppress(_Stop):
        model(ids, use_cache=False)
    if len(inputs) != len(layers) or len(last) != 1:
        return None
    return _Batch([*inputs, last[0]], calls)


def _replays(model: nn.Module, layers: nn.ModuleList, head: nn.Module, norm: nn.Module, ids: Tensor) -> bool:
    """Whether replaying the layers from their captured arguments, the final norm and the head reproduces the
    model's logits bit for bit (on a short prefix: the check is structural, the logits of a batch are big)."""
    final: list[Tensor] = []
    with _hooks([head.register_forward_pre_hook(lambda _m, a: final.append(a[0].detach()))]), torch.no_grad():
        logits = model(ids, use_cache=False).logits
    batch = _capture(model, layers, head, ids)
    if batch is None or len(final) != 1:
        return False
    with torch.no_grad():
        h = cast(Tensor, batch.inputs[0])
        for layer, (args, kw) in zip(layers, batch.calls, strict=True):
            h = _hidden(layer(h, *args, **kw))
        return torch.equal(h, cast(Tensor, batch.inputs[-1])) and torch.equal(norm(h), final[0]) and torch.equal(head(final[0]), logits)


def _head_grad(norm: nn.Module, head: nn.Module, h_last: Tensor, gen: torch.Generator) -> Tensor:
    """Gradient of ``log p(y)`` (labels sampled from the model) at the last layer's output, ``[b, T, d]``.

    The final norm works per position, so the head runs ``_HEAD_ROWS`` positions at a time: the ``[rows,
    vocab]`` temporaries stay small (a window at once would be 4 x 100 MB at SmolLM2's 49k vocabulary)."""
    b, length, _ = h_last.shape
    h = h_last.detach().to(_model_dtype(head) or h_last.dtype).requires_grad_(True)
    for i in range(b):
        u = torch.rand(length - 1, 1, generator=gen)  # the same draws as the full backward's
        for r in range(0, length - 1, _HEAD_ROWS):
            rows = slice(r, min(r + _HEAD_ROWS, length - 1))
            with torch.enable_grad():
                logits = head(norm(h[i, rows]))
            logits.backward(_sampled_grad(logits, u[rows]))
    return cast(Tensor, h.grad)


def _stream(model: nn.Module, graph: ModelGraph, batches: list[Tensor], scorer: _Scorer, dtype: torch.dtype,
            gen: torch.Generator, progress: bool) -> bool:  # fmt: skip
    """The layer-streamed pass (module docstring); False (nothing scored) if the model cannot be replayed."""
    if graph.lm_head is None or not graph.layers or (norm := _final_norm(model, graph)) is None:
        return False
    layers = cast(nn.ModuleList, model.get_submodule(graph.layers_path))
    head = model.get_submodule(graph.lm_head.path)
    device = cast(Tensor, next(model.parameters())).device
    if not _replays(model, layers, head, norm, batches[0][:1, :64].to(device)):
        return False
    state: list[_Batch] = []
    for ids in tqdm(batches, desc="fisher forward", unit="batch", disable=not progress, file=sys.stderr):
        batch = _capture(model, layers, head, ids.to(device))
        if batch is None:
            return False
        state.append(batch)
    same = _model_dtype(model) == dtype
    if not same:  # the stored inputs as the layers compute them in ``dtype``, one layer copy at a time
        for batch in state:
            batch.inputs[0] = cast(Tensor, batch.inputs[0]).to(dtype)
        for i, layer in enumerate(layers):
            with _in_dtype(layer, dtype) as work, torch.no_grad():
                for batch in state:
                    args, kw = _cast(batch.calls[i], dtype)
                    batch.inputs[i + 1] = _hidden(work(batch.inputs[i], *args, **kw))
    for batch in state:
        batch.grad = _head_grad(norm, head, cast(Tensor, batch.inputs[-1]), gen).to(dtype)
        batch.inputs[-1] = None
    for i in tqdm(range(len(layers) - 1, -1, -1), desc="fisher", unit="layer", disable=not progress, file=sys.stderr):
        with _in_dtype(layers[i], dtype) as work:
            with _hooks(scorer.install(functools.partial(_submodule, work, graph.layers[i].path + "."), i)):
                for batch in state:
                    h = cast(Tensor, batch.inputs[i]).detach().requires_grad_(True)
                    args, kw = batch.calls[i] if same else _cast(batch.calls[i], dtype)
                    with torch.enable_grad():
                        out = _hidden(work(h, *args, **kw))
                    out.backward(batch.grad)
                    batch.grad, batch.inputs[i] = cast(Tensor, h.grad), None
                    del h, out
                    scorer.end_batch()
        scorer.release(i)
    return True


# ------------------------------------------------------------------------------------- full backward (fallback)
@contextmanager
def _working_model(model: nn.Module, dtype: torch.dtype, eager: bool) -> Iterator[nn.Module]:
    """``model`` itself (frozen, eval; restored afterwards) when it is already in ``dtype``, else a copy."""
    if any(p.dtype != dtype for p in model.parameters() if p.is_floating_point()):
        work = copy.deepcopy(model).to(dtype).eval().requires_grad_(False)
        if eager:
            _set_attn(work, "eager")
        yield work
        return
    with _frozen(model, eager) as work:
        yield work


def _full(model: nn.Module, batches: list[Tensor], scorer: _Scorer, dtype: torch.dtype, eager: bool,
          gen: torch.Generator, progress: bool) -> None:  # fmt: skip
    """One forward + backward of the whole model per batch: every layer's activations live at once."""
    with _working_model(model, dtype, eager) as work:
        with _hooks(scorer.install(work.get_submodule)):
            embed: nn.Module = work.get_input_embeddings()  # type: ignore[operator]
            device = cast(Tensor, embed.weight).device
            for ids in tqdm(batches, desc="fisher", unit="batch", disable=not progress, file=sys.stderr):
                with torch.enable_grad():  # parameters are frozen: grads flow through activations only
                    emb = embed(ids.to(device)).detach().requires_grad_(True)
                    logits = work(inputs_embeds=emb, use_cache=False).logits
                    logits.backward(_sampled_logit_grad(logits, gen))
                del logits, emb
                scorer.end_batch()
        scorer.end_batch()


def fisher_scores(
    model: nn.Module,
    calib: CalibData,
    candidates: Candidates,
    *,
    granularity: Granularity = "fused",
    batch_size: int = 4,
    dtype: torch.dtype | None = None,
    kinds: Sequence[str] = _KINDS,
    form: FisherForm = "token",
    progress: bool = True,
    seed: int = 0,
    calibrated: CalibratedWeights | None = None,
    stream: bool = True,
) -> list[ScoreRow]:
    """Fisher estimate of the KL of quantizing each unit with each weight option, and each layer's
    activations with each act format, from one forward + backward per calibration batch.

    Rows (``method="fisher"``): weights in unit order x options in candidate order, then acts per layer
    x act format. ``dtype`` is the compute dtype of the model and the GEMMs (scores accumulate in fp32 /
    fp64); ``form`` the quadratic form (module docstring); ``kinds`` a subset of ``("weight", "act")``.
    Calibrated options (``@gptq``, ``@awq``...) are scored on their real weights, from ``calibrated`` or
    quantized here first (:func:`bitplan.sensitivity._calibrated.precompute`). ``stream=False`` runs the
    full backward (all layers' activations at once; the reference the layer-streamed pass is tested against).
    """
    bad = [k for k in kinds if k not in _KINDS]
    if bad:
        raise ValueError(f"fisher_scores scores kinds {_KINDS}, not {bad} (KV caches: use the measured KL)")
    if form not in ("token", "diag") or batch_size < 1:
        raise ValueError(f"need form 'token' or 'diag' and batch_size >= 1, got {form!r}, {batch_size}")
    start = time.perf_counter()
    graph = build_graph(model)
    units = graph.units(granularity)
    dtype = dtype or compute_dtype_for(_param_device(model))
    tokens = calib.num_windows * (calib.window - 1)
    eager = form == "token" and "weight" in kinds and bool(_v_pairs(graph))
    if calibrated is None and "weight" in kinds:
        calibrated = precompute(model, graph, calib, [(u, candidates.weight_options(u.in_features)) for u in units],
                                progress=progress)  # fmt: skip
    batches = calib.batches(batch_size)
    scorer = _Scorer(model, graph, units, candidates, kinds, form, dtype, calibrated)
    with _frozen(model, eager):
        if not (stream and _stream(model, graph, batches, scorer, dtype, torch.Generator().manual_seed(seed), progress)):
            if stream:
                _log.warning("%s: its decoder layers cannot be replayed one at a time; Fisher runs the full backward "
                             "(all layers' activations of a batch in memory)", type(model).__name__)  # fmt: skip
            _full(model, batches, scorer, dtype, eager, torch.Generator().manual_seed(seed), progress)
    return _rows(scorer, units, tokens, time.perf_counter() - start)


def _rows(scorer: _Scorer, units: Sequence[Unit], tokens: int, wall: float) -> list[ScoreRow]:
    """Score rows; the wall time is attributed in proportion to each row's own measured compute."""
    own = sum(float(t.sum()) for t in scorer.sec_w) + float(scorer.sec_a.sum())
    scale = wall / own if own > 0 else 0.0
    rows: list[ScoreRow] = []
    for k, unit in enumerate(units):
        for j, opt in enumerate(scorer.opts[k]):
            score, bits = float(scorer.weight[k][j]) / tokens, opt.format.bits_per_weight(unit.in_features)
            rows.append(
                ScoreRow(unit.name, int(unit.layer or 0), "weight", str(opt.format), opt.method, "fisher", score,
                         params=unit.numel, bits=bits, tokens=tokens, seconds=float(scorer.sec_w[k][j]) * scale)
            )  # fmt: skip
    for layer in range(scorer.act.shape[0] if scorer.acts else 0):
        for j, act in enumerate(scorer.acts):
            score, seconds = float(scorer.act[layer, j]) / tokens, float(scorer.sec_a[layer, j]) * scale
            rows.append(
                ScoreRow(f"layers.{layer}.acts", layer, "act", str(act), "", "fisher", score,
                         bits=float(act.bits), tokens=tokens, seconds=seconds)
            )  # fmt: skip
    return rows
