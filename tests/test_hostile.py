"""Hostile and wrong input: every case is one ``error:`` line on stderr, exit code 2, no traceback, nothing on
stdout, and no output file left behind (nor a temporary one). Then ``Format.parse`` and plan loading fuzzed.

The cases run the real command line in-process on a random Llama saved with its own tokenizer (no ../shared).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitplan.cli import main
from bitplan.errors import BitplanError, FormatError, PlanError
from bitplan.formats import parse
from bitplan.plan import Plan
from tests._models import save_random_lm_with_tokenizer


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A model, a good plan, calibration text, a sensitivity table and a hardware profile of it, and a second model."""
    root = tmp_path_factory.mktemp("hostile")
    model = save_random_lm_with_tokenizer(root / "model")
    other = save_random_lm_with_tokenizer(root / "other", hidden_size=128)
    words = "the of and to in a is was for on as with by at from his that it".split()
    calib = root / "calib.txt"
    calib.write_text("\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(30)) for i in range(200)))
    plan = root / "plan.json"
    assert main(["plan", "uniform", "--model", str(model), "--weights", "w4g64a", "-o", str(plan)]) == 0
    other_plan = root / "other-plan.json"
    assert main(["plan", "uniform", "--model", str(other), "--weights", "w4g64a", "-o", str(other_plan)]) == 0
    from bitplan import load_model, load_tokenizer
    from bitplan.sensitivity import Candidates, load_calib, parse_weight_option, profile

    cands = Candidates(weights=(parse_weight_option("w4g64a"), parse_weight_option("w8g64a")), acts=(), kv=())
    for name, m in (("table", model), ("other-table", other)):
        cal = load_calib(load_tokenizer(m), calib, 256, 128)
        profile(load_model(m), cal, cands, method="fisher", kinds=("weight",), output=root / f"{name}.parquet",
                dtype=torch.float32, progress=False)  # fmt: skip
    hw = root / "hw.parquet"
    assert main(["profile-hw", "--model", str(model), "--context", "16", "--chunk", "8", "--weights", "bf16,w4g64a",
                 "--acts", "a16", "--kv", "k16v16", "--budget", "0.002", "-o", str(hw)]) == 0  # fmt: skip
    return {"root": root, "model": model, "other": other, "calib": calib, "plan": plan, "other_plan": other_plan,
            "table": root / "table.parquet", "other_table": root / "other-table.parquet", "hw": hw}  # fmt: skip


def _edit_plan(env: dict[str, Path], name: str, edit: Callable[[dict[str, Any]], Any]) -> Path:
    d = json.loads(env["plan"].read_text())
    text = edit(d)
    out = env["root"] / f"{name}.json"
    out.write_text(text if isinstance(text, str) else json.dumps(d))
    return out


def _write(env: dict[str, Path], name: str, data: bytes) -> Path:
    out = env["root"] / name
    out.write_bytes(data)
    return out


def _mixed_fused(d: dict[str, Any]) -> None:
    w = d["layers"][1]["weights"]
    del w["mlp.gate_up_proj"]
    w.update({"mlp.gate_proj": "w4g64a", "mlp.up_proj": "w2g64a"})


def _foreign_profile(env: dict[str, Path]) -> Path:
    import pyarrow.parquet as pq

    table = pq.read_table(env["hw"])
    meta = json.loads(table.schema.metadata[b"bitplan"])
    meta["device"]["name"] = "NVIDIA H100 80GB HBM3"  # measured elsewhere
    meta["device"]["fingerprint"] = "0" * 16
    out = env["root"] / "foreign-hw.parquet"
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"bitplan": json.dumps(meta).encode()}), out)
    return out


