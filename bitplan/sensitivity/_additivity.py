"""Does the search's additive proxy hold? Predicted (summed single-unit) KL vs measured KL of whole plans.

The search scores a plan by adding, over its choices, the harm of quantizing *only* that unit (one
row of the sensitivity table each). That is exact to first order when the units' errors are small and
independent, and wrong when they interact (errors that compound through later layers, or cancel). The
only way to know on a given model is to measure: draw random mixed plans spanning low to high harm,
apply each, measure its KL to the unquantized model, and compare with the sum.

What matters for the search is the *ranking* of plans (Spearman rho): a proxy that ranks right finds the
right plan even if its scale is off. The scale (ratio predicted/measured) matters for budgets stated
in KL and tells whether adding over- or under-estimates (interactions that compound vs. cancel).
"""

from __future__ import annotations

import copy
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from bitplan.formats import ActFormat, KVFormat, WeightFormat, parse_act, parse_kv, parse_weight
from bitplan.graph import ModelGraph, build_graph
from bitplan.plan import Granularity, LayerPlan, ModelRef, Plan, UnitChoice
from bitplan.sensitivity._calib import CalibData
from bitplan.sensitivity._rows import ScoreRow

__all__ = [
    "AdditivityReport", "MethodStats", "PlanRecord",
    "additivity_check", "mixed_plan", "predicted_kl", "random_mixed_plans",
]  # fmt: skip

_BF16 = UnitChoice(WeightFormat("float", 16))
# Spread of the option drawn around a plan's aggressiveness, as a fraction of the option ladder.
_DRAW_SIGMA = 0.25


def _graph(graph_or_model: Any) -> tuple[ModelGraph, str]:
    if isinstance(graph_or_model, ModelGraph):
        return graph_or_model, ""
    return build_graph(graph_or_model), str(getattr(graph_or_model, "name_or_path", "") or "")


def mixed_plan(
    graph_or_model: Any,
    *,
    weights: Mapping[str, UnitChoice] | None = None,
    acts: Mapping[int, ActFormat] | None = None,
    kv: Mapping[int, KVFormat] | None = None,
    granularity: Granularity = "fused",
    metadata: Mapping[str, Any] | None = None,
    name_or_path: str | None = None,
) -> Plan:
    """A validated plan: the given choices (full unit names, layer indices), everything else 16-bit.

    ``weights`` may name ``lm_head``, which goes to the plan's extras. Handy for single-unit plans (the
    rows of a sensitivity table) and for the random plans below.
    """
    graph, name = _graph(graph_or_model)
    weights = dict(weights or {})
    units = graph.unit_map(granularity, include_head=True)
    unknown = [u for u in weights if u not in units]
    if unknown:
        raise KeyError(f"unknown unit(s) at {granularity} granularity: {', '.join(unknown[:4])}")
    layers = []
    shapes = {u.name: (u.out_features, u.in_features) for u in graph.units(granularity)}
    for i in range(graph.num_layers):
        choices = {u.local: weights.get(u.name, _BF16) for u in graph.layer_units(i, granularity)}
        layers.append(LayerPlan(i, choices, (acts or {}).get(i, ActFormat()), (kv or {}).get(i, KVFormat())))
    head = weights.get("lm_head", _BF16)  # a 16-bit head stays out of the extras (no untying)
    extra = {"lm_head": head} if head.format.is_quantized else {}
    ref = ModelRef.from_graph(graph, name if name_or_path is None else name_or_path)
    return Plan(ref, tuple(layers), shapes, granularity, extra, dict(metadata or {})).validate(graph)


def _granularity(graph: ModelGraph, names: Iterable[str]) -> Granularity:
    """The granularity the weight rows were scored at (fused unless a row names a fused group's member)."""
    fused, tensor = set(graph.unit_map("fused")), set(graph.unit_map("tensor"))
    names = set(names) - {"lm_head"}
    if names - fused and not names - tensor:
        return "tensor"
    if names - fused - tensor:
        missing = ", ".join(sorted(names - fused - tensor)[:4])
        raise KeyError(f"rows name units the model does not have: {missing}")
    if names - fused:
        raise ValueError("rows mix fused-group and member unit names")
    return "fused"


Option = tuple[str, str, float]  # (format, quantizer, score to sort by)
Key = tuple[str, str, str, str]  # (unit, kind, format, quantizer) of a row
_REFERENCES = ("bf16", "fp16", "a16", "k16v16")


