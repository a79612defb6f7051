"""compressed-tensors ``quantization_config`` (what vLLM, SGLang and transformers read from ``config.json``).

One config group per distinct scheme (weights + input activations), its ``targets`` one anchored ``re:``
pattern per layer and fused block, 16-bit units in ``ignore``. How vLLM matches (``compressed_tensors/utils.py``):
the layer name is vLLM's module -- the *fused* ``model.layers.3.self_attn.qkv_proj`` -- tried against every
target with ``re.match`` (so the pattern must end in ``$``: ``re:.*v_proj`` also takes ``qkv_proj``); failing
that, each shard name ``...q_proj``/``...k_proj``/``...v_proj`` must match and the *first shard's* scheme is used
without checking the others agree. So every target names the block's shards *and* its fused name, and a plan
whose shards differ is refused (:func:`runtime_units`). ``ignore`` is matched the same way and a fused module
with some shards ignored is an error in vLLM, so ignores cover whole blocks too.

What the format cannot say: per-layer KV bits (``kv_cache_scheme`` is one scheme for every layer, and one bit
width for K and V), NF4 codebooks, double-quantized scales. vLLM runs a subset of what it can say: int weights of
4 or 8 bits (WNA16), W8A8 int8 with symmetric per-channel weights, FP8; each exported group that vLLM cannot run
gets a note.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from bitplan.export._base import (
    Exporter,
    ExportError,
    ExportOptions,
    ExportResult,
    RuntimeUnit,
    anchored,
    module_paths,
    rebuild,
    register_exporter,
    runtime_units,
)
from bitplan.formats import ActFormat, KVFormat, WeightFormat
from bitplan.plan import Plan, UnitChoice

__all__ = ["CompressedTensorsExporter"]


def _nearest(fmt: WeightFormat, approximate: bool, where: str, notes: list[str]) -> WeightFormat:
    """``fmt`` as compressed-tensors can store it: int (grouped or per channel), fp8, or 16-bit."""
    if fmt.kind in ("float", "fp8") or (fmt.kind == "int" and fmt.scale_bits is None):
        return fmt
    near = fmt.compute_format if fmt.kind == "int" else WeightFormat("int", 4, fmt.group_size, True)
    why = "double-quantized scales" if fmt.scale_bits else "the NF4 codebook"
    if not approximate:
        raise ExportError(f"{where}: compressed-tensors has no {why} ({fmt}); pass --approximate to export it as {near}")
    notes.append(f"{where}: {fmt} exported as {near} (compressed-tensors has no {why})")
    return near


def weight_args(fmt: WeightFormat) -> dict[str, Any] | None:
    if not fmt.is_quantized:
        return None
    if fmt.kind == "fp8":
        return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "group_size": None,
                "dynamic": False, "actorder": None, "observer": "minmax"}  # fmt: skip
    return {
        "num_bits": fmt.bits,
        "type": "int",
        "symmetric": fmt.symmetric,
        "strategy": "group" if fmt.group_size else "channel",
        "group_size": fmt.group_size,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
    }


def act_args(act: ActFormat) -> dict[str, Any] | None:
    if not act.is_quantized:
        return None
    return {"num_bits": act.bits, "type": "float" if act.kind == "fp8" else "int", "symmetric": True,
            "strategy": "token", "group_size": None, "dynamic": True, "observer": None}  # fmt: skip


def _group_format(w: dict[str, Any] | None, a: dict[str, Any] | None) -> str:
    if w is not None and w["type"] == "float":
        return "float-quantized"
    if a is None:
        return "pack-quantized"
    return "int-quantized" if a["type"] == "int" else "float-quantized"


def vllm_problem(w: dict[str, Any] | None, a: dict[str, Any] | None) -> str | None:
    """Why vLLM's compressed-tensors schemes cannot run this group (None when one can)."""
    if w is None:
        return "activation quantization on 16-bit weights"
    if w["type"] == "float":
        return None if a is None or a["type"] == "float" else "fp8 weights with int activations"
    if a is None:
        return None if w["num_bits"] in (4, 8) else f"{w['num_bits']}-bit weights (WNA16 takes 4 or 8)"
    if a["type"] == "int" and a["num_bits"] == 8 and w["num_bits"] == 8 and w["symmetric"] and w["strategy"] == "channel":
        return None
    return f"int{w['num_bits']} {'group' if w['group_size'] else 'channel'} weights with {a['type']}{a['num_bits']} activations (W8A8 needs symmetric per-channel int8 weights)"


