"""Kernels behind the packed modules: a registry keyed by name, chosen per (format, device kind, shape).

    from bitplan.kernels import LinearSpec, choose_kernel, kernels_for
    spec = LinearSpec(parse_weight("w4g64a"), parse_act("a16"), 1536, 576)
    kernels_for(spec, "cpu")          # every kernel that can run it, in preference order
    layer.set_kernel("int4pack")      # a QuantLinear re-laid for one kernel

Importing this package never imports Triton or probes a GPU: GPU kernels import Triton when first used.
"""

from bitplan.kernels import _cpu, _gpu, _reference  # noqa: F401  (importing registers the kernels; _gpu never imports triton)
from bitplan.kernels._base import (
    KERNELS,
    Kernel,
    LinearSpec,
    Prepared,
    choose_kernel,
    get_kernel,
    kernels_for,
    register_kernel,
)

__all__ = [
    "KERNELS",
    "Kernel",
    "LinearSpec",
    "Prepared",
    "choose_kernel",
    "get_kernel",
    "kernels_for",
    "register_kernel",
]
