"""Sensitivity profiles of the main model: cost, stability across calibration subsets, additivity.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_sensitivity.py --parts fisher,overlap
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_sensitivity.py --parts kvsplit

Parts (each writes its own section of bench/RESULTS.md):
* ``fisher``: the full Fisher profile (all units x default weight options + act formats) at --tokens
  calibration tokens: wall time, rows, cost per batch.
* ``overlap``: Fisher profiles on two disjoint calibration subsets; overlap of the 10 most sensitive
  weight units (ranked at each unit's harshest option).
* ``additivity``: 30 random mixed weight plans: summed Fisher unit scores vs the measured KL of each
  applied plan on held-out calibration tokens (Spearman, relative error).
* ``kvsplit``: measured KL of quantizing only K or only V of each layer at 2 bits (k2v16, k16v2):
  per layer, is K more sensitive than V (KVTuner's finding)?
Calibration text only (wikitext-2 validation); the test text is never read here.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import stamp, write_section  # noqa: E402
from bench_core import SHARED, default_model  # noqa: E402

import bitplan  # noqa: E402
from bitplan.graph import build_graph  # noqa: E402
from bitplan.sensitivity import Candidates, load_calib  # noqa: E402
from bitplan.sensitivity._table import rank_units  # noqa: E402


def _ranked_units(rows: list, top: int) -> list[str]:
    return [r.unit for r in rank_units(r for r in rows if r.kind == "weight")][:top]


def part_fisher(model, tok, args) -> None:
    from bitplan.sensitivity._fisher import fisher_scores

    calib = load_calib(tok, args.calib, args.tokens, args.window)
    t = time.perf_counter()
    rows = fisher_scores(model, calib, Candidates(), batch_size=args.batch_size, progress=True)
    sec = time.perf_counter() - t
    graph = build_graph(model)
    n_w = sum(r.kind == "weight" for r in rows)
    n_a = sum(r.kind == "act" for r in rows)
    body = [
        f"## Sensitivity: full Fisher profile of {Path(args.model).name}",
        "",
        stamp().rstrip(),
        f"- calibration: first {calib.tokens} tokens of `wikitext-2-valid-unk.txt`, {calib.num_windows} windows of {calib.window}",
        f"- options: {', '.join(str(w) for w in Candidates().weights)} per unit; acts {', '.join(str(a) for a in Candidates().acts)} per layer",
        "",
        "| model | layers | units | weight rows | act rows | batches | wall seconds | seconds per batch | goal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {Path(args.model).name} | {graph.num_layers} | {len(graph.units())} | {n_w} | {n_a} | "
        f"{-(-calib.num_windows // args.batch_size)} | {sec:.0f} | {sec / -(-calib.num_windows // args.batch_size):.1f} | <= 120 s |",
    ]
    write_section("sensitivity-fisher", "\n".join(body))
    print("\n".join(body))


def part_overlap(model, tok, args) -> None:
    from bitplan.sensitivity._fisher import fisher_scores

    a = load_calib(tok, args.calib, args.tokens, args.window)
    b = load_calib(tok, args.calib, args.tokens, args.window, skip_tokens=args.tokens)
    top_a = _ranked_units(fisher_scores(model, a, Candidates(acts=()), batch_size=args.batch_size, kinds=("weight",)), 10)
    top_b = _ranked_units(fisher_scores(model, b, Candidates(acts=()), batch_size=args.batch_size, kinds=("weight",)), 10)
    common = [u for u in top_a if u in top_b]
    body = [
        "## Sensitivity: stability of the 10 most sensitive weight units (Fisher)",
        "",
        stamp().rstrip(),
        f"- two disjoint calibration subsets of {args.tokens} tokens each (tokens 0-{args.tokens} and {args.tokens}-{2 * args.tokens} of the validation text)",
        f"- overlap of the top 10: **{len(common)}/10**",
        "",
        "| rank | subset A | subset B |",
        "|---:|---|---|",
        *[f"| {i + 1} | {ua} | {ub} |" for i, (ua, ub) in enumerate(zip(top_a, top_b, strict=False))],
    ]
    write_section("sensitivity-overlap", "\n".join(body))
    print("\n".join(body))


def part_kvsplit(model, tok, args) -> None:
    """Measured KL of quantizing only K or only V of one layer: is K more sensitive (KVTuner)?"""
    from bitplan.sensitivity._kvreduce import k_vs_v
    from bitplan.sensitivity._measure import measured_scores

    calib = load_calib(tok, args.calib, args.tokens, args.window)
    cands = Candidates.parse([], [], ["k2v16", "k16v2"])
    t = time.perf_counter()
    rows = measured_scores(model, calib, cands, kinds=("kv",), batch_size=args.batch_size, dtype=torch.bfloat16)
    sec = time.perf_counter() - t
    per = k_vs_v(rows)
    score = {(r.layer, r.format): r.score for r in rows}
    n_k = sum(bool(v["k_more_sensitive"]) for v in per.values())
    body = [
        f"## Sensitivity: K vs V per layer on {Path(args.model).name} (measured KL, only that side of that layer quantized)",
        "",
        stamp().rstrip(),
        f"- calibration: first {calib.tokens} tokens of `wikitext-2-valid-unk.txt`, windows of {calib.window}, bf16 compute "
        f"(noise floor ~1e-4 to 8e-4 nats, so 4-bit sides near it are not resolved); {len(rows)} rows in {sec:.0f} s ({sec / len(rows):.1f} s/row)",
        f"- **K more sensitive than V (2-bit) in {n_k} of {len(per)} layers**",
        "",
        "| layer | k2v16 (only K at 2 bits) | k16v2 (only V at 2 bits) | K/V |",
        "|---:|---:|---:|---:|",
        *[f"| {i} | {score[(i, 'k2v16')]:.2e} | {score[(i, 'k16v2')]:.2e} | {per[i]['ratio']:.1f} |" for i in sorted(per)],
    ]
    write_section("sensitivity-kv", "\n".join(body))
    print("\n".join(body))


def part_additivity(model, tok, args) -> None:
    """Does adding unit scores predict a mixed plan's KL? Fisher weight scores vs measured plan KL."""
    from bitplan.sensitivity import additivity_check
    from bitplan.sensitivity._fisher import fisher_scores

    calib = load_calib(tok, args.calib, args.tokens, args.window)
    held = load_calib(tok, args.calib, args.heldout, args.window, skip_tokens=2 * args.tokens)  # disjoint from both profiles
    rows = fisher_scores(model, calib, Candidates(acts=()), batch_size=args.batch_size, kinds=("weight",))
    report = additivity_check(model, rows, held, n_plans=args.plans, seed=0, methods=("fisher",))
    st = report.stats["fisher"]
    body = [
        f"## Sensitivity: additivity of Fisher weight scores on {Path(args.model).name}",
        "",
        stamp().rstrip(),
        f"- scores: Fisher, {calib.tokens} calibration tokens; plans: {len(report.records)} random mixed weight plans "
        "(per-unit options from the default set or bf16, aggressiveness spread evenly), KV and acts 16-bit",
        f"- measured: mean KL of each whole applied plan vs the 16-bit model on {held.tokens} held-out calibration tokens "
        f"(validation text after the profiles' tokens); {report.seconds:.0f} s",
        f"- **Spearman rho {st.spearman:.3f}**, Pearson on logs {st.pearson_log:.3f}, relative error median "
        f"{st.median_rel_err:.2f} / mean {st.mean_rel_err:.2f}, sum/measured median {st.median_ratio:.2f} "
        f"(geometric mean {st.geomean_ratio:.2f})",
        "",
        "| plan | avg weight bits | predicted KL (sum) | measured KL |",
        "|---:|---:|---:|---:|",
        *[
            f"| {i} | {r.avg_bits:.2f} | {r.predicted['fisher']:.4f} | {r.measured:.4f} |"
            for i, r in enumerate(sorted(report.records, key=lambda r: r.measured))
        ],
    ]
    write_section("sensitivity-additivity", "\n".join(body))
    print("\n".join(body))


