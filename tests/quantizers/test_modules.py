"""QuantLinear (nn.Linear and GPT-2 Conv1D) and QuantEmbedding against their dequantized float twins."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from bitplan.errors import FormatError
from bitplan.formats import parse_act, parse_weight
from bitplan.quantizers import QuantEmbedding, QuantLinear, fake_quantize_act, get_weight_quantizer

WEIGHT_FORMATS = ["w4g64a", "w3g32", "w2g64a", "nf4g64", "fp8", "w8c", "w4ca", "w4g32ad8", "w3g64ad6"]
ACT_FORMATS = ["a16", "a8t", "afp8t"]


@pytest.fixture
def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(128, 48)


def x_for(in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 5, in_features, generator=g).to(dtype)


@pytest.mark.parametrize("act", ACT_FORMATS)
@pytest.mark.parametrize("fmt", WEIGHT_FORMATS)
def test_forward_is_linear_on_dequantized_weight(linear: nn.Linear, fmt: str, act: str) -> None:
    method = "hqq" if fmt.startswith("w") else "rtn"
    q = QuantLinear.from_float(linear, fmt, act, method=method)
    x = x_for(128)
    qw = get_weight_quantizer(method).quantize(linear.weight, parse_weight(fmt))
    assert torch.equal(q.codes, qw.codes) and torch.equal(q.quantized_weight.scales, qw.scales)
    expected = F.linear(fake_quantize_act(x, parse_act(act)), qw.dequantize(), linear.bias)
    assert torch.equal(q(x), expected)
    assert q.packed_nbytes == parse_weight(fmt).storage_bits(48, 128) // 8 == qw.nbytes


def test_close_to_float_at_8_bits(linear: nn.Linear) -> None:
    x = x_for(128)
    ref = linear(x)
    for fmt, act, bound in [("w8c", "a16", 0.01), ("w8g64a", "a8t", 0.015), ("bf16", "a16", 0.01)]:
        err = (QuantLinear.from_float(linear, fmt, act)(x) - ref).norm() / ref.norm()
        assert err < bound, (fmt, act, err)


def test_unquantized_weight_with_quantized_activations(linear: nn.Linear) -> None:
    q = QuantLinear.from_float(linear, "bf16", "a8t")
    assert q.weight.dtype == torch.bfloat16 and q.method == "none"
    assert set(q.state_dict()) == {"weight", "bias"}
    x = x_for(128)
    expected = F.linear(
        fake_quantize_act(x, parse_act("a8t")), linear.weight.to(torch.bfloat16).float(), linear.bias
    )
    assert torch.equal(q(x), expected)
    assert q.packed_nbytes == 48 * 128 * 2
    with pytest.raises(FormatError):
        _ = q.quantized_weight


def test_conv1d_matches_linear() -> None:
    torch.manual_seed(2)
    conv = Conv1D(nf=48, nx=128)  # GPT-2 layout: weight [in, out], y = x @ W + b
    nn.init.normal_(conv.weight, std=0.02)
    nn.init.normal_(conv.bias, std=0.02)
    lin = nn.Linear(128, 48)
    lin.weight.data.copy_(conv.weight.t())
    lin.bias.data.copy_(conv.bias)
    x = x_for(128)
    for fmt, act in [("w4g64a", "a8t"), ("fp8", "a16"), ("w3c", "afp8t")]:
        qc, ql = QuantLinear.from_float(conv, fmt, act), QuantLinear.from_float(lin, fmt, act)
        assert (qc.in_features, qc.out_features) == (128, 48)
        assert torch.equal(qc.codes, ql.codes) and torch.equal(qc(x), ql(x))
    exact = QuantLinear.from_float(conv, "bf16", "a16")
    torch.testing.assert_close(exact(x), conv(x), rtol=0.02, atol=2e-3)


def test_state_dict_round_trip_into_an_empty_module(linear: nn.Linear) -> None:
    q = QuantLinear.from_float(linear, "w4g64a", "a8t", method="hqq")
    sd = q.state_dict()
    assert set(sd) == {"codes", "scales", "offsets", "bias"}
    assert (sd["codes"].dtype, sd["scales"].dtype, sd["offsets"].dtype) == (
        torch.uint8,
        torch.float16,
        torch.float16,
    )
    fresh = QuantLinear(128, 48, "w4g64a", "a8t", method="hqq")
    fresh.load_state_dict(sd)
    x = x_for(128)
    assert torch.equal(fresh(x), q(x))
    symmetric = QuantLinear(128, 48, "w4g64", bias=False)
    assert set(symmetric.state_dict()) == {"codes", "scales"} and symmetric.offsets is None


def test_dtype_casts_keep_the_stored_format(linear: nn.Linear) -> None:
    q = QuantLinear.from_float(linear, "w4g64a", "a16")
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.to(torch.bfloat16)
    assert (
        q.scales.dtype == torch.float16 and q.offsets.dtype == torch.float16 and q.codes.dtype == torch.uint8
    )
    assert torch.equal(q.scales, before["scales"]) and torch.equal(q.offsets, before["offsets"])
    assert q.bias.dtype == torch.bfloat16
    y = q(x_for(128, torch.bfloat16))
    assert y.dtype == torch.bfloat16
    ref = q.half().float()(x_for(128))
    assert ((y.float() - ref).norm() / ref.norm()) < 0.02
    f = QuantLinear.from_float(linear, "fp16", "a8t").to(torch.bfloat16)
    assert f.weight.dtype == torch.float16


def test_method_instance_and_repr(linear: nn.Linear) -> None:
    q = QuantLinear.from_float(linear, "w3g64a", "a8t", method=get_weight_quantizer("hqq", fit_scale=True))
    assert q.method == "hqq" and q.kernel == "reference"
    assert q.weight_format == parse_weight("w3g64a") and q.act_format == parse_act("a8t")
    text = repr(q)
    for part in (
        "in_features=128",
        "out_features=48",
        "weight=w3g64a",
        "method=hqq",
        "act=a8t",
        "kernel=reference",
    ):
        assert part in text


def test_from_float_errors(linear: nn.Linear) -> None:
    with pytest.raises(TypeError, match="Conv2d"):
        QuantLinear.from_float(nn.Conv2d(3, 3, 1), "w4g64")
    with pytest.raises(FormatError):
        QuantLinear.from_float(nn.Linear(100, 4), "w4g64")  # 64 does not divide 100
    with pytest.raises(FormatError, match="hqq"):
        QuantLinear.from_float(linear, "nf4g64", method="hqq")
    odd = QuantLinear.from_float(nn.Linear(172, 4), "w4c")  # a width that is not a multiple of 8
    assert odd.packed_nbytes == parse_weight("w4c").storage_bits(4, 172) // 8
    assert odd(x_for(172)).shape == (2, 5, 4)


# -- embeddings ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["w4g32a", "w2g64", "nf4g64", "fp8", "w8c", "bf16", "w4g32ad8", "nf4g32d6"])
def test_embedding_lookup_matches_dequantized_table(fmt: str) -> None:
    torch.manual_seed(3)
    emb = nn.Embedding(100, 64, padding_idx=0)
    q = QuantEmbedding.from_float(emb, fmt)
    ids = torch.tensor([[1, 5, 99], [0, 5, 42]])
    if parse_weight(fmt).is_quantized:
        table = get_weight_quantizer("rtn").quantize(emb.weight, parse_weight(fmt)).dequantize()
    else:
        table = emb.weight.detach().to(torch.bfloat16).float()
    out = q(ids)
    assert out.shape == (2, 3, 64) and out.dtype == torch.float32
    assert torch.equal(out, F.embedding(ids, table))
    assert q.packed_nbytes == parse_weight(fmt).storage_bits(100, 64) // 8
    assert q.padding_idx == 0 and "weight=" + fmt in repr(q)


def test_embedding_dtype_follows_casts_and_state_dict() -> None:
    emb = nn.Embedding(50, 32)
    q = QuantEmbedding.from_float(emb, "w4g32a", method="hqq")
    assert q.method == "hqq"
    ids = torch.arange(50)
    full = q(ids)
    assert ((full - emb.weight).norm() / emb.weight.norm()) < 0.11
    fresh = QuantEmbedding(50, 32, "w4g32a")
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(ids), full)
    q.half()
    assert q(ids).dtype == torch.float16 and q.scales.dtype == torch.float16 and q.codes.dtype == torch.uint8


def test_double_quantized_module_stores_only_codes_and_superscales(linear: nn.Linear) -> None:
    """A d8 weight keeps packed parameter codes + fp16 super-scales, never fp16 per-group scales, and a
    module built from shapes alone reloads it bit-identically."""
    q = QuantLinear.from_float(linear, "w4g32ad8", method="rtn")
    state = q.state_dict()
    assert {"codes", "qparams", "superscales"} <= set(state) and "scales" not in state and "offsets" not in state
    assert q.packed_nbytes == parse_weight("w4g32ad8").storage_bits(48, 128) // 8
    assert q.packed_nbytes < parse_weight("w4g32a").storage_bits(48, 128) // 8
    fresh = QuantLinear(128, 48, "w4g32ad8")
    fresh.load_state_dict(state)
    x = x_for(128)
    assert torch.equal(fresh(x), q(x))
    q.set_kernel("int4pack")
    assert ((q(x) - fresh(x)).norm() / fresh(x).norm()) < 1e-2  # bf16 kernel on the decoded scales
