"""Peak resident memory of sensitivity and apply on the main model, and what it means for 8B and 70B models.

    .venv/bin/python bench/bench_memory.py

Each stage runs in a fresh process: it loads the model (float32) and the calibration tokens, gives freed heap
back, resets the kernel's high-water mark (``/proc/self/clear_refs``), reads its RSS (the baseline), runs the
stage and reads the high-water mark ``VmHWM`` (the peak), so ``extra = peak - baseline`` is what the stage
itself holds, free of the loader's transient copies. The stages stream one decoder
layer at a time, so their extra should be a few decoder layers' float copies plus activations -- independent of
the model's depth (tests/test_memory.py checks that on random models of two depths). What scales with the
calibration tokens is reported beside it (stored hidden states, the measured engine's reference probabilities).
The extrapolation writes the measured factors down for Llama-3.1-8B and 70B.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import stamp, write_section  # noqa: E402
from bench_core import SHARED, default_model  # noqa: E402

# name -> (layers, hidden, intermediate, vocab, kv heads, heads) of the models to extrapolate to
TARGETS = {"Llama-3.1-8B": (32, 4096, 14336, 128256, 8, 32), "Llama-3.1-70B": (80, 8192, 28672, 128256, 8, 64)}


def _token_bytes(stage: str, layers: int, hidden: int, vocab: int, tokens: int) -> int:
    """Float32 bytes of a stage that scale with the calibration tokens rather than with a layer's weights."""
    if stage == "sensitivity-fisher":  # hidden state entering every layer + the gradient at the current one
        return 4 * tokens * hidden * (layers + 2)
    if stage == "sensitivity-kl":  # hidden state entering every layer + reference probabilities over the vocabulary
        return 4 * tokens * (hidden * (layers + 1) + vocab)
    return 4 * tokens * hidden * 2  # apply: one layer's calibration inputs and outputs


