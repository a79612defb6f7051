"""The Triton decode-attention kernel over a MixedKVLayer against the fp32 reference (TRITON_INTERPRET on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bitplan.formats import KVFormat
from bitplan.kernels.attention import decode_attention, reference_decode_attention
from bitplan.kvcache import MixedKVLayer

BITS = [(2, 2), (4, 2), (2, 4), (4, 4), (8, 4), (8, 8), (16, 4), (4, 16), (16, 16), (3, 3), (3, 8)]
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}  # relative L2 error vs fp32 reference


@pytest.fixture(autouse=True)
def _interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton's CPU interpreter, for these tests only (triton.jit reads it when the kernel module is first
    imported, which bitplan does lazily inside the first call; leaking it would let other tests pick Triton)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def triton_mod():
    return pytest.importorskip("triton", reason="the Triton decode-attention kernel needs triton installed")


def _seed() -> int:
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    return seed


def _layer(
    fmt: KVFormat, b: int, hkv: int, d: int, prefill: int, steps: int, dtype=torch.float32
) -> MixedKVLayer:
    """A layer filled KIVI-style: one prefill chunk, then ``steps`` single-token decode updates."""
    layer = MixedKVLayer(fmt)
    layer.update(torch.randn(b, hkv, prefill, d, dtype=dtype), torch.randn(b, hkv, prefill, d, dtype=dtype))
    for _ in range(steps):
        layer.update(torch.randn(b, hkv, 1, d, dtype=dtype), torch.randn(b, hkv, 1, d, dtype=dtype))
    return layer


def _compare(q: torch.Tensor, layer, seed: int, *, num_splits=None, scale=None) -> None:
    out = torch.full_like(q, float("nan"))
    res = decode_attention(q, layer, scale, kernel="triton", num_splits=num_splits, out=out)
    ref = reference_decode_attention(q, layer, scale)
    what = f"seed={seed} fmt={getattr(layer, 'fmt', None)} q={tuple(q.shape)} {q.dtype} splits={num_splits}"
    assert res.data_ptr() == out.data_ptr(), what
    assert torch.isfinite(res).all(), f"non-finite output ({what})"
    err = ((res.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err <= TOL[q.dtype], f"relative error {err:.3g} > {TOL[q.dtype]} ({what})"


@pytest.mark.parametrize("recent", [0, 16])
@pytest.mark.parametrize(("k_bits", "v_bits"), BITS)
def test_kernel_matches_reference(triton_mod, k_bits: int, v_bits: int, recent: int) -> None:
    seed = _seed()
    fmt = KVFormat(k_bits=k_bits, v_bits=v_bits, group_size=32, recent=recent)
    layer = _layer(fmt, b=2, hkv=2, d=64, prefill=150 + recent, steps=7)
    # a per-token-only format with recent=0 flushes everything: no residual then
    assert layer.stored_tokens > 0 and (layer.residual_tokens > 0 or recent == 0)
    q = torch.randn(2, 4, 1, 64)
    for splits in (1, 3):  # single pass, and split-K (boundaries inside storage and the residual) + reduction
        _compare(q, layer, seed, num_splits=splits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(triton_mod, dtype: torch.dtype) -> None:
    seed = _seed()
    layer = _layer(
        KVFormat(k_bits=4, v_bits=2, recent=16), b=2, hkv=2, d=64, prefill=170, steps=3, dtype=dtype
    )
    q = torch.randn(2, 4, 1, 64, dtype=dtype)
    _compare(q, layer, seed, num_splits=2)


@pytest.mark.parametrize(
    ("hkv", "hq", "d", "fmt"),
    [
        (2, 2, 32, "k2v4g32"),  # MHA
        (2, 6, 96, "k3v4g32r8"),  # GQA 3 (padded head block), head_dim not a power of two
        (1, 8, 40, "k4v3g8"),  # GQA 8, per-token group 8 of a 40-wide head
        (2, 4, 64, "k4tv4cg32"),  # axes swapped: K per token, V per channel
        (2, 4, 64, "k2v2g128r16"),  # per-channel group larger than a token block
        (2, 4, 64, "k3v3g32s4"),  # 4 sink tokens ahead of the residual in the 16-bit buffer
    ],
)
def test_shapes_and_layouts(triton_mod, hkv: int, hq: int, d: int, fmt: str) -> None:
    seed = _seed()
    layer = _layer(KVFormat.parse(fmt), b=2, hkv=hkv, d=d, prefill=260, steps=5)
    q = torch.randn(2, hq, 1, d)
    _compare(q, layer, seed, num_splits=None)
    _compare(q, layer, seed, num_splits=4, scale=0.3)


def test_reference_reads_sinks_like_the_sequence_order_cache() -> None:
    """The 16-bit buffer holds the sinks ahead of the residual, so the layer's bytes are in the order
    [packed, sinks, residual]; attention must equal attention over what ``update`` returns in sequence order."""
    layer = MixedKVLayer(KVFormat.parse("k3v2g8s2"))
    layer.update(torch.randn(1, 2, 37, 16), torch.randn(1, 2, 37, 16))
    k, v = layer.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
    assert layer.stored_tokens == 32 and layer.residual_tokens == 2 + 4
    q = torch.randn(1, 4, 1, 16)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    want = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
    torch.testing.assert_close(reference_decode_attention(q, layer), want, rtol=1e-5, atol=1e-5)


def test_residual_only_and_dynamic_layer(triton_mod) -> None:
    from transformers.cache_utils import DynamicLayer

    seed = _seed()
    layer = _layer(KVFormat(k_bits=4, v_bits=4, group_size=32), b=1, hkv=2, d=32, prefill=20, steps=3)
    assert layer.stored_tokens == 0  # fewer tokens than one per-channel group: all in the residual
    q = torch.randn(1, 4, 1, 32)
    _compare(q, layer, seed, num_splits=1)
    dyn = DynamicLayer()
    dyn.update(torch.randn(1, 2, 75, 32), torch.randn(1, 2, 75, 32))
    _compare(q, dyn, seed, num_splits=2)


def test_reference_equals_sdpa_over_dequantized_kv() -> None:
    seed = _seed()
    layer = _layer(
        KVFormat(k_bits=3, v_bits=2, group_size=32, recent=16), b=2, hkv=2, d=64, prefill=140, steps=4
    )
    k_side, v_side, k_res, v_res = layer._parts()
    k = torch.cat([k_side.read(torch.float32), k_res], dim=-2).double()
    v = torch.cat([v_side.read(torch.float32), v_res], dim=-2).double()
    q = torch.randn(2, 4, 1, 64)
    sdpa = F.scaled_dot_product_attention(q.double(), k, v, enable_gqa=True)
    ref = reference_decode_attention(q, layer)
    assert torch.allclose(ref.double(), sdpa, atol=1e-5, rtol=1e-5), f"seed={seed}"


def test_auto_falls_back_to_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    layer = _layer(KVFormat(k_bits=4, v_bits=4), b=1, hkv=1, d=32, prefill=64, steps=1)
    q = torch.randn(1, 2, 1, 32)
    assert torch.equal(decode_attention(q, layer), reference_decode_attention(q, layer))
    with pytest.raises(RuntimeError, match="needs Triton"):
        decode_attention(q, layer, kernel="triton")


def test_bad_inputs() -> None:
    layer = _layer(KVFormat(k_bits=4, v_bits=4), b=1, hkv=2, d=32, prefill=40, steps=0)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(torch.randn(1, 3, 1, 32), layer)
    with pytest.raises(ValueError, match="decode attention takes"):
        decode_attention(torch.randn(1, 2, 2, 32), layer)
    with pytest.raises(ValueError, match="kernel must be"):
        decode_attention(torch.randn(1, 2, 1, 32), layer, kernel="fast")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="before its first update"):
        decode_attention(torch.randn(1, 2, 1, 32), MixedKVLayer("k4v4"))


def test_import_does_not_import_triton() -> None:
    """Importing never loads Triton; with Triton unimportable, ``auto`` falls back to the reference."""
    code = (
        "import os, sys, torch\n"
        "import bitplan.kernels, bitplan.kernels.attention as A, bitplan.kvcache as C\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'triton' or m.endswith('_triton_attention')]\n"
        "assert not bad, bad\n"
        "sys.modules['triton'] = None\n"  # Triton unimportable from here on
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "layer = C.MixedKVLayer('k4v2'); layer.update(torch.randn(1, 1, 40, 32), torch.randn(1, 1, 40, 32))\n"
        "q = torch.randn(1, 2, 1, 32)\n"
        "assert not A.triton_available('cpu')\n"
        "assert torch.equal(A.decode_attention(q, layer), A.reference_decode_attention(q, layer))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
