"""``profile_hw``: time every option a plan of this model can use, on this device, into a profile.

What is timed, and why it predicts a whole model (see ``_predict`` for the sum):

* every distinct (linear shape, weight format, activation format) of the model's decision units and its
  lm_head, with *every* kernel that can run it, at decode (M = batch) and at a prefill chunk -- timed as
  the module the model would hold (``QuantLinear`` with its kernel; the model's own ``nn.Linear`` for
  16-bit), so module-call and activation-quantization overheads are in the figure;
* the *skeleton*: the model itself with every decision-unit linear replaced by a stub, decoding at each
  context with each uniform KV format, and prefilling one chunk -- everything no weight plan changes, in
  place, including the per-step work of ``generate`` that dominates small models on a CPU.

Decode time per token is ``(t(generate n+1 tokens) - t(generate 1 token)) / n``: the prompt's prefill and
the call's setup cancel. The benchmark that checks predictions measures real models the same way.
"""

from __future__ import annotations

import copy
import datetime as _dt
import functools
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from torch import nn
from tqdm.auto import tqdm

from bitplan._io import atomic_path, atomic_write_json
from bitplan.errors import BitplanError
from bitplan.formats import ActFormat, KVFormat, WeightFormat, parse_act, parse_kv, parse_weight
from bitplan.graph import ModelGraph, build_graph
from bitplan.profiles._fingerprint import device_fingerprint
from bitplan.profiles._table import HardwareProfile, HWRow, ProfileMeta, arrow_to_rows, rows_to_arrow
from bitplan.profiles._timing import Timing, copies_for, quantiles, time_passes

__all__ = ["decode_ms_per_token", "profile_hw", "stubbed"]

_log = logging.getLogger("bitplan")

DEFAULT_WEIGHTS = ("bf16", "w8c", "w8g64a", "w4g64a", "w4g32a", "w3g64a", "w3g32a", "w2g64a")
DEFAULT_ACTS = ("a16", "a8t", "a4t")
DEFAULT_KV = ("k16v16", "k8v8", "k8v4", "k4v4", "k4v2", "k2v4", "k2v2")


class _Stub(nn.Module):
    """Stands in for a linear in the skeleton: right output shape, next to no work."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


@contextmanager
def stubbed(model: nn.Module, graph: ModelGraph) -> Iterator[int]:
    """Every decision-unit linear of ``model`` replaced by a :class:`_Stub` (restored on exit); yields their count."""
    paths = [(m.path, m.out_features) for u in graph.units("tensor") for m in u.members]
    saved = {p: model.get_submodule(p) for p, _ in paths}
    try:
        for p, out in paths:
            model.set_submodule(p, _Stub(out))
        yield len(paths)
    finally:
        for p, mod in saved.items():
            model.set_submodule(p, mod)


def _prompt(model: nn.Module, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    vocab = int(getattr(model.config, "vocab_size"))  # noqa: B009
    g = torch.Generator().manual_seed(seed)
    return torch.randint(min(100, vocab // 2), vocab, (batch, max(1, length)), generator=g)


def _generate_s(model: Any, ids: torch.Tensor, new: int) -> float:
    sync = torch.cuda.synchronize if ids.device.type == "cuda" else (lambda: None)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    sync()
    t = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    sync()
    return time.perf_counter() - t


def decode_ms_per_token(model: Any, ids: torch.Tensor, new: int = 32, reps: int = 5) -> tuple[float, list[float]]:
    """Median over ``reps`` of ``(t(generate new+1) - t(generate 1)) / new`` in ms; and the samples."""
    _generate_s(model, ids, 2)  # warm-up
    samples = []
    for _ in range(reps):
        long, short = _generate_s(model, ids, new + 1), _generate_s(model, ids, 1)
        samples.append(max(0.0, long - short) * 1e3 / new)
    return statistics.median(samples), samples


# -- linear timings -----------------------------------------------------------------------------------
def _linear_rows(
    shape: tuple[int, int], fmt: WeightFormat, act: ActFormat, m: int, phase: str, name: str,
    device: torch.device, dtype: torch.dtype, budget_s: float,
) -> list[HWRow]:  # fmt: skip
    """One row per kernel that can run ``fmt``/``act`` on ``shape`` (``torch`` for the model's own 16-bit linear)."""
    from bitplan.kernels import LinearSpec, kernels_for
    from bitplan.quantizers import QuantLinear

    out_f, in_f = shape
    g = torch.Generator().manual_seed(out_f * 7919 + in_f)
    base = nn.Linear(in_f, out_f, bias=False, dtype=torch.float32)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.02)
    x = torch.randn(m, in_f, generator=g).to(device=device, dtype=dtype)
    common = HWRow("linear", name=name, phase=phase, m=m, out_features=out_f, in_features=in_f, weight=str(fmt), act=str(act))
    if not fmt.is_quantized and not act.is_quantized:  # the model keeps its nn.Linear
        lin = base.to(device=device, dtype=dtype)
        nbytes = lin.weight.numel() * lin.weight.element_size()
        t = _time_modules([copy.deepcopy(lin) for _ in range(copies_for(nbytes))], x, device, budget_s)
        return [replace(common, kernel="torch", median_ms=t.median_ms, p10_ms=t.p10_ms, p90_ms=t.p90_ms, reps=t.reps, resident_bytes=nbytes)]
    spec = LinearSpec(fmt, act, out_f, in_f)
    canonical = QuantLinear.from_float(base, fmt, act).to(device)
    rows = []
    for k in kernels_for(spec, device):
        one = copy.deepcopy(canonical).set_kernel(k)
        t = _time_modules([one] + [copy.deepcopy(one) for _ in range(copies_for(one.packed_nbytes) - 1)], x, device, budget_s)
        rows.append(replace(common, kernel=k.name, median_ms=t.median_ms, p10_ms=t.p10_ms, p90_ms=t.p90_ms, reps=t.reps,
                            resident_bytes=k.resident_nbytes(spec)))  # fmt: skip
    return rows


