"""Verify the search's best plans by measuring them: real KL and perplexity of whole quantized models.

The search ranks plans by an additive proxy (summed single-unit harms, see :mod:`bitplan.search._space`);
the few plans it would actually hand to a user are worth applying and measuring, because the proxy ignores
interactions between units (errors that compound through later layers, or cancel). :func:`verify` applies
each picked plan to a deep copy of the model and measures its mean ``KL(p_ref || p_plan)`` to the
unquantized model and its perplexity; :func:`rank_agreement` says how far the proxy's order was off.

Why held-out *calibration* text and never the evaluation file. The measured numbers are used to *choose*
(``best.json`` is the plan with the lowest measured KL). A choice made by looking at a test set and then
reported on that same test set overstates quality: out of several plans of nearly equal true quality, the
one that happened to fit those particular test tokens best wins, and its test number carries that luck --
the classic selection bias of tuning on the test split. So verification uses the tail of the calibration
text that the sensitivity profile did not see (:func:`default_verify_tokens`): disjoint from the profile's
tokens, so the proxy was not fitted to it either, and disjoint from the evaluation file, so the final
``bitplan eval`` number of the chosen plan stays an honest, unselected estimate.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from optuna.trial import FrozenTrial

from bitplan.errors import BitplanError, DataError
from bitplan.search._space import SearchSpace
from bitplan.search._study import is_feasible

__all__ = [
    "LATENCY_ATTR_PREFIX", "LATENCY_KEYS", "VERIFY_ATTR_PREFIX", "VERIFY_KEYS", "Verified",
    "default_verify_tokens", "pick_for_verification", "proxy_quality",
    "rank_agreement", "record_verification", "verify", "with_verification",
]  # fmt: skip

_log = logging.getLogger("bitplan")
# Measurements stored by :func:`record_verification` (study user attr ``"verify:<trial number>"``) and shown
# as these trial user attrs by :func:`with_verification`; the same for measured decode latency
# (:mod:`bitplan.search._latency`, study user attr ``"latency:<trial number>"``).
VERIFY_KEYS = ("verify_kl", "verify_ppl", "verify_tokens")
VERIFY_ATTR_PREFIX = "verify:"
LATENCY_KEYS = ("verify_ms", "verify_ms_16bit", "verify_ratio", "verify_ratio_worst", "verify_latency_rounds")
LATENCY_ATTR_PREFIX = "latency:"


# -- reading trials ------------------------------------------------------------------------------------
def proxy_quality(frozen: FrozenTrial) -> float:
    """The proxy's quality loss (nats/token): objective 0, else the ``proxy`` user attr, else +inf."""
    if frozen.values:
        return float(frozen.values[0])
    proxy = frozen.user_attrs.get("proxy")
    if isinstance(proxy, Mapping) and "quality" in proxy:
        return float(proxy["quality"])
    return math.inf


def _params_key(frozen: FrozenTrial) -> str:
    return json.dumps(frozen.params, sort_keys=True)


# -- picking and measuring --------------------------------------------------------------------------------
def pick_for_verification(trials: Sequence[FrozenTrial], k: int = 8) -> list[FrozenTrial]:
    """The ``k`` feasible trials of ``trials`` (the feasible Pareto front) with the lowest proxy quality loss.

    Lowest proxy loss first, because verification exists to choose the *quality* pick: the cheap plans at
    the other end of the front are chosen by memory or latency, which the proxy gets exactly right. Trials
    with identical parameters (samplers can repeat a categorical point) are measured once: the first kept.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    seen: set[str] = set()
    out: list[FrozenTrial] = []
    for t in sorted((t for t in trials if is_feasible(t)), key=lambda t: (proxy_quality(t), t.number)):
        key = _params_key(t)
        if key not in seen and len(out) < k:
            seen.add(key)
            out.append(t)
    return out


@dataclass(frozen=True)
class Verified:
    """One measured plan: the proxy's prediction next to what the model really does."""

    trial: int  # trial number
    proxy_quality: float  # summed proxy harm, nats/token
    kl: float  # measured mean KL(p_ref || p_plan), nats/token
    ppl: float  # perplexity of the quantized model on the verification tokens
    tokens: int  # predicted tokens behind kl and ppl
    seconds: float  # apply + evaluate wall time

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_params(space: SearchSpace, frozen: FrozenTrial) -> list[int]:
    unknown = sorted(set(frozen.params) - {d.name for d in space.decisions})
    if unknown:
        more = " ..." if len(unknown) > 3 else ""
        raise BitplanError(
            f"trial {frozen.number} has decisions the search space lacks: {', '.join(unknown[:3])}{more}"
        )
    return space.index({k: str(v) for k, v in frozen.params.items()})