def _options(rows: Sequence[ScoreRow], methods: Sequence[str] | None) -> dict[tuple[str, str], list[Option]]:
    """``{(kind, unit): [(format, quantizer, sort score), ...]}`` sorted by harm (then name).

    With ``methods``, only options scored by each of them that scores their kind at all (so each method
    can predict every plan). The sort score is the kl score when present (measured), else another's.
    """
    by: dict[Key, dict[str, float]] = defaultdict(dict)
    covers = {(r.kind, r.method) for r in rows}
    for r in rows:
        by[(r.kind, r.unit, r.format, r.quantizer if r.kind == "weight" else "")][r.method] = r.score
    out: dict[tuple[str, str], list[Option]] = defaultdict(list)
    for (kind, unit, fmt, quant), scores in by.items():
        if fmt in _REFERENCES or not all(m in scores for m in methods or () if (kind, m) in covers):
            continue
        sort = scores.get("kl", scores[sorted(scores)[0]])
        out[(kind, unit)].append((fmt, quant, sort))
    return {k: sorted(v, key=lambda o: (o[2], o[0], o[1])) for k, v in sorted(out.items())}


def _pick(rng: np.random.Generator, ladder: list[Option], a: float) -> Option | None:
    """An option of ``[16-bit (None), least harmful, ..., most harmful]`` drawn near position ``a``."""
    if not ladder:
        return None
    pos = np.arange(len(ladder) + 1) / len(ladder)
    w = np.exp(-0.5 * ((pos - a) / _DRAW_SIGMA) ** 2)
    j = int(rng.choice(len(pos), p=w / w.sum()))
    return None if j == 0 else ladder[j - 1]


def random_mixed_plans(
    graph_or_model: Any,
    rows: Sequence[ScoreRow],
    n: int = 30,
    seed: int = 0,
    *,
    draw_acts: bool = False,
    methods: Sequence[str] | None = None,
) -> list[Plan]:
    """``n`` random plans mixing the per-unit weight options and per-layer KV pairs present in ``rows``.

    Each plan draws an aggressiveness ``a`` (stratified over [0, 1], so the plans span low to high total
    harm rather than all landing near the mean); every unit then picks from its ladder -- the 16-bit
    reference (bf16 / k16v16 / a16) followed by its scored options sorted by score -- an option near
    position ``a`` (Gaussian weights, sigma a quarter of the ladder). So 16-bit stays likely for mild
    plans and the most harmful options for harsh ones, while every plan still mixes. Activations stay
    a16 unless ``draw_acts``. Units without rows stay 16-bit. ``methods``: draw only options scored by
    all of these scoring methods (those that score the option's kind). Deterministic in ``seed``.
    """
    graph, name = _graph(graph_or_model)
    opts = _options(rows, methods)
    gran = _granularity(graph, (u for (k, u) in opts if k == "weight"))
    rng = np.random.default_rng(seed)
    aggr = (np.arange(n) + rng.random(n)) / max(n, 1)
    units = [u.name for u in graph.units(gran)] + (["lm_head"] if ("weight", "lm_head") in opts else [])
    layers = range(graph.num_layers)
    keys = [("weight", u) for u in units] + [("kv", f"layers.{i}.kv") for i in layers]
    keys += [("act", f"layers.{i}.acts") for i in layers] if draw_acts else []
    plans = []
    for i in range(n):
        a = float(aggr[i])
        got = {key: o for key in keys if (o := _pick(rng, opts.get(key, []), a)) is not None}  # None: 16-bit
        weights = {u: UnitChoice(parse_weight(o[0]), o[1]) for (k, u), o in got.items() if k == "weight"}
        kv = {int(u.split(".")[1]): parse_kv(o[0]) for (k, u), o in got.items() if k == "kv"}
        acts = {int(u.split(".")[1]): parse_act(o[0]) for (k, u), o in got.items() if k == "act"}
        meta = {"created_by": "random_mixed_plans", "seed": seed, "index": i, "aggressiveness": round(a, 4)}
        plans.append(mixed_plan(graph, weights=weights, acts=acts, kv=kv, granularity=gran, metadata=meta,
                                name_or_path=name))  # fmt: skip
    return plans


