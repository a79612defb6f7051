"""What every exporter shares: the plan's units as the runtime's module names, a registry, atomic output.

Runtimes name modules differently from a plan. A plan says ``layers.3.self_attn.qkv_proj`` (fused granularity)
or ``layers.3.self_attn.q_proj`` (tensor granularity); Hugging Face checkpoints and GPTQModel see
``model.layers.3.self_attn.q_proj``; vLLM and SGLang see the *fused* module ``model.layers.3.self_attn.qkv_proj``
that holds q, k and v in one matrix (:data:`bitplan.graph.FUSED_SIBLINGS`), which takes one scheme. So each
exporter works on :class:`RuntimeUnit` s: the set of checkpoint modules a runtime loads as one module, with
the one choice they share. A tensor-granularity plan whose q/k/v (or gate/up) differ cannot be loaded by a
fusing runtime; :func:`runtime_units` says so instead of writing a config vLLM would silently misread.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from bitplan._registry import Registry
from bitplan.errors import BitplanError
from bitplan.graph import FUSED_SIBLINGS
from bitplan.plan import Plan, UnitChoice

__all__ = [
    "EXPORTERS",
    "ExportError",
    "ExportOptions",
    "ExportResult",
    "Exporter",
    "RuntimeUnit",
    "anchored",
    "register_exporter",
    "runtime_units",
]

#: Module paths of models whose plans were saved before plans recorded them.
_LAYERS_PATH = {
    "LlamaForCausalLM": "model.layers",
    "MistralForCausalLM": "model.layers",
    "Qwen2ForCausalLM": "model.layers",
    "Qwen3ForCausalLM": "model.layers",
    "GPTNeoXForCausalLM": "gpt_neox.layers",
    "GPT2LMHeadModel": "transformer.h",
}
_HEAD_PATH = {"GPTNeoXForCausalLM": "embed_out"}


class ExportError(BitplanError):
    """A plan the chosen format cannot express (or cannot express without ``approximate``)."""


@dataclass(frozen=True)
class ExportOptions:
    """``approximate``: map formats the target cannot express to the nearest one it can (each noted);
    ``kv``: export the plan's KV cache where the target has a place for it (``False`` drops it, noted);
    ``target``: a runtime within the format whose limits to enforce (GPTQModel: ``marlin``, ``torch``, ``triton``);
    ``name``: the output file's name, for the commands an export writes beside it."""

    approximate: bool = False
    kv: bool = True
    target: str | None = None
    name: str = "OUT"


@dataclass(frozen=True)
class ExportResult:
    """``files``: output suffix -> text (``""`` is the main file, ``".json"`` a companion beside it)."""

    format: str
    files: Mapping[str, str]
    notes: tuple[str, ...] = ()
    summary: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RuntimeUnit:
    """Checkpoint modules a runtime loads as one module, and their shared choice."""

    units: tuple[str, ...]  # plan unit names it covers
    modules: tuple[str, ...]  # checkpoint module paths ("model.layers.3.self_attn.q_proj", ...)
    fused: str | None  # the runtime's fused module path ("model.layers.3.self_attn.qkv_proj"), if any
    choice: UnitChoice
    layer: int | None  # None for the head
    in_features: int
    out_features: int

    @property
    def names(self) -> tuple[str, ...]:
        """Every name a consumer may match: the checkpoint modules, then the fused module."""
        return self.modules + ((self.fused,) if self.fused else ())

    @property
    def label(self) -> str:
        return self.units[0] if len(self.units) == 1 else f"{self.units[0].rsplit('.', 1)[0]}.{{{','.join(u.rsplit('.', 1)[1] for u in self.units)}}}"


def module_paths(plan: Plan) -> tuple[str, str]:
    """``(layers_path, head_path)`` of the plan's model."""
    layers = plan.model.layers_path or _LAYERS_PATH.get(plan.model.architecture, "")
    if not layers:
        raise ExportError(
            f"the plan does not record its model's module paths and {plan.model.architecture} is not one bitplan knows; "
            "re-make the plan with this bitplan (plan uniform / search)"
        )
    head = plan.model.head_path or _HEAD_PATH.get(plan.model.architecture, "lm_head")
    return layers, head


def _fused_of(local: str) -> tuple[str, tuple[str, ...]] | None:
    """``(fused local, member locals)`` when ``local`` is a fused group or one of its members."""
    parent, _, leaf = local.rpartition(".")
    pre = f"{parent}." if parent else ""
    for fused, members in FUSED_SIBLINGS:
        if leaf == fused or leaf in members:
            return pre + fused, tuple(pre + m for m in members)
    return None


