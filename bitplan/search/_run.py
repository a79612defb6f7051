"""``search()``: from a sensitivity table to a verified Pareto front of plans, in a resumable run directory.

Stages, each passing values to the next: build the space from the table, state the budgets as linear
limits (an impossible one fails here, naming the smallest achievable value), seed the study with uniform
plans and the additive proxy's exact optima (multiple-choice knapsack), let the sampler improve on them,
take the feasible Pareto front, verify its best few on the real model with held-out calibration text, and
write plans, trials, the pick and a report. Everything lives in the run directory: the study's SQLite file
makes a rerun continue where the last one stopped.

How much the sampler adds over the seeds is reported as the hypervolume of the feasible front in proxy
space (objectives scaled by the worst feasible value), seeds alone versus all trials.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from torch import nn

from bitplan._io import atomic_write_text, pid_alive
from bitplan.errors import BitplanError
from bitplan.graph import build_graph
from bitplan.search._budgets import Budgets
from bitplan.search._cost import BytesCostModel, CostModel
from bitplan.search._space import SearchSpace
from bitplan.search._study import fail_orphaned
from bitplan.sensitivity import SensitivityTable

__all__ = ["SearchConfig", "SearchResult", "search", "seed_improvement"]

_log = logging.getLogger("bitplan")


@dataclass(frozen=True)
class SearchConfig:
    """What to search and how long; budgets are in :class:`Budgets`."""

    budgets: Budgets = field(default_factory=Budgets)
    trials: int = 300  # target number of finished trials in the study (a rerun continues up to it)
    timeout: float | None = None
    seed: int = 0
    sampler: str = "nsga2"
    workers: int = 1
    storage: str | None = None  # default: sqlite file in the run directory
    study_name: str = "bitplan"
    batch: int = 1
    context: int = 2048
    kinds: tuple[str, ...] = ("weight", "head", "act", "kv")
    weights: tuple[str, ...] | None = None
    acts: tuple[str, ...] | None = None
    kv: tuple[str, ...] | None = None
    prune_kv: bool = True
    tie_clusters: bool = False
    score_method: str | None = None
    knapsack_levels: int = 6
    verify_k: int = 8
    pick: str = "quality"
    verify_latency: str = "auto"  # time the front's decoding: auto = when a latency budget is set; on; off
    latency_rounds: int = 5
    latency_tokens: int = 32  # decoded tokens per model per round
    latency_margin: float = 0.03  # timed plans must meet the latency budget less this fraction

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise BitplanError(f"--trials must be at least 1, got {self.trials}")
        if self.workers < 1:
            raise BitplanError(f"--workers must be at least 1, got {self.workers}")
        if self.verify_k < 0:
            raise BitplanError(f"--verify-top must be >= 0, got {self.verify_k}")
        if self.pick not in ("quality", "memory", "latency"):
            raise BitplanError(f"--pick must be quality, memory or latency, got {self.pick!r}")
        if self.verify_latency not in ("auto", "on", "off"):
            raise BitplanError(f"--verify-latency must be auto, on or off, got {self.verify_latency!r}")
        if not 0.0 <= self.latency_margin < 1.0:
            raise BitplanError(f"--latency-margin must be in [0, 1), got {self.latency_margin}")
        if self.latency_rounds < 1 or self.latency_tokens < 1:
            raise BitplanError(f"--latency-rounds and --latency-tokens must be at least 1, got {self.latency_rounds}, {self.latency_tokens}")

    @property
    def times_latency(self) -> bool:
        """Whether the search times the front's decoding (:mod:`bitplan.search._latency`)."""
        on = self.verify_latency == "on" or (self.verify_latency == "auto" and self.budgets.has_latency)
        return on and self.verify_k > 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["budgets"] = self.budgets.to_dict()
        return d


@dataclass
class SearchResult:
    """What a search run produced (all paths inside ``run_dir``)."""

    run_dir: Path
    space: SearchSpace
    front: list[optuna.trial.FrozenTrial]
    best_trial: int | None
    best_plan: Path | None
    summary: dict[str, Any]
    stage_seconds: dict[str, float]


