"""Crash safety: SIGKILL ``bitplan sensitivity``, ``profile-hw`` and ``search`` at random points, rerun the same
command, and get what an uninterrupted run gives -- no lost or duplicate rows, the same scores, trials and front.

Each command first runs uninterrupted (``T`` seconds), then once more on its finished output (``S``: start-up,
loading and the reuse check; the work is ``W = T - S``). The same command in a fresh directory is then killed 5
times at points drawn uniformly from ``[S/2, S + W/5]`` (starts that finish first do not count) -- in loading,
in the work, in writing outputs, wherever each resumed run has got to -- and finally run to the end. Timings are
the only values allowed to differ (profile-hw's are measurements, so only its rows are compared).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tests._models import save_random_lm_with_tokenizer

KILLS = 5


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("crash")
    model = save_random_lm_with_tokenizer(root / "model", num_hidden_layers=4, hidden_size=128, intermediate_size=256)
    words = "the of and to in a is was for on as with by at from his that it an were are which this be".split()
    rng = random.Random(0)
    calib = root / "calib.txt"
    calib.write_text("\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(400)))
    return {"root": root, "model": model, "calib": calib}


def _cmd(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "bitplan.cli", *argv]


def _run(argv: list[str], timeout: float = 300) -> float:
    t = time.perf_counter()
    done = subprocess.run(_cmd(argv), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return time.perf_counter() - t


def _killed_runs(argv: list[str], startup: float, work: float, seed: int) -> list[str]:
    """Start ``argv`` until KILLS starts have been SIGKILLed, each at a random point in ``[S/2, S + W/5]``:
    late start-up, loading, the work, or the writing of outputs -- whatever the run has reached then (a run that
    ends first does not count; the work left shrinks as runs resume). Returns what happened."""
    rng = random.Random(seed)
    log: list[str] = []
    for _ in range(4 * KILLS):
        if sum("killed" in x for x in log) == KILLS:
            break
        delay = rng.uniform(0.5 * startup, startup + 0.2 * work)
        proc = subprocess.Popen(_cmd(argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            proc.wait(timeout=delay)
            log.append(f"finished before {delay:.1f} s (exit {proc.returncode})")
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            log.append(f"killed at {delay:.1f} s")
        finally:
            assert proc.stderr is not None
            proc.stderr.close()
    return log


def _timed(argv: list[str]) -> tuple[float, float]:
    """``(S, W)``: seconds of start-up (a rerun on the finished output) and of the work itself."""
    total = _run(argv)
    startup = _run(argv)
    return startup, max(total - startup, 1.0)


def _rows(path: Path, key: tuple[str, ...]) -> dict[tuple[Any, ...], dict[str, Any]]:
    rows = pq.read_table(path).to_pylist()
    keys = [tuple(r[k] for k in key) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate rows"
    return dict(zip(keys, rows, strict=True))


def _no_debris(root: Path) -> None:
    assert not [p for p in root.rglob("*.tmp")], "temporary files left behind"
    assert not [p for p in root.rglob("*.partial")], "progress directories left behind"


def test_sensitivity_survives_sigkill(inputs: dict[str, Path], tmp_path: Path) -> None:
    def argv(out: Path) -> list[str]:
        return ["sensitivity", "--model", str(inputs["model"]), "--calib", str(inputs["calib"]), "--tokens", "1024",
                "--window", "128", "--method", "kl", "--weights", "w8g64a,w4g64a,w3g64a,w2g64a", "--acts", "a8t,a4t",
                "--kv", "k8v8;k4v4;k4v2", "--kinds", "weight,act,kv", "--compute-dtype", "float32", "-o", str(out)]  # fmt: skip

    ref_out, out = tmp_path / "ref" / "s.parquet", tmp_path / "killed" / "s.parquet"
    log = _killed_runs(argv(out), *_timed(argv(ref_out)), seed=1)
    _run(argv(out))
    key = ("unit", "kind", "format", "quantizer", "method")
    ref, got = _rows(ref_out, key), _rows(out, key)
    assert got.keys() == ref.keys(), log
    for k, r in ref.items():
        assert got[k]["score"] == pytest.approx(r["score"], rel=1e-6, abs=1e-12), (k, log)
    assert sum("killed" in x for x in log) == KILLS, log
    _no_debris(out.parent)


def test_profile_hw_survives_sigkill(inputs: dict[str, Path], tmp_path: Path) -> None:
    def argv(out: Path) -> list[str]:
        return ["profile-hw", "--model", str(inputs["model"]), "--context", "16", "--chunk", "8",
                "--weights", "bf16,w4g64a", "--acts", "a16", "--kv", "k16v16,k8v8",
                "--budget", "0.005", "-o", str(out)]  # fmt: skip

    ref_out, out = tmp_path / "ref" / "hw.parquet", tmp_path / "killed" / "hw.parquet"
    log = _killed_runs(argv(out), *_timed(argv(ref_out)), seed=2)
    _run(argv(out))
    key = ("part", "name", "phase", "m", "context", "out_features", "in_features", "weight", "act", "kv", "kernel")
    ref_rows, got_rows = _rows(ref_out, key), _rows(out, key)
    assert got_rows.keys() == ref_rows.keys(), log  # every row once, none lost
    assert all(r["median_ms"] > 0 and r["reps"] > 0 for r in got_rows.values())
    assert sum("killed" in x for x in log) == KILLS, log
    _no_debris(out.parent)


def test_search_survives_sigkill(inputs: dict[str, Path], tmp_path: Path) -> None:
    def argv(out: Path) -> list[str]:
        return ["search", "--model", str(inputs["model"]), "--calib", str(inputs["calib"]), "--tokens", "512",
                "--window", "128", "--weights", "w8g64a,w4g64a,w3g64a", "--kinds", "weight,kv", "--kv", "k8v8;k4v4",
                "--max-avg-bits", "5", "--trials", "120", "--seed", "3", "--verify-top", "2", "--verify-tokens", "256",
                "-o", str(out)]  # fmt: skip

    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    log = _killed_runs(argv(run_dir), *_timed(argv(ref_dir)), seed=3)
    _run(argv(run_dir))

    def complete(d: Path) -> list[str]:
        rows = pq.read_table(d / "trials.parquet").to_pylist()
        return [r["params"] for r in rows if r["state"] == "COMPLETE"]

    assert complete(run_dir) == complete(ref_dir), log  # the same trials, in the same order
    front = sorted(p.name for p in (ref_dir / "front").glob("*.json"))
    assert sorted(p.name for p in (run_dir / "front").glob("*.json")) == front
    for name in front:
        a, b = (json.loads((d / "front" / name).read_text()) for d in (ref_dir, run_dir))
        assert a["layers"] == b["layers"] and a["extra"] == b["extra"], name
    best = [json.loads((d / "best.json").read_text()) for d in (ref_dir, run_dir)]
    assert best[0]["layers"] == best[1]["layers"]
    assert sum("killed" in x for x in log) == KILLS, log
    _no_debris(run_dir)
