"""The reference kernel passes its own contract on every format family, and the registry's choice rules."""

from __future__ import annotations

import pytest
import torch

from bitplan.errors import BitplanError
from bitplan.formats import parse_act, parse_weight
from bitplan.kernels import (
    KERNELS,
    Kernel,
    LinearSpec,
    choose_kernel,
    get_kernel,
    kernels_for,
    register_kernel,
)
from bitplan.kernels._reference import ReferenceKernel

from .contract import KernelContract


class TestReference(KernelContract):
    kernel = "reference"
    cases = ("w4g64a", "w4g32", "w2g64a", "w3g32", "w8c", "w8g64a/a8t", "nf4g64", "fp8", "bf16", "w4g64a/a4t", "w4g32ad6", "w3g64ad8")
    dtypes = (torch.float32, torch.float64)
    ms = (1, 7)


SPEC = LinearSpec(parse_weight("w4g64a"), parse_act("a16"), 128, 256)


def test_duplicate_registration_fails() -> None:
    with pytest.raises(ValueError, match="duplicate kernel 'reference'"):
        register_kernel("reference")(type("Again", (ReferenceKernel,), {}))


def test_reference_is_always_there_and_last() -> None:
    found = kernels_for(SPEC, "cpu")
    assert found[-1].name == "reference"
    assert choose_kernel(SPEC, "cpu", "reference").name == "reference"


def test_unknown_kernel_names_the_registered_ones() -> None:
    with pytest.raises(BitplanError, match="unknown kernel 'nope'; registered: .*reference"):
        get_kernel("nope")


class _Wide(ReferenceKernel):
    """A kernel claiming twice the plan's bytes (like a 2-bit weight widened to 4 bits)."""

    priority = 1

    def resident_nbytes(self, spec: LinearSpec) -> int:
        return 2 * super().resident_nbytes(spec)


def test_auto_keeps_the_plan_bytes_fastest_does_not() -> None:
    register_kernel("test-wide")(_Wide)
    try:
        assert choose_kernel(SPEC, "cpu", "fastest").name == "test-wide"
        assert choose_kernel(SPEC, "cpu", "auto").name != "test-wide"
        # a measured latency overrides the preference order
        slow_wide = {"test-wide": 2.0, "reference": 1.0}
        assert choose_kernel(SPEC, "cpu", "fastest", latency=lambda k, s: slow_wide.get(k.name)).name == "reference"
    finally:
        KERNELS._items.pop("test-wide")


def test_forced_kernel_must_support_the_spec() -> None:
    class _Never(ReferenceKernel):
        def supports(self, fmt, device, shape, act) -> bool:  # type: ignore[no-untyped-def]
            return False

    register_kernel("test-never")(_Never)
    try:
        with pytest.raises(BitplanError, match="kernel 'test-never' cannot run w4g64a/a16 128x256 on cpu"):
            choose_kernel(SPEC, "cpu", "test-never")
    finally:
        KERNELS._items.pop("test-never")


def test_kernel_is_abstract() -> None:
    with pytest.raises(TypeError):
        Kernel()  # type: ignore[abstract]
