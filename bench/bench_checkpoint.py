"""Quantized checkpoints on the main model: bytes on disk vs the plan's, save / load time, bit-identical reload.

    .venv/bin/python bench/bench_checkpoint.py [--plans w4g64a,w4g32ad8,w8c] [--dtype bfloat16]

For each uniform plan: load the model, apply the plan on the reference kernel, ``bitplan.save`` (kernel map
``auto``), re-lay the in-memory model for those kernels, then ``bitplan.load`` the directory and compare the
two models' logits on one 512-token window of the test text (``torch.equal``) and their perplexity over
``--max-tokens`` test tokens. The 16-bit checkpoint's ``from_pretrained`` load time is measured in the same
run for comparison. Packed bytes are read back from the safetensors file; the plan's are ``unit_weight_bytes``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import stamp, write_section  # noqa: E402
from bench_core import SHARED, default_model  # noqa: E402

import bitplan  # noqa: E402
from bitplan.apply import kernel_counts  # noqa: E402
from bitplan.eval import load_tokens  # noqa: E402

_PACKED = ("codes", "scales", "offsets", "qparams", "superscales")


def _packed_bytes(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            if name.rsplit(".", 1)[-1] in _PACKED:
                t = f.get_slice(name)
                shape, dtype = t.get_shape(), t.get_dtype()
                n = 1
                for d in shape:
                    n *= d
                total += n * (2 if dtype in ("F16", "BF16") else 1)
    return total


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default=str(SHARED / "data" / "wikitext-2-raw-test.txt"))
    ap.add_argument("--plans", default="w4g64a,w4g32ad8,w8c")
    ap.add_argument("--dtype", default="float32", help="dtype the model is loaded, applied and saved in")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    args.model = args.model or default_model()
    torch.set_num_threads(args.threads)
    tok = bitplan.load_tokenizer(args.model)
    tokens = load_tokens(tok, args.data, args.max_tokens)
    window = tokens[:512].unsqueeze(0)
    t = time.perf_counter()
    bitplan.load_model(args.model, dtype=args.dtype)
    fp_load = time.perf_counter() - t
    src_bytes = sum(p.stat().st_size for p in Path(args.model).glob("*.safetensors")) if Path(args.model).is_dir() else 0
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bitplan-ckpt-"))
    try:
        for fmt in args.plans.split(","):
            model = bitplan.load_model(args.model, dtype=args.dtype)
            plan = bitplan.uniform_plan(model, fmt, name_or_path=args.model)
            bitplan.apply_plan(model, plan, kernels="reference")
            out = work / fmt
            t = time.perf_counter()
            chosen = bitplan.save(model, out, kernels="auto", tokenizer=tok)
            save_s = time.perf_counter() - t
            bitplan.set_kernels(model, chosen)
            t = time.perf_counter()
            loaded = bitplan.load(out)
            load_s = time.perf_counter() - t
            with torch.no_grad():
                same = torch.equal(model(window).logits, loaded(window).logits)
            r1 = bitplan.evaluate(model, tokens=tokens, window=512, progress=False)
            r2 = bitplan.evaluate(loaded, tokens=tokens, window=512, progress=False)
            packed = _packed_bytes(out)
            planned = plan.summary().unit_weight_bytes
            kernels = ", ".join(f"{k} x{n}" for k, n in sorted(kernel_counts(loaded).items()))
            rows.append((fmt, planned, packed, _dir_bytes(out), save_s, load_s, same, r1.ppl, r2.ppl, kernels))
            print(f"{fmt}: packed {packed} / plan {planned} B, dir {_dir_bytes(out) / 1e6:.1f} MB, save {save_s:.1f} s, "
                  f"load {load_s:.1f} s, logits equal {same}, ppl {r1.ppl:.4f} / {r2.ppl:.4f}", flush=True)  # fmt: skip
            del model, loaded
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"## Quantized checkpoints: save / load on {Path(args.model).name}",
        "",
        stamp().rstrip(),
        f"- model loaded, applied and saved in {args.dtype}; the 16-bit source checkpoint ({src_bytes / 1e6:.1f} MB) loads with "
        f"`from_pretrained` in {fp_load:.1f} s in the same run",
        f"- logits: one 512-token test window, `torch.equal` of the applied model (kernels re-laid after saving) and the "
        f"reloaded one; ppl over the first {len(tokens)} test tokens in 512-token windows, both models",
        "- packed MB: codes + scales + offsets (+ parameter codes and super-scales) as read from `model.safetensors`; "
        "plan MB: the plan's `unit_weight_bytes`",
        "",
        "| plan | plan MB | packed MB | dir MB | save s | load s | logits equal | ppl applied | ppl reloaded | kernels |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for fmt, planned, packed, size, save_s, load_s, same, p1, p2, kernels in rows:
        lines.append(f"| {fmt} | {planned / 1e6:.2f} | {packed / 1e6:.2f} | {size / 1e6:.1f} | {save_s:.1f} | {load_s:.1f} | "
                     f"{'yes' if same else 'NO'} | {p1:.4f} | {p2:.4f} | {kernels} |")  # fmt: skip
    write_section("checkpoint", "\n".join(lines))


if __name__ == "__main__":
    main()