def verify(
    model: Any,
    space: SearchSpace,
    trials: Sequence[FrozenTrial],
    tokens: torch.Tensor,
    window: int,
    *,
    progress: bool = True,
    calib: Any = None,
) -> list[Verified]:
    """Apply each trial's plan to a deep copy of ``model`` and measure KL to ``model`` and perplexity.

    ``tokens``: 1-D held-out verification text (see the module docstring), scored in non-overlapping
    ``window``-token windows exactly as :func:`bitplan.eval.evaluate` does. The unquantized log-probs are
    computed once (:class:`~bitplan.eval.ReferenceLogProbs`) and shared by all plans, as in
    :func:`bitplan.sensitivity.additivity_check`; ``model`` itself is left untouched. ``calib``: calibration
    windows for plans with calibrated units (GPTQ, AWQ...; the profile's own tokens).
    """
    from tqdm.auto import tqdm

    from bitplan.apply import apply_plan
    from bitplan.eval import ReferenceLogProbs, evaluate

    tokens = torch.as_tensor(tokens).reshape(-1).long()
    if not trials:
        return []
    indexes = [_check_params(space, t) for t in trials]  # fail before the expensive reference pass
    ref = ReferenceLogProbs(model, tokens, window, progress=False)
    out: list[Verified] = []
    for t, index in zip(tqdm(trials, desc="verify", unit="plan", disable=not progress), indexes, strict=True):
        start = time.perf_counter()
        plan = space.to_plan(index, {"trial": t.number})
        qmodel = apply_plan(copy.deepcopy(model), plan, kernels="reference", calib=calib)
        res = evaluate(qmodel, tokens=tokens, max_tokens=tokens.numel(), window=window, reference=ref,
                       progress=False, desc=f"trial {t.number}")  # fmt: skip
        del qmodel
        rec = Verified(
            t.number, proxy_quality(t), float(res.kl or 0.0), res.ppl, res.tokens, time.perf_counter() - start
        )
        _log.info("verified trial %d: proxy %.4g, measured KL %.4g, ppl %.4g (%.1f s)",
                  rec.trial, rec.proxy_quality, rec.kl, rec.ppl, rec.seconds)  # fmt: skip
        out.append(rec)
    return out


def record_verification(study: Any, verified: Sequence[Verified]) -> None:
    """Store each record's ``verify_kl``, ``verify_ppl``, ``verify_tokens`` in the study, keyed by trial.

    Why a *study* user attr (``"verify:<trial number>"`` -> that dict) and not the trial's own user attrs:
    a finished trial cannot be annotated. ``FrozenTrial.set_user_attr`` changes only a local copy, and the
    storage call underneath (``study._storage.set_trial_user_attr``, private but stable) refuses finished
    trials on every backend (``UpdateFinishedTrialError`` from ``check_trial_is_updatable``); the cached
    RDB storage would not even re-read a finished trial it holds. ``Study.set_user_attr`` is public, works
    at any time, lives in the study database (a resumed search sees earlier measurements, the dashboard
    shows them), and one key per trial is an upsert, never a read-modify-write. Read the numbers back as
    trial user attrs with :func:`with_verification`.
    """
    if not verified:
        return
    numbers = {t.number for t in study.get_trials(deepcopy=False)}
    for v in verified:
        if v.trial not in numbers:
            raise BitplanError(f"trial {v.trial} is not in study {study.study_name!r}")
        study.set_user_attr(
            f"{VERIFY_ATTR_PREFIX}{v.trial}", dict(zip(VERIFY_KEYS, (v.kl, v.ppl, v.tokens), strict=True))
        )


