"""llama.cpp: a ``--tensor-type-file`` for ``llama-quantize`` (``pattern=type`` lines over GGUF tensor names).

Names come from the ``gguf`` package's own HF -> GGUF map (``blk.3.attn_q.weight``, ``blk.3.ffn_down.weight``,
``output.weight``). llama-quantize lowercases each pattern and tests it with an *unanchored*
``std::regex_search``, first match winning in current builds (last match in early ones), so every line is one
tensor, escaped and anchored ``^...$`` -- ``blk\\.1\\.`` alone would also take ``blk.10`` -- and no two lines
can match one tensor whatever the precedence. The file format has no comments; the mapping, the bits and the
command line go to a companion JSON (``OUT.json``).

Each plan format maps to a GGUF type. Exact layouts map one-to-one (:data:`EXACT`): ``w4g32`` is Q4_0,
``w4g32a`` Q4_1 (fp16 scale and min per 32), ``w4g32ad6`` Q4_K (6-bit scales and mins per 256),
``w3g16d6`` Q3_K ... Others take the nearest type that *fits the row*: k-quants need rows (a tensor's input
width, GGUF ``ne[0]``) that are multiples of 256, and on narrower rows -- the main model's 576 -- llama-quantize
would silently substitute a 32-block type, so bitplan picks that type itself and reports it. "Nearest" means:
the fewest code bits at or above the format's (never fewer, which would cost quality the plan did not budget
for), the format's asymmetry kept at equal bits (asymmetric 4-bit on a 576 row is Q4_1, not Q4_0), then the
fewest bits per weight, then k-quants before 32-blocks, plain before non-linear (IQ4_NL) types. NF4 maps to
IQ4_NL, the other non-linear 4-bit codebook. The companion JSON lists every tensor's type and bits per weight
next to the plan's, so the cost of each substitution is visible.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bitplan.export._base import (
    Exporter,
    ExportError,
    ExportOptions,
    ExportResult,
    _fused_of,
    module_paths,
    rebuild,
    register_exporter,
)
from bitplan.formats import WeightFormat, parse_weight
from bitplan.plan import Plan, UnitChoice

__all__ = ["EXACT", "GGUF_TYPES", "LlamaCppExporter", "gguf_type"]

#: HF architecture -> gguf.MODEL_ARCH member (llama.cpp converts Mistral as Llama).
_GGUF_ARCH = {
    "LlamaForCausalLM": "LLAMA",
    "MistralForCausalLM": "LLAMA",
    "Qwen2ForCausalLM": "QWEN2",
    "Qwen3ForCausalLM": "QWEN3",
    "GPTNeoXForCausalLM": "GPTNEOX",
    "GPT2LMHeadModel": "GPT2",
    "GemmaForCausalLM": "GEMMA",
    "Phi3ForCausalLM": "PHI3",
}


@dataclass(frozen=True)
class GGUFType:
    name: str  # as llama-quantize spells it, lowercased
    bits: int  # code bits
    asym: bool  # stores a per-block min
    block: int  # weights per block: rows must be multiples of it
    bpw: float  # bits per weight, scales included
    nonlinear: bool = False


def _t(name: str, bits: int, asym: bool, block: int, nbytes: int, nonlinear: bool = False) -> GGUFType:
    return GGUFType(name, bits, asym, block, 8 * nbytes / block, nonlinear)


#: The types bitplan maps to: block sizes and bytes per block as in ggml (gguf.GGML_QUANT_SIZES).
GGUF_TYPES: dict[str, GGUFType] = {t.name: t for t in (
    _t("q2_k", 2, True, 256, 84),
    _t("q3_k", 3, False, 256, 110),
    _t("q4_0", 4, False, 32, 18),
    _t("q4_1", 4, True, 32, 20),
    _t("iq4_nl", 4, False, 32, 18, nonlinear=True),
    _t("q4_k", 4, True, 256, 144),
    _t("q5_0", 5, False, 32, 22),
    _t("q5_1", 5, True, 32, 24),
    _t("q5_k", 5, True, 256, 176),
    _t("q6_k", 6, False, 256, 210),
    _t("q8_0", 8, False, 32, 34),
    _t("f16", 16, False, 1, 2),
    _t("bf16", 16, False, 1, 2),
)}  # fmt: skip

#: Plan formats whose layout *is* a GGUF type (same codes, block and scale layout, same bits per weight).
EXACT: dict[str, str] = {
    "w4g32": "q4_0",
    "w4g32a": "q4_1",
    "w5g32": "q5_0",
    "w5g32a": "q5_1",
    "w8g32": "q8_0",
    "w4g32ad6": "q4_k",
    "w5g32ad6": "q5_k",
    "w3g16d6": "q3_k",
    "bf16": "bf16",
    "fp16": "f16",
}
#: Reading a type back: the exact format, else the nearest bitplan format.
_INVERSE = {**{v: k for k, v in EXACT.items()}, "q6_k": "w6g16d8", "q2_k": "w2g16ad6", "iq4_nl": "nf4g32"}
_KV_CACHE_TYPES = {16: "f16", 8: "q8_0", 4: "q4_0"}


def gguf_type(fmt: WeightFormat, row: int) -> tuple[GGUFType, bool]:
    """``(type, exact)``: the GGUF type for ``fmt`` on rows of ``row`` weights (see the module docstring)."""
    exact = EXACT.get(str(fmt))
    if exact is not None and row % GGUF_TYPES[exact].block == 0:
        return GGUF_TYPES[exact], True
    if not fmt.is_quantized:
        return GGUF_TYPES["bf16" if fmt.float_dtype == "bf16" else "f16"], True
    if fmt.kind == "nf4" and row % 32 == 0:
        return GGUF_TYPES["iq4_nl"], False
    bits, asym = fmt.bits, fmt.has_offset
    fits = [t for t in GGUF_TYPES.values() if t.bits >= bits and row % t.block == 0 and t.bits < 16]
    if not fits:
        return GGUF_TYPES["f16"], False  # no quantized type fits a row that is not a multiple of 32

    def key(t: GGUFType) -> tuple[Any, ...]:
        return (t.bits - bits, asym and t.bits == bits and not t.asym, t.bpw, t.block != 256, t.nonlinear, t.name)

    return min(fits, key=key), False


def _name_map(plan: Plan) -> Any:
    import gguf

    arch = _GGUF_ARCH.get(plan.model.architecture)
    if arch is None:
        raise ExportError(f"bitplan does not know llama.cpp's name for {plan.model.architecture}; known: {', '.join(sorted(_GGUF_ARCH))}")
    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch), plan.model.num_layers)


def _tensors(plan: Plan) -> list[tuple[str, str, UnitChoice, int, int]]:
    """``(unit, gguf tensor, choice, row, params)`` for every member module of every unit of the plan."""
    layers_path, head_path = module_paths(plan)
    names = _name_map(plan)
    out = []
    for unit, choice in plan.unit_choices():
        shape = plan.shapes.get(unit)
        if shape is None:
            raise ExportError(f"{unit}: the plan has no shape for it; validate it against the model first")
        if unit in plan.extra:
            modules = [head_path]
        else:
            _, index, local = unit.split(".", 2)
            group = _fused_of(local)  # a fused-granularity group names its members; a member stands for itself
            members = group[1] if group is not None and group[0] == local else (local,)
            modules = [f"{layers_path}.{index}.{m}" for m in members]
        for m in modules:
            gname = names.get_name(m, try_suffixes=(".weight",))
            if gname is None:
                raise ExportError(f"{unit}: no GGUF tensor name for module {m!r} ({plan.model.architecture})")
            out.append((unit, f"{gname}.weight", choice, shape[1], shape[0] * shape[1] // len(modules)))
    return out


@register_exporter("llama.cpp")
class LlamaCppExporter(Exporter):
    description = "llama-quantize --tensor-type-file (pattern=type lines) + companion JSON with the mapping and bits"

    def export(self, plan: Plan, options: ExportOptions) -> ExportResult:
        notes: list[str] = []
        rows: dict[str, dict[str, Any]] = {}
        plan_bits = gguf_bits = params = 0.0
        lines = []
        head_type = None
        for unit, tensor, choice, row, n in _tensors(plan):
            t, exact = gguf_type(choice.format, row)
            rows[tensor] = {"unit": unit, "format": str(choice.format), "type": t.name, "bpw": round(t.bpw, 4),
                            "plan_bpw": round(choice.format.bits_per_weight(row), 4), "exact": exact, "row": row}  # fmt: skip
            lines.append(f"{_pattern(tensor)}={t.name}")
            if unit in plan.extra:
                head_type = t.name
                continue
            plan_bits += choice.format.bits_per_weight(row) * n
            gguf_bits += t.bpw * n
            params += n
        substituted = [r for r in rows.values() if not r["exact"]]
        if substituted:
            by = sorted({f"{r['format']} -> {r['type']}" for r in substituted})
            notes.append(f"{len(substituted)} of {len(rows)} tensors take the nearest GGUF type that fits their rows: {', '.join(by)}")
        embd = "f16" if head_type is None or not plan.model.tied_embeddings else head_type
        out_name = shlex.quote(options.name)
        command = (f"llama-quantize --tensor-type-file {out_name} --token-embedding-type {embd}"
                   + ("" if plan.model.tied_embeddings else f" --output-tensor-type {head_type or 'f16'}")
                   + " MODEL-F16.gguf MODEL-bitplan.gguf Q8_0")  # fmt: skip
        kv = sorted({str(k) for k in plan.kv_formats()})
        kvf = plan.kv_formats()[0]
        if len(kv) == 1 and kvf.k_bits in _KV_CACHE_TYPES and kvf.v_bits in _KV_CACHE_TYPES:
            kv_flags = f"--cache-type-k {_KV_CACHE_TYPES[kvf.k_bits]} --cache-type-v {_KV_CACHE_TYPES[kvf.v_bits]}"
            if kvf.is_quantized:
                notes.append(f"KV {kvf}: run llama.cpp with {kv_flags} (one cache type for every layer, blocks of 32)")
        else:
            kv_flags = None
            notes.append(f"llama.cpp takes one K and one V cache type (f16, q8_0, q4_0, ...) for all layers; the plan's KV "
                         f"({', '.join(kv[:4])}) is not expressible there (export it with --to kv)")  # fmt: skip
        acts = sorted({str(a) for a in plan.act_formats() if a.is_quantized})
        if acts:
            notes.append(f"activation formats {', '.join(acts)} have no llama.cpp setting (its CPU dot products quantize activations to 8 bits themselves)")
        plan_avg, gguf_avg = plan_bits / params, gguf_bits / params
        comment = (f"bitplan plan for {plan.model.name_or_path or plan.model.architecture}: {plan_avg:.4f} bits per decoder-linear "
                   f"weight in the plan, {gguf_avg:.4f} as GGUF types ({len(rows) - len(substituted)} of {len(rows)} tensors exact)")  # fmt: skip
        companion = {
            "kind": "bitplan.export.llama.cpp",
            "schema_version": 1,
            "comment": comment,
            "plan_bits_per_weight": round(plan_avg, 4),
            "gguf_bits_per_weight": round(gguf_avg, 4),
            "command": command,
            "kv_flags": kv_flags,
            "notes": notes,
            "tensors": rows,
            "types": {k: {"bits": t.bits, "block": t.block, "bpw": round(t.bpw, 4), "asym": t.asym} for k, t in GGUF_TYPES.items()},
        }
        summary = {"tensors": len(rows), "exact": len(rows) - len(substituted), "plan_bits_per_weight": round(plan_avg, 4),
                   "gguf_bits_per_weight": round(gguf_avg, 4), "command": command}  # fmt: skip
        files = {"": "\n".join(lines) + "\n", ".json": json.dumps(companion, indent=1) + "\n"}
        return ExportResult(self.name, files, tuple(notes), summary)

    def read(self, files: Mapping[str, str], like: Plan) -> Plan:
        rules = []
        for i, line in enumerate(files[""].split(), 1):
            pattern, sep, tname = line.partition("=")
            if not sep or not pattern:
                raise ExportError(f"line {i}: expected pattern=type, got {line!r}")
            rules.append((re.compile(pattern.lower()), tname.lower()))  # as llama-quantize reads them
        found: dict[str, set[str]] = {}
        for unit, tensor, _, _, _ in _tensors(like):
            t = next((tn for rx, tn in rules if rx.search(tensor)), None)
            if t is None:
                raise ExportError(f"{tensor}: no line of the file matches it")
            found.setdefault(unit, set()).add(t)
        choices = {}
        for unit, types in found.items():
            if len(types) > 1:
                raise ExportError(f"{unit}: its tensors have different types ({', '.join(sorted(types))}); a fused unit has one format")
            t = types.pop()
            if t not in _INVERSE:
                raise ExportError(f"{unit}: GGUF type {t} has no bitplan format")
            choices[unit] = UnitChoice(parse_weight(_INVERSE[t]))
        return rebuild(like, choices, source="llama.cpp")


def _pattern(tensor: str) -> str:
    return "^" + re.escape(tensor) + "$"
