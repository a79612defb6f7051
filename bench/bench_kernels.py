"""CPU kernels: per-shape latency vs dense fp32/bf16, and end-to-end greedy decoding of the main model.

    .venv/bin/python bench/bench_kernels.py --parts micro,e2e                  # on a quiet machine
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_kernels.py --parts micro --quick --dry-run   # smoke test

Run the real thing with OpenMP's default wait policy: ``OMP_WAIT_POLICY=PASSIVE`` (kind to a shared
machine) puts the second thread to sleep after every op, and waking it costs ~50-100 us on this VM, so
small linears measured 2-4x slower. The policy in force is written into each section.

Parts (each writes its own section of bench/RESULTS.md):

* ``micro`` (``kernels-micro``): every CPU kernel on the main model's linear shapes (q/o 576x576, k/v
  192x576, gate/up 1536x576, down 576x1536, lm_head 49152x576) and Llama-3-8B's (q/o 4096x4096, gate/up
  14336x4096, down 4096x14336), out x in, at M = 1, 16, 128 rows of fp32 input (what a CPU model feeds;
  the kernels' casts are timed). Median latency of single calls after warm-up; each call uses the next of
  enough copies of the prepared weight to exceed the last-level cache, so weights stream from memory as
  in decoding. Dense fp32 and bf16 ``F.linear`` are measured in the same run. Weights are random codes and
  scales (latency does not depend on their values). 2 threads.
* ``e2e`` (``kernels-e2e``): the main model decodes 128 tokens greedily at batch 1 (median of 3 runs after
  one warm-up), fp32, bf16 and uniform plans applied with ``kernels="auto"``; one fresh subprocess per row,
  so resident memory (RSS after loading and applying, minus RSS after imports) is the row's own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proc import rss_bytes, run_worker, trim  # noqa: E402
from _results import stamp, write_section  # noqa: E402

import bitplan  # noqa: E402
import bitplan.kernels._cpu  # noqa: E402, F401  (registers the CPU kernels)
from bitplan.formats import parse_act, parse_weight  # noqa: E402
from bitplan.kernels import LinearSpec, Prepared, get_kernel  # noqa: E402
from bitplan.quantizers import QuantizedWeight, fake_quantize_act  # noqa: E402
from bitplan.quantizers.packing import packed_numel  # noqa: E402

MAIN_SHAPES = [("q/o 576x576", 576, 576), ("k/v 192x576", 192, 576), ("gate/up 1536x576", 1536, 576),
               ("down 576x1536", 576, 1536), ("lm_head 49152x576", 49152, 576)]
BIG_SHAPES = [("8B q/o 4096x4096", 4096, 4096), ("8B gate/up 14336x4096", 14336, 4096),
              ("8B down 4096x14336", 4096, 14336)]
MS = (1, 16, 128)
# (label, kernel or baseline, weight[/act] format)
ENTRIES = [
    ("F.linear fp32", "fp32", "bf16"),
    ("F.linear bf16", "bf16", "bf16"),
    ("dense-bf16 bf16", "dense-bf16", "bf16"),
    ("int4pack w4g64a", "int4pack", "w4g64a"),
    ("int4pack-wide w2g64a", "int4pack-wide", "w2g64a"),
    ("int4pack-expand w2g64a", "int4pack-expand", "w2g64a"),
    ("int4pack-expand w3g64a", "int4pack-expand", "w3g64a"),
    ("int8pack w8c", "int8pack", "w8c"),
    ("int8pack w8c/a8t (+fake-quant)", "int8pack", "w8c/a8t"),
    ("int8-intmm w8c/a8t", "int8-intmm", "w8c/a8t"),
    ("int8-planes w8g64a", "int8-planes", "w8g64a"),
    ("nf4-lut nf4g64", "nf4-lut", "nf4g64"),
    ("fp8-lut fp8", "fp8-lut", "fp8"),
    ("reference w4g64a", "reference", "w4g64a"),
    ("fbgemm dynamic w8c/a8t*", "fbgemm", "w8c/a8t"),
]
# "+bf16": the rest of the model cast to bf16; "+head": lm_head (and the tied embedding) in the row's format too
E2E_ROWS = ["fp32", "bf16", "w8c", "w4g64a", "w4g64a+bf16", "w4g64a+head+bf16", "w3g64a+bf16"]


# -- micro ----------------------------------------------------------------------------------------
def omp_policy() -> str:
    return os.environ.get("OMP_WAIT_POLICY", "default")


def llc_bytes() -> int:
    for idx in (3, 2):
        p = Path(f"/sys/devices/system/cpu/cpu0/cache/index{idx}/size")
        if p.exists():
            t = p.read_text().strip()
            return int(t[:-1]) * {"K": 1 << 10, "M": 1 << 20}[t[-1]] if t[-1] in "KM" else int(t)
    return 64 << 20


def random_weight(fmt_text: str, n: int, k: int, g: torch.Generator) -> QuantizedWeight | torch.Tensor:
    """Random packed codes and plausible fp16 scales (uniform codes <-> uniform packed bytes)."""
    fmt = parse_weight(fmt_text.split("/")[0])
    if not fmt.is_quantized:
        return (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
    width = k if fmt.kind == "fp8" else packed_numel(k, fmt.bits)
    codes = torch.randint(0, 256, (n, width), generator=g, dtype=torch.uint8)
    if fmt.kind == "fp8":
        codes[(codes & 0x7F) == 0x7F] = 0
    groups = k // fmt.effective_group(k)
    scales = (torch.rand(n, groups, generator=g) * 1e-3 + 5e-4).half()
    offsets = (-scales.float() * 2 ** (fmt.bits - 1)).half() if fmt.has_offset else None
    return QuantizedWeight(fmt, (n, k), codes, scales, offsets, "rtn")


def _clone(p: Prepared) -> Prepared:
    return Prepared(p.kernel, p.spec, {k: v.clone() for k, v in p.tensors.items()}, p.meta)


def make_call(kind: str, fmt_text: str, n: int, k: int, g: torch.Generator):  # type: ignore[no-untyped-def]
    """(call(buffer, x), one buffer, its bytes, a cloner, the input dtype or None for fp32) for one entry."""
    fmt, _, act = fmt_text.partition("/")
    act_fmt = parse_act(act or "a16")
    src = random_weight(fmt_text, n, k, g)
    if kind in ("fp32", "bf16"):
        w = src.to(torch.float32 if kind == "fp32" else torch.bfloat16)
        cast = torch.bfloat16 if kind == "bf16" else None
        return F.linear, w, w.numel() * w.element_size(), torch.Tensor.clone, cast  # x arrives pre-cast
    if kind == "fbgemm":
        import warnings

        warnings.filterwarnings("ignore")
        assert isinstance(src, QuantizedWeight)
        s = src.scales[:, 0].double()
        qw = torch.quantize_per_channel(src.dequantize(), s, torch.zeros(n, dtype=torch.long), 0, torch.qint8)
        pk = torch.ops.quantized.linear_prepack(qw, None)
        return (lambda b, x: torch.ops.quantized.linear_dynamic(x, b, False)), pk, n * k, \
            (lambda b: torch.ops.quantized.linear_prepack(qw, None)), None
    kernel = get_kernel(kind)
    spec = LinearSpec(parse_weight(fmt), act_fmt, n, k)
    prepared = kernel.prepare(src, spec)
    if act_fmt.is_quantized and not kernel.quantizes_acts:  # what QuantLinear.forward does before the kernel
        return (lambda b, x: kernel.matmul(fake_quantize_act(x, act_fmt), b)), prepared, prepared.nbytes, _clone, None
    return (lambda b, x: kernel.matmul(x, b)), prepared, prepared.nbytes, _clone, None


def time_calls(call, bufs, x, budget_s: float, max_reps: int) -> float:  # type: ignore[no-untyped-def]
    for i in range(2):
        call(bufs[i % len(bufs)], x)
    ts: list[float] = []
    start = time.perf_counter()
    i = 0
    while len(ts) < max_reps and (len(ts) < 5 or time.perf_counter() - start < budget_s):
        b = bufs[i % len(bufs)]
        i += 1
        t = time.perf_counter()
        call(b, x)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def part_micro(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    shapes = MAIN_SHAPES[:2] + BIG_SHAPES[:1] if args.quick else MAIN_SHAPES + BIG_SHAPES
    ms = (1, 16) if args.quick else MS
    pool = args.pool_mb << 20 if args.pool_mb else int(1.25 * llc_bytes())
    entries = [e for e in ENTRIES if not args.only or e[0].split()[0] in args.only.split(",")]
    res: dict[tuple[str, str, int], float] = {}
    bits: dict[tuple[str, str], float] = {}
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    for sname, n, k in shapes:
        big = n * k > 20_000_000
        for label, kind, fmt in entries:
            if kind == "reference" and (big or n * k > 10_000_000) and not args.quick:
                continue  # seconds per call on the largest shapes
            try:
                call, buf, nbytes, clone, cast = make_call(kind, fmt, n, k, g)
            except Exception as e:  # noqa: BLE001  (a probe that this torch build lacks)
                print(f"skip {label} {sname}: {type(e).__name__}: {e}", flush=True)
                continue
            count = max(2, min(args.max_buffers, -(-pool // max(nbytes, 1))))
            bufs = [buf] + [clone(buf) for _ in range(count - 1)]
            bits[(label, sname)] = 8 * nbytes / (n * k)
            for m in ms:
                x = torch.randn(m, k, generator=g)
                if cast is not None:
                    x = x.to(cast)
                budget = args.budget * (0.3 if kind == "reference" else 1.0)
                res[(label, sname, m)] = time_calls(call, bufs, x, budget, 5 if kind == "reference" else args.reps)
            print(f"{sname:24s} {label:32s} " + "  ".join(f"M={m}: {res[(label, sname, m)]:8.3f} ms" for m in ms)
                  + f"   ({count} buffers, {time.perf_counter() - t0:.0f}s)", flush=True)
            del bufs, buf
            trim()
    body = render_micro(res, bits, shapes, ms, entries, pool, args)
    print(body)
    if not args.dry_run:
        write_section("kernels-micro", body)


def render_micro(res, bits, shapes, ms, entries, pool, args) -> str:  # type: ignore[no-untyped-def]
    lines = [
        "## Kernels: CPU latency per linear (ms, median of single calls; in brackets: / dense fp32 F.linear)",
        "",
        stamp().rstrip(),
        f"- {args.threads} threads, OMP_WAIT_POLICY {omp_policy()}; input fp32 `[M, in]` (kernel casts timed; `F.linear bf16` gets bf16 input); each call "
        f"reads the next of enough weight copies to fill {pool >> 20} MiB (last-level cache: {llc_bytes() >> 20} MiB), "
        f"warm-up 2 calls, up to {args.reps} timed calls or {args.budget:g} s per cell; random codes and scales",
        "- `int8pack w8c/a8t (+fake-quant)` includes the per-token fake quantization `QuantLinear` runs before a "
        "weight-only kernel; `int8-intmm` quantizes its input itself (exact int32 sums)",
        "- `*` fbgemm `quantized::linear_dynamic` is **not registered**: it quantizes activations per tensor "
        "(asymmetric uint8), not per token; shown for speed only",
        "- reference: dequantize to fp32 + F.linear (skipped on shapes over 10M weights)",
        "",
    ]
    names = [s[0] for s in shapes]
    for m in ms:
        lines += [f"**M = {m}**", "", "| kernel / format | bits held | " + " | ".join(names) + " |",
                  "|---|---:|" + "---:|" * len(names)]
        for label, _, _ in entries:
            cells = []
            for s in names:
                t = res.get((label, s, m))
                base = res.get(("F.linear fp32", s, m))
                cells.append("" if t is None else f"{t:.3f} ({t / base:.2f})" if base else f"{t:.3f}")
            if not any(cells):
                continue
            b = next((bits[(label, s)] for s in reversed(names) if (label, s) in bits), float("nan"))
            lines.append(f"| {label} | {b:.2f} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# -- e2e ------------------------------------------------------------------------------------------
PROMPT = "The history of the printing press begins"


def e2e_worker(row: str, args: argparse.Namespace) -> dict:
    from bitplan.apply import held_weight_bytes, kernel_counts
    from bitplan.graph import build_graph
    from bitplan.quantizers import QuantLinear

    torch.set_num_threads(args.threads)
    tok = bitplan.load_tokenizer(args.model)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    trim()
    rss0 = rss_bytes()
    model = bitplan.load_model(args.model, dtype=torch.float32)
    graph = build_graph(model)
    unit_paths = [mem.path for u in graph.units("fused") for mem in u.members]
    plan = None
    fmt, *mods = row.split("+")
    if fmt.startswith(("w", "nf4", "fp8")):
        plan = bitplan.uniform_plan(model, fmt, name_or_path=args.model, head=fmt if "head" in mods else None)
        bitplan.apply_plan(model, plan, kernels=args.policy)
    if row == "bf16" or row.endswith("+bf16"):
        model.to(torch.bfloat16)
    trim()
    rss1 = rss_bytes()

    def unit_bytes(path: str) -> int:
        mod = model.get_submodule(path)
        if isinstance(mod, QuantLinear):
            return mod.packed_nbytes
        return mod.weight.numel() * mod.weight.element_size()

    gen = dict(do_sample=False, max_new_tokens=args.tokens, min_new_tokens=args.tokens, pad_token_id=tok.eos_token_id)
    with torch.inference_mode():
        out = model.generate(ids, **gen)  # warm-up
        times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            out = model.generate(ids, **gen)
            times.append(time.perf_counter() - t)
    new = out.shape[1] - ids.shape[1]
    return {
        "row": row,
        "tok_s": new / statistics.median(times),
        "tok_s_all": [new / t for t in times],
        "new_tokens": new,
        "held": held_weight_bytes(model),
        "units": sum(unit_bytes(p) for p in unit_paths),
        "rss_delta": rss1 - rss0,
        "rss_after_decode": rss_bytes() - rss0,
        "kernels": kernel_counts(model),
        "plan": None if plan is None else str(plan.summary()),
        "text": tok.decode(out[0, ids.shape[1]:ids.shape[1] + 12]),
    }


def part_e2e(args: argparse.Namespace) -> None:
    rows = args.e2e_rows.split(",")
    results = []
    for row in rows:
        cmd = [sys.executable, __file__, "--e2e-worker", row, "--model", args.model, "--tokens", str(args.tokens),
               "--runs", str(args.runs), "--threads", str(args.threads), "--policy", args.policy]
        r = run_worker(cmd, f"e2e row {row}")
        results.append(r)
        print(f"{row:14s} {r['tok_s']:6.1f} tok/s  held {r['held'] / 1e6:7.1f} MB  units {r['units'] / 1e6:6.1f} MB  "
              f"RSS +{r['rss_delta'] / 1e6:6.1f} MB  kernels {r['kernels']}", flush=True)
    body = render_e2e(results, args)
    print(body)
    if not args.dry_run:
        write_section("kernels-e2e", body)


def render_e2e(results: list[dict], args: argparse.Namespace) -> str:
    by = {r["row"]: r for r in results}
    b16 = by.get("bf16")
    lines = [
        f"## Kernels: greedy decoding of {Path(args.model).name} on the CPU, batch 1",
        "",
        stamp().rstrip(),
        f"- {args.tokens} new tokens after a {len(PROMPT.split())}-word prompt, `do_sample=False`; tokens/s = median of "
        f"{args.runs} runs after one warm-up; {args.threads} threads, OMP_WAIT_POLICY {omp_policy()}; quantized rows: `uniform_plan(model, fmt)` applied "
        f"with `kernels=\"{args.policy}\"` to the fp32 model (`+bf16`: the rest of the model then cast to bf16)",
        "- a uniform plan quantizes the decision units (q/k/v/o, gate/up/down of all 30 layers); the tied embedding / "
        "lm_head (49152x576, 28.3M parameters) stays in the model's dtype, except in `+head` rows (`uniform_plan(..., head=fmt)`: "
        "the head in the kernel's layout, the embedding as a second packed copy of gatherable rows)",
        "- held = `held_weight_bytes(model)` (every parameter and buffer as held in memory); units = the decision "
        "units' linears as held; RSS = process RSS after load+apply minus after imports (fresh process per row)",
        "",
        "| model | tokens/s | vs bf16 | held MB | held vs bf16 | units MB | units vs bf16 | RSS delta MB | RSS after decode MB | kernels |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        vs = f"{r['tok_s'] / b16['tok_s']:.2f}x" if b16 else ""
        uv = f"{r['units'] / b16['units']:.1%}" if b16 else ""
        hv = f"{r['held'] / b16['held']:.1%}" if b16 else ""
        ks = ", ".join(f"{k} x{v}" for k, v in r["kernels"].items()) or "(no packed linears)"
        lines.append(f"| {r['row']} | {r['tok_s']:.1f} | {vs} | {r['held'] / 1e6:.1f} | {hv} | {r['units'] / 1e6:.1f} | {uv} | "
                     f"{r['rss_delta'] / 1e6:.1f} | {r['rss_after_decode'] / 1e6:.1f} | {ks} |")
    plans = {r["row"]: r["plan"] for r in results if r["plan"]}
    lines += [""] + [f"- plan {k}: {v}" for k, v in plans.items()]
    lines += ["- first tokens of each output: " + "; ".join(f"{r['row']}: {r['text']!r}" for r in results)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="micro,e2e")
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="three shapes, M in (1, 16), small budgets (smoke test)")
    ap.add_argument("--dry-run", action="store_true", help="print the sections, do not write bench/RESULTS.md")
    ap.add_argument("--only", default="", help="micro: comma-separated kernel names (first word of a label)")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--budget", type=float, default=0.6, help="micro: seconds of timed calls per cell")
    ap.add_argument("--pool-mb", type=int, default=0, help="micro: bytes of weight copies (default 1.25x LLC)")
    ap.add_argument("--max-buffers", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--policy", default="auto")
    ap.add_argument("--e2e-rows", default=",".join(E2E_ROWS))
    ap.add_argument("--e2e-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.e2e_worker:
        print(json.dumps(e2e_worker(args.e2e_worker, args)))
        return
    if args.quick:
        args.budget, args.reps = min(args.budget, 0.15), min(args.reps, 10)
        args.pool_mb = args.pool_mb or 64
        args.tokens, args.runs = min(args.tokens, 16), min(args.runs, 1)
    if "e2e" in args.parts and args.model is None:
        from bench_core import default_model

        args.model = default_model()
    for name in args.parts.split(","):
        {"micro": part_micro, "e2e": part_e2e}[name](args)


if __name__ == "__main__":
    main()
