"""The Triton GEMMs (triton-wa16, triton-w8a8) under Triton's CPU interpreter (TRITON_INTERPRET=1).

The interpreter runs the same kernels as a GPU, one program at a time with numpy, so these tests check
the layouts, masks, the split-K / GEMV / GEMM paths (M = 1, 5, 17, 70 hit the four M buckets) and the
numerics; GPU speed and tensor-core rounding are not checked here. The kernels are offered on cpu only
with TRITON_INTERPRET=1 and BITPLAN_TRITON_CPU=1, which a fixture sets for these tests alone.
"""

from __future__ import annotations

import os

_SAVED_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: triton.jit picks interpreting at decoration

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

try:
    pytest.importorskip(
        "triton", reason="the Triton GEMM kernels need triton (the dev extra installs it on Linux x86-64)"
    )
    import bitplan.kernels._gpu  # noqa: F401  (registers triton-wa16 and triton-w8a8)
    from bitplan.kernels import _triton_gemm
finally:  # the interpreter stays on only inside this module's tests (see the fixture below)
    if _SAVED_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _SAVED_INTERPRET

from bitplan.formats import parse_act, parse_weight  # noqa: E402
from bitplan.kernels import LinearSpec, get_kernel, kernels_for  # noqa: E402
from bitplan.kernels._gpu import CPU_OPT_IN, pack_along_k, triton_runs_on  # noqa: E402
from bitplan.quantizers import get_weight_quantizer  # noqa: E402
from bitplan.quantizers._act import act_scales  # noqa: E402

from .contract import KernelContract  # noqa: E402


@pytest.fixture(autouse=True)
def _interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels are offered on cpu only inside these tests (both variables, see bitplan.kernels._gpu)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(CPU_OPT_IN, "1")


DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = ((32, 64), (48, 128))  # (out, in); N = 48 is not a multiple of BLOCK_N = 32
MS = (1, 5, 17, 70)  # M buckets 1 (GEMV, split-K), 2 (dot, split-K), 3 and 4 (GEMM)
# K = 96 and 160 leave a K tail in the 64-wide tile of bucket 4, put a 64-wide tile across two 32-wide
# groups, and split unevenly in split-K (160 = 96 + 64); N = 24, 16 are below BLOCK_N
TAIL_SHAPES = ((24, 96), (16, 160))
TAIL_MS = (1, 5, 70)


class TestTritonWA16(KernelContract):
    kernel = "triton-wa16"
    cases = ("w4g32a", "w4g64", "w2g32a", "w3g32a", "w3g64", "w8g32a", "w4c", "w2g32/a8t")
    unsupported = ("nf4g64", "fp8", "bf16", "w5g32", "w6g32a", "w7c")
    dtypes = DTYPES
    shapes = SHAPES
    ms = MS


class TestTritonWA16Tails(KernelContract):
    kernel = "triton-wa16"
    cases = ("w4g32a", "w3g32", "w4c", "w8c", "w2g32a/a8t")
    shapes = TAIL_SHAPES
    ms = TAIL_MS


class TestTritonW8A8(KernelContract):
    kernel = "triton-w8a8"
    cases = ("w8c/a8t", "w8g32/a8t", "w8g64/a8t")
    unsupported = (
        "w8c",
        "w8ca/a8t",
        "w8g32a/a8t",
        "w4g32/a8t",
        "w8c/a4t",
        "w8c/afp8t",
        "w8g8/a8t",
        "w8g16/a8t",
        "fp8/a8t",
    )
    dtypes = DTYPES
    shapes = SHAPES
    ms = MS


class TestTritonW8A8Tails(KernelContract):
    kernel = "triton-w8a8"
    cases = ("w8c/a8t", "w8g32/a8t")
    shapes = TAIL_SHAPES
    ms = TAIL_MS


def _spec(case: str, out_f: int, in_f: int) -> LinearSpec:
    w, _, a = case.partition("/")
    return LinearSpec(parse_weight(w), parse_act(a or "a16"), out_f, in_f)


@pytest.mark.parametrize(("case", "in_f"), [("w3g8", 48), ("w2g8", 24), ("w4g8", 20), ("w8c", 18)])
def test_refuses_widths_that_do_not_fill_words(case: str, in_f: int) -> None:
    spec = _spec(case, 16, in_f)
    assert not get_kernel("triton-wa16").supports(spec.weight, torch.device("cpu"), spec.shape, spec.act)


def test_cpu_only_under_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert triton_runs_on(cpu) and triton_runs_on(cuda)
    spec = _spec("w4g32a", 32, 64)
    for unset in (CPU_OPT_IN, "TRITON_INTERPRET"):  # each alone is not enough
        with monkeypatch.context() as m:
            m.delenv(unset)
            assert (
                not triton_runs_on(cpu) and triton_runs_on(cuda) and not triton_runs_on(torch.device("mps"))
            )
            assert not any(k.name.startswith("triton") for k in kernels_for(spec, "cpu"))


