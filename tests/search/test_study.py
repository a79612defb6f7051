"""The Optuna study: seeds first, constraints and feasibility, the front, resume, storages, workers, crashes."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from bitplan.errors import BitplanError
from bitplan.graph import build_graph
from bitplan.search._budgets import Budgets
from bitplan.search._cost import BytesCostModel, LatencyTable
from bitplan.search._space import SearchSpace
from bitplan.search._study import (
    COUNTED,
    SAMPLERS,
    front,
    is_feasible,
    make_sampler,
    open_study,
    record_seeds,
    resolve_storage,
    run_study,
    trial_constraints,
    trials_frame,
)
from bitplan.sensitivity import ScoreRow, SensitivityTable, TableMeta

optuna.logging.set_verbosity(optuna.logging.WARNING)
WEIGHTS = (("w8g64a", 8.5), ("w4g64a", 4.5), ("w3g64a", 3.5), ("w2g64a", 2.5))


def _table(graph: Any) -> SensitivityTable:
    """Made-up scores that grow as bits shrink, different per unit and layer."""
    rows = []
    for k, u in enumerate(graph.units("fused")):
        for fmt, bits in WEIGHTS:
            rows.append(ScoreRow(u.name, int(u.layer or 0), "weight", fmt, "rtn", "kl", 0.01 * (k + 1) * (9 - bits), params=u.numel, bits=bits))  # fmt: skip
    for i in range(graph.num_layers):
        rows.append(ScoreRow(f"layers.{i}.acts", i, "act", "a8t", "", "kl", 0.002 * (i + 1), bits=8.0))
        for j, fmt in enumerate(("k8v8", "k4v4", "k2v2")):
            rows.append(ScoreRow(f"layers.{i}.kv", i, "kv", fmt, "", "kl", 0.01 * (j + 1) * (i + 1), bits=3.0))
    meta = TableMeta(
        model_fingerprint=graph.fingerprint, model_name="tiny", calib_hash="c0ffee", calib_source="calib.txt",
        tokens=1024, window=512, granularity="fused", dtype="float32", num_kv_heads=graph.num_kv_heads,
        head_dim=graph.head_dim,
    )  # fmt: skip
    return SensitivityTable(rows, meta)


@pytest.fixture(scope="module")
def setup(make_random_lm: Callable[..., Any]) -> tuple[SearchSpace, SensitivityTable, Any, LatencyTable, Budgets]:
    graph = build_graph(make_random_lm("llama"))
    table = _table(graph)
    space = SearchSpace.from_table(table, graph, context=256)
    latency = BytesCostModel().latency(space)
    ref = space.metrics([0] * len(space.decisions))
    budgets = Budgets(max_avg_bits=6.0, max_memory=0.8 * ref.memory_bytes, max_latency_ratio=0.9)
    return space, table, graph, latency, budgets


def _open(setup: Any, storage: str | None, run_dir: Path, **kw: Any) -> optuna.Study:
    space, _, _, latency, budgets = setup
    return open_study(storage, run_dir, space, budgets=budgets, latency=latency, **kw)


def _run(study: optuna.Study, setup: Any, n: int, **kw: Any) -> None:
    space, _, _, latency, budgets = setup
    run_study(study, space, latency, budgets, n_trials=n, progress=False, **kw)


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=COUNTED)


def test_seeds_run_first_and_keep_their_origin(setup: Any, tmp_path: Path) -> None:
    space = setup[0]
    seeds = [("knapsack-w4", space.uniform(weight="w4g64a", kv="k4v4")), ("all-16bit", [0] * len(space.decisions))]
    study = _open(setup, None, tmp_path)
    assert record_seeds(study, space, seeds) == 2
    assert record_seeds(study, space, seeds) == 0  # once per study
    _run(study, setup, 8)
    trials = study.get_trials()
    assert len(trials) == 8 and all(t.state == TrialState.COMPLETE for t in trials)
    assert [t.user_attrs["origin"] for t in trials[:2]] == ["knapsack-w4", "all-16bit"]
    assert space.index(trials[0].params) == seeds[0][1]
    assert {t.user_attrs["origin"] for t in trials[2:]} == {"sampler"}
    assert (tmp_path / "study.db").is_file() and study.metric_names == ["quality_loss", "memory_bytes", "latency_ms"]


def test_constraints_are_recorded_and_feasibility_follows_them(setup: Any) -> None:
    space, _, _, latency, budgets = setup
    study = _open(setup, ":memory:", Path("."), sampler="random")
    _run(study, setup, 30)
    assert study.user_attrs["constraint_names"] == ["avg_weight_bits", "memory_bytes", "latency_ms"]
    limits = [budgets.max_avg_bits, budgets.max_memory, budgets.latency_limit(latency.reference())]
    feasible = 0
    for t in study.get_trials():
        p = t.user_attrs["proxy"]
        idx = space.index(t.params)
        assert t.values == pytest.approx([p["quality"], p["memory_bytes"], p["latency_ms"]])
        assert p["latency_ms"] == pytest.approx(latency.total(idx))
        want = [p["avg_weight_bits"] / limits[0] - 1, p["memory_bytes"] / limits[1] - 1, p["latency_ms"] / limits[2] - 1]
        assert trial_constraints(t) == pytest.approx(want)
        assert is_feasible(t) == all(c <= 0 for c in want)
        feasible += is_feasible(t)
        if hasattr(optuna.trial.Trial, "set_constraint"):  # Optuna 5: what the samplers read
            assert t.constraints == pytest.approx(dict(zip(study.user_attrs["constraint_names"], want, strict=True)))
    assert 0 < feasible < 30  # the budgets cut the random plans in two


def test_trial_constraints_reads_every_storage_format() -> None:
    dist = {"x": CategoricalDistribution(["a", "b"])}
    legacy = optuna.trial.create_trial(params={"x": "a"}, distributions=dist, values=[1, 2, 3],
                                       system_attrs={"constraints": [0.5, -1.0]})  # fmt: skip
    assert trial_constraints(legacy) == [0.5, -1.0] and not is_feasible(legacy)  # Optuna 4 constraints_func
    none = optuna.trial.create_trial(params={"x": "a"}, distributions=dist, values=[1, 2, 3])
    assert trial_constraints(none) is None and not is_feasible(none)
    if hasattr(optuna.trial.Trial, "set_constraint"):  # Optuna 5 set_constraint keys, in bitplan's order
        named = optuna.trial.create_trial(params={"x": "a"}, distributions=dist, values=[1, 2, 3],
                                          constraints={"latency_ms": 0.1, "avg_weight_bits": -0.2})  # fmt: skip
        assert trial_constraints(named) == [-0.2, 0.1] and not is_feasible(named)


def test_nsga2_front_is_feasible_and_pareto(setup: Any) -> None:
    study = _open(setup, ":memory:", Path("."), sampler="nsga2", seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(study, setup, 60)
    assert not [w for w in caught if "constraints_func" in str(w.message)]  # Optuna 5: set_constraint only
    for t in study.get_trials():  # what the sampler reads: Optuna 5 set_constraint, Optuna 4 constraints_func
        native = t.constraints.values() if hasattr(t, "constraints") else t.system_attrs["constraints"]
        assert list(native) == pytest.approx(t.user_attrs["constraints"])
    pareto = front(study)
    assert pareto and all(is_feasible(t) for t in pareto)
    values = [t.values for t in pareto]
    assert values == sorted(values)
    assert len({json.dumps(t.params, sort_keys=True) for t in pareto}) == len(pareto)
    for a in pareto:
        assert not any(all(x <= y for x, y in zip(b.values, a.values, strict=True)) and b.values != a.values
                       for b in pareto)  # fmt: skip
    others = [t for t in study.get_trials() if is_feasible(t) and t not in pareto]
    assert all(any(all(x <= y for x, y in zip(f.values, t.values, strict=True)) for f in pareto) for t in others)
    if hasattr(optuna.trial.Trial, "set_constraint"):  # Optuna's own constrained front agrees
        assert {t.number for t in study.best_trials} >= {t.number for t in pareto}


def test_front_is_empty_when_nothing_is_feasible(setup: Any) -> None:
    space, _, _, latency, _ = setup
    tight = Budgets(max_avg_bits=1.0)
    study = open_study(":memory:", Path("."), space, budgets=tight, latency=latency, sampler="random")
    run_study(study, space, latency, tight, n_trials=5, progress=False)
    assert front(study) == [] and len(study.get_trials()) == 5


def test_rerun_continues_to_the_target_and_never_restarts(setup: Any, tmp_path: Path) -> None:
    _run(_open(setup, None, tmp_path), setup, 10)
    again = _open(setup, None, tmp_path)  # a new process would do exactly this
    _run(again, setup, 10)
    assert len(again.get_trials()) == 10
    _run(again, setup, 16)
    assert len(_finished(again)) == 16 and [t.number for t in again.get_trials()] == list(range(16))


def test_a_study_for_another_space_or_budgets_is_refused(setup: Any, tmp_path: Path) -> None:
    space, table, graph, latency, budgets = setup
    _run(_open(setup, None, tmp_path), setup, 3)
    other = SearchSpace.from_table(table, graph, context=256, weights=["w4g64a"])
    with pytest.raises(BitplanError, match="made for another search space; use a new -o or --study-name") as e:
        open_study(None, tmp_path, other, budgets=budgets, latency=latency)
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)
    with pytest.raises(BitplanError, match=r"made for other budgets \(avg weight bits <= 6"):
        open_study(None, tmp_path, space, budgets=Budgets(max_avg_bits=5.0), latency=latency)
    with pytest.raises(BitplanError, match="another cost model"):
        open_study(None, tmp_path, space, budgets=budgets, latency=BytesCostModel(50.0).latency(space))
    study = open_study(None, tmp_path, space, budgets=budgets, latency=latency, study_name="other")
    assert len(study.get_trials()) == 0  # another --study-name in the same file is a fresh study


def test_journal_file_storage_resumes(setup: Any, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "study.jsonl"
    assert resolve_storage(str(path), tmp_path) == f"journal:{path}"
    assert resolve_storage(f"journal:{path}", tmp_path) == f"journal:{path}"
    assert resolve_storage("sqlite:///x.db", tmp_path) == "sqlite:///x.db"
    assert resolve_storage(None, tmp_path) == f"sqlite:///{tmp_path / 'study.db'}"
    with pytest.raises(BitplanError, match="--storage: cannot read 'study.txt'"):
        resolve_storage("study.txt", tmp_path)
    _run(_open(setup, str(path), tmp_path), setup, 6)
    again = _open(setup, str(path), tmp_path)
    _run(again, setup, 9)
    assert path.is_file() and len(_finished(again)) == 9


def test_journal_file_fails_trials_running_past_the_grace_period(setup: Any, tmp_path: Path) -> None:
    """No heartbeat on a journal file: a trial RUNNING longer than the grace period (trials take milliseconds)
    is a dead process's, on any machine; the next run fails it and completes the target without it."""
    import datetime

    from bitplan.search._study import fail_overdue

    study = _open(setup, f"journal:{tmp_path / 'study.jsonl'}", tmp_path, grace_period=90)
    orphan = study.ask()  # as a process on another machine left it: RUNNING, its pid unknown here
    now = datetime.datetime.now()
    assert fail_overdue(study, 90, now=now + datetime.timedelta(seconds=30)) == 0  # may still be running
    assert study.get_trials()[0].state == TrialState.RUNNING
    assert fail_overdue(study, 90, now=now + datetime.timedelta(seconds=91)) == 1
    assert study.get_trials()[0].state == TrialState.FAIL
    sqlite = _open(setup, None, tmp_path / "db")
    sqlite.ask()
    assert fail_overdue(sqlite, 90, now=now + datetime.timedelta(hours=1)) == 0  # databases use their heartbeat
    _run(study, setup, 5)
    assert len(_finished(study)) == 5 and orphan.number == 0


