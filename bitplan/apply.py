"""Apply a plan to a model: quantize every decision unit, its input activations and the KV cache.

Weights are really packed (codes + scales + offsets, see ``bitplan.quantizers``) and run through a
module that dequantizes then multiplies; the kernels issue adds faster kernels behind the same module.
The swap happens one linear at a time, so the extra memory is one unit's float copy, never the model's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from bitplan.errors import BitplanError
from bitplan.formats import ActFormat
from bitplan.graph import build_graph
from bitplan.plan import Plan

__all__ = ["apply_plan", "held_weight_bytes"]


def apply_plan(model: nn.Module, plan: Plan, *, progress: bool = False, calib: Any = None) -> nn.Module:
    """Quantize ``model`` in place as ``plan`` says and return it.

    ``calib`` is reserved for calibrated methods (GPTQ, AWQ); calibration-free methods ignore it and a
    method that needs it fails clearly when it is missing.
    """
    from bitplan.kvcache import install_kv_plan
    from bitplan.quantizers import QuantLinear, get_weight_quantizer

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
    for name, choice in tqdm(work, desc="apply", unit="unit", disable=not progress):
        unit = units[name]
        act = acts[unit.layer] if unit.layer is not None else ActFormat()  # lm_head: 16-bit input
        if not choice.format.is_quantized and not act.is_quantized:
            continue  # stays the model's own 16-bit linear
        quantizer = get_weight_quantizer(choice.method)
        if quantizer.needs_calibration and calib is None:
            raise BitplanError(f"{name}: method {choice.method!r} needs calibration data; pass calib")
        for member in unit.members:
            module = model.get_submodule(member.path)
            with torch.no_grad():
                qmod = QuantLinear.from_float(module, choice.format, act, method=choice.method)
            model.set_submodule(member.path, qmod)
    if "lm_head" in plan.extra and graph.tied_embeddings:
        model.config.tie_word_embeddings = False  # type: ignore[union-attr]  # the head now has its own packed weight
    if any(kv.is_quantized for kv in plan.kv_formats()):
        install_kv_plan(model, plan.kv_formats())
    model.bitplan_plan = plan  # type: ignore[assignment]
    return model


def held_weight_bytes(model: nn.Module, float_bytes: int | None = None) -> int:
    """Bytes of every parameter and buffer the model holds (shared tensors counted once).

    With ``float_bytes`` (e.g. 2), floating-point tensors that are not packed quantization data are
    counted at that width instead of their in-memory one -- the model's size as stored in 16 bits even
    when it runs in fp32 on a CPU.
    """
    from bitplan.quantizers import QuantLinear

    packed: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            packed.update(id(t) for n, t in mod.named_buffers(recurse=False) if n in ("codes", "scales", "offsets"))
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
