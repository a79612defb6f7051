"""rtn and rtn-mse: the contract, plus min-max's no-clipping promise and the clipping search's payoff."""

from __future__ import annotations

import pytest
import torch

from bitplan.formats import parse_weight
from bitplan.quantizers import get_weight_quantizer

from .contract import NeverWorseThanRTN, WeightQuantizerContract, rel_rmse
from .weights import gaussian, seed_for, student_t

# Relative RMSE bounds on Gaussian weights: ~10% above the worst of 36 draws (3 shapes x 12 seeds).
RTN_BOUNDS = {
    "w4g32ad6": 0.080, "w4g32ad8": 0.084, "w3g64ad6": 0.206, "nf4g64d8": 0.102,
    "w2g64": 0.72, "w3g64": 0.25, "w4g64": 0.112, "w8g64": 0.0066,
    "w2g64a": 0.50, "w3g64a": 0.21, "w4g64a": 0.098, "w8g64a": 0.0058,
    "w3g32a": 0.185, "w4g128": 0.123, "w4c": 0.15, "w4ca": 0.14, "w8c": 0.009,
    "nf4g64": 0.10, "nf4c": 0.115, "fp8": 0.029,
}  # fmt: skip
RTN_MSE_BOUNDS = {
    "w4g32ad6": 0.080, "w4g32ad8": 0.082, "w3g64ad6": 0.19, "nf4g64d8": 0.096,
    "w2g64": 0.43, "w3g64": 0.21, "w4g64": 0.104, "w8g64": 0.0066,
    "w2g64a": 0.36, "w3g64a": 0.19, "w4g64a": 0.094, "w8g64a": 0.0058,
    "w3g32a": 0.17, "w4g128": 0.11, "w4c": 0.12, "w4ca": 0.118, "w8c": 0.009,
    "nf4g64": 0.095, "nf4c": 0.106, "fp8": 0.029,
}  # fmt: skip


class TestRTN(WeightQuantizerContract):
    method = "rtn"
    bounds = RTN_BOUNDS
    idempotent = True

    @pytest.mark.parametrize("text", ["w2g8", "w4g32a", "w8g8", "w8g8a", "w3c", "nf4g8"])
    @pytest.mark.parametrize("magnitude", [1.0, 1e-4, 1e-6])
    def test_min_max_never_clips(self, text: str, magnitude: float) -> None:
        """Every weight is within half a step of its code, also for tiny groups (fp16 subnormal scales)."""
        fmt = parse_weight(text)
        w = gaussian((16, 64), seed_for(text)) * magnitude
        qw = get_weight_quantizer("rtn").quantize(w, fmt)
        g = fmt.effective_group(64)
        err = (qw.dequantize() - w).abs().reshape(16, -1, g)
        s = qw.scales.float().unsqueeze(-1)
        if fmt.kind == "int":
            assert (err <= s / 2 * (1 + 1e-4) + 1e-12).all()
        else:  # nf4: nearest level, the widest gap between NF4 levels is 0.30
            assert (err <= s * 0.16).all()


class TestRTNMSE(WeightQuantizerContract, NeverWorseThanRTN):
    method = "rtn-mse"
    bounds = RTN_MSE_BOUNDS

    @pytest.mark.parametrize("text", ["w2g64", "w3g64a", "w3c", "nf4c"])
    def test_clipping_pays_off_on_heavy_tails(self, text: str) -> None:
        fmt = parse_weight(text)
        w = student_t((64, 256), seed_for(text))
        rtn = rel_rmse(get_weight_quantizer("rtn").quantize(w, fmt), w)
        mse = rel_rmse(get_weight_quantizer("rtn-mse").quantize(w, fmt), w)
        assert mse < 0.97 * rtn

    def test_grid_options(self) -> None:
        w = gaussian((8, 64), 0)
        one = get_weight_quantizer("rtn-mse", grid=1).quantize(w, parse_weight("w3g32"))
        rtn = get_weight_quantizer("rtn").quantize(w, parse_weight("w3g32"))
        assert torch.equal(one.codes, rtn.codes) and torch.equal(one.scales, rtn.scales)
        with pytest.raises(ValueError):
            get_weight_quantizer("rtn-mse", min_ratio=0.0)
