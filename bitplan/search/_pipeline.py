"""The one command: sensitivity -> search -> verification -> report (-> final evaluation), in one run directory.

Every stage reuses what an earlier run left in the directory: the sensitivity table (``sensitivity.parquet``,
reused when model, calibration tokens and options match, resumed when interrupted), the study (``study.db``,
continued up to ``--trials``), verification numbers (stored on the trials). The evaluation file is read
last and only to report the chosen plans' final numbers; nothing is chosen by it.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bitplan._io import atomic_write_text
from bitplan.search._run import SearchConfig, SearchResult, search
from bitplan.sensitivity import Candidates, SensitivityTable, load_calib, profile

__all__ = ["PipelineInputs", "run_pipeline"]

_log = logging.getLogger("bitplan")
SUMMARY_SCHEMA = 1


@dataclass(frozen=True)
class PipelineInputs:
    """Data and model for :func:`run_pipeline` (search settings live in :class:`SearchConfig`)."""

    model: str
    calib: str
    tokens: int = 16384
    window: int = 512
    sens_method: str = "auto"
    table: str | None = None  # an existing sensitivity table to use instead of profiling
    verify_data: str | None = None
    verify_tokens: int = 4096
    eval_data: str | None = None
    eval_tokens: int = 8192
    dtype: str = "float32"
    profile: str | None = None  # a hardware profile (bitplan profile-hw) for the latency objective and budget
    allow_foreign_profile: bool = False


def run_pipeline(inputs: PipelineInputs, config: SearchConfig, run_dir: str | Path, *, progress: bool = True) -> SearchResult:
    """Run every stage; return the search result with ``summary`` extended by sensitivity and eval data."""
    from bitplan.loading import load_model, load_tokenizer, parse_dtype
    from bitplan.search._verify import default_verify_tokens

    cost_model = None
    if inputs.profile:  # checked first: a profile of another device is refused before any work
        from bitplan.profiles import ProfileCostModel, load_profile

        cost_model = ProfileCostModel(load_profile(inputs.profile, "cpu", allow_foreign=inputs.allow_foreign_profile))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    t = time.perf_counter()
    model = load_model(inputs.model, dtype=parse_dtype(inputs.dtype))
    tok = load_tokenizer(inputs.model)
    stages["load"] = time.perf_counter() - t

    t = time.perf_counter()
    calib = load_calib(tok, inputs.calib, inputs.tokens, inputs.window)  # also what calibrated plans apply with
    if inputs.table:
        table = SensitivityTable.load(inputs.table)
    else:
        candidates = Candidates.parse(
            list(config.weights) if config.weights else None,
            list(config.acts) if config.acts else None,
            list(config.kv) if config.kv else None,
        )
        kinds = tuple(config.kinds)
        table = profile(model, calib, candidates, method=inputs.sens_method, kinds=kinds,  # type: ignore[arg-type]
                        output=run_dir / "sensitivity.parquet", model_name=inputs.model, progress=progress)  # fmt: skip
    stages["sensitivity"] = time.perf_counter() - t

    if inputs.verify_data:
        from bitplan.eval import load_tokens

        verify_ids = load_tokens(tok, inputs.verify_data, inputs.verify_tokens)
    else:
        verify_ids = default_verify_tokens(tok, inputs.calib, table.meta.tokens, inputs.verify_tokens, inputs.window)

    result = search(model, table, run_dir, config, verify_tokens=verify_ids, window=inputs.window,
                    name_or_path=inputs.model, progress=progress, cost_model=cost_model, calib=calib)  # fmt: skip
    result.stage_seconds.update({**stages, **result.stage_seconds})

    if inputs.eval_data and result.best_plan is not None:
        t = time.perf_counter()
        result.summary["eval"] = _final_eval(model, result, inputs, tok, calib)
        result.stage_seconds["eval"] = time.perf_counter() - t
    result.summary["stage_seconds"] = result.stage_seconds
    result.summary["sensitivity"] = {"table": str(inputs.table or run_dir / "sensitivity.parquet"),
                                     "tokens": table.meta.tokens, "rows": len(table)}  # fmt: skip
    result.summary["kind"], result.summary["schema_version"] = "bitplan.search-summary", SUMMARY_SCHEMA
    atomic_write_text(run_dir / "summary.json", json.dumps(result.summary, indent=2, default=str) + "\n")
    return result


def _final_eval(model: Any, result: SearchResult, inputs: PipelineInputs, tok: Any, calib: Any) -> dict[str, Any]:
    """Perplexity and KL of the picked plan (and 16-bit) on the evaluation text: reported, never chosen by."""
    from bitplan.apply import apply_plan
    from bitplan.eval import ReferenceLogProbs, evaluate, load_tokens
    from bitplan.plan import Plan

    assert result.best_plan is not None and inputs.eval_data is not None
    ids = load_tokens(tok, inputs.eval_data, inputs.eval_tokens)
    ref = ReferenceLogProbs(model, ids, inputs.window, progress=False)
    base = evaluate(model, tokens=ids, max_tokens=ids.numel(), window=inputs.window, reference=ref, progress=False)
    plan = Plan.load(result.best_plan)
    q = apply_plan(copy.deepcopy(model), plan, kernels="reference", calib=calib)
    with torch.no_grad():
        r = evaluate(q, tokens=ids, max_tokens=ids.numel(), window=inputs.window, reference=ref, progress=False)
    return {"file": str(inputs.eval_data), "tokens": r.tokens, "ppl": r.ppl, "kl": r.kl, "ppl_16bit": base.ppl,
            "note": "evaluation text: reported only, never used to choose a plan"}  # fmt: skip
