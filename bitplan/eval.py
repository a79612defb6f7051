"""Perplexity and KL-to-reference evaluation of a causal LM on a text file.

Protocol (the one of ``shared/models/README.md``, reproduced exactly)
--------------------------------------------------------------------
1. The text file is read as UTF-8 in Python text mode (universal newlines: ``\\r\\n`` -> ``\\n``) and
   tokenized with ``add_special_tokens=False`` (no BOS); the first ``max_tokens`` tokens are kept.
2. The tokens are cut into ``max_tokens // window`` non-overlapping windows of ``window`` tokens
   (``window = min(window, context length)``); the remainder is dropped.
3. Each window is scored alone, from an empty context: it predicts its own ``window - 1`` next tokens.
4. ``ppl = exp(total NLL / predicted tokens)``.

Why this protocol: non-overlapping windows scored alone are simple, deterministic and cheap, every
token is predicted at most once, and the number is the one published in the README (stories260k
157.5, SmolLM2-135M-Instruct 29.53 on the first 40,960 wikitext-2 test tokens, window 512). A sliding
window with stride would give a lower, "fairer" ppl but costs ``window / stride`` times more and is not
comparable with the published number.

KL divergence: when ``reference`` (the unquantized model) is given, the same windows are also scored
by it in the same pass, and we report the mean over predicted positions of ``KL(p_ref || p_model)`` in
nats. Comparing quantization formats by ppl differences is noisy: a format can be wrong on many tokens
while the errors cancel in the mean log-likelihood of the true next token. The KL looks at the whole
next-token distribution at every position, is exactly 0 for a lossless format, and ranks formats
with far less noise from a few thousand tokens. Logits are never accumulated: each window's
log-softmax (in float32) is reduced to a few scalars before the next window (the main model has a
49k vocabulary, so 40k positions of logits would be 8 GB).

Quantized KV cache: if :mod:`bitplan.kvcache` provides ``cache_for(model)`` and it returns a cache
object, each batch of windows gets a fresh cache and is fed through it in chunks,
``model(chunk, cache=cache, use_cache=True)`` (``past_key_values=`` before transformers 5.25). The windows are still scored alone (same
tokens, same accounting), but each chunk reads the earlier part of its window through the
(fake-)quantized K/V, as decoding does (KIVI protocol). The chunking is what makes KV quantization
visible at all: the cache hands the tokens of the *current* forward pass to attention exactly, so one
forward of a whole window through an empty cache scores exactly like the unquantized model. Chunks
that start on every quantized layer's flush points (multiples of its flush unit -- the group size when a
side is per-channel, else 1 -- offset by its ``sink + recent`` 16-bit tokens) give exactly the logits of
token-by-token decoding, because the cache then flushes at the same token counts; that is the default
(``kv_chunk=None``), e.g. chunks of 32 for ``k2v2`` or ``k4v2r128``, a first chunk of 1 token then 32 for
``k4v3s1``, but never below 8 tokens: layouts whose exact chunk is smaller (both sides per-token, or
layers with different offsets) are scored with 8-token chunks, which slightly understates their error,
rather than one forward pass per token. With an exact cache the chunked logits equal the one-pass logits.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bitplan.errors import DataError, ModelError
from bitplan.loading import _param_device, cache_kwarg

__all__ = ["EvalResult", "ReferenceLogProbs", "evaluate", "kl_divergence", "load_tokens"]

# Growing-prefix tokenization: start with this many characters per wanted token, double until enough.
_CHARS_PER_TOKEN = 10
# Quantized KV cache: chunk used when the cache does not tell its flush unit, and the smallest chunk.
_DEFAULT_KV_CHUNK = 32
_MIN_KV_CHUNK = 8
# Tokens asked for beyond ``max_tokens`` before the prefix is trusted (the end of a prefix can
# tokenize differently from the same characters followed by more text).
_MARGIN_TOKENS = 64


# --------------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------------


def _read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file")
    if not p.is_file():
        raise DataError(f"{p} is not a file")
    try:
        with open(p, encoding="utf-8") as f:  # text mode: universal newlines, as in the README protocol
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{p} is not UTF-8 text (invalid byte at offset {e.start})") from None
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror or e})") from None
    if not text.strip():
        raise DataError(f"{p} is empty" if not text else f"{p} contains only whitespace")
    return text


def _encode(tokenizer: Any, text: str) -> list[int]:
    try:  # verbose=False: no "sequence longer than model_max_length" warning from HF tokenizers
        ids = tokenizer.encode(text, add_special_tokens=False, verbose=False)
    except TypeError:
        ids = tokenizer.encode(text, add_special_tokens=False)
    return list(ids)


def _word_boundary(text: str, end: int) -> int:
    """Largest ``k <= end`` with ``text[k]`` whitespace after a non-space (``end`` if none in 4 KB)."""
    k = end
    stop = max(1, end - 4096)
    while k >= stop:
        if text[k].isspace() and not text[k - 1].isspace():
            return k
        k -= 1
    return end


def load_tokens(
    tokenizer: Any,
    path: str | Path,
    max_tokens: int,
    *,
    max_chars: int | None = None,
    strict: bool = True,
) -> torch.LongTensor:
    """Return the first ``max_tokens`` tokens of a UTF-8 text file as a 1-D int64 tensor.

    The text is tokenized without special tokens (no BOS). Only a prefix of the file is tokenized:
    ``10 * max_tokens`` characters first, doubled until it yields enough tokens (plus a safety margin,
    and cut just before a whitespace so no word is split) or the file (or ``max_chars``, a cap on the
    characters considered) is exhausted, in which case the whole text is tokenized at once. The result
    equals the first ``max_tokens`` tokens of tokenizing the whole (capped) text.

    Raises :class:`DataError` for a missing, non-file, non-UTF-8, empty or whitespace-only file, and,
    when ``strict`` (default), when the text has fewer than ``max_tokens`` tokens.
    """
    if max_tokens < 1:
        raise DataError(f"max_tokens must be at least 1, got {max_tokens}")
    text = _read_text(path)
    capped = False
    if max_chars is not None:
        if max_chars < 1:
            raise DataError(f"max_chars must be at least 1, got {max_chars}")
        capped = max_chars < len(text)
        text = text[:max_chars]
    want = max_tokens + _MARGIN_TOKENS
    n_chars = min(len(text), max(1024, _CHARS_PER_TOKEN * want))
    while True:
        if n_chars >= len(text):
            ids = _encode(tokenizer, text)
            break
        ids = _encode(tokenizer, text[: _word_boundary(text, n_chars)])
        if len(ids) >= want:
            break
        n_chars *= 2
    if len(ids) < max_tokens and strict:
        where = f" in its first {max_chars} characters" if capped else ""
        raise DataError(f"{path} has only {len(ids)} tokens{where}, {max_tokens} were requested")
    if not ids:
        raise DataError(f"{path} yields no tokens")
    return torch.tensor(ids[:max_tokens], dtype=torch.long)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def _kl_rows(logp_ref: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(p_ref || p)`` from float32 log-probabilities of shape ``[..., vocab]``."""
    p_ref = logp_ref.exp()
    terms = p_ref * (logp_ref - logp)
    terms = torch.where(p_ref > 0, terms, torch.zeros_like(terms))  # 0 * log 0 = 0
    return terms.sum(-1)


