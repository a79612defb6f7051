"""Hardware profiles on the main model: predicted vs measured decode latency and memory; a latency-budgeted search.

    .venv/bin/python bench/bench_profiles.py --parts predict,autotune

Run it on a quiet machine: every figure is a CPU timing. OpenMP settings are part of the device (see
``bitplan.profiles._fingerprint``): the profile, the plans and the search all run under the environment this
script was started with, and RESULTS names it.

Parts (each writes its own section of bench/RESULTS.md):

* ``predict``: ``profile_hw`` of the model on this CPU (bench/out/, reused when its fingerprint matches), then
  ``--plans`` mixed plans (random per-unit weight formats, random per-layer KV formats, from the profile's
  options) plus the 16-bit model and uniform w4g64a and w8c. Each plan is applied with the kernels the profile ranks
  fastest (as ``bitplan apply --profile``) in a fresh process, which measures decode ms per token at batch
  1 (``(t(generate n+1) - t(generate 1)) / n``, n = --tokens, median of --runs) and resident memory. Table:
  ``predict()`` vs measured, and a bytes-only model (decode time proportional to the bytes a token reads,
  calibrated on the 16-bit row) side by side. Goal: mean absolute error <= 10%, max <= 20%.
* ``autotune``: ``bitplan search ... --profile hw.parquet --max-latency B`` (weights only, small sizes), which
  times front plans itself and hands back only those within B; every plan it timed is then timed again in a
  fresh process (paired with a freshly loaded 16-bit model), against the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proc import rss_bytes, run_worker, trim  # noqa: E402
from _results import stamp, write_section  # noqa: E402
from bench_core import SHARED, default_model  # noqa: E402

import bitplan  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
PROMPT = "The history of the city begins with a small settlement"
WEIGHTS = ("bf16", "w8c", "w4g64a", "w4g32a", "w3g64a")
ACTS = ("a16",)
KV = ("k16v16", "k8v8", "k4v4", "k4v2")


def _hw_path(args: argparse.Namespace) -> Path:
    return OUT / f"hw-{Path(args.model).name}-{args.dtype}.parquet"


def _profile(model, args):  # type: ignore[no-untyped-def]
    from bitplan.profiles import load_profile, profile_hw

    path = _hw_path(args)
    if path.exists():
        try:
            return load_profile(path, "cpu"), 0.0
        except bitplan.BitplanError as e:  # another machine's profile: measure this one
            print(f"not reusing {path}: {e}", flush=True)
            path.unlink()
    t = time.perf_counter()
    hw = profile_hw(model, device="cpu", batch=1, contexts=tuple(args.contexts), weights=WEIGHTS, acts=ACTS, kv=KV,
                    output=path, model_name=Path(args.model).name, budget_s=args.budget_s)  # fmt: skip
    return hw, time.perf_counter() - t


def mixed_plans(model, n: int, seed: int) -> list[tuple[str, bitplan.Plan]]:  # type: ignore[no-untyped-def]
    """``n`` random mixed plans: each draws its own weight-format mix (2-4 formats) and per-layer KV formats."""
    from dataclasses import replace

    from bitplan.formats import parse_act, parse_kv, parse_weight
    from bitplan.graph import build_graph
    from bitplan.plan import LayerPlan, UnitChoice

    rng = random.Random(seed)
    graph = build_graph(model)
    base = bitplan.uniform_plan(model, "bf16")
    in_features = {u.name: u.in_features for u in graph.units(base.granularity)}
    plans = []
    for i in range(n):
        pool = rng.sample(WEIGHTS, k=rng.randint(2, 4))
        layers = []
        for layer in base.layers:
            weights = {}
            for unit in layer.weights:
                fmt = parse_weight(rng.choice(pool))
                weights[unit] = UnitChoice(fmt.fit_group(in_features[f"layers.{layer.index}.{unit}"]), "rtn")
            layers.append(LayerPlan(layer.index, weights, parse_act(ACTS[0]), parse_kv(rng.choice(KV))))
        plans.append((f"mix{i:02d}", replace(base, layers=tuple(layers))))
    return plans


def worker(plan_path: str, args: argparse.Namespace) -> dict:
    """Fresh process: load, apply with the profile's fastest kernels, measure decode ms/token and RSS."""
    from bitplan.apply import held_weight_bytes, kernel_counts
    from bitplan.profiles import ProfileIndex, decode_ms_per_token, load_profile

    torch.set_num_threads(args.threads)
    tok = bitplan.load_tokenizer(args.model)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    trim()
    rss0 = rss_bytes()
    model = bitplan.load_model(args.model, dtype=bitplan.loading.parse_dtype(args.dtype))
    plan = bitplan.Plan.load(plan_path)
    latency = ProfileIndex(load_profile(_hw_path(args), "cpu")).kernel_latency()
    bitplan.apply_plan(model, plan, kernels="auto", latency=latency)
    trim()
    rss1 = rss_bytes()
    with torch.inference_mode():
        ms, samples = decode_ms_per_token(model, ids, new=args.tokens, reps=args.runs)
    return {"ms": ms, "samples": samples, "held": held_weight_bytes(model), "rss_apply": rss1 - rss0,
            "rss_decode": rss_bytes() - rss0, "kernels": kernel_counts(model), "prompt": int(ids.shape[1])}  # fmt: skip


