"""Export plans to the formats runtimes load, and read such files back.

::

    from bitplan.export import export
    export(plan, "compressed-tensors", "quant_config.json")   # vLLM / SGLang / transformers
    export(plan, "gptqmodel", "quantize_config.json", target="marlin")
    export(plan, "llama.cpp", "plan.tensor-types")           # + plan.tensor-types.json (mapping, bits, command)
    export(plan, "kv", "kv.yaml")                             # {layer: {k_bits, v_bits}}

Every writer anchors its patterns so each module matches exactly one rule under the consumer's own matching
(``re.match`` in vLLM and GPTQModel, ``regex_search`` in llama.cpp) and refuses, with one line naming the unit,
what the format cannot express -- unless ``approximate=True`` maps it to the nearest expressible scheme (noted).
"""

from __future__ import annotations

import os
from pathlib import Path

from bitplan._io import atomic_write_text
from bitplan.export import _compressed_tensors, _gptqmodel, _kv, _llamacpp  # noqa: F401  (register the exporters)
from bitplan.export._base import (
    EXPORTERS,
    Exporter,
    ExportError,
    ExportOptions,
    ExportResult,
    register_exporter,
)
from bitplan.export._kv import read_kv_formats
from bitplan.export._llamacpp import gguf_type
from bitplan.plan import Plan

__all__ = [
    "EXPORTERS",
    "ExportError",
    "ExportOptions",
    "ExportResult",
    "Exporter",
    "export",
    "gguf_type",
    "read_export",
    "read_kv_formats",
    "register_exporter",
]


def export(
    plan: Plan,
    to: str,
    output: str | os.PathLike[str] | None = None,
    *,
    approximate: bool = False,
    kv: bool = True,
    target: str | None = None,
) -> ExportResult:
    """Export ``plan`` as format ``to`` (see :data:`EXPORTERS`); with ``output``, write the files atomically
    (the main file at ``output``, companions beside it as ``output`` + suffix)."""
    exporter = EXPORTERS.get(to)()
    name = Path(output).name if output is not None else "OUT"
    result = exporter.export(plan, ExportOptions(approximate=approximate, kv=kv, target=target, name=name))
    if output is not None:
        for suffix, text in sorted(result.files.items(), key=lambda kv_: kv_[0] == ""):  # the main file last
            atomic_write_text(f"{os.fspath(output)}{suffix}", text)
    return result


def read_export(to: str, path: str | os.PathLike[str], like: Plan) -> Plan:
    """Read an exported file (and its companions) back into a plan for ``like``'s model, matching module names
    as the consumer does. Formats carry no quantizer method: every unit reads back as ``rtn``."""
    exporter = EXPORTERS.get(to)()
    files = {}
    main = Path(path)
    for suffix in ("", ".json"):
        p = Path(f"{os.fspath(main)}{suffix}")
        if suffix == "" or p.is_file():
            try:
                files[suffix] = p.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ExportError(f"{p}: cannot read ({e})") from None
    return exporter.read(files, like)
