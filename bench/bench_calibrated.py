"""Weight quantizers on the main model: RTN vs HQQ vs GPTQ at 4, 3 and 2 bits (wikitext-2 test ppl).

    .venv/bin/python bench/bench_calibrated.py [--formats w4g64a,w3g64a,w2g64a] [--methods rtn,hqq,gptq]
    .venv/bin/python bench/bench_calibrated.py --formats w4g32a,w4g32ad8,w4g32ad6 --methods rtn,hqq \
        --section double-quant          # double-quantized scales against fp16 ones

Same evaluation tokens and windows as the core table (section ``core``: the first 32768 test tokens in
512-token windows, every window scored alone) and the same reference pass for KL. Calibrated methods get
``--calib-tokens`` tokens of the *validation* file in ``--calib-window`` windows, streamed once through the
model layer by layer (``apply_plan(..., calib=...)``); their calibration time and the process's peak RSS
growth are recorded. One fresh copy of the model per row.
"""

from __future__ import annotations

import argparse
import copy
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proc import rss_bytes, trim  # noqa: E402
from _results import stamp, write_section  # noqa: E402
from bench_core import SHARED, default_model  # noqa: E402

import bitplan  # noqa: E402
from bitplan.eval import ReferenceLogProbs, load_tokens  # noqa: E402
from bitplan.sensitivity import load_calib  # noqa: E402


class _RSSPeak:
    """Polls this process's RSS in a thread: the high-water mark of one stage (``ru_maxrss`` only ever
    grows, so it cannot see a stage that stays below an earlier peak, such as the reference pass's)."""

    def __init__(self, every_s: float = 0.05) -> None:
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.every_s)

    def __enter__(self) -> _RSSPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default=str(SHARED / "data" / "wikitext-2-raw-test.txt"))
    ap.add_argument("--calib", default=str(SHARED / "data" / "wikitext-2-valid-unk.txt"))
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--calib-window", type=int, default=2048)
    ap.add_argument("--formats", default="w4g64a,w3g64a,w2g64a")
    ap.add_argument("--methods", default="rtn,hqq,gptq")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--section", default="calibrated")
    args = ap.parse_args()
    args.model = args.model or default_model()
    torch.set_num_threads(args.threads)

    base = bitplan.load_model(args.model, dtype=torch.float32)
    tok = bitplan.load_tokenizer(args.model)
    tokens = load_tokens(tok, args.data, args.max_tokens)
    calib = load_calib(tok, args.calib, args.calib_tokens, args.calib_window)
    t = time.perf_counter()
    reference = ReferenceLogProbs(base, tokens, args.window, batch_size=4)
    ref_s = time.perf_counter() - t
    base_r = bitplan.evaluate(
        base, tokens=tokens, window=args.window, reference=reference, batch_size=4, progress=False
    )
    rows = []
    for fmt in args.formats.split(","):
        for method in args.methods.split(","):
            model = copy.deepcopy(base)
            trim()
            rss0 = rss_bytes()
            t = time.perf_counter()
            plan = bitplan.uniform_plan(model, fmt, method=method, name_or_path=args.model)
            with _RSSPeak() as watch:
                bitplan.apply_plan(model, plan, kernels="reference", calib=calib)
            q_s = time.perf_counter() - t
            peak = max(0, watch.peak - rss0)
            r = bitplan.evaluate(
                model, tokens=tokens, window=args.window, reference=reference, batch_size=4, progress=False
            )
            rows.append((fmt, method, r.ppl, r.kl, plan.summary().avg_weight_bits, q_s, peak))
            print(
                f"{fmt:8s} {method:5s} ppl {r.ppl:9.3f}  KL {r.kl:.4f}  quantize {q_s:6.1f} s  peak +{peak / 1e6:.0f} MB",
                flush=True,
            )
            del model
    body = [
        f"## Weight quantizers ({', '.join(args.methods.split(','))}) at {', '.join(args.formats.split(','))} on {Path(args.model).name}",
        "",
        stamp().rstrip(),
        f"- evaluation: first {tokens.numel()} tokens of `{Path(args.data).name}`, {args.window}-token windows scored alone (as "
        f"section core); 16-bit (fp32) ppl {base_r.ppl:.3f}; reference pass {ref_s:.0f} s",
        f"- calibration (gptq, awq, smoothquant; others ignore it): {calib.tokens} tokens of `{Path(args.calib).name}` in {calib.num_windows} windows of "
        f"{calib.window}, one layer-wise pass (each layer's Hessians from the already-quantized layers' outputs); GPTQ "
        "blocks of 128 columns, 1% damping, no act-order; quantize time includes the pass",
        "- peak: the highest RSS while quantizing (polled every 50 ms) minus the RSS before, with the model copy "
        "already held: the extra memory of the method (activations, Hessians, one unit's float copy)",
        "",
        "| format | method | avg bits | ppl | vs 16-bit | KL | quantize s | peak MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for fmt, method, ppl, kl, bits, q_s, peak in rows:
        body.append(
            f"| {fmt} | {method} | {bits:.3f} | {ppl:.3f} | {100 * (ppl / base_r.ppl - 1):+.2f}% | {kl:.4f} | {q_s:.1f} | {peak / 1e6:.0f} |"
        )
    write_section(args.section, "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
