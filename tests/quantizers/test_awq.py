"""AWQ's activation-aware clipping and SmoothQuant's weight rounding: the quantizer contract (driven with
calibration inputs), and what each is for."""

from __future__ import annotations

import pytest
import torch

from bitplan.formats import parse_weight
from bitplan.quantizers import WeightQuantizer, get_weight_quantizer
from bitplan.quantizers._gptq import hessian

from .contract import WeightQuantizerContract
from .test_gptq import _correlated, _out_err, _WithInputs
from .test_rtn import RTN_BOUNDS
from .weights import gaussian, seed_for

# white inputs: the output error is the weight error, so AWQ's clipping behaves like rtn-mse's (measured,
# +10% over the worst of 24 draws)
AWQ_BOUNDS = {
    "w2g64": 0.445, "w3g64": 0.213, "w4g64": 0.107, "w2g64a": 0.37, "w3g64a": 0.193, "w4g64a": 0.096,
    "w4c": 0.123, "w4ca": 0.121, "nf4g64": 0.096, "w4g32ad8": 0.082, "w3g64ad6": 0.189,
}  # fmt: skip


class _AWQWithInputs(_WithInputs):
    kinds = frozenset({"int", "nf4"})


class TestAWQ(WeightQuantizerContract):
    method = "awq"
    bounds = AWQ_BOUNDS
    unsupported = ("bf16", "fp16", "fp8")

    @pytest.fixture
    def quantizer(self) -> WeightQuantizer:
        return _AWQWithInputs(get_weight_quantizer("awq"))


class TestSmoothQuant(WeightQuantizerContract):
    method = "smoothquant"
    bounds = {k: v for k, v in RTN_BOUNDS.items() if k in ("w8c", "w8ca", "w8g64a", "w4g64a", "fp8")}
    idempotent = True

    @pytest.fixture
    def quantizer(self) -> WeightQuantizer:
        return _AWQWithInputs(get_weight_quantizer("smoothquant"))


@pytest.mark.parametrize("text", ["w3g64a", "w2g64a", "w3g32", "w4c", "nf4g64"])
def test_awq_clipping_beats_rtn_and_rtn_mse_on_the_output_error(text: str) -> None:
    """Loud input channels: clipping chosen by the output error beats min-max and the weight-error search."""
    seed = seed_for(text)
    w, x = gaussian((96, 256), seed) * 0.05, _correlated(1024, 256, seed)
    fmt = parse_weight(text)
    ours = _out_err(get_weight_quantizer("awq").quantize(w, fmt, activations=x), w, x)
    rtn = _out_err(get_weight_quantizer("rtn").quantize(w, fmt), w, x)
    mse = _out_err(get_weight_quantizer("rtn-mse").quantize(w, fmt), w, x)
    assert ours < 0.97 * rtn and ours <= mse * 1.001, (text, ours, rtn, mse)


def test_quantize_hessian_equals_quantize() -> None:
    w, x = gaussian((32, 128), 3), _correlated(512, 128, 3)
    q = get_weight_quantizer("awq")
    a = q.quantize(w, parse_weight("w4g32a"), activations=x)
    b = q.quantize_hessian(w, parse_weight("w4g32a"), hessian(x))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
    with pytest.raises(ValueError, match="Hessian must be"):
        q.quantize_hessian(w, parse_weight("w4g32a"), torch.eye(64))


def test_smoothquant_rounds_like_rtn() -> None:
    w = gaussian((32, 128), 4)
    sq = get_weight_quantizer("smoothquant").quantize_hessian(w, parse_weight("w8c"), torch.eye(128))
    rtn = get_weight_quantizer("rtn").quantize(w, parse_weight("w8c"))
    assert torch.equal(sq.codes, rtn.codes) and sq.method == "smoothquant"
    with pytest.raises(ValueError, match="alpha"):
        get_weight_quantizer("smoothquant", alpha=1.5)