def _index(rows: Sequence[ScoreRow], method: str) -> dict[Key, float]:
    acc: dict[Key, list[float]] = defaultdict(list)
    for r in rows:
        if r.method == method:
            acc[(r.unit, r.kind, r.format, r.quantizer if r.kind == "weight" else "")].append(r.score)
    return {k: sum(v) / len(v) for k, v in acc.items()}


def predicted_kl(plan: Plan, rows: Sequence[ScoreRow] | Mapping[Key, float], method: str) -> float:
    """Sum of the ``method`` scores of the plan's quantized choices (weights, acts, KV); 16-bit ones add 0.

    Raises ``KeyError`` naming the unit and format of the first choice that has no row.
    """
    index = rows if isinstance(rows, Mapping) else _index(rows, method)
    total = 0.0
    for name, choice in plan.unit_choices():
        if choice.format.is_quantized:
            key = (name, "weight", str(choice.format), choice.method)
            if key not in index:
                raise KeyError(f"{name}: no {method} score for {choice.format}@{choice.method}")
            total += index[key]
    for layer in plan.layers:
        for kind, fmt in (("act", layer.acts), ("kv", layer.kv)):
            if fmt.is_quantized:
                unit = f"layers.{layer.index}.{'acts' if kind == 'act' else 'kv'}"
                key = (unit, kind, str(fmt), "")
                if key not in index:
                    raise KeyError(f"{unit}: no {method} score for {fmt}")
                total += index[key]
    return total


@dataclass
class PlanRecord:
    """One measured plan."""

    index: int
    aggressiveness: float
    predicted: dict[str, float]  # scoring method -> summed score (nats/token)
    measured: float  # mean KL to the unquantized model (nats/token)
    avg_bits: float  # parameter-weighted weight bits of the decision units
    kv_bytes: float  # KV bytes per token, all layers
    seconds: float = 0.0


@dataclass
class MethodStats:
    """Agreement of one scoring method's sums with the measurements (nan where undefined)."""

    method: str
    n: int  # plans compared (logs and relative errors use those with measured and predicted > 0)
    spearman: float
    pearson_log: float
    median_rel_err: float  # median |pred - meas| / meas
    mean_rel_err: float
    median_ratio: float  # median pred / meas: > 1 means adding over-estimates
    geomean_ratio: float


def _stats(method: str, pred: np.ndarray, meas: np.ndarray) -> MethodStats:
    from scipy.stats import pearsonr, spearmanr

    nan = math.nan
    varied = len(pred) > 2 and np.ptp(pred) > 0 and np.ptp(meas) > 0
    rho = float(spearmanr(pred, meas).statistic) if varied else nan
    pos = (pred > 0) & (meas > 0)
    lp, lm = np.log(pred[pos]), np.log(meas[pos])
    varied = pos.sum() > 2 and np.ptp(lp) > 0 and np.ptp(lm) > 0
    r_log = float(pearsonr(lp, lm).statistic) if varied else nan
    rel = np.abs(pred[meas > 0] - meas[meas > 0]) / meas[meas > 0]
    ratio = pred[pos] / meas[pos]

    def agg(f: Any, x: np.ndarray) -> float:
        return float(f(x)) if x.size else nan

    geo = agg(lambda r: np.exp(np.mean(np.log(r))), ratio)
    rel_med, rel_mean, ratio_med = agg(np.median, rel), agg(np.mean, rel), agg(np.median, ratio)
    return MethodStats(method, len(pred), rho, r_log, rel_med, rel_mean, ratio_med, geo)


