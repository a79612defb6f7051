"""Apply a plan to a model: quantize every decision unit, its input activations and the KV cache.

Weights are really packed (codes + scales + offsets, see ``bitplan.quantizers``), then re-laid for the
kernel chosen per unit (``bitplan.kernels``): ``kernels="auto"`` takes the fastest kernel on the model's
device that holds the plan's bytes. Quality measurements (sensitivity, verification) pass
``kernels="reference"``: they score the *format* in the model's own precision, free of the bf16 rounding a
fast CPU kernel adds. The swap happens one linear at a time, so the extra memory is one unit's float copy,
never the model's.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from bitplan.errors import BitplanError
from bitplan.formats import ActFormat
from bitplan.graph import build_graph
from bitplan.plan import Plan

if TYPE_CHECKING:
    from bitplan._smooth import InputStats
    from bitplan.kernels._base import LatencyFn

__all__ = ["apply_plan", "calibrated_units", "held_weight_bytes", "kernel_counts"]


def apply_plan(
    model: nn.Module,
    plan: Plan,
    *,
    kernels: str = "auto",
    latency: LatencyFn | None = None,
    progress: bool = False,
    calib: Any = None,
) -> nn.Module:
    """Quantize ``model`` in place as ``plan`` says and return it.

    ``kernels``: ``auto`` (fastest kernel holding the plan's bytes), ``fastest``, ``reference``, or one
    kernel's name (see :func:`bitplan.kernels.choose_kernel`); ``latency`` ranks kernels by measurement.
    Each ``QuantLinear`` records its kernel in ``.kernel``; :func:`kernel_counts` sums them up.
    ``calib``: calibration token windows (``CalibData`` or ``[n, window]`` ids) for calibrated methods
    (GPTQ, AWQ, SmoothQuant): when any unit uses one, the whole model is quantized layer by layer in one streaming pass
    (:mod:`bitplan._layerwise`), each layer calibrated on the outputs of the already-quantized layers
    before it; calibration-free methods ignore it.
    """
    from bitplan.kernels import choose_kernel
    from bitplan.kvcache import install_kv_plan
    from bitplan.quantizers import QuantLinear

    if getattr(model, "bitplan_plan", None) is not None:
        raise BitplanError("this model already has a plan applied; load a fresh copy to apply another")
    graph = build_graph(model)
    plan = plan.validate(graph)
    units = {u.name: u for u in graph.units(plan.granularity)}
    head = graph.head_unit()
    if head is not None:
        units[head.name] = head
    acts = plan.act_formats()
    work = list(plan.unit_choices())
    # a quantized head tied to the embedding quantizes the embedding too (checked before anything changes)
    tied_head = plan.extra.get("lm_head") if graph.tied_embeddings else None
    tied_head = tied_head if tied_head is not None and tied_head.format.is_quantized else None
    embed_path = graph.embed_path or ""
    embedding = model.get_submodule(embed_path) if tied_head is not None and embed_path else None
    if tied_head is not None and not isinstance(embedding, nn.Embedding):
        raise BitplanError(f"the head is tied to {embed_path or 'an embedding'!s}, which is not an nn.Embedding; cannot quantize it")
    def replace(name: str, choice: Any, hessians: dict[str, torch.Tensor] | None = None) -> None:
        unit = units[name]
        act = acts[unit.layer] if unit.layer is not None else ActFormat()  # lm_head: 16-bit input
        if not choice.format.is_quantized and not act.is_quantized:
            return  # stays the model's own 16-bit linear
        for member in unit.members:
            module = model.get_submodule(member.path)
            with torch.no_grad():
                h = (hessians or {}).get(member.path)
                qmod = QuantLinear.from_float(module, choice.format, act, method=choice.method, hessian=h)
                device = next(iter(qmod.buffers())).device
                qmod.set_kernel(choose_kernel(qmod.spec, device, kernels, latency))
            model.set_submodule(member.path, qmod)

    calibrated = calibrated_units(plan)
    if "lm_head" in calibrated:
        raise BitplanError("lm_head: calibrated methods are not supported for the head yet; use rtn or hqq there")
    if calibrated:
        if calib is None:
            first = min(calibrated)
            raise BitplanError(f"{first}: method {calibrated[first]!r} needs calibration data; pass calib")
        from bitplan._layerwise import quantize_layerwise

        by_layer: dict[int, list[tuple[str, Any]]] = {}
        for name, choice in work:
            if units[name].layer is not None:
                by_layer.setdefault(int(units[name].layer or 0), []).append((name, choice))

        def paths(i: int) -> list[str]:
            return [m.path for n, _ in by_layer.get(i, []) if n in calibrated for m in units[n].members]

        from bitplan._smooth import migrate_layer

        def quantize_layer(i: int, stats: dict[str, InputStats]) -> None:
            quantized = {m.path: (c.method, c.format) for n, c in by_layer.get(i, []) if c.format.is_quantized
                         for m in units[n].members}  # fmt: skip
            migrate_layer(model, graph, i, quantized, stats)
            hessians = {p: st.h for p, st in stats.items()}
            for n, c in by_layer.get(i, []):
                replace(n, c, hessians)

        quantize_layerwise(model, graph, calib, quantize_layer, paths, progress=progress)
        work = [(n, c) for n, c in work if units[n].layer is None]  # the head: after the layers
    for name, choice in tqdm(work, desc="apply", unit="unit", disable=not progress):
        replace(name, choice)
    if tied_head is not None and isinstance(embedding, nn.Embedding):
        # The head now has its own packed weight; the embedding gets the same format as gatherable rows.
        from bitplan.quantizers import QuantEmbedding

        model.config.tie_word_embeddings = False  # type: ignore[union-attr]
        with torch.no_grad():
            q_emb = QuantEmbedding.from_float(embedding, tied_head.format, tied_head.method)
        model.set_submodule(embed_path, q_emb)
    if any(kv.is_quantized for kv in plan.kv_formats()):
        install_kv_plan(model, plan.kv_formats())
    model.bitplan_plan = plan  # type: ignore[assignment]
    return model


def calibrated_units(plan: Plan) -> dict[str, str]:
    """``{unit: method}`` of the plan's quantized units whose method needs calibration data (gptq, awq, smoothquant)."""
    from bitplan.errors import PlanError
    from bitplan.quantizers import WEIGHT_QUANTIZERS, get_weight_quantizer

    for name, c in plan.unit_choices():
        if c.method not in WEIGHT_QUANTIZERS:
            raise PlanError(f"{name}: unknown method {c.method!r}; registered: {', '.join(WEIGHT_QUANTIZERS.names())}")
    return {n: c.method for n, c in plan.unit_choices()
            if c.format.is_quantized and get_weight_quantizer(c.method).needs_calibration}  # fmt: skip


def kernel_counts(model: nn.Module) -> dict[str, int]:
    """How many packed linears run each kernel, e.g. ``{"int4pack": 210, "reference": 1}``."""
    from bitplan.quantizers import QuantLinear

    return dict(Counter(m.kernel for m in model.modules() if isinstance(m, QuantLinear)))


def held_weight_bytes(model: nn.Module, float_bytes: int | None = None) -> int:
    """Bytes of every parameter and buffer the model holds (shared tensors counted once).

    With ``float_bytes`` (e.g. 2), floating-point tensors that are not packed quantization data are
    counted at that width instead of their in-memory one -- the model's size as stored in 16 bits even
    when it runs in fp32 on a CPU.
    """
    from bitplan.quantizers import QuantLinear
    from bitplan.quantizers._modules import is_packed_buffer

    packed: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            packed.update(id(t) for n, t in mod.named_buffers(recurse=False) if is_packed_buffer(n))
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.numel())
        if key in seen or t.numel() == 0:
            continue
        seen.add(key)
        if float_bytes is not None and t.is_floating_point() and id(t) not in packed:
            total += t.numel() * float_bytes
        else:
            total += t.numel() * t.element_size()
    return total
