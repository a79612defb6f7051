"""``bitplan profile-hw`` and ``bitplan predict``: arguments and printing (the work is :mod:`bitplan.profiles`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from bitplan.errors import BitplanError


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t)
    except ValueError:
        raise BitplanError(f"{flag} takes comma-separated integers, got {text!r}") from None


def add_profile_parsers(sub: Any) -> None:
    from bitplan.profiles._measure import DEFAULT_ACTS, DEFAULT_KV, DEFAULT_WEIGHTS

    sp = sub.add_parser("profile-hw", help="time every option of a model's plans on this device into a hardware profile")
    sp.add_argument("--model", required=True, help="Hugging Face model directory or hub id")
    sp.add_argument("--dtype", default="bfloat16", help="dtype the model runs in (default bfloat16)")
    sp.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    sp.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    sp.add_argument("--context", default="128,1024", help="cached tokens to time decode at, comma-separated (default 128,1024)")
    sp.add_argument("--chunk", type=int, default=256, help="prefill chunk in tokens (default 256)")
    sp.add_argument("--weights", default=",".join(DEFAULT_WEIGHTS), help="weight formats (default %(default)s)")
    sp.add_argument("--acts", default=",".join(DEFAULT_ACTS), help="activation formats (default %(default)s)")
    sp.add_argument("--kv", default=",".join(DEFAULT_KV), help="KV formats (default %(default)s)")
    sp.add_argument("--budget", type=float, default=0.4, help="seconds of timed passes per kernel (default 0.4)")
    sp.add_argument("-o", "--output", required=True, help="Parquet profile to write (resumes when interrupted)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_profile_hw)

    sp = sub.add_parser("predict", help="predicted memory and latency of a plan from a hardware profile")
    sp.add_argument("--model", required=True, help="Hugging Face model directory or hub id")
    sp.add_argument("--plan", required=True, help="plan JSON")
    sp.add_argument("--profile", required=True, help="hardware profile (bitplan profile-hw)")
    sp.add_argument("--batch", type=int, help="sequences decoded together (default: the profile's)")
    sp.add_argument("--context", type=int, help="cached tokens (default: the profile's largest)")
    sp.add_argument("--kernels", default="auto", help="kernel policy as for apply (default auto)")
    sp.add_argument("--allow-foreign-profile", action="store_true", help="use a profile measured on other hardware")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_predict)


def cmd_profile_hw(args: argparse.Namespace) -> int:
    import torch

    from bitplan.loading import load_model
    from bitplan.profiles import profile_hw

    contexts = _ints(args.context, "--context")
    if args.batch < 1 or args.chunk < 1 or not contexts or min(contexts) < 1 or args.budget <= 0:
        raise BitplanError("--batch, --chunk, --budget and every --context must be positive")
    if args.device not in ("cpu", "cuda"):
        raise BitplanError(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BitplanError("--device cuda: no CUDA device is available")
    model = load_model(args.model, dtype=args.dtype)
    t0 = time.perf_counter()
    hw = profile_hw(
        model, device=args.device, batch=args.batch, contexts=contexts, chunk=args.chunk,
        weights=args.weights.split(","), acts=args.acts.split(","), kv=args.kv.split(","), output=args.output,
        model_name=args.model, budget_s=args.budget, progress=not args.json,
    )  # fmt: skip
    out = {"profile": args.output, "rows": len(hw.rows), "device": str(hw.meta.device), "seconds": round(time.perf_counter() - t0, 3)}
    if args.json:
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        print(f"wrote {args.output}: {len(hw.rows)} rows measured on {hw.meta.device}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from bitplan.graph import build_graph
    from bitplan.loading import load_model
    from bitplan.plan import Plan
    from bitplan.profiles import load_profile, predict

    plan = Plan.load(args.plan)
    profile = load_profile(args.profile, "cpu", allow_foreign=args.allow_foreign_profile)
    graph = build_graph(load_model(args.model, dtype=profile.meta.dtype))
    p = predict(plan, profile, graph, batch=args.batch, context=args.context, kernels=args.kernels)
    if args.json:
        sys.stdout.write(json.dumps({"plan": args.plan, "profile": args.profile, **p.to_dict()}) + "\n")
    else:
        print(f"{args.plan} on {profile.meta.device}, batch {p.batch}, context {p.context}:")
        print(f"  decode {p.decode_ms:.2f} ms/token ({', '.join(f'{k} {v:.2f}' for k, v in p.breakdown.items())}); prefill of {profile.meta.chunk} tokens {p.prefill_ms:.1f} ms")
        print(f"  weights {p.weight_bytes / 1e6:.2f} MB, KV {p.kv_bytes / 1e6:.2f} MB, peak {p.peak_bytes / 1e6:.2f} MB; kernels {p.kernels}")
    return 0