def _kv_scheme(plan: Plan, options: ExportOptions, notes: list[str]) -> dict[str, Any] | None:
    kvs = plan.kv_formats()
    if not any(k.is_quantized for k in kvs):
        return None
    distinct = sorted({str(k) for k in kvs})
    if not options.kv:
        notes.append(f"KV cache not exported (--no-kv); the plan's is {', '.join(distinct)}")
        return None
    if len(distinct) > 1:
        raise ExportError(
            f"compressed-tensors has one kv_cache_scheme for every layer and the plan's KV differs per layer "
            f"({', '.join(distinct[:4])}{' ...' if len(distinct) > 4 else ''}); pass --no-kv and export the KV plan with --to kv"
        )
    kv = kvs[0]
    if kv.k_bits != 8 or kv.v_bits != 8:
        raise ExportError(
            f"compressed-tensors' kv_cache_scheme has one bit width for K and V and vLLM runs only 8-bit (fp8) KV; the plan's is {kv}; "
            "pass --no-kv and export the KV plan with --to kv"
        )
    notes.append(f"KV {kv} exported as fp8 e4m3 per tensor, the only KV cache scheme vLLM runs")
    return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}


@register_exporter("compressed-tensors")
class CompressedTensorsExporter(Exporter):
    description = "compressed-tensors quantization_config for vLLM / SGLang / transformers (JSON)"

    def export(self, plan: Plan, options: ExportOptions) -> ExportResult:
        notes: list[str] = []
        acts = plan.act_formats()

        def scheme(c: UnitChoice) -> str:
            return str(c.format)  # shards of a fused module must share the format

        units = runtime_units(plan, scheme=scheme)
        groups: dict[str, dict[str, Any]] = {}
        ignore: list[str] = []
        vllm: dict[str, str] = {}
        for ru in units:
            act = acts[ru.layer] if ru.layer is not None else ActFormat()
            fmt = _nearest(ru.choice.format, options.approximate, ru.label, notes)
            w, a = weight_args(fmt), act_args(act)
            names = list(ru.names)
            if w is None and a is None:
                ignore.append(names[0] if len(names) == 1 and ru.layer is None else "re:" + anchored(names))
                continue
            key = json.dumps([w, a], sort_keys=True)
            if key not in groups:
                groups[key] = {"targets": [], "weights": w, "input_activations": a, "output_activations": None,
                               "format": _group_format(w, a)}  # fmt: skip
                problem = vllm_problem(w, a)
                if problem:
                    vllm[key] = problem
            groups[key]["targets"].append("re:" + anchored(names))
        if not any(ru.layer is None for ru in units):  # the plan leaves the head 16-bit
            ignore.append(module_paths(plan)[1])
        formats = {g["format"] for g in groups.values()}
        config = {
            "quant_method": "compressed-tensors",
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed",
            "global_compression_ratio": None,
            "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
            "ignore": ignore,
            "kv_cache_scheme": _kv_scheme(plan, options, notes),
        }
        for key, problem in vllm.items():
            name = f"group_{list(groups).index(key)}"
            notes.append(f"{name} ({len(groups[key]['targets'])} target(s)): vLLM cannot run it: {problem}")
        s = plan.summary()
        doc = {
            "quantization_config": config,
            "bitplan": {"plan_model": plan.model.name_or_path, "fingerprint": plan.model.fingerprint,
                        "avg_weight_bits": round(s.avg_weight_bits, 4), "note": "merge quantization_config into the checkpoint's config.json"},
        }  # fmt: skip
        summary = {"groups": len(groups), "targets": sum(len(g["targets"]) for g in groups.values()), "ignored": len(ignore),
                   "vllm_unsupported_groups": len(vllm), "kv_cache_scheme": config["kv_cache_scheme"] is not None}  # fmt: skip
        return ExportResult(self.name, {"": json.dumps(doc, indent=2) + "\n"}, tuple(notes), summary)

    def read(self, files: Mapping[str, str], like: Plan) -> Plan:
        doc = json.loads(files[""])
        config = doc.get("quantization_config", doc)
        if config.get("quant_method") != "compressed-tensors":
            raise ExportError(f"not a compressed-tensors config (quant_method {config.get('quant_method')!r})")
        groups = list(config.get("config_groups", {}).values())
        ignore = list(config.get("ignore", []))
        choices: dict[str, UnitChoice] = {}
        layer_acts: dict[int, set[str]] = {}
        for ru in runtime_units(like):
            w, a = _vllm_scheme(ru, groups, ignore)
            fmt = _weight_format(w)
            for u in ru.units:
                choices[u] = UnitChoice(fmt)
            if ru.layer is not None:
                layer_acts.setdefault(ru.layer, set()).add(str(_act_format(a)))
        acts = []
        for layer in like.layers:
            found = layer_acts.get(layer.index, {"a16"})
            if len(found) > 1:
                raise ExportError(f"layers.{layer.index}: units have different activation schemes ({', '.join(sorted(found))}); a plan has one per layer")
            acts.append(ActFormat.parse(found.pop()))
        kv_args = config.get("kv_cache_scheme")
        kv = None if kv_args is None else [KVFormat(kv_args["num_bits"], kv_args["num_bits"])] * len(like.layers)
        return rebuild(like, choices, acts, kv or [KVFormat()] * len(like.layers), "compressed-tensors")