def test_two_workers_on_sqlite_finish_exactly_the_target(setup: Any, tmp_path: Path) -> None:
    space, _, _, latency, _ = setup
    assert pickle.loads(pickle.dumps(space)).graph == space.graph  # what the spawned workers receive
    assert pickle.loads(pickle.dumps(latency)).reference() == latency.reference()
    study = _open(setup, None, tmp_path, sampler=make_sampler("nsga2", 3, len(space.decisions)))  # as search() does
    record_seeds(study, space, [("all-16bit", [0] * len(space.decisions))])
    _run(study, setup, 40, workers=2, sampler_name="nsga2", seed=3)
    trials = study.get_trials()
    assert len(trials) == 40 and all(t.state == TrialState.COMPLETE for t in trials)
    assert sum(t.user_attrs["origin"] == "all-16bit" for t in trials) == 1
    with pytest.raises(BitplanError, match="workers > 1 needs"):
        _run(_open(setup, ":memory:", tmp_path), setup, 4, workers=2)


def test_a_trial_left_running_by_a_crash_is_failed_and_retried(setup: Any, tmp_path: Path) -> None:
    study = _open(setup, None, tmp_path, heartbeat_interval=1, grace_period=1)
    _run(study, setup, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "heartbeat ... supposed to be used with optimize"
        crashed = study.ask()  # a process that died mid-trial: RUNNING, heartbeat stopped
    study._storage.record_heartbeat(crashed._trial_id)  # type: ignore[attr-defined]
    time.sleep(2.5)  # longer than the grace period (sqlite's clock has 1 s resolution)
    again = _open(setup, None, tmp_path, heartbeat_interval=1, grace_period=1)
    _run(again, setup, 6)
    trials = again.get_trials()
    assert trials[crashed.number].state == TrialState.FAIL
    assert [t.number for t in trials if t.system_attrs.get("failed_trial") == crashed.number]  # re-queued
    assert len(_finished(again)) == 6 and not again.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))


