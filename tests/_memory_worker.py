"""Worker of tests/test_memory.py: the extra peak memory (``VmHWM`` - RSS before) of each streaming stage on
random llama models of two depths, in one fresh process. Prints one JSON object."""

from __future__ import annotations

import ctypes
import gc
import json
import sys
from pathlib import Path
from typing import Any

import torch

from tests._models import make_random_lm

WIDTH = {"hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8, "num_key_value_heads": 4}


def _status(key: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def _settle() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _run(stage: str, model: Any, calib: Any) -> None:
    import bitplan
    from bitplan.sensitivity import Candidates, profile
    from bitplan.sensitivity._fisher import fisher_scores

    cands = Candidates.parse(["w4g64a", "w3g64a", "w8g64a"], [], [])
    if stage == "fisher":
        profile(model, calib, cands, method="fisher", kinds=("weight",), progress=False)
    elif stage == "fisher-full":
        fisher_scores(model, calib, cands, progress=False, stream=False)
    elif stage == "kl":
        profile(model, calib, Candidates.parse(["w4g64a"], [], []), method="kl", kinds=("weight",), progress=False)
    elif stage == "apply-gptq":
        plan = bitplan.uniform_plan(model, "w4g64a", method="gptq")
        bitplan.apply_plan(model, plan, kernels="reference", calib=calib)
    else:
        raise SystemExit(f"unknown stage {stage}")


def _stage(stage: str, layers: int) -> int:
    from bitplan.sensitivity import CalibData

    model = make_random_lm("llama", num_hidden_layers=layers, **WIDTH)
    calib = CalibData(torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0)))
    _settle()
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts at the current RSS
    base = _status("VmRSS")
    _run(stage, model, calib)
    extra = _status("VmHWM") - base
    del model
    _settle()
    return extra


def main() -> None:
    torch.set_num_threads(1)
    stages, depths = sys.argv[1].split(","), [int(d) for d in sys.argv[2].split(",")]
    _stage("fisher", 1)  # warm-up: lazy imports and allocator pools are not the stages' memory
    h, i = WIDTH["hidden_size"], WIDTH["intermediate_size"]
    kv = h // WIDTH["num_attention_heads"] * WIDTH["num_key_value_heads"]
    layer_bytes = 4 * (2 * h * h + 2 * h * kv + 3 * h * i)
    out = {"layer_bytes": layer_bytes, "extra": {s: {str(d): _stage(s, d) for d in depths} for s in stages}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
