"""The search space: one Optuna parameter per decision, with options and scores from the sensitivity table.

A *decision* is what one Optuna parameter chooses: the weight format of one unit (``layers.7.mlp.down_proj``),
the activation format of one layer (``layers.7.acts``) or the K/V pair of one attention layer
(``layers.7.kv``; a cluster of layers tied by ``tie_clusters`` is one decision, ``layers.3-5.kv``). Values are
canonical format strings (``w4g64a``, ``w4g64a@hqq`` for a non-RTN method, ``a8t``, ``k4v2``) with the 16-bit
reference (``bf16`` / ``a16`` / ``k16v16``) always first, so the Optuna dashboard reads like a plan.

Why everything is a sum. Each option carries its proxy harm (the table's score: KL in nats/token when only
that choice is quantized), its stored bits, its weight bytes and its KV bytes per token. Every metric the
search constrains or minimises -- summed harm, average weight bits, memory, average KV bits, and (in the cost
models of :mod:`bitplan.search._cost`) decode latency -- is then a sum over decisions of one entry per chosen
option. So a trial's metrics cost one gather and a sum, and the proxy's exact optimum under any set of
budgets is a multiple-choice knapsack (:mod:`bitplan.search._knapsack`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np

from bitplan.errors import BitplanError
from bitplan.formats import parse_act, parse_kv, parse_weight
from bitplan.graph import Granularity, ModelGraph
from bitplan.plan import Plan, UnitChoice
from bitplan.sensitivity import SensitivityTable
from bitplan.sensitivity._additivity import mixed_plan
from bitplan.sensitivity._kvreduce import _ranges

__all__ = ["Decision", "Option", "ProxyMetrics", "SearchSpace"]

_log = logging.getLogger("bitplan")
Kind = Literal["weight", "head", "act", "kv"]
REFERENCE = {"weight": "bf16", "head": "bf16", "act": "a16", "kv": "k16v16"}
HEAD = "lm_head"


@dataclass(frozen=True)
class Option:
    """One value of a decision and everything the proxy adds up for it."""

    label: str  # the Optuna parameter value: canonical format, "@method" for weights not quantized by rtn
    score: float  # proxy harm, nats/token (0 for the 16-bit reference)
    # weight, head: exact stored bits of the decision's units (codes, scales, offsets); a quantized head tied
    # to the embedding counts twice (apply_plan packs the head and the embedding rows separately)
    storage_bits: float = 0.0
    kv_bytes_per_token: float = 0.0  # kv: steady-state bytes per token over the decision's layers
    nominal_bits: float = 16.0  # weight: bits per weight incl. scales; act: bits; kv: (K bits + V bits) / 2
    kv_fixed_bytes: float = 0.0  # kv: bytes per sequence on top of the per-token ones (16-bit sink tokens)


@dataclass(frozen=True)
class Decision:
    """One Optuna parameter: a unit's weight format, the output head's, a layer's act format or one (or tied)
    layers' KV pair. The head (kind ``head``, name ``lm_head``) counts in memory and latency but not in the
    average weight bits, which are over the decoder layers' units (llama.cpp's bits per decoder weight)."""

    name: str
    kind: Kind
    layers: tuple[int, ...]
    units: tuple[str, ...] = ()  # weight: the unit it decides (one)
    params: int = 0  # weight: parameters of the unit
    in_features: int = 0  # weight: the unit's inputs (group sizes are fitted to them)
    options: tuple[Option, ...] = ()

    @property
    def labels(self) -> list[str]:
        return [o.label for o in self.options]


@dataclass(frozen=True)
class ProxyMetrics:
    """What the additive proxy says of one choice of options (batch/context set by the space)."""

    quality: float  # summed harm, nats/token
    avg_weight_bits: float  # parameter-weighted over the decision units, scales included
    weight_bytes: float  # whole model: units as stored + everything else at 16 bits
    kv_bytes: float  # KV cache at the space's batch x context
    avg_kv_bits: float  # mean over layers of (K bits + V bits) / 2, scales excluded (KVTuner's convention)

    @property
    def memory_bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes


def _weight_label(fmt: str, method: str) -> str:
    return fmt if method in ("", "rtn") else f"{fmt}@{method}"


def _head_scores(table: SensitivityTable, method: str | None) -> dict[str, float]:
    """The head's option scores: its rows of the weights' method where the table has them, else measured."""
    rows = [r for r in table.rows if r.unit == HEAD and r.kind == "weight"]
    have = {r.method for r in rows}
    use = method if method in have else "kl"
    return {_weight_label(r.format, r.quantizer): max(0.0, r.score) for r in rows if r.method == use}


def _pick_method(table: SensitivityTable, kind: str, method: str | None) -> str:
    have = {r.method for r in table.rows if r.kind == kind}
    if method is not None:
        if have and method not in have:
            raise BitplanError(f"the sensitivity table has no {method} scores for {kind} (it has {', '.join(sorted(have))})")
        return method
    return "kl" if "kl" in have and kind == "kv" else ("fisher" if "fisher" in have else "kl")


@dataclass(frozen=True)
class SearchSpace:
    """Decisions over a model (see the module docstring); build with :meth:`from_table`."""

    graph: ModelGraph
    decisions: tuple[Decision, ...]
    granularity: Granularity = "fused"
    batch: int = 1
    context: int = 2048
    name_or_path: str = ""
    score_methods: dict[str, str] = field(default_factory=dict)
    _arrays: dict[str, list[np.ndarray]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:  # a fresh cache, also for dataclasses.replace(space, context=...)
        object.__setattr__(self, "_arrays", {})

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_table(
        cls,
        table: SensitivityTable,
        graph: ModelGraph,
        *,
        kinds: Sequence[str] = ("weight", "head", "act", "kv"),
        weights: Sequence[str] | None = None,
        acts: Sequence[str] | None = None,
        kv: Sequence[str] | None = None,
        prune_kv: bool = True,
        tie_clusters: bool = False,
        score_method: str | None = None,
        batch: int = 1,
        context: int = 2048,
        name_or_path: str = "",
    ) -> SearchSpace:
        """Every decision of ``graph`` with the options ``table`` scored (plus the 16-bit reference).

        ``weights`` / ``acts`` / ``kv``: keep only these labels (``w4g64a``, ``w3g64a@hqq``, ``a8t``, ``k4v2``).
        ``prune_kv``: offer only the KV pairs on each layer's error/bytes Pareto front (the table's
        ``kv_reduction``); ``tie_clusters``: one decision per cluster of alike layers. ``score_method``:
        ``fisher`` or ``kl`` for weights and acts (default: Fisher where the table has it); KV is measured.
        """
        table.check_model(graph.fingerprint)
        if batch < 1 or context < 1:
            raise BitplanError(f"--batch and --context must be at least 1, got {batch} and {context}")
        methods = {k: _pick_method(table, k, score_method if k != "kv" else None) for k in kinds if k != "head"}
        gran = cast(Granularity, table.meta.granularity)
        scores: dict[tuple[str, str, str], float] = {}
        head_scores = _head_scores(table, methods.get("weight")) if "head" in kinds else {}
        for r in table.rows:
            if r.kind in methods and r.method == methods[r.kind] and r.unit != HEAD:
                label = _weight_label(r.format, r.quantizer) if r.kind == "weight" else r.format
                scores[(r.kind, r.unit, label)] = max(0.0, r.score)
        keep = {"weight": _labels(weights, "weight"), "act": _labels(acts, "act"), "kv": _labels(kv, "kv")}
        # A weight option is fitted to each unit as the profiler fitted it (w3g128a is scored as w3g96a on
        # 576-wide units), so the filter is fitted per unit too.
        units = graph.units(gran) if "weight" in kinds else []
        fitted_keep = {u.in_features: {_fit_label(w, u.in_features) for w in keep["weight"]} for u in units}
        for kind, wanted in keep.items():
            if wanted and kind in kinds:
                if kind == "weight":
                    have = {w for w in wanted for u in units if ("weight", u.name, _fit_label(w, u.in_features)) in scores}
                else:
                    have = {lab for (k, _, lab) in scores if k == kind}
                missing = sorted(wanted - have - {REFERENCE[kind]})
                if missing:
                    raise BitplanError(f"the sensitivity table has no scores for {kind} option(s) {', '.join(missing)}")

        def allowed(kind: str, label: str, in_features: int = 0) -> bool:
            if not keep[kind]:
                return True
            if kind == "weight" and in_features not in fitted_keep:
                fitted_keep[in_features] = {_fit_label(w, in_features) for w in keep["weight"]}
            return label in (fitted_keep[in_features] if kind == "weight" else keep[kind])

        decisions: list[Decision] = []
        hd, nkv = graph.head_dim, graph.num_kv_heads
        if "weight" in kinds:
            for u in graph.units(gran):
                opts = [Option("bf16", 0.0, 16.0 * u.numel, 0.0, 16.0)]
                for (k, unit, label), s in sorted(scores.items()):
                    if k == "weight" and unit == u.name and allowed("weight", label, u.in_features):
                        fmt = parse_weight(label.partition("@")[0])
                        bits = float(fmt.storage_bits(u.out_features, u.in_features))
                        opts.append(Option(label, s, bits, 0.0, bits / u.numel))
                opts[1:] = sorted(opts[1:], key=lambda o: (-o.storage_bits, o.score, o.label))
                decisions.append(
                    Decision(u.name, "weight", (int(u.layer or 0),), (u.name,), u.numel, u.in_features, tuple(opts))
                )
        head = graph.lm_head
        if head_scores and head is not None:
            copies = 2 if graph.tied_embeddings else 1
            opts = [Option("bf16", 0.0, 16.0 * head.numel, 0.0, 16.0)]
            for label, sc in sorted(head_scores.items()):
                if allowed("weight", label, head.in_features):
                    bits = float(parse_weight(label.partition("@")[0]).storage_bits(head.out_features, head.in_features))
                    opts.append(Option(label, sc, copies * bits, 0.0, bits / head.numel))
            opts[1:] = sorted(opts[1:], key=lambda o: (-o.storage_bits, o.score, o.label))
            decisions.append(Decision(HEAD, "head", (), (HEAD,), head.numel, head.in_features, tuple(opts)))
        if "act" in kinds:
            for i in range(graph.num_layers):
                unit = f"layers.{i}.acts"
                opts = [Option("a16", 0.0)]
                for (k, un, label), s in sorted(scores.items()):
                    if k == "act" and un == unit and allowed("act", label):
                        opts.append(Option(label, s, nominal_bits=float(parse_act(label).bits)))
                decisions.append(Decision(unit, "act", (i,), options=tuple(sorted(opts, key=lambda o: -o.nominal_bits))))
        if "kv" in kinds:
            kept = table.meta.extra.get("kv_reduction", {}).get("kept", {}) if prune_kv else {}
            per_layer: dict[int, dict[str, float]] = {}
            for i in range(graph.num_layers):
                unit = f"layers.{i}.kv"
                ok = set(kept.get(str(i), [])) if kept else None
                per_layer[i] = {
                    label: s for (k, un, label), s in scores.items()
                    if k == "kv" and un == unit and allowed("kv", label) and (ok is None or label in ok)
                }  # fmt: skip
            groups = _kv_groups(table, graph.num_layers, tie_clusters)
            for layers in groups:
                labels = set().union(*(set(per_layer[i]) for i in layers))
                if len(layers) > 1:  # a tied decision offers a pair kept in any of its layers and scored in all
                    for i in layers:
                        labels &= {lab for (k, un, lab) in scores if k == "kv" and un == f"layers.{i}.kv"}
                opts = [Option("k16v16", 0.0, 0.0, len(layers) * parse_kv("k16v16").bytes_per_token(nkv, hd), 16.0)]
                for label in labels:
                    kvf = parse_kv(label)
                    s = sum(scores[("kv", f"layers.{i}.kv", label)] for i in layers)
                    opts.append(Option(label, s, 0.0, len(layers) * kvf.bytes_per_token(nkv, hd), (kvf.k_bits + kvf.v_bits) / 2,
                                       len(layers) * kvf.fixed_bytes(nkv, hd)))
                opts[1:] = sorted(opts[1:], key=lambda o: (-o.kv_bytes_per_token, o.score, o.label))
                name = f"layers.{_ranges(layers)}.kv"
                decisions.append(Decision(name, "kv", tuple(layers), options=tuple(opts)))
        # A decision with only its 16-bit option decides nothing: leave it out (it stays 16-bit in every plan,
        # and the metrics count undecided units and layers at 16 bits).
        decisions = [d for d in decisions if len(d.options) > 1]
        if not decisions:
            raise BitplanError("the search space is empty: the sensitivity table scores no option for these kinds")
        return cls(graph, tuple(decisions), gran, batch, context, name_or_path, methods)

    # -- vectors the proxy sums ---------------------------------------------------------------------
    def arrays(self, name: str) -> list[np.ndarray]:
        """Per decision, one value per option: ``score``, ``storage_bits`` (weights and head), ``unit_bits``
        (decoder-layer weights only: the average-bits budget), ``kv_bytes``, ``kv_bits``."""
        if name not in self._arrays:
            get = {
                "score": lambda d, o: o.score,
                "storage_bits": lambda d, o: o.storage_bits,
                "unit_bits": lambda d, o: o.storage_bits if d.kind == "weight" else 0.0,
                "kv_bytes": lambda d, o: (o.kv_bytes_per_token * self.context + o.kv_fixed_bytes) * self.batch,
                "kv_bits": lambda d, o: o.nominal_bits * len(d.layers) if d.kind == "kv" else 0.0,
            }[name]
            self._arrays[name] = [np.array([get(d, o) for o in d.options], dtype=np.float64) for d in self.decisions]
        return self._arrays[name]

    @property
    def unit_params(self) -> int:
        return sum(u.numel for u in self.graph.units(self.granularity))

    @property
    def fixed_weight_bytes(self) -> float:
        """Bytes of everything that is not a decision: 16-bit units left out of the space, embeddings, norms.

        A decided head takes its tensor out (a tied embedding shares it: the head decision's options count it)."""
        decided = sum(d.params for d in self.decisions if d.kind in ("weight", "head"))
        return 2.0 * (self.graph.total_params - decided)

    @property
    def kv_layers_decided(self) -> set[int]:
        return {i for d in self.decisions if d.kind == "kv" for i in d.layers}

    def fixed_kv_bytes(self) -> float:
        """KV bytes of attention layers without a KV decision (kept 16-bit), at batch x context."""
        n = self.graph.num_layers - len(self.kv_layers_decided)
        per = parse_kv("k16v16").bytes_per_token(self.graph.num_kv_heads, self.graph.head_dim)
        return n * per * self.batch * self.context

    def total(self, name: str, index: Sequence[int]) -> float:
        return float(sum(a[j] for a, j in zip(self.arrays(name), index, strict=True)))

    def metrics(self, index: Sequence[int]) -> ProxyMetrics:
        """The proxy's metrics of the choice ``index`` (one option index per decision)."""
        bits = self.total("storage_bits", index)
        undecided = self.unit_params - sum(d.params for d in self.decisions if d.kind == "weight")
        unit_bits = self.total("unit_bits", index) + 16.0 * undecided
        n_layers = self.graph.num_layers
        kv_bits = self.total("kv_bits", index) + 16.0 * (n_layers - len(self.kv_layers_decided))
        return ProxyMetrics(
            quality=self.total("score", index),
            avg_weight_bits=unit_bits / self.unit_params if self.unit_params else 16.0,
            weight_bytes=math.floor(bits / 8) + self.fixed_weight_bytes,
            kv_bytes=self.total("kv_bytes", index) + self.fixed_kv_bytes(),
            avg_kv_bits=kv_bits / n_layers if n_layers else 16.0,
        )

    # -- labels, indices, plans ---------------------------------------------------------------------
    def labels(self, index: Sequence[int]) -> dict[str, str]:
        return {d.name: d.options[j].label for d, j in zip(self.decisions, index, strict=True)}

    def index(self, labels: Mapping[str, str]) -> list[int]:
        """Option indices from ``{decision name: label}`` (missing decisions: the 16-bit reference)."""
        out = []
        for d in self.decisions:
            label = labels.get(d.name, d.options[0].label)
            if label not in d.labels:
                raise BitplanError(f"{d.name}: {label!r} is not an option (options: {', '.join(d.labels)})")
            out.append(d.labels.index(label))
        return out

    def uniform(self, weight: str | None = None, act: str | None = None, kv: str | None = None) -> list[int] | None:
        """One label for every decision of a kind (``None``: 16-bit); ``None`` if some decision lacks it.

        A weight label's group is fitted to each unit as the profiler fitted it (``w4g64a`` on 576 inputs is
        ``w4g96a`` there, see :meth:`WeightFormat.fit_group`)."""
        want = {"weight": weight or "bf16", "head": "bf16", "act": act or "a16", "kv": kv or "k16v16"}
        out = []
        for d in self.decisions:
            label = want[d.kind]
            if d.kind == "weight" and label != "bf16":
                fmt, _, method = label.partition("@")
                label = _weight_label(str(parse_weight(fmt).fit_group(d.in_features)), method)
            if label not in d.labels:
                return None
            out.append(d.labels.index(label))
        return out

    def to_plan(self, index: Sequence[int] | Mapping[str, str], metadata: Mapping[str, Any] | None = None) -> Plan:
        """The validated plan of a choice (indices or ``{decision: label}``)."""
        idx = self.index(index) if isinstance(index, Mapping) else list(index)
        weights: dict[str, UnitChoice] = {}
        acts: dict[int, Any] = {}
        kvs: dict[int, Any] = {}
        for d, j in zip(self.decisions, idx, strict=True):
            label = d.options[j].label
            if d.kind in ("weight", "head"):
                fmt, _, method = label.partition("@")
                weights[d.units[0]] = UnitChoice(parse_weight(fmt), method or "rtn")
            elif d.kind == "act":
                acts[d.layers[0]] = parse_act(label)
            else:
                kvs.update({i: parse_kv(label) for i in d.layers})
        return mixed_plan(self.graph, weights=weights, acts=acts, kv=kvs, granularity=self.granularity,
                          metadata=metadata, name_or_path=self.name_or_path)  # fmt: skip

    def calibrated_methods(self) -> list[str]:
        """The weight methods among the options that need calibration data to apply (``gptq``, ``awq``...)."""
        from bitplan.quantizers import get_weight_quantizer

        methods = {o.label.partition("@")[2] for d in self.decisions if d.kind in ("weight", "head") for o in d.options}
        return sorted(m for m in methods if m and get_weight_quantizer(m).needs_calibration)

    def describe(self) -> str:
        by = {k: [d for d in self.decisions if d.kind == k] for k in ("weight", "head", "act", "kv")}
        size = sum(math.log10(len(d.options)) for d in self.decisions)
        parts = [f"{len(v)} {k} decisions ({sum(len(d.options) for d in v) / max(len(v), 1):.1f} options each)"
                 for k, v in by.items() if v]  # fmt: skip
        return f"search space: {'; '.join(parts)}; 10^{size:.0f} plans; scores: " + ", ".join(
            f"{k} {m}" for k, m in self.score_methods.items()
        )


def _fit_label(label: str, in_features: int) -> str:
    """A weight label with its format fitted to a unit's inputs (``w3g128a@hqq`` -> ``w3g96a@hqq`` on 576)."""
    fmt, _, method = label.partition("@")
    return _weight_label(str(parse_weight(fmt).fit_group(in_features)), method)


def _labels(items: Sequence[str] | None, kind: str) -> set[str]:
    if not items:
        return set()
    out = set()
    for s in items:
        if kind == "weight":
            fmt, _, method = s.partition("@")
            out.add(_weight_label(str(parse_weight(fmt)), method))
        else:
            out.add(str(parse_act(s) if kind == "act" else parse_kv(s)))
    return out


def _kv_groups(table: SensitivityTable, num_layers: int, tie: bool) -> list[tuple[int, ...]]:
    if not tie:
        return [(i,) for i in range(num_layers)]
    clusters = table.meta.extra.get("kv_reduction", {}).get("clusters")
    if not clusters:
        raise BitplanError("--tie-clusters needs a sensitivity table with KV rows (it has no KV clusters)")
    seen = {i for c in clusters for i in c}
    return sorted([tuple(sorted(int(i) for i in c)) for c in clusters] + [(i,) for i in range(num_layers) if i not in seen])
