"""Core table: uniform formats on the main model -> ppl, KL, weight bytes, avg bits, seconds.

    .venv/bin/python bench/bench_core.py                      # main model, first 32k test tokens
    .venv/bin/python bench/bench_core.py --model PATH --max-tokens 4096 --only w4g64a,k4v2

Every row applies one uniform plan to a fresh copy of the model (fp32 compute on the CPU), checks that
the bytes the packed model holds match the plan's summary, and evaluates perplexity and mean KL against
the unquantized model on the same windows (the reference log-probs are computed once and reused).
Rows are written to bench/RESULTS.md as they finish, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import stamp, write_section  # noqa: E402

import bitplan  # noqa: E402
from bitplan.apply import held_weight_bytes  # noqa: E402
from bitplan.eval import ReferenceLogProbs, load_tokens  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@dataclass(frozen=True)
class Row:
    label: str
    weights: str = "bf16"
    acts: str = "a16"
    kv: str = "k16v16"
    method: str = "rtn"


ROWS = [
    Row("bf16"),
    Row("w8c", "w8c"),
    Row("w8g64a", "w8g64a"),
    Row("w4g64a", "w4g64a"),
    Row("w4g64 hqq", "w4g64", method="hqq"),
    Row("w4g64a hqq", "w4g64a", method="hqq"),
    Row("w4g32a", "w4g32a"),
    Row("w3g64a", "w3g64a"),
    Row("w3g64a hqq", "w3g64a", method="hqq"),
    Row("w3g32a", "w3g32a"),
    Row("w2g64a", "w2g64a"),
    Row("w2g64a hqq", "w2g64a", method="hqq"),
    Row("nf4g64", "nf4g64"),
    Row("a8t (bf16 weights)", acts="a8t"),
    Row("k8v8 (bf16 weights)", kv="k8v8"),
    Row("k4v4 (bf16 weights)", kv="k4v4"),
    Row("k4v2 (bf16 weights)", kv="k4v2"),
    Row("k2v4 (bf16 weights)", kv="k2v4"),
    Row("k2v2 (bf16 weights)", kv="k2v2"),
]

# (better, worse) pairs that must hold if quality falls with bits
MONOTONE = [
    ("w8g64a", "w4g64a"), ("w4g64a", "w3g64a"), ("w3g64a", "w2g64a"), ("w4g32a", "w4g64a"),
    ("w3g32a", "w3g64a"), ("w4g32a", "w3g32a"), ("w8c", "w4g64a"),
    ("k8v8 (bf16 weights)", "k4v4 (bf16 weights)"), ("k4v4 (bf16 weights)", "k4v2 (bf16 weights)"),
    ("k4v4 (bf16 weights)", "k2v4 (bf16 weights)"), ("k4v2 (bf16 weights)", "k2v2 (bf16 weights)"),
    ("k2v4 (bf16 weights)", "k2v2 (bf16 weights)"),
]


def default_model() -> str:
    script = SHARED / "models" / "materialize"
    if script.is_file():
        done = subprocess.run([sys.executable, str(script), "smollm2-135m-instruct"], capture_output=True, text=True, check=True)
        return done.stdout.strip().splitlines()[-1]
    return "HuggingFaceTB/SmolLM2-135M-Instruct"


def render(results: dict[str, dict], args: argparse.Namespace, ref_seconds: float) -> str:
    lines = [
        f"## Core: uniform formats on {Path(args.model).name}",
        "",
        stamp().rstrip(),
        f"- data: first {args.max_tokens} tokens of `wikitext-2-raw-test.txt`, windows of {args.window} scored alone; "
        f"KL = mean KL(p_bf16 || p_plan) per predicted token; reference pass {ref_seconds:.0f} s (computed once)",
        "- weight bytes: what the packed model holds (codes + 16-bit scales/offsets, other tensors at 16 bits) vs "
        "`Plan.summary()`; seconds = apply + evaluation of that row",
        "",
        "| format | method | ppl | KL | weight bytes (held) | summary bytes | held/summary | avg weight bits | KV bytes/token | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in results.items():
        lines.append(
            f"| {label} | {r['method']} | {r['ppl']:.3f} | {r['kl']:.5f} | {r['held']:,} | {r['summary']:,} | "
            f"{r['held'] / r['summary']:.4f} | {r['bits']:.3f} | {r['kv']:,.0f} | {r['seconds']:.0f} |"
        )
    checks = []
    for better, worse in MONOTONE:
        if better in results and worse in results:
            ok = results[better]["kl"] < results[worse]["kl"]
            ppl_ok = results[better]["ppl"] <= results[worse]["ppl"]
            checks.append(f"{'ok' if ok else 'VIOLATED'}{'' if ppl_ok else ' (ppl not)'}: {better} < {worse}")
    if checks:
        lines += ["", "Quality falls with bits (by KL, the low-noise measure; '(ppl not)' marks pairs whose ppl order differs): " + "; ".join(checks)]
    notes = [r["note"] for r in results.values() if r.get("note")]
    lines += [""] + [f"- note: {n}" for n in dict.fromkeys(notes)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default=str(SHARED / "data" / "wikitext-2-raw-test.txt"))
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--only", default="", help="comma-separated labels to run (default: all)")
    ap.add_argument("--section", default="core")
    args = ap.parse_args()
    args.model = args.model or default_model()

    base = bitplan.load_model(args.model, dtype=torch.float32)
    tokens = load_tokens(bitplan.load_tokenizer(args.model), args.data, args.max_tokens)
    t0 = time.perf_counter()
    reference = ReferenceLogProbs(base, tokens, args.window, batch_size=args.batch_size)
    ref_seconds = time.perf_counter() - t0
    wanted = {s.strip() for s in args.only.split(",") if s.strip()}
    results: dict[str, dict] = {}
    for row in ROWS:
        if wanted and row.label not in wanted:
            continue
        model = copy.deepcopy(base)
        t = time.perf_counter()
        plan = bitplan.uniform_plan(model, row.weights, row.acts, row.kv, method=row.method, name_or_path=args.model)
        bitplan.apply_plan(model, plan, kernels="reference")
        r = bitplan.evaluate(model, tokens=tokens, window=args.window, reference=reference, batch_size=args.batch_size, desc=row.label)
        s = plan.summary()
        results[row.label] = {
            "method": row.method, "ppl": r.ppl, "kl": r.kl, "held": held_weight_bytes(model, float_bytes=2),
            "summary": s.weight_bytes, "bits": s.avg_weight_bits, "kv": s.kv_bytes_per_token,
            "seconds": time.perf_counter() - t, "note": "; ".join(plan.metadata.get("notes", [])),
        }
        print(f"{row.label:24s} ppl {r.ppl:8.3f}  KL {r.kl:.5f}  bits {s.avg_weight_bits:.3f}  {time.perf_counter() - t:.0f}s", flush=True)
        write_section(args.section, render(results, args, ref_seconds))
        del model


if __name__ == "__main__":
    main()
