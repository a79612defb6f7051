"""CPU kernels for code-table formats (NF4, fp8 e4m3): table lookup to bf16, chunk by chunk, then a bf16 GEMM.

Neither format is affine in its code, so torch's integer GEMMs cannot decode them. What is fast on a CPU
is a gather from a table small enough for the cache, indexed by two bytes at a time (``uint16`` view of the
codes, one ``index_select`` a pair of bytes): NF4 packs 4 codes in two bytes, so a 65536-entry ``int64``
table yields 4 bf16 levels per lookup; fp8 yields 2 bf16 values per lookup from a 65536-entry ``int32``
table. (torch's own fp8 -> bf16/fp32 cast is a scalar loop here, an order of magnitude slower.) Every
e4m3 value is exactly a bf16 value; the NF4 levels are rounded to bf16 once.

The weight is decoded a row chunk at a time (≈ 8 MiB of bf16, 4M weights), so the temporaries stay
bounded whatever the weight's size (smaller chunks measured slower, from per-step overhead; larger ones
much slower, from page faults on fresh temporaries), and multiplied in bf16 (oneDNN uses AMX/AVX-512 bf16
where the CPU has them). A per-channel scale (``fp8``, ``nf4c``) factors out of the dot product and is
applied to the output in fp32; a grouped NF4 scale is applied to the decoded chunk (one bf16 multiply).

These kernels hold exactly the plan's bytes; they beat the reference kernel by an order of magnitude, but
not a dense fp32 GEMM (see ``bench/bench_kernels.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bitplan.formats import ActFormat, WeightFormat
from bitplan.kernels._base import Kernel, LinearSpec, Prepared, WeightSource, _finish, register_kernel
from bitplan.quantizers._base import QuantizedWeight
from bitplan.quantizers._codebooks import FP8_DTYPE, NF4_LEVELS

__all__ = ["FP8LutKernel", "NF4LutKernel"]

CHUNK_BYTES = 8 << 20  # bf16 bytes decoded per step (measured: 2 MiB 20% slower, 16 MiB+ 2-3x slower)
_TABLES: dict[str, torch.Tensor] = {}


def _bf16_bits(values: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns of ``values`` as int64 in 0..65535."""
    return values.to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF


def _table(kind: str) -> torch.Tensor:
    """The pair-of-bytes lookup table (built once per process, 512 KiB for nf4, 256 KiB for fp8)."""
    if kind not in _TABLES:
        idx = torch.arange(65536, dtype=torch.int64)
        if kind == "nf4":  # 4 codes (nibbles, low first) -> 4 bf16 levels in one little-endian int64
            levels = _bf16_bits(torch.tensor(NF4_LEVELS, dtype=torch.float32))
            words = [levels[(idx >> (4 * i)) & 15] << (16 * i) for i in range(4)]
            _TABLES[kind] = words[0] | words[1] | words[2] | words[3]
        else:  # 2 e4m3 bytes (low first) -> 2 bf16 values in one little-endian int32
            vals = _bf16_bits(torch.arange(256, dtype=torch.int64).to(torch.uint8).view(FP8_DTYPE).float())
            vals[torch.tensor([0x7F, 0xFF])] = 0  # the NaN patterns, never produced by the encoder
            pair = vals[idx & 0xFF] | (vals[idx >> 8] << 16)
            _TABLES[kind] = (pair - ((pair >> 31) << 32)).to(torch.int32)  # wrap to signed int32
    return _TABLES[kind]


def _chunks(rows: int, cols: int) -> list[tuple[int, int]]:
    step = max(16, CHUNK_BYTES // (2 * cols))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


class _LutKernel(Kernel):
    table: str = ""

    def compute_dtype(self, x_dtype: torch.dtype) -> torch.dtype:
        return torch.bfloat16

    def prepare(self, weight: WeightSource, spec: LinearSpec) -> Prepared:
        assert isinstance(weight, QuantizedWeight)
        return Prepared(self.name, spec, {"codes": weight.codes, "scales": weight.scales})

    def _decode(self, codes: torch.Tensor, scales: torch.Tensor, spec: LinearSpec) -> torch.Tensor:
        """bf16 ``[rows, in]`` for one chunk of packed rows (grouped scales applied)."""
        rows = codes.shape[0]
        idx = codes.view(torch.uint16).to(torch.int32).view(-1)  # index_select wants int32/int64 indices
        w = _table(self.table).index_select(0, idx).view(torch.bfloat16).view(rows, spec.in_features)
        fmt = spec.weight
        if fmt.group_size is not None:
            g = fmt.group_size
            w.view(rows, spec.in_features // g, g).mul_(scales.to(torch.bfloat16).unsqueeze(-1))
        return w

    def matmul(self, x: torch.Tensor, prepared: Prepared, out: torch.Tensor | None = None) -> torch.Tensor:
        t, spec = prepared.tensors, prepared.spec
        x2 = x.reshape(-1, spec.in_features).to(torch.bfloat16).contiguous()
        codes, scales = t["codes"], t["scales"]
        per_channel = spec.weight.group_size is None
        y = torch.empty(x2.shape[0], spec.out_features, dtype=torch.float32)
        if x2.shape[0]:
            for r0, r1 in _chunks(spec.out_features, spec.in_features):
                y[:, r0:r1] = F.linear(x2, self._decode(codes[r0:r1], scales[r0:r1], spec))
            if per_channel:
                y.mul_(scales.float().view(1, -1))
        return _finish(y, x, out)


@register_kernel("nf4-lut")
class NF4LutKernel(_LutKernel):
    """NF4 (grouped or per-channel) by a 4-codes-per-lookup table, bf16 GEMM per row chunk."""

    table = "nf4"
    priority = 41

    def supports(self, fmt: WeightFormat, device: torch.device, shape: tuple[int, int], act: ActFormat) -> bool:
        return device.type == "cpu" and fmt.kind == "nf4" and shape[1] % 8 == 0


@register_kernel("fp8-lut")
class FP8LutKernel(_LutKernel):
    """fp8 e4m3 weights (per-channel scale) by a 2-bytes-per-lookup table, bf16 GEMM per row chunk."""

    table = "fp8"
    priority = 40

    def supports(self, fmt: WeightFormat, device: torch.device, shape: tuple[int, int], act: ActFormat) -> bool:
        return device.type == "cpu" and fmt.kind == "fp8" and shape[1] % 2 == 0
