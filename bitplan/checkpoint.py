"""Quantized checkpoints: save a model with a plan applied, load it back with the same logits, bit for bit.

A checkpoint is a directory::

    config.json         the model's transformers config (as it was before the plan: see below)
    generation_config.json   when the model has one
    model.safetensors   every tensor the model holds, once: packed canonical buffers of the quantized units,
                        float tensors in the dtype they were applied in, and non-persistent buffers
                        (rotary ``inv_freq`` ...) too, so loading runs no initialisation code at all
    bitplan.json        {"kind": "bitplan.checkpoint", "schema_version": 1, "plan": {...},
                         "modules": {path: {"type": "linear"|"embedding", shapes, formats, method}},
                         "kernels": {path: kernel name}, "aliases": {tensor: tensor it shares storage with},
                         "dtype": "float32", "bitplan_version": "..."}
    tokenizer files     when a tokenizer is passed

Why the *canonical* packed buffers (codes, scales, offsets, parameter codes, super-scales) and not the
kernels' layouts: a kernel's layout belongs to one device and instruction set (``int4pack`` on a CPU is
not ``tinygemm``'s layout on a GPU), while the canonical bytes are exactly the plan's bytes, and every
kernel's ``prepare`` is a deterministic function of them. ``load`` re-lays them for the kernels recorded at
save time (or any policy you pass) and so reproduces the saved model's logits exactly.

Why ``config.json`` is the config *before* the plan: a quantized head on a tied model unties it (the head
and the embedding get separate packed copies), and the plan's fingerprint was taken on the tied network.
``load`` builds that network's skeleton on the meta device, checks the plan against it, swaps in the packed
modules and then unties, as :func:`~bitplan.apply.apply_plan` does.

Writes are atomic: the directory is written beside its destination and renamed into place; an existing
checkpoint is swapped for the new one in one ``renameat2(RENAME_EXCHANGE)`` once the new one is complete
(two renames where the kernel lacks it), and a directory that is not a bitplan checkpoint is never overwritten.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bitplan.errors import BitplanError, ModelError

if TYPE_CHECKING:
    from bitplan.kernels._base import LatencyFn

__all__ = ["CHECKPOINT_KIND", "SCHEMA_VERSION", "load", "save"]

CHECKPOINT_KIND = "bitplan.checkpoint"
SCHEMA_VERSION = 1
META_FILE = "bitplan.json"
WEIGHTS_FILE = "model.safetensors"


def _packed_modules(model: nn.Module) -> dict[str, nn.Module]:
    from bitplan.quantizers import QuantEmbedding, QuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}


def _describe(module: nn.Module) -> dict[str, Any]:
    from bitplan.quantizers import QuantLinear

    if isinstance(module, QuantLinear):
        return {
            "type": "linear",
            "in_features": module.in_features,
            "out_features": module.out_features,
            "weight": str(module.weight_format),
            "act": str(module.act_format),
            "method": module.method,
            "bias": module.bias is not None,
            "bias_dtype": str(module.bias.dtype).removeprefix("torch.") if module.bias is not None else None,
        }
    return {
        "type": "embedding",
        "num_embeddings": module.num_embeddings,
        "embedding_dim": module.embedding_dim,
        "padding_idx": module.padding_idx,
        "weight": str(module.weight_format),
        "method": module.method,
        "dtype": str(module.dtype).removeprefix("torch."),
    }


def _slots(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, bool, torch.Tensor]]:
    """``(name, module, attribute, is_parameter, tensor)`` of every parameter and buffer (non-persistent ones too),
    under every name it is reachable by (a tied tensor appears under each)."""
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for attr, t in [*mod._parameters.items(), *mod._buffers.items()]:
            if t is not None:
                yield f"{mod_name}.{attr}" if mod_name else attr, mod, attr, attr in mod._parameters, t


def _all_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every parameter and buffer, each storage once, and the aliases of shared ones."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    for name, _, _, _, t in _slots(model):
        if name in tensors or name in aliases:
            continue
        if id(t) in seen:
            aliases[name] = seen[id(t)]
            continue
        seen[id(t)] = name
        tensors[name] = t.detach().contiguous()
    return tensors, aliases


def resolve_kernels(
    model: nn.Module, kernels: str | Mapping[str, str] = "auto", latency: LatencyFn | None = None
) -> dict[str, str]:
    """``{module path: kernel name}`` for every packed linear: a policy (``auto``, ``fastest``, ``reference``,
    a kernel name; see :func:`bitplan.kernels.choose_kernel`) resolved per module, or a mapping checked whole."""
    from bitplan.kernels import choose_kernel
    from bitplan.quantizers import QuantLinear

    linears = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not isinstance(kernels, str):
        unknown = sorted(set(kernels) - set(linears))
        missing = sorted(set(linears) - set(kernels))
        if unknown or missing:
            bad = unknown or missing
            raise BitplanError(f"kernel map {'names unknown' if unknown else 'lacks'} module(s) {', '.join(bad[:3])}")
        return dict(kernels)
    out = {}
    for name, m in linears.items():
        device = next(iter(m.buffers())).device
        out[name] = m.kernel if kernels == "keep" else choose_kernel(m.spec, device, kernels, latency).name
    return out


def set_kernels(model: nn.Module, kernels: str | Mapping[str, str] = "auto", latency: LatencyFn | None = None) -> dict[str, str]:
    """Re-lay every packed linear for its kernel (a policy or ``{path: name}``); returns the map applied."""
    from bitplan.quantizers import QuantLinear

    chosen = resolve_kernels(model, kernels, latency)
    for name, kernel in chosen.items():
        m = model.get_submodule(name)
        assert isinstance(m, QuantLinear)
        m.set_kernel(kernel)
    return chosen


# -- save ---------------------------------------------------------------------------------------
def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    kernels: str | Mapping[str, str] = "keep",
    latency: LatencyFn | None = None,
    tokenizer: Any = None,
) -> dict[str, str]:
    """Write ``model`` (a plan applied with :func:`~bitplan.apply.apply_plan`) as a checkpoint directory.

    The packed modules must still hold their canonical buffers: apply with ``kernels="reference"``, save, then
    :func:`set_kernels`. ``kernels`` is what :func:`load` will run: ``keep`` (each module's current kernel), a
    policy resolved now (``auto``, ``fastest``, a kernel name) or ``{path: name}``. Returns that map.
    """
    from bitplan import __version__

    plan = getattr(model, "bitplan_plan", None)
    if plan is None:
        raise BitplanError("this model has no plan applied; apply one with bitplan.apply_plan before saving")
    packed = _packed_modules(model)
    for name, m in packed.items():
        if m._buffers.get("codes" if m.weight_format.is_quantized else "weight") is None:
            raise BitplanError(
                f"{name} holds only kernel {getattr(m, 'kernel', '?')!r}'s layout, not the packed weight; apply with "
                "kernels='reference', save, then bitplan.set_kernels(model, 'auto')"
            )
    chosen = resolve_kernels(model, kernels, latency)
    tensors, aliases = _all_tensors(model)
    dtypes = {str(t.dtype).removeprefix("torch.") for n, t in tensors.items() if t.is_floating_point()
              and n.rsplit(".", 1)[0] not in packed}  # fmt: skip
    config = model.config.to_dict()  # type: ignore[operator, union-attr]
    config["tie_word_embeddings"] = plan.model.tied_embeddings  # the network the plan was made for (see above)
    meta = {
        "kind": CHECKPOINT_KIND,
        "schema_version": SCHEMA_VERSION,
        "bitplan_version": __version__,
        "dtype": sorted(dtypes)[0] if len(dtypes) == 1 else sorted(dtypes),
        "plan": plan.to_dict(),
        "modules": {n: _describe(m) for n, m in packed.items()},
        "kernels": chosen,
        "aliases": aliases,
    }
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file({n: t.cpu() for n, t in tensors.items()}, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")  # last: its presence marks a whole checkpoint

    _atomic_dir(Path(path), write)
    return chosen


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return bool(renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0)


def _atomic_dir(dest: Path, write: Any) -> None:
    """Write a directory beside ``dest`` and rename it into place (replacing an older bitplan checkpoint)."""
    if dest.exists() and not dest.is_dir():
        raise BitplanError(f"{dest} exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / META_FILE).is_file():
        raise BitplanError(f"{dest} exists and is not a bitplan checkpoint; refusing to overwrite it")
    parent = dest.parent if str(dest.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise BitplanError(f"cannot write {dest}: {e.strerror or e}") from None
    old = None
    try:
        write(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if dest.exists() and _exchange(tmp, dest):  # one atomic swap: the old checkpoint is now at tmp
            old = tmp
        else:
            if dest.exists():  # no renameat2 here: two renames, with a moment where dest does not exist
                old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=parent))
                os.replace(dest, old / "ckpt")
            os.replace(tmp, dest)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BitplanError(f"cannot write {dest}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- load ---------------------------------------------------------------------------------------
def _read_meta(path: Path) -> dict[str, Any]:
    f = path / META_FILE
    if not f.is_file():
        what = "does not exist" if not path.exists() else "is not a bitplan checkpoint (no bitplan.json)"
        raise ModelError(f"{path} {what}")
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{f}: cannot read checkpoint metadata: {e}") from None
    if not isinstance(meta, dict) or meta.get("kind") != CHECKPOINT_KIND:
        raise ModelError(f"{f}: not a bitplan checkpoint (kind {meta.get('kind') if isinstance(meta, dict) else None!r})")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ModelError(f"{f}: unsupported checkpoint schema_version {meta.get('schema_version')!r}; this bitplan reads {SCHEMA_VERSION}")
    for key in ("plan", "modules", "kernels", "aliases"):
        if not isinstance(meta.get(key), dict):
            raise ModelError(f"{f}: missing or malformed {key!r}")
    return meta


def _build_module(desc: Mapping[str, Any], where: str) -> nn.Module:
    from bitplan.quantizers import QuantEmbedding, QuantLinear

    try:
        if desc["type"] == "linear":
            bias_dtype = getattr(torch, desc["bias_dtype"]) if desc.get("bias_dtype") else torch.float32
            return QuantLinear(desc["in_features"], desc["out_features"], desc["weight"], desc["act"],
                               bias=desc["bias"], method=desc["method"], device="meta", dtype=bias_dtype)  # fmt: skip
        if desc["type"] == "embedding":
            return QuantEmbedding(desc["num_embeddings"], desc["embedding_dim"], desc["weight"], padding_idx=desc["padding_idx"],
                                  method=desc["method"], device="meta", dtype=getattr(torch, desc["dtype"]))  # fmt: skip
    except (KeyError, TypeError, AttributeError) as e:
        raise ModelError(f"{where}: malformed module entry ({e})") from None
    raise ModelError(f"{where}: unknown module type {desc.get('type')!r}")


def load(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    kernels: str | Mapping[str, str] = "saved",
    latency: LatencyFn | None = None,
) -> nn.Module:
    """Load a checkpoint written by :func:`save`: the packed model, its plan (``model.bitplan_plan``) and KV cache.

    ``kernels``: ``saved`` (the kernels recorded at save time -- same device kind, same logits bit for bit),
    or any policy / map :func:`set_kernels` takes. Raises :class:`ModelError` for anything that is not a whole
    checkpoint of this schema (and a kernel that cannot run here, naming it).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from bitplan.graph import build_graph
    from bitplan.kvcache import install_kv_plan
    from bitplan.loading import _quiet_transformers
    from bitplan.plan import Plan

    root = Path(path)
    meta = _read_meta(root)
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(str(root), local_files_only=True)
            with torch.device("meta"):
                model: Any = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{root}: cannot build the model from its config.json: {' '.join(str(e).split())[:240]}") from None
    plan = Plan.from_dict(meta["plan"], source=f"{root / META_FILE}: plan").validate(build_graph(model))
    for name, desc in meta["modules"].items():
        model.set_submodule(name, _build_module(desc, f"{root / META_FILE}: modules[{name!r}]"))
    try:
        tensors = load_file(str(root / WEIGHTS_FILE), device=str(torch.device(device)))
    except (OSError, SafetensorError) as e:
        raise ModelError(f"{root / WEIGHTS_FILE}: cannot read the weights: {' '.join(str(e).split())[:240]}") from None
    _assign(model, tensors, meta["aliases"], root / WEIGHTS_FILE)
    if plan.model.tied_embeddings and any(d["type"] == "embedding" for d in meta["modules"].values()):
        model.config.tie_word_embeddings = False
    with contextlib.suppress(Exception):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(root))
    try:
        set_kernels(model, meta["kernels"] if kernels == "saved" else kernels, latency)
    except BitplanError as e:
        raise ModelError(f"{root}: {e}") from None
    if any(kv.is_quantized for kv in plan.kv_formats()):
        install_kv_plan(model, plan.kv_formats())
    model.bitplan_plan = plan
    model.eval()
    return model


