"""The contract every kernel satisfies; a kernel's test class inherits it and lists what it runs.

    class TestInt4Pack(KernelContract):
        kernel = "int4pack"
        cases = ("w4g64a", "w4g32", "w3g64a/a8t")       # weight[/act] formats the kernel must support
        unsupported = ("nf4g64", "w4c")                 # formats it must refuse (supports() is False)

Each case runs on several shapes and M values, in fp32 and bf16 activations, against the reference kernel
computed in float64 on the same packed weight. Inputs are *fresh* random draws on every run (the seed is
printed on failure; set BITPLAN_KERNEL_SEED to replay one). The bound is on the relative Frobenius error and
depends on the dtype the kernel multiplies in. Outputs are poisoned with NaN before each run, and NaN
never passes, so an element the kernel forgot to write fails.

Why two bounds: in a low-precision kernel the error of one output row is dominated by a few terms (the
outlier input channels, whose bf16 rounding reaches every output coherently, and the rounding of each
group's zero), so it is heavy-tailed. Measured for torch's int4 kernel on (64, 256) at M=1 over 1,500
seeds: median 3.1e-3, 99th percentile 7.4e-3, max 1.1e-2. A single bound tight enough to catch a
systematic precision loss is then crossed by chance; so the *median* over a test's shape x M grid must
meet ``BOUNDS`` (a systematic loss moves every check), and each single check ``TAIL`` x ``BOUNDS``
(a layout or indexing bug moves its check far beyond either).
"""

from __future__ import annotations

import os
from typing import ClassVar

import pytest
import torch

from bitplan.formats import ActFormat, WeightFormat, parse_act, parse_weight
from bitplan.kernels import Kernel, LinearSpec, get_kernel
from bitplan.quantizers import QuantLinear, fake_quantize_act, get_weight_quantizer

SHAPES: tuple[tuple[int, int], ...] = ((64, 256), (96, 512), (40, 1024))  # (out, in); not powers of two on out
MS: tuple[int, ...] = (1, 3, 16, 33)
# relative Frobenius error bounds by the dtype activations are multiplied in: on the median of a grid of
# checks; a single check may reach TAIL times this (see the module docstring)
BOUNDS = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1.2e-2, torch.float16: 2e-3}
TAIL = 2.0
ACT_SLACK = 1.5e-2  # a kernel that quantizes activations itself may round a few values the other way


def fresh_seed() -> int:
    env = os.environ.get("BITPLAN_KERNEL_SEED")
    return int(env) if env else int.from_bytes(os.urandom(4), "little")


def split_case(case: str) -> tuple[WeightFormat, ActFormat]:
    w, _, a = case.partition("/")
    return parse_weight(w), parse_act(a or "a16")


