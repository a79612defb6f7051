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


OUT = Path(__file__).resolve().parent / "out"  # cached tables (git-ignored): reruns resume instead of redoing


def _main_table(model, tok, args):
    """The default (``auto``) table of the main model: Fisher weights + acts, measured KV. Resumable."""
    from bitplan.sensitivity import profile

    calib = load_calib(tok, args.calib, args.tokens, args.window)
    OUT.mkdir(exist_ok=True)
    path = OUT / f"sens-auto-{Path(args.model).name}-{args.tokens}.parquet"
    t = time.perf_counter()
    table = profile(model, calib, Candidates(), method="auto", output=path, batch_size=args.batch_size,
                    model_name=Path(args.model).name)  # fmt: skip
    return table, calib, time.perf_counter() - t


def part_table(model, tok, args) -> None:
    """The full default table: does it cover every unit, option and KV pair? KV space reductions."""
    from bitplan.sensitivity import KVReduction

    table, calib, sec = _main_table(model, tok, args)
    graph = build_graph(model)
    c = Candidates()
    have = {(r.unit, r.kind, r.format) for r in table.rows}
    want_w = {(u.name, "weight", str(o.format)) for u in graph.units() for o in c.weight_options(u.in_features)}
    want_a = {(f"layers.{i}.acts", "act", str(a)) for i in range(graph.num_layers) for a in c.acts}
    want_k = {(f"layers.{i}.kv", "kv", str(k)) for i in range(graph.num_layers) for k in c.kv}
    red = KVReduction.from_dict(table.meta.extra["kv_reduction"])
    timings = table.meta.extra.get("timings", {})
    n_kv = sum(r.kind == "kv" for r in table.rows)
    kv_sec = sum(r.seconds for r in table.rows if r.kind == "kv")
    body = [
        f"## Sensitivity: the default table of {Path(args.model).name} (method auto: Fisher weights + acts, measured KV)",
        "",
        stamp().rstrip(),
        f"- calibration: first {calib.tokens} tokens of `wikitext-2-valid-unk.txt`, {calib.num_windows} windows of "
        f"{calib.window}; bf16 compute; table `{Path(table.meta.model_name or args.model).name}` with {len(table)} rows",
        f"- coverage: weight {len(want_w & have)}/{len(want_w)} (unit, option), act {len(want_a & have)}/{len(want_a)}, "
        f"KV {len(want_k & have)}/{len(want_k)} (layer, pair)",
        f"- time: Fisher {timings.get('fisher_seconds', float('nan')):.0f} s (this run; 0 when reused), "
        f"measured KV {kv_sec:.0f} s summed over {n_kv} rows ({kv_sec / max(n_kv, 1):.1f} s/row); wall this run {sec:.0f} s",
        f"- KV reduction: pairs {red.pairs_before} -> {red.pairs_after} after dropping dominated pairs "
        f"({red.pairs_after / max(len(red.kept), 1):.1f} of {red.pairs_before / max(len(red.kept), 1):.0f} per layer); "
        f"{len(red.kept)} layers in **{len(red.clusters)} clusters**: "
        + ", ".join("{" + ",".join(map(str, cl)) + "}" for cl in red.clusters),
        "",
        "| layer | pairs kept (Pareto: fewer bytes or less KL) | k2v2 KL | k4v4 KL | k8v8 KL |",
        "|---:|---|---:|---:|---:|",
    ]
    kv = {(r.layer, r.format): r.score for r in table.rows if r.kind == "kv"}
    for layer, kept in sorted(red.kept.items()):
        body.append(f"| {layer} | {', '.join(kept)} | {kv.get((layer, 'k2v2'), float('nan')):.2e} | "
                    f"{kv.get((layer, 'k4v4'), float('nan')):.2e} | {kv.get((layer, 'k8v8'), float('nan')):.2e} |")
    write_section("sensitivity-table", "\n".join(body))
    print("\n".join(body))


def part_methods(model, tok, args) -> None:
    """Fisher vs measured weight scores on the same 30 mixed weight+KV plans: which proxy ranks plans better?

    Measured weight rows for every unit are ~2 h on this CPU, so the comparison draws weights from the units
    of every tenth layer (both methods score those) and KV pairs from every layer (measured; Fisher does not
    score KV). Each plan's prediction is its summed weight scores (Fisher or measured) plus its measured KV scores.
    """
    from bitplan.sensitivity import additivity_check
    from bitplan.sensitivity._measure import measured_scores

    table, calib, _ = _main_table(model, tok, args)
    graph = build_graph(model)
    layers = set(range(4, graph.num_layers, 10))
    units = {u.name for u in graph.units() if u.layer in layers}
    path = OUT / f"sens-kl-layers-{Path(args.model).name}-{args.tokens}.parquet"
    from bitplan.sensitivity import SensitivityTable
    t = time.perf_counter()
    if path.exists():
        kl_rows = SensitivityTable.load(path).rows
    else:
        kl_rows = measured_scores(model, calib, Candidates(acts=(), kv=()), kinds=("weight",),
                                  batch_size=args.batch_size, skip=lambda key: key[0] not in units)  # fmt: skip
        SensitivityTable(kl_rows, table.meta).save(path)
    kl_sec = time.perf_counter() - t
    rows = [r for r in table.rows if r.kind == "kv" or (r.kind == "weight" and r.unit in units)] + list(kl_rows)
    held = load_calib(tok, args.calib, args.heldout, args.window, skip_tokens=2 * args.tokens)
    report = additivity_check(model, rows, held, n_plans=args.plans, seed=1, methods=("kl", "fisher"))
    body = [
        f"## Sensitivity: Fisher vs measured scores as the additive proxy on {Path(args.model).name} (weights + KV)",
        "",
        stamp().rstrip(),
        f"- scores at {calib.tokens} calibration tokens: weights of the {len(units)} units of layers {sorted(layers)} "
        f"by Fisher and by measured KL ({len(kl_rows)} measured rows, {kl_sec:.0f} s), KV pairs of all layers measured",
        f"- {len(report.records)} random mixed plans (weights of those units and KV pairs of every layer; each plan's "
        f"prediction = its summed weight scores + its summed KV scores); measured: KL of the applied plan on "
        f"{report.tokens} held-out calibration tokens, {report.seconds:.0f} s",
        "",
        "| weight scores | Spearman rho | Pearson (logs) | rel. error median | sum/measured median |",
        "|---|---:|---:|---:|---:|",
        *[f"| {m} | {st.spearman:.3f} | {st.pearson_log:.3f} | {st.median_rel_err:.2f} | {st.median_ratio:.2f} |"
          for m, st in report.stats.items()],
        "",
        "| plan | avg weight bits | KV bytes/token | predicted (Fisher w) | predicted (measured w) | measured KL |",
        "|---:|---:|---:|---:|---:|---:|",
        *[f"| {i} | {r.avg_bits:.2f} | {r.kv_bytes:.0f} | {r.predicted.get('fisher', float('nan')):.4f} | "
          f"{r.predicted.get('kl', float('nan')):.4f} | {r.measured:.4f} |"
          for i, r in enumerate(sorted(report.records, key=lambda r: r.measured))],
    ]
    write_section("sensitivity-methods", "\n".join(body))
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
    parts = {"fisher": part_fisher, "overlap": part_overlap, "kvsplit": part_kvsplit, "additivity": part_additivity, "cost": part_cost,
             "table": part_table, "methods": part_methods}
    for name in args.parts.split(","):
        parts[name](model, tok, args)


if __name__ == "__main__":
    main()
