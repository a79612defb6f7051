"""The structure of a Hugging Face decoder-only causal LM, as the units a precision plan decides about.

Every other part of bitplan (sensitivity probes, the search, the packer, the exporters) talks about a
model in terms of this graph, never in terms of one architecture's module names:

* **Decoder layers** are found structurally -- the ``nn.ModuleList`` whose length is the config's layer
  count and whose children hold linears -- so Llama's ``model.layers``, GPT-2's ``transformer.h`` and
  GPT-NeoX's ``gpt_neox.layers`` need no per-architecture table.
* **Unit names** are ``layers.{i}.{local}``, independent of the model's own prefix, so a plan written
  for one checkpoint reads the same as a plan for another of the same family and stays short.
* **Fused groups matter** because serving runtimes (vLLM, SGLang, TensorRT-LLM) load q/k/v as one
  ``qkv_proj`` matrix and gate/up as one ``gate_up_proj``: a fused weight has exactly one quantization
  scheme, so every shard must share one format. At ``fused`` granularity a plan therefore assigns one
  format per fused group (the default); ``tensor`` granularity, one per linear, is for analysis and for
  runtimes that keep the shards apart. The grouping follows vLLM's ``packed_modules_mapping``
  (:data:`FUSED_SIBLINGS`); modules that are already fused in the checkpoint (GPT-NeoX
  ``query_key_value``, GPT-2 ``c_attn``) are simply single units.
* **The fingerprint** ties a plan file to the network it was searched on. It covers the config fields
  that shape the network and every parameter's name and shape, and deliberately not the dtype the model
  was loaded in: a plan searched on an fp32 copy applies to the bf16 checkpoint.

Linear modules are ``nn.Linear`` (and subclasses) and transformers' GPT-2 ``Conv1D``, whose weight is
stored transposed (``[in, out]``; :attr:`LinearInfo.transposed`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
from transformers.pytorch_utils import Conv1D  # GPT-2 style linear: y = x @ W + b, W stored [in, out]

from bitplan.errors import ModelError

__all__ = [
    "FUSED_SIBLINGS",
    "Granularity",
    "LayerInfo",
    "LinearInfo",
    "ModelGraph",
    "Unit",
    "build_graph",
    "config_problem",
    "model_fingerprint",
    "summarize",
]

Granularity = Literal["fused", "tensor"]

#: Sibling linears that serving runtimes load as one fused matrix: (fused leaf name, member leaf names,
#: in concatenation order). A group applies only where all members are children of the same parent and
#: share ``in_features``. Mirrors vLLM's ``packed_modules_mapping`` for Llama-style models.
FUSED_SIBLINGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    ("gate_up_proj", ("gate_proj", "up_proj")),
)

#: Leaf names of query/key/value projections (separate or fused); the layer child holding one of them
#: is the layer's attention module.
_QKV_LEAVES = frozenset(
    "q_proj k_proj v_proj qkv_proj query_key_value c_attn Wqkv W_pack query key value".split()
)

#: Config keys that do not change the network (bookkeeping, generation, dtype); left out of the
#: fingerprint. Keys starting with "_" are left out too.
_VOLATILE_CONFIG_KEYS = frozenset(
    """architectures transformers_version torch_dtype dtype use_cache use_bfloat16 output_hidden_states
    output_attentions output_scores return_dict return_dict_in_generate torchscript tf_legacy_loss id2label
    label2id problem_type finetuning_task prefix task_specific_params tokenizer_class chunk_size_feed_forward
    attn_implementation bos_token_id eos_token_id pad_token_id sep_token_id decoder_start_token_id
    forced_bos_token_id forced_eos_token_id max_length min_length do_sample early_stopping num_beams
    num_beam_groups diversity_penalty temperature top_k top_p typical_p repetition_penalty length_penalty
    no_repeat_ngram_size encoder_no_repeat_ngram_size bad_words_ids num_return_sequences remove_invalid_values
    exponential_decay_length_penalty suppress_tokens begin_suppress_tokens""".split()
)


@dataclass(frozen=True)
class LinearInfo:
    """One linear module of the model."""

    path: str  # full module path, e.g. "model.layers.0.self_attn.q_proj"
    local: str  # path inside the decoder layer, e.g. "self_attn.q_proj" ("lm_head" for the head)
    in_features: int
    out_features: int
    transposed: bool  # True for transformers' Conv1D (weight stored [in, out])

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class Unit:
    """One decision unit: what a plan assigns one weight format to (a linear or a fused group)."""

    name: str  # "layers.0.self_attn.qkv_proj" / "layers.0.self_attn.q_proj" / "lm_head"
    layer: int | None  # None for lm_head
    local: str  # "self_attn.qkv_proj"
    members: tuple[LinearInfo, ...]
    in_features: int
    out_features: int  # sum over members

    @property
    def numel(self) -> int:
        """Weight elements (biases excluded)."""
        return self.in_features * self.out_features

    @property
    def fused(self) -> bool:
        return len(self.members) > 1


@dataclass(frozen=True)
class LayerInfo:
    """One decoder layer."""

    index: int
    path: str  # "model.layers.0"
    linears: tuple[LinearInfo, ...]  # in module order
    attention: str  # full path of the attention module
    fused_groups: tuple[tuple[str, tuple[str, ...]], ...]  # (fused local, member locals)


@dataclass(frozen=True)
class ModelGraph:
    """What bitplan knows about a model's structure. Build it with :func:`build_graph`."""

    architecture: str
    model_type: str
    layers_path: str  # "model.layers" / "transformer.h" / "gpt_neox.layers"
    layers: tuple[LayerInfo, ...]
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    lm_head: LinearInfo | None
    embed_path: str | None
    tied_embeddings: bool
    total_params: int  # unique parameters (tied counted once)
    fingerprint: str

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_units(self, index: int, granularity: Granularity = "fused") -> list[Unit]:
        """The units of decoder layer ``index``, in module order (a fused unit sits at its first member)."""
        _check_granularity(granularity)
        layer = self.layers[index]
        groups = dict(layer.fused_groups) if granularity == "fused" else {}
        owner = {m: fused for fused, members in groups.items() for m in members}
        by_local = {lin.local: lin for lin in layer.linears}
        units: list[Unit] = []
        done: set[str] = set()
        for lin in layer.linears:
            fused = owner.get(lin.local)
            if fused is None:
                units.append(_unit(f"layers.{index}.{lin.local}", index, lin.local, (lin,)))
            elif fused not in done:
                done.add(fused)
                members = tuple(by_local[m] for m in groups[fused])
                units.append(_unit(f"layers.{index}.{fused}", index, fused, members))
        return units

    def units(self, granularity: Granularity = "fused", *, include_head: bool = False) -> list[Unit]:
        """Decoder-layer units in model order; with ``include_head`` the lm_head unit (if any) last."""
        out = [u for i in range(self.num_layers) for u in self.layer_units(i, granularity)]
        head = self.head_unit() if include_head else None
        return out + [head] if head is not None else out

    def unit_map(self, granularity: Granularity = "fused", *, include_head: bool = False) -> dict[str, Unit]:
        return {u.name: u for u in self.units(granularity, include_head=include_head)}

    def head_unit(self) -> Unit | None:
        """The ``lm_head`` unit, or None when the model has no output projection."""
        if self.lm_head is None:
            return None
        return _unit("lm_head", None, "lm_head", (self.lm_head,))

    def param_counts(self) -> dict[str, int]:
        """Parameter accounting: ``layer_units + lm_head + other == total``.

        ``layer_units`` are the weights of all decoder-layer linears, ``lm_head`` the head's weight when it
        is not tied (a tied head shares the embedding's storage and is counted under ``other``), and
        ``other`` everything else: embeddings, norms, biases, and any weight that is not a linear.
        """
        in_units = sum(lin.numel for layer in self.layers for lin in layer.linears)
        head = self.lm_head.numel if self.lm_head is not None and not self.tied_embeddings else 0
        return {
            "layer_units": in_units,
            "lm_head": head,
            "other": self.total_params - in_units - head,
            "total": self.total_params,
        }

    def describe(self, granularity: Granularity = "fused") -> str:
        """A readable table of the structure, for ``bitplan inspect``."""
        return summarize(self, granularity)


