"""Measured sensitivity (``_measure``): every row equals a real evaluation with only that thing quantized.

Ground truth is :func:`bitplan.eval.evaluate` on a copy of the model with exactly one unit quantized (packed
``QuantLinear``), one layer's linear inputs fake-quantized, or one layer's KV cache quantized through the real
``MixedPrecisionKVCache`` fed in chunks. The fast engine (reused prefix activations, logit differences
through the head, one-pass two-part KV attention) must reproduce it in fp32 to ~1e-4 relative.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from bitplan.eval import _chunk_spans, evaluate
from bitplan.formats import parse_act, parse_kv
from bitplan.graph import build_graph
from bitplan.kvcache import MixedKVLayer, install_kv_plan
from bitplan.quantizers import QuantLinear, fake_quantize_act
from bitplan.sensitivity._calib import CalibData
from bitplan.sensitivity._candidates import Candidates
from bitplan.sensitivity._kvattn import eval_chunk, eval_chunk_layout, stored_before
from bitplan.sensitivity._measure import measured_scores
from bitplan.sensitivity._rows import ScoreRow
from tests._models import make_random_lm

WINDOW = 128
WEIGHTS = ("w8g64a", "w4g64a", "w2g64a")
ACTS = ("a8t", "a4t")
# per-channel K (chunk 32), per-token only (chunk 8), a 16-bit side, swapped axes, a recent window that is
# not a multiple of the group (chunk 8, flush at multiples of 32 past 40 tokens), a small group
KV = ("k8v8", "k2v2", "k16v2", "k4v16", "k2tv4c", "k4v2r40", "k2v2g16r8", "k3v3s1", "k2v4g16r8s4")
REL = 2e-4  # fp32: the engine and evaluate() differ by float rounding only
ABS = 3e-8  # below ~1e-7 nats, evaluate()'s own fp32 KL is off by ~1e-8 (k8v8: 1.6e-8 on transformers 5.25)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on a busy CPU: one thread avoids OpenMP spin-waits
    yield
    torch.set_num_threads(before)


def _model(arch: str = "llama") -> Any:
    model = make_random_lm(arch)
    with torch.no_grad():  # peakier next-token distributions than random init gives: larger, clearer KLs
        model.get_output_embeddings().weight.mul_(8)
    return model


@pytest.fixture(scope="module")
def setup() -> dict[str, Any]:
    torch.set_num_threads(1)
    model = _model()
    calib = CalibData(torch.randint(0, 256, (4, WINDOW), generator=torch.Generator().manual_seed(0)))
    cand = Candidates.parse(WEIGHTS, ACTS, KV)
    rows = measured_scores(model, calib, cand, dtype=torch.float32, batch_size=3, progress=False)
    ref = evaluate(model, tokens=calib.windows.reshape(-1), window=WINDOW, progress=False)
    return {
        "model": model,
        "calib": calib,
        "cand": cand,
        "rows": {r.key[:3]: r for r in rows},
        "all": rows,
        "ref": ref,
    }


def _evaluate(setup: dict[str, Any], quantized: Any) -> tuple[float, float]:
    w = setup["calib"].windows
    e = evaluate(
        quantized, tokens=w.reshape(-1), window=WINDOW, reference=setup["model"], batch_size=2, progress=False
    )
    assert e.kl is not None
    return e.kl, e.nll - setup["ref"].nll


def _check(row: ScoreRow, kl: float, dnll: float) -> None:
    assert row.score == pytest.approx(kl, rel=REL, abs=ABS), row
    assert row.loss_delta == pytest.approx(dnll, rel=REL, abs=1e-7), row
    assert row.tokens == 4 * (WINDOW - 1) and row.method == "kl" and row.seconds > 0


def test_rows_cover_every_option(setup: dict[str, Any]) -> None:
    graph = build_graph(setup["model"])
    units = graph.units("fused")
    assert len(setup["all"]) == len(units) * len(WEIGHTS) + graph.num_layers * (len(ACTS) + len(KV))
    row = setup["rows"][("layers.1.mlp.gate_up_proj", "weight", "w4g64a")]
    assert (row.layer, row.quantizer, row.params) == (1, "rtn", 64 * 256)
    assert row.bits == pytest.approx(4 + 32 / 64)
    kv = setup["rows"][("layers.0.kv", "kv", "k2v2")]
    assert (kv.layer, kv.quantizer, kv.params) == (0, "", 0)


@pytest.mark.parametrize("unit", ["layers.0.self_attn.qkv_proj", "layers.1.mlp.down_proj"])
@pytest.mark.parametrize("fmt", ["w4g64a", "w2g64a"])
def test_weight_row_equals_evaluate(setup: dict[str, Any], unit: str, fmt: str) -> None:
    q = copy.deepcopy(setup["model"])
    for member in build_graph(q).unit_map()[unit].members:
        q.set_submodule(
            member.path, QuantLinear.from_float(q.get_submodule(member.path), fmt, "a16", method="rtn")
        )
    _check(setup["rows"][(unit, "weight", fmt)], *_evaluate(setup, q))


@pytest.mark.parametrize("layer", [0, 1])
def test_act_row_equals_evaluate(setup: dict[str, Any], layer: int) -> None:
    q = copy.deepcopy(setup["model"])
    fmt = parse_act("a4t")
    for lin in build_graph(q).layers[layer].linears:
        q.get_submodule(lin.path).register_forward_pre_hook(lambda m, a: (fake_quantize_act(a[0], fmt),))
    _check(setup["rows"][(f"layers.{layer}.acts", "act", "a4t")], *_evaluate(setup, q))


@pytest.mark.parametrize("fmt", KV)
def test_kv_row_equals_chunked_cache_evaluation(setup: dict[str, Any], fmt: str) -> None:
    for layer in (0, 1):
        q = copy.deepcopy(setup["model"])
        install_kv_plan(q, [fmt if i == layer else "k16v16" for i in range(2)])
        _check(setup["rows"][(f"layers.{layer}.kv", "kv", fmt)], *_evaluate(setup, q))


@pytest.mark.parametrize("fmt", ["k2v2", "k16v2", "k4v2r40", "k2v2g16r8", "k4v4r3", "k3v3s1", "k4v2r8s4", "k16v2s5"])
def test_stored_before_follows_the_cache_flush_rule(fmt: str) -> None:
    f = parse_kv(fmt)
    first, chunk = eval_chunk_layout(f)
    assert chunk == eval_chunk(f) and 0 <= first < chunk
    layer = MixedKVLayer(f)
    stored = stored_before(f, 200)
    x = torch.randn(1, 1, 200, 16)
    for s, e in _chunk_spans(200, first, chunk):
        assert int(stored[s]) == layer.stored_tokens, (fmt, s)
        assert bool((stored[s:e] == stored[s]).all())
        layer.update(x[:, :, s:e], x[:, :, s:e])


def test_scores_grow_as_bits_shrink(setup: dict[str, Any]) -> None:
    rows = setup["all"]

    def total(kind: str, fmt: str) -> float:
        return sum(r.score for r in rows if r.kind == kind and r.format == fmt)

    assert total("weight", "w8g64a") < total("weight", "w4g64a") < total("weight", "w2g64a")
    assert total("act", "a8t") < total("act", "a4t")
    assert total("kv", "k8v8") < total("kv", "k4v2r40") < total("kv", "k2v2")
    assert all(r.score >= 0 for r in rows)


def test_skip_on_rows_and_batched_kv_variants(setup: dict[str, Any]) -> None:
    model, calib = setup["model"], setup["calib"]
    cand = Candidates.parse(["w4g64a", "w2g64a"], ["a4t"], ["k2v2", "k16v2", "k4v2r40"])
    graph = build_graph(model)
    keep_units = {"layers.1.self_attn.o_proj", "layers.1.kv"}
    skip = {
        (u.name, "weight", f, "rtn", "kl")
        for u in graph.units()
        for f in ("w4g64a", "w2g64a")
        if u.name not in keep_units
    }
    skip |= {("layers.0.kv", "kv", k, "", "kl") for k in ("k2v2", "k16v2", "k4v2r40")}
    skip.add(("layers.1.self_attn.o_proj", "weight", "w2g64a", "rtn", "kl"))
    groups: list[list[ScoreRow]] = []
    rows = measured_scores(model, calib, cand, kinds=("weight", "kv"), dtype=torch.float32, skip=skip,
                           on_rows=groups.append, progress=False, kv_batch=2)  # fmt: skip
    assert [[r.key[:3] for r in g] for g in groups] == [
        [("layers.1.self_attn.o_proj", "weight", "w4g64a")],
        [("layers.1.kv", "kv", "k2v2"), ("layers.1.kv", "kv", "k16v2"), ("layers.1.kv", "kv", "k4v2r40")],
    ]
    assert rows == [r for g in groups for r in g]
    for r in rows:  # same numbers as the unbatched full run
        assert r.score == pytest.approx(setup["rows"][r.key[:3]].score, rel=1e-6)
    # a predicate works too, and skipping everything computes nothing
    assert measured_scores(model, calib, cand, skip=lambda key: True, progress=False) == []


def _snapshot(model: Any) -> tuple[dict[str, torch.Tensor], dict[str, bool], int, str]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: m.training for n, m in model.named_modules()}
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    return state, flags, hooks, model.config._attn_implementation


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> None:
    assert a[0].keys() == b[0].keys()
    for k in a[0]:
        assert a[0][k].dtype == b[0][k].dtype and torch.equal(a[0][k], b[0][k]), k
    assert a[1:] == b[1:]


def test_model_unchanged_after_a_bf16_run() -> None:
    model = _model()
    model.model.layers[1].train()  # mixed training flags must come back as they were
    before = _snapshot(model)
    calib = CalibData(torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1)))
    cand = Candidates.parse(["w4g64a"], ["a8t"], ["k4v4"])
    rows = measured_scores(model, calib, cand, progress=False)  # bf16 default: params cast, then restored
    assert len(rows) == 4 * 2 + 2 + 2 and all(r.score > 0 for r in rows)
    _same(before, _snapshot(model))


@pytest.mark.parametrize("at_call", [4, 7])  # layer 1's MLP runs once per row: o_proj swapped / acts hooked
def test_model_unchanged_after_an_interruption(at_call: int) -> None:
    model = _model()
    before = _snapshot(model)
    calib = CalibData(torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1)))
    calls = []

    class Stop(Exception):
        pass

    def bomb(module: Any, args: Any, out: Any) -> None:
        calls.append(1)
        if len(calls) == at_call:
            raise Stop

    handle = model.model.layers[1].mlp.register_forward_hook(bomb)
    try:
        with pytest.raises(Stop):
            measured_scores(model, calib, Candidates.parse(["w4g64a"], ["a8t"], []), progress=False)
    finally:
        handle.remove()
    _same(before, _snapshot(model))


def test_fallback_paths_match_the_fast_path() -> None:
    """``reuse=False`` (full forwards, real cache) equals the replayed layers; GPT-2 (no
    ``past_key_values`` keyword) measures KV through the real cache and matches evaluate()."""
    model = _model()
    calib = CalibData(torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(2)))
    cand = Candidates.parse(["w2g64a"], ["a4t"], ["k2v2"])
    fast = measured_scores(model, calib, cand, dtype=torch.float32, progress=False)
    slow = measured_scores(model, calib, cand, dtype=torch.float32, progress=False, reuse=False)
    assert [r.key for r in fast] == [r.key for r in slow]
    for a, b in zip(fast, slow, strict=True):
        assert a.score == pytest.approx(b.score, rel=REL, abs=ABS), a.key

    gpt2 = _model("gpt2")
    rows = measured_scores(
        gpt2, calib, Candidates.parse([], [], ["k2v2"]), kinds=("kv",), dtype=torch.float32, progress=False
    )
    q = copy.deepcopy(gpt2)
    install_kv_plan(q, ["k16v16", "k2v2"])
    e = evaluate(q, tokens=calib.windows.reshape(-1), window=64, reference=gpt2, progress=False)
    assert rows[1].score == pytest.approx(e.kl, rel=REL, abs=ABS)


def test_kv_rows_take_the_one_pass_engine(setup: dict[str, Any]) -> None:
    """The one-pass KV engine needs the layers' cache keyword (``cache`` from transformers 5.25 on,
    ``past_key_values`` before); missing it silently falls back to ~16x slower chunked forwards."""
    from bitplan.sensitivity._measure import _Engine, _working_state

    model = setup["model"]
    with _working_state(model, torch.float32), torch.no_grad():
        engine = _Engine(model, build_graph(model), setup["calib"], batch_size=3, dtype=torch.float32, reuse=True,
                         compile=False, progress=False)  # fmt: skip
    assert engine.kv_fast and engine.cache_kwarg in ("cache", "past_key_values")
