"""Run outputs: front plan files, trials.parquet, the pick in best.json, a self-contained report.html."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pyarrow.parquet as pq
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial

from bitplan.errors import BitplanError
from bitplan.plan import Plan
from bitplan.search._budgets import Budgets
from bitplan.search._cost import BytesCostModel
from bitplan.search._report import write_outputs
from bitplan.search._space import SearchSpace
from bitplan.search._verify import Verified, record_verification

from ._synth import hand_space

MEMORY_LIMIT = 180_000.0  # bytes: everything but the all-16-bit plan fits
EVIL = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def space(make_random_lm: Callable[..., Any]) -> SearchSpace:
    return hand_space(make_random_lm("llama"))


def add(
    study: optuna.Study, space: SearchSpace, weight: str, kv: str = "k16v16", origin: str = "sampler"
) -> FrozenTrial:
    """A finished trial as the search writes it: 3 objectives, proxy/origin user attrs, a memory constraint."""
    params = {d.name: (weight if d.kind == "weight" else kv) for d in space.decisions}
    index = space.index(params)
    m = space.metrics(index)
    lat = BytesCostModel().latency(space).total(index)
    proxy = {"quality": m.quality, "avg_weight_bits": m.avg_weight_bits, "weight_bytes": m.weight_bytes,
             "kv_bytes": m.kv_bytes, "avg_kv_bits": m.avg_kv_bits, "memory_bytes": m.memory_bytes, "latency_ms": lat}  # fmt: skip
    study.add_trial(
        optuna.trial.create_trial(
            params=params, distributions={d.name: CategoricalDistribution(d.labels) for d in space.decisions},
            values=[m.quality, m.memory_bytes, lat], user_attrs={"proxy": proxy, "origin": origin},
            system_attrs={"constraints:memory_bytes": m.memory_bytes / MEMORY_LIMIT - 1.0},  # set_constraint
        )
    )  # fmt: skip
    return study.get_trials(deepcopy=False)[-1]


@pytest.fixture
def study(space: SearchSpace) -> tuple[optuna.Study, list[FrozenTrial]]:
    """Trials 0..4; the feasible front (by hand) is 1, 2, 3, 4; trial 0 (all 16-bit) breaks the budget."""
    s = optuna.create_study(directions=["minimize"] * 3)
    s.set_user_attr("constraint_names", ["memory_bytes"])
    add(s, space, "bf16", origin="uniform bf16 k16v16")
    front = [add(s, space, "w4g64a", origin="uniform w4g64a k16v16"), add(s, space, "w4g64a", "k4v4"),
             add(s, space, "w2g64a", origin=EVIL), add(s, space, "w2g64a", "k4v4", origin="knapsack memory<=45MB")]  # fmt: skip
    return s, front


def run(
    tmp_path: Path, s: optuna.Study, space: SearchSpace, front: list[FrozenTrial], **kw: Any
) -> dict[str, Any]:
    kw.setdefault("budgets", Budgets(max_memory=MEMORY_LIMIT))
    kw.setdefault("latency_source", "bytes-based estimate at 20 GB/s (no hardware profile)")
    kw.setdefault("extra_summary", {"stage_seconds": {"study": 1.25, "verify": 3.5}, "seeds": 4})
    return write_outputs(tmp_path, s, space, front, **kw)


def test_outputs_written_and_plans_load_and_validate(tmp_path: Path, space: SearchSpace, study: Any) -> None:
    s, front = study
    summary = run(tmp_path, s, space, front)
    files = sorted((tmp_path / "front").glob("plan-*.json"))
    assert [f.name for f in files] == ["plan-01.json", "plan-02.json", "plan-03.json", "plan-04.json"]
    assert summary["front"] == [str(f) for f in files]
    qualities = []
    for rank, f in enumerate(files, 1):
        plan = Plan.load(f).validate(space.graph)
        meta = plan.metadata
        assert meta["rank"] == rank and meta["origin"] and meta["latency_source"].startswith("bytes-based")
        assert meta["budgets"]["max_memory"] == MEMORY_LIMIT and meta["verification"] is None
        assert meta["feasible"] is True and meta["constraints"]["memory_bytes"] <= 0
        trial = s.trials[meta["trial"]]
        assert meta["proxy"]["memory_bytes"] == pytest.approx(trial.values[1])
        assert plan.to_dict()["layers"] == space.to_plan(trial.params).to_dict()["layers"]
        qualities.append(meta["proxy"]["quality"])
    assert qualities == sorted(qualities)
    table = pq.read_table(tmp_path / "trials.parquet")
    assert table.num_rows == 5 and "number" in table.column_names
    assert json.loads(table.schema.metadata[b"bitplan"])["kind"] == "bitplan.trials"
    assert summary["trials"] == str(tmp_path / "trials.parquet") and summary["seeds"] == 4


def test_best_by_proxy_then_by_measured_kl(tmp_path: Path, space: SearchSpace, study: Any) -> None:
    s, front = study
    summary = run(tmp_path, s, space, front)
    best = Plan.load(tmp_path / "best.json")
    assert summary["best_trial"] == best.metadata["trial"] == 1  # lowest proxy KL among feasible
    assert best.metadata["picked_by"] == "quality" and "no plan was verified" in best.metadata["pick_reason"]
    assert best.metadata["front_file"] == "front/plan-01.json"
    # measurements recorded after the front list was taken: the measured KL decides among verified plans
    record_verification(s, [Verified(1, 0.08, 0.30, 9.0, 126, 1.0), Verified(3, 0.16, 0.05, 8.0, 126, 1.0),
                            Verified(2, 0.09, 0.20, 8.5, 126, 1.0)])  # fmt: skip
    summary = run(tmp_path, s, space, front)
    best = Plan.load(tmp_path / "best.json")
    assert summary["best_trial"] == best.metadata["trial"] == 3
    assert "measured KL" in best.metadata["pick_reason"] and summary["best_metrics"]["verify_kl"] == 0.05
    assert best.metadata["verification"] == {"kl": 0.05, "ppl": 8.0, "tokens": 126}
    assert summary["agreement"]["n"] == 3 and summary["agreement"]["best_agrees"] is False
    assert Plan.load(tmp_path / "front" / "plan-01.json").metadata["verification"]["kl"] == 0.30
    table = pq.read_table(tmp_path / "trials.parquet").to_pydict()
    assert table["verify_kl"][3] == 0.05 and table["verify_kl"][4] is None


def test_best_by_memory_and_latency(tmp_path: Path, space: SearchSpace, study: Any) -> None:
    s, front = study
    mem = run(tmp_path, s, space, front, best_pick="memory")
    assert mem["best_trial"] == 4 and Plan.load(tmp_path / "best.json").metadata["picked_by"] == "memory"
    lat = run(tmp_path, s, space, front, best_pick="latency")
    assert lat["best_trial"] == min(front, key=lambda t: t.values[2]).number
    with pytest.raises(BitplanError, match="--pick"):
        run(tmp_path, s, space, front, best_pick="speed")


def test_stale_front_files_removed(tmp_path: Path, space: SearchSpace, study: Any) -> None:
    s, front = study
    (tmp_path / "front").mkdir()
    (tmp_path / "front" / "plan-07.json").write_text("{}")
    (tmp_path / "front" / "notes.txt").write_text("mine")
    run(tmp_path, s, space, front)
    assert (tmp_path / "front" / "plan-04.json").is_file() and not (
        tmp_path / "front" / "plan-07.json"
    ).exists()
    run(tmp_path, s, space, front[:2])  # a smaller front on a rerun
    assert sorted(p.name for p in (tmp_path / "front").iterdir()) == [
        "notes.txt",
        "plan-01.json",
        "plan-02.json",
    ]
    assert not list(tmp_path.glob("**/.*.tmp"))  # no temporary files left behind
    summary = run(tmp_path, s, space, [])
    assert summary["best"] is None and not (tmp_path / "best.json").exists()
    assert sorted(p.name for p in (tmp_path / "front").iterdir()) == ["notes.txt"]


def test_report_is_self_contained_with_table_and_plots(
    tmp_path: Path, space: SearchSpace, study: Any
) -> None:
    s, front = study
    record_verification(s, [Verified(1, 0.08, 0.07, 9.0, 126, 1.0), Verified(2, 0.09, 0.09, 8.5, 126, 1.0)])
    summary = run(tmp_path, s, space, front)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert summary["report"] == str(tmp_path / "report.html")
    assert page.count('class="plotly-graph-div"') == 2 and page.count("plotly.js v") <= 1
    assert not re.search(r"<script[^>]*\bsrc=", page)  # nothing fetched at view time (no CDN)
    assert "cdn.plot.ly/plotly" not in page
    assert '<table class="front">' in page and page.count("<tr><td>") + page.count('<tr class="best">') >= 4
    assert '<tr class="best"><td>1</td><td>1</td>' in page  # trial 1: lowest measured KL, rank 1
    assert "ESTIMATE" in page and "tiny-llama" in page and "memory &lt;= 0.2 MB" in page
    assert "Stage timings" in page and "3.5" in page and "Proxy vs measured order" in page
    assert EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "knapsack memory&lt;=45MB" in page


def test_report_labels_measured_latency(tmp_path: Path, space: SearchSpace, study: Any) -> None:
    s, front = study
    run(tmp_path, s, space, front, latency_source="measured profile h100 (2025-01-01)", extra_summary=None)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert (
        "ESTIMATE" not in page and "measured profile h100" in page and "Proxy vs measured order" not in page
    )


def test_outputs_are_one_set_with_a_manifest(
    tmp_path: Path, space: SearchSpace, study: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure while the outputs are written leaves the previous run's set whole (no new file, no temp file);
    the manifest written last lists every file's hash, and check_outputs notices a set that is not one."""
    from bitplan.errors import BitplanError
    from bitplan.search import _report, check_outputs

    s, front = study
    run(tmp_path, s, space, front)
    (tmp_path / "summary.json").write_text("{}")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    listed = check_outputs(tmp_path)
    assert set(listed) == {"best.json", "report.html", "trials.parquet", *(f"front/plan-0{i}.json" for i in range(1, 5))}

    def broken(*a: Any, **k: Any) -> str:  # the report fails after the plans and the table were staged
        raise RuntimeError("disk full")

    monkeypatch.setattr(_report, "_render", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        run(tmp_path, s, space, front[:2], best_pick="memory")
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # same files, same bytes, no temporaries
    monkeypatch.undo()

    run(tmp_path, s, space, front[:2], best_pick="memory")  # a smaller front: stale plans go in the same commit
    assert sorted(check_outputs(tmp_path)) == ["best.json", "front/plan-01.json", "front/plan-02.json", "report.html", "trials.parquet"]
    assert not (tmp_path / "front" / "plan-03.json").exists() and not (tmp_path / "summary.json").exists()
    (tmp_path / "front" / "plan-02.json").write_bytes(before[Path("front/plan-01.json")])  # not this set's file
    with pytest.raises(BitplanError, match="plan-02.json differs"):
        check_outputs(tmp_path)
    (tmp_path / "outputs.json").unlink()
    with pytest.raises(BitplanError, match="never completed"):
        check_outputs(tmp_path)
