"""The ``bitplan`` command line: parse arguments, call the public API, print.

Every user error (a ``BitplanError``) becomes one line ``error: ...`` on stderr and exit code 2;
``--debug`` shows the traceback instead. With ``--json`` a command prints exactly one JSON object on
stdout; progress bars and notes go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from bitplan.errors import BitplanError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line, like every other bitplan error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _print_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=False) + "\n")


def _load(args: argparse.Namespace) -> Any:
    from bitplan.loading import load_model

    return load_model(args.model, dtype=args.dtype)


# -- commands ------------------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    from bitplan.graph import build_graph

    graph = build_graph(_load(args))
    if args.json:
        units = graph.units(args.granularity)
        _print_json(
            {
                "architecture": graph.architecture,
                "fingerprint": graph.fingerprint,
                "layers": graph.num_layers,
                "num_kv_heads": graph.num_kv_heads,
                "head_dim": graph.head_dim,
                "total_params": graph.total_params,
                "unit_params": sum(u.numel for u in units),
                "units": [{"name": u.name, "shape": [u.out_features, u.in_features], "members": [m.local for m in u.members]} for u in units],
            }
        )
    else:
        print(graph.describe(args.granularity))
    return 0


def cmd_plan_uniform(args: argparse.Namespace) -> int:
    from bitplan.plan import uniform_plan

    model = _load(args)
    plan = uniform_plan(
        model, args.weights, args.acts, args.kv, method=args.method, granularity=args.granularity,
        name_or_path=args.model, head=args.head,
    )  # fmt: skip
    plan.save(args.output)
    s = plan.summary()
    if args.json:
        _print_json({"plan": str(args.output), **s.to_dict()})
    else:
        print(f"wrote {args.output}: {s}")
    return 0


def cmd_plan_show(args: argparse.Namespace) -> int:
    from bitplan.plan import Plan

    plan = Plan.load(args.plan)
    s = plan.summary()
    if args.json:
        _print_json({"plan": str(args.plan), "model": plan.model.name_or_path, **s.to_dict()})
        return 0
    print(f"{args.plan}: {plan.model.architecture} '{plan.model.name_or_path}' ({plan.granularity} units)")
    print(s)
    for layer in plan.layers:
        ws = " ".join(f"{k}={c}" for k, c in layer.weights.items())
        print(f"  layer {layer.index:>3}: acts {layer.acts}  kv {layer.kv}  {ws}")
    for name, c in plan.extra.items():
        print(f"  {name}: {c}")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from bitplan.apply import apply_plan, calibrated_units, held_weight_bytes, kernel_counts
    from bitplan.eval import evaluate
    from bitplan.plan import Plan

    t0 = time.perf_counter()
    plan = Plan.load(args.plan)  # fail on a bad plan before spending time on the model
    latency = None
    if args.profile:  # choose each unit's kernel by measured latency
        from bitplan.profiles import ProfileIndex, load_profile

        latency = ProfileIndex(load_profile(args.profile, "cpu", allow_foreign=args.allow_foreign_profile)).kernel_latency()
    calibrated = sorted(set(calibrated_units(plan).values()))
    if calibrated and not args.calib:
        raise BitplanError(f"the plan uses calibrated method(s) {', '.join(calibrated)}: pass --calib FILE (calibration text)")
    if calibrated and not 2 <= args.calib_window <= args.calib_tokens:
        raise BitplanError(f"--calib-tokens ({args.calib_tokens}) must hold at least one --calib-window ({args.calib_window}), and a window at least 2 tokens")
    model = _load(args)
    calib = None
    tokenizer = _tokenizer_or_none(args.model) if args.save else None
    if calibrated:
        from bitplan.loading import load_tokenizer
        from bitplan.sensitivity import load_calib

        calib = load_calib(tokenizer or load_tokenizer(args.model), args.calib, args.calib_tokens, args.calib_window)
    t_load = time.perf_counter()
    saved = None
    if args.save:  # the checkpoint holds the canonical packed bytes: quantize on the reference kernel, then re-lay
        from bitplan.checkpoint import save, set_kernels

        apply_plan(model, plan, kernels="reference", progress=not args.json, calib=calib)
        chosen = save(model, args.save, kernels=args.kernels, latency=latency, tokenizer=tokenizer)
        set_kernels(model, chosen)
        saved = str(args.save)
    else:
        apply_plan(model, plan, kernels=args.kernels, latency=latency, progress=not args.json, calib=calib)
    t_apply = time.perf_counter()
    plan = model.bitplan_plan
    s = plan.summary()
    out: dict[str, Any] = {
        "ppl": None,
        "kl": None,
        "tokens": 0,
        "weight_bytes": held_weight_bytes(model, float_bytes=2),
        "planned_weight_bytes": s.weight_bytes,
        "avg_weight_bits": round(s.avg_weight_bits, 4),
        "kv_bytes_per_token": s.kv_bytes_per_token,
        "kernels": kernel_counts(model),
        "saved": saved,
    }
    if args.eval:
        reference = None if args.no_kl else _load(args)
        r = evaluate(model, args.eval, max_tokens=args.max_tokens, window=args.window, reference=reference, progress=True)
        out.update(ppl=r.ppl, kl=r.kl, tokens=r.tokens)
    t_end = time.perf_counter()
    out["seconds"] = round(t_end - t0, 3)
    out["stage_seconds"] = {"load": round(t_load - t0, 3), "apply": round(t_apply - t_load, 3), "eval": round(t_end - t_apply, 3)}
    if calib is not None:
        out["calibration"] = {"methods": calibrated, "tokens": calib.tokens, "seconds": out["stage_seconds"]["apply"]}
    if args.json:
        _print_json(out)
    else:
        print(f"applied {args.plan}: {s}")
        print(f"held weight bytes (16-bit for unpacked tensors): {out['weight_bytes'] / 1e6:.2f} MB (plan: {s.weight_bytes / 1e6:.2f} MB)")
        print("kernels: " + ", ".join(f"{k} x{n}" for k, n in sorted(out["kernels"].items())))
        if saved:
            print(f"saved the quantized model to {saved} (load it with bitplan.load)")
        if args.eval:
            kl = "n/a" if out["kl"] is None else f"{out['kl']:.4f}"
            print(f"ppl {out['ppl']:.3f}  KL {kl}  over {out['tokens']} tokens  ({out['seconds']:.1f} s)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from bitplan.export import export
    from bitplan.plan import Plan

    plan = Plan.load(args.plan)
    result = export(plan, args.to, args.output, approximate=args.approximate, kv=not args.no_kv, target=args.target)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    files = [f"{args.output}{suffix}" for suffix in sorted(result.files)]
    if args.json:
        _print_json({"format": result.format, "files": files, "notes": list(result.notes), **result.summary})
    else:
        print(f"wrote {', '.join(files)} ({result.format}): " + ", ".join(f"{k} {v}" for k, v in result.summary.items() if k != "command"))
        if "command" in result.summary:
            print(f"then: {result.summary['command']}")
    return 0


def _tokenizer_or_none(model: str) -> Any:
    """The model's tokenizer, saved beside a checkpoint when it has one."""
    from bitplan.loading import load_tokenizer

    try:
        return load_tokenizer(model)
    except BitplanError:
        logging.getLogger("bitplan").warning("%s has no tokenizer to save with the checkpoint", model)
        return None


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from bitplan.sensitivity import Candidates, SensitivityTable, describe, load_calib, profile

    if args.action == "show":
        if not args.table:
            raise BitplanError("sensitivity show needs a table: bitplan sensitivity show sens.parquet")
        print(describe(SensitivityTable.load(args.table), top=args.top))
        return 0
    if args.action is not None:
        raise BitplanError(f"unknown sensitivity action {args.action!r}; use 'show TABLE' or options to profile")
    missing = [o for o, v in (("--model", args.model), ("--calib", args.calib), ("-o", args.output)) if not v]
    if missing:
        raise BitplanError(f"sensitivity needs {', '.join(missing)}")
    if args.tokens < 1:
        raise BitplanError(f"--tokens must be positive, got {args.tokens}")
    from bitplan.loading import load_tokenizer, parse_dtype

    candidates = Candidates.parse(
        _split(args.weights), _split(args.acts), None if args.kv is None else args.kv.split(";"), method=args.quantizer
    )
    parsed = parse_dtype(args.compute_dtype)  # "auto": bfloat16 where this device runs it natively, else float32
    compute_dtype = None if isinstance(parsed, str) else parsed
    model = _load(args)
    calib = load_calib(load_tokenizer(args.model), args.calib, args.tokens, args.window)
    t0 = time.perf_counter()
    table = profile(
        model, calib, candidates, method=args.method, kinds=args.kinds.split(","), granularity=args.granularity,
        output=args.output, batch_size=args.batch_size, dtype=compute_dtype, model_name=args.model,
        progress=not args.json,
    )  # fmt: skip
    if args.json:
        _print_json({"table": str(args.output), "rows": len(table), "tokens": table.meta.tokens, "seconds": round(time.perf_counter() - t0, 3), **table.meta.extra})
    else:
        print(describe(table, top=args.top))
        print(f"wrote {args.output} ({len(table)} rows)")
    return 0


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [t for t in text.split(",") if t]


