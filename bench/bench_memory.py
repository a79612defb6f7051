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
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import stamp, write_section  # noqa: E402
from bench_core import SHARED, default_model  # noqa: E402


@dataclass(frozen=True)
class Shape:
    """What the memory of a stage depends on."""

    layers: int
    hidden: int
    inter: int
    vocab: int
    kv_heads: int
    heads: int

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @property
    def layer_params(self) -> int:
        return 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_dim + 3 * self.hidden * self.inter

    def bf16_weights(self) -> int:
        return 2 * (self.layers * self.layer_params + 2 * self.vocab * self.hidden)


# name -> shape of the models to extrapolate to
TARGETS = {"Llama-3.1-8B": Shape(32, 4096, 14336, 128256, 8, 32), "Llama-3.1-70B": Shape(80, 8192, 28672, 128256, 8, 64)}
FISHER_OPTIONS, BATCH, HEAD_ROWS = 3, 4, 256  # the sensitivity stages' options, windows per batch, Fisher head rows


def exact_bytes(stage: str, m: Shape, tokens: int) -> dict[str, int]:
    """The float32 bytes a stage holds by construction (the rest is workspace, see :func:`workspace_bytes`)."""
    h, lp = m.hidden, m.layer_params
    if stage == "sensitivity-fisher":
        return {"hidden state entering every layer": 4 * tokens * h * (m.layers + 1),
                "gradients at a layer's output and input": 4 * tokens * h * 2,
                f"one layer's Q(W)-W x {FISHER_OPTIONS} options": 4 * FISHER_OPTIONS * lp}  # fmt: skip
    if stage == "sensitivity-kl":
        return {"hidden state entering every layer": 4 * tokens * h * (m.layers + 1),
                "reference probabilities": 4 * tokens * m.vocab, "one unit's quantized copy": 4 * 2 * h * m.inter}  # fmt: skip
    out = {"one layer's calibration inputs and outputs": 4 * tokens * h * 2, "one layer's float copy": 4 * lp}
    if "@" in stage:  # X^T X in float64 per linear of the layer (q, k, v, o, gate, up: hidden^2; down: inter^2)
        out["one layer's Hessians"] = 8 * (6 * h * h + m.inter * m.inter)
    return out


def workspace_bytes(stage: str, m: Shape, window: int) -> int:
    """Temporaries of one layer's forward (and backward) on one batch: attention scores and per-token widths,
    plus the head's rows over the vocabulary -- the shape of the workspace; its constant is fitted."""
    batch = 1 if stage.startswith("apply") else BATCH  # the layer-wise pass runs windows one at a time
    t = batch * window
    scores = batch * m.heads * window * window
    widths = t * (6 * m.hidden + 2 * m.kv_dim + 4 * m.inter)
    head = (HEAD_ROWS if stage == "sensitivity-fisher" else 512) * m.vocab if stage.startswith("sensitivity") else 0
    return 4 * (scores + widths + head)


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
    vocab = cfg.vocab_size
    here = Shape(n, h, inter, vocab, kvh, heads)
    fits = {}
    for st in stages:
        peak = got[st]["peak"]
        extra = max(peak - got[st]["base"], 0)
        exact = sum(exact_bytes(st, here, args.tokens).values())
        fits[st] = max(extra - exact, 0) / workspace_bytes(st, here, args.window)
        lines.append(f"| {st} | {peak / 2**20:.0f} | {extra / 2**20:.0f} | {extra / layer_bytes:.2f} | {got[st]['seconds']:.0f} |")
    lines += [
        "",
        "Every stage streams: nothing it holds is a copy of more than one decoder layer. What it holds beyond the "
        "model is (a) by construction: the hidden state entering every layer for the calibration tokens (Fisher, "
        "measured KL), the reference next-token probabilities (measured KL), one layer's weight deltas per option "
        "(Fisher), one layer's float copy, calibration inputs/outputs and float64 Hessians (apply); and (b) workspace: "
        "one layer's forward (and backward) temporaries on one batch -- attention scores (batch x heads x window^2), "
        "per-token widths (batch x window x ~(6 hidden + 2 kv + 4 intermediate)) and the head's rows over the "
        "vocabulary -- whose constant c is fitted here (it absorbs autograd's saved tensors and allocator slack). "
        "tests/test_memory.py checks on random models of 2 and 8 layers that the extra does not grow with depth. "
        f"Extrapolation on paper: bf16 weights held, float32 scoring, the same {args.tokens} calibration tokens, "
        f"windows of {args.window}:",
        "",
        "| stage | (a) here MB | (b) here MB | c | " + " | ".join(f"{t}: (a) GB | (b) GB | predicted peak GB" for t in TARGETS) + " |",
        "|---|---:|---:|---:|" + "---:|---:|---:|" * len(TARGETS),
    ]
    for st in stages:
        exact = sum(exact_bytes(st, here, args.tokens).values())
        ws = fits[st] * workspace_bytes(st, here, args.window)
        cells = []
        for shape in TARGETS.values():
            a = sum(exact_bytes(st, shape, args.tokens).values())
            b = fits[st] * workspace_bytes(st, shape, args.window)
            cells.append(f"{a / 1e9:.1f} | {b / 1e9:.1f} | {(shape.bf16_weights() + a + b) / 1e9:.1f}")
        lines.append(f"| {st} | {exact / 2**20:.0f} | {ws / 2**20:.0f} | {fits[st]:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "bf16 weights alone: " + ", ".join(f"{t} {m.bf16_weights() / 1e9:.1f} GB" for t, m in TARGETS.items()),
              "(a) terms: " + "; ".join(f"{st}: " + ", ".join(exact_bytes(st, here, args.tokens)) for st in stages)]  # fmt: skip
    del torch
    write_section("memory", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