def _time_modules(mods: Sequence[nn.Module], x: torch.Tensor, device: torch.device, budget_s: float) -> Timing:
    calls: list[Callable[[], object]] = [functools.partial(mod, x) for mod in mods]
    with torch.inference_mode():
        return time_passes(calls, device=device, budget_s=budget_s)


# -- the profile --------------------------------------------------------------------------------------
def _linear_work(
    graph: ModelGraph, weights: Sequence[WeightFormat], acts: Sequence[ActFormat], batch: int, chunk: int
) -> list[tuple[tuple[int, int], WeightFormat, ActFormat, int, str, str]]:
    shapes = sorted({(m.out_features, m.in_features) for u in graph.units("tensor") for m in u.members})
    work = []
    for phase, m in (("decode", batch), ("prefill", batch * chunk)):
        for shape in shapes:
            fitted = list(dict.fromkeys(w.fit_group(shape[1]) for w in weights))
            work += [(shape, w, a, m, phase, "") for w in fitted for a in acts]
        if graph.lm_head is not None:  # the head's input is never quantized
            head = (graph.lm_head.out_features, graph.lm_head.in_features)
            work += [(head, w, ActFormat(), m, phase, "lm_head") for w in dict.fromkeys(w.fit_group(head[1]) for w in weights)]
    return work