M, P, OUT, C = "{model}", "{plan}", "{out}", "{calib}"
SEARCH = ["search", "--model", M, "--calib", C, "--tokens", "256", "--window", "128", "--trials", "5", "-o", OUT]
# name -> (argv with placeholders, an input-file maker or None, the error's telling part)
CASES: dict[str, tuple[list[str], Callable[[dict[str, Path]], Path] | None, str]] = {
    # plans
    "plan-malformed-json": (["apply", "--model", M, "--plan", P], lambda e: _write(e, "m.json", b'{"kind": "bitplan.plan", '), "not valid JSON"),
    "plan-truncated": (["apply", "--model", M, "--plan", P], lambda e: _write(e, "t.json", e["plan"].read_bytes()[:300]), "not valid JSON"),
    "plan-empty-file": (["apply", "--model", M, "--plan", P], lambda e: _write(e, "e.json", b""), "not valid JSON"),
    "plan-not-utf8": (["plan", "show", P], lambda e: _write(e, "b.json", b"\xff\xfe\x00garbage"), "cannot read plan file"),
    "plan-json-array": (["plan", "show", P], lambda e: _write(e, "a.json", b"[1, 2]"), "a plan is a JSON object"),
    "plan-wrong-kind": (["plan", "show", P], lambda e: _edit_plan(e, "k", lambda d: d.update(kind="bitplan.table")), "not a bitplan plan"),
    "plan-schema-version": (["apply", "--model", M, "--plan", P], lambda e: _edit_plan(e, "s", lambda d: d.update(schema_version=99)), "unsupported plan schema_version 99"),
    "plan-missing-file": (["apply", "--model", M, "--plan", P], lambda e: e["root"] / "nope.json", "plan file not found"),
    "plan-other-model": (["apply", "--model", M, "--plan", P], lambda e: e["other_plan"], "plan was made for another model"),
    "plan-unknown-unit": (["apply", "--model", M, "--plan", P], lambda e: _edit_plan(e, "u", lambda d: d["layers"][0]["weights"].update({"mlp.nope": "w4g64a"})), "unknown unit 'layers.0.mlp.nope'"),
    "plan-mixed-fused-group": (["apply", "--model", M, "--plan", P], lambda e: _edit_plan(e, "f", _mixed_fused), "mixed formats"),
    "plan-unknown-format": (["apply", "--model", M, "--plan", P], lambda e: _edit_plan(e, "x", lambda d: d["layers"][0]["weights"]["mlp.down_proj"].update(format="w4x64")), "invalid weight format 'w4x64'"),
    "plan-out-of-range-format": (["apply", "--model", M, "--plan", P], lambda e: _edit_plan(e, "r", lambda d: d["layers"][0]["weights"]["mlp.down_proj"].update(format="w9g64")), "invalid weight format 'w9g64'"),
    "plan-layer-count": (["plan", "show", P], lambda e: _edit_plan(e, "l", lambda d: d["layers"].pop()), "plan lists 1 layers but its model has 2"),
    "plan-unknown-method": (["apply", "--model", M, "--plan", P], lambda e: _edit_plan(e, "me", lambda d: d["layers"][0]["weights"]["mlp.down_proj"].update(method="magic")), "layers.0.mlp.down_proj: unknown method 'magic'"),
    # formats
    "format-unknown": (["plan", "uniform", "--model", M, "--weights", "int4", "-o", OUT], None, "invalid weight format 'int4'"),
    "format-bits-out-of-range": (["plan", "uniform", "--model", M, "--weights", "w1g64", "-o", OUT], None, "invalid weight format 'w1g64'"),
    "format-group-not-multiple-of-8": (["plan", "uniform", "--model", M, "--weights", "w4g12", "-o", OUT], None, "w4g12"),
    "format-kv-bits": (["plan", "uniform", "--model", M, "--weights", "w4g64a", "--kv", "k5v2", "-o", OUT], None, "invalid KV format 'k5v2'"),
    "format-act": (["plan", "uniform", "--model", M, "--weights", "w4g64a", "--acts", "a3t", "-o", OUT], None, "a3t"),
    "format-dq-group": (["plan", "uniform", "--model", M, "--weights", "w4g96d6", "-o", OUT], None, "d6 super-blocks hold 256 weights"),
    # budgets
    "budget-negative": ([*SEARCH, "--max-avg-bits", "-1"], None, "--max-avg-bits must be a positive number"),
    "budget-zero": ([*SEARCH, "--max-memory", "0MB"], None, "--max-memory must be a positive number"),
    "budget-unparseable": ([*SEARCH, "--max-memory", "lots"], None, "--max-memory: cannot read 'lots'"),
    "budget-infeasible": ([*SEARCH, "--table", "{table}", "--max-avg-bits", "1.5"], None, "--max-avg-bits 1.5"),
    "budget-latency-unparseable": ([*SEARCH, "--max-latency", "fast"], None, "--max-latency"),
    # tables and profiles
    "table-corrupted": ([*SEARCH, "--table", "{bad}", "--max-avg-bits", "6"], lambda e: _write(e, "bad.parquet", b"PAR1 this is not parquet"), "bad.parquet"),
    "table-truncated": ([*SEARCH, "--table", "{bad}", "--max-avg-bits", "6"], lambda e: _write(e, "trunc.parquet", e["table"].read_bytes()[:200]), "trunc.parquet"),
    "table-other-model": ([*SEARCH, "--table", "{other_table}", "--max-avg-bits", "6"], None, "another model"),
    "table-not-a-table": (["sensitivity", "show", "{bad}"], lambda e: e["hw"], "not a bitplan sensitivity table"),
    "profile-other-device": (["predict", "--model", M, "--plan", P, "--profile", "{bad}"], _foreign_profile, "measured on"),
    "profile-other-model": (["predict", "--model", "{other}", "--plan", "{other_plan}", "--profile", "{hw}"], None, "hardware profile was measured for model"),
    # calibration data
    "calib-missing": (["sensitivity", "--model", M, "--calib", "{root}/no-such.txt", "-o", OUT], None, "no-such.txt"),
    "calib-empty": (["sensitivity", "--model", M, "--calib", "{bad}", "-o", OUT], lambda e: _write(e, "empty.txt", b""), "empty.txt"),
    "calib-too-short": (["sensitivity", "--model", M, "--calib", "{bad}", "--tokens", "100000", "-o", OUT], lambda e: _write(e, "short.txt", b"the of and to in a"), "short.txt"),
    # models
    "model-not-causal-lm": (["inspect", "--model", "{bad}"], lambda e: _bert(e), "expected a decoder-only causal LM"),
    "model-missing": (["inspect", "--model", "{root}/no-model"], None, "no-model"),
    "model-no-config": (["inspect", "--model", "{bad}"], lambda e: _empty_dir(e), "config"),
    # outputs
    "output-under-a-file": (["plan", "uniform", "--model", M, "--weights", "w4g64a", "-o", "{calib}/plan.json"], None, "cannot write"),
    "export-refused": (["export", "--plan", P, "--to", "gptqmodel", "--target", "marlin", "-o", OUT],
                       lambda e: _edit_plan(e, "g", lambda d: d["layers"][0]["weights"]["mlp.down_proj"].update(format="w3g64a")), "cannot run in a GPTQ marlin target"),  # fmt: skip
}


