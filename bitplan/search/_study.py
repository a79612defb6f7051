"""The Optuna study: three objectives, budgets as constraints, resumable storage, optional parallel workers.

Objectives, all minimised, in order: quality loss (the proxy's summed KL, nats/token), memory (weights + KV
cache, bytes), decode latency (ms/token from the cost model). The result is the feasible Pareto front.

Why NSGA-II by default: ~200 categorical parameters of 2-6 values, microseconds of arithmetic per trial.
Crossover of whole plans and per-gene mutation suit that, and it handles three objectives and constraints
natively (feasible beats infeasible, smaller violation beats larger). Multivariate TPE models 200
dimensions poorly and slows with history; GP (torch + scipy) is cubic in trials and optimizes its
acquisition over categorical dimensions slowly (seconds a trial); NSGA-III and random are for comparison.

Why constraints, not penalties: a penalty mixes units (bytes, nats) with a weight nobody can pick, and a
penalised plan still sits on the front. Each constraint is the *relative* excess ``metric / limit - 1``
(feasible <= 0), so bytes and bits weigh alike when a sampler sums violations; the active ones, in the
order avg_weight_bits, memory_bytes, avg_kv_bits, latency_ms, are named in study user attr
``constraint_names``. Optuna 5 samplers read ``Trial.set_constraint(name, value)`` (system attrs
``constraints:<name>``; ``constraints_func`` is deprecated there). Optuna 4 has no ``set_constraint``: its
samplers call ``constraints_func``, which copies the list into system attr ``constraints``. bitplan also
keeps the list in user attr ``constraints``; :func:`trial_constraints` reads any of the three.

Storage and resume: ``sqlite:///<run dir>/study.db`` by default; a database URL or a journal file work
too. ``n_trials`` is a *target* of complete (or pruned) trials: the same command again continues up to it
and adds nothing once there. A failed trial -- the one a killed process was running -- does not count; the
sampler proposes its plan again (:mod:`bitplan.search._sampler`), so a resumed search ends with the same
trials and front as one never interrupted. The study records what it was made for (space signature,
budgets, cost model) and refuses to continue with anything else, which would mix incomparable trials.

Heartbeat: on databases a running trial beats every 30 s. When its process is killed the beat stops; after
the grace period (90 s) the next run, or a live worker, marks it FAIL and re-queues its parameters (at most
twice). Journal files have no heartbeat, but a trial takes milliseconds: one RUNNING for longer than the grace
period is a dead process's, and the next run fails it (:func:`fail_overdue`). Processes this search spawned or
this machine ran are known by pid: their trials are failed at once.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import multiprocessing
import os
import pickle
import socket
import sys
import tempfile
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import pyarrow as pa
import sqlalchemy
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from bitplan._io import pid_alive
from bitplan.errors import BitplanError
from bitplan.search._budgets import Budgets
from bitplan.search._cost import LatencyTable
from bitplan.search._sampler import SAMPLERS, SEED_PLANS_ATTR, WORKER_ATTR, make_sampler
from bitplan.search._space import SearchSpace

__all__ = [
    "COUNTED", "FINISHED", "METRIC_NAMES", "SAMPLERS", "bind_study", "constraint_limits", "record_seeds", "front",
    "is_feasible", "make_sampler", "open_study", "resolve_storage", "run_study", "space_signature",
    "trial_constraints", "trials_frame",
]  # fmt: skip

_log = logging.getLogger("bitplan")
METRIC_NAMES = ["quality_loss", "memory_bytes", "latency_ms"]
CONSTRAINT_ORDER = ("avg_weight_bits", "memory_bytes", "avg_kv_bits", "latency_ms")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # what --trials counts: a failed (killed) trial is redone
TRIALS_KIND, TRIALS_SCHEMA_VERSION = "bitplan.trials", 1
_HAS_SET_CONSTRAINT = hasattr(optuna.trial.Trial, "set_constraint")  # Optuna >= 5


# ----------------------------------------------------------------------------------- constraints
def constraint_limits(budgets: Budgets, latency: LatencyTable) -> dict[str, float]:
    """The active limits by constraint name, in :data:`CONSTRAINT_ORDER`."""
    limits = {"avg_weight_bits": budgets.max_avg_bits, "memory_bytes": budgets.max_memory,
              "avg_kv_bits": budgets.max_kv_bits, "latency_ms": budgets.latency_limit(latency.reference())}  # fmt: skip
    return {k: v for k, v in limits.items() if v is not None}


def trial_constraints(frozen: FrozenTrial) -> list[float] | None:
    """A trial's constraint values (<= 0 feasible), None if never recorded; on Optuna 4 and 5."""
    if "constraints" in frozen.user_attrs:  # bitplan's own record
        return [float(v) for v in frozen.user_attrs["constraints"]]
    named: dict[str, float] | None = getattr(frozen, "constraints", None)  # Optuna 5 set_constraint
    if named:
        order = {k: i for i, k in enumerate(CONSTRAINT_ORDER)}
        return [named[k] for k in sorted(named, key=lambda k: order.get(k, len(order)))]
    old = frozen.system_attrs.get("constraints")  # a sampler's constraints_func
    return None if old is None else [float(v) for v in old]


