"""bitplan: find the best per-layer precision plan for an LLM under memory and latency budgets, and apply it.

The small public API, one verb per stage::

    import bitplan
    model = bitplan.load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    plan = bitplan.uniform_plan(model, weights="w4g64a", kv="k8v8")
    plan.save("plan.json")
    bitplan.apply_plan(model, bitplan.Plan.load("plan.json"))
    print(bitplan.evaluate(model, "wikitext-2-raw-test.txt", max_tokens=4096))

Names are resolved lazily so ``import bitplan`` stays cheap (no transformers import until needed) and
never probes for a GPU or Triton.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "ActFormat": "bitplan.formats",
    "KVFormat": "bitplan.formats",
    "WeightFormat": "bitplan.formats",
    "parse_format": ("bitplan.formats", "parse"),
    "Plan": "bitplan.plan",
    "PlanSummary": "bitplan.plan",
    "UnitChoice": "bitplan.plan",
    "uniform_plan": "bitplan.plan",
    "ModelGraph": "bitplan.graph",
    "build_graph": "bitplan.graph",
    "load_model": "bitplan.loading",
    "load_tokenizer": "bitplan.loading",
    "apply_plan": "bitplan.apply",
    "evaluate": "bitplan.eval",
    "EvalResult": "bitplan.eval",
    "kv_cache_for": "bitplan.kvcache",
    "save": "bitplan.checkpoint",
    "load": "bitplan.checkpoint",
    "set_kernels": "bitplan.checkpoint",
    "profile": "bitplan.sensitivity",
    "SensitivityTable": "bitplan.sensitivity",
    "search_plans": ("bitplan.search", "search"),
    "Budgets": "bitplan.search",
    "SearchConfig": "bitplan.search",
    "BitplanError": "bitplan.errors",
    "FormatError": "bitplan.errors",
    "PlanError": "bitplan.errors",
    "ModelError": "bitplan.errors",
    "DataError": "bitplan.errors",
}

__all__ = [
    "__version__",
    "ActFormat",
    "KVFormat",
    "WeightFormat",
    "parse_format",
    "Plan",
    "PlanSummary",
    "UnitChoice",
    "uniform_plan",
    "ModelGraph",
    "build_graph",
    "load_model",
    "load_tokenizer",
    "apply_plan",
    "evaluate",
    "EvalResult",
    "profile",
    "SensitivityTable",
    "search_plans",
    "Budgets",
    "SearchConfig",
    "kv_cache_for",
    "save",
    "load",
    "set_kernels",
    "BitplanError",
    "FormatError",
    "PlanError",
    "ModelError",
    "DataError",
]


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'bitplan' has no attribute {name!r}")
    module, attr = target if isinstance(target, tuple) else (target, name)
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from bitplan.apply import apply_plan
    from bitplan.checkpoint import load, save, set_kernels
    from bitplan.errors import BitplanError, DataError, FormatError, ModelError, PlanError
    from bitplan.eval import EvalResult, evaluate
    from bitplan.formats import ActFormat, KVFormat, WeightFormat
    from bitplan.formats import parse as parse_format
    from bitplan.graph import ModelGraph, build_graph
    from bitplan.kvcache import kv_cache_for
    from bitplan.loading import load_model, load_tokenizer
    from bitplan.plan import Plan, PlanSummary, UnitChoice, uniform_plan
    from bitplan.search import Budgets, SearchConfig
    from bitplan.search import search as search_plans
    from bitplan.sensitivity import SensitivityTable, profile
