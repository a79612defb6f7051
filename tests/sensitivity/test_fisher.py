"""Fisher sensitivity: coverage, monotonicity, agreement with the measured KL, the caller's model untouched."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import cast

import pytest
import torch

from bitplan.formats import parse_act, parse_weight
from bitplan.graph import build_graph
from bitplan.quantizers import fake_quantize_act, get_weight_quantizer
from bitplan.sensitivity._calib import CalibData
from bitplan.sensitivity._candidates import Candidates
from bitplan.sensitivity._fisher import fisher_scores
from bitplan.sensitivity._fisher_hooks import _fake_quantize, _v_dots
from tests._models import make_random_lm


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and on a busy machine OpenMP barriers make them ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    # initializer_range 0.1: peaked next-token distributions and attention, unlike the near-uniform 0.02
    return make_random_lm("llama", initializer_range=0.1)


def _calib(windows: int, length: int = 64, seed: int = 1) -> CalibData:
    return CalibData(torch.randint(0, 256, (windows, length), generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("granularity", ["fused", "tensor"])
def test_rows_cover_every_unit_option_and_layer_act(model: torch.nn.Module, granularity: str) -> None:
    cands = Candidates()
    calib = _calib(4)
    rows = fisher_scores(model, calib, cands, granularity=granularity, progress=False)  # type: ignore[arg-type]
    units = build_graph(model).units(granularity)  # type: ignore[arg-type]
    want_w = {(u.name, str(o.format), o.method) for u in units for o in cands.weight_options(u.in_features)}
    want_a = {(f"layers.{i}.acts", str(a), "") for i in range(2) for a in cands.acts}
    got = [(r.unit, r.format, r.quantizer) for r in rows]
    assert len(got) == len(set(got)) == len(want_w) + len(want_a)
    assert {k for k, r in zip(got, rows, strict=True) if r.kind == "weight"} == want_w
    assert {k for k, r in zip(got, rows, strict=True) if r.kind == "act"} == want_a
    by_name = {u.name: u for u in units}
    for r in rows:
        assert r.method == "fisher" and math.isfinite(r.score) and r.score >= 0
        assert r.tokens == 4 * 63 and r.seconds >= 0
        if r.kind == "weight":
            u = by_name[r.unit]
            assert r.layer == u.layer and r.params == u.numel
            assert r.bits == parse_weight(r.format).bits_per_weight(u.in_features)
        else:
            assert r.bits == parse_act(r.format).bits and r.quantizer == ""
    assert any(r.score > 0 for r in rows)


def test_scores_fall_with_more_bits(model: torch.nn.Module) -> None:
    cands = Candidates.parse(["w2g64a", "w3g64a", "w4g64a", "w8g64a"], ["a4t", "a8t"])
    rows = fisher_scores(model, _calib(4), cands, dtype=torch.float32, progress=False)
    total = {f: sum(r.score for r in rows if r.format == f) for f in ("w2g64a", "w3g64a", "w4g64a", "w8g64a")}
    assert total["w2g64a"] > total["w3g64a"] > total["w4g64a"] > total["w8g64a"] > 0
    score = {(r.unit, r.format): r.score for r in rows}
    for unit in {r.unit for r in rows if r.kind == "weight"}:
        assert score[(unit, "w2g64a")] > score[(unit, "w8g64a")]
    for layer in range(2):
        assert score[(f"layers.{layer}.acts", "a4t")] > score[(f"layers.{layer}.acts", "a8t")] > 0


def _ranks(x: list[float]) -> torch.Tensor:
    return torch.tensor(x).argsort().argsort().double()


def test_agrees_with_measured_kl(model: torch.nn.Module) -> None:
    """Quantize one unit (or one layer's inputs) at a time and measure the mean KL in float64."""
    calib = _calib(16)
    cands = Candidates.parse(["w8g64a", "w4g64a"], ["a8t"])
    rows = fisher_scores(model, calib, cands, dtype=torch.float32, progress=False, seed=3)
    ref_model = copy.deepcopy(model).double()
    ids = calib.windows

    def mean_kl() -> float:
        with torch.no_grad():
            lp = ref_model(ids).logits[:, :-1].log_softmax(-1)
        return float((ref.exp() * (ref - lp)).sum(-1).mean())

    with torch.no_grad():
        ref = ref_model(ids).logits[:, :-1].log_softmax(-1)
    units = build_graph(model).unit_map()
    fisher, measured = [], []
    for r in rows:
        if r.kind == "weight":
            saved = []
            for m in units[r.unit].members:
                mod = ref_model.get_submodule(m.path)
                saved.append(cast(torch.Tensor, mod.weight).data)
                q = get_weight_quantizer(r.quantizer).quantize(saved[-1].float(), parse_weight(r.format))
                mod.weight.data = q.dequantize(torch.float64)
            kl = mean_kl()
            for m, w in zip(units[r.unit].members, saved, strict=True):
                ref_model.get_submodule(m.path).weight.data = w
        else:
            act = parse_act(r.format)
            layer = ref_model.get_submodule(f"model.layers.{r.layer}")
            hooks = [
                mod.register_forward_pre_hook(lambda mod, args, a=act: (fake_quantize_act(args[0], a),))
                for mod in layer.modules()
                if isinstance(mod, torch.nn.Linear)
            ]
            kl = mean_kl()
            for h in hooks:
                h.remove()
        fisher.append(r.score)
        measured.append(kl)
        if r.format == "w8g64a":  # second-order regime: within a factor of 2
            assert 0.5 < r.score / kl < 2.0, (r.unit, r.score, kl)
    rf, rm = _ranks(fisher), _ranks(measured)
    spearman = float(torch.corrcoef(torch.stack([rf, rm]))[0, 1])
    assert spearman > 0.9, spearman


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_callers_model_is_unchanged(dtype: torch.dtype) -> None:
    model = make_random_lm("llama", seed=5).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    impl = model.config._attn_implementation
    fisher_scores(model, _calib(2, 32), Candidates.parse(["w4g64a"], ["a8t"]), dtype=dtype, progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert model.training and model.config._attn_implementation == impl
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "qwen2"])
def test_other_architectures(arch: str) -> None:
    model = make_random_lm(arch)
    rows = fisher_scores(model, _calib(2, 32), Candidates.parse(["w4g64a"], ["a8t"]), progress=False)
    assert len(rows) == len(build_graph(model).units()) + 2
    assert all(math.isfinite(r.score) and r.score >= 0 for r in rows)


