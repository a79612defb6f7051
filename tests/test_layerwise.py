"""Layer-wise calibrated apply (GPTQ): one streaming pass, each layer calibrated on quantized predecessors."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

import bitplan
from bitplan.errors import BitplanError
from bitplan.eval import ReferenceLogProbs, evaluate
from bitplan.quantizers import QuantLinear

WINDOW = 32


def _tokens(model: Any, n: int, seed: int) -> torch.Tensor:
    return torch.randint(
        0, model.config.vocab_size, (n, WINDOW), generator=torch.Generator().manual_seed(seed)
    )


def _kl(model: Any, q: Any, tokens: torch.Tensor) -> float:
    flat = tokens.reshape(-1)
    ref = ReferenceLogProbs(model, flat, WINDOW, progress=False)
    return float(
        evaluate(q, tokens=flat, max_tokens=flat.numel(), window=WINDOW, reference=ref, progress=False).kl
        or 0.0
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gptq_plan_beats_rtn_on_held_out_tokens(arch: str, make_random_lm: Callable[..., Any]) -> None:
    model = make_random_lm(arch)
    calib, held_out = _tokens(model, 8, 0), _tokens(model, 4, 1)
    rtn = bitplan.apply_plan(copy.deepcopy(model), bitplan.uniform_plan(model, "w2g32a"), kernels="reference")
    gptq_plan = bitplan.uniform_plan(model, "w2g32a", method="gptq")
    gptq = bitplan.apply_plan(copy.deepcopy(model), gptq_plan, kernels="reference", calib=calib)
    mods = [m for m in gptq.modules() if isinstance(m, QuantLinear)]
    assert mods and all(m.method == "gptq" for m in mods)
    ours, rtn_kl = _kl(model, gptq, held_out), _kl(model, rtn, held_out)
    assert ours < 0.95 * rtn_kl, (ours, rtn_kl)  # random-init inputs are nearly white: a modest gain here


def test_mixed_plan_rtn_units_match_the_plain_path(make_random_lm: Callable[..., Any]) -> None:
    """Units of other methods are quantized from their own weights, exactly as without calibration."""
    model = make_random_lm("llama")
    plan = bitplan.uniform_plan(model, "w4g32a")
    first = plan.layers[0]
    unit = next(iter(first.weights))
    gptq_layer = type(first)(first.index, {**first.weights, unit: type(first.weights[unit])(first.weights[unit].format, "gptq")},
                             first.acts, first.kv)  # fmt: skip
    mixed = plan.__class__(
        plan.model, (gptq_layer, *plan.layers[1:]), plan.shapes, plan.granularity, plan.extra, plan.metadata
    )
    a = bitplan.apply_plan(copy.deepcopy(model), mixed, kernels="reference", calib=_tokens(model, 2, 0))
    b = bitplan.apply_plan(copy.deepcopy(model), plan, kernels="reference")
    qa = {n: m for n, m in a.named_modules() if isinstance(m, QuantLinear)}
    qb = {n: m for n, m in b.named_modules() if isinstance(m, QuantLinear)}
    assert qa.keys() == qb.keys()
    gptq_names = [n for n, m in qa.items() if m.method == "gptq"]
    assert gptq_names and all(n.startswith("model.layers.0.") for n in gptq_names)
    for n in qa:
        if n not in gptq_names:
            assert torch.equal(qa[n].codes, qb[n].codes) and torch.equal(qa[n].scales, qb[n].scales), n


def test_calibrated_methods_need_calibration_data(make_random_lm: Callable[..., Any]) -> None:
    model = make_random_lm("llama")
    with pytest.raises(BitplanError, match="needs calibration data"):
        bitplan.apply_plan(copy.deepcopy(model), bitplan.uniform_plan(model, "w4g32a", method="gptq"))
    with pytest.raises(BitplanError, match="lm_head: calibrated methods"):
        bitplan.apply_plan(copy.deepcopy(model), bitplan.uniform_plan(model, "w4g32a", head="w4g32a", method="gptq"),
                           calib=_tokens(model, 2, 0))  # fmt: skip
