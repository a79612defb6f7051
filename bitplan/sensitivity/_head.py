"""Sensitivity of the output head: the measured KL of quantizing ``lm_head`` alone, per weight option.

Why the head gets its own rows. It is one linear, but a big one read on every decoded token: on
SmolLM2-135M the 49152 x 576 head holds 21% of the weights, and on a 2-core CPU its dense fp32 GEMV takes
8.2 ms of a ~59 ms token where a packed int4 kernel takes 2.1 ms (bench/RESULTS.md, profiles-head). llama.cpp's mixes treat it apart
too (``output.weight`` at q6_k in Q4_K_M).

Why measured and not Fisher. The head's output *is* the logits, so its error is cheap to measure exactly:
one forward per option over the calibration windows, KL(p_ref || p_quant) at every position that predicts
a token (the last has no label: ``windows * (window - 1)`` tokens, as every other row), and the change of
the mean NLL. Where the head is tied to the input embedding, quantizing it quantizes the embedding too
(``apply_plan`` packs both), so the row measures both changes together, which is what a plan with a
quantized head does. Each option's packed modules are built once and swapped in per batch; the reference
forward is shared by all options, so the cost is ``options + 1`` forwards of the calibration tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from bitplan.errors import ModelError
from bitplan.formats import ActFormat
from bitplan.graph import ModelGraph, build_graph
from bitplan.loading import _param_device
from bitplan.sensitivity._calib import CalibData
from bitplan.sensitivity._candidates import Candidates
from bitplan.sensitivity._rows import ScoreRow

__all__ = ["HEAD", "head_keys", "head_scores"]

HEAD = "lm_head"


def head_keys(graph: ModelGraph, candidates: Candidates) -> set[tuple[str, ...]]:
    """Row keys the head's options produce (none for a model without an output projection)."""
    if graph.lm_head is None:
        return set()
    return {(HEAD, "weight", str(o.format), o.method, "kl") for o in _options(graph, candidates)}


def _options(graph: ModelGraph, candidates: Candidates) -> list[Any]:
    from bitplan.quantizers import get_weight_quantizer

    assert graph.lm_head is not None
    opts = candidates.weight_options(graph.lm_head.in_features)
    return [o for o in opts if o.format.is_quantized and not get_weight_quantizer(o.method).needs_calibration]


def _packed(model: nn.Module, graph: ModelGraph, option: Any) -> list[tuple[str, nn.Module]]:
    """(path, module) pairs that quantize the head (and a tied embedding) to ``option``; reference kernel."""
    from bitplan.kernels import choose_kernel
    from bitplan.quantizers import QuantEmbedding, QuantLinear

    assert graph.lm_head is not None
    head = model.get_submodule(graph.lm_head.path)
    with torch.no_grad():
        q = QuantLinear.from_float(head, option.format, ActFormat(), method=option.method)
        q.set_kernel(choose_kernel(q.spec, next(iter(q.buffers())).device, "reference"))
        out: list[tuple[str, nn.Module]] = [(graph.lm_head.path, q)]
        if graph.tied_embeddings:
            emb = model.get_submodule(graph.embed_path or "")
            if not isinstance(emb, nn.Embedding):
                raise ModelError(
                    f"the head is tied to {graph.embed_path or 'an embedding'}, which is not an nn.Embedding"
                )
            out.append((graph.embed_path or "", QuantEmbedding.from_float(emb, option.format, option.method)))
    return out


@contextmanager
def _swapped(model: nn.Module, modules: Sequence[tuple[str, nn.Module]]) -> Iterator[None]:
    saved = [(path, model.get_submodule(path)) for path, _ in modules]
    try:
        for path, mod in modules:
            model.set_submodule(path, mod)
        yield
    finally:
        for path, mod in saved:
            model.set_submodule(path, mod)


def _logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(ids).logits[:, :-1].float(), dim=-1)


def head_scores(
    model: nn.Module,
    calib: CalibData,
    candidates: Candidates,
    *,
    batch_size: int = 4,
    skip: set[tuple[str, ...]] | None = None,
    progress: bool = True,
    on_rows: Callable[[list[ScoreRow]], None] | None = None,
) -> list[ScoreRow]:
    """Measured rows for every calibration-free weight option of the head not in ``skip`` (see module doc).

    The model runs in its own dtype and is restored exactly (the head and embedding modules are swapped
    back). ``on_rows`` gets the rows when they are done (one call: every option shares the batches)."""
    from tqdm.auto import tqdm

    graph = build_graph(model)
    if graph.lm_head is None:
        return []
    skip = skip or set()
    options = [
        o for o in _options(graph, candidates) if (HEAD, "weight", str(o.format), o.method, "kl") not in skip
    ]
    if not options:
        return []
    start = time.perf_counter()
    device = _param_device(model)
    packed = [_packed(model, graph, o) for o in options]
    kl = torch.zeros(len(options), dtype=torch.float64)
    nll = torch.zeros(len(options) + 1, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        batches = calib.batches(batch_size)
        for ids in tqdm(batches, desc="head", unit="batch", disable=not progress):
            ids = ids.to(device)
            labels = ids[:, 1:].unsqueeze(-1)
            with torch.inference_mode():
                ref = _logprobs(model, ids)
                nll[0] -= ref.gather(-1, labels).sum().double()
                p_ref = ref.exp()
                for i, mods in enumerate(packed):
                    with _swapped(model, mods):
                        lp = _logprobs(model, ids)
                    kl[i] += (p_ref * (ref - lp)).sum().double()
                    nll[i + 1] -= lp.gather(-1, labels).sum().double()
    finally:
        model.train(was_training)
    tokens = calib.num_windows * (calib.window - 1)
    seconds = (time.perf_counter() - start) / len(options)
    head = graph.lm_head
    rows = [
        ScoreRow(HEAD, -1, "weight", str(o.format), o.method, "kl", max(0.0, float(kl[i]) / tokens),
                 loss_delta=float(nll[i + 1] - nll[0]) / tokens, params=head.numel,
                 bits=o.format.storage_bits(head.out_features, head.in_features) / head.numel, tokens=calib.tokens,
                 seconds=seconds)
        for i, o in enumerate(options)
    ]  # fmt: skip
    if on_rows is not None:
        on_rows(rows)
    return rows