def profile_hw(
    model: nn.Module,
    *,
    device: str | torch.device = "cpu",
    batch: int = 1,
    contexts: Sequence[int] = (128, 1024),
    chunk: int = 256,
    weights: Sequence[str] = DEFAULT_WEIGHTS,
    acts: Sequence[str] = DEFAULT_ACTS,
    kv: Sequence[str] = DEFAULT_KV,
    output: str | os.PathLike[str] | None = None,
    model_name: str = "",
    new_tokens: int = 32,
    budget_s: float = 0.4,
    progress: bool = True,
) -> HardwareProfile:
    """Measure ``model`` on ``device`` (see the module docstring); resumable when ``output`` is given.

    ``model`` runs in its own dtype (load it in the dtype you deploy: bfloat16 on CPUs with AMX).
    ``contexts``: cached tokens at which decode is timed (a prediction interpolates between them).
    """
    dev = torch.device(device)
    if batch < 1 or chunk < 1 or not contexts or min(contexts) < 1:
        raise BitplanError(f"--batch, --chunk and every context must be at least 1, got {batch}, {chunk}, {list(contexts)}")
    wf = list(dict.fromkeys(parse_weight(w).compute_format for w in weights))  # d6/d8 run as their fp16-scale twin
    af = list(dict.fromkeys([ActFormat(), *(parse_act(a) for a in acts)]))
    kf = list(dict.fromkeys([KVFormat(), *(parse_kv(k) for k in kv)]))
    graph = build_graph(model)
    for k in kf:
        k.check_applicable(graph.head_dim)
    dtype = next(model.parameters()).dtype
    model.to(dev)
    meta = ProfileMeta(
        device=device_fingerprint(dev), model_fingerprint=graph.fingerprint,
        model_name=model_name or str(getattr(model, "name_or_path", "") or ""), batch=batch,
        contexts=tuple(sorted(set(int(c) for c in contexts))), chunk=chunk, dtype=str(dtype).removeprefix("torch."),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        extra={"weights": [str(w) for w in wf], "acts": [str(a) for a in af], "kv": [str(k) for k in kf], "new_tokens": new_tokens,
               "budget_s": budget_s},
    )  # fmt: skip
    store = None
    if output is not None:
        store = _Partial(output, meta)
        if Path(output).exists():  # a finished profile of the same inputs: reuse its rows (a rerun adding formats)
            old = HardwareProfile.load(output)
            if old.meta.identity() == meta.identity():
                store.seed(list(old.rows))
    rows: dict[tuple[Any, ...], HWRow] = {r.key: r for r in (store.rows() if store else [])}
    done_groups = set(store.groups()) if store else set()

    lin_work = _linear_work(graph, wf, af, batch, meta.chunk)
    skel_work: list[tuple[str, int, KVFormat]] = [("decode", c, k) for c in meta.contexts for k in kf] + [("prefill", meta.chunk, KVFormat())]
    bar = tqdm(total=len(lin_work) + len(skel_work) + 1, desc="profile-hw", unit="item", disable=not progress)

    def keep(group: str, new: list[HWRow]) -> None:
        for r in new:
            rows[r.key] = r
        if store is not None:
            store.append(group, new)
        done_groups.add(group)

    for shape, w, a, m, phase, name in lin_work:
        group = f"linear/{phase}/{name}/{shape[0]}x{shape[1]}/{w}/{a}"
        if group not in done_groups:
            bar.set_postfix_str(f"{name or 'unit'} {shape[0]}x{shape[1]} {w}/{a} M={m}")
            keep(group, _linear_rows(shape, w, a, m, phase, name, dev, dtype, budget_s))
        bar.update()

    vocab_ids = _prompt(model, batch, 1).to(dev)
    hidden = torch.randn(batch, 1, graph.hidden_size, dtype=dtype, device=dev)
    if "stub" not in done_groups:
        stub = _Stub(graph.hidden_size)
        t_dec = _time_modules([stub], hidden, dev, budget_s)
        t_pre = _time_modules([stub], hidden.expand(batch, meta.chunk, graph.hidden_size).contiguous(), dev, budget_s)
        keep("stub", [HWRow("stub", phase="decode", m=batch, median_ms=t_dec.median_ms, p10_ms=t_dec.p10_ms, p90_ms=t_dec.p90_ms, reps=t_dec.reps),
                      HWRow("stub", phase="prefill", m=batch * meta.chunk, median_ms=t_pre.median_ms, p10_ms=t_pre.p10_ms, p90_ms=t_pre.p90_ms, reps=t_pre.reps)])  # fmt: skip
    if "fixed" not in done_groups:
        keep("fixed", _fixed_rows(model, graph, vocab_ids, hidden, dev, budget_s))
    bar.update()

    from bitplan.kvcache import install_kv_plan, uninstall_kv_plan

    with stubbed(model, graph):
        for phase, ctx, k in skel_work:
            group = f"skeleton/{phase}/{ctx}/{k}"
            if group not in done_groups:
                bar.set_postfix_str(f"skeleton {phase} context {ctx} {k}")
                if k.is_quantized:
                    install_kv_plan(model, [k] * graph.num_layers)
                try:
                    if phase == "decode":
                        ids = _prompt(model, batch, ctx - new_tokens // 2).to(dev)
                        med, samples = decode_ms_per_token(model, ids, new_tokens)
                    else:
                        ids = _prompt(model, batch, ctx).to(dev)
                        _generate_s(model, ids, 1)
                        samples = [_generate_s(model, ids, 1) * 1e3 for _ in range(5)]
                    t = quantiles(samples)
                finally:
                    uninstall_kv_plan(model)
                keep(group, [HWRow("skeleton", phase=phase, m=batch if phase == "decode" else batch * ctx, context=ctx, kv=str(k),
                                   median_ms=t.median_ms, p10_ms=t.p10_ms, p90_ms=t.p90_ms, reps=t.reps)])  # fmt: skip
            bar.update()
    bar.close()
    profile = HardwareProfile(tuple(rows.values()), meta)
    if output is not None:
        profile.save(output)
        if store is not None:
            store.cleanup()
    return profile


def _fixed_rows(model: Any, graph: ModelGraph, ids: torch.Tensor, hidden: torch.Tensor, dev: torch.device, budget_s: float) -> list[HWRow]:
    """The pieces no plan changes, timed alone (for the report; predictions use the skeleton)."""
    pieces: list[tuple[str, Callable[[], object]]] = []
    if graph.embed_path:
        emb = model.get_submodule(graph.embed_path)
        pieces.append(("embedding", lambda: emb(ids)))
    layer0 = model.get_submodule(graph.layers[0].path)
    for attr in ("input_layernorm", "ln_1"):
        norm = getattr(layer0, attr, None)
        if isinstance(norm, nn.Module):
            pieces.append(("norm", functools.partial(norm, hidden)))
            break
    logits = torch.randn(hidden.shape[0], graph.vocab_size, dtype=torch.float32, device=dev)
    pieces.append(("sampling", lambda: torch.argmax(logits, dim=-1)))
    rows = []
    with torch.inference_mode():
        for name, fn in pieces:
            t = time_passes([fn], device=dev, budget_s=budget_s)
            rows.append(HWRow("fixed", name=name, m=hidden.shape[0], median_ms=t.median_ms, p10_ms=t.p10_ms, p90_ms=t.p90_ms, reps=t.reps))
    return rows


class _Partial:
    """Crash-safe progress: ``<output>.partial/`` holding one Parquet part per finished group."""

    def __init__(self, output: str | os.PathLike[str], meta: ProfileMeta) -> None:
        import json
        import shutil

        self.dir = Path(output).with_name(Path(output).name + ".partial")
        ident = self.dir / "identity.json"
        if self.dir.is_dir():
            try:
                same = json.loads(ident.read_text()) == meta.identity()
            except (OSError, ValueError):
                same = False
            if not same:
                shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if not ident.exists():
            atomic_write_json(ident, meta.identity())
        self.meta = meta

    def _parts(self) -> list[Path]:
        return sorted(self.dir.glob("part-*.parquet"))

    def _read(self) -> Iterator[tuple[str, list[HWRow]]]:
        for p in self._parts():
            try:
                t = pq.read_table(p)
                yield (t.schema.metadata or {}).get(b"group", b"").decode(), arrow_to_rows(t, str(p))
            except Exception:  # noqa: BLE001  (an unreadable part is measured again)
                continue

    def rows(self) -> list[HWRow]:
        return [r for _, rs in self._read() for r in rs]

    def groups(self) -> list[str]:
        return [g for g, _ in self._read()]

    def seed(self, rows: list[HWRow]) -> None:
        """Rows of a finished profile with the same identity (a rerun that adds formats)."""
        if not self._parts() and rows:
            by: dict[str, list[HWRow]] = {}
            for r in rows:
                by.setdefault(_group_of(r), []).append(r)
            for g, rs in by.items():
                self.append(g, rs)

    def append(self, group: str, rows: list[HWRow]) -> None:
        n = len(self._parts())
        table = rows_to_arrow(rows).replace_schema_metadata({"group": group})
        with atomic_path(self.dir / f"part-{n:06d}.parquet") as tmp:
            pq.write_table(table, tmp)

    def cleanup(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


def _group_of(r: HWRow) -> str:
    if r.part == "linear":
        return f"linear/{r.phase}/{r.name}/{r.out_features}x{r.in_features}/{r.weight}/{r.act}"
    if r.part == "skeleton":
        return f"skeleton/{r.phase}/{r.context}/{r.kv}"
    return r.part
