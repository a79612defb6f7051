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
cached in ``dtype`` for all batches (SmolLM2-135M x 6 options: 1.3 GB, where quantizing again would add
~4 s to every ~15 s batch). Fused members share ``X``; their dots add per token before squaring
(``g . dY`` of the fused output).

Activations need no GEMM: ``g . (dX W^T) = (g W) . dX``, and ``g W`` is the gradient at the linear's input,
which autograd computes anyway (a full backward hook hands it over per linear). With ``dX = Q_a(X) - X``
the dots of all the layer's linears add per token before squaring: quantizing every input of the layer
(``layers.{i}.acts``); ``a4t`` is a big perturbation where second order only ranks. KV caches are not
scored here (the measured path scores ``kind="kv"``).

Memory stays bounded: a linear's ``X`` lives from its forward to its backward hook, gradients are used
inside the hooks, and only ``[options, tokens]`` fp32 dots survive to the end of a batch. The caller's
model is not modified: one already in ``dtype`` is used in place (parameters frozen, hooks removed;
flags, mode and attention implementation restored), any other is run as a ``dtype`` copy.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bitplan.formats import ActFormat, WeightFormat
from bitplan.graph import Granularity, LinearInfo, ModelGraph, Unit, build_graph
from bitplan.loading import _param_device, compute_dtype_for
from bitplan.quantizers import fake_quantize_act, get_weight_quantizer
from bitplan.quantizers._base import WeightQuantizer, decode_groups, encode_groups, group_view
from bitplan.quantizers._rtn import RTN
from bitplan.sensitivity._calib import CalibData
from bitplan.sensitivity._calibrated import CalibratedWeights, precompute
from bitplan.sensitivity._candidates import Candidates, WeightOption
from bitplan.sensitivity._rows import ScoreRow

__all__ = ["FisherForm", "fisher_scores"]

FisherForm = Literal["token", "diag"]
_KINDS = ("weight", "act")
_Grads = tuple[Tensor | None, ...]


@dataclass
class _Linear:
    """A member linear of the working model and what its hooks need."""

    info: LinearInfo
    unit: int  # index into the unit list
    layer: int
    module: nn.Module  # the working model's module
    options: list[WeightOption]
    g_side: bool  # options evaluated as (g @ dW) . x instead of (X @ dW^T) . g
    v_of: str | None = None  # attention path: this is its v_proj, scored at the attention output
    o_of: str | None = None  # attention path: this is its o_proj (hands over the attention-output gradient)
    deltas: Tensor | None = None  # stacked Q(W) - W of all options, cached across batches
    x: Tensor | None = None  # this batch's input [T, in], from forward hook to backward hook
    key: tuple[int, ...] = ()  # identifies an input shared with sibling linears (q/k/v, gate/up)


def _fake_quantize(quantizer: WeightQuantizer, w: Tensor, fmt: WeightFormat) -> Tensor:
    """``Q(W)`` in fp32. For the RTN family (``quantize`` encodes against ``params(w)``) the lossless pack /
    unpack round trip is skipped: ~60% of the quantization time, same values."""
    if isinstance(quantizer, RTN) and type(quantizer).quantize is RTN.quantize:
        w = quantizer._prepare(w, fmt)
        scales, offsets = quantizer.params(w, fmt)
        codes = encode_groups(group_view(w, fmt), fmt, scales, offsets)
        return decode_groups(codes, fmt, scales, offsets).reshape(w.shape)
    return quantizer.quantize(w, fmt).dequantize(torch.float32)


def _weight_out_in(module: nn.Module, info: LinearInfo) -> Tensor:
    w = cast(Tensor, module.weight).detach()
    return w.t() if info.transposed else w


