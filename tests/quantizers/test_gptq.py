"""GPTQ: the quantizer contract (with calibration inputs supplied), its payoff on correlated inputs, numerics."""

from __future__ import annotations

import pytest
import torch

from bitplan.errors import BitplanError
from bitplan.formats import WeightFormat, parse_weight
from bitplan.quantizers import QuantizedWeight, WeightQuantizer, get_weight_quantizer
from bitplan.quantizers._gptq import hessian

from .contract import WeightQuantizerContract
from .weights import gaussian, seed_for

# Relative weight RMSE bounds on Gaussian weights with white (uncorrelated) inputs, where GPTQ has nothing
# to exploit and behaves like min-max rounding with error feedback: ~10% above the worst draw measured.
GPTQ_BOUNDS = {
    "w4g32ad8": 0.09, "w3g64ad6": 0.22,
    "w2g64": 0.80, "w3g64": 0.29, "w4g64": 0.13, "w8g64": 0.0075,
    "w2g64a": 0.56, "w3g64a": 0.24, "w4g64a": 0.113, "w8g64a": 0.0066,
    "w3g32a": 0.21, "w4g128": 0.14, "w4c": 0.17, "w4ca": 0.16, "w8c": 0.0105,
}  # fmt: skip


class _WithInputs(WeightQuantizer):
    """GPTQ handed fresh white calibration inputs on every call, so the shared contract can drive it."""

    kinds = frozenset({"int"})
    needs_calibration = False

    def __init__(self, inner: WeightQuantizer) -> None:
        self.inner = inner

    def supports(self, fmt: WeightFormat) -> bool:
        return self.inner.supports(fmt)

    def quantize(
        self, weight: torch.Tensor, fmt: WeightFormat, *, activations: torch.Tensor | None = None
    ) -> QuantizedWeight:
        if weight.dim() != 2:
            return self.inner.quantize(weight, fmt, activations=torch.zeros(1, 1))
        g = torch.Generator().manual_seed(int(weight.shape[1]))
        return self.inner.quantize(
            weight, fmt, activations=torch.randn(4 * weight.shape[1], weight.shape[1], generator=g)
        )


class TestGPTQ(WeightQuantizerContract):
    method = "gptq"
    bounds = GPTQ_BOUNDS
    unsupported = ("bf16", "fp16", "nf4g64", "fp8")

    @pytest.fixture
    def quantizer(self) -> WeightQuantizer:
        return _WithInputs(get_weight_quantizer("gptq"))


def _correlated(n: int, inp: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(inp) + 2 * torch.randn(inp, inp, generator=g) / inp**0.5
    x = torch.randn(n, inp, generator=g) @ mix
    x[:, :4] *= 8.0  # a few loud channels, as LLM activations have
    return x


def _out_err(qw: QuantizedWeight, w: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ (qw.dequantize() - w).T).norm() / (x @ w.T).norm())


@pytest.mark.parametrize("text", ["w4g64a", "w3g64a", "w2g64a", "w4c", "w3g32"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_the_output_error_with_correlated_inputs(text: str, act_order: bool) -> None:
    seed = seed_for(text)
    w, x = gaussian((96, 256), seed) * 0.05, _correlated(1024, 256, seed)
    fmt = parse_weight(text)
    rtn = _out_err(get_weight_quantizer("rtn").quantize(w, fmt), w, x)
    ours = get_weight_quantizer("gptq", act_order=act_order).quantize(w, fmt, activations=x)
    assert ours.method == "gptq" and ours.nbytes == fmt.storage_bits(96, 256) // 8
    assert _out_err(ours, w, x) < 0.75 * rtn, (text, _out_err(ours, w, x), rtn)


def test_quantize_hessian_equals_quantize_and_checks_its_input() -> None:
    w, x = gaussian((32, 128), 3), _correlated(512, 128, 3)
    q = get_weight_quantizer("gptq")
    a = q.quantize(w, parse_weight("w4g32a"), activations=x)
    b = q.quantize_hessian(w, parse_weight("w4g32a"), hessian(x) * 7.0)  # any positive scale of H
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
    with pytest.raises(ValueError, match="Hessian must be"):
        q.quantize_hessian(w, parse_weight("w4g32a"), torch.eye(64))
    with pytest.raises(BitplanError, match="needs calibration"):
        q.quantize(w, parse_weight("w4g32a"))
    with pytest.raises(BitplanError, match="does not quantize from a Hessian"):
        get_weight_quantizer("rtn").quantize_hessian(w, parse_weight("w4g32a"), hessian(x))


def test_rank_deficient_inputs_and_dead_channels() -> None:
    w = gaussian((16, 128), 5)
    x = _correlated(32, 128, 5)  # fewer tokens than inputs: H is singular
    x[:, 7] = 0.0  # a channel that never fires
    qw = get_weight_quantizer("gptq").quantize(w, parse_weight("w4g32a"), activations=x)
    deq = qw.dequantize()
    assert torch.isfinite(deq).all()
    assert torch.allclose(
        deq[:, 7], torch.zeros(16), atol=float(qw.scales.float().max())
    )  # zeroed, up to the grid
    assert _out_err(qw, w, x) < _out_err(
        get_weight_quantizer("rtn").quantize(w, parse_weight("w4g32a")), w, x
    )


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="percdamp"):
        get_weight_quantizer("gptq", percdamp=0.0)
    assert "act_order=True" in repr(get_weight_quantizer("gptq", act_order=True))
