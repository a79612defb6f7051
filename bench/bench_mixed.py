"""Searched mixed-precision plans with per-unit methods vs llama.cpp's mixes on the main model.

    .venv/bin/python bench/bench_mixed.py [--budgets 3,3.5,4,4.5] [--trials 300]

1. Sensitivity (Fisher, weights only) of every decoder unit for every option of ``--options``: the formats
   with rtn and hqq, and with gptq where named; the gptq options are scored on their real GPTQ weights,
   quantized once from ``--calib-tokens`` tokens of the *validation* file (cached in ``bench/out``).
2. Per budget (average bits per decoder-linear weight, scales included, as llama.cpp's figures count): one
   search over every option ("with calibration") and one over the calibration-free options only (rtn,
   hqq). The proxy picks each best plan (``--verify-top 0``: the test text stays unseen and the run short);
   it is applied (calibrated units with the same calibration windows) and scored with the main model
   README's protocol: the first 40,960 test tokens, 80 windows of 512 scored alone, 40,880 predicted tokens.
3. Uniform GPTQ plans next to them, same protocol.

Writes section ``mixed`` with llama.cpp's figures on the same model and protocol (issue 8) alongside.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import stamp, write_section  # noqa: E402
from bench_core import SHARED, default_model  # noqa: E402

import bitplan  # noqa: E402
from bitplan.eval import ReferenceLogProbs, load_tokens  # noqa: E402
from bitplan.search import Budgets, SearchConfig, search  # noqa: E402
from bitplan.sensitivity import Candidates, SensitivityTable, load_calib, profile  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
# llama.cpp on the same model and protocol (issue 8): (bits per decoder-linear weight, ppl with imatrix, without)
LLAMA_CPP = [("Q3_K_S", 4.23, 34.23, 40.71), ("Q4_0", 4.50, 31.95, 36.21), ("Q3_K_M", 4.63, 31.68, 34.00),
             ("Q4_K_S", 5.28, 30.38, 31.59), ("Q4_K_M", 5.53, 30.19, 31.16)]  # fmt: skip
OPTIONS = ("w2g64a,w2g64a@hqq,w2g64a@gptq,w3g64a,w3g64a@hqq,w3g64a@gptq,w3g32a,w3g32a@hqq,w3g32a@gptq,"
           "w4g64a,w4g64a@hqq,w4g64a@gptq,w8g64a")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default=str(SHARED / "data" / "wikitext-2-raw-test.txt"))
    ap.add_argument("--calib", default=str(SHARED / "data" / "wikitext-2-valid-unk.txt"))
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--options", default=OPTIONS)
    ap.add_argument("--extra-options", default="",
                    help="more options, profiled into a second table with the same calibration tokens and merged")
    ap.add_argument("--budgets", default="3,3.5,4,4.5")
    ap.add_argument("--uniform", default="w3g64a@gptq,w4g64a@gptq", help="uniform plans to score too ('' for none)")
    ap.add_argument("--runs", default="cal,free", help="which searches per budget: cal (every option), free (calibration-free only)")
    ap.add_argument("--trials", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--section", default="mixed")
    args = ap.parse_args()
    args.model = args.model or default_model()
    torch.set_num_threads(args.threads)

    model = bitplan.load_model(args.model, dtype=torch.float32)
    tok = bitplan.load_tokenizer(args.model)
    calib = load_calib(tok, args.calib, args.calib_tokens, 512)
    options = args.options.split(",")
    t = time.perf_counter()
    OUT.mkdir(exist_ok=True)
    table = profile(model, calib, Candidates.parse(options, [], []), method="fisher", kinds=("weight",),
                    output=OUT / f"sens-methods-{Path(args.model).name}-{args.calib_tokens}.parquet", progress=True)  # fmt: skip
    if args.extra_options:  # same calibration tokens and scorer: the rows are comparable, the tables merge
        extra = args.extra_options.split(",")
        more = profile(model, calib, Candidates.parse(extra, [], []), method="fisher", kinds=("weight",),
                       output=OUT / f"sens-methods-{Path(args.model).name}-{args.calib_tokens}-{'-'.join(extra)}.parquet",
                       progress=True)  # fmt: skip
        table = SensitivityTable([*table.rows, *more.rows], table.meta)
        options += extra
    sens_s = time.perf_counter() - t
    print(f"sensitivity: {len(table)} rows, {sens_s:.0f} s {table.meta.extra.get('timings', {})}", flush=True)

    tokens = load_tokens(tok, args.data, 40960)
    reference = ReferenceLogProbs(model, tokens, 512, batch_size=4)
    base = bitplan.evaluate(model, tokens=tokens, max_tokens=tokens.numel(), window=512, reference=reference, batch_size=4,
                            progress=False)
    print(f"16-bit: ppl {base.ppl:.3f} on {base.tokens} tokens", flush=True)

    def score(plan: bitplan.Plan) -> tuple[float, float, float]:
        t0 = time.perf_counter()
        q = bitplan.apply_plan(copy.deepcopy(model), plan, kernels="reference", calib=calib)
        apply_s = time.perf_counter() - t0
        r = bitplan.evaluate(q, tokens=tokens, max_tokens=tokens.numel(), window=512, reference=reference, batch_size=4,
                             progress=False)
        return r.ppl, float(r.kl or 0.0), apply_s

    from bitplan.quantizers import get_weight_quantizer

    free = tuple(o for o in options if not get_weight_quantizer(o.partition("@")[2] or "rtn").needs_calibration)
    runs = [(label, w) for key, label, w in (("cal", "with calibration", tuple(options)), ("free", "calibration-free", free))
            if key in args.runs.split(",")]  # fmt: skip
    rows = []
    for budget in (float(b) for b in args.budgets.split(",")):
        for label, weights in runs:
            tag = f"{args.trials}-{budget}-{'cal' if weights != free else 'free'}" + ("-" + "-".join(args.extra_options.split(",")) if args.extra_options else "")
            run = OUT / f"mixed-{Path(args.model).name}-{tag}"
            cfg = SearchConfig(budgets=Budgets(max_avg_bits=budget), trials=args.trials, kinds=("weight",),
                               weights=weights, verify_k=0)  # fmt: skip
            res = search(model, table, run, cfg, name_or_path=args.model, progress=False, calib=calib)
            assert res.best_plan is not None
            plan = bitplan.Plan.load(res.best_plan)
            methods: dict[str, int] = {}
            for _, c in plan.unit_choices():
                key = f"{c.format}@{c.method}"
                methods[key] = methods.get(key, 0) + 1
            ppl, kl, apply_s = score(plan)
            mix = ", ".join(f"{k} x{v}" for k, v in sorted(methods.items(), key=lambda kv: -kv[1]))
            rows.append((f"searched <= {budget} ({label})", plan.summary().avg_weight_bits, ppl, kl, apply_s, mix))
            print(rows[-1], flush=True)
    for item in filter(None, args.uniform.split(",")):
        fmt, _, method = item.partition("@")
        plan = bitplan.uniform_plan(model, fmt, method=method or "rtn", name_or_path=args.model)
        ppl, kl, apply_s = score(plan)
        rows.append((f"uniform {item}", plan.summary().avg_weight_bits, ppl, kl, apply_s, item))
        print(rows[-1], flush=True)

    body = [
        f"## Searched mixed plans with per-unit methods vs llama.cpp on {Path(args.model).name}",
        "",
        stamp().rstrip(),
        f"- protocol (the main model README's): first {tokens.numel()} tokens of `{Path(args.data).name}`, 512-token "
        f"windows scored alone, {base.tokens} predicted tokens; 16-bit (fp32) ppl {base.ppl:.3f} (README: 29.53)",
        f"- sensitivity: Fisher, {len(table)} rows over {len(options)} options, {calib.tokens} calibration tokens of "
        f"`{Path(args.calib).name}` (calibrated options on their real weights); {sens_s:.0f} s "
        f"({table.meta.extra.get('timings', {})})",
        f"- search: NSGA-II, {args.trials} trials, weights only (head and embedding stay 16-bit, as in llama.cpp's "
        "per-decoder-linear figures they are not counted), best plan by the proxy (no verification); applied with "
        "the same calibration windows; `apply s` includes the calibrated methods' layer-wise pass",
        "- the source checkpoint is a Q4_1 GGUF (4-bit, group 32): formats at or above 4-bit group 32 (and "
        "llama.cpp's 5-bit mixes) are nearly lossless here, so the low-bit end is where methods differ",
        "",
        "| plan | avg bits | ppl | KL | apply s | options used (units) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    body += [f"| {n} | {b:.3f} | {p:.3f} | {k:.4f} | {s:.0f} | {m} |" for n, b, p, k, s, m in rows]
    body += ["", "llama.cpp on the same model and protocol (from issue 8):", "",
             "| mix | bits | ppl (imatrix) | ppl (no imatrix) |", "|---|---:|---:|---:|"]  # fmt: skip
    body += [f"| {n} | {b:.2f} | {p:.2f} | {q:.2f} |" for n, b, p, q in LLAMA_CPP]
    write_section(args.section, "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
