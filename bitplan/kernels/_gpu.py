"""Triton kernels for CUDA: ``triton-wa16`` (W{2,3,4,8} group-wise int, 16-bit activations) and
``triton-w8a8`` (``w8c``/``w8g*`` symmetric with per-token int8 activations).

Importing this module never imports Triton: :meth:`prepare` re-lays the weight with torch ops, and
:meth:`matmul` imports :mod:`bitplan.kernels._triton_gemm` (the ``@triton.jit`` code) on first use.

Devices and priority. Both kernels run on ``cuda`` (NVIDIA, or ROCm through torch's ``cuda`` device).
On ``cpu`` they are offered only under Triton's interpreter, which is correct and very slow: it exists so
the kernels can be tested without a GPU, never to be picked for speed. That takes two variables,
``TRITON_INTERPRET=1`` (Triton's own switch) and ``BITPLAN_TRITON_CPU=1``: the first alone is set by
tests of other Triton code (and stays set for the rest of a pytest session), and then every CPU model
that ``apply_plan(kernels="auto")`` packs in a format with no CPU torch kernel would run interpreted
(a 6 s generation test took 79 s). Their priority (``triton-w8a8`` 140, ``triton-wa16`` 150) is below
the reference kernel's 1000 and above the CPU torch kernels' (<= 100), so under the interpreter a CPU
torch kernel that runs a format still wins, and on CUDA they beat the reference and yield to any CUDA
kernel registered at the default 100 (a latency profile decides between measured kernels anyway).

Layouts (see :mod:`bitplan.kernels._triton_gemm`): codes re-packed along ``in`` into int32 words laid
``[in*b/32, out]`` (3-bit: a 2-bit plane and a 1-bit plane), scales and offsets transposed to fp16
``[groups, out]``; W8A8 holds int8 ``[in, out]``. Every layout holds exactly the plan's bytes.

Numerics. ``triton-wa16`` multiplies in the activation dtype when it is fp16/bf16; fp32 (and fp64, cast
to fp32) activations stay fp32 with fp32 weights, which ``tl.dot`` runs as TF32 on tensor-core GPUs (the
10-bit mantissa of fp16, so ``compute_dtype`` reports fp16 for them). Activation quantization
(``quantizes_acts`` in ``triton-w8a8``) is ``fake_quantize_act``'s a8t, bit for bit: fp32
``scale = max(absmax / 127, 1e-12)`` per token, codes ``round_half_even(x / scale)`` clamped to +-127;
the int8 product accumulates exactly in int32 and is scaled by ``act_scale[m] * w_scale[n]`` in fp32.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from functools import cache
from typing import Any

import torch

from bitplan.formats import ActFormat, WeightFormat
from bitplan.kernels._base import Kernel, LinearSpec, Prepared, WeightSource, register_kernel
from bitplan.quantizers._base import QuantizedWeight, row_chunks
from bitplan.quantizers.packing import unpack_bits

__all__ = ["CPU_OPT_IN", "TritonW8A8Kernel", "TritonWA16Kernel", "pack_along_k", "triton_runs_on"]

_GEMM_MODULE = "bitplan.kernels._triton_gemm"
CPU_OPT_IN = "BITPLAN_TRITON_CPU"  # with TRITON_INTERPRET=1: offer the kernels on cpu (interpreted)
WA16_BITS = (2, 3, 4, 8)


@cache
def _triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def triton_runs_on(device: torch.device) -> bool:
    """Triton is installed and ``device`` is CUDA, or CPU under ``TRITON_INTERPRET=1`` and
    ``BITPLAN_TRITON_CPU=1`` (tests only, see the module docstring).

    On CPU the GEMM module must also not have been imported (and so compiled for a GPU) outside
    interpreter mode: ``triton.jit`` decides between compiling and interpreting when it decorates.
    """
    if not _triton_installed():
        return False
    if device.type == "cuda":
        return True
    if device.type != "cpu" or os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get(CPU_OPT_IN) != "1":
        return False
    mod = sys.modules.get(_GEMM_MODULE)
    return mod is None or bool(mod.INTERPRET)


def _gemm() -> Any:
    from bitplan.kernels import _triton_gemm

    return _triton_gemm


def _codes_per_word(bits: int) -> int:
    """Codes one int32 word of the ``in`` dimension holds (3-bit: its 1-bit plane's 32)."""
    return 32 if bits == 3 else 32 // bits


def pack_along_k(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-bit codes ``[K, N]`` -> int32 ``[K*bits/32, N]``, code ``k`` at bits ``(k % P) * bits``."""
    per = 32 // bits
    k, n = codes.shape
    words = codes.reshape(k // per, per, n).to(torch.int64)
    shifts = (torch.arange(per, device=codes.device, dtype=torch.int64) * bits).view(1, per, 1)
    packed = (words << shifts).sum(1)  # disjoint bit ranges: sum == bitwise or; < 2**32
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _int_codes_t(weight: QuantizedWeight, rows: slice) -> torch.Tensor:
    """Unpacked codes of output rows ``rows``, transposed to ``[K, rows]``."""
    return unpack_bits(weight.codes[rows], weight.fmt.bits, weight.in_features).t()


def _check_source(kernel: Kernel, weight: WeightSource, spec: LinearSpec) -> QuantizedWeight:
    if not isinstance(weight, QuantizedWeight) or weight.fmt != spec.weight or weight.shape != spec.shape:
        raise ValueError(f"{kernel.name} needs the packed {spec.weight} weight of shape {spec.shape}")
    return weight


def _rows(x: torch.Tensor, k: int, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    """``x [..., K]`` as ``[M, K]`` with unit stride along K, in one of ``dtypes`` (else fp32)."""
    x2 = x.reshape(-1, k)
    if x2.dtype not in dtypes:
        x2 = x2.float()
    return x2 if x2.stride(-1) == 1 or x2.shape[0] == 0 else x2.contiguous()


def _run(x: torch.Tensor, n: int, out: torch.Tensor | None, launch: Any) -> torch.Tensor:
    """Shape ``[..., N]``, write into ``out`` (directly when it is a contiguous ``[M, N]``), cast to ``x.dtype``."""
    lead = x.shape[:-1]
    m = x.numel() // max(x.shape[-1], 1)
    out2 = out.view(m, n) if out is not None and out.is_contiguous() and out.dtype == x.dtype else None
    if m == 0:
        y = torch.empty(*lead, n, dtype=x.dtype, device=x.device)
    else:
        if x.device.type == "cuda":
            with torch.cuda.device(x.device):
                y = launch(out2)
        else:
            y = launch(out2)
        y = y.view(*lead, n)
    if out is None:
        return y.to(x.dtype)
    if out2 is None or y.data_ptr() != out2.data_ptr():
        out.copy_(y)
    return out


@register_kernel("triton-wa16")
class TritonWA16Kernel(Kernel):
    """W{2,3,4,8} group-wise (or per-channel) int weights, symmetric or asymmetric, times 16-bit activations.

    Any activation format: quantized ones arrive fake-quantized by the module (``quantizes_acts`` is False).
    ``in`` must be a multiple of the codes per int32 word: 16 at 2 bits, 32 at 3, 8 at 4, 4 at 8.
    """

    device_kinds = ("cuda", "cpu")  # cpu: only interpreted, for tests (see the module docstring)
    priority = 150

    def supports(
        self, fmt: WeightFormat, device: torch.device, shape: tuple[int, int], act: ActFormat
    ) -> bool:
        out_f, in_f = shape
        return (
            fmt.kind == "int"
            and fmt.bits in WA16_BITS
            and out_f > 0
            and in_f % _codes_per_word(fmt.bits) == 0
            and in_f % fmt.effective_group(in_f) == 0
            and triton_runs_on(torch.device(device))
        )

    def prepare(self, weight: WeightSource, spec: LinearSpec) -> Prepared:
        qw = _check_source(self, weight, spec)
        bits = spec.weight.bits
        planes: dict[str, list[torch.Tensor]] = {"qweight": []}
        if bits == 3:
            planes["qweight_hi"] = []
        for rows in row_chunks(spec.out_features, spec.in_features):
            codes = _int_codes_t(qw, rows)
            if bits == 3:
                planes["qweight"].append(pack_along_k(codes & 3, 2))
                planes["qweight_hi"].append(pack_along_k(codes >> 2, 1))
            else:
                planes["qweight"].append(pack_along_k(codes, bits))
        tensors = {name: torch.cat(parts, dim=1).contiguous() for name, parts in planes.items()}
        tensors["scales"] = qw.scales.t().contiguous()
        if qw.offsets is not None:
            tensors["zeros"] = qw.offsets.t().contiguous()  # w = s*q + z: the offset is the zero as it stands
        return Prepared(self.name, spec, tensors)

    def matmul(self, x: torch.Tensor, prepared: Prepared, out: torch.Tensor | None = None) -> torch.Tensor:
        spec = prepared.spec
        fmt, k, n = spec.weight, spec.in_features, spec.out_features
        x2 = _rows(x, k, (torch.float16, torch.bfloat16, torch.float32))
        group = fmt.effective_group(k)
        return _run(
            x, n, out, lambda out2: _gemm().wa16_matmul(x2, prepared.tensors, fmt.bits, group, n, out2)
        )

    def resident_nbytes(self, spec: LinearSpec) -> int:
        fmt, n, k = spec.weight, spec.out_features, spec.in_features
        groups = k // fmt.effective_group(k)
        return k * n * fmt.bits // 8 + 2 * groups * n * (2 if fmt.has_offset else 1)

    def compute_dtype(self, x_dtype: torch.dtype) -> torch.dtype:
        return x_dtype if x_dtype in (torch.float16, torch.bfloat16) else torch.float16  # fp32: TF32 dot


@register_kernel("triton-w8a8")
class TritonW8A8Kernel(Kernel):
    """``w8c`` or ``w8g<G>`` (G a multiple of 32) symmetric weights with ``a8t`` activations: int8 x int8 -> int32.

    Quantizes its input itself, exactly as ``fake_quantize_act`` does (see the module docstring).
    """

    device_kinds = ("cuda", "cpu")  # cpu: only interpreted, for tests
    priority = 140  # before triton-wa16, which runs the same formats on fake-quantized activations
    quantizes_acts = True

    def supports(
        self, fmt: WeightFormat, device: torch.device, shape: tuple[int, int], act: ActFormat
    ) -> bool:
        out_f, in_f = shape
        return (
            fmt.kind == "int"
            and fmt.bits == 8
            and fmt.symmetric
            and (fmt.group_size is None or fmt.group_size % 32 == 0)  # int8 dot tiles: K >= 32
            and in_f % fmt.effective_group(in_f) == 0
            and out_f > 0
            and act.kind == "int"
            and act.bits == 8
            and triton_runs_on(torch.device(device))
        )

    def prepare(self, weight: WeightSource, spec: LinearSpec) -> Prepared:
        qw = _check_source(self, weight, spec)
        signed = (qw.codes.to(torch.int16) - 128).to(torch.int8)  # 8-bit codes are stored unpacked
        tensors = {"qweight": signed.t().contiguous(), "scales": qw.scales.t().contiguous()}
        return Prepared(self.name, spec, tensors)

    def matmul(self, x: torch.Tensor, prepared: Prepared, out: torch.Tensor | None = None) -> torch.Tensor:
        spec = prepared.spec
        fmt, k, n = spec.weight, spec.in_features, spec.out_features
        x2 = _rows(x, k, (torch.float16, torch.bfloat16, torch.float32))
        per_channel = fmt.group_size is None
        group = fmt.effective_group(k)
        return _run(
            x, n, out, lambda out2: _gemm().w8a8_matmul(x2, prepared.tensors, group, per_channel, n, out2)
        )

    def resident_nbytes(self, spec: LinearSpec) -> int:
        fmt, n, k = spec.weight, spec.out_features, spec.in_features
        return k * n + 2 * n * (k // fmt.effective_group(k))

    def compute_dtype(self, x_dtype: torch.dtype) -> torch.dtype:
        # int8 products are exact; the fp32 scaling then the output dtype bound the error
        return x_dtype if x_dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