def _unit(name: str, layer: int | None, local: str, members: tuple[LinearInfo, ...]) -> Unit:
    return Unit(name, layer, local, members, members[0].in_features, sum(m.out_features for m in members))


def _check_granularity(granularity: str) -> None:
    if granularity not in ("fused", "tensor"):
        raise ValueError(f"granularity must be 'fused' or 'tensor', got {granularity!r}")


# ----------------------------------------------------------------------------------------------- build


def _linear_dims(module: nn.Module) -> tuple[int, int, bool] | None:
    """(in_features, out_features, transposed) if ``module`` is a linear, else None."""
    if isinstance(module, nn.Linear):
        return int(module.in_features), int(module.out_features), False
    if isinstance(module, Conv1D):
        rows, cols = module.weight.shape  # [in, out]
        return int(rows), int(cols), True
    return None


def _has_linear(module: nn.Module) -> bool:
    return any(_linear_dims(m) is not None for m in module.modules())


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    try:
        return get() if callable(get) else config
    except Exception:  # noqa: BLE001 - some remote-code configs break here; the top config still works
        return config


def _first_attr(config: Any, names: Iterable[str]) -> Any:
    return next((v for n in names if (v := getattr(config, n, None)) is not None), None)


def config_problem(config: Any) -> str | None:
    """Why ``config`` is not a decoder-only causal LM (a phrase), or None if it looks like one."""
    model_type = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        return f"an encoder-decoder model (model_type {model_type!r})"
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return f"an encoder (masked-LM) model (model_type {model_type!r})"
    return None