def _assign(model: nn.Module, tensors: dict[str, torch.Tensor], aliases: Mapping[str, str], source: Path) -> None:
    """Put every stored tensor in its slot of the meta skeleton, checking names, shapes and dtypes."""
    slots = {name: (mod, attr, is_param) for name, mod, attr, is_param, _ in _slots(model)}
    expected = set(slots)
    stored = set(tensors) | set(aliases)
    if expected != stored:
        missing, unexpected = sorted(expected - stored), sorted(stored - expected)
        what = f"lacks {', '.join(missing[:3])}" if missing else f"has unexpected {', '.join(unexpected[:3])}"
        raise ModelError(f"{source}: checkpoint does not match its model ({what})")
    params: dict[str, nn.Parameter] = {}
    for name in [*tensors, *aliases]:
        key = aliases.get(name, name)
        t = tensors[key]
        mod, attr, is_param = slots[name]
        old = mod._parameters[attr] if is_param else mod._buffers[attr]
        assert old is not None
        if tuple(old.shape) != tuple(t.shape) or old.dtype != t.dtype and not old.is_floating_point():
            raise ModelError(f"{source}: {name} is {tuple(t.shape)} {t.dtype}, the model needs {tuple(old.shape)} {old.dtype}")
        if is_param:  # shared parameters stay one object (a tied head is the embedding's Parameter)
            mod._parameters[attr] = params.setdefault(key, nn.Parameter(t, requires_grad=False))
        else:
            mod._buffers[attr] = t
