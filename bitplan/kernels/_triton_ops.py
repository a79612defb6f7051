"""Reduction combine functions shared by the Triton kernels (imported lazily, never at package import).

The kernels use builtins and ``tl.reduce`` only -- no ``tl.zeros`` / ``tl.cdiv`` / ``tl.sum`` / ``tl.max``,
which are jit functions of ``triton.language.standard``: under ``TRITON_INTERPRET=1`` those only run when the
variable was set before triton was first imported, and transformers imports triton early (through
``torch._dynamo``). The combine functions are standard's own when present (what ``tl.max`` / ``tl.sum``
reduce with, and what the interpreter runs vectorised), else these equivalents.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["ADD", "MAX"]


@triton.jit
def _max_op(a, b):
    return tl.maximum(a, b)


@triton.jit
def _add_op(a, b):
    return a + b


MAX = getattr(tl.standard, "_elementwise_max", _max_op)
ADD = getattr(tl.standard, "_sum_combine", _add_op)
