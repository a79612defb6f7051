"""Per-input-channel scale migration (AWQ's scale search, SmoothQuant), folded into the op before.

Why a scale per input channel: a linear's output error from quantizing ``W`` is ``||X (Q - W)^T||``, so
input channels that are loud in ``X`` matter most. Multiplying column ``j`` of ``W`` by ``s_j`` and dividing
input ``j`` by ``s_j`` leaves the float function unchanged but changes what is quantized:

* AWQ (Lin et al. 2023) grows the weight columns of loud channels (``s = mean|x|^a``, normalised), which
  shrinks their relative rounding error; ``a`` is searched on a grid of 20 by the layer's output error on the
  calibration inputs, ``tr(D H D^T)`` with ``D = Q(W diag(s)) diag(s)^-1 - W`` and ``H = X^T X / n`` (all
  units reading the input at once, each in its own format).
* SmoothQuant (Xiao et al. 2022) divides activation outliers away for W8A8 units:
  ``s_j = max|x_j|^a / max|W_j|^(1-a)`` with migration strength ``a`` (0.5 by default), so the per-token int8
  activation grid is not stretched by a few outlier channels.

The division must be free at run time, so it is folded into the op that produces the input, where the
architecture allows (:func:`input_groups`): a norm's weight (and bias) for the attention and MLP inputs, the
rows of ``up_proj`` for ``down_proj`` (its input is ``act(gate) * up``, linear in ``up``), the rows of
``v_proj`` for ``o_proj`` when every query head has its own value head. Where no op can take it (``o_proj``
under grouped-query attention, where one value row feeds several heads' columns; norms with a ``1 + w``
weight, like Gemma's), the input keeps scale 1: AWQ units still get the activation-aware clipping, SmoothQuant
units plain rounding. Every unit reading the scaled input -- whatever its own method, quantized or not -- has
its columns multiplied, so the float model is unchanged up to rounding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from bitplan.errors import BitplanError
from bitplan.formats import WeightFormat
from bitplan.graph import _QKV_LEAVES, ModelGraph

__all__ = ["InputGroup", "InputStats", "awq_scales", "fold", "input_groups", "migrate_layer", "smooth_scales"]

_log = logging.getLogger("bitplan")
_MLP_IN = frozenset("gate_proj up_proj gate_up_proj w1 w3 fc1 dense_h_to_4h c_fc".split())
_NORM_FEEDS = (("input_layernorm", _QKV_LEAVES), ("post_attention_layernorm", _MLP_IN))
_ROW_FEEDS = (("up_proj", "down_proj"), ("v_proj", "o_proj"))


@dataclass
class InputStats:
    """Calibration statistics of one linear's input: ``X^T X / n`` (float64), mean and max of ``|x|``."""

    h: torch.Tensor
    abs_mean: torch.Tensor
    abs_max: torch.Tensor


@dataclass(frozen=True)
class InputGroup:
    """Linears that read one input, and the op whose output it is (``producer``; ``None``: cannot fold)."""

    consumers: tuple[str, ...]  # full module paths
    producer: str | None
    producer_kind: Literal["norm", "linear", "none"]
    why_not: str = ""


def _foldable_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 1 and "Gemma" not in name and (
        name.endswith("RMSNorm") or isinstance(module, nn.LayerNorm)
    )


def input_groups(model: nn.Module, graph: ModelGraph, index: int) -> list[InputGroup]:
    """The input groups of decoder layer ``index`` whose consumers are known (one group per shared input)."""
    layer = graph.layers[index]
    leaf = {lin.local: lin.local.rpartition(".")[2] for lin in layer.linears}
    groups: list[InputGroup] = []
    for norm_name, feeds in _NORM_FEEDS:
        consumers = tuple(f"{layer.path}.{lin.local}" for lin in layer.linears if leaf[lin.local] in feeds)
        if not consumers:
            continue
        try:
            norm = model.get_submodule(f"{layer.path}.{norm_name}")
        except AttributeError:
            groups.append(InputGroup(consumers, None, "none", f"no {norm_name} module"))
            continue
        if _foldable_norm(norm):
            groups.append(InputGroup(consumers, f"{layer.path}.{norm_name}", "norm"))
        else:
            groups.append(InputGroup(consumers, None, "none", f"{type(norm).__name__} cannot take a scale"))
    by_leaf = {leaf[lin.local]: lin for lin in layer.linears}
    for src, dst in _ROW_FEEDS:
        if dst not in by_leaf:
            continue
        consumer = (f"{layer.path}.{by_leaf[dst].local}",)
        p = by_leaf.get(src)
        if p is None:
            groups.append(InputGroup(consumer, None, "none", f"no separate {src}"))
        elif p.out_features != by_leaf[dst].in_features or p.transposed:
            groups.append(InputGroup(consumer, None, "none", f"{src} rows do not map one-to-one onto {dst}'s inputs"))
        else:
            groups.append(InputGroup(consumer, f"{layer.path}.{p.local}", "linear"))
    return groups


def _weight_of(module: nn.Module) -> torch.Tensor:
    w = module.weight
    assert isinstance(w, torch.Tensor)
    return w