def is_feasible(frozen: FrozenTrial) -> bool:
    """Complete and within every budget (a trial without recorded constraints is not feasible)."""
    cons = trial_constraints(frozen)
    return frozen.state == TrialState.COMPLETE and cons is not None and all(c <= 0 for c in cons)


@dataclass
class _Objective:
    """Picklable objective: one categorical per decision; proxy metrics as values, budgets as constraints."""

    space: SearchSpace
    latency: LatencyTable
    limits: dict[str, float]

    def __post_init__(self) -> None:
        self._choices = [(d.name, d.labels) for d in self.space.decisions]

    def __call__(self, trial: optuna.Trial) -> tuple[float, float, float]:
        idx = [labels.index(str(trial.suggest_categorical(name, labels))) for name, labels in self._choices]
        m, ms = self.space.metrics(idx), self.latency.total(idx)
        got = {"avg_weight_bits": m.avg_weight_bits, "memory_bytes": m.memory_bytes,
               "avg_kv_bits": m.avg_kv_bits, "latency_ms": ms}  # fmt: skip
        cons = [got[k] / limit - 1.0 for k, limit in self.limits.items()]
        trial.set_user_attr("proxy", {"quality": m.quality, "weight_bytes": m.weight_bytes, "kv_bytes": m.kv_bytes, **got})
        trial.set_user_attr("constraints", cons)
        if "origin" not in trial.user_attrs:
            trial.set_user_attr("origin", "sampler")
        if _HAS_SET_CONSTRAINT:
            for name, c in zip(self.limits, cons, strict=True):
                trial.set_constraint(name, c)  # type: ignore[attr-defined,unused-ignore]
        return m.quality, m.memory_bytes, ms