def with_verification(study: Any, trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Copies of ``trials`` whose user attrs include the ``verify_*`` numbers stored in the study.

    Quality (:func:`record_verification`) and decode latency (:func:`bitplan.search._latency.record_latency`).
    Copies, because ``get_trials(deepcopy=False)`` hands out the storage's own objects; trials without a
    measurement come back as they are.
    """
    attrs = study.user_attrs  # one storage read for all trials
    out = []
    for t in trials:
        recs = [(attrs.get(f"{prefix}{t.number}"), keys)
                for prefix, keys in ((VERIFY_ATTR_PREFIX, VERIFY_KEYS), (LATENCY_ATTR_PREFIX, LATENCY_KEYS))]  # fmt: skip
        if any(isinstance(rec, Mapping) for rec, _ in recs):
            t = copy.deepcopy(t)
            for rec, keys in recs:
                for key in keys if isinstance(rec, Mapping) else ():
                    if key in rec:
                        t.set_user_attr(key, rec[key])
        out.append(t)
    return out


# -- agreement ------------------------------------------------------------------------------------------------
def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _measured(item: Verified | FrozenTrial) -> tuple[int, float, float]:
    """(trial number, proxy quality, measured KL) of a record or of a trial with a ``verify_kl`` user attr."""
    if isinstance(item, Verified):
        return item.trial, item.proxy_quality, item.kl
    if "verify_kl" not in item.user_attrs:
        raise ValueError(f"trial {item.number} was not verified (no verify_kl user attr)")
    return item.number, proxy_quality(item), float(item.user_attrs["verify_kl"])


def rank_agreement(verified: Sequence[Verified | FrozenTrial]) -> dict[str, Any]:
    """How well the proxy's order of the verified plans matches the measured (KL) order.

    Takes :class:`Verified` records or trials carrying ``verify_kl`` (see :func:`with_verification`).
    ``discordant_fraction``: of the pairs ordered strictly by both, the fraction the proxy orders the other
    way round (0: same order, 1: reversed); ``kendall_tau`` and ``spearman`` (scipy; ``None`` when undefined:
    fewer than 2 plans or no spread); ``best_agrees``: the proxy's best plan has the lowest measured KL.
    JSON-ready: undefined values are ``None``, not nan.
    """
    from scipy.stats import kendalltau, spearmanr

    recs = [_measured(v) for v in verified]
    n = len(recs)
    proxy = np.array([r[1] for r in recs], dtype=np.float64)
    meas = np.array([r[2] for r in recs], dtype=np.float64)
    comparable = discordant = 0
    for i, j in itertools.combinations(range(n), 2):
        s = np.sign(proxy[i] - proxy[j]) * np.sign(meas[i] - meas[j])
        comparable += int(s != 0)
        discordant += int(s < 0)
    spread = n >= 2 and np.ptp(proxy) > 0 and np.ptp(meas) > 0
    tau = _finite(float(kendalltau(proxy, meas).statistic)) if spread else None
    rho = _finite(float(spearmanr(proxy, meas).statistic)) if spread else None
    best_p = int(np.argmin(proxy)) if n else -1
    best_m = int(np.argmin(meas)) if n else -1
    return {
        "n": n,
        "pairs": comparable,
        "discordant": discordant,
        "discordant_fraction": discordant / comparable if comparable else None,
        "kendall_tau": tau,
        "spearman": rho,
        "proxy_best_trial": recs[best_p][0] if n else None,
        "measured_best_trial": recs[best_m][0] if n else None,
        "best_agrees": bool(meas[best_p] <= meas[best_m]) if n else None,
    }


# -- held-out tokens ------------------------------------------------------------------------------------------
def default_verify_tokens(
    tokenizer: Any, calib_path: str | Path, skip_tokens: int, tokens: int, window: int
) -> torch.LongTensor:
    """``tokens`` tokens of ``calib_path`` after its first ``skip_tokens`` (those the profile used).

    Tokenized as :func:`bitplan.sensitivity.load_calib` does (the same prefix rule), so the skipped part is
    exactly the profile's calibration tokens; cut to whole ``window``-token windows. Raises
    :class:`DataError` when the file has fewer than ``skip_tokens + tokens`` tokens.
    """
    from bitplan.eval import load_tokens

    if skip_tokens < 0:
        raise DataError(f"skip_tokens must be >= 0, got {skip_tokens}")
    if window < 2:
        raise DataError(f"verification window must be at least 2 tokens, got {window}")
    if tokens < window:
        raise DataError(f"{tokens} verification tokens are fewer than one window of {window}")
    ids = load_tokens(tokenizer, calib_path, skip_tokens + tokens, strict=False)
    available = max(0, ids.numel() - skip_tokens)
    if available < tokens:
        raise DataError(
            f"{calib_path} has only {available} tokens after the {skip_tokens} used for profiling; "
            f"verification asked for {tokens} (ask for fewer or use a longer calibration file)"
        )
    tail = ids[skip_tokens : skip_tokens + tokens]
    return tail[: (tail.numel() // window) * window].clone()  # type: ignore[return-value]
