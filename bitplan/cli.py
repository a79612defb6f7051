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
    plan = uniform_plan(model, args.weights, args.acts, args.kv, method=args.method, granularity=args.granularity, name_or_path=args.model)
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
    from bitplan.apply import apply_plan, held_weight_bytes
    from bitplan.eval import evaluate
    from bitplan.plan import Plan

    t0 = time.perf_counter()
    plan = Plan.load(args.plan)  # fail on a bad plan before spending time on the model
    model = _load(args)
    t_load = time.perf_counter()
    apply_plan(model, plan, progress=not args.json)
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
    }
    if args.eval:
        reference = None if args.no_kl else _load(args)
        r = evaluate(model, args.eval, max_tokens=args.max_tokens, window=args.window, reference=reference, progress=True)
        out.update(ppl=r.ppl, kl=r.kl, tokens=r.tokens)
    t_end = time.perf_counter()
    out["seconds"] = round(t_end - t0, 3)
    out["stage_seconds"] = {"load": round(t_load - t0, 3), "apply": round(t_apply - t_load, 3), "eval": round(t_end - t_apply, 3)}
    if args.json:
        _print_json(out)
    else:
        print(f"applied {args.plan}: {s}")
        print(f"held weight bytes (16-bit for unpacked tensors): {out['weight_bytes'] / 1e6:.2f} MB (plan: {s.weight_bytes / 1e6:.2f} MB)")
        if args.eval:
            kl = "n/a" if out["kl"] is None else f"{out['kl']:.4f}"
            print(f"ppl {out['ppl']:.3f}  KL {kl}  over {out['tokens']} tokens  ({out['seconds']:.1f} s)")
    return 0


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
    sp.add_argument("--weights", required=True, help="weight format, e.g. w4g64a, w8c, nf4g64, bf16")
    sp.add_argument("--acts", default="a16", help="activation format: a16 (default), a8t, a4t, afp8t")
    sp.add_argument("--kv", default="k16v16", help="KV cache format, e.g. k8v8, k4v2, k16v16 (default)")
    sp.add_argument("--method", default="rtn", help="weight quantizer method (default rtn)")
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
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_apply)
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


if __name__ == "__main__":
    sys.exit(main())
