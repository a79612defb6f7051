"""The Fisher scorer's hooks: per linear, its input ``X`` (forward hook) meets the gradient at its output
``g`` (backward hook) and becomes ``[options, tokens]`` dot products; see :mod:`bitplan.sensitivity._fisher`
for what is estimated and why.

Hooks are installed per decoder layer on whichever module runs it (the caller's layer, or a copy in the
compute dtype), and a layer's cached ``Q(W) - W`` are dropped with :meth:`_Scorer.release` once the layer
is done, so at most one layer's weight deltas exist at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from bitplan.formats import ActFormat, WeightFormat
from bitplan.graph import LinearInfo, ModelGraph, Unit
from bitplan.quantizers import fake_quantize_act, get_weight_quantizer
from bitplan.quantizers._base import WeightQuantizer, decode_groups, encode_groups, group_view
from bitplan.quantizers._rtn import RTN
from bitplan.sensitivity._calibrated import CalibratedWeights
from bitplan.sensitivity._candidates import Candidates, WeightOption

_Grads = tuple[Tensor | None, ...]


@dataclass
class _Linear:
    """A member linear of the working model and what its hooks need."""

    info: LinearInfo
    unit: int  # index into the unit list
    layer: int
    options: list[WeightOption]
    g_side: bool  # options evaluated as (g @ dW) . x instead of (X @ dW^T) . g
    module: nn.Module | None = None  # the module that runs it while its hooks are installed
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

    def __init__(self, source: nn.Module, graph: ModelGraph, units: Sequence[Unit], candidates: Candidates,
                 kinds: Sequence[str], form: str, dtype: torch.dtype,
                 calibrated: CalibratedWeights | None = None) -> None:  # fmt: skip
        self.source, self.form, self.dtype = source, form, dtype
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
                lin = _Linear(info, k, int(unit.layer or 0), self.opts[k], g_side)
                lin.v_of, lin.o_of = v_of.get(info.path), o_of.get(info.path)
                self.linears[info.path] = lin
        self.attn_paths = [a for a, (v, _) in pairs.items() if self.linears[v].options]
        self.v_path = {a: v for a, (v, _) in pairs.items()}
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

    def install(self, module: Callable[[str], nn.Module], layer: int | None = None) -> list[Any]:
        """Hooks on the linears (and attention modules) of ``layer`` (all when None); ``module(path)`` is the
        module that runs the model's ``path`` (the layer itself or its copy in the compute dtype)."""
        handles = []
        for lin in self.linears.values():
            if layer is None or lin.layer == layer:
                lin.module = module(lin.info.path)
                handles.append(lin.module.register_forward_hook(self._forward_hook(lin)))
                handles.append(lin.module.register_full_backward_hook(self._backward_hook(lin)))
        for path in self.attn_paths:
            if layer is None or self.linears[self.v_path[path]].layer == layer:
                handles.append(module(path).register_forward_hook(self._attn_hook(path)))
        return handles

    def release(self, layer: int) -> None:
        """Drop ``layer``'s cached weight deltas and module references (its scoring is done)."""
        for lin in self.linears.values():
            if lin.layer == layer:
                lin.deltas = lin.module = None

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
            w = _weight_out_in(cast(nn.Module, lin.module), lin.info)
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