def _stage(args: argparse.Namespace) -> None:
    """One measured stage in this (fresh) process; prints a JSON line."""
    import torch
    from _proc import rss_bytes, trim

    import bitplan
    from bitplan.sensitivity import Candidates, load_calib, profile

    torch.set_num_threads(2)
    model = bitplan.load_model(args.model, dtype=torch.float32)
    tok = bitplan.load_tokenizer(args.model)
    calib = load_calib(tok, args.calib, args.tokens, args.window)
    trim()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = rss_bytes()
    t = time.perf_counter()
    if args.stage == "sensitivity-fisher":
        profile(model, calib, Candidates.parse(["w4g64a", "w3g64a", "w8g64a"], [], []), method="fisher", kinds=("weight",), progress=False)
    elif args.stage == "sensitivity-kl":
        profile(model, calib, Candidates.parse(["w4g64a"], [], []), method="kl", kinds=("weight",), progress=False)
    elif args.stage.startswith("apply-"):
        fmt, _, method = args.stage.removeprefix("apply-").partition("@")
        bitplan.apply_plan(model, bitplan.uniform_plan(model, fmt, method=method or "rtn"), kernels="reference", calib=calib)
    hwm = next(int(x.split()[1]) * 1024 for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    print(json.dumps({"stage": args.stage, "base": base, "peak": hwm, "seconds": time.perf_counter() - t}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--calib", default=str(SHARED / "data" / "wikitext-2-valid-unk.txt"))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stages", default="sensitivity-fisher,sensitivity-kl,apply-w4g64a,apply-w3g64a@gptq,apply-w3g64a@awq")
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--render", default=None, help="write the section from a previous run's measurements (JSON)")
    args = ap.parse_args()
    args.model = args.model or default_model()
    if args.stage:
        _stage(args)
        return
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        _report(argparse.Namespace(**{**vars(args), **saved["args"]}), saved["got"], saved["stamp"])
        return
    stages = args.stages.split(",")
    got = {}
    for st in stages:
        cmd = [sys.executable, __file__, "--model", args.model, "--calib", args.calib, "--tokens", str(args.tokens),
               "--window", str(args.window), "--stage", st]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in done.stdout.splitlines() if x.startswith("{")]
        if done.returncode or not line:
            sys.exit(f"stage {st} failed: {done.stderr[-1500:]}")
        got[st] = json.loads(line[-1])
        print(got[st], flush=True)
    out = Path(__file__).resolve().parent / "out" / "memory.json"
    out.parent.mkdir(exist_ok=True)
    saved = {"args": {k: getattr(args, k) for k in ("model", "calib", "tokens", "window", "stages")}, "got": got, "stamp": stamp()}
    out.write_text(json.dumps(saved, indent=1))
    _report(args, got, saved["stamp"])


def _report(args: argparse.Namespace, got: dict[str, dict[str, float]], measured: str) -> None:
    """The RESULTS section from the stages' measurements (``measured``: the command, machine and date stamp)."""
    stages = args.stages.split(",")

    import torch
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(args.model)
    h, inter, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kvh, heads = cfg.num_key_value_heads, cfg.num_attention_heads
    layer_params = h * h * 2 + 2 * h * (h // heads * kvh) + 3 * h * inter
    layer_bytes = 4 * layer_params  # float32 copies
    act_bytes = args.tokens * h * 4
    base = got[stages[0]]["base"]
    lines = [
        f"## Peak memory of sensitivity and apply on {Path(args.model).name}, extrapolated to 8B and 70B",
        "",
        measured.rstrip(),
        f"- each stage in a fresh process: baseline = RSS with the model (float32) and calibration tokens loaded "
        f"({base / 2**20:.0f} MB), then the high-water mark is reset; peak = `VmHWM` after the stage; extra = peak - baseline",
        f"- model: {n} layers, hidden {h}, intermediate {inter}; one decoder layer's float32 weights = {layer_bytes / 2**20:.1f} MB "
        f"({layer_params / 1e6:.2f}M params); calibration: {args.tokens} tokens in windows of {args.window}, "
        f"hidden states = {act_bytes / 2**20:.1f} MB",
        "",
        "| stage | peak MB | extra MB | extra / one layer | seconds |",
        "|---|---:|---:|---:|---:|",
    ]
    ks = {}
    for st in stages:
        peak = got[st]["peak"]
        extra = max(peak - got[st]["base"], 0)
        ks[st] = extra / layer_bytes
        lines.append(f"| {st} | {peak / 2**20:.0f} | {extra / 2**20:.0f} | {ks[st]:.2f} | {got[st]['seconds']:.0f} |")
    vocab = cfg.vocab_size
    lines += [
        "",
        "Every stage streams: each holds one decoder layer's copies (quantized weights, weight deltas per option, "
        "Hessians) and activations at a time, plus what scales with the calibration tokens: the hidden state entering "
        "every layer (Fisher, measured KL), the reference next-token probabilities (measured KL) and one layer's "
        "inputs and outputs (apply). So extra = k x one layer's float32 weights + per-token bytes, with k fitted here; "
        "tests/test_memory.py checks on random models that the extra does not grow with depth. Extrapolation on "
        f"paper to bf16 models, float32 scoring, the same {args.tokens} calibration tokens:",
        "",
        "| stage | per-token MB here | k (layers) | " + " | ".join(f"{t}: predicted peak GB" for t in TARGETS) + " |",
        "|---|---:|---:|" + "---:|" * len(TARGETS),
    ]
    for st in stages:
        per_token = _token_bytes(st, n, h, vocab, args.tokens)
        k = max(got[st]["peak"] - got[st]["base"] - per_token, 0) / layer_bytes
        preds = []
        for nl, hh, ii, voc, kv, nh in TARGETS.values():
            lp = hh * hh * 2 + 2 * hh * (hh // nh * kv) + 3 * hh * ii
            weights = 2 * (nl * lp + 2 * voc * hh)
            preds.append((weights + k * 4 * lp + _token_bytes(st, nl, hh, voc, args.tokens)) / 1e9)
        lines.append(f"| {st} | {per_token / 2**20:.0f} | {k:.1f} | " + " | ".join(f"{x:.1f}" for x in preds) + " |")
    bf16 = [2 * (nl * (hh * hh * 2 + 2 * hh * (hh // nh * kv) + 3 * hh * ii) + 2 * voc * hh) / 1e9
            for nl, hh, ii, voc, kv, nh in TARGETS.values()]  # fmt: skip
    lines += ["", "bf16 weights alone: " + ", ".join(f"{t} {w:.1f} GB" for t, w in zip(TARGETS, bf16, strict=True))]
    del torch
    write_section("memory", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
