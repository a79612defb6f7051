"""Paired decode timing: several models on one prompt, interleaved, so their *ratio* survives a noisy machine.

Why paired. A budget like ``--max-latency 0.9x`` is a ratio to the 16-bit model. Timing the plan now and
the 16-bit model a minute later (or in another process) mixes the plan's cost with whatever else the
machine did in between: on a shared 2-core box the same model measures 5% apart run to run, the size of the
margins a latency search works in. So :func:`paired_decode_ms` holds both models, times them in
alternating rounds (A B, B A, A B, ...: a drift within a round hits both), and returns per-round figures;
the ratio of the same round is what budgets are checked against, and its worst round is the conservative
figure.

Why a pre-filled cache and ``generate``. Decoding at the search's context (2048 tokens by default) means a
2048-token prefill per timing if done naively (``t(generate n+1) - t(generate 1)``, as the profile does at
short contexts): seconds each on a CPU. Here each model prefills its prompt once into its own cache (the
plan's mixed-precision KV cache where it has a KV plan); every round then continues decoding from it with
``generate(..., past_key_values=cache)``, which only processes the one uncached token and then decodes, so a
round costs exactly ``new`` decode steps plus one ``generate`` call's setup (~1 ms, shared by the ``new``
steps). The cache grows by ``new`` tokens a round; the prompt is sized so the *mean* context over all
timed steps equals ``context``.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from typing import Any

import torch

from bitplan.errors import BitplanError

__all__ = ["paired_decode_ms"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Decoder:
    """One model, its cache and its token sequence (everything but the last token is cached)."""

    def __init__(self, model: Any, ids: torch.Tensor) -> None:
        from transformers import DynamicCache

        from bitplan.kvcache import cache_for
        from bitplan.loading import _param_device, cache_kwarg

        self.model = model
        self.device = _param_device(model)
        self.key = cache_kwarg(model)
        self.cache = cache_for(model) or DynamicCache()
        self.ids = ids.to(self.device)
        params = inspect.signature(model.forward).parameters
        last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # skip a (prompt x vocab) logits tensor
        with torch.inference_mode():
            if self.ids.shape[1] > 1:
                model(self.ids[:, :-1], use_cache=True, **last, **{self.key: self.cache})

    def step_ms(self, new: int) -> float:
        """Decode ``new`` greedy tokens from the cache; ms per token."""
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        _sync(self.device)
        t = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(self.ids, attention_mask=torch.ones_like(self.ids), **kw,
                                      **{self.key: self.cache})  # fmt: skip
        _sync(self.device)
        ms = (time.perf_counter() - t) * 1e3 / new
        if out.shape[1] != self.ids.shape[1] + new:
            raise BitplanError(
                f"generate() returned {out.shape[1] - self.ids.shape[1]} tokens, asked for {new}"
            )
        self.ids = out
        return ms


def paired_decode_ms(
    models: Sequence[Any],
    *,
    context: int,
    new: int = 32,
    rounds: int = 5,
    batch: int = 1,
    seed: int = 0,
) -> list[list[float]]:
    """Decode ms per token of each of ``models``, one figure per round, timed interleaved on one prompt.

    ``models`` share a vocabulary (the prompt is random token ids drawn once). One untimed warm-up round
    first; then ``rounds`` rounds of ``new`` greedy tokens per model, the order reversed every other round.
    The mean cached context over the timed steps is ``context`` (see the module docstring). Returns
    ``out[i][r]``: model ``i``, round ``r``.
    """
    if not models:
        return []
    if context < 1 or new < 1 or rounds < 1 or batch < 1:
        raise BitplanError(
            f"paired decode timing needs context, new, rounds, batch >= 1; got {context}, {new}, {rounds}, {batch}"
        )
    from bitplan.profiles._measure import _prompt

    ids = _prompt(models[0], batch, max(2, context - new * rounds // 2), seed)
    decoders = [_Decoder(m, ids) for m in models]
    for d in decoders:  # warm-up: first generate() call, allocator growth, kernel caches
        d.step_ms(min(new, 4))
    out: list[list[float]] = [[] for _ in models]
    for r in range(rounds):
        order = range(len(decoders)) if r % 2 == 0 else range(len(decoders) - 1, -1, -1)
        for i in order:
            out[i].append(decoders[i].step_ms(new))
    return out
