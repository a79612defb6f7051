"""Verify the front's decode latency by timing it, and hand back only plans that meet the budget when measured.

The search's latency objective is a prediction (a hardware profile's sum, or a bytes estimate). On a CPU
its error is up to ~9% per plan (bench/RESULTS.md, profiles-predict) and a latency budget binds exactly
where plans crowd against it, so a prediction alone puts plans on both sides of the line. Quality is
already checked by measurement (:mod:`bitplan.search._verify`); this does the same for latency: apply the
plan with the kernels the cost model priced, decode on the device next to the unquantized model
(:func:`bitplan.profiles.paired_decode_ms`: interleaved rounds from a pre-filled cache at the search's
context), and keep the medians. A ratio budget (``0.9x``) is checked on the median of per-round ratios to
the 16-bit model timed in the same rounds, never against a 16-bit figure from another run.

Which plans. Front plans in order of proxy quality (the quality pick's candidates), measured one at a time
until ``k`` meet the budget or ``max_measured`` were timed: plans that miss are not quality-verified,
and ``best.json`` is only ever a plan that met the budget when measured. Numbers live in the study (study
user attr ``"latency:<trial>"``, like quality verification), so a rerun does not time a plan twice and
the check against the budget is redone from the stored medians when the budget changes.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from optuna.trial import FrozenTrial

from bitplan.errors import BitplanError
from bitplan.search._budgets import Budgets
from bitplan.search._space import SearchSpace
from bitplan.search._verify import (
    LATENCY_ATTR_PREFIX,
    LATENCY_KEYS,
    _check_params,
    pick_for_verification,
    with_verification,
)

__all__ = ["MeasuredLatency", "latency_ok", "measure_latency", "record_latency", "verify_latency"]

_log = logging.getLogger("bitplan")


@dataclass(frozen=True)
class MeasuredLatency:
    """One plan's measured decode latency next to the 16-bit model's, from the same rounds."""

    trial: int
    ms: float  # median ms per decoded token of the plan
    ms_16bit: float  # median of the unquantized model, timed in the same rounds
    ratio: float  # median over rounds of (plan ms / 16-bit ms)
    ratio_worst: float  # the largest per-round ratio
    rounds: int
    seconds: float  # apply + prefill + timing wall time

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def attrs(self) -> dict[str, float]:
        values = (self.ms, self.ms_16bit, self.ratio, self.ratio_worst, self.rounds)
        return dict(zip(LATENCY_KEYS, values, strict=True))


def latency_ok(budgets: Budgets, attrs: Mapping[str, Any], margin: float = 0.0) -> bool | None:
    """Whether a trial's stored measurement meets ``budgets``' latency budget with ``margin`` to spare;
    None if unmeasured or no budget."""
    if "verify_ms" not in attrs:
        return None
    return budgets.latency_met(float(attrs["verify_ms"]), float(attrs["verify_ratio"]), margin)


def measure_latency(
    model: Any,
    space: SearchSpace,
    trials: Sequence[FrozenTrial],
    *,
    kernel_latency: Callable[[Any, Any], float | None] | None = None,
    new: int = 32,
    rounds: int = 5,
    calib: Any = None,
) -> list[MeasuredLatency]:
    """Apply each trial's plan to a copy of ``model`` (kernels ranked by ``kernel_latency``) and time its
    decoding against ``model`` itself at ``space.context`` cached tokens and ``space.batch`` sequences."""
    from bitplan.apply import apply_plan
    from bitplan.profiles import paired_decode_ms

    indexes = [_check_params(space, t) for t in trials]
    out = []
    for t, index in zip(trials, indexes, strict=True):
        start = time.perf_counter()
        plan = space.to_plan(index, {"trial": t.number})
        qmodel = apply_plan(copy.deepcopy(model), plan, kernels="auto", latency=kernel_latency, calib=calib)
        base, quant = paired_decode_ms([model, qmodel], context=space.context, new=new, rounds=rounds,
                                       batch=space.batch)  # fmt: skip
        del qmodel
        ratios = [q / b for q, b in zip(quant, base, strict=True)]
        rec = MeasuredLatency(t.number, statistics.median(quant), statistics.median(base), statistics.median(ratios),
                              max(ratios), rounds, time.perf_counter() - start)  # fmt: skip
        _log.info("timed trial %d: %.2f ms/token = %.3fx of 16-bit (worst round %.3fx)",
                  rec.trial, rec.ms, rec.ratio, rec.ratio_worst)  # fmt: skip
        out.append(rec)
    return out


def record_latency(study: Any, measured: Sequence[MeasuredLatency]) -> None:
    """Store each record as study user attr ``"latency:<trial>"`` (why a study attr: see ``record_verification``)."""
    numbers = {t.number for t in study.get_trials(deepcopy=False)}
    for m in measured:
        if m.trial not in numbers:
            raise BitplanError(f"trial {m.trial} is not in study {study.study_name!r}")
        study.set_user_attr(f"{LATENCY_ATTR_PREFIX}{m.trial}", m.attrs())


def verify_latency(
    study: Any,
    model: Any,
    space: SearchSpace,
    front: Sequence[FrozenTrial],
    budgets: Budgets,
    *,
    k: int,
    max_measured: int | None = None,
    kernel_latency: Callable[[Any, Any], float | None] | None = None,
    new: int = 32,
    rounds: int = 5,
    margin: float = 0.0,
    progress: bool = True,
    calib: Any = None,
) -> dict[str, Any]:
    """Time front plans (lowest proxy loss first) until ``k`` meet the budget or ``max_measured`` were timed.

    A plan passes when its median ratio (or ms) is within the budget less ``margin``: the same plan timed
    again in a fresh process lands up to a few percent either side (bench/RESULTS.md, profiles-autotune),
    so a plan timed right at the budget is as likely as not to miss it on the user's next run. Without a
    latency budget the first ``k`` are timed and none is rejected. Returns a summary: the trials
    timed (this run and before), those that met the budget (``passing``, in proxy order), and the settings.
    """
    from tqdm.auto import tqdm

    max_measured = max(2 * k, k + 4) if max_measured is None else max_measured
    candidates = with_verification(study, pick_for_verification(front, len(front)))
    passing: list[int] = []
    timed: list[int] = []
    fresh = 0
    bar = tqdm(total=k, desc="time plans", unit="plan", disable=not progress)
    for t in candidates:
        if len(passing) >= k or len(timed) >= max_measured:
            break
        attrs: Mapping[str, Any] = t.user_attrs
        if "verify_ms" not in attrs:
            rec = measure_latency(model, space, [t], kernel_latency=kernel_latency, new=new, rounds=rounds, calib=calib)
            record_latency(study, rec)
            attrs, fresh = rec[0].attrs(), fresh + 1
        timed.append(t.number)
        if latency_ok(budgets, attrs, margin) is not False:
            passing.append(t.number)
            bar.update(1)
    bar.close()
    if budgets.has_latency and not passing:
        _log.warning("none of the %d front plans timed meets the latency budget (%s) when measured",
                     len(timed), budgets.describe())  # fmt: skip
    return {"timed": timed, "timed_now": fresh, "passing": passing, "context": space.context,
            "batch": space.batch, "tokens_per_round": new, "rounds": rounds, "margin": margin}  # fmt: skip
