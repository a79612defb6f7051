"""Peak resident memory of sensitivity and apply on the main model, and what it means for 8B and 70B models.

    .venv/bin/python bench/bench_memory.py

Each stage runs in a fresh process: it loads the model (float32) and the calibration tokens, gives freed heap
back, resets the kernel's high-water mark (``/proc/self/clear_refs``), reads its RSS (the baseline), runs the
stage and reads the high-water mark ``VmHWM`` (the peak), so ``extra = peak - baseline`` is what the stage
itself holds, free of the loader's transient copies. The stages stream one decoder
layer at a time, so their extra should be a few decoder layers' float copies plus activations -- independent of
the model's depth (Fisher sensitivity is the exception, and the table says by how much). The extrapolation
writes the measured factors down for Llama-3.1-8B and 70B.
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
        profile(model, calib, Candidates.parse(["w4g64a", "w3g64a"], [], []), method="kl", kinds=("weight",), progress=False)
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
    args = ap.parse_args()
    args.model = args.model or default_model()
    if args.stage:
        _stage(args)
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
        stamp().rstrip(),
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
    model_bytes = 4 * sum(p for p in [n * layer_params])  # the decoder layers' float32 weights
    stream = [st for st in stages if not st.startswith("sensitivity-fisher")]
    k_stream = max(ks[st] for st in stream)
    fisher = got.get("sensitivity-fisher")
    k_fisher = max(fisher["peak"] - fisher["base"], 0) / model_bytes if fisher else 0.0
    lines += [
        "",
        f"Measured scaling. The streaming stages ({', '.join(stream)}) hold at most "
        f"{k_stream:.1f} x one decoder layer's float32 weights beyond the model, activations included: they work one layer "
        "at a time, so this does not grow with depth. Fisher sensitivity does not stream: one backward pass holds every "
        "layer's activations of a batch, and it caches each unit's `Q(W) - W` per option for all batches (a speed choice: "
        f"re-quantizing per batch costs ~25% more time); its extra is {k_fisher:.2f} x the decoder's float32 weights here "
        "(3 options), i.e. it grows with the model. Extrapolation on paper, bf16 weights held, the same calibration "
        "tokens (hidden states x3 in float32 for input, output and residual):",
        "",
        "| model | bf16 weights GB | streaming stages: predicted peak GB | Fisher (3 options): predicted peak GB |",
        "|---|---:|---:|---:|",
    ]
    for name, (nl, hh, ii, vocab, kv, nh) in TARGETS.items():
        lp = hh * hh * 2 + 2 * hh * (hh // nh * kv) + 3 * hh * ii
        weights = 2 * (nl * lp + 2 * vocab * hh)
        acts = 3 * args.tokens * hh * 4
        stream_peak = weights + k_stream * 4 * lp + acts
        fisher_peak = weights + k_fisher * 4 * nl * lp
        lines.append(f"| {name} | {weights / 1e9:.1f} | {stream_peak / 1e9:.1f} | {fisher_peak / 1e9:.1f} |")
    del torch
    write_section("memory", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