def runtime_units(plan: Plan, *, scheme: Any = None) -> list[RuntimeUnit]:
    """The plan's units as a fusing runtime loads them (head last, if the plan names one).

    ``scheme(choice)`` -> a comparable value: tensor-granularity siblings of one fused module must agree on it
    (default: the whole choice), else :class:`ExportError` names the layer and the disagreement.
    """
    key = scheme or (lambda c: c)
    layers_path, head_path = module_paths(plan)
    out: list[RuntimeUnit] = []
    for layer in plan.layers:
        pending: dict[str, list[tuple[str, UnitChoice]]] = {}
        order: list[str] = []
        for local, choice in layer.weights.items():
            fused = _fused_of(local)
            slot = fused[0] if fused else local
            if slot not in pending:
                pending[slot] = []
                order.append(slot)
            pending[slot].append((local, choice))
        for slot in order:
            entries = pending[slot]
            fused = _fused_of(slot)
            prefix = f"{layers_path}.{layer.index}."
            if fused and entries[0][0] == slot:  # a fused-granularity group: its members are the checkpoint modules
                members = fused[1]
            else:
                members = tuple(local for local, _ in entries)
            keys = {key(c) for _, c in entries}
            if len(keys) > 1:
                mix = ", ".join(f"{local.rsplit('.', 1)[-1]}={c}" for local, c in entries)
                raise ExportError(
                    f"layers.{layer.index}: a fusing runtime loads {', '.join(m.rsplit('.', 1)[-1] for m in members)} as one "
                    f"{slot.rsplit('.', 1)[-1]}, which takes one scheme, but the plan has {mix}; search or make the plan at fused granularity"
                )
            shapes = [plan.shapes.get(f"layers.{layer.index}.{local}", (0, 0)) for local, _ in entries]
            out.append(RuntimeUnit(
                units=tuple(f"layers.{layer.index}.{local}" for local, _ in entries),
                modules=tuple(prefix + m for m in members),
                fused=prefix + slot if fused else None,
                choice=entries[0][1],
                layer=layer.index,
                in_features=shapes[0][1],
                out_features=sum(s[0] for s in shapes),
            ))  # fmt: skip
    for name, choice in plan.extra.items():
        shape = plan.shapes.get(name, (0, 0))
        out.append(RuntimeUnit((name,), (head_path,), None, choice, None, shape[1], shape[0]))
    return out


def anchored(names: Sequence[str]) -> str:
    """One regex matching exactly ``names`` (whole strings): ``^model\\.layers\\.3\\.self_attn\\.(?:q_proj|qkv_proj)$``.

    Anchored at both ends because vLLM and GPTQModel use ``re.match`` (anchored at the start only: an unanchored
    ``model\\.layers\\.1\\.`` would also take layer 10) and llama.cpp an unanchored ``regex_search``."""
    parents = {n.rpartition(".")[0] for n in names}
    if len(names) == 1:
        return f"^{re.escape(names[0])}$"
    if len(parents) == 1:
        parent = parents.pop()
        leaves = "|".join(re.escape(n.rpartition(".")[2]) for n in names)
        return f"^{re.escape(parent)}\\.(?:{leaves})$" if parent else f"^(?:{leaves})$"
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


class Exporter(abc.ABC):
    """Writes a plan in one runtime's format and reads such a file back into a plan (where it can)."""

    name: ClassVar[str]
    description: ClassVar[str]

    @abc.abstractmethod
    def export(self, plan: Plan, options: ExportOptions) -> ExportResult:
        """The files for ``plan``; :class:`ExportError` for what the format cannot express."""

    @abc.abstractmethod
    def read(self, files: Mapping[str, str], like: Plan) -> Plan:
        """Parse exported ``files`` (same keys as :attr:`ExportResult.files`) back into a plan for ``like``'s model,
        matching names exactly as the consumer does."""


EXPORTERS = Registry[type[Exporter]]("export format")


def register_exporter(name: str) -> Any:
    """Class decorator: register an :class:`Exporter` under ``name`` (twice is an error)."""

    def deco(cls: type[Exporter]) -> type[Exporter]:
        cls.name = name
        EXPORTERS.register(name)(cls)
        return cls

    return deco


def rebuild(
    like: Plan,
    choices: Mapping[str, UnitChoice],
    acts: Sequence[Any] | None = None,
    kv: Sequence[Any] | None = None,
    source: str = "export",
) -> Plan:
    """``like`` with each unit's choice (and optionally each layer's acts / KV) replaced: how readers turn a
    parsed file back into a plan."""
    from dataclasses import replace

    layers = []
    for layer in like.layers:
        weights = {}
        for local in layer.weights:
            name = f"layers.{layer.index}.{local}"
            if name not in choices:
                raise ExportError(f"{source}: nothing in the file covers {name}")
            weights[local] = choices[name]
        layers.append(replace(
            layer, weights=weights,
            acts=acts[layer.index] if acts is not None else layer.acts,
            kv=kv[layer.index] if kv is not None else layer.kv,
        ))  # fmt: skip
    extra = {n: choices.get(n, c) for n, c in like.extra.items()}
    return replace(like, layers=tuple(layers), extra=extra, metadata={"created_by": f"read {source}"})
