"""The CPU kernels pass the kernel contract; layout round trips, odd widths and the choice rules they imply."""

from __future__ import annotations

import pytest
import torch

import bitplan.kernels._cpu  # noqa: F401  (registers the CPU kernels)
from bitplan.formats import parse_act, parse_weight
from bitplan.kernels import LinearSpec, choose_kernel, get_kernel, kernels_for
from bitplan.kernels._cpu_int4 import _compress, _expand, _int4_packed, code_shift
from bitplan.quantizers import QuantLinear, get_weight_quantizer

from .contract import KernelContract, random_input, random_weight

MS = (1, 5, 33)  # a decode step, a short and a longer prefill (keeps the file fast)


class TestInt4Pack(KernelContract):
    kernel = "int4pack"
    cases = ("w4g64a", "w4g32", "w4g128a", "w4g256", "w4g64a/a8t", "w4g32ad8", "w4g32ad6")
    unsupported = ("w4c", "w4g16a", "w3g64a", "w8c", "nf4g64", "bf16")
    ms = MS


class TestInt4PackWide(KernelContract):
    kernel = "int4pack-wide"
    cases = ("w2g64a", "w3g32a", "w3g64", "w2g128")
    unsupported = ("w4g64a", "w2c", "w3g16a")
    ms = MS


class TestInt4PackExpand(KernelContract):
    kernel = "int4pack-expand"
    cases = ("w2g64a", "w3g64a", "w3g32a", "w2g256", "w3g128", "w2g32a/a8t", "w3g64ad6")
    unsupported = ("w4g64a", "w2c", "w3g16a", "nf4g64")
    ms = MS


class TestInt8Pack(KernelContract):
    kernel = "int8pack"
    cases = ("w8c", "w8ca", "w8c/a8t")
    unsupported = ("w8g64a", "w4c", "fp8", "bf16")
    ms = MS


class TestInt8Planes(KernelContract):
    kernel = "int8-planes"
    cases = ("w8g64a", "w8g32", "w8g128a", "w6g64a", "w5g256", "w8g32ad8")
    unsupported = ("w8c", "w4g64a", "w8g16a", "nf4g64")
    ms = MS


class TestInt8IntMM(KernelContract):
    kernel = "int8-intmm"
    cases = ("w8c/a8t", "w8ca/a8t", "w8c/a4t")
    unsupported = ("w8c", "w8c/afp8t", "w8g64a/a8t", "w4c/a8t")
    ms = MS


class TestDenseBF16(KernelContract):
    kernel = "dense-bf16"
    cases = ("bf16", "fp16", "bf16/a8t")
    unsupported = ("w8c", "fp8")
    ms = MS


class TestNF4Lut(KernelContract):
    kernel = "nf4-lut"
    cases = ("nf4g64", "nf4g32", "nf4c", "nf4g64/a8t", "nf4g64d8")
    unsupported = ("w4g64a", "fp8")
    ms = MS


class TestFP8Lut(KernelContract):
    kernel = "fp8-lut"
    cases = ("fp8", "fp8/afp8t")
    unsupported = ("w8c", "nf4c")
    ms = MS


# -- layouts and edges ------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3])
def test_compact_planes_round_trip(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (128, 512), generator=torch.Generator().manual_seed(bits))
    words = _int4_packed(codes, 128).view(torch.int64).flatten()
    planes = _compress(words, bits)
    assert sum(p.numel() * 8 for p in planes) == 128 * 512 * bits // 8
    shifted = _int4_packed(codes + code_shift(bits), 128).view(torch.int64).flatten()  # centred on 8
    assert torch.equal(_expand(planes, torch.empty_like(words)), shifted)