@contextlib.contextmanager
def _run_lock(run_dir: Path, study: optuna.Study, own_storage: bool) -> Iterator[None]:
    """One search per run directory at a time; trials a killed run left RUNNING are failed at once.

    Heartbeats free a dead worker's trial only after the grace period (90 s), which is right for many
    machines sharing a database. The default study file lives in the run directory and only this machine's
    searches use it: a lock naming a process that no longer exists proves its RUNNING trials are dead, so
    they are failed now (counted as finished; the sampler simply goes on) instead of lingering."""
    lock = run_dir / "run.lock"
    if lock.exists():
        try:
            info = json.loads(lock.read_text())
        except (OSError, ValueError):
            info = {}
        pid, host = int(info.get("pid", -1)), str(info.get("host", ""))
        if host == socket.gethostname() and pid > 0 and pid != os.getpid() and pid_alive(pid):
            raise BitplanError(f"another bitplan search (pid {pid}) is running in {run_dir}; wait for it or use another -o")
        if own_storage and (failed := fail_orphaned(study, None)):
            _log.warning("failed %d trial(s) left running by a killed search", failed)
    atomic_write_text(lock, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def seed_improvement(study: optuna.Study) -> dict[str, Any]:
    """Hypervolume of the feasible front from the seeds alone vs from every trial (proxy objectives)."""
    from optuna._hypervolume import compute_hypervolume

    from bitplan.search._study import is_feasible

    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    feas = [t for t in done if is_feasible(t)]
    seeded = [t for t in feas if str(t.user_attrs.get("origin", "sampler")) != "sampler"]
    out: dict[str, Any] = {"feasible": len(feas), "feasible_seeds": len(seeded)}
    if not feas:
        return out
    vals = np.array([t.values for t in feas], dtype=np.float64)
    scale = np.maximum(vals.max(axis=0), 1e-12) * 1.01
    ref = np.ones(vals.shape[1])

    def hv(pts: np.ndarray) -> float:
        return float(compute_hypervolume(pts / scale, ref)) if len(pts) else 0.0

    seed_vals = np.array([t.values for t in seeded], dtype=np.float64).reshape(-1, vals.shape[1])
    hv_all, hv_seed = hv(vals), hv(seed_vals)
    out.update(hypervolume_seeds=hv_seed, hypervolume_all=hv_all,
               improvement=(hv_all / hv_seed - 1.0) if hv_seed > 0 else None)  # fmt: skip
    return out


def search(
    model: nn.Module,
    table: SensitivityTable,
    run_dir: str | Path,
    config: SearchConfig | None = None,
    *,
    cost_model: CostModel | None = None,
    verify_tokens: torch.Tensor | None = None,
    window: int = 512,
    name_or_path: str = "",
    progress: bool = True,
    calib: Any = None,
) -> SearchResult:
    """Search ``table``'s space under ``config.budgets``; verify the front on ``model`` with ``verify_tokens``.

    The model's graph names the decisions. ``verify_tokens`` ``None`` (or ``verify_k`` 0) skips verification:
    the front is then ranked by the proxy alone, which the report says. ``calib``: calibration windows, needed
    when the table offers calibrated options (``@gptq``, ``@awq``...) and front plans are applied (verified
    or timed); the profile's own calibration tokens are the natural choice.
    """
    from bitplan.search._knapsack import check_feasible, seed_choices
    from bitplan.search._report import write_outputs
    from bitplan.search._study import front, open_study, record_seeds, run_study

    config = config or SearchConfig()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    t = time.perf_counter()
    graph = build_graph(model)
    space = SearchSpace.from_table(
        table, graph, kinds=config.kinds, weights=config.weights, acts=config.acts, kv=config.kv,
        prune_kv=config.prune_kv, tie_clusters=config.tie_clusters, score_method=config.score_method,
        batch=config.batch, context=config.context, name_or_path=name_or_path,
    )  # fmt: skip
    calibrated = space.calibrated_methods()
    applies = (verify_tokens is not None and config.verify_k > 0) or config.times_latency
    if calibrated and applies and calib is None:
        raise BitplanError(f"the options include calibrated methods ({', '.join(calibrated)}): verifying plans "
                           "applies them, which needs the calibration data; pass calib")  # fmt: skip
    cost_model = cost_model or BytesCostModel()
    latency = cost_model.latency(space)
    check_feasible(space, config.budgets, latency)
    seeds = seed_choices(space, config.budgets, latency, levels=config.knapsack_levels)
    stages["space_and_seeds"] = time.perf_counter() - t
    _log.info("%s; %d seeds; latency: %s", space.describe(), len(seeds), latency.source)

    t = time.perf_counter()
    study = open_study(config.storage, run_dir, space, study_name=config.study_name, sampler=config.sampler,
                       seed=config.seed, budgets=config.budgets, latency=latency)  # fmt: skip
    record_seeds(study, space, seeds)
    with _run_lock(run_dir, study, own_storage=config.storage is None):
        run_study(study, space, latency, config.budgets, n_trials=config.trials, timeout=config.timeout,
                  workers=config.workers, progress=progress, sampler_name=config.sampler, seed=config.seed)  # fmt: skip
    stages["study"] = time.perf_counter() - t
    n_done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    per_s = n_done / stages["study"] if stages["study"] > 0 else float("nan")

    pareto = front(study)
    if not pareto:
        raise BitplanError("no feasible plan was found: loosen the budgets or run more --trials")
    t = time.perf_counter()
    timing: dict[str, Any] = {}
    candidates = pareto
    if config.times_latency:
        from bitplan.search._latency import verify_latency

        timing = verify_latency(study, model, space, pareto, config.budgets, k=config.verify_k, new=config.latency_tokens,
                                rounds=config.latency_rounds, margin=config.latency_margin,
                                kernel_latency=cost_model.kernel_latency(), progress=progress, calib=calib)  # fmt: skip
        if config.budgets.has_latency:  # only plans that met the budget when timed go on to quality verification
            candidates = [tr for tr in pareto if tr.number in set(timing["passing"])]
    stages["time_latency"] = time.perf_counter() - t

    t = time.perf_counter()
    agreement: dict[str, Any] = {}
    if verify_tokens is not None and config.verify_k > 0 and candidates:
        from bitplan.search._verify import (
            pick_for_verification,
            rank_agreement,
            record_verification,
            verify,
            with_verification,
        )

        candidates = with_verification(study, candidates)  # verification numbers live in study attrs (see _verify)
        chosen = pick_for_verification(candidates, config.verify_k)
        todo = [tr for tr in chosen if "verify_kl" not in tr.user_attrs]  # a rerun keeps earlier measurements
        done = verify(model, space, todo, verify_tokens, window, progress=progress, calib=calib) if todo else []
        record_verification(study, done)
        pareto = with_verification(study, front(study))
        verified = [tr for tr in pareto if "verify_kl" in tr.user_attrs]
        agreement = rank_agreement(verified)
    stages["verify"] = time.perf_counter() - t

    t = time.perf_counter()
    extra = {
        "space": space.describe(),
        "seeds": len(seeds),
        "trials_complete": n_done,
        "proxy_trials_per_second": per_s,
        "seed_improvement": seed_improvement(study),
        "agreement": agreement,
        "latency_timing": timing,
        "config": config.to_dict(),
        "stage_seconds": stages,
    }
    summary = write_outputs(run_dir, study, space, pareto, best_pick=config.pick, budgets=config.budgets,
                            latency_source=latency.source, extra_summary=extra, latency_margin=config.latency_margin)  # fmt: skip
    stages["outputs"] = time.perf_counter() - t
    best = summary.get("best_trial")
    best_path = Path(summary["best"]) if summary.get("best") else None
    return SearchResult(run_dir, space, pareto, best, best_path, summary, stages)