def _set_attn(model: nn.Module, impl: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    with suppress(Exception):  # if it fails there are no attention weights: v_proj keeps the per-token form
        if callable(setter):
            setter(impl)


@contextmanager
def _working_model(model: nn.Module, dtype: torch.dtype, eager: bool) -> Iterator[nn.Module]:
    """``model`` itself (frozen, eval; restored afterwards) when it is already in ``dtype``, else a copy."""
    params = list(model.parameters())
    if any(p.dtype != dtype for p in params if p.is_floating_point()):
        work = copy.deepcopy(model).to(dtype).eval().requires_grad_(False)
        if eager:
            _set_attn(work, "eager")
        yield work
        return
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


def _v_pairs(graph: ModelGraph) -> dict[str, tuple[str, str]]:
    """Attention path -> (v_proj path, o_proj path) for layers with separate ``v_proj`` and ``o_proj``."""
    out = {}
    for layer in graph.layers:
        paths = {lin.path for lin in layer.linears}
        v, o = f"{layer.attention}.v_proj", f"{layer.attention}.o_proj"
        if v in paths and o in paths:
            out[layer.attention] = (v, o)
    return out


def _v_dots(dv: Tensor, attn: Tensor, g_out: Tensor, n: int) -> Tensor:
    """Per target token ``sum_h g_O[s,h] . (A_h dV_h)[s]`` -> ``[n, B*L]``.

    ``dv [B*L, n*Hkv*D]`` (option-major), ``attn [B, H, L, L]``, ``g_out [B*L, H*D]``; query head ``h``
    reads kv head ``h // (H / Hkv)`` (``repeat_kv``), so each kv head's query rows are stacked into one GEMM.
    """
    b, h, length, _ = attn.shape
    d = g_out.shape[-1] // h
    hkv = dv.shape[-1] // (n * d)
    grp = h // hkv
    dv = dv.view(b, length, n, hkv, d).permute(0, 3, 1, 2, 4).reshape(b, hkv, length, n * d)
    do = (attn.reshape(b, hkv, grp * length, length) @ dv).view(b, hkv, grp, length, n, d)
    g = g_out.view(b, length, hkv, grp, d).permute(0, 2, 3, 1, 4).unsqueeze(-1)  # [b, hkv, grp, L, D, 1]
    dots = (do @ g).squeeze(-1).float().sum((1, 2))  # [b, L, n]
    return dots.permute(2, 0, 1).reshape(n, b * length)


class _Scorer:
    """Forward / backward hooks that turn each batch's (X, g) into score contributions."""

    def __init__(self, source: nn.Module, work: nn.Module, graph: ModelGraph, units: Sequence[Unit],
                 candidates: Candidates, kinds: Sequence[str], form: FisherForm, dtype: torch.dtype,
                 calibrated: CalibratedWeights | None = None) -> None:  # fmt: skip
        self.source, self.work, self.form, self.dtype = source, work, form, dtype
        self.units, self.calibrated = units, calibrated or CalibratedWeights()
        self.acts: tuple[ActFormat, ...] = candidates.acts if "act" in kinds else ()
        weights = "weight" in kinds
        self.opts = [candidates.weight_options(u.in_features) if weights else [] for u in units]
        self.quantizers = {o.method: get_weight_quantizer(o.method) for opts in self.opts for o in opts}
        pairs = _v_pairs(graph) if form == "token" else {}
        v_of = {v: a for a, (v, _) in pairs.items()}
        o_of = {o: a for a, (_, o) in pairs.items()}
        self.linears: dict[str, _Linear] = {}
        for k, unit in enumerate(units):
            for info in unit.members:
                g_side = form == "token" and info.out_features > info.in_features and info.path not in v_of
                module = work.get_submodule(info.path)
                lin = _Linear(info, k, int(unit.layer or 0), module, self.opts[k], g_side)
                lin.v_of, lin.o_of = v_of.get(info.path), o_of.get(info.path)
                self.linears[info.path] = lin
        self.attn_paths = [a for a, (v, _) in pairs.items() if self.linears[v].options]
        n_layers = 1 + max((int(u.layer or 0) for u in units), default=-1)
        # float64 score sums and own compute seconds per unit x option / layer x act format
        self.weight = [torch.zeros(len(o), dtype=torch.float64) for o in self.opts]
        self.sec_w = [torch.zeros(len(o), dtype=torch.float64) for o in self.opts]
        self.act = torch.zeros(n_layers, len(self.acts), dtype=torch.float64)
        self.sec_a = torch.zeros_like(self.act)
        self.batch_w: dict[int, Tensor] = {}  # "token": per unit, this batch's [n_options, T] fp32 dots
        self.batch_a: dict[int, Tensor] = {}  # "token": per layer, this batch's [n_acts, T] fp32 dots
        # act deltas of an input (shared by q/k/v, gate/up) and how many of its readers still need them
        self.dx: dict[tuple[int, ...], Tensor] = {}  # [T, n_acts, in] fp32
        self.users: dict[tuple[int, ...], int] = {}
        self.attn_w: dict[str, Tensor] = {}  # attention probabilities [B, H, L, L] of this batch
        self.attn_g: dict[str, Tensor] = {}  # gradient at o_proj's input [T, H*D] of this batch

    def install(self) -> list[Any]:
        handles = []
        for lin in self.linears.values():
            handles.append(lin.module.register_forward_hook(self._forward_hook(lin)))
            handles.append(lin.module.register_full_backward_hook(self._backward_hook(lin)))
        for path in self.attn_paths:
            handles.append(self.work.get_submodule(path).register_forward_hook(self._attn_hook(path)))
        return handles

    def _attn_hook(self, path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            w = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if isinstance(w, Tensor) and w.dim() == 4:
                self.attn_w[path] = w.detach()

        return hook

    def _forward_hook(self, lin: _Linear) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            lin.x = args[0].detach().reshape(-1, lin.info.in_features)
            lin.key = (lin.x.data_ptr(), *lin.x.shape)
            self.users[lin.key] = self.users.get(lin.key, 0) + 1

        return hook

    def _backward_hook(self, lin: _Linear) -> Callable[..., None]:
        def hook(module: nn.Module, grad_input: _Grads, grad_output: _Grads) -> None:
            x, lin.x = lin.x, None
            gy, gx = grad_output[0], grad_input[0]
            if x is None or gy is None:
                return
            g = gy.reshape(-1, lin.info.out_features).to(self.dtype)
            if lin.o_of is not None and gx is not None:
                self.attn_g[lin.o_of] = gx.detach().reshape(x.shape)
            if lin.options:
                t0 = time.perf_counter()
                self._score_weight(lin, x, g)
                self.sec_w[lin.unit] += (time.perf_counter() - t0) / len(lin.options)
            if self.acts and gx is not None:
                t0 = time.perf_counter()
                self._score_acts(lin, x, g, gx.reshape(x.shape))
                self.sec_a[lin.layer] += (time.perf_counter() - t0) / len(self.acts)

        return hook

    def _deltas(self, lin: _Linear) -> Tensor:
        """``Q(W) - W`` of every option, stacked: ``[out, n*in]`` (g side) or ``[in, n*out]`` (X side)."""
        if lin.deltas is None:
            w = _weight_out_in(self.source.get_submodule(lin.info.path), lin.info).float()
            parts = []
            unit = self.units[lin.unit]
            member = [m.path for m in unit.members].index(lin.info.path)
            for k, opt in enumerate(lin.options):
                t0 = time.perf_counter()
                if (unit.name, opt) in self.calibrated:  # the method's real weights, quantized once
                    q = self.calibrated.dequantized(unit.name, opt)[member]
                else:
                    q = _fake_quantize(self.quantizers[opt.method], w, opt.format)
                parts.append((q - w).to(self.dtype))
                self.sec_w[lin.unit][k] += time.perf_counter() - t0
            lin.deltas = torch.cat(parts if lin.g_side else [p.t() for p in parts], dim=1).contiguous()
        return lin.deltas

    def _score_weight(self, lin: _Linear, x: Tensor, g: Tensor) -> None:
        d, n, t = self._deltas(lin), len(lin.options), x.shape[0]
        if self.form == "diag":
            dy = (x @ d).view(t, n, -1)
            part = torch.bmm(dy.square(), g.square().unsqueeze(-1)).float().sum((0, 2))
            self.weight[lin.unit] += 0.5 * part.double().cpu()
            return
        attn, g_out = self.attn_w.pop(lin.v_of, None), self.attn_g.pop(lin.v_of, None)  # type: ignore[arg-type]
        if lin.g_side:
            dots = torch.bmm((g @ d).view(t, n, -1), x.unsqueeze(-1)).squeeze(-1).t().float()
        elif attn is not None and g_out is not None and attn.shape[0] * attn.shape[2] == t:
            dots = _v_dots(x @ d, attn, g_out.to(self.dtype), n)
        else:
            dots = torch.bmm((x @ d).view(t, n, -1), g.unsqueeze(-1)).squeeze(-1).t().float()
        acc = self.batch_w.get(lin.unit)
        self.batch_w[lin.unit] = dots if acc is None else acc.add_(dots)

    def _score_acts(self, lin: _Linear, x: Tensor, g: Tensor, gx: Tensor) -> None:
        if lin.key not in self.dx:  # q/k/v (gate/up) share one input: quantize it once
            xf = x.float()
            self.dx[lin.key] = torch.stack([fake_quantize_act(xf, a) - xf for a in self.acts], dim=1)
        self.users[lin.key] -= 1
        dx = self.dx[lin.key] if self.users[lin.key] > 0 else self.dx.pop(lin.key)
        if self.form == "diag":
            w = _weight_out_in(lin.module, lin.info)
            sq = g.float().square()
            part = [(nn.functional.linear(d.to(self.dtype), w).float().square() * sq).sum() for d in dx.unbind(1)]
            self.act[lin.layer] += 0.5 * torch.stack(part).double().cpu()
            return
        dots = torch.bmm(dx, gx.float().unsqueeze(-1)).squeeze(-1).t()  # [n_acts, T]
        acc = self.batch_a.get(lin.layer)
        self.batch_a[lin.layer] = dots if acc is None else acc.add_(dots)

    def end_batch(self) -> None:
        """Square the batch's per-token dot products ("token" form) into the totals; drop batch state."""
        for unit, dots in self.batch_w.items():
            self.weight[unit] += 0.5 * dots.square().sum(-1).double().cpu()
        for layer, dots in self.batch_a.items():
            self.act[layer] += 0.5 * dots.square().sum(-1).double().cpu()
        for d in (self.batch_w, self.batch_a, self.dx, self.users, self.attn_w, self.attn_g):
            d.clear()
        for lin in self.linears.values():
            lin.x = None


def _sampled_logit_grad(logits: Tensor, gen: torch.Generator) -> Tensor:
    """``p - onehot(y)``, ``y ~ p = softmax(logits)``, at every position but the last (zero there)."""
    b, length, vocab = logits.shape
    grad = torch.zeros(b, length, vocab, dtype=logits.dtype, device=logits.device)
    for i in range(b):  # one window at a time bounds the fp32 temporaries
        p = logits[i, :-1].detach().float().softmax(-1)
        cdf = p.cumsum(-1)
        u = torch.rand(length - 1, 1, generator=gen).to(p.device) * cdf[:, -1:]
        y = torch.searchsorted(cdf, u).clamp_(max=vocab - 1)
        grad[i, :-1] = p.scatter_add_(-1, y, torch.full_like(u, -1.0)).to(logits.dtype)
    return grad


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
) -> list[ScoreRow]:
    """Fisher estimate of the KL of quantizing each unit with each weight option, and each layer's
    activations with each act format, from one forward + backward per calibration batch.

    Rows (``method="fisher"``): weights in unit order x options in candidate order, then acts per layer
    x act format. ``dtype`` is the compute dtype of the model and the GEMMs (scores accumulate in fp32 /
    fp64); ``form`` the quadratic form (module docstring); ``kinds`` a subset of ``("weight", "act")``.
    Calibrated options (``@gptq``, ``@awq``...) are scored on their real weights, from ``calibrated`` or
    quantized here first (:func:`bitplan.sensitivity._calibrated.precompute`).
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
    gen = torch.Generator().manual_seed(seed)
    tokens = calib.num_windows * (calib.window - 1)
    eager = form == "token" and "weight" in kinds and bool(_v_pairs(graph))
    if calibrated is None and "weight" in kinds:
        calibrated = precompute(model, graph, calib, [(u, candidates.weight_options(u.in_features)) for u in units],
                                progress=progress)  # fmt: skip
    with _working_model(model, dtype, eager) as work:
        scorer = _Scorer(model, work, graph, units, candidates, kinds, form, dtype, calibrated)
        handles = scorer.install()
        try:
            embed: nn.Module = work.get_input_embeddings()  # type: ignore[operator]
            device = cast(Tensor, embed.weight).device
            batches = calib.batches(batch_size)
            for ids in tqdm(batches, desc="fisher", unit="batch", disable=not progress, file=sys.stderr):
                with torch.enable_grad():  # parameters are frozen: grads flow through activations only
                    emb = embed(ids.to(device)).detach().requires_grad_(True)
                    logits = work(inputs_embeds=emb, use_cache=False).logits
                    logits.backward(_sampled_logit_grad(logits, gen))
                del logits, emb
                scorer.end_batch()
        finally:
            for h in handles:
                h.remove()
            scorer.end_batch()
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