def paired_worker(plan_path: str, args: argparse.Namespace) -> dict:
    """Fresh process: the plan (profile's kernels) and the 16-bit model, decoded in interleaved rounds."""
    import copy
    import statistics

    from bitplan.apply import kernel_counts
    from bitplan.profiles import ProfileIndex, load_profile, paired_decode_ms

    torch.set_num_threads(args.threads)
    model = bitplan.load_model(args.model, dtype=bitplan.loading.parse_dtype(args.dtype))
    latency = None if args.static_kernels else ProfileIndex(load_profile(_hw_path(args), "cpu")).kernel_latency()
    q = bitplan.apply_plan(
        copy.deepcopy(model), bitplan.Plan.load(plan_path), kernels="auto", latency=latency
    )
    base, plan = paired_decode_ms(
        [model, q], context=args.context, new=args.latency_tokens, rounds=args.rounds
    )
    ratios = [a / b for a, b in zip(plan, base, strict=True)]
    return {"ms": statistics.median(plan), "ms_16bit": statistics.median(base), "ratio": statistics.median(ratios),
            "ratios": ratios, "kernels": kernel_counts(q)}  # fmt: skip


def measure_paired(plan_path: Path, args: argparse.Namespace, env: dict[str, str] | None = None,
                   static_kernels: bool = False) -> dict:  # fmt: skip
    cmd = [sys.executable, __file__, "--paired-worker", str(plan_path), "--model", args.model, "--dtype", args.dtype,
           "--context", str(args.context), "--latency-tokens", str(args.latency_tokens), "--rounds", str(args.rounds),
           "--threads", str(args.threads), *(["--static-kernels"] if static_kernels else [])]  # fmt: skip
    return run_worker(cmd, f"timing {plan_path}", env)


def part_head(model, args) -> None:  # type: ignore[no-untyped-def]
    """The lm_head's share of a decoded token, from the profile: why the head is a search decision."""
    from bitplan.formats import ActFormat, parse_weight
    from bitplan.graph import build_graph
    from bitplan.profiles import ProfileIndex, predict

    hw, _ = _profile(model, args)
    idx, graph = ProfileIndex(hw), build_graph(model)
    head = graph.lm_head
    assert head is not None
    shape = (head.out_features, head.in_features)
    total = predict(bitplan.uniform_plan(model, "bf16"), idx, graph, batch=1, context=args.context).decode_ms
    rows = [(f, *idx.linear_ms("decode", shape, parse_weight(f), ActFormat())) for f in WEIGHTS]
    body = [
        f"## Profiles: the output head's share of decoding ({shape[0]} x {shape[1]} lm_head, batch 1)",
        "",
        stamp().rstrip(),
        f"- {args.threads} threads, {_omp()}; profile `{_hw_path(args).name}`; predicted 16-bit decode at context "
        f"{args.context}: {total:.2f} ms/token",
        "",
        "| head format | kernel | decode ms | share of the 16-bit token |",
        "|---|---|---:|---:|",
        *[f"| {f} | {k} | {ms:.2f} | {ms / total:.1%} |" for f, ms, k in rows],
    ]
    if not args.dry_run:
        write_section("profiles-head", "\n".join(body))
    print("\n".join(body))