def kl_divergence(logits_ref: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of ``KL(softmax(logits_ref) || softmax(logits))`` in nats.

    Both tensors have shape ``[..., vocab]``; log-softmax is taken in float32 over the last dim, the KL
    is summed over the vocabulary and averaged over all other positions.
    """
    if logits_ref.shape != logits.shape:
        raise ValueError(f"logits shapes differ: {tuple(logits_ref.shape)} vs {tuple(logits.shape)}")
    logp_ref = logits_ref.float().log_softmax(-1)
    logp = logits.to(logp_ref.device).float().log_softmax(-1)
    return _kl_rows(logp_ref, logp).mean().item()


@dataclass(frozen=True)
class EvalResult:
    """Outcome of :func:`evaluate`. ``nll`` and ``kl`` are means per predicted token, in nats."""

    ppl: float
    nll: float
    kl: float | None
    tokens: int  # predicted tokens: windows * (window - 1)
    windows: int
    window: int
    seconds: float  # wall time of the scoring pass (tokenization excluded)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def _exp(x: float) -> float:
    return math.exp(x) if x < 709.0 else math.inf


def _context_length(model: Any) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _default_tokenizer(model: Any) -> Any:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not name:
        raise ModelError("cannot tell which tokenizer the model uses: pass tokenizer=")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:  # any loader failure becomes a one-line user error
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load the tokenizer of {name}: {msg}") from None


def _chunk_layout(cache: Any) -> tuple[int, int]:
    """``(first, chunk)``: feeding a first chunk of ``first`` tokens (none if 0), then chunks of ``chunk``,
    reproduces token-by-token decoding through ``cache`` (``chunk`` at least 8 tokens).

    A layer with flush unit ``u``, ``sink`` tokens and a ``recent`` window flushes when the tokens past
    ``sink + recent`` fill a multiple of ``u``, so its flush points are ``(sink + recent) mod u`` plus
    multiples of ``u``; chunk starts on those points see exactly what each token would. The largest grid
    holding every layer's flush points has step ``gcd(u_l, o_l - o_0)`` over the layers (``o_l`` their
    offsets). Below 8 tokens the 8-token grid is used instead (slightly understating the error, see above).
    """
    units, offsets = [], []
    for layer in getattr(cache, "layers", ()):
        unit = getattr(layer, "flush_unit", None)
        if isinstance(unit, int) and unit > 0:
            fmt = getattr(layer, "fmt", None)
            lead = int(getattr(fmt, "recent", 0) or 0) + int(getattr(fmt, "sink", 0) or 0)
            units.append(unit)
            offsets.append(lead % unit)
    if not units:
        return 0, _DEFAULT_KV_CHUNK
    chunk = math.gcd(*units, *(o - offsets[0] for o in offsets))
    if chunk < _MIN_KV_CHUNK:
        chunk = _MIN_KV_CHUNK
    return offsets[0] % chunk, chunk


def _chunk_spans(n: int, first: int, chunk: int) -> list[tuple[int, int]]:
    """``(start, end)`` of every chunk of an ``n``-token window under :func:`_chunk_layout`'s ``(first, chunk)``."""
    starts = [0, *range(first if first else chunk, n, chunk)]
    return [(s, min(e, n)) for s, e in zip(starts, [*starts[1:], n], strict=True)]