def random_weight(shape: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """LLM-like weights: Gaussian, a few outlier rows and columns, one all-zero group."""
    w = torch.randn(shape, generator=g) * 0.02
    w[: max(1, shape[0] // 16)] *= 8
    w[:, :: max(1, shape[1] // 8)] *= 4
    w[0, :8] = 0
    return w


def random_input(m: int, k: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(m, k, generator=g)
    x[:, :: max(1, k // 16)] *= 10  # activation outlier channels
    return x


class KernelContract:
    kernel: ClassVar[str]
    cases: ClassVar[tuple[str, ...]]
    unsupported: ClassVar[tuple[str, ...]] = ()
    device: ClassVar[str] = "cpu"
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.bfloat16)
    shapes: ClassVar[tuple[tuple[int, int], ...]] = SHAPES
    ms: ClassVar[tuple[int, ...]] = MS

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "case" in metafunc.fixturenames:
            metafunc.parametrize("case", self.cases)
        if "bad_case" in metafunc.fixturenames:
            metafunc.parametrize("bad_case", self.unsupported or ("bf16",))
        if "dtype" in metafunc.fixturenames:
            metafunc.parametrize("dtype", self.dtypes, ids=[str(d).removeprefix("torch.") for d in self.dtypes])

    @pytest.fixture
    def k(self) -> Kernel:
        return get_kernel(self.kernel)

    def _weight(self, fmt: WeightFormat, shape: tuple[int, int], g: torch.Generator):  # type: ignore[no-untyped-def]
        w = random_weight(shape, g)
        if not fmt.is_quantized:
            return w.to(torch.bfloat16 if fmt.float_dtype == "bf16" else torch.float16).to(self.device)
        return get_weight_quantizer("rtn").quantize(w, fmt).to(self.device)

    def _check(self, k: Kernel, case: str, shape: tuple[int, int], m: int, dtype: torch.dtype, seed: int) -> float:
        """The relative error of one run (asserted within ``TAIL`` x the bound); the caller bounds the median."""
        fmt, act = split_case(case)
        g = torch.Generator().manual_seed(seed)
        spec = LinearSpec(fmt, act, *shape)
        source = self._weight(fmt, shape, g)
        prepared = k.prepare(source, spec)
        ref_kernel = get_kernel("reference")
        x = random_input(m, shape[1], g).to(dtype).to(self.device)
        ref_in = fake_quantize_act(x.double(), act) if k.quantizes_acts else x.double()
        ref = ref_kernel.matmul(ref_in, ref_kernel.prepare(source, spec))
        out = torch.full((m, shape[0]), float("nan"), dtype=dtype, device=self.device)
        got = k.matmul(x, prepared, out=out)
        where = f"{self.kernel} {case} {shape} M={m} {dtype} seed={seed}"
        assert got.data_ptr() == out.data_ptr(), f"{where}: out= was not written in place"
        assert torch.isfinite(got).all(), f"{where}: non-finite or unwritten outputs"
        err = ((got.double() - ref).norm() / ref.norm()).item()
        bound = TAIL * self._bound(k, act, dtype)
        assert err <= bound, f"{where}: relative error {err:.2e} > {bound:.1e}"
        return err

    @staticmethod
    def _bound(k: Kernel, act: ActFormat, dtype: torch.dtype) -> float:
        return BOUNDS[k.compute_dtype(dtype)] + (ACT_SLACK if k.quantizes_acts and act.is_quantized else 0.0)

    # -- the contract ---------------------------------------------------------------------------
    def test_supports_its_cases(self, k: Kernel, case: str) -> None:
        fmt, act = split_case(case)
        for shape in self.shapes:
            assert k.supports(fmt, torch.device(self.device), shape, act), f"{self.kernel} refuses {case} {shape}"

    def test_refuses_others(self, k: Kernel, bad_case: str) -> None:
        fmt, act = split_case(bad_case)
        if not self.unsupported:
            pytest.skip("the kernel supports every format")
        assert not k.supports(fmt, torch.device(self.device), self.shapes[0], act)

    def test_matches_reference(self, k: Kernel, case: str, dtype: torch.dtype) -> None:
        seed = fresh_seed()
        errs = [
            self._check(k, case, shape, m, dtype, seed + 97 * i + j)
            for i, shape in enumerate(self.shapes)
            for j, m in enumerate(self.ms)
        ]
        median, bound = float(torch.tensor(errs).median()), self._bound(k, split_case(case)[1], dtype)
        assert median <= bound, f"{self.kernel} {case} {dtype} seed={seed}: median relative error {median:.2e} > {bound:.1e}"

    def test_without_out_and_batched_input(self, k: Kernel, case: str) -> None:
        fmt, act = split_case(case)
        seed = fresh_seed()
        g = torch.Generator().manual_seed(seed)
        shape = self.shapes[0]
        spec = LinearSpec(fmt, act, *shape)
        prepared = k.prepare(self._weight(fmt, shape, g), spec)
        x = random_input(6, shape[1], g).to(self.device).reshape(2, 3, shape[1])
        y = k.matmul(x, prepared)
        assert y.shape == (2, 3, shape[0]) and y.dtype == x.dtype, f"seed={seed}"
        flat = k.matmul(x.reshape(6, shape[1]), prepared)
        torch.testing.assert_close(y.reshape(6, -1), flat, msg=f"seed={seed}")

    def test_resident_bytes_are_declared(self, k: Kernel, case: str) -> None:
        fmt, act = split_case(case)
        for shape in self.shapes:
            spec = LinearSpec(fmt, act, *shape)
            prepared = k.prepare(self._weight(fmt, shape, torch.Generator().manual_seed(0)), spec)
            assert prepared.nbytes == k.resident_nbytes(spec), f"{self.kernel} {case} {shape}"

    def test_prepare_leaves_the_canonical_weight(self, k: Kernel, case: str) -> None:
        fmt, act = split_case(case)
        shape = self.shapes[0]
        source = self._weight(fmt, shape, torch.Generator().manual_seed(1))
        before = [t.clone() for t in _tensors(source)]
        k.prepare(source, LinearSpec(fmt, act, *shape))
        assert all(torch.equal(a, b) for a, b in zip(before, _tensors(source), strict=True))

    def test_module_runs_the_kernel(self, k: Kernel, case: str) -> None:
        """A QuantLinear switched to the kernel matches its reference forward (bias and act quantization included)."""
        fmt, act = split_case(case)
        seed = fresh_seed()
        g = torch.Generator().manual_seed(seed)
        out_f, in_f = self.shapes[0]
        lin = torch.nn.Linear(in_f, out_f).to(self.device)
        with torch.no_grad():
            lin.weight.copy_(random_weight((out_f, in_f), g))
        ref = QuantLinear.from_float(lin, fmt, act)
        mod = QuantLinear.from_float(lin, fmt, act).set_kernel(k)
        assert mod.kernel == self.kernel and mod.packed_nbytes == k.resident_nbytes(mod.spec)
        x = random_input(5, in_f, g).to(self.device)
        with torch.no_grad():
            want, got = ref(x.double()), mod(x)
        bound = TAIL * (BOUNDS[k.compute_dtype(x.dtype)] + (ACT_SLACK if act.is_quantized else 0.0))
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err <= bound, f"{self.kernel} {case} module seed={seed}: relative error {err:.2e}"


def _tensors(source: object) -> list[torch.Tensor]:
    if isinstance(source, torch.Tensor):
        return [source]
    return [t for t in (source.codes, source.scales, source.offsets) if t is not None]  # type: ignore[attr-defined]
