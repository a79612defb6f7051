"""GPTQModel ``quantize_config.json`` with per-module ``dynamic`` overrides (also read by vLLM's gptq / gptq_marlin).

The base ``bits`` / ``group_size`` / ``sym`` are the plan's most common scheme (by parameters); every block
that differs gets a ``"+:regex": {bits, group_size, sym}`` override and every 16-bit block a ``"-:regex": {}``
skip. Both consumers test keys in order with ``re.match`` (anchored at the start only, so patterns end in
``$``) and stop at the first match; GPTQModel moves ``-:`` keys to the front, vLLM does not, so bitplan writes
them first. GPTQModel matches checkpoint names (``model.layers.3.self_attn.q_proj``) and vLLM its fused
modules (``...qkv_proj``): every pattern names both, and shards of a fused module must share one scheme.

GPTQ is weight-only integer quantization: activation formats, fp8, NF4 and double-quantized scales are not
expressible (``--approximate`` maps them to the nearest integer scheme, noted), nor is a KV cache. ``target``
enforces one backend's limits: ``marlin`` (4 or 8 bits, symmetric, group -1/32/64/128 -- also vLLM's
gptq_marlin), ``torch`` (2/3/4/8 bits, group -1/16/32/64/128), ``triton`` (2/4/8 bits); the default checks
what the config format allows (2, 3, 4 or 8 bits).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

from bitplan import __version__
from bitplan.export._base import (
    Exporter,
    ExportError,
    ExportOptions,
    ExportResult,
    anchored,
    rebuild,
    register_exporter,
    runtime_units,
)
from bitplan.formats import WeightFormat
from bitplan.plan import Plan, UnitChoice

__all__ = ["TARGETS", "GPTQModelExporter"]

#: backend -> (bits, symmetric only, group sizes or None for any); -1 is per channel.
TARGETS: dict[str, tuple[frozenset[int], bool, frozenset[int] | None]] = {
    "gptqmodel": (frozenset({2, 3, 4, 8}), False, None),
    "marlin": (frozenset({4, 8}), True, frozenset({-1, 32, 64, 128})),
    "torch": (frozenset({2, 3, 4, 8}), False, frozenset({-1, 16, 32, 64, 128})),
    "triton": (frozenset({2, 4, 8}), False, frozenset({-1, 16, 32, 64, 128})),
}

Scheme = tuple[int, int, bool]  # bits, group_size (-1: per channel), sym


def _scheme(fmt: WeightFormat, approximate: bool, where: str, notes: list[str]) -> Scheme | None:
    if not fmt.is_quantized:
        return None
    near = fmt
    if fmt.kind == "fp8":
        near = WeightFormat("int", 8)
    elif fmt.kind == "nf4":
        near = WeightFormat("int", 4, fmt.group_size)
    elif fmt.scale_bits is not None:
        near = fmt.compute_format
    if near != fmt:
        why = {"fp8": "fp8 weights", "nf4": "the NF4 codebook"}.get(fmt.kind, "double-quantized scales")
        if not approximate:
            raise ExportError(f"{where}: GPTQ has no {why} ({fmt}); pass --approximate to export it as {near}")
        notes.append(f"{where}: {fmt} exported as {near} (GPTQ has no {why})")
    return near.bits, near.group_size or -1, near.symmetric


def _check_target(scheme: Scheme, target: str, where: str, fmt: str) -> None:
    bits, sym_only, groups = TARGETS[target]
    b, g, sym = scheme
    if b not in bits or (sym_only and not sym) or (groups is not None and g not in groups):
        allowed = f"{'/'.join(map(str, sorted(bits)))} bits" + (", symmetric" if sym_only else "")
        allowed += f", group {'/'.join(map(str, sorted(groups)))}" if groups is not None else ""
        raise ExportError(f"{where}: {fmt} cannot run in a GPTQ {target} target ({allowed})")


def _as_format(s: Scheme | None) -> WeightFormat:
    if s is None:
        return WeightFormat("float", 16)
    b, g, sym = s
    return WeightFormat("int", b, None if g == -1 else g, sym)


@register_exporter("gptqmodel")
class GPTQModelExporter(Exporter):
    description = "GPTQModel quantize_config.json with per-module dynamic overrides (JSON)"

    def export(self, plan: Plan, options: ExportOptions) -> ExportResult:
        target = options.target or "gptqmodel"
        if target not in TARGETS:
            raise ExportError(f"unknown GPTQ target {target!r}; choose one of {', '.join(TARGETS)}")
        notes: list[str] = []
        acts = sorted({str(a) for a in plan.act_formats() if a.is_quantized})
        if acts:
            if not options.approximate:
                raise ExportError(f"GPTQ is weight-only; the plan quantizes activations ({', '.join(acts)}); pass --approximate to drop them")
            notes.append(f"activation formats {', '.join(acts)} dropped (GPTQ is weight-only)")
        kvs = sorted({str(k) for k in plan.kv_formats() if k.is_quantized})
        if kvs:
            if options.kv:
                raise ExportError(f"GPTQ's config has no KV cache and the plan quantizes it ({', '.join(kvs)}); pass --no-kv and export the KV plan with --to kv")
            notes.append(f"KV cache not exported (--no-kv); the plan's is {', '.join(kvs)}")
        units = runtime_units(plan, scheme=lambda c: str(c.format))
        schemes: list[Scheme | None] = []
        for ru in units:
            s = _scheme(ru.choice.format, options.approximate, ru.label, notes)
            if s is not None and options.target:
                _check_target(s, target, ru.label, str(ru.choice.format))
            elif s is not None and s[0] not in TARGETS["gptqmodel"][0]:
                raise ExportError(f"{ru.label}: GPTQ configs take 2, 3, 4 or 8 bits, not {s[0]} ({ru.choice.format})")
            schemes.append(s)
        weights = Counter[Scheme]()
        for ru, s in zip(units, schemes, strict=True):
            if s is not None:
                weights[s] += ru.in_features * ru.out_features
        if not weights:
            raise ExportError("the plan quantizes no weights; there is nothing for GPTQ to do")
        base = weights.most_common(1)[0][0]
        skips: dict[str, dict[str, Any]] = {}
        overrides: dict[str, dict[str, Any]] = {}
        head_quantized = False
        for ru, s in zip(units, schemes, strict=True):
            pattern = anchored(list(ru.names))
            if ru.layer is None:
                head_quantized = s is not None
            if s is None:
                if ru.layer is not None:
                    skips["-:" + pattern] = {}
            elif s != base:
                overrides["+:" + pattern] = {"bits": s[0], "group_size": s[1], "sym": s[2]}
        config = {
            "bits": base[0],
            "group_size": base[1],
            "desc_act": False,
            "sym": base[2],
            "lm_head": head_quantized,
            "quant_method": "gptq",
            "checkpoint_format": "gptq",
            "pack_dtype": "int32",
            "dynamic": {**skips, **overrides},  # skips first: vLLM takes keys in order
            "meta": {"quantizer": [f"bitplan:{__version__}"], "bitplan": {"model": plan.model.name_or_path,
                     "fingerprint": plan.model.fingerprint, "avg_weight_bits": round(plan.summary().avg_weight_bits, 4)}},
        }  # fmt: skip
        summary = {"base": f"{base[0]}-bit group {base[1]}{'' if base[2] else ' asym'}", "overrides": len(overrides),
                   "skips": len(skips), "target": target}  # fmt: skip
        return ExportResult(self.name, {"": json.dumps(config, indent=2) + "\n"}, tuple(notes), summary)

    def read(self, files: Mapping[str, str], like: Plan) -> Plan:
        config = json.loads(files[""])
        if config.get("quant_method", "gptq") != "gptq":
            raise ExportError(f"not a GPTQ config (quant_method {config.get('quant_method')!r})")
        base: Scheme = (config["bits"], config["group_size"], config["sym"])
        dynamic: dict[str, dict[str, Any]] = config.get("dynamic") or {}
        ordered = [k for k in dynamic if k.startswith("-:")] + [k for k in dynamic if not k.startswith("-:")]
        choices: dict[str, UnitChoice] = {}
        for ru in runtime_units(like):
            if ru.layer is None:
                s: Scheme | None = _dynamic(ru.modules[0], ordered, dynamic, base) if config.get("lm_head") else None
            else:
                found = {_dynamic(name, ordered, dynamic, base) for name in ru.names}  # GPTQModel and vLLM must agree
                if len(found) > 1:
                    raise ExportError(f"{ru.label}: checkpoint and fused names get different schemes")
                s = found.pop()
            for u in ru.units:
                choices[u] = UnitChoice(_as_format(s))
        return rebuild(like, choices, source="gptqmodel")


def _dynamic(name: str, ordered: list[str], dynamic: Mapping[str, Mapping[str, Any]], base: Scheme) -> Scheme | None:
    """GPTQModel's ``dynamic_get``: the first key whose regex ``re.match`` es ``name``; ``-:`` skips the module."""
    for key in ordered:
        if re.match(key.removeprefix("-:").removeprefix("+:"), name):
            if key.startswith("-:"):
                return None
            o = dynamic[key]
            return o.get("bits", base[0]), o.get("group_size", base[1]), o.get("sym", base[2])
    return base