def test_trials_frame_columns_and_metadata(setup: Any) -> None:
    space = setup[0]
    study = _open(setup, ":memory:", Path("."), sampler="random")
    record_seeds(study, space, [("all-16bit", [0] * len(space.decisions))])
    _run(study, setup, 5)
    study.set_user_attr("verify:1", {"verify_kl": 0.25})  # where bitplan.search._verify records measurements
    table = trials_frame(study)
    assert table.column_names == [
        "number", "state", "origin", "quality_loss", "memory_bytes", "latency_ms", "feasible",
        "constraint_avg_weight_bits", "constraint_memory_bytes", "constraint_latency_ms",
        "avg_weight_bits", "weight_bytes", "kv_bytes", "avg_kv_bits", "verify_kl", "verify_ppl",
        "params", "datetime_start", "datetime_complete", "duration_s",
    ]  # fmt: skip
    meta = json.loads(table.schema.metadata[b"bitplan"])
    assert meta["kind"] == "bitplan.trials" and meta["schema_version"] == 1
    rows = table.to_pylist()
    assert rows[0]["origin"] == "all-16bit" and rows[0]["avg_weight_bits"] == pytest.approx(16.0)
    assert [r["verify_kl"] for r in rows] == [None, 0.25, None, None, None] and rows[0]["verify_ppl"] is None
    assert json.loads(rows[2]["params"]) == study.trials[2].params
    assert [r["feasible"] for r in rows] == [is_feasible(t) for t in study.trials]
    assert all(r["state"] == "COMPLETE" and r["duration_s"] >= 0 for r in rows)