def part_omp(model, args) -> None:  # type: ignore[no-untyped-def]
    """Uniform w4g64a vs the 16-bit model, paired, in fresh processes under each OpenMP wait policy."""
    plan = _save(bitplan.uniform_plan(model, "w4g64a"), OUT / "omp-w4g64a.json")
    rows = []
    for policy in ("", "PASSIVE", "ACTIVE"):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | ({"OMP_WAIT_POLICY": policy} if policy else {})
        m = measure_paired(plan, args, env, static_kernels=True)
        rows.append((policy or "unset (OpenMP default)", m))
        print(f"OMP_WAIT_POLICY {policy or 'unset'}: w4g64a {m['ms']:.2f} ms, 16-bit {m['ms_16bit']:.2f} ms, {m['ratio']:.3f}x", flush=True)
    body = [
        "## Profiles: the OpenMP wait policy decides whether packed int4 beats fp32 (why it is in the fingerprint)",
        "",
        stamp().rstrip(),
        f"- {args.threads} threads; fp32 model, uniform w4g64a applied with the static kernel choice ({', '.join(f'{k} x{v}' for k, v in rows[0][1]['kernels'].items())}); "
        f"each policy in a fresh process timing the plan and the 16-bit model paired ({args.rounds} interleaved rounds x "
        f"{args.latency_tokens} tokens from a pre-filled {args.context}-token context, median per-round ratio)",
        "",
        "| OMP_WAIT_POLICY | w4g64a ms/token | 16-bit ms/token | w4g64a / 16-bit |",
        "|---|---:|---:|---:|",
        *[f"| {p} | {m['ms']:.2f} | {m['ms_16bit']:.2f} | {m['ratio']:.3f} |" for p, m in rows],
    ]
    if not args.dry_run:
        write_section("profiles-omp", "\n".join(body))
    print("\n".join(body))


def measure(plan_path: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(plan_path), "--model", args.model, "--dtype", args.dtype,
           "--tokens", str(args.tokens), "--runs", str(args.runs), "--threads", str(args.threads)]  # fmt: skip
    return run_worker(cmd, f"measuring {plan_path}")


def _omp() -> str:
    from bitplan.profiles._fingerprint import _omp_settings

    return _omp_settings() or "OpenMP defaults (OMP_WAIT_POLICY unset)"


def _err(pred: float, meas: float) -> float:
    return (pred - meas) / meas