@pytest.mark.parametrize("case", ["w4g64a", "w3g32", "w2g32a", "w8g128a", "w8c/a8t", "w8g64/a8t"])
def test_holds_the_plan_bytes_and_is_preferred_on_cuda(case: str) -> None:
    spec = _spec(case, 4096, 11008)
    names = [k.name for k in kernels_for(spec, "cuda")]
    want = "triton-w8a8" if spec.act.is_quantized else "triton-wa16"
    assert want in names and names.index(want) < names.index("reference"), names
    k = get_kernel(want)
    assert k.resident_nbytes(spec) == spec.weight.storage_bits(*spec.shape) // 8 and k.holds_plan_bytes(spec)
    if spec.act.is_quantized:  # int8 before the kernel running the weight on fake-quantized inputs
        assert names.index("triton-w8a8") < names.index("triton-wa16"), names


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_along_k_layout(bits: int) -> None:
    k, n = 64, 5
    codes = torch.randint(0, 2**bits, (k, n), dtype=torch.uint8)
    words = pack_along_k(codes, bits)
    per = 32 // bits
    assert words.dtype == torch.int32 and words.shape == (k // per, n)
    kk = torch.arange(k)
    back = (words.to(torch.int64)[kk // per] >> ((kk % per) * bits)[:, None]) & (2**bits - 1)
    assert torch.equal(back.to(torch.uint8), codes)


@pytest.mark.parametrize("case", ["w3g32a", "w8c/a8t"])
def test_prepared_layout(case: str) -> None:
    spec = _spec(case, 48, 128)
    qw = get_weight_quantizer("rtn").quantize(torch.randn(48, 128), spec.weight)
    k = get_kernel("triton-w8a8" if spec.act.is_quantized else "triton-wa16")
    t = k.prepare(qw, spec).tensors
    if spec.act.is_quantized:
        assert t["qweight"].dtype == torch.int8 and t["qweight"].shape == (128, 48)
        assert torch.equal(t["qweight"].to(torch.int16) + 128, qw.int_codes().t().to(torch.int16))
    else:  # 3 bits: a 2-bit plane [K/16, N] and a 1-bit plane [K/32, N]; offsets kept as zeros
        assert t["qweight"].shape == (8, 48) and t["qweight_hi"].shape == (4, 48)
        assert qw.offsets is not None and torch.equal(t["zeros"], qw.offsets.t())
    assert torch.equal(t["scales"], qw.scales.t()) and all(v.is_contiguous() for v in t.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_act_quantization_is_fake_quantize_act_bit_for_bit(dtype: torch.dtype) -> None:
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 1100, generator=g) * torch.logspace(-3, 3, 6)[:, None]  # K spans two 1024 blocks
    x[:, ::50] *= 20
    x[1] = 0  # an all-zero token: scale 1e-12, codes 0
    x[2, :8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5])  # scale 1: ties round to even
    x[2, 8:] = torch.randn(1092, generator=g).clamp(-100, 100)
    big = torch.finfo(dtype).max  # fp16 tops out at 65504: the 1e3-scaled outlier row must stay finite
    x = x.clamp(-big, big).to(dtype)
    q, s = _triton_gemm.quantize_act(x)
    s_ref = act_scales(x, parse_act("a8t")).squeeze(-1)
    q_ref = torch.round(x.float() / s_ref[:, None]).clamp(-127, 127).to(torch.int8)
    assert torch.equal(s, s_ref), f"seed={seed}"
    assert torch.equal(q, q_ref), f"seed={seed}: {(q != q_ref).sum().item()} codes differ"


def test_importing_bitplan_does_not_import_triton() -> None:
    code = (
        "import sys, bitplan, bitplan.kernels, bitplan.kernels._gpu\n"
        "from bitplan.formats import parse_act, parse_weight\n"
        "from bitplan.kernels import LinearSpec, kernels_for\n"
        "spec = LinearSpec(parse_weight('w4g32a'), parse_act('a16'), 32, 64)\n"
        "assert not [k.name for k in kernels_for(spec, 'cpu') if k.name.startswith('triton')]\n"
        "assert 'triton-wa16' in [k.name for k in kernels_for(spec, 'cuda')]\n"  # supports() only finds the spec
        "assert 'triton' not in sys.modules, 'bitplan imported triton'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != CPU_OPT_IN}
    env["TRITON_INTERPRET"] = "1"  # as another test module leaves it: still no Triton kernel on cpu
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
