"""Samplers, and why a search resumed after a crash proposes exactly the plans an uninterrupted one would.

An Optuna sampler draws from one random state seeded once per process. A study resumed in a new process
replays that seed from the start: a random sampler re-proposes the plans it already tried, NSGA-II's
children diverge, and "same seed, same front" holds only for runs that were never interrupted.

:class:`OrdinalSampler` wraps the chosen sampler and, before each trial, rebuilds it with a seed derived from
``(seed, ordinal)``, where a trial's *ordinal* is the number of earlier trials that did not fail. Optuna's
samplers keep everything else in the storage (NSGA-II its generations and parents, from complete trials only),
so a trial's proposal is a function of the seed, its ordinal and the trials completed before it. A trial
killed mid-run is failed when the study is resumed; the next trial has the same ordinal and the same history,
and proposes the same plan. The knapsack seed plans (``seed_plans``, stored once in the study's user attrs)
are injected the same way, as fixed parameters at ordinals ``0 .. len(seeds) - 1``, instead of being queued
once: a seed killed mid-trial runs again in its place, so even the first generation comes in the same order.
Trials that already carry fixed parameters (queued by a user or by Optuna's retry of a stale trial) keep them.

With parallel workers the ordinals of concurrent trials are distinct (running trials count), so workers draw
different plans and seeds are not repeated; which worker gets which ordinal is up to timing, so parallel runs
are not reproducible, only complete.
"""

from __future__ import annotations

import inspect
import os
import socket
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from bitplan.errors import BitplanError

__all__ = ["SAMPLERS", "OrdinalSampler", "SEED_PLANS_ATTR", "WORKER_ATTR", "make_sampler"]

SAMPLERS = ("nsga2", "nsga3", "tpe", "gp", "random")
SEED_PLANS_ATTR = "seed_plans"  # study user attr: [[label, {param: value}], ...]
WORKER_ATTR = "worker"  # trial system attr: "host:pid" of the process that ran it
_HAS_SET_CONSTRAINT = hasattr(optuna.trial.Trial, "set_constraint")  # Optuna >= 5
_OPTUNA = tuple(int(p) for p in optuna.__version__.split(".")[:2])


def _constraints_func(frozen: FrozenTrial) -> list[float]:
    """Optuna 4's way in: samplers call it after each trial (module level, so samplers pickle)."""
    return list(frozen.user_attrs.get("constraints", []))


def _build(cls: Callable[..., optuna.samplers.BaseSampler], **kw: Any) -> optuna.samplers.BaseSampler:
    """``cls(**kw)``, plus ``constraints_func`` where Optuna 4 needs it (Optuna 5 reads set_constraint)."""
    if not _HAS_SET_CONSTRAINT and "constraints_func" in inspect.signature(cls).parameters:
        kw["constraints_func"] = _constraints_func
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return cls(**kw)


def _raw_sampler(name: str, seed: int | None, n_decisions: int) -> optuna.samplers.BaseSampler:
    population = max(20, min(50, n_decisions // 4))
    if name == "nsga2":
        return _build(optuna.samplers.NSGAIISampler, population_size=population, seed=seed)
    if name == "nsga3":  # Das-Dennis reference points on the 3-objective simplex, about one per individual
        h = max(h for h in range(1, 20) if (h + 1) * (h + 2) // 2 <= population)
        return _build(optuna.samplers.NSGAIIISampler, population_size=population, seed=seed, dividing_parameter=h)
    if name == "tpe":
        return _build(optuna.samplers.TPESampler, seed=seed, multivariate=True)
    if name == "gp":
        return _build(optuna.samplers.GPSampler, seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def make_sampler(name: str, seed: int | None, n_decisions: int) -> OrdinalSampler:
    """A sampler by name (:data:`SAMPLERS`), reseeded per trial ordinal (see the module docstring);
    evolutionary populations are 50, fewer for tiny spaces."""
    if name not in SAMPLERS:
        raise BitplanError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if name == "gp":
        if _OPTUNA < (4, 4):
            raise BitplanError(f"--sampler gp needs Optuna >= 4.4 for three objectives, have {optuna.__version__}")
        try:
            import scipy  # noqa: F401
            import torch  # noqa: F401
        except ImportError as e:
            raise BitplanError(f"--sampler gp needs torch and scipy ({e})") from None
    return OrdinalSampler(name, seed, n_decisions)


def _derive(seed: int, ordinal: int) -> int:
    return int(np.random.SeedSequence([seed, ordinal]).generate_state(1)[0])


class OrdinalSampler(optuna.samplers.BaseSampler):
    """Delegates to a sampler rebuilt before each trial with a seed from ``(seed, ordinal)``; injects seed plans."""

    def __init__(self, name: str, seed: int | None, n_decisions: int) -> None:
        self.name, self.seed, self.n_decisions = name, seed, n_decisions
        self._inner = _raw_sampler(name, seed, n_decisions)

    def __str__(self) -> str:
        return f"{type(self._inner).__name__} (seed {self.seed}, reseeded per trial ordinal)"

    @staticmethod
    def ordinal(study: optuna.Study, trial: FrozenTrial) -> int:
        """Earlier trials that did not fail: a killed trial's successor takes its ordinal."""
        trials = study._get_trials(deepcopy=False, use_cache=True)  # the samplers' own cached view
        return sum(1 for t in trials if t.number < trial.number and t.state != TrialState.FAIL)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        study._storage.set_trial_system_attr(trial._trial_id, WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
        n = self.ordinal(study, trial)
        seeds: Sequence[Any] = study.user_attrs.get(SEED_PLANS_ATTR, [])
        if n < len(seeds) and "fixed_params" not in trial.system_attrs:
            label, params = seeds[n]
            # on the storage for the record, on this frozen trial because Trial reads its fixed params from it
            study._storage.set_trial_system_attr(trial._trial_id, "fixed_params", params)
            study._storage.set_trial_user_attr(trial._trial_id, "origin", label)
            trial.system_attrs["fixed_params"] = params
            trial.user_attrs["origin"] = label
        if self.seed is not None:
            self._inner = _raw_sampler(self.name, _derive(self.seed, n), self.n_decisions)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: Any) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()