def _logits(
    model: Any, ids: torch.Tensor, cache_for: Callable[[Any], Any] | None, kv_chunk: int | None
) -> torch.Tensor:
    """Logits ``[batch, window, vocab]`` of one batch of windows, each scored from an empty context."""
    ids = ids.to(_param_device(model))
    cache = cache_for(model) if cache_for is not None else None
    if cache is None:
        return model(ids, use_cache=False).logits
    # fresh quantized KV cache, fed chunk by chunk: later chunks read the fake-quantized past K/V
    first, chunk = (0, kv_chunk) if kv_chunk is not None else _chunk_layout(cache)
    kw = cache_kwarg(model)
    parts = [model(ids[:, s:e], **{kw: cache}, use_cache=True).logits for s, e in _chunk_spans(ids.shape[1], first, chunk)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class ReferenceLogProbs:
    """The reference model's next-token log-probs for a fixed set of windows, computed once.

    Comparing many formats against one unquantized model re-runs that model for every format; keeping
    its log-probs (``windows x (window-1) x vocab`` floats: 6.4 GB in float32 for 32k tokens of a 49k
    vocabulary) halves the cost of a sweep. Pass it as ``reference=`` to :func:`evaluate` with the same
    tokens and window. ``dtype=torch.float16`` halves the memory; its rounding moves KL by < 1e-4.
    """

    def __init__(self, model: Any, tokens: torch.Tensor, window: int, *, batch_size: int = 1,
                 dtype: torch.dtype = torch.float32, progress: bool = True) -> None:
        ctx = _context_length(model)
        self.window = min(window, ctx) if ctx is not None else window
        tokens = torch.as_tensor(tokens).reshape(-1).long()
        n = tokens.numel() // self.window
        if n == 0:
            raise DataError(f"{tokens.numel()} tokens are fewer than one window of {self.window}")
        self.windows = tokens[: n * self.window].view(n, self.window).clone()
        self.logp: list[torch.Tensor] = []
        with torch.inference_mode():
            for b in tqdm(range(0, n, batch_size), desc="reference", file=sys.stderr, disable=not progress, leave=False):
                logits = model(self.windows[b : b + batch_size].to(_param_device(model)), use_cache=False).logits
                self.logp.extend(logits[r, :-1].float().log_softmax(-1).to(dtype).cpu() for r in range(logits.shape[0]))

    def get(self, start: int, ids: torch.Tensor) -> list[torch.Tensor]:
        if ids.shape[1] != self.window or not torch.equal(ids.cpu(), self.windows[start : start + ids.shape[0]]):
            raise ValueError("ReferenceLogProbs was computed for other tokens or another window")
        return self.logp[start : start + ids.shape[0]]


def evaluate(
    model: Any,
    text_file: str | Path | None = None,
    *,
    tokens: torch.Tensor | None = None,
    tokenizer: Any = None,
    max_tokens: int = 32768,
    window: int = 512,
    reference: Any = None,
    batch_size: int = 1,
    kv_chunk: int | None = None,
    progress: bool = True,
    desc: str = "eval",
) -> EvalResult:
    """Perplexity of ``model`` (and mean KL to ``reference``) with the protocol of the module docstring.

    Give either ``text_file`` (tokenized with ``tokenizer``, by default the model's own from
    ``model.config._name_or_path``; it must have ``max_tokens`` tokens) or ``tokens`` (a 1-D tensor;
    its first ``min(max_tokens, len(tokens))`` tokens are used). ``window`` is clipped to the model's
    context length; ``max_tokens // window`` windows are scored, ``batch_size`` at a time.
    ``reference`` (the unquantized model, same vocabulary) adds the mean ``KL(p_ref || p_model)`` per
    predicted token. ``kv_chunk``: tokens per forward pass when a quantized KV cache is active (default:
    the exact chunk, see the module docstring; ``kv_chunk >= window`` scores each window in one pass).
    A tqdm bar on stderr shows windows and the running ppl unless ``progress=False``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if kv_chunk is not None and kv_chunk < 1:
        raise ValueError(f"kv_chunk must be at least 1, got {kv_chunk}")
    if max_tokens < 1:
        raise DataError(f"max_tokens must be at least 1, got {max_tokens}")
    ctx = _context_length(model)
    window = min(window, ctx) if ctx is not None else window
    if window < 2:
        raise DataError(f"window must be at least 2 tokens, got {window}")

    if tokens is None:
        if text_file is None:
            raise ValueError("evaluate() needs text_file or tokens")
        if tokenizer is None:
            tokenizer = _default_tokenizer(model)
        tokens = load_tokens(tokenizer, text_file, max_tokens)
    elif text_file is not None:
        raise ValueError("evaluate() takes text_file or tokens, not both")
    tokens = torch.as_tensor(tokens).reshape(-1).long()
    usable = min(max_tokens, tokens.numel())
    n_windows = usable // window
    if n_windows == 0:
        src = f"{text_file}" if text_file is not None else "the token tensor"
        raise DataError(f"{src}: {usable} tokens are fewer than one window of {window}")
    windows = tokens[: n_windows * window].view(n_windows, window)

    cache_for: Callable[[Any], Any] | None
    try:  # lazy: quantized-KV support is optional
        from bitplan.kvcache import cache_for
    except ImportError:
        cache_for = None

    cached_ref = reference if isinstance(reference, ReferenceLogProbs) else None
    models = [model] if reference is None or cached_ref is not None else [model, reference]
    was_training = [bool(getattr(m, "training", False)) for m in models]
    for m in models:
        m.eval()
    nll_sum = 0.0
    kl_sum = 0.0
    predicted = 0
    bar = tqdm(total=n_windows, desc=desc, unit="win", file=sys.stderr, disable=not progress, leave=False)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for b in range(0, n_windows, batch_size):
                ids = windows[b : b + batch_size]
                logits = _logits(model, ids, cache_for, kv_chunk)
                live_ref = reference is not None and cached_ref is None
                ref_logits = _logits(reference, ids, cache_for, kv_chunk) if live_ref else None
                ref_logp = cached_ref.get(b, ids) if cached_ref is not None else None
                if ref_logits is not None and ref_logits.shape[-1] != logits.shape[-1]:
                    raise ModelError(
                        f"reference vocabulary ({ref_logits.shape[-1]}) differs from the model's ({logits.shape[-1]})"
                    )
                targets = ids[:, 1:].to(logits.device)
                for r in range(ids.shape[0]):  # one window at a time bounds the float32 temporaries
                    logp = logits[r, :-1].float().log_softmax(-1)
                    nll_sum += -logp.gather(-1, targets[r].unsqueeze(-1)).double().sum().item()
                    if ref_logits is not None:
                        logp_ref = ref_logits[r, :-1].to(logp.device).float().log_softmax(-1)
                        kl_sum += _kl_rows(logp_ref, logp).double().sum().item()
                    elif ref_logp is not None:
                        kl_sum += _kl_rows(ref_logp[r].to(logp.device).float(), logp).double().sum().item()
                predicted += ids.shape[0] * (window - 1)
                del logits, ref_logits
                bar.update(ids.shape[0])
                bar.set_postfix(ppl=f"{_exp(nll_sum / predicted):.3f}", refresh=False)
    finally:
        bar.close()
        for m, flag in zip(models, was_training, strict=True):
            m.train(flag)
    seconds = time.perf_counter() - start

    nll = nll_sum / predicted
    return EvalResult(
        ppl=_exp(nll),
        nll=nll,
        kl=kl_sum / predicted if reference is not None else None,
        tokens=predicted,
        windows=n_windows,
        window=window,
        seconds=seconds,
    )