# ----------------------------------------------------------------------------------- storage
def resolve_storage(storage: str | None, run_dir: Path) -> str:
    """The storage as one string: a database URL, ``journal:<absolute path>`` or ``:memory:``."""
    if storage is None:
        return f"sqlite:///{(Path(run_dir) / 'study.db').resolve()}"
    if storage == ":memory:" or "://" in storage:
        return storage
    if storage.startswith("journal:") or storage.endswith((".jsonl", ".log")):
        return f"journal:{Path(storage.removeprefix('journal:')).resolve()}"
    if storage.endswith((".db", ".sqlite", ".sqlite3")):
        return f"sqlite:///{Path(storage).resolve()}"
    raise BitplanError(f"--storage: cannot read {storage!r}; use a database URL (sqlite:///study.db), "
                       "a journal file (study.jsonl) or leave it out")  # fmt: skip


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    """SQLite set up for speed and for parallel workers.

    WAL without an fsync per commit: Optuna commits once per parameter, ~200 per trial, and at a few ms
    per fsync that was 0.6 trials/s. A killed process loses nothing (the WAL is in the OS cache); a power
    cut may lose the last trials but never corrupts the file. Real transactions (``BEGIN IMMEDIATE``, the
    engine's "begin" listener): Python's sqlite3 starts none before a SELECT, so two workers could both
    pop the same waiting trial (Optuna's ``SELECT ... FOR UPDATE`` does nothing on SQLite).
    """
    dbapi_connection.isolation_level = None  # BEGIN is left to SQLAlchemy's listener
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _make_storage(url: str, heartbeat_interval: int, grace_period: int) -> optuna.storages.BaseStorage:
    if url == ":memory:":
        return optuna.storages.InMemoryStorage()
    if url.startswith("grpc://"):  # Optuna's storage proxy (optuna.storages.run_grpc_proxy_server) in front of a database
        host, _, port = url.removeprefix("grpc://").rstrip("/").rpartition(":")
        proxy = getattr(optuna.storages, "GrpcStorageProxy", None)
        if proxy is None or not port.isdigit():
            raise BitplanError(f"--storage {url}: needs Optuna >= 4.2 and grpc://HOST:PORT")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                return proxy(host=host or "localhost", port=int(port))
        except Exception as e:  # grpcio missing, unreachable
            raise BitplanError(f"cannot open the study storage {url}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        import optuna.storages.journal as journal  # Optuna >= 4.0; 3.x named the backend JournalFileStorage

        backend = getattr(journal, "JournalFileBackend", None) or optuna.storages.JournalFileStorage
        return optuna.storages.JournalStorage(backend(str(path)))
    kw: dict[str, Any] = {"heartbeat_interval": heartbeat_interval, "grace_period": grace_period}
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        kw["engine_kwargs"] = {"connect_args": {"timeout": 60}}  # workers wait for each other's writes
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)  # Optuna >= 4.9
            if retry is not None:
                kw["heartbeat_stale_trial_callback"] = retry(max_retry=2)
            else:
                kw["failed_trial_callback"] = optuna.storages.RetryFailedTrialCallback(max_retry=2)
            rdb = optuna.storages.RDBStorage(url, **kw)
        if url.startswith("sqlite"):
            sqlalchemy.event.listen(rdb.engine, "connect", _sqlite_connect)
            sqlalchemy.event.listen(rdb.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
            rdb.engine.dispose()  # the connections that created the tables lack the settings
        return rdb
    except Exception as e:  # a bad URL, a missing database driver, an unreachable server
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BitplanError(f"cannot open the study storage {url}: {first}") from None


@dataclass(frozen=True)
class _Opened:
    """How a study was opened, so parallel workers can open it again in their own processes."""

    storage: str
    study_name: str
    sampler: str | None  # None: opened with a sampler object (run_study then takes sampler_name)
    seed: int | None
    heartbeat_interval: int
    grace_period: int


_OPENED: weakref.WeakKeyDictionary[optuna.Study, _Opened] = weakref.WeakKeyDictionary()


def open_study(
    storage: str | None,
    run_dir: Path,
    space: SearchSpace,
    *,
    study_name: str = "bitplan",
    sampler: str | optuna.samplers.BaseSampler = "nsga2",
    seed: int | None = 0,
    budgets: Budgets | None = None,
    latency: LatencyTable | None = None,
    heartbeat_interval: int = 30,
    grace_period: int = 90,
) -> optuna.Study:
    """Create the study, or load it to continue; refuses one made for another space, budgets or cost model.

    ``storage``: see :func:`resolve_storage` (None: ``study.db`` in ``run_dir``). ``sampler``: a name
    (:func:`make_sampler` with ``seed``) or a sampler object. Heartbeat seconds apply to databases only.
    """
    url = resolve_storage(storage, run_dir)
    smp = make_sampler(sampler, seed, len(space.decisions)) if isinstance(sampler, str) else sampler
    study = optuna.create_study(storage=_make_storage(url, heartbeat_interval, grace_period), sampler=smp,
                                study_name=study_name, directions=["minimize"] * 3, load_if_exists=True)  # fmt: skip
    if study.directions != [optuna.study.StudyDirection.MINIMIZE] * 3:
        raise BitplanError(f"the study {study_name!r} in {url} is not a bitplan search; use a new -o or --study-name")
    if study.metric_names is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            study.set_metric_names(METRIC_NAMES)
    name = sampler if isinstance(sampler, str) else None
    _OPENED[study] = _Opened(url, study_name, name, seed, heartbeat_interval, grace_period)
    bind_study(study, space, budgets, latency)
    return study


def space_signature(space: SearchSpace) -> str:
    """Hash of what makes trials comparable: decision names and labels, option numbers, batch, context."""
    h = hashlib.sha256(json.dumps([space.batch, space.context]).encode())
    for d in space.decisions:
        h.update(json.dumps([d.name, d.labels]).encode())
        h.update(repr([(o.score, o.storage_bits, o.kv_bytes_per_token, o.nominal_bits) for o in d.options]).encode())
    return h.hexdigest()[:16]


def bind_study(
    study: optuna.Study, space: SearchSpace, budgets: Budgets | None = None, latency: LatencyTable | None = None
) -> None:
    """Record what the study is for on first use; refuse (one line) to continue it with something else."""
    want: dict[str, Any] = {"space_signature": space_signature(space)}
    if budgets is not None:
        want["budgets"] = budgets.to_dict()
    if latency is not None:
        want["cost_model"] = latency.source
    if budgets is not None and latency is not None:
        want["constraint_names"] = list(constraint_limits(budgets, latency))
    opened = _OPENED.get(study)
    where = opened.storage if opened else f"study {study.study_name!r}"
    have = study.user_attrs
    for key, value in want.items():
        if key not in have:
            study.set_user_attr(key, value)
        elif json.loads(json.dumps(have[key])) != json.loads(json.dumps(value)):
            what = {"space_signature": "another search space", "cost_model": f"another cost model ({have[key]})"}
            old = what.get(key) or f"other budgets ({Budgets(**have['budgets']).describe()})"
            raise BitplanError(f"the study in {where} was made for {old}; use a new -o or --study-name")


def record_seeds(study: optuna.Study, space: SearchSpace, seeds: Sequence[tuple[str, list[int]]]) -> int:
    """Store the seed plans (once per study) for the sampler to run first, with their label as origin;
    returns how many are new. An identical plan twice runs once, under the first label. The stored list, not a
    recomputed one, is what a resumed run uses (see :mod:`bitplan.search._sampler`)."""
    bind_study(study, space)
    if SEED_PLANS_ATTR in study.user_attrs or study.user_attrs.get("seeded"):  # "seeded": queued by bitplan < 0.2
        return 0
    plans: list[list[Any]] = []
    seen: set[str] = set()
    for label, idx in seeds:
        params = space.labels(idx)
        key = json.dumps(params, sort_keys=True)
        if key not in seen:
            seen.add(key)
            plans.append([label, params])
    study.set_user_attr(SEED_PLANS_ATTR, plans)
    return len(plans)


# ------------------------------------------------------------------------------------- running
def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


class _Progress:
    """tqdm bar of finished trials toward the target; postfix: feasible count and feasible front size."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.seen: set[int] = set()
        self.feasible = 0
        self.front: list[tuple[float, ...]] = []  # kept incrementally: O(front) per trial
        self.bar = tqdm(total=total, file=sys.stderr, disable=not enabled, unit="trial", dynamic_ncols=True)

    def add(self, trials: Sequence[FrozenTrial]) -> None:
        new = [t for t in trials if t.state in COUNTED and t.number not in self.seen]
        for t in new:
            self.seen.add(t.number)
            if is_feasible(t):
                self.feasible += 1
                v = tuple(t.values)
                if not any(f == v or _dominates(f, v) for f in self.front):
                    self.front = [f for f in self.front if not _dominates(v, f)] + [v]
        if new:
            self.bar.set_postfix_str(f"feasible {self.feasible}, front {len(self.front)}", refresh=False)
            self.bar.update(len(new))

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.add([trial])


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """No per-trial INFO lines (the bar says it all); real warnings still show."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(before)


def _fail_running(study: optuna.Study, dead: Callable[[FrozenTrial], bool]) -> int:
    """Mark the RUNNING trials ``dead`` selects FAIL; returns how many. Their plans are not lost: the sampler
    proposes each again at the same ordinal (see ``_sampler``)."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    failed = [t for t in running if dead(t)]
    for t in failed:
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    return len(failed)


def fail_orphaned(study: optuna.Study, owners: set[str] | None) -> int:
    """Fail the RUNNING trials of processes known to be dead (``"host:pid"``; None: every running trial, when
    the study is known to be this machine's alone); returns how many.

    A killed process's trial otherwise waits out the heartbeat grace period (databases) or the grace period
    of :func:`fail_overdue` (journal files)."""
    return _fail_running(study, lambda t: owners is None or t.system_attrs.get(WORKER_ATTR) in owners)


def fail_overdue(study: optuna.Study, grace_period: int, now: datetime.datetime | None = None) -> int:
    """On a journal file (no heartbeat): fail the RUNNING trials started over ``grace_period`` seconds ago.

    A trial is proxy arithmetic and a few storage writes (milliseconds), so one still running after the grace
    period belongs to a dead process -- on whichever machine shares the file. Start times are the trial's own
    machine's local clock (Optuna's), so the machines' clocks need only agree within the grace period."""
    if not isinstance(study._storage, optuna.storages.JournalStorage):
        return 0
    cutoff = (now or datetime.datetime.now()) - datetime.timedelta(seconds=grace_period)
    return _fail_running(study, lambda t: t.datetime_start is not None and t.datetime_start < cutoff)


class _Stamp:
    """Stops a worker whose parent has died, so a killed search leaves no orphans running trials."""

    def __init__(self, parent: int) -> None:
        self.parent = parent

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if not pid_alive(self.parent):
            study.stop()


def _worker(args_file: str, parent: int) -> None:
    """One parallel process: open the same study and run trials until the study reaches its target."""
    with open(args_file, "rb") as f:
        opened, space, latency, budgets, target, quota, timeout = pickle.load(f)
    study = open_study(opened.storage, Path("."), space, study_name=opened.study_name,
                       sampler=opened.sampler or "nsga2", seed=opened.seed, budgets=budgets, latency=latency,
                       heartbeat_interval=opened.heartbeat_interval, grace_period=opened.grace_period)  # fmt: skip
    with _quiet_optuna():
        study.optimize(_Objective(space, latency, constraint_limits(budgets, latency)), n_trials=quota, timeout=timeout,
                       callbacks=[optuna.study.MaxTrialsCallback(target, states=COUNTED), _Stamp(parent)])  # fmt: skip


def run_study(
    study: optuna.Study,
    space: SearchSpace,
    latency_table: LatencyTable,
    budgets: Budgets,
    *,
    n_trials: int,
    timeout: float | None = None,
    workers: int = 1,
    progress: bool = True,
    sampler_name: str | None = None,
    seed: int | None = None,
) -> None:
    """Run until the study has ``n_trials`` complete trials (a target: a rerun continues, never restarts;
    a failed trial -- a killed process's -- does not count and its plan is proposed again).

    ``workers > 1`` spawns that many processes on the storage :func:`open_study` opened (not ``:memory:``),
    each with sampler ``sampler_name`` (default: the name the study was opened with) and ``seed``; the trial
    ordinal keeps their proposals apart. They split the remaining trials; a stop callback guards against
    overshoot. A worker that dies (killed, out of memory) has its running trial failed at once and its share
    rerun by fresh workers, up to three rounds. A trial is ~200 storage writes and microseconds of arithmetic,
    so workers pay off on a database server; on SQLite they queue for its one write lock.
    """
    if n_trials < 1 or workers < 1:
        raise BitplanError(f"--trials and --workers must be at least 1, got {n_trials} and {workers}")
    opened = _OPENED.get(study)
    if workers > 1 and (opened is None or opened.storage == ":memory:"):
        raise BitplanError("--workers > 1 needs a study storage on disk or a database (not :memory:)")
    bind_study(study, space, budgets, latency_table)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # RUNNING trials of a killed run (heartbeat storages only)
    if overdue := fail_overdue(study, opened.grace_period if opened else 90):
        _log.warning("failed %d trial(s) a dead process left running in the journal file", overdue)
    done = study.get_trials(deepcopy=False, states=COUNTED)
    remaining = n_trials - len(done)
    if remaining <= 0:
        _log.info("the study already has %d complete trials (target %d): nothing to run", len(done), n_trials)
        return
    bar = _Progress(n_trials, progress)
    bar.add(done)
    try:
        with _quiet_optuna():
            if workers == 1:
                stop = optuna.study.MaxTrialsCallback(n_trials, states=COUNTED)
                study.optimize(_Objective(space, latency_table, constraint_limits(budgets, latency_table)),
                               n_trials=remaining, timeout=timeout, callbacks=[stop, bar])  # fmt: skip
            else:
                assert opened is not None
                each = replace(opened, sampler=sampler_name or opened.sampler or "nsga2",
                               seed=seed if seed is not None else opened.seed)  # fmt: skip
                _run_workers(study, each, (space, latency_table, budgets), n_trials, workers, timeout, bar)
    finally:
        bar.bar.close()


def _run_workers(study: optuna.Study, opened: _Opened, setup: tuple[Any, ...], target: int, workers: int,
                 timeout: float | None, bar: _Progress) -> None:  # fmt: skip
    """Spawned processes (fork would copy database connections and threads); the parent moves the bar.

    Each worker's inputs go through a pickle file, not the spawn pipe: CPython writes a process's arguments
    before the child reads them, and a child that dies first (say, on re-importing an unguarded
    ``__main__``) would leave the parent blocked on a full pipe.
    """
    ctx = multiprocessing.get_context("spawn")
    host = socket.gethostname()
    died: list[str] = []
    for _round in range(3):
        remaining = target - len(study.get_trials(deepcopy=False, states=COUNTED))
        if remaining <= 0:
            break
        n = min(workers, remaining)
        quotas = [remaining // n + (i < remaining % n) for i in range(n)]
        files = []
        for q in quotas:
            with tempfile.NamedTemporaryFile("wb", prefix="bitplan-worker-", suffix=".pkl", delete=False) as f:
                pickle.dump((opened, *setup, target, q, timeout), f)
                files.append(f.name)
        procs = [ctx.Process(target=_worker, args=(f, os.getpid()), name=f"bitplan-search-{i}", daemon=True)
                 for i, f in enumerate(files)]  # fmt: skip
        try:
            for p in procs:
                p.start()
            while alive := [p for p in procs if p.is_alive()]:
                alive[0].join(timeout=1.0)
                bar.add(study.get_trials(deepcopy=False, states=COUNTED))
                dead = {f"{host}:{p.pid}" for p in procs if not p.is_alive() and p.exitcode != 0}
                if dead:
                    fail_orphaned(study, dead)
        finally:
            for p in procs:
                if p.pid is not None:
                    p.join(timeout=30)
                if p.is_alive():
                    p.terminate()
            for name in files:
                Path(name).unlink(missing_ok=True)
        bad = [p for p in procs if p.exitcode != 0]
        fail_orphaned(study, {f"{host}:{p.pid}" for p in bad})
        died += [f"{p.name} (exit code {p.exitcode})" for p in bad]
        if bad:
            _log.warning("search worker(s) died: %s; their running trials are failed and their share is rerun",
                         ", ".join(f"{p.name} (exit code {p.exitcode})" for p in bad))  # fmt: skip
        if not bad:
            break
    bar.add(study.get_trials(deepcopy=False, states=COUNTED))
    if len(study.get_trials(deepcopy=False, states=COUNTED)) < target and died:
        raise BitplanError(f"search worker(s) failed: {', '.join(died)}; run the same command again to continue")


# ------------------------------------------------------------------------------------- results
def front(study: optuna.Study) -> list[FrozenTrial]:
    """Feasible Pareto-optimal complete trials, each plan once, by quality loss; [] if none is feasible."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    out: list[FrozenTrial] = []
    plans: set[str] = set()
    for t in sorted((t for t in done if is_feasible(t)), key=lambda t: (tuple(t.values), t.number)):
        key = json.dumps(t.params, sort_keys=True)  # lexicographic order: a dominating trial comes first
        if key not in plans and not any(_dominates(f.values, t.values) for f in out):
            plans.add(key)
            out.append(t)
    return out


def trials_frame(study: optuna.Study) -> pa.Table:
    """One row per trial: state, origin, objectives, feasibility, constraints, proxy, verify_*, params JSON.

    Schema metadata ``bitplan``: JSON with ``kind`` ``bitplan.trials`` and ``schema_version`` 1.
    """
    trials = study.get_trials(deepcopy=False)
    attrs = study.user_attrs
    names = list(attrs.get("constraint_names", []))
    measured = {t.number: {**{k: v for k, v in t.user_attrs.items() if k.startswith("verify_")},
                           **attrs.get(f"verify:{t.number}", {})} for t in trials}  # see _verify  # fmt: skip
    verify = sorted({"verify_kl", "verify_ppl"} | {k for m in measured.values() for k in m})
    proxy_cols = ["avg_weight_bits", "weight_bytes", "kv_bytes", "avg_kv_bits"]
    cons_cols = [f"constraint_{n}" for n in names]
    cols: dict[str, list[Any]] = {k: [] for k in ["number", "state", "origin", *METRIC_NAMES, "feasible", *cons_cols,
                                                  *proxy_cols, *verify, "params", "datetime_start",
                                                  "datetime_complete", "duration_s"]}  # fmt: skip
    for t in trials:
        proxy = t.user_attrs.get("proxy", {})
        cons = trial_constraints(t) or []
        values = t.values or [proxy.get(k) for k in ("quality", "memory_bytes", "latency_ms")]
        row = {"number": t.number, "state": t.state.name, "origin": t.user_attrs.get("origin"),
               **dict(zip(METRIC_NAMES, values, strict=True)), "feasible": is_feasible(t),
               **{c: (cons[i] if i < len(cons) else None) for i, c in enumerate(cons_cols)},
               **{k: proxy.get(k) for k in proxy_cols}, **{k: measured[t.number].get(k) for k in verify},
               "params": json.dumps(t.params), "datetime_start": t.datetime_start,
               "datetime_complete": t.datetime_complete,
               "duration_s": t.duration.total_seconds() if t.duration is not None else None}  # fmt: skip
        for k, v in row.items():
            cols[k].append(v)
    types = {"number": pa.int64(), "state": pa.string(), "origin": pa.string(), "feasible": pa.bool_(),
             "params": pa.string(), "datetime_start": pa.timestamp("us"), "datetime_complete": pa.timestamp("us")}  # fmt: skip
    schema = pa.schema([(k, types.get(k, pa.float64())) for k in cols])
    meta = {"kind": TRIALS_KIND, "schema_version": TRIALS_SCHEMA_VERSION, "study_name": study.study_name,
            "metric_names": METRIC_NAMES, "constraint_names": names,
            "constraints": "relative excess: metric / limit - 1, feasible when <= 0"}  # fmt: skip
    return pa.table(cols, schema=schema).replace_schema_metadata({b"bitplan": json.dumps(meta).encode()})