def part_cost(model, tok, args) -> None:
    """How the measured profile's cost grows: seconds per row vs the layer it starts at, extrapolated."""
    from bitplan.sensitivity._measure import measured_scores

    calib = load_calib(tok, args.calib, args.tokens, args.window)
    graph = build_graph(model)
    n = graph.num_layers
    probe = {0, n // 2, n - 1}
    units = {u.name for u in graph.units() if u.layer in probe and u.local.endswith("down_proj")}
    t = time.perf_counter()
    rows = measured_scores(
        model, calib, Candidates.parse(["w4g64a"], [], []), kinds=("weight",), batch_size=args.batch_size,
        skip=lambda key: key[0] not in units,
    )  # fmt: skip
    total = time.perf_counter() - t
    per = {r.layer: r.seconds for r in rows}
    lo, hi = min(per), max(per)
    slope = (per[lo] - per[hi]) / (hi - lo)  # seconds per replayed layer
    fixed = per[hi] - slope  # head + reduction (+ the last layer itself)
    c = Candidates()
    n_rows = {"weight": len(graph.units()) * len(c.weights), "act": n * len(c.acts), "kv": n * len(c.kv)}
    avg = fixed + slope * (n + 1) / 2
    est = sum(n_rows.values()) * avg
    body = [
        f"## Sensitivity: cost of the measured (kl) profile on {Path(args.model).name}",
        "",
        stamp().rstrip(),
        f"- {calib.tokens} calibration tokens, bf16; rows timed: w4g64a on mlp.down_proj of layers {sorted(per)}; "
        f"setup (reference pass, compile) {total - sum(per.values()):.0f} s",
        "",
        "| layer | seconds per row |",
        "|---:|---:|",
        *[f"| {i} | {per[i]:.1f} |" for i in sorted(per)],
        "",
        f"- cost model: row(l) = {fixed:.1f} s + {slope:.2f} s x (layers replayed, {n} - l); the fixed part is the "
        "lm_head over the 49k vocabulary and the KL reduction for every calibration token",
        f"- default options: {n_rows['weight']} weight + {n_rows['act']} act + {n_rows['kv']} KV rows; "
        f"mean row {avg:.1f} s => **~{est / 3600:.1f} h** for the full measured profile (goal 15 min: not met); "
        "cost is linear in options and, per option, in layers replayed plus a fixed head term",
    ]
    write_section("sensitivity-cost", "\n".join(body))
    print("\n".join(body))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--calib", default=str(SHARED / "data" / "wikitext-2-valid-unk.txt"))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--parts", default="fisher,overlap")
    ap.add_argument("--heldout", type=int, default=4096, help="held-out calibration tokens for the additivity check")
    ap.add_argument("--plans", type=int, default=30)
    args = ap.parse_args()
    args.model = args.model or default_model()
    model = bitplan.load_model(args.model, dtype=torch.float32)
    tok = bitplan.load_tokenizer(args.model)
    parts = {"fisher": part_fisher, "overlap": part_overlap, "kvsplit": part_kvsplit, "additivity": part_additivity, "cost": part_cost}
    for name in args.parts.split(","):
        parts[name](model, tok, args)


if __name__ == "__main__":
    main()
