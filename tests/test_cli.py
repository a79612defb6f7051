"""The command line: inspect, plan uniform/show, apply (+eval), --json, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bitplan.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, make_random_lm: Any) -> Path:
    path = tmp_path_factory.mktemp("llama")
    make_random_lm("llama").save_pretrained(path)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "inspect", "--model", str(model_dir))
    assert code == 0 and "qkv_proj" in out and "gate_up_proj" in out
    code, out, _ = run(capsys, "inspect", "--model", str(model_dir), "--json", "--granularity", "tensor")
    data = json.loads(out)
    assert code == 0 and data["layers"] == 2 and len(data["units"]) == 2 * 7


def test_plan_uniform_show_apply(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "p.json"
    code, out, _ = run(capsys, "plan", "uniform", "--model", str(model_dir), "--weights", "w4g64a", "--kv", "k8v4", "--method", "hqq", "-o", str(plan), "--json")
    assert code == 0 and json.loads(out)["avg_weight_bits"] == 4.5
    saved = json.loads(plan.read_text())
    assert saved["layers"][0]["weights"]["mlp.down_proj"] == {"format": "w4g64a", "method": "hqq", "shape": [64, 128]}
    code, out, _ = run(capsys, "plan", "show", str(plan))
    assert code == 0 and "kv k8v4" in out
    code, out, _ = run(capsys, "apply", "--model", str(model_dir), "--plan", str(plan), "--json")
    data = json.loads(out)  # exactly one JSON object on stdout
    assert code == 0 and data["avg_weight_bits"] == 4.5 and data["ppl"] is None
    assert abs(data["weight_bytes"] - data["planned_weight_bytes"]) <= 0.01 * data["planned_weight_bytes"]
    assert set(data) >= {"ppl", "kl", "tokens", "weight_bytes", "avg_weight_bits", "kv_bytes_per_token", "seconds", "kernels"}
    assert sum(data["kernels"].values()) > 0  # every packed linear names the kernel it runs
    code, out, _ = run(capsys, "apply", "--model", str(model_dir), "--plan", str(plan), "--kernels", "reference", "--json")
    assert code == 0 and set(json.loads(out)["kernels"]) == {"reference"}
    headed = tmp_path / "head.json"
    code, out, _ = run(capsys, "plan", "uniform", "--model", str(model_dir), "--weights", "w4g64a", "--head", "w8c", "-o", str(headed), "--json")
    assert code == 0 and json.loads(headed.read_text())["extra"]["lm_head"]["format"] == "w8c"
    for policy, message in (("nope", "unknown kernel 'nope'; registered: "), ("int8pack", "kernel 'int8pack' cannot run w4g64a")):
        code, out, err = run(capsys, "apply", "--model", str(model_dir), "--plan", str(plan), "--kernels", policy, "--json")
        assert code == 2 and out == "" and err.startswith("error: " + message) and err.count("\n") == 1


def test_apply_with_eval_on_tiny_model(tiny_model_path: Path, wikitext_test: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "p.json"
    assert run(capsys, "plan", "uniform", "--model", str(tiny_model_path), "--weights", "w8c", "--kv", "k8v8", "-o", str(plan))[0] == 0
    code, out, _ = run(capsys, "apply", "--model", str(tiny_model_path), "--plan", str(plan), "--eval", str(wikitext_test), "--max-tokens", "1024", "--window", "256", "--json")
    data = json.loads(out)
    assert code == 0 and data["tokens"] == 4 * 255
    assert 1.0 < data["ppl"] < 1000 and 0 <= data["kl"] < 0.05  # 8-bit: close to the 16-bit model


def test_apply_save_then_load_gives_the_same_ppl(tiny_model_path: Path, wikitext_test: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import bitplan

    plan = tmp_path / "p.json"
    assert run(capsys, "plan", "uniform", "--model", str(tiny_model_path), "--weights", "w4g32a", "--kv", "k4v2", "-o", str(plan))[0] == 0
    code, out, _ = run(capsys, "apply", "--model", str(tiny_model_path), "--plan", str(plan), "--save", str(tmp_path / "ck"),
                       "--eval", str(wikitext_test), "--max-tokens", "1024", "--window", "256", "--no-kl", "--json")  # fmt: skip
    data = json.loads(out)
    assert code == 0 and data["saved"] == str(tmp_path / "ck") and "int4pack" in data["kernels"]
    assert (tmp_path / "ck" / "tokenizer_config.json").is_file()
    loaded = bitplan.load(tmp_path / "ck")
    assert bitplan.apply.kernel_counts(loaded) == data["kernels"]
    r = bitplan.evaluate(loaded, wikitext_test, max_tokens=1024, window=256, tokenizer=bitplan.load_tokenizer(tmp_path / "ck"))
    assert r.ppl == data["ppl"]


def _bad_plans(model_dir: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = tmp_path / "good.json"
    assert main(["plan", "uniform", "--model", str(model_dir), "--weights", "w4g64a", "-o", str(good)]) == 0
    base = json.loads(good.read_text())
    cases: dict[str, tuple[Any, str]] = {}

    def variant(name: str, expect: str, edit: Any) -> None:
        d = json.loads(json.dumps(base))
        text = edit(d)
        path = tmp_path / f"{name}.json"
        path.write_text(text if isinstance(text, str) else json.dumps(d))
        cases[name] = (path, expect)

    variant("malformed", "not valid JSON", lambda d: json.dumps(d)[:-20])
    variant("schema", "schema_version 7", lambda d: d.update(schema_version=7))
    variant("unknown_unit", "unknown unit", lambda d: d["layers"][0]["weights"].update({"mlp.nope": "w4g64a"}))

    def mixed(d: dict[str, Any]) -> None:
        w = d["layers"][1]["weights"]
        del w["mlp.gate_up_proj"]
        w.update({"mlp.gate_proj": "w4g64a", "mlp.up_proj": "w2g64a"})

    variant("mixed_fused", "mixed formats", mixed)
    variant("bad_format", "invalid weight format 'w4x64'", lambda d: d["layers"][0]["weights"]["mlp.down_proj"].update(format="w4x64"))
    variant("other_model", "another model", lambda d: d["model"].update(fingerprint="ffffffffffffffff"))
    return cases


def test_five_kinds_of_bad_plan_each_give_one_line(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = _bad_plans(model_dir, tmp_path)
    capsys.readouterr()
    for name, (path, expect) in cases.items():
        code, out, err = run(capsys, "apply", "--model", str(model_dir), "--plan", str(path), "--json")
        assert code == 2, name
        assert out == "", name
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], (name, err)


def test_usage_and_format_errors_are_one_line(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.json"
    for argv, expect in [
        (["plan", "uniform", "--model", str(model_dir), "--weights", "w9g64", "-o", str(out)], "invalid weight format 'w9g64'"),
        (["plan", "uniform", "--model", str(model_dir), "--weights", "w4g64a", "--kv", "k4", "-o", str(out)], "invalid KV format 'k4'"),
        (["plan", "uniform", "--model", str(model_dir), "--weights", "w4g64a", "--method", "nope", "-o", str(out)], "unknown method 'nope'"),
        (["plan", "uniform", "--model", str(tmp_path / "missing"), "--weights", "w4g64a", "-o", str(out)], "missing"),
        (["inspect"], "--model"),
    ]:
        try:
            code, _, err = run(capsys, *argv)
        except SystemExit as e:  # argparse exits itself for usage errors
            code, err = int(e.code or 0), capsys.readouterr().err
        assert code == 2, argv
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], (argv, err)
    assert not out.exists()  # nothing written on error


def test_existing_output_survives_a_failed_write(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    out.write_text("precious")
    code, _, _ = run(capsys, "plan", "uniform", "--model", str(model_dir), "--weights", "w4g6a", "-o", str(out))
    assert code == 2 and out.read_text() == "precious"
    assert list(tmp_path.iterdir()) == [out]  # no temp file left behind


def test_console_script_and_debug_traceback(model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    exe = Path(sys.executable).parent / "bitplan"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "bitplan.cli"]
    done = subprocess.run([*cmd, "apply", "--model", str(model_dir), "--plan", str(bad)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1
    done = subprocess.run([*cmd, "--debug", "apply", "--model", str(model_dir), "--plan", str(bad)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_gptq_plan_applies_with_calib_and_refuses_without(tiny_model_path: Path, wikitext_calib: Path, wikitext_test: Path,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    plan = tmp_path / "gptq.json"
    assert run(capsys, "plan", "uniform", "--model", str(tiny_model_path), "--weights", "w3g64a", "--method", "gptq", "-o", str(plan))[0] == 0
    code, _, err = run(capsys, "apply", "--model", str(tiny_model_path), "--plan", str(plan), "--json")
    assert code == 2 and "gptq" in err and "--calib" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "apply", "--model", str(tiny_model_path), "--plan", str(plan), "--calib", str(wikitext_calib),
                       "--calib-tokens", "100", "--calib-window", "256", "--json")  # fmt: skip
    assert code == 2 and "--calib-tokens (100)" in err and len(err.strip().splitlines()) == 1
    code, out, _ = run(capsys, "apply", "--model", str(tiny_model_path), "--plan", str(plan), "--calib", str(wikitext_calib),
                       "--calib-tokens", "1024", "--calib-window", "256", "--eval", str(wikitext_test), "--max-tokens", "512",
                       "--window", "256", "--json")  # fmt: skip
    res = json.loads(out)
    assert code == 0 and res["calibration"]["methods"] == ["gptq"] and res["calibration"]["tokens"] == 1024
    assert res["ppl"] > 0 and res["kl"] > 0


@pytest.mark.parametrize(("weights", "acts", "method"), [("w4g32ad8", "a16", "awq"), ("w8c", "a8t", "smoothquant")])
def test_awq_and_smoothquant_plans_apply_from_the_command_line(
    weights: str, acts: str, method: str, tiny_model_path: Path, wikitext_calib: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    plan = tmp_path / "p.json"
    assert run(capsys, "plan", "uniform", "--model", str(tiny_model_path), "--weights", weights, "--acts", acts,
               "--method", method, "-o", str(plan))[0] == 0  # fmt: skip
    assert json.loads(plan.read_text())["layers"][0]["weights"]["self_attn.qkv_proj"]["method"] == method
    code, out, _ = run(capsys, "apply", "--model", str(tiny_model_path), "--plan", str(plan), "--calib", str(wikitext_calib),
                       "--calib-tokens", "512", "--calib-window", "256", "--json")  # fmt: skip
    res = json.loads(out)
    assert code == 0 and res["calibration"]["methods"] == [method] and res["calibration"]["seconds"] > 0
