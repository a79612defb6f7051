"""Tests for bitplan.eval: token loading, ppl/KL accounting, batching, KV-cache hook, README protocol."""

from __future__ import annotations

import copy
import math
import re
import sys
import types
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from bitplan.errors import DataError
from bitplan.eval import EvalResult, ReferenceLogProbs, evaluate, kl_divergence, load_tokens
from bitplan.formats import KVFormat

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260k"
WIKITEXT = SHARED / "data" / "wikitext-2-raw-test.txt"
VOCAB = 128
CTX = 256


class WordTokenizer:
    """Tokenizer-like object: one token per word or whitespace char, id from a hash. Records inputs."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def encode(self, text: str, add_special_tokens: bool = True, **_: object) -> list[int]:
        assert add_special_tokens is False
        self.calls.append(len(text))
        return [zlib.crc32(w.encode()) % VOCAB for w in re.findall(r"\S+|\s", text)]


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CTX,
        initializer_range=0.2,  # peaked predictions, so ppl and KL are far from trivial values
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def perturbed(model: LlamaForCausalLM) -> LlamaForCausalLM:
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return other


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (1000,), generator=torch.Generator().manual_seed(2))


def _write(tmp_path: Path, name: str, data: str | bytes) -> Path:
    p = tmp_path / name
    if isinstance(data, bytes):
        p.write_bytes(data)
    else:
        p.write_text(data, encoding="utf-8")
    return p


# ---------------------------------------------------------------------------------------------- KL


def test_kl_helper_matches_direct_computation() -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, 5, 17, generator=g) * 3
    b = torch.randn(3, 5, 17, generator=g) * 3
    p = a.double().softmax(-1)
    direct = (p * (p.log() - b.double().log_softmax(-1))).sum(-1).mean().item()
    assert kl_divergence(a, b) == pytest.approx(direct, rel=1e-5)
    assert kl_divergence(a.half(), b.half()) == pytest.approx(
        kl_divergence(a.half().float(), b.half().float()), rel=1e-6
    )
    assert kl_divergence(a, a) == 0.0
    assert kl_divergence(a, b) != pytest.approx(kl_divergence(b, a), rel=1e-3)  # not symmetric


def test_kl_helper_zero_probability_and_shape_mismatch() -> None:
    a = torch.tensor([[0.0, -math.inf, 1.0]])
    b = torch.tensor([[0.5, 0.2, 0.1]])
    p = torch.tensor([1.0, 0.0, math.e]) / (1 + math.e)
    direct = sum(
        pi * (math.log(pi) - qi)
        for pi, qi in zip(p.tolist(), b.log_softmax(-1)[0].tolist(), strict=True)
        if pi > 0
    )
    assert kl_divergence(a, b) == pytest.approx(direct, rel=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        kl_divergence(a, torch.zeros(1, 4))


def test_kl_of_model_against_itself_is_zero(model: LlamaForCausalLM, tokens: torch.Tensor) -> None:
    r = evaluate(model, tokens=tokens, window=128, reference=model, progress=False)
    assert r.kl is not None and abs(r.kl) < 1e-7
    r2 = evaluate(model, tokens=tokens, window=128, reference=copy.deepcopy(model), progress=False)
    assert r2.kl is not None and abs(r2.kl) < 1e-7


def test_kl_against_reference_matches_manual(
    model: LlamaForCausalLM, perturbed: LlamaForCausalLM, tokens: torch.Tensor
) -> None:
    r = evaluate(perturbed, tokens=tokens, max_tokens=512, window=128, reference=model, progress=False)
    x = tokens[:512].view(4, 128)
    with torch.no_grad():
        manual = kl_divergence(model(x).logits[:, :-1], perturbed(x).logits[:, :-1])
    assert r.kl is not None and r.kl > 1e-4
    assert r.kl == pytest.approx(manual, rel=1e-5)


def test_cached_reference_equals_live_reference(
    model: LlamaForCausalLM, perturbed: LlamaForCausalLM, tokens: torch.Tensor
) -> None:
    live = evaluate(perturbed, tokens=tokens, max_tokens=512, window=128, reference=model, progress=False)
    ref = ReferenceLogProbs(model, tokens[:512], 128, batch_size=2, progress=False)
    cached = evaluate(perturbed, tokens=tokens, max_tokens=512, window=128, reference=ref, progress=False)
    assert cached.kl == pytest.approx(live.kl, rel=1e-6) and cached.ppl == live.ppl
    with pytest.raises(ValueError, match="other tokens"):
        evaluate(perturbed, tokens=tokens.flip(0), max_tokens=512, window=128, reference=ref, progress=False)


# --------------------------------------------------------------------------------------- ppl / NLL


def test_ppl_is_exp_of_mean_cross_entropy(model: LlamaForCausalLM, tokens: torch.Tensor) -> None:
    r = evaluate(model, tokens=tokens, max_tokens=1000, window=128, progress=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for w in tokens[: 7 * 128].view(7, 128):
            logits = model(w.unsqueeze(0)).logits[0]
            total += F.cross_entropy(logits[:-1], w[1:], reduction="sum").item()
            count += 127
    assert r.kl is None
    assert r.nll == pytest.approx(total / count, rel=1e-6)
    assert r.ppl == pytest.approx(math.exp(total / count), rel=1e-6)
    assert 1.0 < r.ppl < 10 * VOCAB


def test_window_and_token_accounting(model: LlamaForCausalLM, tokens: torch.Tensor) -> None:
    r = evaluate(model, tokens=tokens, max_tokens=1000, window=128, progress=False)
    assert (r.windows, r.window, r.tokens) == (7, 128, 7 * 127)
    assert r.seconds > 0
    # window clipped to the context length (256): 1000 // 256 = 3 windows
    r = evaluate(model, tokens=tokens, max_tokens=1000, window=4096, progress=False)
    assert (r.windows, r.window, r.tokens) == (3, CTX, 3 * (CTX - 1))
    # max_tokens larger than the tensor: what is there is used
    r = evaluate(model, tokens=tokens, max_tokens=10_000, window=100, progress=False)
    assert (r.windows, r.tokens) == (10, 990)


def test_batch_size_does_not_change_the_result(
    model: LlamaForCausalLM, perturbed: LlamaForCausalLM, tokens: torch.Tensor
) -> None:
    one = evaluate(perturbed, tokens=tokens, window=128, reference=model, batch_size=1, progress=False)
    three = evaluate(perturbed, tokens=tokens, window=128, reference=model, batch_size=3, progress=False)
    assert (one.windows, one.tokens) == (three.windows, three.tokens) == (7, 889)
    assert three.ppl == pytest.approx(one.ppl, rel=1e-6)
    assert one.kl is not None and three.kl is not None
    assert three.kl == pytest.approx(one.kl, rel=1e-4, abs=1e-8)


def test_eval_result_to_dict_and_frozen(model: LlamaForCausalLM, tokens: torch.Tensor) -> None:
    r = evaluate(model, tokens=tokens, max_tokens=256, window=128, progress=False)
    assert isinstance(r, EvalResult)
    assert set(r.to_dict()) == {"ppl", "nll", "kl", "tokens", "windows", "window", "seconds"}
    with pytest.raises(AttributeError):
        r.ppl = 1.0  # type: ignore[misc]


def test_progress_bar_on_stderr_only_when_asked(
    model: LlamaForCausalLM, tokens: torch.Tensor, capsys: pytest.CaptureFixture[str]
) -> None:
    evaluate(model, tokens=tokens, max_tokens=512, window=128, progress=False)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    evaluate(model, tokens=tokens, max_tokens=512, window=128, progress=True, desc="mytest")
    out = capsys.readouterr()
    assert out.out == ""
    assert "mytest" in out.err and "win" in out.err


def test_evaluate_text_file_with_tokenizer(model: LlamaForCausalLM, tmp_path: Path) -> None:
    text = " ".join(f"word{i % 37} and{i % 11}," for i in range(400))
    f = _write(tmp_path, "t.txt", text)
    tok = WordTokenizer()
    ids = load_tokens(tok, f, 600)
    r_file = evaluate(model, f, tokenizer=tok, max_tokens=600, window=128, progress=False)
    r_tok = evaluate(model, tokens=ids, max_tokens=600, window=128, progress=False)
    assert r_file.ppl == r_tok.ppl and r_file.windows == 4
    with pytest.raises(DataError, match="has only"):
        evaluate(model, f, tokenizer=tok, max_tokens=100_000, window=128, progress=False)


def test_evaluate_argument_errors(model: LlamaForCausalLM, tokens: torch.Tensor, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="text_file or tokens"):
        evaluate(model, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, tokens=tokens, batch_size=0, progress=False)
    with pytest.raises(DataError, match="fewer than one window"):
        evaluate(model, tokens=tokens[:100], window=128, progress=False)
    with pytest.raises(DataError, match="window"):
        evaluate(model, tokens=tokens, window=1, progress=False)


# -------------------------------------------------------------------------------------- KV cache


def test_kv_cache_hook_is_used_per_batch(
    model: LlamaForCausalLM,
    perturbed: LlamaForCausalLM,
    tokens: torch.Tensor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from transformers import DynamicCache

    base = evaluate(perturbed, tokens=tokens, window=128, reference=model, batch_size=3, progress=False)
    calls: list[object] = []
    caches: list[DynamicCache] = []
    seen: list[int] = []

    def cache_for(m: object) -> object | None:
        calls.append(m)
        if m is model:  # "the reference has no plan installed"
            return None
        cache = DynamicCache(config=perturbed.config)
        caches.append(cache)
        return cache

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs.get("cache", kwargs.get("past_key_values")) is not None:
            ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            seen.append(ids.shape[1])

    fake = types.ModuleType("bitplan.kvcache")
    fake.cache_for = cache_for  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bitplan.kvcache", fake)
    handle = perturbed.register_forward_pre_hook(record, with_kwargs=True)
    try:
        r = evaluate(perturbed, tokens=tokens, window=128, reference=model, batch_size=3, progress=False)
        assert seen == [32] * 4 * 3  # no flush unit known: 32-token chunks, 4 per window, 3 batches
        seen.clear()
        r40 = evaluate(perturbed, tokens=tokens, window=128, batch_size=3, kv_chunk=40, progress=False)
        assert seen == [40, 40, 40, 8] * 3
    finally:
        handle.remove()
    # 7 windows, 3 per batch: 3 batches, a fresh cache for each (per evaluate call)
    assert len(caches) == 6 and len({id(c) for c in caches}) == 6
    assert calls.count(model) == 3
    assert all(c.get_seq_length() == 128 for c in caches)
    # an exact cache fed in chunks scores like one pass
    assert r.ppl == pytest.approx(base.ppl, rel=1e-6) and r40.ppl == pytest.approx(base.ppl, rel=1e-6)
    assert r.kl == pytest.approx(base.kl, rel=1e-4, abs=1e-8)


def test_real_quantized_kv_cache(model: LlamaForCausalLM) -> None:
    kvcache = pytest.importorskip("bitplan.kvcache", reason="bitplan.kvcache not available")
    if not hasattr(kvcache, "install_kv_plan"):
        pytest.skip("bitplan.kvcache has no install_kv_plan")
    toks = torch.randint(0, VOCAB, (512,), generator=torch.Generator().manual_seed(5))
    n_layers = model.config.num_hidden_layers
    kl = {}
    for fmt in ("k16v16", "k8v8", "k2v2"):
        q = copy.deepcopy(model)
        kvcache.install_kv_plan(q, [fmt] * n_layers)
        r = evaluate(q, tokens=toks, window=128, reference=model, progress=False)
        kl[fmt] = r.kl
        if fmt == "k2v2":  # the default chunk (32 = group) reproduces token-by-token decoding
            one = evaluate(q, tokens=toks[:256], window=128, reference=model, kv_chunk=1, progress=False)
            auto = evaluate(q, tokens=toks[:256], window=128, reference=model, progress=False)
            assert auto.kl == pytest.approx(one.kl, rel=1e-4)
            whole = evaluate(q, tokens=toks, window=128, reference=model, kv_chunk=128, progress=False)
            assert whole.kl == 0.0  # one pass per window never reads quantized K/V: why chunks exist
    assert kl["k16v16"] == 0.0
    assert 0.0 < kl["k8v8"] < kl["k2v2"]


@pytest.mark.parametrize("fmt", ["k3v3s1", "k4v2g16r8s3", "k2v2s40"])
def test_default_chunks_reproduce_decoding_with_sinks(model: LlamaForCausalLM, fmt: str) -> None:
    """Sinks shift every flush point by ``sink``: the default layout (a first chunk of ``(sink + recent) mod
    group`` tokens, then whole groups) must still equal token-by-token decoding, and keeping sinks exact must
    lower the error of the same format without them."""
    from bitplan.eval import _chunk_layout
    from bitplan.kvcache import MixedPrecisionKVCache, install_kv_plan

    toks = torch.randint(0, VOCAB, (256,), generator=torch.Generator().manual_seed(6))
    n_layers = model.config.num_hidden_layers
    first, chunk = _chunk_layout(MixedPrecisionKVCache([fmt] * n_layers))
    f = KVFormat.parse(fmt)
    assert chunk == f.group_size and first == (f.sink + f.recent) % chunk
    q = copy.deepcopy(model)
    install_kv_plan(q, [fmt] * n_layers)
    auto = evaluate(q, tokens=toks, window=128, reference=model, progress=False)
    one = evaluate(q, tokens=toks, window=128, reference=model, kv_chunk=1, progress=False)
    assert auto.kl == pytest.approx(one.kl, rel=1e-4) and auto.kl > 0


# ---------------------------------------------------------------------------------------- tokens


def test_load_tokens_prefix_equals_full_tokenization(tmp_path: Path) -> None:
    text = "\n".join(" ".join(f"w{(i * 7 + j) % 53}" for j in range(i % 13 + 1)) for i in range(3000))
    f = _write(tmp_path, "big.txt", text)
    full = WordTokenizer().encode(text, add_special_tokens=False)
    for n in (1, 50, 777, 5000):
        tok = WordTokenizer()
        ids = load_tokens(tok, f, n)
        assert ids.dtype == torch.long and ids.tolist() == full[:n]
        if n <= 777:
            assert max(tok.calls) < len(text) // 2  # only a prefix was tokenized
    # max_chars caps the characters considered, like the README's "first 400,000 characters"
    capped = WordTokenizer().encode(text[:1000], add_special_tokens=False)
    assert load_tokens(WordTokenizer(), f, 100, max_chars=1000).tolist() == capped[:100]
    with pytest.raises(DataError, match=r"only \d+ tokens in its first 1000 characters, 5000 were requested"):
        load_tokens(WordTokenizer(), f, 5000, max_chars=1000)


def test_load_tokens_reads_universal_newlines(tmp_path: Path) -> None:
    f = _write(tmp_path, "crlf.txt", b"a b\r\nc d\r\n")
    assert load_tokens(WordTokenizer(), f, 8).tolist() == WordTokenizer().encode(
        "a b\nc d\n", add_special_tokens=False
    )


@pytest.mark.parametrize(
    ("name", "data", "pattern"),
    [
        ("empty.txt", "", "is empty"),
        ("blank.txt", " \n\t\n", "only whitespace"),
        ("latin1.txt", "caf\xe9 au lait".encode("latin-1"), "not UTF-8"),
        ("short.txt", "only five words here now", "has only 9 tokens, 100 were requested"),
    ],
)
def test_load_tokens_errors(tmp_path: Path, name: str, data: str | bytes, pattern: str) -> None:
    f = _write(tmp_path, name, data)
    with pytest.raises(DataError, match=pattern) as e:
        load_tokens(WordTokenizer(), f, 100)
    assert "\n" not in str(e.value) and name in str(e.value)


def test_load_tokens_missing_and_directory_and_lenient(tmp_path: Path) -> None:
    for path, pattern in ((tmp_path / "nope.txt", "no such file"), (tmp_path, "is not a file")):
        with pytest.raises(DataError, match=pattern) as e:
            load_tokens(WordTokenizer(), path, 10)
        assert "\n" not in str(e.value)
    f = _write(tmp_path, "short.txt", "only five words here now")
    assert len(load_tokens(WordTokenizer(), f, 100, strict=False)) == 9


# ------------------------------------------------------------------------------- README protocol


@pytest.mark.shared_model
def test_stories260k_readme_protocol() -> None:
    if not (STORIES / "config.json").is_file() or not WIKITEXT.is_file():
        pytest.skip(f"shared model/data absent ({STORIES}, {WIKITEXT})")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(STORIES))
    ids = load_tokens(tok, WIKITEXT, 40_960)
    readme = tok(WIKITEXT.read_text(encoding="utf-8")[:400_000], add_special_tokens=False)["input_ids"]
    assert len(readme) >= 40_960 and ids.tolist() == readme[:40_960]

    model = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32)
    r = evaluate(model, WIKITEXT, max_tokens=40_960, window=512, progress=False)  # default tokenizer
    assert (r.windows, r.window, r.tokens) == (80, 512, 40_880)
    assert r.ppl == pytest.approx(157.5, abs=0.1)
