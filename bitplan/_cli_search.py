"""``bitplan search``: its arguments and its printing (the work is :func:`bitplan.search.run_pipeline`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from bitplan.errors import BitplanError


def _split(text: str | None, sep: str = ",") -> tuple[str, ...] | None:
    return None if text is None else tuple(t for t in text.split(sep) if t)


def add_search_parser(sub: Any) -> None:
    sp = sub.add_parser("search", help="sensitivity -> Optuna search under budgets -> verified Pareto front")
    g = sp.add_argument_group("model and data")
    g.add_argument("--model", required=True, help="Hugging Face model directory or hub id")
    g.add_argument("--dtype", default="float32", help="dtype to load the model in (default float32)")
    g.add_argument("--calib", required=True, metavar="FILE", help="calibration text (never the evaluation text)")
    g.add_argument("--tokens", type=int, default=16384, help="calibration tokens for the sensitivity profile (default 16384)")
    g.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    g.add_argument("--sens-method", choices=["auto", "fisher", "kl", "both"], default="auto",
                   help="sensitivity scores (default auto: Fisher weights and acts, measured KV)")  # fmt: skip
    g.add_argument("--table", metavar="PARQUET", help="use this sensitivity table instead of profiling")
    g.add_argument("--verify-data", metavar="FILE", help="held-out text to verify the front on "
                   "(default: calibration text after the profiled tokens)")  # fmt: skip
    g.add_argument("--verify-tokens", type=int, default=4096, help="verification tokens (default 4096)")
    g.add_argument("--eval", metavar="FILE", help="evaluation text: final numbers of the picked plan, never used to choose")
    g.add_argument("--eval-tokens", type=int, default=8192, help="evaluation tokens (default 8192)")
    g = sp.add_argument_group("budgets")
    g.add_argument("--max-avg-bits", help="average weight bits of the decision units, scales included (e.g. 4.5)")
    g.add_argument("--max-memory", help="weights + KV cache at --batch x --context, e.g. 60MB, 1.5GiB")
    g.add_argument("--max-kv-bits", help="average over layers of (K bits + V bits) / 2, e.g. 4")
    g.add_argument("--max-latency", help="decode ms per token (12ms) or a ratio of the 16-bit model (0.6x)")
    g.add_argument("--profile", metavar="PARQUET", help="hardware profile (bitplan profile-hw) for latency; default: a bytes-based estimate")
    g.add_argument("--allow-foreign-profile", action="store_true", help="use a profile measured on other hardware")
    g.add_argument("--batch", type=int, default=1, help="sequences decoded together (memory and latency; default 1)")
    g.add_argument("--context", type=int, default=2048, help="cached tokens per sequence (default 2048)")
    g = sp.add_argument_group("search space")
    g.add_argument("--weights", help="weight options, e.g. w8g64a,w4g64a,w4g32a,w3g64a@hqq (default: a standard set)")
    g.add_argument("--acts", help="activation options (default a8t,a4t)")
    g.add_argument("--kv", help="KV pairs: a bit set '2,4,8,16' (all K x V pairs; a suffix such as '2,3,4,8s1' applies to each) or formats 'k4v2;k8v4' (default 2,4,8,16)")
    g.add_argument("--kinds", default="weight,head,act,kv", help="what to decide: weight (decoder linears), head (lm_head, "
                   "with a tied embedding), act, kv (default all four)")
    g.add_argument("--tie-clusters", action="store_true", help="one KV decision per cluster of alike layers")
    g.add_argument("--no-prune-kv", action="store_true", help="offer dominated KV pairs too")
    g.add_argument("--score-method", choices=["fisher", "kl"], help="which weight/act scores to add (default: Fisher if present)")
    g = sp.add_argument_group("run control")
    g.add_argument("--trials", type=int, default=300, help="target finished trials of the study (a rerun continues)")
    g.add_argument("--timeout", type=float, help="seconds for the search stage")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--sampler", default="nsga2", help="nsga2 (default), nsga3, tpe, gp, random")
    g.add_argument("--workers", type=int, default=1, help="processes optimising the one study")
    g.add_argument("--storage", help="Optuna storage: a database URL (postgresql://user@host/db; default: sqlite file in the run directory), "
                   "grpc://HOST:PORT (Optuna's storage proxy) or a journal file (study.jsonl)")
    g.add_argument("--study-name", default="bitplan")
    g.add_argument("--verify-top", type=int, default=8, help="front plans to verify on the model (default 8)")
    g.add_argument("--verify-latency", choices=["auto", "on", "off"], default="auto",
                   help="time front plans' decoding on this device next to the 16-bit model; only plans that meet "
                        "the latency budget when timed are picked (default auto: when --max-latency is given)")  # fmt: skip
    g.add_argument("--latency-rounds", type=int, default=5, help="paired timing rounds per plan (default 5)")
    g.add_argument("--latency-tokens", type=int, default=32, help="tokens decoded per model per round (default 32)")
    g.add_argument("--latency-margin", type=float, default=0.03,
                   help="a timed plan must meet the latency budget less this fraction (default 0.03: timing noise)")  # fmt: skip
    g.add_argument("--pick", choices=["quality", "memory", "latency"], default="quality",
                   help="best.json: lowest measured KL (default), least memory or least latency within budgets")  # fmt: skip
    sp.add_argument("-o", "--output", required=True, metavar="RUN_DIR", help="run directory (reused: continues)")
    sp.add_argument("--json", action="store_true", help="print one JSON summary object")
    sp.set_defaults(func=cmd_search)


def cmd_search(args: argparse.Namespace) -> int:
    import optuna

    from bitplan.search import Budgets, PipelineInputs, SearchConfig, run_pipeline
    from bitplan.sensitivity import Candidates

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own bar and summary say what happens

    for flag in ("tokens", "window", "verify_tokens", "eval_tokens", "batch", "context"):
        if getattr(args, flag) < 1:
            raise BitplanError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    budgets = Budgets.parse(args.max_avg_bits, args.max_memory, args.max_kv_bits, args.max_latency)
    # a bit set ("2,4,8") or formats ("k4v2;k8v4"), expanded as the profiler does: the space filters on formats
    kv = None if args.kv is None else tuple(str(k) for k in Candidates.parse([], [], args.kv.split(";")).kv)
    config = SearchConfig(
        budgets=budgets, trials=args.trials, timeout=args.timeout, seed=args.seed, sampler=args.sampler,
        workers=args.workers, storage=args.storage, study_name=args.study_name, batch=args.batch,
        context=args.context, kinds=tuple(args.kinds.split(",")), weights=_split(args.weights), acts=_split(args.acts),
        kv=kv, prune_kv=not args.no_prune_kv, tie_clusters=args.tie_clusters, score_method=args.score_method,
        verify_k=args.verify_top, pick=args.pick, verify_latency=args.verify_latency,
        latency_rounds=args.latency_rounds, latency_tokens=args.latency_tokens, latency_margin=args.latency_margin,
    )  # fmt: skip
    inputs = PipelineInputs(
        model=args.model, calib=args.calib, tokens=args.tokens, window=args.window, sens_method=args.sens_method,
        table=args.table, verify_data=args.verify_data, verify_tokens=args.verify_tokens, eval_data=args.eval,
        eval_tokens=args.eval_tokens, dtype=args.dtype, profile=args.profile,
        allow_foreign_profile=args.allow_foreign_profile,
    )  # fmt: skip
    result = run_pipeline(inputs, config, args.output, progress=not args.json)
    s = result.summary
    if args.json:
        sys.stdout.write(json.dumps(s, default=str) + "\n")
        return 0
    print(f"{s.get('space', '')}")
    print(f"budgets: {budgets.describe()}; latency: {s.get('latency_source', '')}")
    imp = s.get("seed_improvement", {})
    print(f"trials: {s.get('trials_complete')} complete, {imp.get('feasible', 0)} feasible; front: {len(result.front)} plans")
    if imp.get("improvement") is not None:
        print(f"sampler vs seeds: front hypervolume +{imp['improvement']:.2%} over the seeds alone")
    ag = s.get("agreement") or {}
    if ag:
        print(f"verified {ag.get('n', 0)} plans; proxy vs measured order: {ag.get('discordant_fraction', float('nan')):.0%} of pairs disagree")
    timing = s.get("latency_timing") or {}
    if timing:
        print(f"timed {len(timing['timed'])} front plans at context {timing['context']}: "
              f"{len(timing['passing'])} met the latency budget when measured")  # fmt: skip
    if result.best_plan is not None:
        print(f"best ({args.pick}): {result.best_plan}  {s.get('best_metrics', '')}")
    else:
        print(f"no plan picked: {s.get('best_reason', '')}")
    if "eval" in s:
        e = s["eval"]
        print(f"eval ({e['tokens']} tokens of {e['file']}): ppl {e['ppl']:.3f} (16-bit {e['ppl_16bit']:.3f}), KL {e['kl']:.4f}")
    print(f"report: {result.run_dir / 'report.html'}")
    return 0