def _bert(env: dict[str, Path]) -> Path:
    from transformers import BertConfig

    path = env["root"] / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(path)
    return path


def _empty_dir(env: dict[str, Path]) -> Path:
    path = env["root"] / "empty-model"
    path.mkdir(exist_ok=True)
    return path


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_is_one_clear_line(env: dict[str, Path], name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv, maker, expect = CASES[name]
    made = maker(env) if maker is not None else None
    out = tmp_path / "out" / "result.parquet"
    if out.parent.exists():
        shutil.rmtree(out.parent)
    plan = made if made is not None and made.suffix == ".json" else env["plan"]
    subs = {"{model}": env["model"], "{plan}": plan, "{out}": out, "{calib}": env["calib"],
            "{table}": env["table"], "{bad}": made, "{other_table}": env["other_table"], "{other}": env["other"],
            "{other_plan}": env["other_plan"], "{hw}": env["hw"], "{root}": env["root"]}  # fmt: skip
    args = []
    for a in argv:
        for k, v in subs.items():
            a = a.replace(k, str(v))
        args.append(a)
    code = main(args)
    stdout, stderr = capsys.readouterr()
    lines = stderr.strip().splitlines()
    assert code == 2, (name, stderr[-800:])
    assert stdout == "", name
    assert lines and lines[-1].startswith("error: ") and expect in lines[-1], (name, lines[-1:])
    assert "Traceback" not in stderr, name
    errors = [line for line in lines if line.startswith("error")]
    assert len(errors) == 1, errors
    leftovers = [p for p in (out.parent.iterdir() if out.parent.exists() else []) if p.is_file()]
    assert not leftovers, (name, leftovers)  # nothing written, not even half of it
    assert not list(env["root"].glob(".*.tmp")), name  # no temporary files beside the inputs


def test_an_existing_output_survives_a_failed_overwrite(env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    out.write_text("precious")
    code = main(["plan", "uniform", "--model", str(env["model"]), "--weights", "w4x64", "-o", str(out)])
    assert code == 2 and out.read_text() == "precious"
    capsys.readouterr()


# -- fuzzing -------------------------------------------------------------------------------------
_ALPHABET = st.sampled_from(list("wakvgcdstrnfbp0123456789x._-@ "))


@settings(max_examples=400, deadline=None)
@given(st.text(_ALPHABET, max_size=14) | st.text(max_size=10))
def test_format_parse_accepts_or_says_why(text: str) -> None:
    """Any string: a format whose canonical string parses back to it, or a FormatError (nothing else)."""
    try:
        fmt = parse(text)
    except FormatError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert parse(str(fmt)) == fmt


def _plan_dict() -> dict[str, Any]:
    from bitplan.plan import uniform_plan
    from tests._models import make_random_lm

    return uniform_plan(make_random_lm("llama"), "w4g64a", kv="k8v4").to_dict()


_BASE = _plan_dict()
_JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6)  # fmt: skip


def _paths(d: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(d, dict):
        for k, v in d.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out += _paths(v, (*prefix, i))
    return out


_ALL_PATHS = _paths(_BASE)[1:]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_ALL_PATHS), st.sampled_from(["delete", "replace"]), _JSON), max_size=3))
def test_plan_loading_accepts_or_says_why(edits: list[tuple[tuple[Any, ...], str, Any]]) -> None:
    """A valid plan with keys deleted or values replaced by arbitrary JSON: loads, or one PlanError line."""
    d = json.loads(json.dumps(_BASE))
    for path, action, value in edits:
        node: Any = d
        try:
            for key in path[:-1]:
                node = node[key]
            if action == "delete":
                del node[path[-1]]
            else:
                node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    try:
        plan = Plan.from_dict(d)
    except PlanError as e:
        assert str(e) and "\n" not in str(e)
        return
    except BitplanError as e:  # pragma: no cover - must be a PlanError
        raise AssertionError(f"{type(e).__name__} instead of PlanError: {e}") from None
    Plan.from_dict(json.loads(plan.to_json()))  # what loads also saves and loads again


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_plan_files_of_arbitrary_bytes(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "plan.json"
    path.write_bytes(data)
    with pytest.raises(PlanError):
        Plan.load(path)