def _find_layer_stack(model: nn.Module, expected: int | None) -> tuple[str, nn.ModuleList]:
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList)
        and len(mod) > 0
        and all(_linear_dims(child) is None and _has_linear(child) for child in mod)
    ]
    exact = [c for c in candidates if expected is not None and len(c[1]) == expected]
    pool = exact or candidates
    if not pool:
        raise ModelError(
            f"{type(model).__name__}: expected a list of decoder layers (an nn.ModuleList of "
            f"{expected if expected is not None else 'N'} blocks holding linear layers), found none"
        )
    # The shallowest list wins (a per-layer list of experts sits deeper than the layer stack), then the longest.
    return min(pool, key=lambda c: (c[0].count(".") if c[0] else -1, -len(c[1])))


def _fused_groups(linears: tuple[LinearInfo, ...]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    by_parent: dict[str, dict[str, LinearInfo]] = {}
    for lin in linears:
        parent, _, leaf = lin.local.rpartition(".")
        by_parent.setdefault(parent, {})[leaf] = lin
    existing = {lin.local for lin in linears}
    order = {lin.local: i for i, lin in enumerate(linears)}
    groups: list[tuple[str, tuple[str, ...]]] = []
    for parent, children in by_parent.items():
        for fused_leaf, member_leaves in FUSED_SIBLINGS:
            members = [children[m] for m in member_leaves if m in children]
            fused = f"{parent}.{fused_leaf}" if parent else fused_leaf
            same_input = len({(m.in_features, m.transposed) for m in members}) == 1
            if len(members) == len(member_leaves) and same_input and fused not in existing:
                groups.append((fused, tuple(m.local for m in members)))
    groups.sort(key=lambda g: min(order[m] for m in g[1]))
    return tuple(groups)


def _attention_child(layer: nn.Module, linears: tuple[LinearInfo, ...]) -> str | None:
    for lin in linears:
        head, _, rest = lin.local.partition(".")
        if rest and lin.local.rpartition(".")[2] in _QKV_LEAVES:
            return head
    for name, child in layer.named_children():
        if "attention" in type(child).__name__.lower():
            return name
    return None


def _find(model: nn.Module, method: str) -> tuple[nn.Module | None, str | None]:
    """(module, its path) returned by e.g. ``model.get_output_embeddings()``; (None, None) if there is none."""
    fn = getattr(model, method, None)
    try:
        target = fn() if callable(fn) else None
    except (NotImplementedError, AttributeError):
        target = None
    if not isinstance(target, nn.Module):
        return None, None
    return target, next((name for name, mod in model.named_modules() if mod is target), None)


def build_graph(model: nn.Module) -> ModelGraph:
    """Find the decoder layers, linears, fused groups, attention shape and head of a causal LM.

    Raises :class:`ModelError` (one line) for a model bitplan cannot handle: no config, an encoder or
    encoder-decoder model, or no decoder layers.
    """
    cls = type(model).__name__
    config = getattr(model, "config", None)
    if config is None:
        raise ModelError(f"expected a Hugging Face PreTrainedModel with a .config, got {cls}")
    problem = config_problem(config)
    if problem is not None:
        raise ModelError(f"expected a decoder-only causal LM, found {cls}: {problem}")
    text = _text_config(config)
    expected = _first_attr(text, ("num_hidden_layers", "n_layer", "num_layers"))
    layers_path, stack = _find_layer_stack(model, int(expected) if expected is not None else None)
    if any(part in ("encoder", "encoders") for part in layers_path.split(".")):
        raise ModelError(
            f"expected a decoder-only causal LM, found {cls} whose layers are an encoder stack at {layers_path!r}"
        )

    layers: list[LayerInfo] = []
    for i, block in enumerate(stack):
        prefix = f"{layers_path}.{i}" if layers_path else str(i)
        linears = tuple(
            LinearInfo(f"{prefix}.{name}", name, *dims)
            for name, mod in block.named_modules()
            if name and (dims := _linear_dims(mod)) is not None
        )
        attn = _attention_child(block, linears)
        if attn is None:
            raise ModelError(
                f"{cls}: decoder layer {prefix!r} has no attention module (expected a child holding q/k/v projections)"
            )
        layers.append(LayerInfo(i, prefix, linears, f"{prefix}.{attn}", _fused_groups(linears)))

    heads = _first_attr(text, ("num_attention_heads", "n_head", "num_heads"))
    hidden = _first_attr(text, ("hidden_size", "n_embd", "d_model"))
    vocab = _first_attr(text, ("vocab_size",))
    if heads is None or hidden is None:
        raise ModelError(
            f"{cls}: config lacks num_attention_heads/hidden_size (model_type {getattr(config, 'model_type', '?')!r})"
        )
    kv = _first_attr(text, ("num_key_value_heads", "num_kv_heads"))
    if kv is None:
        kv = 1 if getattr(text, "multi_query", False) else heads
    head_dim = _first_attr(text, ("head_dim",)) or int(hidden) // int(heads)

    head_mod, head_path = _find(model, "get_output_embeddings")
    fallback = getattr(model, "lm_head", None)
    if (head_mod is None or _linear_dims(head_mod) is None) and isinstance(fallback, nn.Module):
        head_mod, head_path = fallback, "lm_head"
    head_dims = _linear_dims(head_mod) if head_mod is not None else None
    lm_head = LinearInfo(head_path, "lm_head", *head_dims) if head_path is not None and head_dims else None
    embed_mod, embed_path = _find(model, "get_input_embeddings")
    embed_weight = getattr(embed_mod, "weight", None)
    tied = (
        lm_head is not None and embed_weight is not None and getattr(head_mod, "weight", None) is embed_weight
    )
    archs = getattr(config, "architectures", None)
    return ModelGraph(
        architecture=archs[0] if archs else cls,
        model_type=str(getattr(config, "model_type", "") or ""),
        layers_path=layers_path,
        layers=tuple(layers),
        num_attention_heads=int(heads),
        num_kv_heads=int(kv),
        head_dim=int(head_dim),
        hidden_size=int(hidden),
        vocab_size=int(vocab) if vocab is not None else (lm_head.out_features if lm_head else 0),
        lm_head=lm_head,
        embed_path=embed_path,
        tied_embeddings=tied,
        total_params=sum(p.numel() for p in model.parameters()),
        fingerprint=model_fingerprint(model),
    )


# ----------------------------------------------------------------------------------------- fingerprint


def _stable_config(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            str(k): _stable_config(v)
            for k, v in value.items()
            if not str(k).startswith("_") and k not in _VOLATILE_CONFIG_KEYS
        }
    if isinstance(value, (list, tuple)):
        return [_stable_config(v) for v in value]
    return value


def model_fingerprint(model: nn.Module) -> str:
    """16 hex digits of sha256 over the model class, its network-shaping config fields and the sorted
    (name, shape) of every parameter. Independent of the dtype and device the model was loaded in."""
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        cfg = _stable_config(config.to_dict())
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, shape in sorted((n, tuple(p.shape)) for n, p in model.named_parameters(remove_duplicate=False)):
        h.update(f"\n{name}:{shape}".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------- summary


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def summarize(graph: ModelGraph, granularity: Granularity = "fused") -> str:
    """Render the graph as the table ``bitplan inspect`` prints."""
    g = graph
    kv_note = f"GQA {g.num_attention_heads // max(g.num_kv_heads, 1)}:1" if g.num_kv_heads > 1 else "MQA"
    kv_note = "MHA" if g.num_kv_heads == g.num_attention_heads else kv_note
    lines = [
        f"{g.architecture} (model_type {g.model_type!r})   fingerprint {g.fingerprint}",
        f"decoder layers: {g.num_layers} at {g.layers_path!r}; hidden {g.hidden_size}, vocab {g.vocab_size}",
        f"attention: {g.num_attention_heads} heads, {g.num_kv_heads} kv heads ({kv_note}), head_dim {g.head_dim}",
    ]
    if g.layers and g.layers[0].fused_groups:
        fused = "; ".join(
            f"{name} = {' + '.join(m.rpartition('.')[2] for m in members)}"
            for name, members in g.layers[0].fused_groups
        )
        lines.append(f"fused groups: {fused}")
    if any(lin.transposed for layer in g.layers for lin in layer.linears):
        lines.append("linears: transformers Conv1D (weight stored [in, out])")
    # Group layers with identical unit shapes so a 30-layer model prints one table, not thirty.
    blocks: dict[tuple[tuple[str, int, int], ...], list[int]] = {}
    for i in range(g.num_layers):
        sig = tuple((u.local, u.in_features, u.out_features) for u in g.layer_units(i, granularity))
        blocks.setdefault(sig, []).append(i)
    for idx in blocks.values():
        sample = g.layer_units(idx[0], granularity)
        lines.append(f"\nlayers {_ranges(idx)}: {len(sample)} {granularity} units each")
        width = max([len("unit")] + [len(u.local) for u in sample])
        lines.append(f"  {'unit':<{width}}  {'in':>7}  {'out':>7}  {'params':>13}  members")
        for u in sample:
            members = " ".join(m.local.rpartition(".")[2] for m in u.members) if u.fused else ""
            lines.append(
                f"  {u.local:<{width}}  {u.in_features:>7}  {u.out_features:>7}  {u.numel:>13,}  {members}".rstrip()
            )
        lines.append(f"  {'per layer':<{width}}  {'':>7}  {'':>7}  {sum(u.numel for u in sample):>13,}")
    lines.append("")  # blank line before the totals
    head, tie = g.lm_head, f" (tied to {g.embed_path})" if g.tied_embeddings else ""
    head_text = (
        f"{head.path} {head.in_features} -> {head.out_features}, {head.numel:,} params" if head else "none"
    )
    lines.append(f"lm_head: {head_text}{tie}")
    c = g.param_counts()
    pct = (lambda n: f"{100.0 * n / c['total']:.1f}%") if c["total"] else (lambda n: "-")
    lines.append(
        f"params: {c['total']:,} total = {c['layer_units']:,} in layer units ({pct(c['layer_units'])}) + "
        f"{c['lm_head']:,} untied lm_head ({pct(c['lm_head'])}) + {c['other']:,} elsewhere "
        f"({pct(c['other'])}: embeddings, norms, biases)"
    )
    return "\n".join(lines)