@dataclass
class AdditivityReport:
    """Per-plan records and, per scoring method, how well the sums track the measurements."""

    records: list[PlanRecord]
    stats: dict[str, MethodStats]
    tokens: int  # predicted tokens behind each measurement
    window: int
    seed: int
    seconds: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (nan where a statistic is undefined)."""
        head = {"kind": "bitplan.additivity", "tokens": self.tokens, "window": self.window, "seed": self.seed}
        stats = {m: asdict(s) for m, s in self.stats.items()}
        return {**head, "seconds": round(self.seconds, 2), "stats": stats,
                "records": [asdict(r) for r in self.records], "metadata": dict(self.metadata)}  # fmt: skip

    def summary(self) -> str:
        lines = [f"additivity over {len(self.records)} plans ({self.tokens} tokens, window {self.window}):"]
        borrowed = self.metadata.get("borrowed", {})
        for m, s in self.stats.items():
            r = s.median_ratio
            name = m + "".join(f" ({k} from {d})" for k, d in borrowed.get(m, {}).items())
            trend = "over-estimates" if r > 1 else "under-estimates" if r < 1 else "is exact"
            lines.append(
                f"  {name}: spearman {s.spearman:.3f}, pearson(log) {s.pearson_log:.3f}, rel. error median "
                f"{s.median_rel_err:.1%} / mean {s.mean_rel_err:.1%}; sum/measured median "
                f"{s.median_ratio:.3f} (geo-mean {s.geomean_ratio:.3f}): adding {trend}"
            )
        meas = [r.measured for r in self.records]
        if meas:
            lines.append(f"  measured KL {min(meas):.3g} .. {max(meas):.3g} nats/token")
        return "\n".join(lines)


def additivity_check(
    model: Any,
    rows: Sequence[ScoreRow],
    calib_tokens: torch.Tensor | CalibData,
    *,
    n_plans: int = 30,
    seed: int = 0,
    methods: Sequence[str] = ("kl", "fisher"),
    window: int | None = None,
    draw_acts: bool = False,
    plans: Sequence[Plan] | None = None,
    progress: bool = True,
) -> AdditivityReport:
    """Measure ``n_plans`` random mixed plans and compare each with its summed scores, per method.

    ``calib_tokens``: ``[n, L]`` windows (``window`` defaults to ``L``) or :class:`CalibData`. Every plan
    is applied to a deep copy of ``model`` (left untouched); the unquantized log-probs are computed once.
    Only the ``methods`` present in ``rows`` are compared, and plans draw only options all of them scored.
    A method with no rows at all of some kind (Fisher profiles often score weights only) borrows that
    kind's scores from the first method in ``methods`` that has them -- what a search on such a table
    adds up -- and ``metadata["borrowed"]`` says so. ``plans`` replaces the random draw.
    """
    from tqdm.auto import tqdm

    from bitplan.apply import apply_plan
    from bitplan.eval import ReferenceLogProbs, evaluate

    start = time.perf_counter()
    windows = calib_tokens.windows if isinstance(calib_tokens, CalibData) else torch.as_tensor(calib_tokens)
    window = int(window or windows.shape[-1])
    tokens = windows.reshape(-1).long()
    present = [m for m in methods if any(r.method == m for r in rows)]
    if not present:
        have = ", ".join(sorted({r.method for r in rows}))
        raise ValueError(f"no rows scored by {', '.join(methods)} (the rows have: {have})")
    if plans is None:
        plans = random_mixed_plans(model, rows, n_plans, seed, draw_acts=draw_acts, methods=present)
    indexes = {m: _index(rows, m) for m in present}
    borrowed: dict[str, dict[str, str]] = {}
    for m in present:
        for kind in sorted({r.kind for r in rows} - {r.kind for r in rows if r.method == m}):
            donor = next((d for d in present if any(r.kind == kind and r.method == d for r in rows)), None)
            if donor is not None:
                indexes[m].update({k: v for k, v in indexes[donor].items() if k[1] == kind})
                borrowed.setdefault(m, {})[kind] = donor
    ref = ReferenceLogProbs(model, tokens, window, progress=False)
    records: list[PlanRecord] = []
    n_tokens = 0
    for i, plan in enumerate(tqdm(plans, desc="additivity", unit="plan", disable=not progress)):
        t0 = time.perf_counter()
        pred = {m: predicted_kl(plan, indexes[m], m) for m in present}
        qmodel = apply_plan(copy.deepcopy(model), plan, kernels="reference")
        res = evaluate(qmodel, tokens=tokens, max_tokens=tokens.numel(), window=window, reference=ref,
                       progress=False)  # fmt: skip
        del qmodel
        n_tokens, summ = res.tokens, plan.summary()
        aggr = float(plan.metadata.get("aggressiveness", math.nan))
        records.append(PlanRecord(i, aggr, pred, float(res.kl or 0.0), summ.avg_weight_bits,
                                  summ.kv_bytes_per_token, time.perf_counter() - t0))  # fmt: skip
    meas = np.array([r.measured for r in records])
    stats = {m: _stats(m, np.array([r.predicted[m] for r in records]), meas) for m in present}
    meta = {"borrowed": borrowed} if borrowed else {}
    return AdditivityReport(records, stats, n_tokens, window, seed, time.perf_counter() - start, meta)