# -- parser --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bitplan", description="Find and apply per-layer precision plans for LLMs.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def model_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", required=True, help="Hugging Face model directory or hub id")
        sp.add_argument("--dtype", default="float32", help="dtype to load the model in (default float32)")

    sp = sub.add_parser("inspect", help="show layers, decision units and parameter counts")
    model_args(sp)
    sp.add_argument("--granularity", choices=["fused", "tensor"], default="fused")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_inspect)

    plan = sub.add_parser("plan", help="make or show plans").add_subparsers(dest="plan_command", required=True, parser_class=_Parser)
    sp = plan.add_parser("uniform", help="one format everywhere")
    model_args(sp)
    sp.add_argument("--weights", required=True, help="weight format, e.g. w4g64a, w4g32ad8, w8c, nf4g64, bf16")
    sp.add_argument("--acts", default="a16", help="activation format: a16 (default), a8t, a4t, afp8t")
    sp.add_argument("--kv", default="k16v16", help="KV cache format, e.g. k8v8, k4v2, k16v16 (default)")
    sp.add_argument("--method", default="rtn", help="weight quantizer: rtn (default), rtn-mse, hqq, or calibrated gptq, awq, smoothquant (apply them with --calib)")
    sp.add_argument("--head", help="also quantize lm_head (and a tied embedding) to this format (default: 16-bit)")
    sp.add_argument("--granularity", choices=["fused", "tensor"], default="fused")
    sp.add_argument("-o", "--output", required=True, help="plan JSON to write")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_plan_uniform)
    sp = plan.add_parser("show", help="summarise a plan file")
    sp.add_argument("plan")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_plan_show)

    sp = sub.add_parser("apply", help="apply a plan and optionally evaluate it")
    model_args(sp)
    sp.add_argument("--plan", required=True)
    sp.add_argument("--eval", metavar="FILE", help="text file to measure perplexity (and KL) on")
    sp.add_argument("--max-tokens", type=int, default=32768, help="tokens of --eval to use (default 32768)")
    sp.add_argument("--window", type=int, default=512, help="tokens per scored window (default 512)")
    sp.add_argument("--no-kl", action="store_true", help="skip KL against the unquantized model (saves a second model)")
    sp.add_argument("--calib", metavar="FILE", help="calibration text for calibrated methods (gptq, awq, smoothquant); never the --eval text")
    sp.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens (default 16384)")
    sp.add_argument("--calib-window", type=int, default=2048, help="tokens per calibration window (default 2048)")
    sp.add_argument("--kernels", default="auto", metavar="POLICY",
                    help="auto (fastest kernel holding the plan's bytes, default), fastest, reference, or a kernel name")
    sp.add_argument("--profile", metavar="PARQUET", help="hardware profile: rank kernels by its measured latency")
    sp.add_argument("--allow-foreign-profile", action="store_true", help="use a profile measured on other hardware")
    sp.add_argument("--save", metavar="DIR", help="write the quantized model (packed safetensors + config + plan + tokenizer) to DIR; "
                    "bitplan.load(DIR) reloads it with the same kernels")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_apply)

    sp = sub.add_parser("sensitivity", help="profile every unit's sensitivity (or: sensitivity show TABLE)")
    sp.add_argument("action", nargs="?", help="'show' to print a table's most and least sensitive units")
    sp.add_argument("table", nargs="?", help="table to show")
    sp.add_argument("--model", help="Hugging Face model directory or hub id")
    sp.add_argument("--dtype", default="float32", help="dtype to load the model in (default float32)")
    sp.add_argument("--calib", metavar="FILE", help="calibration text (never the evaluation text)")
    sp.add_argument("--tokens", type=int, default=16384, help="calibration tokens (default 16384)")
    sp.add_argument("--window", type=int, default=512, help="tokens per calibration window (default 512; KV needs long ones)")
    sp.add_argument("--method", choices=["auto", "fisher", "kl", "both"], default="auto",
                    help="auto (default): Fisher for weights and acts, measured KL for KV pairs; kl: measure everything "
                         "(hours on a CPU); both: Fisher and KL rows for weights and acts")
    sp.add_argument("--kinds", default="weight,head,act,kv", help="what to score: weight, head (lm_head, measured), act, kv "
                    "(default all four)")
    sp.add_argument("--weights", help="comma-separated weight options, e.g. w4g64a,w3g64a@hqq (default: a standard set)")
    sp.add_argument("--acts", help="comma-separated activation formats (default a8t,a4t)")
    sp.add_argument("--kv", help="KV pairs: bit set '2,4,8,16' (all K x V pairs; a suffix such as '2,3,4,8s1' applies to each) or formats 'k4v2;k8v4' (default 2,4,8,16)")
    sp.add_argument("--quantizer", default="rtn", help="weight quantizer for options without @method (default rtn)")
    sp.add_argument("--granularity", choices=["fused", "tensor"], default="fused")
    sp.add_argument("--batch-size", type=int, default=4)
    sp.add_argument("--compute-dtype", default="auto", help="dtype of the scoring passes: auto (default: bfloat16 where native -- CUDA, AMX or AVX-512 BF16 CPUs -- else float32), bfloat16, float32 (exact)")
    sp.add_argument("--top", type=int, default=10, help="units to list per kind in the summary")
    sp.add_argument("-o", "--output", help="Parquet table to write (resumes / reuses when it exists)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_sensitivity)

    from bitplan.export import EXPORTERS

    sp = sub.add_parser("export", help="write a plan in a runtime's format: " + ", ".join(EXPORTERS.names()))
    sp.add_argument("--plan", required=True, help="plan JSON")
    sp.add_argument("--to", required=True, choices=EXPORTERS.names(), help="compressed-tensors (vLLM), gptqmodel (quantize_config.json), "
                    "llama.cpp (--tensor-type-file + companion JSON), kv (per-layer K/V bits, .yaml or .json)")
    sp.add_argument("-o", "--output", required=True, help="file to write (companions go beside it: OUT.json)")
    sp.add_argument("--approximate", action="store_true", help="map formats the target cannot express to the nearest it can (each noted)")
    sp.add_argument("--no-kv", action="store_true", help="leave the KV cache out where the target cannot express the plan's (noted)")
    sp.add_argument("--target", help="gptqmodel: enforce one backend's limits (marlin, torch, triton)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_export)
    from bitplan._cli_profiles import add_profile_parsers
    from bitplan._cli_search import add_search_parser

    add_search_parser(sub)
    add_profile_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="bitplan: %(message)s", level=logging.WARNING, stream=sys.stderr)
    try:
        return int(args.func(args))
    except BitplanError as e:
        if args.debug:
            raise
        msg = " ".join(str(e).split())  # one line, always
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `bitplan plan show p.json | head`: the reader left; not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
