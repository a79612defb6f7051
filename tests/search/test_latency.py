"""Timing the front's decode latency: measurement, stored numbers, which plans go on, and the pick."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pyarrow.parquet as pq
import pytest
import torch

from bitplan.plan import Plan
from bitplan.search import _latency
from bitplan.search._budgets import Budgets
from bitplan.search._latency import (
    MeasuredLatency,
    latency_ok,
    measure_latency,
    record_latency,
    verify_latency,
)
from bitplan.search._space import SearchSpace
from bitplan.search._verify import Verified, record_verification, with_verification

from .test_report import MEMORY_LIMIT, add, run
from .test_verify import trial, uniform_params


@pytest.fixture(scope="module")
def model(make_random_lm: Callable[..., Any]) -> Any:
    return make_random_lm("llama")


@pytest.fixture(scope="module")
def space(model: Any) -> SearchSpace:
    from ._synth import hand_space

    return hand_space(model)


@pytest.fixture
def study(space: SearchSpace) -> tuple[optuna.Study, list[Any]]:
    """Trials 0..4; the feasible front is 1..4 in proxy order 1, 2, 3, 4 (see test_report's fixture)."""
    s = optuna.create_study(directions=["minimize"] * 3)
    s.set_user_attr("constraint_names", ["memory_bytes"])
    add(s, space, "bf16")
    front = [add(s, space, "w4g64a"), add(s, space, "w4g64a", "k4v4"), add(s, space, "w2g64a"),
             add(s, space, "w2g64a", "k4v4")]  # fmt: skip
    return s, front


def test_measure_latency_times_the_plan_next_to_the_model(model: Any, space: SearchSpace) -> None:
    small = dataclasses.replace(space, context=20)  # a short context keeps the test quick
    before = [p.detach().clone() for p in model.parameters()]
    recs = measure_latency(
        model, small, [trial(small, uniform_params(small, "w4g64a", "k4v4"), 3)], new=3, rounds=3
    )
    (r,) = recs
    assert r.trial == 3 and r.rounds == 3 and r.ms > 0 and r.ms_16bit > 0 and r.seconds > 0
    assert r.ratio <= r.ratio_worst and r.ratio > 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # model untouched
    assert getattr(model, "bitplan_plan", None) is None and not hasattr(model, "bitplan_kv_formats")


def test_latency_ok_checks_ratio_budgets_on_the_ratio_and_ms_budgets_on_ms() -> None:
    attrs = MeasuredLatency(
        0, ms=12.0, ms_16bit=10.0, ratio=0.95, ratio_worst=1.1, rounds=5, seconds=1.0
    ).attrs()
    assert (
        latency_ok(Budgets(max_latency_ratio=1.0), attrs) is True
    )  # the ratio of the same rounds, not 12/10
    assert latency_ok(Budgets(max_latency_ratio=0.9), attrs) is False
    assert latency_ok(Budgets(max_latency_ms=11.0), attrs) is False
    assert latency_ok(Budgets(max_latency_ms=12.0), attrs) is True
    assert latency_ok(Budgets(max_latency_ratio=1.0), attrs, margin=0.03) is True  # 0.95 <= 0.97
    assert latency_ok(Budgets(max_latency_ratio=0.97), attrs, margin=0.03) is False  # 0.95 > 0.9409
    assert latency_ok(Budgets(max_latency_ms=12.0), attrs, margin=0.03) is False
    assert latency_ok(Budgets(max_memory=1e9), attrs) is None  # no latency budget
    assert latency_ok(Budgets(max_latency_ratio=1.0), {}) is None  # not timed


def _fake_timer(monkeypatch: pytest.MonkeyPatch, ratios: dict[int, float]) -> list[int]:
    """Replace the device timing by fixed ratios per trial; returns the list of trials timed."""
    calls: list[int] = []

    def fake(model: Any, space: Any, trials: Any, **kw: Any) -> list[MeasuredLatency]:
        calls.extend(t.number for t in trials)
        return [MeasuredLatency(t.number, 10.0 * ratios[t.number], 10.0, ratios[t.number], ratios[t.number] + 0.05,
                                kw.get("rounds", 5), 0.1) for t in trials]  # fmt: skip

    monkeypatch.setattr(_latency, "measure_latency", fake)
    return calls


def test_verify_latency_times_in_proxy_order_until_k_meet_the_budget(
    monkeypatch: pytest.MonkeyPatch, space: SearchSpace, study: Any
) -> None:
    s, front = study
    calls = _fake_timer(monkeypatch, {1: 1.05, 2: 0.97, 3: 0.90, 4: 0.80})
    out = verify_latency(s, None, space, front, Budgets(max_latency_ratio=1.0), k=2, progress=False)
    assert calls == [1, 2, 3]  # stops once two met the budget
    assert out["timed"] == [1, 2, 3] and out["passing"] == [2, 3] and out["timed_now"] == 3
    stored = {t.number: t.user_attrs.get("verify_ratio") for t in with_verification(s, s.get_trials())}
    assert stored == {0: None, 1: 1.05, 2: 0.97, 3: 0.90, 4: None}
    # a rerun reuses the stored numbers and re-judges them against the (now tighter) budget
    again = verify_latency(s, None, space, front, Budgets(max_latency_ratio=0.95), k=2, progress=False)
    assert calls == [1, 2, 3, 4] and again["passing"] == [3, 4] and again["timed_now"] == 1
    # the cap on plans timed holds even when too few pass
    capped = verify_latency(
        s, None, space, front, Budgets(max_latency_ratio=0.5), k=2, max_measured=3, progress=False
    )
    assert capped["timed"] == [1, 2, 3] and capped["passing"] == []


def test_verify_latency_without_a_budget_times_the_first_k(
    monkeypatch: pytest.MonkeyPatch, space: SearchSpace, study: Any
) -> None:
    s, front = study
    calls = _fake_timer(monkeypatch, {1: 1.5, 2: 1.4, 3: 0.9, 4: 0.8})
    out = verify_latency(s, None, space, front, Budgets(max_memory=MEMORY_LIMIT), k=2, progress=False)
    assert calls == [1, 2] and out["passing"] == [1, 2]  # measured, reported, nothing rejected


def test_pick_only_among_plans_that_met_the_latency_budget(
    tmp_path: Path, space: SearchSpace, study: Any
) -> None:
    s, front = study
    budgets = Budgets(max_memory=MEMORY_LIMIT, max_latency_ratio=1.0)
    record_latency(s, [MeasuredLatency(1, 11.0, 10.0, 1.10, 1.2, 5, 1.0), MeasuredLatency(2, 9.8, 10.0, 0.98, 1.01, 5, 1.0),
                       MeasuredLatency(3, 9.0, 10.0, 0.90, 0.93, 5, 1.0)])  # fmt: skip
    # trial 1 has the lowest measured KL but broke the budget when timed: never picked
    record_verification(s, [Verified(1, 0.08, 0.01, 9.0, 126, 1.0), Verified(2, 0.09, 0.20, 8.5, 126, 1.0),
                            Verified(3, 0.16, 0.05, 8.0, 126, 1.0)])  # fmt: skip
    summary = run(tmp_path, s, space, front, budgets=budgets)
    best = Plan.load(tmp_path / "best.json")
    assert summary["best_trial"] == best.metadata["trial"] == 3
    assert "2 of 3 timed plans met the latency budget" in best.metadata["pick_reason"]
    assert best.metadata["measured_latency"] == {"ms": 9.0, "ms_16bit": 10.0, "ratio": 0.90, "ratio_worst": 0.93,
                                                 "latency_rounds": 5, "meets_budget": True}  # fmt: skip
    metas = {
        Plan.load(f).metadata["trial"]: Plan.load(f).metadata
        for f in (tmp_path / "front").glob("plan-*.json")
    }
    assert metas[1]["measured_latency"]["meets_budget"] is False and "measured_latency" not in metas[4]
    assert summary["best_metrics"]["verify_ratio"] == 0.90
    table = pq.read_table(tmp_path / "trials.parquet").to_pydict()
    assert table["verify_ratio"][1] == 1.10 and table["verify_ms"][4] is None
    html = (tmp_path / "report.html").read_text()
    assert "meets latency" in html and "x 16-bit" in html
    # the latency pick uses the measured figure
    assert run(tmp_path, s, space, front, budgets=budgets, best_pick="latency")["best_trial"] == 3


def test_no_pick_when_no_timed_plan_met_the_budget(tmp_path: Path, space: SearchSpace, study: Any) -> None:
    s, front = study
    (tmp_path / "best.json").write_text("{}")  # a previous run's pick must not survive as this run's
    record_latency(
        s,
        [
            MeasuredLatency(1, 11.0, 10.0, 1.10, 1.2, 5, 1.0),
            MeasuredLatency(2, 10.3, 10.0, 1.03, 1.1, 5, 1.0),
        ],
    )
    summary = run(tmp_path, s, space, front, budgets=Budgets(max_latency_ratio=1.0))
    assert summary["best"] is None and summary["best_trial"] is None
    assert "none of the 2 front plans timed meets the latency budget" in summary["best_reason"]
    assert "1.030x" in summary["best_reason"] and not (tmp_path / "best.json").exists()