@pytest.mark.parametrize(
    ("kernel", "case"),
    [("int4pack-expand", "w2g64a"), ("int4pack-expand", "w3g32"), ("nf4-lut", "nf4g64"), ("fp8-lut", "fp8")],
)
def test_row_chunks(monkeypatch: pytest.MonkeyPatch, kernel: str, case: str) -> None:
    """Small chunks: several row chunks, a ragged last one, padded rows (200 is not a multiple of 16 or 64)."""
    from bitplan.kernels import _cpu_int4, _cpu_lut

    monkeypatch.setattr(_cpu_int4, "CHUNK_BYTES", 64 * 512 // 2)  # 64 rows of 512 inputs a chunk
    monkeypatch.setattr(_cpu_lut, "CHUNK_BYTES", 48 * 512 * 2)  # 48 rows
    k, fmt = get_kernel(kernel), parse_weight(case)
    g = torch.Generator().manual_seed(3)
    qw = get_weight_quantizer("rtn").quantize(random_weight((200, 512), g), fmt)
    spec = LinearSpec(fmt, parse_act("a16"), 200, 512)
    prepared = k.prepare(qw, spec)
    assert len(prepared.meta.get("chunks", ())) in (0, 4) and prepared.nbytes == k.resident_nbytes(spec)
    x = random_input(3, 512, g)
    ref = x.double() @ qw.dequantize(torch.float64).T
    assert ((k.matmul(x, prepared).double() - ref).norm() / ref.norm()).item() < 1.2e-2


def test_odd_row_counts_are_padded_and_declared() -> None:
    """torch's int4 op wants out % 16 == 0: padding rows count in the resident bytes, outputs are trimmed."""
    spec = LinearSpec(parse_weight("w4g64a"), parse_act("a16"), 40, 256)
    k = get_kernel("int4pack")
    plan_bytes = spec.weight.storage_bits(40, 256) // 8
    assert k.resident_nbytes(spec) == plan_bytes * 48 // 40


@pytest.mark.parametrize("in_features", [48, 80, 96, 160])
def test_int8pack_widths(in_features: int) -> None:
    """_weight_int8pack_mm is right for any in % 16 == 0 (72 or 100 give garbage), and refused otherwise."""
    k = get_kernel("int8pack")
    fmt, act = parse_weight("w8c"), parse_act("a16")
    assert not k.supports(fmt, torch.device("cpu"), (32, in_features + 8), act)
    g = torch.Generator().manual_seed(in_features)
    qw = get_weight_quantizer("rtn").quantize(random_weight((32, in_features), g), fmt)
    spec = LinearSpec(fmt, act, 32, in_features)
    x = random_input(3, in_features, g)
    ref = x.double() @ qw.dequantize(torch.float64).T
    got = k.matmul(x, k.prepare(qw, spec))
    assert ((got.double() - ref).norm() / ref.norm()).item() < 1.2e-2


def test_int8_intmm_matches_fake_quantized_reference_exactly_enough() -> None:
    """Same per-token quantization as fake_quantize_act, exact int32 sums: fp32-level agreement."""
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(512, 96, bias=True)
    with torch.no_grad():
        lin.weight.copy_(random_weight((96, 512), g))
    ref = QuantLinear.from_float(lin, "w8c", "a8t")
    fast = QuantLinear.from_float(lin, "w8c", "a8t").set_kernel("int8-intmm")
    x = random_input(7, 512, g)
    with torch.no_grad():
        want, got = ref(x), fast(x)
    assert ((got - want).norm() / want.norm()).item() < 1e-4


def test_lut_tables_are_exact() -> None:
    from bitplan.kernels._cpu_lut import _table
    from bitplan.quantizers._codebooks import NF4_LEVELS, fp8_decode

    nf4 = _table("nf4")
    codes = torch.tensor([0x3210, 0xFEDC, 0x7F80], dtype=torch.int64)
    got = nf4[codes].view(torch.bfloat16).float().view(-1, 4)
    levels = torch.tensor(NF4_LEVELS).to(torch.bfloat16).float()
    want = levels[torch.tensor([[0, 1, 2, 3], [12, 13, 14, 15], [0, 8, 15, 7]])]
    assert torch.equal(got, want)
    fp8 = _table("fp8").view(torch.bfloat16).float().view(65536, 2)
    b = torch.arange(256, dtype=torch.uint8)
    finite = (b & 0x7F) != 0x7F
    assert torch.equal(fp8[b.long() | (3 << 8), 0][finite], fp8_decode(b)[finite])
    assert torch.equal(fp8[3 | (b.long() << 8), 1][finite], fp8_decode(b)[finite])


# -- the choice rules -----------------------------------------------------------------------------
def _spec(fmt: str, act: str = "a16", shape: tuple[int, int] = (1536, 576)) -> LinearSpec:
    return LinearSpec(parse_weight(fmt), parse_act(act), *shape)


@pytest.mark.parametrize(
    ("fmt", "auto", "fastest"),
    [
        ("w4g64a", "int4pack", "int4pack"),
        ("w8c", "int8pack", "int8pack"),
        ("w2g64a", "int4pack-expand", "int4pack-wide"),
        ("w3g64a", "int4pack-expand", "int4pack-wide"),
        ("w8g64a", "int8-planes", "int8-planes"),
        ("nf4g64", "nf4-lut", "nf4-lut"),
        ("bf16", "dense-bf16", "dense-bf16"),
    ],
)
def test_choice(fmt: str, auto: str, fastest: str) -> None:
    spec = _spec(fmt)
    assert choose_kernel(spec, "cpu", "auto").name == auto
    assert choose_kernel(spec, "cpu", "fastest").name == fastest


@pytest.mark.parametrize("fmt", ["w4g64", "w3g64", "w8g64"])
def test_auto_skips_int4_kernels_for_symmetric_formats(fmt: str) -> None:
    """bf16 (scale, zero) hold 2 bytes a group more than a symmetric format's one fp16 scale."""
    spec = _spec(fmt)
    mine = {"int4pack", "int4pack-wide", "int4pack-expand", "int8-planes"}
    supported = [k for k in kernels_for(spec, "cpu") if k.name in mine]
    assert supported and not any(k.holds_plan_bytes(spec) for k in supported)
    assert choose_kernel(spec, "cpu", "auto").name not in mine
    assert choose_kernel(spec, "cpu", "fastest").name == supported[0].name


def test_every_cpu_kernel_is_before_the_reference() -> None:
    assert [k.name for k in kernels_for(_spec("w8c", "a8t"), "cpu")][-1] == "reference"
    assert {k.name for k in kernels_for(_spec("w8c", "a8t"), "cpu")} >= {"int8pack", "int8-intmm"}