def fold(model: nn.Module, group: InputGroup, s: torch.Tensor) -> None:
    """Divide the producer's output channels by ``s`` and multiply every consumer's columns by it."""
    if group.producer is None:
        raise BitplanError(f"{group.consumers[0]}: its input cannot take a scale ({group.why_not})")
    prod = model.get_submodule(group.producer)
    with torch.no_grad():
        w = _weight_of(prod)
        w.div_(s.to(w.dtype) if group.producer_kind == "norm" else s.to(w.dtype).unsqueeze(1))
        bias = getattr(prod, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.div_(s.to(bias.dtype))
        for path in group.consumers:
            cw = _weight_of(model.get_submodule(path))
            cw.mul_(s.to(cw.dtype).unsqueeze(0))


def awq_scales(
    weights: list[torch.Tensor], fmts: list[WeightFormat], stats: InputStats, grid: int = 20
) -> tuple[torch.Tensor, float]:
    """AWQ's scale ``s [in]`` (and its exponent) minimising the summed output error of ``weights`` ``[out, in]``.

    ``a = 0`` (no scaling) is on the grid, so the result is never worse than leaving the input alone, as
    measured by the same error. The search rounds with ``rtn`` in each unit's compute format (its fp16-scale
    twin), as AWQ does."""
    from bitplan.quantizers import get_weight_quantizer

    rtn = get_weight_quantizer("rtn")
    h = stats.h.float()
    mag = stats.abs_mean.float().clamp(min=1e-6)
    ws = [w.detach().float() for w in weights]
    best: tuple[float, torch.Tensor, float] | None = None
    for k in range(grid):
        a = k / grid
        s = mag.pow(a)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, fmt in zip(ws, fmts, strict=True):
            d = rtn.quantize(w * s, fmt.compute_format).dequantize() / s - w
            err += float(((d @ h) * d).sum())
        if best is None or err < best[0]:
            best = (err, s, a)
    assert best is not None
    return best[1], best[2]


def smooth_scales(weights: list[torch.Tensor], stats: InputStats, alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s_j = max|x_j|^a / max|W_j|^(1-a)`` over every unit reading the input."""
    wmax = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0).clamp(min=1e-5)
    s = stats.abs_max.float().clamp(min=1e-5).pow(alpha) / wmax.pow(1 - alpha)
    return s.clamp(min=1e-5)


MIGRATING = frozenset({"awq", "smoothquant"})


def migration_scale(method: str, weights: list[torch.Tensor], fmts: list[WeightFormat], stats: InputStats) -> torch.Tensor:
    """The input scale ``method`` (``awq`` or ``smoothquant``) migrates for units with ``weights`` ``[out, in]``:
    AWQ's searched one (over ``weights`` in their ``fmts``), SmoothQuant's from its quantizer's ``alpha``."""
    from bitplan.quantizers import get_weight_quantizer

    if method == "awq":
        return awq_scales(weights, fmts, stats)[0]
    alpha = float(getattr(get_weight_quantizer("smoothquant"), "alpha", 0.5))
    return smooth_scales(weights, stats, alpha)


def migrate_layer(
    model: nn.Module,
    graph: ModelGraph,
    index: int,
    choices: dict[str, tuple[str, WeightFormat]],
    stats: dict[str, InputStats],
) -> dict[str, int]:
    """Search and fold the scales of layer ``index``'s inputs read by ``awq`` / ``smoothquant`` units.

    ``choices``: full linear path -> (method, format) of the layer's quantized linears. The consumers' input
    statistics in ``stats`` are rescaled to the folded inputs (``H / (s s^T)``), so methods that quantize
    from them afterwards (GPTQ, AWQ's clipping) see the inputs the folded model really computes.
    Returns ``{"folded": n, "unfolded": m}`` (input groups)."""
    counts = {"folded": 0, "unfolded": 0}
    for g in input_groups(model, graph, index):
        methods = {choices[c][0] for c in g.consumers if c in choices} & MIGRATING
        if not methods:
            continue
        if len(methods) > 1:
            raise BitplanError(f"{g.consumers[0]}: awq and smoothquant units read the same input; give them one method")
        st = next((stats[c] for c in g.consumers if c in stats), None)
        if st is None:
            raise BitplanError(f"{g.consumers[0]}: no calibration statistics for its input")
        if g.producer is None:
            _log.info("%s: %s scale left at 1 (%s)", g.consumers[0], next(iter(methods)), g.why_not)
            counts["unfolded"] += 1
            continue
        weight = {c: _weight_of(model.get_submodule(c)) for c in g.consumers}
        method = next(iter(methods))  # AWQ searches over its own units, SmoothQuant over every reader
        members = [c for c in g.consumers if c in choices and choices[c][0] == "awq"] if method == "awq" else list(weight)
        fmts = [choices[c][1] for c in members if c in choices]  # AWQ's members all are; SmoothQuant ignores them
        s = migration_scale(method, [weight[c] for c in members], fmts, st)
        fold(model, g, s)
        inv = torch.outer(s, s).double()
        for c in g.consumers:
            if c in stats:
                stats[c] = InputStats(stats[c].h / inv, stats[c].abs_mean / s.double(), stats[c].abs_max / s.double())
        counts["folded"] += 1
    return counts