def _match(name: str, target: str) -> bool:
    """vLLM's ``_is_equal_or_regex_match`` (without the class-name fallback, which bitplan never writes)."""
    return bool(re.match(target[3:], name)) if target.startswith("re:") else name == target


def _vllm_scheme(ru: RuntimeUnit, groups: list[dict[str, Any]], ignore: list[str]) -> tuple[Any, Any]:
    """The (weights, input_activations) vLLM gives this module: ignore first, then the first matching target,
    then (fused) every shard must match and the first shard's target wins."""
    layer_name = ru.fused or ru.modules[0]
    if any(_match(layer_name, t) for t in ignore):
        return None, None
    if ru.fused:
        ignored = [any(_match(m, t) for t in ignore) for m in ru.modules]
        if all(ignored):
            return None, None
        if any(ignored):
            raise ExportError(f"{layer_name}: some shards are ignored and some not; vLLM refuses this")
    for g in groups:
        if any(_match(layer_name, t) for t in g.get("targets", [])):
            return g.get("weights"), g.get("input_activations")
    if ru.fused:
        found = [next((g for g in groups if any(_match(m, t) for t in g.get("targets", []))), None) for m in ru.modules]
        first = found[0]
        if first is not None and all(f is not None for f in found):
            return first.get("weights"), first.get("input_activations")
    raise ExportError(f"{layer_name}: no config group targets it and it is not ignored")


def _weight_format(w: Mapping[str, Any] | None) -> WeightFormat:
    if w is None:
        return WeightFormat("float", 16)
    if w["type"] == "float":
        return WeightFormat("fp8", 8)
    return WeightFormat("int", w["num_bits"], w.get("group_size") if w.get("strategy") == "group" else None, w["symmetric"])


def _act_format(a: Mapping[str, Any] | None) -> ActFormat:
    if a is None:
        return ActFormat()
    return ActFormat("fp8" if a["type"] == "float" else "int", a["num_bits"])
