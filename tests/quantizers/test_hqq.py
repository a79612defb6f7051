"""hqq: the contract, plus its reason to exist -- beating min-max at 2-3 bits on heavy-tailed weights."""

from __future__ import annotations

import pytest

from bitplan.formats import parse_weight
from bitplan.quantizers import get_weight_quantizer

from .contract import NeverWorseThanRTN, WeightQuantizerContract, rel_rmse
from .weights import seed_for, student_t

# Relative RMSE bounds on Gaussian weights: ~10% above the worst of 36 draws (3 shapes x 12 seeds).
HQQ_BOUNDS = {
    "w2g64": 0.42, "w3g64": 0.22, "w4g64": 0.107, "w8g64": 0.0066,
    "w2g64a": 0.47, "w3g64a": 0.20, "w4g64a": 0.094, "w8g64a": 0.0056,
    "w3g32a": 0.17, "w4g128": 0.115, "w4c": 0.14, "w4ca": 0.14, "w8c": 0.009,
}  # fmt: skip


class TestHQQ(WeightQuantizerContract, NeverWorseThanRTN):
    method = "hqq"
    bounds = HQQ_BOUNDS
    unsupported = ("bf16", "fp16", "nf4g64", "nf4c", "fp8")

    @pytest.mark.parametrize("text", ["w2g64", "w3g64", "w2g64a", "w3g64a", "w3g32a", "w3c"])
    @pytest.mark.parametrize("fit_scale", [False, True])
    def test_beats_rtn_on_heavy_tails(self, text: str, fit_scale: bool) -> None:
        fmt = parse_weight(text)
        w = student_t((64, 256), seed_for(text))
        rtn = rel_rmse(get_weight_quantizer("rtn").quantize(w, fmt), w)
        hqq = rel_rmse(get_weight_quantizer("hqq", fit_scale=fit_scale).quantize(w, fmt), w)
        assert hqq < 0.95 * rtn, (rtn, hqq)


class TestHQQFitScale(WeightQuantizerContract, NeverWorseThanRTN):
    method = "hqq"
    options = {"fit_scale": True}
    bounds = {"w2g64a": 0.36, "w3g64a": 0.19, "w4g64a": 0.092, "w4ca": 0.125, "w3g64": 0.22,
              "w4g32ad8": 0.079, "w3g64ad6": 0.188}
    unsupported = ("fp8",)