def part_predict(model, args) -> None:  # type: ignore[no-untyped-def]
    from bitplan.graph import build_graph
    from bitplan.profiles import ProfileIndex, predict

    hw, prof_s = _profile(model, args)
    graph = build_graph(model)
    index = ProfileIndex(hw)
    plans = [("16-bit", bitplan.uniform_plan(model, "bf16"))]
    plans += [("w4g64a", bitplan.uniform_plan(model, "w4g64a")), ("w8c", bitplan.uniform_plan(model, "w8c"))]
    plans += mixed_plans(model, args.plans, args.seed)
    pdir = OUT / "profile-plans"
    pdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, plan in plans:
        path = pdir / f"{name}.json"
        plan.save(path)
        m = measure(path, args)
        ctx = m["prompt"] + args.tokens // 2  # mean context over the measured decode steps
        p = predict(plan, index, graph, batch=1, context=ctx, kernels="auto")
        rows.append((name, plan.summary(), p, m))
        print(
            f"{name:8s} predicted {p.decode_ms:7.2f} ms  measured {m['ms']:7.2f} ms ({_err(p.decode_ms, m['ms']):+.1%})  "
            f"peak {p.peak_bytes / 1e6:6.1f} MB vs RSS {m['rss_decode'] / 1e6:6.1f} MB  {m['kernels']}",
            flush=True,
        )
    ref = rows[0]
    per_byte = ref[3]["ms"] / ref[3]["held"]  # the bytes-only model, calibrated on the 16-bit row
    errs = [abs(_err(p.decode_ms, m["ms"])) for _, _, p, m in rows]
    berrs = [abs(_err(m2["held"] * per_byte, m2["ms"])) for _, _, _, m2 in rows[1:]]
    body = [
        f"## Profiles: predicted vs measured decoding of {Path(args.model).name} on this CPU, batch 1",
        "",
        stamp().rstrip(),
        f"- {args.threads} threads, {_omp()}; model dtype {args.dtype}; profile `{_hw_path(args).name}`: {len(hw.rows)} rows, contexts {args.contexts}, "
        f"{'reused' if not prof_s else f'measured in {prof_s:.0f} s'}; device {hw.meta.device}",
        f"- measured: fresh process per plan, kernels chosen by the profile (as `bitplan apply --profile`), "
        f"{args.tokens} greedy tokens after a {ref[3]['prompt']}-token prompt, ms/token = (t(generate {args.tokens + 1}) - "
        f"t(generate 1)) / {args.tokens}, median of {args.runs}; RSS = process RSS after decoding minus after imports",
        f"- predicted: `predict(plan, profile, context={ref[3]['prompt']} + {args.tokens // 2})` (the mean context of the "
        "measured steps); peak = held weight bytes + KV + workspace estimate",
        "- bytes-only: ms = held weight bytes x (16-bit ms / 16-bit bytes), i.e. decode time proportional to the "
        "bytes each token reads, calibrated on the 16-bit row",
        f"- **profile: mean |error| {statistics.mean(errs):.1%}, max {max(errs):.1%}** over {len(rows)} plans "
        f"(goal <= 10% / <= 20%); bytes-only: mean {statistics.mean(berrs):.1%}, max {max(berrs):.1%} over the {len(berrs)} "
        "quantized plans",
        "",
        "| plan | avg weight bits | KV | measured ms/token | predicted | error | bytes-only | error | held MB | predicted peak MB | RSS MB | kernels |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, s, p, m in rows:
        b = m["held"] * per_byte
        kv = ", ".join(f"{k} x{v}" for k, v in s.kv_formats.items())
        ks = ", ".join(f"{k} x{v}" for k, v in m["kernels"].items()) or "(dense)"
        body.append(
            f"| {name} | {s.avg_weight_bits:.2f} | {kv} | {m['ms']:.2f} | {p.decode_ms:.2f} | {_err(p.decode_ms, m['ms']):+.1%} | "
            f"{b:.2f} | {_err(b, m['ms']):+.1%} | {m['held'] / 1e6:.1f} | {p.peak_bytes / 1e6:.1f} | {m['rss_decode'] / 1e6:.1f} | {ks} |"
        )
    if not args.dry_run:
        write_section("profiles-predict", "\n".join(body))
    print("\n".join(body))


def part_autotune(model, args) -> None:  # type: ignore[no-untyped-def]
    from bitplan.graph import build_graph
    from bitplan.profiles import ProfileIndex, predict
    from bitplan.search import Budgets, SearchConfig
    from bitplan.search._pipeline import PipelineInputs, run_pipeline

    hw, _ = _profile(model, args)
    index, graph = ProfileIndex(hw), build_graph(model)
    run = OUT / f"autotune-{args.budget}"
    cfg = SearchConfig(budgets=Budgets.parse(None, None, None, args.budget), trials=args.trials, kinds=("weight", "head"),
                       weights=("w8c", "w4g64a", "w4g32a", "w3g64a"), verify_k=args.verify_top, context=args.context,
                       latency_rounds=args.rounds, latency_tokens=args.latency_tokens)  # fmt: skip
    inputs = PipelineInputs(model=args.model, calib=args.calib, tokens=args.calib_tokens, verify_tokens=2048,
                            profile=str(_hw_path(args)), dtype=args.dtype)  # fmt: skip
    t = time.perf_counter()
    try:
        res = run_pipeline(inputs, cfg, run, progress=False)
    except bitplan.BitplanError as e:  # an infeasible budget: the search's own one line is the result
        body = [f"## Profiles: a latency-budgeted search (`--max-latency {args.budget}`) on this CPU", "",
                stamp().rstrip(), f"- {args.threads} threads, {_omp()}", f"- the search refuses the budget: {e}"]  # fmt: skip
        if not args.dry_run:
            write_section(f"profiles-autotune-{args.budget}", "\n".join(body))
        print("\n".join(body))
        return
    search_s = time.perf_counter() - t
    ratio = float(args.budget.rstrip("x"))
    p16 = predict(bitplan.uniform_plan(model, "bf16"), index, graph, batch=1, context=args.context).decode_ms
    rows = []
    for f in sorted((run / "front").glob("plan-*.json")):
        plan = bitplan.Plan.load(f)
        timed = (plan.metadata or {}).get("measured_latency")
        if not (plan.metadata or {}).get("feasible") or timed is None:
            continue
        m = measure_paired(f, args)
        pred = predict(plan, index, graph, batch=1, context=args.context).decode_ms / p16
        rows.append((f.name, plan.summary(), pred, timed, m))
        print(
            f"{f.name}: search {timed['ratio']:.3f}x, fresh process {m['ratio']:.3f}x (budget {args.budget})",
            flush=True,
        )
    timing = res.summary.get("latency_timing") or {}
    handed = [r for r in rows if r[3]["meets_budget"]]
    again = [r for r in handed if r[4]["ratio"] <= ratio]
    best = bitplan.Plan.load(res.best_plan) if res.best_plan else None
    best_file = (best.metadata or {}).get("front_file", "") if best else ""
    best_row = next((r for r in rows if best_file.endswith(r[0])), None)
    body = [
        f"## Profiles: a latency-budgeted search (`--max-latency {args.budget}`) timed on this CPU",
        "",
        stamp().rstrip(),
        f"- {args.threads} threads, {_omp()}; model dtype {args.dtype}; profile `{_hw_path(args).name}`",
        f"- search: decoder weights and the head (w8c, w4g64a, w4g32a, w3g64a; head scored by measured KL), Fisher scores at {args.calib_tokens} calibration tokens, "
        f"{args.trials} trials, latency objective and budget from the profile at context {args.context}; then latency "
        f"verification: front plans in proxy order timed next to the 16-bit model ({args.rounds} interleaved rounds x "
        f"{args.latency_tokens} tokens from a pre-filled {args.context}-token context, median per-round ratio, within the "
        f"budget less the default {cfg.latency_margin:.0%} margin) until "
        f"{args.verify_top} met the budget: {len(timing.get('timed', []))} timed, {len(timing.get('passing', []))} met it; "
        f"{search_s:.0f} s in all",
        "- re-measured: each timed plan again in a fresh process (load, apply with the profile's kernels, the same "
        "paired timing against a freshly loaded 16-bit model)",
        f"- picked (`best.json`): {best_file or 'none'} "
        + (
            f"(search {best_row[3]['ratio']:.3f}x, fresh process {best_row[4]['ratio']:.3f}x)"
            if best_row
            else ""
        ),
        f"- **of the {len(handed)} plans the search handed back as within the budget, {len(again)} are within it again in "
        f"fresh processes**; timed plans that missed it: {len(rows) - len(handed)}",
        "",
        "| front plan | avg weight bits | predicted ratio | search: timed ratio | handed back | fresh process: ratio | ms/token (16-bit) | within budget again |",
        "|---|---:|---:|---:|---|---:|---:|---|",
    ]
    for name, sm, pr, timed, m in rows:
        body.append(
            f"| {name} | {sm.avg_weight_bits:.2f} | {pr:.3f} | {timed['ratio']:.3f} | {'yes' if timed['meets_budget'] else 'no'} | "
            f"{m['ratio']:.3f} | {m['ms']:.2f} ({m['ms_16bit']:.2f}) | {'yes' if m['ratio'] <= ratio else 'NO'} |"
        )
    if not args.dry_run:
        write_section(f"profiles-autotune-{args.budget}", "\n".join(body))
    print("\n".join(body))


def _save(plan: bitplan.Plan, path: Path) -> Path:
    plan.save(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="predict,autotune")
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32", help="model dtype (float32 on CPUs without native bf16)")
    ap.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[32, 160])
    ap.add_argument("--plans", type=int, default=10)
    ap.add_argument(
        "--budget-s", type=float, default=0.25, help="profile-hw: seconds of timed passes per kernel"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", default="0.6x")
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--verify-top", type=int, default=4)
    ap.add_argument("--calib", default=str(SHARED / "data" / "wikitext-2-valid-unk.txt"))
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument(
        "--dry-run", action="store_true", help="print the sections, do not write bench/RESULTS.md"
    )
    ap.add_argument(
        "--context", type=int, default=128, help="autotune: the search's context and the timing context"
    )
    ap.add_argument("--rounds", type=int, default=5, help="autotune: paired timing rounds")
    ap.add_argument("--latency-tokens", type=int, default=32, help="autotune: tokens per model per round")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--paired-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--static-kernels", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.model = args.model or default_model()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    if args.paired_worker:
        print(json.dumps(paired_worker(args.paired_worker, args)))
        return
    torch.set_num_threads(args.threads)
    OUT.mkdir(exist_ok=True)
    model = bitplan.load_model(args.model, dtype=bitplan.loading.parse_dtype(args.dtype))
    for name in args.parts.split(","):
        {"predict": part_predict, "autotune": part_autotune, "omp": part_omp, "head": part_head}[name](model, args)


if __name__ == "__main__":
    main()
