"""The KV plan alone: ``{layer: {k_bits, v_bits}}`` as YAML or JSON, KVTuner-style, for runtimes and scripts that
take per-layer K/V precision, and for :func:`bitplan.kv_cache_for` (``past_key_values=`` of ``generate()``).

Each layer also carries its full format string (``k4v2g32r128``: group size, 16-bit recent window, sink tokens),
so reading the file back gives the plan's KV formats exactly; a file written by hand may give the bits alone
(KIVI defaults: K per channel, V per token, groups of 32).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bitplan.errors import FormatError
from bitplan.export._base import (
    Exporter,
    ExportError,
    ExportOptions,
    ExportResult,
    rebuild,
    register_exporter,
)
from bitplan.formats import KVFormat, parse_kv
from bitplan.plan import Plan, UnitChoice

__all__ = ["KV_PLAN_KIND", "KVPlanExporter", "read_kv_formats"]

KV_PLAN_KIND = "bitplan.kv_plan"
SCHEMA_VERSION = 1


def _is_yaml(name: str) -> bool:
    return name.lower().endswith((".yaml", ".yml"))


@register_exporter("kv")
class KVPlanExporter(Exporter):
    description = "per-layer K/V bits {layer: {k_bits, v_bits}} as YAML (.yaml/.yml) or JSON"

    def export(self, plan: Plan, options: ExportOptions) -> ExportResult:
        doc = {
            "kind": KV_PLAN_KIND,
            "schema_version": SCHEMA_VERSION,
            "model": {"name_or_path": plan.model.name_or_path, "fingerprint": plan.model.fingerprint,
                      "num_layers": plan.model.num_layers, "num_kv_heads": plan.model.num_kv_heads, "head_dim": plan.model.head_dim},
            "layers": {i: {"k_bits": kv.k_bits, "v_bits": kv.v_bits, "format": str(kv)} for i, kv in enumerate(plan.kv_formats())},
        }  # fmt: skip
        if _is_yaml(options.name):
            import yaml

            text = yaml.safe_dump(doc, sort_keys=False)
        else:
            text = json.dumps(doc, indent=1) + "\n"
        s = plan.summary()
        summary = {"layers": plan.model.num_layers, "kv_formats": s.kv_formats, "kv_bytes_per_token": s.kv_bytes_per_token}
        return ExportResult(self.name, {"": text}, (), summary)

    def read(self, files: Mapping[str, str], like: Plan) -> Plan:
        fmts = parse_kv_plan(files[""], "kv plan")
        if len(fmts) != like.model.num_layers:
            raise ExportError(f"kv plan has {len(fmts)} layers, the model has {like.model.num_layers}")
        choices: dict[str, UnitChoice] = dict(like.unit_choices())
        return rebuild(like, choices, kv=fmts, source="kv")


def parse_kv_plan(text: str, source: str) -> list[KVFormat]:
    """Per-layer KV formats from a KV plan's text (YAML is a superset of JSON: one parser reads both)."""
    import yaml

    try:
        doc: Any = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ExportError(f"{source}: not valid YAML/JSON ({' '.join(str(e).split())[:160]})") from None
    if not isinstance(doc, dict) or doc.get("kind") != KV_PLAN_KIND:
        raise ExportError(f"{source}: not a bitplan KV plan (kind {doc.get('kind') if isinstance(doc, dict) else None!r})")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ExportError(f"{source}: unsupported KV plan schema_version {doc.get('schema_version')!r}; this bitplan reads {SCHEMA_VERSION}")
    layers = doc.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ExportError(f"{source}: 'layers' must map layer index -> {{k_bits, v_bits}}")
    try:
        indices = sorted(int(k) for k in layers)
    except (TypeError, ValueError):
        raise ExportError(f"{source}: layer keys must be integers") from None
    if indices != list(range(len(indices))):
        raise ExportError(f"{source}: layers must be 0..{len(indices) - 1}, each once")
    out = []
    for i in indices:
        entry = layers.get(i, layers.get(str(i)))
        where = f"{source}: layers[{i}]"
        if not isinstance(entry, dict):
            raise ExportError(f"{where}: expected {{k_bits, v_bits}}")
        try:
            fmt = parse_kv(entry["format"]) if "format" in entry else KVFormat(int(entry["k_bits"]), int(entry["v_bits"]))
        except KeyError as e:
            raise ExportError(f"{where}: missing {e}") from None
        except (FormatError, TypeError, ValueError) as e:
            raise ExportError(f"{where}: {e}") from None
        if "format" in entry and ("k_bits" in entry or "v_bits" in entry) and (entry.get("k_bits", fmt.k_bits), entry.get("v_bits", fmt.v_bits)) != (fmt.k_bits, fmt.v_bits):
            raise ExportError(f"{where}: k_bits/v_bits disagree with format {entry['format']!r}")
        out.append(fmt)
    return out


def read_kv_formats(path: str | os.PathLike[str]) -> list[KVFormat]:
    """Per-layer KV formats from a KV plan file (``bitplan export --to kv``) or a plan JSON."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"{p}: cannot read ({e})") from None
    if '"bitplan.plan"' in text[:200]:
        return Plan.load(p).kv_formats()
    return parse_kv_plan(text, str(p))