def test_v_dots_match_explicit_attention_output() -> None:
    b, h, hkv, length, d, n = 2, 4, 2, 5, 3, 2
    gen = torch.Generator().manual_seed(0)
    attn = torch.rand(b, h, length, length, generator=gen, dtype=torch.float64).tril().softmax(-1)
    dv = torch.randn(b * length, n * hkv * d, generator=gen, dtype=torch.float64)
    g_out = torch.randn(b * length, h * d, generator=gen, dtype=torch.float64)
    got = _v_dots(dv, attn, g_out, n)
    for o in range(n):
        v = dv.view(b, length, n, hkv, d)[:, :, o].transpose(1, 2).repeat_interleave(h // hkv, dim=1)
        out = (attn @ v).transpose(1, 2).reshape(b * length, h * d)  # the attention output o_proj reads
        torch.testing.assert_close(got[o], (out * g_out).sum(-1).float())


@pytest.mark.parametrize("method", ["rtn", "rtn-mse"])
def test_fast_fake_quantize_matches_packed_path(method: str) -> None:
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    q = get_weight_quantizer(method)
    for fmt in ("w8g64a", "w4g32", "w3c", "w2g64a", "nf4g64", "fp8"):
        f = parse_weight(fmt)
        assert torch.equal(_fake_quantize(q, w, f), q.quantize(w, f).dequantize(torch.float32))


def test_rejects_kv_and_bad_arguments(model: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="kv"):
        fisher_scores(model, _calib(1), Candidates(), kinds=("kv",), progress=False)
    with pytest.raises(ValueError):
        fisher_scores(model, _calib(1), Candidates(), form="window", progress=False)  # type: ignore[arg-type]


@pytest.mark.parametrize(("arch", "dtype"), [("llama", torch.float32), ("llama", torch.bfloat16), ("gpt2", torch.float32),
                                             ("gpt_neox", torch.float32), ("qwen2", torch.float32)])  # fmt: skip
def test_layer_streamed_pass_equals_full_backward(arch: str, dtype: torch.dtype) -> None:
    """The layer-by-layer backward (stored layer inputs, re-run with grad from the last layer down) gives the
    numbers of one backward through the whole model: same sampled labels, same per-token dots."""
    model = make_random_lm(arch, seed=2, initializer_range=0.1)
    cands = Candidates.parse(["w4g64a", "w2g64a"], ["a8t", "a4t"])
    calib = _calib(3, 48)  # batches of 2 and 1 window
    kw = {"dtype": dtype, "progress": False, "batch_size": 2, "seed": 7}
    streamed = fisher_scores(model, calib, cands, **kw)  # type: ignore[arg-type]
    full = fisher_scores(model, calib, cands, stream=False, **kw)  # type: ignore[arg-type]
    assert [r.key for r in streamed] == [r.key for r in full]
    got, want = torch.tensor([r.score for r in streamed]), torch.tensor([r.score for r in full])
    assert (want > 0).all()
    # fp32: equal (1e-6 for BLAS paths); bf16: streamed, the head runs in the model's fp32, so labels differ
    torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 0.1, atol=0)


def test_holds_one_layers_weight_deltas_at_a_time(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """``Q(W) - W`` of a layer exist only while that layer is scored (the full backward keeps them all)."""
    from bitplan.sensitivity import _fisher_hooks

    live: set[int] = set()
    peak = [0]
    real_deltas, real_release = _fisher_hooks._Scorer._deltas, _fisher_hooks._Scorer.release

    def deltas(self: _fisher_hooks._Scorer, lin: _fisher_hooks._Linear) -> torch.Tensor:
        live.add(lin.layer)
        peak[0] = max(peak[0], len(live))
        return real_deltas(self, lin)

    def release(self: _fisher_hooks._Scorer, layer: int) -> None:
        live.discard(layer)
        real_release(self, layer)

    monkeypatch.setattr(_fisher_hooks._Scorer, "_deltas", deltas)
    monkeypatch.setattr(_fisher_hooks._Scorer, "release", release)
    fisher_scores(model, _calib(2, 32), Candidates.parse(["w4g64a"], []), progress=False)
    assert peak[0] == 1 and not live
    fisher_scores(model, _calib(2, 32), Candidates.parse(["w4g64a"], []), progress=False, stream=False)
    assert peak[0] == 2  # both layers' deltas at once: the check above can fail


def test_falls_back_to_the_full_backward_when_layers_cannot_be_replayed(
    model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from bitplan.sensitivity import _fisher

    cands, calib = Candidates.parse(["w4g64a"], ["a8t"]), _calib(2, 32)
    want = fisher_scores(model, calib, cands, dtype=torch.float32, progress=False, stream=False)
    monkeypatch.setattr(_fisher, "_FINAL_NORMS", ())
    with caplog.at_level("WARNING", logger="bitplan"):
        got = fisher_scores(model, calib, cands, dtype=torch.float32, progress=False)
    assert "full backward" in caplog.text
    assert [r.score for r in got] == [r.score for r in want]
