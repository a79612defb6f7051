"""The reference kernel: dequantize the whole weight to the activation dtype, then ``F.linear``.

It supports every format on every device and keeps the canonical packed buffers as its layout, so it is
both the fallback and the yardstick of the kernel contract suite. It is slow on purpose-free grounds: it
materialises a float copy of the weight on every call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bitplan.formats import ActFormat, WeightFormat
from bitplan.kernels._base import Kernel, LinearSpec, Prepared, WeightSource, _finish, register_kernel
from bitplan.quantizers._base import QuantizedWeight

__all__ = ["ReferenceKernel", "canonical_tensors", "dequantized"]


def canonical_tensors(weight: WeightSource) -> dict[str, torch.Tensor]:
    """The stored buffers of a weight (shared, not copied): see ``QuantizedWeight.storage``, or ``weight``."""
    if isinstance(weight, QuantizedWeight):
        return weight.storage()
    return {"weight": weight}


def dequantized(prepared: Prepared, dtype: torch.dtype) -> torch.Tensor:
    """The ``[out, in]`` weight held in canonical buffers, as ``dtype``."""
    t, spec = prepared.tensors, prepared.spec
    if not spec.weight.is_quantized:
        return t["weight"].to(dtype)
    return QuantizedWeight.from_storage(spec.weight, spec.shape, t, "").dequantize(dtype)


@register_kernel("reference")
class ReferenceKernel(Kernel):
    device_kinds = ("cpu", "cuda", "mps", "xpu")
    priority = 1000  # last resort

    def supports(self, fmt: WeightFormat, device: torch.device, shape: tuple[int, int], act: ActFormat) -> bool:
        return True

    def resident_nbytes(self, spec: LinearSpec) -> int:
        return spec.weight.storage_bits(spec.out_features, spec.in_features) // 8  # the stored tensors as they are

    def prepare(self, weight: WeightSource, spec: LinearSpec) -> Prepared:
        return Prepared(self.name, spec, canonical_tensors(weight))

    def matmul(self, x: torch.Tensor, prepared: Prepared, out: torch.Tensor | None = None) -> torch.Tensor:
        return _finish(F.linear(x, dequantized(prepared, x.dtype)), x, out)
