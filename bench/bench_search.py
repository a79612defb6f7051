"""Searched plans vs uniform plans on the main model: quality at weight-bit budgets, KV bits, stage costs.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_search.py --parts weights,kv

Uses the default sensitivity table that ``bench_sensitivity.py --parts table`` writes (bench/out/, Fisher
weights + measured KV at 16k calibration tokens); profiles it first if it is missing. Every search runs in
its own run directory under bench/out/ (a rerun continues the studies). Plans are chosen by verification on
held-out *calibration* text; the test text is read only to report the final perplexities.

Parts (each writes its own section of bench/RESULTS.md):
* ``weights``: for average weight bits in {3, 3.5, 4, 4.5, 5} (scales and zeros included), search weight
  formats only (acts and KV 16-bit) and compare the picked plan's test perplexity with every uniform plan
  of the same quantizer (RTN) at the same or more bits.
* ``kv``: search KV pairs only (weights and acts 16-bit) at average KV bits in {2.5, 3, 3.25, 4}; test
  perplexity vs uniform KV pairs.
Both report wall time per stage and proxy trials per second on SQLite.
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
from bitplan.search._verify import default_verify_tokens  # noqa: E402
from bitplan.sensitivity import Candidates, SensitivityTable, load_calib, profile  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
UNIFORM_W = ["w8g64a", "w4g32a", "w4g64a", "w3g32a", "w3g64a", "w2g64a"]
UNIFORM_KV = ["k8v8", "k4v4", "k4v3", "k3v3", "k4v2", "k3v2", "k2v2"]
UNIFORM_KV_SINK = ["k4v4", "k4v3", "k3v3", "k4v2"]  # also shown with the sink tokens of the offered pairs
# The bench's candidate sets: the library defaults plus calibration-free HQQ weight options (what the
# 3.5-bit budget needs: 3-bit RTN is poor on this model) and 3-bit K/V sides (pairs of {2,3,4,8}).
DEFAULT_OPTIONS = ["w8g64a", "w4g64a", "w4g32a", "w3g64a", "w3g32a", "w2g64a",
                   "w4g64a@hqq", "w3g32a@hqq", "w3g64a@hqq", "w3g128a@hqq", "w2g32a@hqq"]
DEFAULT_KV = ["2,4,8,16", "2,3,4,8"]


def _options_tag(options: list[str]) -> str:
    """Run-directory suffix naming the weight methods searched (RTN-only runs keep the plain name)."""
    methods = sorted({o.partition("@")[2] or "rtn" for o in options})
    return "" if methods == ["rtn"] else "-" + "+".join(methods)


def _table(model, tok, args) -> SensitivityTable:
    OUT.mkdir(exist_ok=True)
    path = OUT / f"sens-auto-{Path(args.model).name}-{args.tokens}.parquet"
    calib = load_calib(tok, args.calib, args.tokens, args.window)
    cands = Candidates.parse(weights=sorted(set(args.weight_options)), kv=[str(k) for k in args.kv_pairs])
    return profile(model, calib, cands, method="auto", output=path, batch_size=4, model_name=Path(args.model).name)


class _Eval:
    """Test perplexity of plans on the first --eval-tokens of the test text (reference log-probs once)."""

    def __init__(self, model, tok, args) -> None:
        self.model, self.window = model, args.window
        self.ids = load_tokens(tok, args.eval, args.eval_tokens)
        self.ref = ReferenceLogProbs(model, self.ids, args.window, progress=False)
        self.cache: dict[str, tuple[float, float]] = {}

    def __call__(self, plan: bitplan.Plan, key: str | None = None) -> tuple[float, float]:
        if key is not None and key in self.cache:
            return self.cache[key]
        q = bitplan.apply_plan(copy.deepcopy(self.model), plan, kernels="reference")
        r = bitplan.evaluate(q, tokens=self.ids, max_tokens=self.ids.numel(), window=self.window, reference=self.ref, progress=False)
        out = (r.ppl, float(r.kl or 0.0))
        if key is not None:
            self.cache[key] = out
        return out


def _searched(model, table, verify, args, name: str, budgets: Budgets, kinds: tuple[str, ...]):
    """One search run (its own directory under bench/out/, continued on rerun) and its picked plan."""
    cfg = SearchConfig(budgets=budgets, trials=args.trials, kinds=kinds, verify_k=args.verify_top,
                       weights=tuple(args.weight_options), kv=tuple(str(k) for k in args.kv_pairs))
    res = search(model, table, OUT / name, cfg, verify_tokens=verify, window=args.window, name_or_path=args.model)
    return res, bitplan.Plan.load(res.best_plan)


def _uniform_weights(model, ev, args) -> dict[str, tuple[float, float, float]]:
    """(avg bits, ppl, KL) of each uniform RTN plan and of each uniform plan of a searched non-RTN option."""
    labels = UNIFORM_W + [o for o in args.weight_options if "@" in o and not o.endswith("@rtn")]
    out = {}
    for label in labels:
        fmt, _, method = label.partition("@")
        plan = bitplan.uniform_plan(model, fmt, method=method or "rtn", name_or_path=args.model)
        out[label] = (plan.summary().avg_weight_bits, *ev(plan, label))
    return out


def part_weights(model, tok, args) -> None:
    table = _table(model, tok, args)
    verify = default_verify_tokens(tok, args.calib, table.meta.tokens, args.verify_tokens, args.window)
    tag = _options_tag(args.weight_options)
    ev = _Eval(model, tok, args)
    base_ppl = ev(bitplan.uniform_plan(model, "bf16"), "bf16")[0]
    uniform = _uniform_weights(model, ev, args)
    rows, costs = [], []
    for bits in args.bits:
        t = time.perf_counter()
        res, plan = _searched(model, table, verify, args, f"search-w{bits:g}{tag}", Budgets(max_avg_bits=bits), ("weight",))
        ppl, kl = ev(plan)
        fits = {w: u for w, u in uniform.items() if u[0] <= bits + 1e-9}
        best_uniform = min(fits.items(), key=lambda kv: kv[1][1]) if fits else None
        rows.append((bits, plan.summary().avg_weight_bits, ppl, kl, best_uniform, _methods_used(plan)))
        costs.append((bits, res.stage_seconds, res.summary.get("proxy_trials_per_second"), res.summary.get("seed_improvement", {}),
                      res.summary.get("agreement", {}), time.perf_counter() - t))
        print(f"budget {bits}: ppl {ppl:.2f} (bf16 {base_ppl:.2f}); best uniform that fits: {best_uniform}", flush=True)
    body = [
        f"## Search: quality at weight-bit budgets on {Path(args.model).name}" + (f" (weight options {tag[1:]})" if tag else ""),
        "",
        stamp().rstrip(),
        f"- sensitivity: Fisher weight scores at {table.meta.tokens} calibration tokens; search: weights only "
        f"(acts, KV 16-bit), NSGA-II, {args.trials} trials, seeded with uniform plans and knapsack optima; picked by "
        f"measured KL of the top {args.verify_top} front plans on {args.verify_tokens} held-out calibration tokens",
        f"- weight options offered: {', '.join(args.weight_options)}",
        f"- test: first {ev.ids.numel()} tokens of `wikitext-2-raw-test.txt`, windows of {args.window}; bf16 ppl {base_ppl:.2f}",
        "- uniform plans: " + ", ".join(f"{w} {u[0]:.2f} bits ppl {u[1]:.2f}" for w, u in uniform.items()),
        "- gap closed: (uniform ppl - searched ppl) / (uniform ppl - bf16 ppl), against uniform RTN w4g64a at >= 4.5 bits and "
        "w3g64a at >= 3.5 bits (the issue's goal), and against the same format with the best method offered",
        "",
        "| budget (avg bits) | searched bits | searched ppl | KL | options used (units) | best uniform within budget | its ppl | gap closed vs RTN | vs best method |",
        "|---:|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for bits, got, ppl, kl, bu, used in rows:
        ref = "w4g64a" if bits >= 4.5 else "w3g64a" if bits >= 3.5 else None
        cells = []
        for r in ([ref] if ref else []) + ([min((u for u in uniform if u.partition("@")[0] == ref), key=lambda u: uniform[u][1])] if ref else []):
            closed = (uniform[r][1] - ppl) / (uniform[r][1] - base_ppl)
            cells.append(f"{closed:.0%} (vs {r})")
        cells += [""] * (2 - len(cells))
        bu_s = f"{bu[0]} ({bu[1][0]:.2f} bits)" if bu else "none fits"
        body.append(f"| {bits:g} | {got:.3f} | {ppl:.2f} | {kl:.4f} | {used} | {bu_s} | {bu[1][1] if bu else float('nan'):.2f} | "
                    f"{cells[0]} | {cells[1]} |")
    body += ["", "| budget | seconds: space+seeds / study / verify / outputs | proxy trials/s | front hypervolume gain over seeds | proxy-vs-measured discordant pairs |",
             "|---:|---|---:|---:|---:|"]
    for bits, st, tps, imp, ag, _ in costs:
        gain = imp.get("improvement")
        body.append(f"| {bits:g} | {st.get('space_and_seeds', 0):.1f} / {st.get('study', 0):.1f} / {st.get('verify', 0):.0f} / "
                    f"{st.get('outputs', 0):.1f} | {tps or float('nan'):.1f} | {'n/a' if gain is None else f'{gain:+.1%}'} | "
                    f"{ag.get('discordant_fraction', float('nan')):.0%} |")
    write_section(f"search-weights{tag}", "\n".join(body))
    print("\n".join(body))


def _methods_used(plan: bitplan.Plan) -> str:
    """``w4g32a x40, w3g64a@hqq x30, ...``: how many units got each (format, method), most used first."""
    counts: dict[str, int] = {}
    for layer in plan.layers:
        for choice in layer.weights.values():
            counts[str(choice)] = counts.get(str(choice), 0) + 1
    return ", ".join(f"{m} x{n}" for m, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def part_kv(model, tok, args) -> None:
    table = _table(model, tok, args)
    verify = default_verify_tokens(tok, args.calib, table.meta.tokens, args.verify_tokens, args.window)
    ev = _Eval(model, tok, args)
    base_ppl = ev(bitplan.uniform_plan(model, "bf16"), "bf16")[0]
    sinks = sorted({k.sink for k in args.kv_pairs})
    labels = UNIFORM_KV + [f"{k}s{s}" for s in sinks if s for k in UNIFORM_KV_SINK]
    uniform = {k: ev(bitplan.uniform_plan(model, "bf16", kv=k, name_or_path=args.model), k) for k in labels}
    kv_bits_offered = sorted({b for k in args.kv_pairs for b in (k.k_bits, k.v_bits)})
    kv_tag = ("" if 3 not in kv_bits_offered else "-3bit") + "".join(f"-s{s}" for s in sinks if s)
    rows = []
    for bits in args.kv_bits:
        _, plan = _searched(model, table, verify, args, f"search-kv{bits:g}{kv_tag}", Budgets(max_kv_bits=bits), ("kv",))
        ppl, kl = ev(plan)
        kv_bits = sum((f.k_bits + f.v_bits) / 2 for f in plan.kv_formats()) / len(plan.layers)
        summ = plan.summary()
        rows.append((bits, kv_bits, ppl, kl, summ.kv_formats, summ.kv_bytes(args.window) / args.window))
        print(f"KV budget {bits}: ppl {ppl:.3f} (16-bit KV {base_ppl:.3f})", flush=True)
    body = [
        f"## Search: KV pairs at average-KV-bit budgets on {Path(args.model).name} (weights bf16)",
        "",
        stamp().rstrip(),
        f"- KV pairs offered: {len(args.kv_pairs)} (K and V bits from {kv_bits_offered}"
        + (f", first {', '.join(map(str, sinks))} token(s) kept 16-bit: `s` suffix" if any(sinks) else "") + "); "
        f"scores: measured KL per layer and pair ({table.meta.tokens} calibration tokens), dominated pairs pruned; "
        f"{args.trials} trials; picked by measured KL on {args.verify_tokens} held-out calibration tokens",
        f"- test: first {ev.ids.numel()} tokens of `wikitext-2-raw-test.txt`; 16-bit KV ppl {base_ppl:.3f}; goal: at 3.25 bits within 1%",
        "- uniform: " + ", ".join(f"{k} ppl {v[0]:.3f}" for k, v in uniform.items()),
        f"- KV bytes/token: the whole cache at {args.window} tokens (scales, offsets and sink tokens included) / {args.window}; "
        f"16-bit: {bitplan.uniform_plan(model, 'bf16').summary().kv_bytes_per_token:.0f}",
        "",
        "| budget (avg KV bits) | searched avg bits | KV bytes/token | ppl | vs 16-bit KV | KL | pairs used |",
        "|---:|---:|---:|---:|---:|---:|---|",
        *[f"| {b:g} | {kb:.3f} | {by:.0f} | {p:.3f} | {p / base_ppl - 1:+.2%} | {kl:.4f} | {', '.join(f'{k} x{n}' for k, n in f.items())} |"
          for b, kb, p, kl, f, by in rows],
    ]
    write_section("search-kv" + "".join(f"-s{s}" for s in sinks if s), "\n".join(body))
    print("\n".join(body))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--calib", default=str(SHARED / "data" / "wikitext-2-valid-unk.txt"))
    ap.add_argument("--eval", default=str(SHARED / "data" / "wikitext-2-raw-test.txt"))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--verify-tokens", type=int, default=4096)
    ap.add_argument("--verify-top", type=int, default=8)
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--bits", type=lambda s: [float(x) for x in s.split(",")], default=[3, 3.5, 4, 4.5, 5])
    ap.add_argument("--kv-bits", type=lambda s: [float(x) for x in s.split(",")], default=[2.5, 3, 3.25, 4])
    ap.add_argument("--weight-options", type=lambda s: s.split(","), default=DEFAULT_OPTIONS,
                    help="weight options scored and searched (default: RTN defaults + HQQ options)")
    ap.add_argument("--kv", default=";".join(DEFAULT_KV),
                    help="KV pairs scored and searched: ';'-separated bit sets (all pairs) or pairs (default: %(default)s)")
    ap.add_argument("--parts", default="weights,kv")
    args = ap.parse_args()
    args.kv_pairs = list(Candidates.parse(kv=args.kv.split(";")).kv)
    args.model = args.model or default_model()
    model = bitplan.load_model(args.model, dtype=torch.float32)
    tok = bitplan.load_tokenizer(args.model)
    for name in args.parts.split(","):
        {"weights": part_weights, "kv": part_kv}[name](model, tok, args)


if __name__ == "__main__":
    main()
