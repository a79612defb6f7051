"""``bitplan search`` end to end on the tiny shared model: outputs, rerun, impossible budgets, SIGKILL + resume."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bitplan.cli import main
from bitplan.plan import Plan

FAST = ["--tokens", "1024", "--window", "128", "--verify-tokens", "512", "--kv", "k8v8;k4v4;k4v2;k2v2",
        "--weights", "w8g64a,w4g64a,w2g64a"]  # fmt: skip


def _cmd() -> list[str]:
    exe = Path(sys.executable).with_name("bitplan")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "bitplan.cli"]


@pytest.fixture(scope="module")
def table(tiny_model_path: Path, wikitext_calib: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sensitivity table of the tiny model, made once through the first search (which profiles)."""
    run = tmp_path_factory.mktemp("first")
    code = main(["search", "--model", str(tiny_model_path), "--calib", str(wikitext_calib), *FAST,
                 "--max-avg-bits", "6", "--trials", "60", "--verify-top", "2", "-o", str(run), "--json"])  # fmt: skip
    assert code == 0
    return run


def test_search_writes_every_output(table: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    summary = json.loads((table / "summary.json").read_text())
    assert summary["kind"] == "bitplan.search-summary" and summary["schema_version"] == 1
    for name in ("sensitivity.parquet", "study.db", "trials.parquet", "best.json", "report.html"):
        assert (table / name).is_file(), name
    plans = sorted((table / "front").glob("plan-*.json"))
    assert plans
    best = Plan.load(table / "best.json")
    assert best.summary().avg_weight_bits <= 6 + 1e-9
    assert best.metadata["verification"]["kl"] is not None  # picked by the measured KL on held-out text
    html = (table / "report.html").read_text()
    assert "plotly" in html.lower() and "bytes-based estimate" in html


def test_rerun_continues_instead_of_starting_over(table: Path, tiny_model_path: Path, wikitext_calib: Path) -> None:
    db = table / "study.db"

    def n_trials() -> int:
        with sqlite3.connect(db) as con:
            return int(con.execute("select count(*) from trials").fetchone()[0])

    before = n_trials()
    args = ["search", "--model", str(tiny_model_path), "--calib", str(wikitext_calib), *FAST, "--max-avg-bits", "6",
            "--verify-top", "2", "-o", str(table), "--json"]  # fmt: skip
    assert main([*args, "--trials", "60"]) == 0
    assert n_trials() == before  # target reached already: nothing new
    assert main([*args, "--trials", "80"]) == 0
    assert n_trials() == 80


def test_impossible_budget_is_one_line_with_the_smallest_achievable(
    table: Path, tiny_model_path: Path, wikitext_calib: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    code = main(["search", "--model", str(tiny_model_path), "--calib", str(wikitext_calib), *FAST,
                 "--table", str(table / "sensitivity.parquet"), "--max-avg-bits", "1.5", "-o", str(run)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--max-avg-bits 1.5 is infeasible" in err
    assert "smallest average weight bits" in err
    assert not (run / "best.json").exists() and not (run / "front").exists()


@pytest.mark.parametrize("bad", [["--max-memory", "lots"], ["--max-latency=-1ms"], ["--max-kv-bits", "0"]])
def test_bad_budgets_are_one_line(table: Path, tiny_model_path: Path, wikitext_calib: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str], bad: list[str]) -> None:  # fmt: skip
    code = main(["search", "--model", str(tiny_model_path), "--calib", str(wikitext_calib),
                 "--table", str(table / "sensitivity.parquet"), *bad, "-o", str(tmp_path / "r")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and bad[0].partition("=")[0] in err


def test_sigkilled_search_resumes_to_the_target(table: Path, tiny_model_path: Path, wikitext_calib: Path, tmp_path: Path) -> None:
    run = tmp_path / "killed"
    argv = [*_cmd(), "search", "--model", str(tiny_model_path), "--calib", str(wikitext_calib), *FAST,
            "--table", str(table / "sensitivity.parquet"), "--max-avg-bits", "6", "--trials", "400",
            "--verify-top", "0", "-o", str(run), "--json"]  # fmt: skip
    env: dict[str, Any] = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    db = run / "study.db"
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            try:
                with sqlite3.connect(db, timeout=1) as con:
                    done = int(con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0])
            except sqlite3.Error:
                done = 0
            if done >= 60:
                break
        time.sleep(0.2)
    if proc.poll() is not None:
        pytest.skip("the search finished before it could be killed (machine too fast for this timing)")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert 0 < done < 400
    again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    with sqlite3.connect(db) as con:
        states = dict(con.execute("select state, count(*) from trials group by state").fetchall())
    finished = sum(n for s, n in states.items() if s in ("COMPLETE", "PRUNED", "FAIL"))
    assert finished >= 400 and states.get("RUNNING", 0) == 0, states
    assert json.loads(again.stdout)["trials_complete"] >= 400 - states.get("FAIL", 0)


def test_kv_bit_set_is_expanded_like_the_profiler_does(tiny_model_path: Path, wikitext_calib: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    run = tmp_path / "bits"
    code = main(["search", "--model", str(tiny_model_path), "--calib", str(wikitext_calib), "--tokens", "512",
                 "--window", "128", "--verify-tokens", "256", "--weights", "w4g64a", "--kv", "2,4", "--kinds", "weight,kv",
                 "--max-kv-bits", "3.5", "--trials", "12", "--verify-top", "0", "-o", str(run), "--json"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    kv = {str(f) for f in Plan.load(run / "best.json").kv_formats()}
    assert kv <= {"k2v2", "k2v4", "k4v2", "k4v4", "k16v16"}


def test_latency_budget_hands_back_only_plans_timed_within_it(table: Path, tiny_model_path: Path, wikitext_calib: Path,
                                                              tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    run = tmp_path / "lat"
    code = main(["search", "--model", str(tiny_model_path), "--calib", str(wikitext_calib), *FAST, "--table",
                 str(table / "sensitivity.parquet"), "--max-latency", "50x", "--context", "48", "--trials", "30",
                 "--verify-top", "2", "--latency-rounds", "2", "--latency-tokens", "4", "-o", str(run)])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "met the latency budget when measured" in out
    summary = json.loads((run / "summary.json").read_text())
    timing = summary["latency_timing"]
    assert timing["context"] == 48 and timing["rounds"] == 2 and len(timing["passing"]) == 2
    best = Plan.load(run / "best.json")
    assert best.metadata["trial"] in timing["passing"]
    lat = best.metadata["measured_latency"]
    assert lat["meets_budget"] is True and lat["ms"] > 0 and lat["latency_rounds"] == 2
    assert best.metadata["verification"]["kl"] is not None  # quality-verified after it met the budget


def test_search_chooses_methods_per_unit(tiny_model_path: Path, wikitext_calib: Path, tmp_path: Path) -> None:
    """Calibrated options (``@gptq``, ``@awq``) are profiled on their real weights, offered per unit, and the
    verified plans are applied with the calibration data; the plan records each unit's method."""
    args = ["search", "--model", str(tiny_model_path), "--calib", str(wikitext_calib), "--tokens", "1024",
            "--window", "128", "--verify-tokens", "512", "--kinds", "weight", "--weights",
            "w4g32a,w3g32a,w3g32a@gptq,w3g32a@awq", "--max-avg-bits", "4.2", "--trials", "40",
            "--verify-top", "2", "--sens-method", "kl", "-o", str(tmp_path / "run"), "--json"]  # fmt: skip
    assert main(args) == 0
    best = Plan.load(tmp_path / "run" / "best.json")
    methods = {c.method for _, c in best.unit_choices()}
    assert methods & {"gptq", "awq"}, methods  # mostly 3-bit: calibrated options win somewhere
    assert best.metadata["verification"]["kl"] is not None
    from bitplan.sensitivity import SensitivityTable

    rows = SensitivityTable.load(tmp_path / "run" / "sensitivity.parquet").rows
    assert {"rtn", "gptq", "awq"} <= {r.quantizer for r in rows}
