"""``profile()``: score every unit's weight, activation and KV options, resumably.

Orchestration only: the Fisher engine (``_fisher``) scores everything from one forward+backward per
batch, the measured engine (``_measure``) runs only-this-unit-quantized KLs; this module decides what
still has to be computed, persists progress, adds the KV space reduction and writes the table.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from bitplan.errors import BitplanError
from bitplan.graph import build_graph
from bitplan.loading import _param_device, compute_dtype_for
from bitplan.sensitivity._calib import CalibData
from bitplan.sensitivity._candidates import Candidates
from bitplan.sensitivity._rows import ScoreRow
from bitplan.sensitivity._table import PartialStore, SensitivityTable, TableMeta, _now

__all__ = ["profile"]

Method = Literal["auto", "fisher", "kl", "both"]
_log = logging.getLogger("bitplan")


def _methods_by_kind(method: str, kinds: Sequence[str]) -> dict[str, list[str]]:
    """Which scoring methods fill which kind: Fisher does not score KV pairs or the output head, so those are
    always measured (the head's rows are ``weight`` rows of unit ``lm_head``, see ``_head``).

    ``auto`` (the default) is Fisher for weights and activations and measured KL for KV pairs: on the main
    model Fisher sums rank whole plans as well as measured sums do at a fraction of the cost (the
    evidence is in bench/RESULTS.md, sections sensitivity-additivity and sensitivity-methods).
    """
    table = {
        "fisher": {"weight": ["fisher"], "head": ["kl"], "act": ["fisher"], "kv": []},
        "kl": {"weight": ["kl"], "head": ["kl"], "act": ["kl"], "kv": ["kl"]},
        "both": {"weight": ["fisher", "kl"], "head": ["kl"], "act": ["fisher", "kl"], "kv": ["kl"]},
        "auto": {"weight": ["fisher"], "head": ["kl"], "act": ["fisher"], "kv": ["kl"]},
    }
    if method not in table:
        raise BitplanError(f"--method must be auto, fisher, kl or both, got {method!r}")
    return {k: table[method][k] for k in kinds}


def _expected_keys(graph: Any, candidates: Candidates, by_kind: dict[str, list[str]], granularity: str) -> set[tuple[str, ...]]:
    from bitplan.sensitivity._head import head_keys

    keys: set[tuple[str, ...]] = set(head_keys(graph, candidates)) if "head" in by_kind else set()
    for m in by_kind.get("weight", []):
        for unit in graph.units(granularity):
            for opt in candidates.weight_options(unit.in_features):
                keys.add((unit.name, "weight", str(opt.format), opt.method, m))
    for info in graph.layers:
        for m in by_kind.get("act", []):
            keys.update((f"layers.{info.index}.acts", "act", str(a), "", m) for a in candidates.acts)
        for m in by_kind.get("kv", []):
            keys.update((f"layers.{info.index}.kv", "kv", str(k), "", m) for k in candidates.kv)
    return keys


def profile(
    model: nn.Module,
    calib: CalibData,
    candidates: Candidates | None = None,
    *,
    method: Method = "auto",
    kinds: Sequence[str] = ("weight", "head", "act", "kv"),
    granularity: Literal["fused", "tensor"] = "fused",
    output: str | os.PathLike[str] | None = None,
    batch_size: int = 4,
    dtype: torch.dtype | None = None,
    model_name: str = "",
    progress: bool = True,
) -> SensitivityTable:
    """Score every option of every unit of ``model`` on ``calib``; see the package docstring.

    With ``output``, an existing table for the same inputs is returned as is, and an interrupted run
    resumes from the rows it had finished. ``dtype`` is the compute dtype of the scoring passes; by default
    (``None``) bfloat16 where it is native (CUDA, CPUs with AMX or AVX-512 BF16: ~7x faster than float32,
    with a rounding noise floor reported in bench/RESULTS.md), else float32 (an AVX2-only CPU emulates bf16
    GEMMs over 100x slower than fp32 (bench/RESULTS.md, cpu-bf16)), see :func:`bitplan.loading.compute_dtype_for`.
    """
    from bitplan import __version__

    dtype = dtype or compute_dtype_for(_param_device(model))
    candidates = candidates or Candidates()
    bad = [k for k in kinds if k not in ("weight", "head", "act", "kv")]
    if bad:
        raise BitplanError(f"unknown kind(s) {', '.join(bad)}; kinds are weight, head, act, kv")
    by_kind = _methods_by_kind(method, kinds)
    graph = build_graph(model)
    meta = TableMeta(
        model_fingerprint=graph.fingerprint,
        model_name=model_name or str(getattr(model, "name_or_path", "") or ""),
        calib_hash=calib.hash,
        calib_source=calib.source,
        tokens=calib.tokens,
        window=calib.window,
        granularity=granularity,
        dtype=str(dtype).removeprefix("torch."),
        num_kv_heads=graph.num_kv_heads,
        head_dim=graph.head_dim,
        candidates=candidates.to_dict(),
        bitplan_version=__version__,
        created=_now(),
    )
    wanted = _expected_keys(graph, candidates, by_kind, granularity)

    if output is not None and Path(output).exists():
        existing = SensitivityTable.load(output)
        if existing.meta.identity() == meta.identity() and wanted <= {r.key for r in existing.rows}:
            _log.info("reusing %s: same model, calibration tokens and options", output)
            PartialStore(output, meta).cleanup()  # progress a run killed after saving the table left behind
            return existing
        base_rows = existing.rows if existing.meta.identity() == meta.identity() else []
    else:
        base_rows = []
    store = PartialStore(output, meta) if output is not None else None
    rows: list[ScoreRow] = [*base_rows, *(store.rows() if store else [])]
    done = {r.key for r in rows}

    def keep(new: Sequence[ScoreRow]) -> None:
        fresh = [r for r in new if r.key not in done]
        done.update(r.key for r in fresh)
        rows.extend(fresh)
        if store is not None:
            store.append(fresh)

    timings: dict[str, float] = {}
    calibrated = None
    if "weight" in by_kind:  # calibrated options: quantized once, shared by both scorers
        from bitplan.sensitivity._calibrated import precompute

        # Fisher scores every option of every unit whenever any Fisher row is missing (one pass), so it needs
        # them all; measured KL only those of options with a missing row (a resumed or extended run).
        fisher_pass = "weight" in by_kind and "fisher" in by_kind["weight"] and any(k[4] == "fisher" and k not in done for k in wanted)

        def missing(unit: str, opt: Any) -> bool:
            return fisher_pass or any((unit, "weight", str(opt.format), opt.method, m) not in done for m in by_kind["weight"])

        work = [(u, [o for o in candidates.weight_options(u.in_features) if missing(u.name, o)]) for u in graph.units(granularity)]
        calibrated = precompute(model, graph, calib, [(u, opts) for u, opts in work if opts], progress=progress)
        if calibrated.entries:
            timings["calibrated_seconds"] = calibrated.seconds
    fisher_kinds = tuple(k for k, ms in by_kind.items() if "fisher" in ms and k != "head")
    kl_kinds = tuple(k for k, ms in by_kind.items() if "kl" in ms and k != "head")
    if fisher_kinds:
        todo = {k for k in wanted if k[4] == "fisher"} - done
        if todo:
            from bitplan.sensitivity._fisher import fisher_scores

            t = time.perf_counter()
            keep(fisher_scores(model, calib, candidates, granularity=granularity, batch_size=batch_size, dtype=dtype, kinds=fisher_kinds, progress=progress, calibrated=calibrated))
            timings["fisher_seconds"] = time.perf_counter() - t
    if kl_kinds:
        todo = {k for k in wanted if k[4] == "kl"} - done
        if todo:
            from bitplan.sensitivity._measure import measured_scores

            t = time.perf_counter()
            keep(measured_scores(
                model, calib, candidates, kinds=kl_kinds, granularity=granularity, batch_size=batch_size,
                dtype=dtype, skip=set(done), on_rows=keep, progress=progress, calibrated=calibrated,
            ))  # fmt: skip
            timings["kl_seconds"] = time.perf_counter() - t
    if "head" in by_kind:  # the output head: measured KL by every method (see _head)
        todo = {k for k in wanted if k[0] == "lm_head"} - done
        if todo:
            from bitplan.sensitivity._head import head_scores

            t = time.perf_counter()
            keep(head_scores(model, calib, candidates, batch_size=batch_size, skip=set(done), progress=progress))
            timings["head_seconds"] = time.perf_counter() - t

    extra: dict[str, Any] = {"timings": timings} if timings else {}
    kv_rows = [r for r in rows if r.kind == "kv" and r.method == "kl"]
    if kv_rows:
        from bitplan.sensitivity._kvreduce import k_vs_v, reduce_kv

        extra["kv_reduction"] = reduce_kv(kv_rows, graph.num_kv_heads, graph.head_dim).to_dict()
        extra["k_vs_v"] = {str(k): v for k, v in k_vs_v(kv_rows).items()}
    table = SensitivityTable(rows, meta).with_extra(**extra)
    if output is not None:
        table.save(output)
        if store is not None:
            store.cleanup()
    return table