@pytest.mark.parametrize("name", [s for s in SAMPLERS if s != "nsga2"])
def test_every_sampler_runs_with_constraints(setup: Any, name: str) -> None:
    if name == "gp" and tuple(int(p) for p in optuna.__version__.split(".")[:2]) < (4, 4):
        with pytest.raises(BitplanError, match="needs Optuna >= 4.4"):
            make_sampler(name, 0, 10)
        return
    study = _open(setup, ":memory:", Path("."), sampler=name, seed=0)
    n = 11 if name == "gp" else 12  # GP fits start after 10 random trials and take seconds each
    _run(study, setup, n)
    assert len(_finished(study)) == n and all(trial_constraints(t) is not None for t in study.get_trials())


def test_make_sampler_names() -> None:
    with pytest.raises(BitplanError, match="unknown sampler 'cma'; choose one of nsga2, nsga3, tpe, gp, random"):
        make_sampler("cma", 0, 10)


def _complete_params(study: optuna.Study) -> list[dict[str, Any]]:
    return [t.params for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]


@pytest.mark.parametrize("sampler", ["nsga2", "random"])
def test_a_resumed_study_proposes_what_an_uninterrupted_one_does(setup: Any, tmp_path: Path, sampler: str) -> None:
    """Killed twice -- once inside the seed plans, once among sampled trials -- and resumed in fresh samplers, the
    study completes the same trials in the same order, and so the same front, as one that ran straight through."""
    space = setup[0]
    seeds = [("knapsack-w4", space.uniform(weight="w4g64a", kv="k4v4")), ("all-16bit", [0] * len(space.decisions)),
             ("knapsack-w3", space.uniform(weight="w3g64a", kv="k4v4"))]  # fmt: skip

    def fresh(run_dir: Path) -> optuna.Study:  # a new process: a new sampler object seeded from --seed
        study = _open(setup, None, run_dir, sampler=make_sampler(sampler, 7, len(space.decisions)))
        record_seeds(study, space, seeds)
        return study

    straight = fresh(tmp_path / "a")
    _run(straight, setup, 70)
    resumed = fresh(tmp_path / "b")
    for stop in (1, 33):  # 1: the second seed plan is running when the process dies
        _run(resumed, setup, stop)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            killed = resumed.ask()  # it proposed (and wrote) its plan, then the process was killed
        resumed._storage.set_trial_state_values(killed._trial_id, TrialState.FAIL)  # what the next run does first
        resumed = fresh(tmp_path / "b")
    _run(resumed, setup, 70)
    assert len(resumed.get_trials(states=(TrialState.FAIL,))) == 2
    assert _complete_params(resumed) == _complete_params(straight)
    assert [t.user_attrs["origin"] for t in resumed.get_trials(states=(TrialState.COMPLETE,))][:3] == [s[0] for s in seeds]
    assert [t.params for t in front(resumed)] == [t.params for t in front(straight)]


