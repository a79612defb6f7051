"""Plans: which format every decision unit, activation and KV cache of a model gets.

A plan is a value passed between stages (uniform/search -> apply -> export) and saved as versioned
JSON. It carries enough of the model (fingerprint, unit shapes, head geometry, parameter count) to
compute its own memory summary without loading the model, and to refuse being applied to another one.

Layout of the JSON (schema_version 1)::

    {"kind": "bitplan.plan", "schema_version": 1,
     "model": {"name_or_path", "fingerprint", "architecture", "num_layers", "num_kv_heads",
               "head_dim", "total_params", "tied_embeddings", "layers_path", "head_path"},
     "granularity": "fused" | "tensor",
     "layers": [{"index": 0, "acts": "a16", "kv": "k8v8",
                 "weights": {"self_attn.qkv_proj": {"format": "w4g64a", "method": "rtn", "shape": [960, 576]}, ...}},
                ...],
     "extra": {"lm_head": {...}},            # optional; units outside the decoder layers
     "metadata": {...}}                      # free-form: provenance, notes, predicted metrics

Weight entries may also be written as a bare format string (method defaults to ``rtn``). A plan made at
``fused`` granularity may name the members of a fused group instead of the group, as long as they all
agree -- :meth:`Plan.validate` folds them into the group and rejects a group with mixed formats.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from bitplan._io import atomic_write_json
from bitplan.errors import FormatError, PlanError
from bitplan.formats import ActFormat, KVFormat, WeightFormat, parse_act, parse_kv, parse_weight

if TYPE_CHECKING:
    from bitplan.graph import ModelGraph

__all__ = ["SCHEMA_VERSION", "LayerPlan", "ModelRef", "Plan", "PlanSummary", "UnitChoice"]

SCHEMA_VERSION = 1
PLAN_KIND = "bitplan.plan"
DEFAULT_METHOD = "rtn"
Granularity = Literal["fused", "tensor"]
_GRANULARITIES = ("fused", "tensor")


@dataclass(frozen=True)
class UnitChoice:
    """What one decision unit gets: a weight format and the quantizer method that produces it."""

    format: WeightFormat
    method: str = DEFAULT_METHOD

    def __str__(self) -> str:
        return str(self.format) if self.method == DEFAULT_METHOD else f"{self.format}@{self.method}"


@dataclass(frozen=True)
class LayerPlan:
    index: int
    weights: Mapping[str, UnitChoice]  # local unit name -> choice
    acts: ActFormat = ActFormat()
    kv: KVFormat = KVFormat()


@dataclass(frozen=True)
class ModelRef:
    """What a plan knows of its model."""

    name_or_path: str
    fingerprint: str
    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    total_params: int
    tied_embeddings: bool = False
    layers_path: str = ""  # the decoder layers' module path ("model.layers"); exporters name modules with it
    head_path: str = ""  # the output projection's module path ("lm_head", GPT-NeoX "embed_out")

    @classmethod
    def from_graph(cls, graph: ModelGraph, name_or_path: str = "") -> ModelRef:
        return cls(
            name_or_path=name_or_path,
            fingerprint=graph.fingerprint,
            architecture=graph.architecture,
            num_layers=graph.num_layers,
            num_kv_heads=graph.num_kv_heads,
            head_dim=graph.head_dim,
            total_params=graph.total_params,
            tied_embeddings=graph.tied_embeddings,
            layers_path=graph.layers_path,
            head_path=graph.lm_head.path if graph.lm_head is not None else "",
        )


@dataclass(frozen=True)
class PlanSummary:
    avg_weight_bits: float  # parameter-weighted over all decision units, scale/offset overhead included
    unit_params: int  # parameters in decision units
    unit_weight_bytes: int  # bytes of those units as stored (packed or 16-bit)
    weight_bytes: int  # whole model: units as stored + every other parameter at 16 bits
    kv_bytes_per_token: float  # steady state, all layers, K and V, batch 1
    weight_formats: dict[str, int]  # format string -> parameters stored in it
    act_formats: dict[str, int]  # format string -> layers
    kv_formats: dict[str, int]  # format string -> layers
    kv_fixed_bytes: float = 0.0  # per sequence on top of kv_bytes_per_token * tokens: 16-bit sink tokens

    def kv_bytes(self, tokens: int, batch: int = 1) -> float:
        """KV cache bytes at ``batch`` sequences of ``tokens`` tokens (steady state: sinks included, the
        16-bit tokens of a filling group or recent window excluded)."""
        return batch * (self.kv_bytes_per_token * tokens + (self.kv_fixed_bytes if tokens > 0 else 0.0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "avg_weight_bits": round(self.avg_weight_bits, 4),
            "unit_params": self.unit_params,
            "unit_weight_bytes": self.unit_weight_bytes,
            "weight_bytes": self.weight_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "weight_formats": self.weight_formats,
            "act_formats": self.act_formats,
            "kv_formats": self.kv_formats,
            "kv_fixed_bytes": self.kv_fixed_bytes,
        }

    def __str__(self) -> str:
        fmts = ", ".join(f"{k} {v / self.unit_params:.0%}" for k, v in self.weight_formats.items())
        return (
            f"avg weight bits {self.avg_weight_bits:.3f} ({fmts}); weight bytes {self.weight_bytes / 1e6:.2f} MB "
            f"(units {self.unit_weight_bytes / 1e6:.2f} MB); KV {self.kv_bytes_per_token / 1024:.2f} KiB/token"
        )


@dataclass(frozen=True)
class Plan:
    model: ModelRef
    layers: tuple[LayerPlan, ...]
    shapes: Mapping[str, tuple[int, int]]  # full unit name -> (out_features, in_features)
    granularity: Granularity = "fused"
    extra: Mapping[str, UnitChoice] = field(default_factory=dict)  # e.g. {"lm_head": ...}
    metadata: Mapping[str, Any] = field(default_factory=dict)

    # -- access ---------------------------------------------------------------------------------
    def unit_choices(self) -> Iterator[tuple[str, UnitChoice]]:
        """(full unit name, choice) for every decision unit, in model order, then the extras."""
        for layer in self.layers:
            for local, choice in layer.weights.items():
                yield f"layers.{layer.index}.{local}", choice
        yield from self.extra.items()

    def choice(self, unit: str) -> UnitChoice:
        for name, c in self.unit_choices():
            if name == unit:
                return c
        raise KeyError(unit)

    def kv_formats(self) -> list[KVFormat]:
        return [layer.kv for layer in self.layers]

    def act_formats(self) -> list[ActFormat]:
        return [layer.acts for layer in self.layers]

    def with_metadata(self, **items: Any) -> Plan:
        return replace(self, metadata={**self.metadata, **items})

    # -- summary --------------------------------------------------------------------------------
    def summary(self) -> PlanSummary:
        decoder_params = head_params = unit_bits = 0
        by_fmt: Counter[str] = Counter()
        for name, choice in self.unit_choices():
            out_f, in_f = self.shapes[name]
            unit_bits += choice.format.storage_bits(out_f, in_f)
            by_fmt[str(choice.format)] += out_f * in_f
            if name in self.extra:
                head_params += out_f * in_f
            else:
                decoder_params += out_f * in_f
        # Everything that is not a unit stays 16-bit. A tied head shares its parameters with the embedding
        # (counted once in total_params): quantizing it quantizes the embedding to the same format, held
        # as a second packed copy (the head's in its kernel layout, the embedding's as gatherable rows).
        other = self.model.total_params - decoder_params - head_params
        if self.model.tied_embeddings:
            unit_bits_held = unit_bits + sum(
                c.format.storage_bits(*self.shapes[n]) for n, c in self.extra.items() if c.format.is_quantized
            )
        else:
            unit_bits_held = unit_bits
        unit_params = decoder_params + head_params
        kv = sum(layer.kv.bytes_per_token(self.model.num_kv_heads, self.model.head_dim) for layer in self.layers)
        kv_fixed = sum(layer.kv.fixed_bytes(self.model.num_kv_heads, self.model.head_dim) for layer in self.layers)
        return PlanSummary(
            avg_weight_bits=unit_bits / unit_params if unit_params else 16.0,
            unit_params=unit_params,
            unit_weight_bytes=unit_bits // 8,
            weight_bytes=unit_bits_held // 8 + 2 * other,
            kv_bytes_per_token=kv,
            weight_formats=dict(by_fmt.most_common()),
            act_formats=dict(Counter(str(layer.acts) for layer in self.layers).most_common()),
            kv_formats=dict(Counter(str(layer.kv) for layer in self.layers).most_common()),
            kv_fixed_bytes=kv_fixed,
        )

    # -- validation against a model -------------------------------------------------------------
    def validate(self, graph: ModelGraph) -> Plan:
        """Check this plan against a model and return it normalised (fused members folded into groups).

        Raises :class:`PlanError` for: another model (fingerprint), a wrong number of layers, unknown or
        missing units, a fused group with mixed formats, formats that do not fit a unit's shape or the
        head geometry, unknown quantizer methods.
        """
        from bitplan.quantizers import WEIGHT_QUANTIZERS, get_weight_quantizer

        if self.model.fingerprint != graph.fingerprint:
            raise PlanError(
                f"plan was made for another model: {self.model.architecture} '{self.model.name_or_path}' "
                f"(fingerprint {self.model.fingerprint}), this is {graph.architecture} (fingerprint {graph.fingerprint})"
            )
        if len(self.layers) != graph.num_layers:
            raise PlanError(f"plan has {len(self.layers)} layers, the model has {graph.num_layers}")
        units = graph.unit_map(self.granularity)
        group_of: dict[str, str] = {}  # fused plans: member's full name -> its group's full name
        if self.granularity == "fused":
            for info in graph.layers:
                for fused_local, member_locals in info.fused_groups:
                    for m in member_locals:
                        group_of[f"layers.{info.index}.{m}"] = f"layers.{info.index}.{fused_local}"
        new_layers = []
        shapes: dict[str, tuple[int, int]] = {}
        for layer in self.layers:
            folded: dict[str, UnitChoice] = {}
            by_group: dict[str, dict[str, UnitChoice]] = {}
            for local, choice in layer.weights.items():
                full = f"layers.{layer.index}.{local}"
                if full in group_of:
                    by_group.setdefault(group_of[full], {})[local] = choice
                elif full in units:
                    folded[local] = choice
                else:
                    raise PlanError(f"unknown unit {full!r} for {graph.architecture} at {self.granularity} granularity")
            for gname, chosen in by_group.items():
                expected = [m.local for m in units[gname].members]
                missing = [m for m in expected if m not in chosen]
                if len(set(chosen.values())) > 1:
                    mix = ", ".join(f"{m.rsplit('.', 1)[-1]}={c}" for m, c in chosen.items())
                    raise PlanError(f"fused group {gname} has mixed formats ({mix}); a fused plan needs one format per group")
                if missing:
                    raise PlanError(f"fused group {gname} names only some members; missing {', '.join(missing)}")
                if gname.split(".", 2)[2] in folded:
                    raise PlanError(f"fused group {gname} is named both as a group and by its members")
                folded[gname.split(".", 2)[2]] = next(iter(chosen.values()))
            expected_units = graph.layer_units(layer.index, self.granularity)
            missing_units = [u.name for u in expected_units if u.local not in folded]
            if missing_units:
                raise PlanError(f"plan has no format for unit(s) {', '.join(missing_units[:4])}" + (" ..." if len(missing_units) > 4 else ""))
            ordered = {u.local: folded[u.local] for u in expected_units}
            for u in expected_units:
                shapes[u.name] = (u.out_features, u.in_features)
            new_layers.append(replace(layer, weights=ordered))
            try:
                layer.kv.check_applicable(graph.head_dim)
            except FormatError as e:
                raise PlanError(f"layers.{layer.index}.kv: {e}") from None
        extra = dict(self.extra)
        for name in extra:
            head = graph.head_unit()
            if name != "lm_head" or head is None:
                raise PlanError(f"unknown extra unit {name!r}; only 'lm_head' can be named outside the decoder layers")
            shapes[name] = (head.out_features, head.in_features)
        for name, choice in [*((f"layers.{lp.index}.{k}", c) for lp in new_layers for k, c in lp.weights.items()), *extra.items()]:
            out_f, in_f = shapes[name]
            try:
                choice.format.check_applicable(in_f)
            except FormatError as e:
                raise PlanError(f"{name}: {e}") from None
            if choice.method not in WEIGHT_QUANTIZERS:
                raise PlanError(f"{name}: unknown method {choice.method!r}; registered: {', '.join(WEIGHT_QUANTIZERS.names())}")
            if choice.format.is_quantized and not get_weight_quantizer(choice.method).supports(choice.format):
                raise PlanError(f"{name}: method {choice.method!r} does not support {choice.format}")
        model = self.model
        if not model.layers_path:  # a plan saved before module paths were recorded
            model = replace(model, layers_path=graph.layers_path, head_path=graph.lm_head.path if graph.lm_head else "")
        return replace(self, model=model, layers=tuple(new_layers), shapes=shapes, extra=extra)

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def unit(name: str, c: UnitChoice) -> dict[str, Any]:
            d: dict[str, Any] = {"format": str(c.format), "method": c.method}
            if name in self.shapes:
                d["shape"] = list(self.shapes[name])
            return d

        return {
            "kind": PLAN_KIND,
            "schema_version": SCHEMA_VERSION,
            "model": {
                "name_or_path": self.model.name_or_path,
                "fingerprint": self.model.fingerprint,
                "architecture": self.model.architecture,
                "num_layers": self.model.num_layers,
                "num_kv_heads": self.model.num_kv_heads,
                "head_dim": self.model.head_dim,
                "total_params": self.model.total_params,
                "tied_embeddings": self.model.tied_embeddings,
                **({"layers_path": self.model.layers_path} if self.model.layers_path else {}),
                **({"head_path": self.model.head_path} if self.model.head_path else {}),
            },
            "granularity": self.granularity,
            "layers": [
                {
                    "index": lp.index,
                    "acts": str(lp.acts),
                    "kv": str(lp.kv),
                    "weights": {k: unit(f"layers.{lp.index}.{k}", c) for k, c in lp.weights.items()},
                }
                for lp in self.layers
            ],
            "extra": {k: unit(k, c) for k, c in self.extra.items()},
            "summary": self.summary().to_dict() if self._shapes_complete() else None,
            "metadata": dict(self.metadata),
        }

    def _shapes_complete(self) -> bool:
        return all(name in self.shapes for name, _ in self.unit_choices())

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PlanError(f"{p}: plan file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise PlanError(f"{p}: cannot read plan file: {e}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"{p}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        return cls.from_dict(data, source=str(p))

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> Plan:
        return _parse_plan(data, source)


# -- parsing ------------------------------------------------------------------------------------
def _need(obj: Any, key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise PlanError(f"{where}: missing key {key!r}")
    val = obj[key]
    if not isinstance(val, typ) or (isinstance(val, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,))):
        names = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
        raise PlanError(f"{where}.{key}: expected {names}, got {type(val).__name__}")
    return val


def _parse_choice(raw: Any, where: str) -> tuple[UnitChoice, tuple[int, int] | None]:
    if isinstance(raw, str):
        raw = {"format": raw}
    if not isinstance(raw, dict):
        raise PlanError(f"{where}: expected a format string or an object with 'format', got {type(raw).__name__}")
    unknown = set(raw) - {"format", "method", "shape"}
    if unknown:
        raise PlanError(f"{where}: unknown key(s) {', '.join(repr(k) for k in sorted(unknown))}")
    fmt_text = _need(raw, "format", str, where)
    method = raw.get("method", DEFAULT_METHOD)
    if not isinstance(method, str) or not method:
        raise PlanError(f"{where}.method: expected a method name")
    try:
        fmt = parse_weight(fmt_text)
    except FormatError as e:
        raise PlanError(f"{where}.format: {e}") from None
    shape = raw.get("shape")
    if shape is not None:
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in shape)):
            raise PlanError(f"{where}.shape: expected [out_features, in_features], got {shape!r}")
        shape = (shape[0], shape[1])
    return UnitChoice(fmt, method), shape


def _parse_plan(data: Any, source: str) -> Plan:
    if not isinstance(data, dict):
        raise PlanError(f"{source}: a plan is a JSON object, got {type(data).__name__}")
    kind = data.get("kind")
    if kind != PLAN_KIND:
        raise PlanError(f"{source}: not a bitplan plan (kind is {kind!r}, expected {PLAN_KIND!r})")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise PlanError(f"{source}: unsupported plan schema_version {version!r}; this bitplan reads version {SCHEMA_VERSION}")
    m = _need(data, "model", dict, source)
    where = f"{source}: model"
    model = ModelRef(
        name_or_path=m.get("name_or_path", "") if isinstance(m.get("name_or_path", ""), str) else "",
        fingerprint=_need(m, "fingerprint", str, where),
        architecture=_need(m, "architecture", str, where),
        num_layers=_need(m, "num_layers", int, where),
        num_kv_heads=_need(m, "num_kv_heads", int, where),
        head_dim=_need(m, "head_dim", int, where),
        total_params=_need(m, "total_params", int, where),
        tied_embeddings=bool(m.get("tied_embeddings", False)),
        layers_path=m.get("layers_path", "") if isinstance(m.get("layers_path", ""), str) else "",
        head_path=m.get("head_path", "") if isinstance(m.get("head_path", ""), str) else "",
    )
    gran = data.get("granularity", "fused")
    if gran not in _GRANULARITIES:
        raise PlanError(f"{source}: granularity must be 'fused' or 'tensor', got {gran!r}")
    raw_layers = _need(data, "layers", list, source)
    layers: list[LayerPlan] = []
    shapes: dict[str, tuple[int, int]] = {}
    for i, raw in enumerate(raw_layers):
        where = f"{source}: layers[{i}]"
        if not isinstance(raw, dict):
            raise PlanError(f"{where}: expected an object, got {type(raw).__name__}")
        index = raw.get("index", i)
        if index != i:
            raise PlanError(f"{where}: index {index!r} out of order (expected {i})")
        try:
            acts = parse_act(raw.get("acts", "a16"))
            kv = parse_kv(raw.get("kv", "k16v16"))
        except FormatError as e:
            raise PlanError(f"{where}: {e}") from None
        weights: dict[str, UnitChoice] = {}
        for local, rc in _need(raw, "weights", dict, where).items():
            choice, shape = _parse_choice(rc, f"{where}.weights[{local!r}]")
            weights[local] = choice
            if shape:
                shapes[f"layers.{i}.{local}"] = shape
        layers.append(LayerPlan(i, weights, acts, kv))
    if len(layers) != model.num_layers:
        raise PlanError(f"{source}: plan lists {len(layers)} layers but its model has {model.num_layers}")
    extra: dict[str, UnitChoice] = {}
    raw_extra = data.get("extra") or {}
    if not isinstance(raw_extra, dict):
        raise PlanError(f"{source}: extra: expected an object")
    for name, rc in raw_extra.items():
        choice, shape = _parse_choice(rc, f"{source}: extra[{name!r}]")
        extra[name] = choice
        if shape:
            shapes[name] = shape
    meta = data.get("metadata") or {}
    if not isinstance(meta, dict):
        raise PlanError(f"{source}: metadata: expected an object")
    return Plan(model=model, layers=tuple(layers), shapes=shapes, granularity=gran, extra=extra, metadata=meta)


# -- construction -------------------------------------------------------------------------------
def uniform_plan(
    model: Any,
    weights: str | WeightFormat = "w4g64a",
    acts: str | ActFormat = "a16",
    kv: str | KVFormat = "k16v16",
    *,
    method: str = DEFAULT_METHOD,
    granularity: Granularity = "fused",
    name_or_path: str | None = None,
    head: str | WeightFormat | None = None,
) -> Plan:
    """One format for every decision unit, activation and KV layer of ``model`` (a module or a ModelGraph).

    ``head``: a format for ``lm_head`` too (by default it stays 16-bit); on a model with tied embeddings
    the embedding table gets the same format.

    A group size that does not divide a unit's input features is replaced, for that unit, by the
    largest multiple of 8 below it that does (the main model's 576-wide inputs turn ``g128`` into ``g96``);
    each such change is recorded in ``metadata["notes"]`` and reported on stderr.
    """
    import logging

    from bitplan.graph import ModelGraph, build_graph

    graph = model if isinstance(model, ModelGraph) else build_graph(model)
    if name_or_path is None:
        name_or_path = "" if isinstance(model, ModelGraph) else str(getattr(model, "name_or_path", "") or "")
    if granularity not in _GRANULARITIES:
        raise PlanError(f"granularity must be 'fused' or 'tensor', got {granularity!r}")
    w = weights if isinstance(weights, WeightFormat) else parse_weight(weights)
    a = acts if isinstance(acts, ActFormat) else parse_act(acts)
    k = kv if isinstance(kv, KVFormat) else parse_kv(kv)
    k.check_applicable(graph.head_dim)
    refitted: dict[str, list[str]] = {}
    layers: list[LayerPlan] = []
    shapes: dict[str, tuple[int, int]] = {}
    for info in graph.layers:
        choices: dict[str, UnitChoice] = {}
        for unit in graph.layer_units(info.index, granularity):
            fitted = w.fit_group(unit.in_features)
            if fitted != w:
                refitted.setdefault(str(fitted), []).append(unit.name)
            choices[unit.local] = UnitChoice(fitted, method)
            shapes[unit.name] = (unit.out_features, unit.in_features)
        layers.append(LayerPlan(info.index, choices, a, k))
    extra: dict[str, UnitChoice] = {}
    if head is not None:
        head_unit = graph.head_unit()
        if head_unit is None:
            raise PlanError("this model has no lm_head to quantize")
        hw = head if isinstance(head, WeightFormat) else parse_weight(head)
        fitted = hw.fit_group(head_unit.in_features)
        if fitted != hw:
            refitted.setdefault(str(fitted), []).append(head_unit.name)
        extra[head_unit.name] = UnitChoice(fitted, method)
        shapes[head_unit.name] = (head_unit.out_features, head_unit.in_features)
    notes = []
    for fitted_text, names in refitted.items():
        note = (
            f"{w}: group size {w.group_size} does not divide the input features of {len(names)} unit(s) "
            f"(e.g. {names[0]}); they use {fitted_text}"
        )
        notes.append(note)
        logging.getLogger("bitplan").warning(note)
    plan = Plan(
        model=ModelRef.from_graph(graph, name_or_path),
        layers=tuple(layers),
        shapes=shapes,
        granularity=granularity,
        extra=extra,
        metadata={
            "created_by": "uniform_plan",
            "requested": {"weights": str(w), "acts": str(a), "kv": str(k), "method": method, **({"head": str(head)} if head else {})},
            "notes": notes,
        },
    )
    return plan.validate(graph)
