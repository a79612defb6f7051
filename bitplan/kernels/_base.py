"""The kernel interface, its registry and the choice of a kernel per unit.

A kernel is *how* a packed :class:`~bitplan.quantizers.QuantLinear` multiplies: it re-lays the canonical
packed weight (codes + fp16 scales/offsets, the plan's storage format) once into whatever layout its math
wants (:meth:`Kernel.prepare`), then computes ``x @ W.T`` from that layout on every call
(:meth:`Kernel.matmul`). The canonical layout is what plans count and checkpoints store; the prepared one
is what runs.

Why kernels declare ``resident_nbytes``: a kernel may hold more than the plan's bytes (a 2-bit weight
widened into torch's 4-bit layout runs fast but occupies 4 bits). ``apply_plan(kernels="auto")`` only takes
kernels that hold the plan's bytes, so a memory budget the search promised is what the process holds;
``kernels="fastest"`` drops that promise for speed.

Double-quantized formats (``w4g32ad8``: scale codes + super-scales) are stored and counted at their exact
size, but every kernel except ``reference`` computes from the decoded fp16 parameters (``compute_format``),
so for them "the plan's bytes" means the codes plus fp16 parameters: up to 1 bit a weight more than stored
(g32 asymmetric), said in ``resident_nbytes`` and in the apply report.

Choice without a hardware profile follows ``priority`` (lower first, a documented preference order per
device kind); with measured latencies (``latency=`` callback, filled by ``bitplan.profiles``) the fastest
supported kernel wins.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch

from bitplan._registry import Registry
from bitplan.errors import BitplanError
from bitplan.formats import ActFormat, WeightFormat
from bitplan.quantizers._base import QuantizedWeight

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


@dataclass(frozen=True)
class LinearSpec:
    """What a kernel is asked to compute: ``[M, in] @ W[out, in].T`` with ``W`` in ``weight`` format."""

    weight: WeightFormat
    act: ActFormat
    out_features: int
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def __str__(self) -> str:
        return f"{self.weight}/{self.act} {self.out_features}x{self.in_features}"


@dataclass
class Prepared:
    """A weight in one kernel's layout: tensors (module buffers, they follow ``.to(device)``) + static facts."""

    kernel: str
    spec: LinearSpec
    tensors: dict[str, torch.Tensor]
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


WeightSource = QuantizedWeight | torch.Tensor  # packed weight, or a dense [out, in] float weight (bf16/fp16 formats)


class Kernel(ABC):
    """One way to compute a quantized linear. Subclasses are stateless; register them with :func:`register_kernel`.

    ``device_kinds``: the ``torch.device.type`` values it runs on. ``priority``: preference when no
    measurement exists (lower first). ``quantizes_acts``: the kernel quantizes its input itself (a W8A8
    kernel); otherwise the module fake-quantizes activations before calling it.
    """

    name: ClassVar[str] = ""
    device_kinds: ClassVar[tuple[str, ...]] = ("cpu",)
    priority: ClassVar[int] = 100
    quantizes_acts: ClassVar[bool] = False

    @abstractmethod
    def supports(self, fmt: WeightFormat, device: torch.device, shape: tuple[int, int], act: ActFormat) -> bool:
        """Whether this kernel computes ``fmt`` weights of ``shape = (out, in)`` with ``act`` inputs on ``device``."""

    @abstractmethod
    def prepare(self, weight: WeightSource, spec: LinearSpec) -> Prepared:
        """Re-lay the canonical weight into this kernel's layout (once, at apply time)."""

    @abstractmethod
    def matmul(self, x: torch.Tensor, prepared: Prepared, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., in] @ W.T -> [..., out]`` in ``x.dtype``, no bias. With ``out``, the result is written there."""

    def resident_nbytes(self, spec: LinearSpec) -> int:
        """Bytes the prepared weight holds; the default is the canonical bytes of the format it computes in."""
        return spec.weight.compute_format.storage_bits(spec.out_features, spec.in_features) // 8

    def holds_plan_bytes(self, spec: LinearSpec) -> bool:
        plan = spec.weight.compute_format.storage_bits(spec.out_features, spec.in_features) // 8
        return self.resident_nbytes(spec) <= plan * 1.01

    def compute_dtype(self, x_dtype: torch.dtype) -> torch.dtype:
        """The dtype activations are multiplied in (the contract suite's error bound follows it)."""
        return x_dtype

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _finish(y: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """Cast a kernel's raw result to ``x.dtype`` and honour ``out=`` (shared by the torch-op kernels)."""
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    if out is None:
        return y.to(x.dtype)
    out.copy_(y)
    return out


KERNELS = Registry[Kernel]("kernel")
K = TypeVar("K", bound=type[Kernel])


def register_kernel(name: str) -> Callable[[K], K]:
    """Class decorator: register one instance of a :class:`Kernel` under ``name`` (twice is an error)."""

    def deco(cls: K) -> K:
        cls.name = name
        KERNELS.register(name)(cls())
        return cls

    return deco


def get_kernel(name: str) -> Kernel:
    return KERNELS.get(name)


def kernels_for(spec: LinearSpec, device: torch.device | str) -> list[Kernel]:
    """Every registered kernel that supports ``spec`` on ``device``, in preference order."""
    device = torch.device(device)
    found = [
        k
        for n in KERNELS
        if device.type in (k := KERNELS.get(n)).device_kinds and k.supports(spec.weight, device, spec.shape, spec.act)
    ]
    return sorted(found, key=lambda k: (k.priority, k.name))


LatencyFn = Callable[[Kernel, LinearSpec], "float | None"]


def choose_kernel(
    spec: LinearSpec,
    device: torch.device | str,
    policy: str = "auto",
    latency: LatencyFn | None = None,
) -> Kernel:
    """The kernel for one unit.

    ``policy``: ``auto`` (fastest kernel that holds the plan's bytes), ``fastest`` (fastest, whatever it
    holds), ``reference`` (dequantize + matmul), or a kernel name (an error if it cannot run ``spec``).
    "Fastest" is by ``latency`` where it returns a measurement, else by preference order.
    """
    device = torch.device(device)
    if policy not in ("auto", "fastest"):
        kernel = get_kernel(policy)
        if device.type not in kernel.device_kinds or not kernel.supports(spec.weight, device, spec.shape, spec.act):
            raise BitplanError(f"kernel {policy!r} cannot run {spec} on {device.type}")
        return kernel
    found = kernels_for(spec, device)
    if policy == "auto":
        found = [k for k in found if k.holds_plan_bytes(spec)]
    if not found:  # the reference kernel supports every format on every device
        raise BitplanError(f"no kernel runs {spec} on {device.type}")
    if latency is not None:
        timed = [(t, i, k) for i, k in enumerate(found) if (t := latency(k, spec)) is not None]
        if timed:
            return min(timed, key=lambda tik: (tik[0], tik[1]))[2]
    return found[0]
