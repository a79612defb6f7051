"""profile(): both methods end to end, reuse of an existing table, resume after a crash; the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from bitplan.cli import main
from bitplan.errors import DataError
from bitplan.graph import build_graph
from bitplan.sensitivity import CalibData, Candidates, SensitivityTable, profile
from bitplan.sensitivity import _measure as measure_mod

CANDIDATES = Candidates.parse(["w4g32a", "w2g32a"], ["a8t"], ["k4v4", "k2v8"])


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model(make_random_lm: Any) -> Any:
    return make_random_lm("llama", max_position_embeddings=128)


@pytest.fixture(scope="module")
def calib() -> CalibData:
    g = torch.Generator().manual_seed(0)
    return CalibData(torch.randint(3, 256, (2, 64), generator=g), source="random")


def test_profile_both_methods_covers_everything(model: Any, calib: CalibData, tmp_path: Path) -> None:
    out = tmp_path / "sens.parquet"
    table = profile(model, calib, CANDIDATES, method="both", output=out, dtype=torch.float32, batch_size=1, progress=False)
    graph = build_graph(model)
    n_units, n_layers = len(graph.units()), graph.num_layers
    decoder = [r for r in table.select("weight", "kl") if r.unit != "lm_head"]
    assert len(decoder) == len(table.select("weight", "fisher")) == 2 * n_units
    assert len([r for r in table.rows if r.unit == "lm_head"]) == 2  # the head: measured, every method
    assert len(table.select("act", "kl")) == len(table.select("act", "fisher")) == n_layers
    assert len(table.select("kv", "kl")) == 2 * n_layers and not table.select("kv", "fisher")
    assert all(r.score >= 0 and r.tokens > 0 for r in table.rows)
    assert set(table.meta.extra) >= {"kv_reduction", "k_vs_v", "timings"}
    assert table.meta.model_fingerprint == graph.fingerprint and table.meta.calib_hash == calib.hash
    assert SensitivityTable.load(out).meta == table.meta
    assert not out.with_name(out.name + ".partial").exists()  # progress removed once the table is written



def test_default_method_is_fisher_for_weights_and_acts_and_measured_kv(model: Any, calib: CalibData) -> None:
    table = profile(model, calib, CANDIDATES, dtype=torch.float32, batch_size=1, progress=False)
    graph = build_graph(model)
    assert {(r.kind, r.method) for r in table.rows if r.unit != "lm_head"} == {("weight", "fisher"), ("act", "fisher"), ("kv", "kl")}
    assert {(r.kind, r.method) for r in table.rows if r.unit == "lm_head"} == {("weight", "kl")}
    assert len(table.select("weight")) == 2 * len(graph.units()) + 2
    assert len(table.select("kv")) == 2 * graph.num_layers


def test_unknown_method_is_a_clear_error(model: Any, calib: CalibData) -> None:
    from bitplan.errors import BitplanError

    with pytest.raises(BitplanError, match="--method must be auto, fisher, kl or both"):
        profile(model, calib, CANDIDATES, method="hessian", progress=False)  # type: ignore[arg-type]

def test_same_inputs_reuse_the_table(model: Any, calib: CalibData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "sens.parquet"
    first = profile(model, calib, CANDIDATES, method="kl", kinds=("weight",), output=out, dtype=torch.float32, progress=False)

    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("recomputed although the table exists")

    monkeypatch.setattr(measure_mod, "measured_scores", boom)
    again = profile(model, calib, CANDIDATES, method="kl", kinds=("weight",), output=out, dtype=torch.float32, progress=False)
    assert [r.key for r in again.rows] == [r.key for r in first.rows]


def test_killed_run_resumes_without_lost_or_duplicate_rows(model: Any, calib: CalibData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "sens.parquet"
    real = measure_mod.measured_scores
    calls: list[int] = []

    def crash_after_two_groups(*args: Any, on_rows: Any = None, **kw: Any) -> Any:
        def persist(rows: Any) -> None:
            on_rows(rows)
            calls.append(len(rows))
            if len(calls) == 2:
                raise KeyboardInterrupt  # stands in for SIGKILL: parts are already on disk

        return real(*args, on_rows=persist, **kw)

    monkeypatch.setattr(measure_mod, "measured_scores", crash_after_two_groups)
    with pytest.raises(KeyboardInterrupt):
        profile(model, calib, CANDIDATES, method="kl", output=out, dtype=torch.float32, progress=False)
    assert not out.exists() and sum(calls) > 0
    monkeypatch.setattr(measure_mod, "measured_scores", real)
    resumed = profile(model, calib, CANDIDATES, method="kl", output=out, dtype=torch.float32, progress=False)
    fresh = profile(model, calib, CANDIDATES, method="kl", dtype=torch.float32, progress=False)
    assert sorted(r.key for r in resumed.rows) == sorted(r.key for r in fresh.rows)
    assert len({r.key for r in resumed.rows}) == len(resumed.rows)
    by_key = {r.key: r.score for r in fresh.rows}
    assert all(r.score == pytest.approx(by_key[r.key], rel=1e-6, abs=1e-12) for r in resumed.rows)


def test_table_of_another_model_is_refused(model: Any, calib: CalibData, make_random_lm: Any) -> None:
    table = profile(model, calib, CANDIDATES, method="fisher", kinds=("weight",), dtype=torch.float32, progress=False)
    other = build_graph(make_random_lm("qwen2", hidden_size=128))
    with pytest.raises(DataError, match="another model"):
        table.check_model(other.fingerprint)


def test_cli_sensitivity_and_show(tiny_model_path: Path, wikitext_calib: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sens.parquet"
    argv = ["sensitivity", "--model", str(tiny_model_path), "--calib", str(wikitext_calib), "--tokens", "512", "--window", "256",
            "--method", "both", "--weights", "w4c,w2ca", "--acts", "a8t", "--kv", "k4v4;k2v2", "--compute-dtype", "float32",
            "-o", str(out), "--json"]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rows"] > 0 and data["tokens"] == 512 and "kv_reduction" in data
    assert main(["sensitivity", "show", str(out), "--top", "3"]) == 0
    shown = capsys.readouterr().out
    assert "weight / kl" in shown and "most sensitive (3)" in shown and "K more sensitive than V" in shown


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sensitivity", "show", "nope.parquet"], "not found"),
        (["sensitivity", "--calib", "x.txt", "-o", "o.parquet"], "needs --model"),
        (["sensitivity", "frobnicate"], "unknown sensitivity action"),
    ],
)
def test_cli_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