def _storage_url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if kind == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    return str(tmp_path / ("study.db" if kind == "sqlite" else "study.jsonl"))


@pytest.mark.parametrize("kind", ["sqlite", "journal", "postgresql"])
def test_three_workers_one_killed_mid_trial_the_study_completes(
    setup: Any, tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    """3 worker processes on one study; one is SIGKILLed while it runs a trial. The study still reaches its target,
    nothing is left running or waiting, and the only failed trial is the killed worker's."""
    import signal
    import threading

    space = setup[0]
    url = _storage_url(kind, tmp_path, request)
    study = _open(setup, url, tmp_path, sampler=make_sampler("nsga2", 0, len(space.decisions)), study_name=f"workers-{kind}")
    record_seeds(study, space, [("all-16bit", [0] * len(space.decisions))])
    errors: list[BaseException] = []

    def go() -> None:
        try:
            _run(study, setup, 90, workers=3)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    runner = threading.Thread(target=go)
    runner.start()
    victim = killed_trial = None
    deadline = time.monotonic() + 120
    while victim is None and time.monotonic() < deadline and runner.is_alive():
        children = {p.pid for p in multiprocessing.active_children() if p.name.startswith("bitplan-search-")}
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = str(t.system_attrs.get("worker", ":")).rsplit(":", 1)[1]
            if owner.isdigit() and int(owner) in children and len(_finished(study)) >= 5:
                os.kill(int(owner), signal.SIGKILL)
                victim, killed_trial = int(owner), t.number
                break
        time.sleep(0.01)
    runner.join(timeout=300)
    assert not runner.is_alive() and not errors, errors
    assert victim is not None, "no worker was caught running a trial"
    trials = study.get_trials(deepcopy=False)
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 90
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert all(t.system_attrs.get("worker", "").endswith(f":{victim}") for t in failed)
    assert trials[killed_trial].state in (TrialState.FAIL, TrialState.COMPLETE)  # COMPLETE only if it won the race
    assert len({t.system_attrs["worker"] for t in trials}) >= 4  # 3 workers, then a replacement for the killed one
