"""Per-token dynamic activation fake-quantization."""

from __future__ import annotations

import pytest
import torch

from bitplan.formats import ActFormat, parse_act
from bitplan.quantizers import fake_quantize_act
from bitplan.quantizers._act import act_scales

INT_FORMATS = ["a8t", "a4t"]


def tokens(seed: int, shape: tuple[int, ...] = (3, 7, 64)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    return x * torch.logspace(-3, 3, shape[-2]).unsqueeze(-1)  # token magnitudes over six decades


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_a16_is_identity() -> None:
    x = tokens(0)
    assert fake_quantize_act(x, ActFormat()) is x


@pytest.mark.parametrize("text", INT_FORMATS)
def test_int_is_symmetric_per_token_grid(text: str) -> None:
    fmt = parse_act(text)
    x = tokens(1)
    y = fake_quantize_act(x, fmt)
    top = 2 ** (fmt.bits - 1) - 1
    s = x.abs().amax(-1, keepdim=True) / top
    assert torch.allclose(act_scales(x, fmt), s)
    q = y / s
    assert torch.allclose(q, q.round(), atol=1e-3) and q.abs().max() <= top + 1e-3
    assert ((y - x).abs() <= s / 2 * (1 + 1e-5)).all()  # nothing clips: the absmax is on the grid
    assert torch.allclose(y.abs().amax(-1), x.abs().amax(-1))


@pytest.mark.parametrize(("text", "bound"), [("a8t", 0.01), ("a4t", 0.2), ("afp8t", 0.04)])
def test_relative_error(text: str, bound: float) -> None:
    x = tokens(2, (64, 512))
    err = rel(fake_quantize_act(x, parse_act(text)), x)
    per_token = [rel(fake_quantize_act(x[i], parse_act(text)), x[i]) for i in range(0, 64, 9)]
    assert err < bound and max(per_token) < bound  # scale-free: every token equally accurate


def test_fp8_elementwise_error() -> None:
    fmt = parse_act("afp8t")
    x = tokens(3)
    y = fake_quantize_act(x, fmt)
    s = x.abs().amax(-1, keepdim=True) / 448
    assert ((y - x).abs() <= x.abs() * 2.0**-4 + s * 2.0**-10).all()  # 3 mantissa bits; subnormal step 2^-9


@pytest.mark.parametrize("text", ["a8t", "a4t", "afp8t"])
def test_tokens_are_independent(text: str) -> None:
    fmt = parse_act(text)
    x = tokens(4, (5, 32))
    y = fake_quantize_act(x, fmt)
    x2 = x.clone()
    x2[2] *= 1000
    y2 = fake_quantize_act(x2, fmt)
    assert torch.equal(y2[[0, 1, 3, 4]], y[[0, 1, 3, 4]])
    torch.testing.assert_close(fake_quantize_act(x * 4, fmt), y * 4)  # power-of-two scale equivariance


@pytest.mark.parametrize("text", ["a8t", "a4t", "afp8t"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_shape_and_zero_tokens(text: str, dtype: torch.dtype) -> None:
    x = tokens(5, (2, 4, 16)).clamp(-1e4, 1e4).to(dtype)
    x[0, 1] = 0
    y = fake_quantize_act(x, parse_act(text))
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.isfinite(y).all() and torch.equal(y[0, 1], torch.zeros(16, dtype=dtype))
