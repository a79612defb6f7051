"""CPU kernels: torch's weight-only int8/int4 GEMMs, an exact W8A8 int8 GEMM, bf16 dense and table lookups.

Importing this module registers every CPU kernel (it imports ``_cpu_int4`` and ``_cpu_lut``).

Activations go to bf16 in every weight-only kernel: torch's int8/int4 weight GEMMs have a bf16 fast path
and an fp32 path 5-70x slower on the development CPU (Xeon with AVX-512, AVX512-BF16 and AMX, 2 threads),
and a bf16 dense GEMM beats fp32 there too. ``compute_dtype`` says bf16, so the contract suite holds them to
the bf16 error bound. Scales become bf16 where torch's ops take them in the activation dtype: a relative
rounding of 2**-9, a quarter of a code step at 8 bits, far below the format's own error.

Preference order (``priority``, lower first) follows M=1 latency measured by ``bench/bench_kernels.py``
(bench/RESULTS.md, ``kernels-micro``; 2 threads, quiet machine). Figures: latency / dense fp32 ``F.linear``
on the main model's q/o, k/v, gate/up, down shapes and Llama-3-8B's 4096x4096. Kernels that share a format
are ordered by speed; ``int4pack-wide`` precedes ``int4pack-expand``: faster, but it holds 4 bits a weight,
so ``kernels="fastest"`` takes it and ``"auto"`` does not::

    prio kernel           formats                 M=1 / fp32                      how
    10   int4pack         w4 g32-256              0.59 1.01 0.37 0.37 | 0.35     torch int4 GEMM
    11   int4pack-wide    w2/w3 g32-256           0.57 0.99 0.40 0.37 | 0.33     codes widened to int4 at prepare
    20   int8pack         w8c, w8ca               0.84 1.13 0.68 0.64 | 0.42     torch int8 weight GEMM
    21   int8-planes      w5-w8 g32-256           0.99 1.79 0.73 0.69 | 0.68     two int4 nibble planes
    22   int8-intmm       w8c[a]/a8t, /a4t        1.30 2.25 0.90 0.75 | 0.76     exact int8 x int8 (quantizes acts)
    25   int4pack-expand  w2/w3 g32-256   (w2)    1.38 2.39 0.97 0.92 | 0.64     plan bytes, expanded per call
                                          (w3)    1.97 3.08 1.43 1.36 | 1.14
    30   dense-bf16       bf16, fp16              1.66 2.92 1.23 1.09 | 0.72     F.linear in bf16
    40   fp8-lut          fp8                     4.97 5.62 4.44 4.19 | 4.24     table lookup + bf16 GEMM
    41   nf4-lut          nf4g*, nf4c             5.24 5.76 4.32 4.15 | 3.80     table lookup + bf16 GEMM
    1000 reference        everything             18.8 12.3 12.2 15.1  |  --      dequantize + F.linear

At 16 and 128 rows the order changes (bf16 GEMMs use AMX): ``int8-intmm`` is about 2x faster than
``int8pack`` there, and torch's int4 op (a GEMV kernel at heart) is 1.2-1.7x *slower* than dense fp32 at
128 rows; a choice by measured latencies (``latency=``, ``bitplan.profiles``) can take that into account.

Not registered, and why: fbgemm's ``quantized::linear_dynamic`` (W8A8, fastest int8 path here) quantizes
activations per *tensor*, asymmetric uint8 -- a token much smaller than the largest one loses nearly all its
precision, which is not the per-token ``a8t`` format (measured: 100% error on a token 100x smaller than its
neighbours). ``torch._scaled_mm`` runs on this CPU (tensor- and row-wise scales) but multiplies fp8 by
fp8: it could serve ``fp8/afp8t`` (not done), not fp8 weights with 16-bit activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bitplan.formats import ActFormat, WeightFormat
from bitplan.kernels._base import Kernel, LinearSpec, Prepared, WeightSource, _finish, register_kernel
from bitplan.kernels._cpu_int4 import GROUPS, _int4_mm, _int4_packed, _pad_rows, int4pack_available
from bitplan.quantizers._base import QuantizedWeight

__all__ = ["DenseBF16Kernel", "Int8IntMMKernel", "Int8PackKernel", "Int8PlanesKernel"]


PREFILL_ROWS = 32  # int8pack: from this many input rows on, bf16 GEMM on codes converted chunk by chunk
PREFILL_CHUNK = 2 << 20  # codes converted per step (4 MiB of bf16)


def _bf16_2d(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.reshape(-1, k).to(torch.bfloat16).contiguous()


def _int8_codes(qw: QuantizedWeight) -> torch.Tensor:
    """Unsigned 8-bit codes ``q`` as signed ``q - 128`` (int8 ``[out, in]``)."""
    return (qw.int_codes().to(torch.int16) - 128).to(torch.int8).contiguous()


def _shifted_offsets(scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """fp32 ``o + 128*s``: with it, ``s*q + o == s*(q - 128) + (o + 128*s)``."""
    return offsets.float() + 128 * scales.float()


def _per_channel_8bit(fmt: WeightFormat) -> bool:
    return fmt.kind == "int" and fmt.bits == 8 and fmt.group_size is None


@register_kernel("int8pack")
class Int8PackKernel(Kernel):
    """Per-channel 8-bit weights (``w8c``, ``w8ca``) through torch's ``_weight_int8pack_mm``, bf16 math.

    The op takes int8 codes (``q - 128``) and one scale per row in the activation dtype, and needs
    ``in % 16 == 0`` (other widths return garbage or crash). An asymmetric weight ``s*(q-128) + o'`` adds
    ``o' * sum(x)``, and adding it to the op's bf16 output loses precision when the two nearly cancel
    (measured: 1.3x the bf16 error bound). So the input is centred instead: ``y = W(x - mean(x)) +
    mean(x) * rowsum(W)``; the offset's term vanishes from the bf16 GEMM (``x - mean`` sums to zero) and
    ``rowsum(W)`` is held in fp32, 2 bytes a row more than the plan's fp16 offset. ``x - mean`` is not a
    bf16 number even when ``x`` is, and rounding it cost up to 4x the bound on bf16 inputs whose outputs
    cancel, so it goes in as two bf16 parts (hi + lo, two calls): ``w8ca`` costs two GEMMs, ``w8c`` one.

    From ``PREFILL_ROWS`` input rows on, the op (a GEMV kernel at heart: 1.6-3.4x slower than dense fp32
    at 128 rows) is replaced by converting the codes to bf16 a row chunk at a time and a bf16 GEMM (oneDNN,
    AMX here), the row scale applied to the output: 3-4x faster at 128 rows (at 16, even on large shapes
    and slower on small ones, hence 32).
    """

    priority = 20

    def supports(self, fmt: WeightFormat, device: torch.device, shape: tuple[int, int], act: ActFormat) -> bool:
        return (
            device.type == "cpu"
            and _per_channel_8bit(fmt)
            and shape[1] % 16 == 0
            and hasattr(torch.ops.aten, "_weight_int8pack_mm")
        )

    def compute_dtype(self, x_dtype: torch.dtype) -> torch.dtype:
        return torch.bfloat16

    def resident_nbytes(self, spec: LinearSpec) -> int:
        n, k = spec.out_features, spec.in_features
        return n * k + 2 * n + (4 * n if spec.weight.has_offset else 0)

    def prepare(self, weight: WeightSource, spec: LinearSpec) -> Prepared:
        assert isinstance(weight, QuantizedWeight)
        q = _int8_codes(weight)
        tensors = {"q": q, "scales": weight.scales[:, 0].to(torch.bfloat16).contiguous()}
        if weight.offsets is not None:  # rowsum(W) = s * sum(q - 128) + in * (o + 128*s), exact in fp64
            o = _shifted_offsets(weight.scales, weight.offsets)[:, 0].double()
            s = weight.scales[:, 0].double()
            tensors["rowsum"] = (s * q.double().sum(-1) + spec.in_features * o).float()
        return Prepared(self.name, spec, tensors)

    @staticmethod
    def _gemm(x2: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """``x2 (bf16) @ (scales * q).T`` as fp32 ``[M, out]``."""
        if x2.shape[0] < PREFILL_ROWS:
            return torch.ops.aten._weight_int8pack_mm(x2, q, scales).float()
        y = torch.empty(x2.shape[0], q.shape[0], dtype=torch.float32)
        step = max(16, PREFILL_CHUNK // q.shape[1])
        for r in range(0, q.shape[0], step):
            y[:, r : r + step] = F.linear(x2, q[r : r + step].to(torch.bfloat16))  # int8 is exact in bf16
        return y.mul_(scales.float().view(1, -1))

    def matmul(self, x: torch.Tensor, prepared: Prepared, out: torch.Tensor | None = None) -> torch.Tensor:
        t, spec = prepared.tensors, prepared.spec
        if "rowsum" not in t:
            x2 = _bf16_2d(x, spec.in_features)
            if x2.shape[0] == 0:
                return _finish(x2.new_empty(0, spec.out_features), x, out)
            return _finish(self._gemm(x2, t["q"], t["scales"]), x, out)
        xf = x.reshape(-1, spec.in_features).float()
        if xf.shape[0] == 0:
            return _finish(xf.new_empty(0, spec.out_features), x, out)
        mean = xf.mean(-1, keepdim=True)
        xc = xf - mean
        hi = xc.to(torch.bfloat16)
        lo = xc.sub_(hi.float()).to(torch.bfloat16)
        y = self._gemm(hi, t["q"], t["scales"]).add_(self._gemm(lo, t["q"], t["scales"]))
        return _finish(y.addmm_(mean, t["rowsum"].view(1, -1)), x, out)


@register_kernel("int8-planes")
class Int8PlanesKernel(Kernel):
    """Grouped 5-8-bit weights as two int4 nibble planes through torch's int4 GEMM (two calls).

    ``q = m*h + l`` with ``m = 2**(b-4)``: ``h`` the top 4 bits, ``l`` the low ``b-4`` bits stored as
    ``l + c``, ``c = 8 - 2**(b-5)`` (centred on torch's 8; ``c = 0`` at 8 bits). Both planes share one
    bf16 (scale, zero) pair per group, and with ``(m+1)*zero = o + (8*m + 2**(b-5))*s``,
    ``m*((h-8)*s + zero) + ((l+c-8)*s + zero) == s*q + o`` (at 8 bits: ``zero = (o + 136*s) / 17``).
    The split keeps each plane's zero small and centred, which matters because bf16 rounds the zero and
    each GEMM's output; a 4-bit high plane over few levels (the other split) left a large common term and
    up to 2x the bf16 error bound at 5 bits.

    Bytes: two nibble planes are 8 bits a weight, the plan's at 8 bits (a 5-7-bit format holds more), and
    ``(scale, zero)`` take 4 bytes a group, an asymmetric plan's ``(scale, offset)`` (a symmetric one: 2 more).
    """

    priority = 21

    def supports(self, fmt: WeightFormat, device: torch.device, shape: tuple[int, int], act: ActFormat) -> bool:
        return (
            device.type == "cpu"
            and fmt.kind == "int"
            and 5 <= fmt.bits <= 8
            and fmt.group_size in GROUPS
            and int4pack_available()
        )

    def compute_dtype(self, x_dtype: torch.dtype) -> torch.dtype:
        return torch.bfloat16

    def resident_nbytes(self, spec: LinearSpec) -> int:
        rows, k = _pad_rows(spec.out_features), spec.in_features
        return rows * k + 4 * rows * (k // spec.weight.effective_group(k))

    def prepare(self, weight: WeightSource, spec: LinearSpec) -> Prepared:
        assert isinstance(weight, QuantizedWeight)
        rows = _pad_rows(spec.out_features)
        q = weight.int_codes()
        s = weight.scales.float()
        o = weight.offsets.float() if weight.offsets is not None else -(2 ** (spec.weight.bits - 1)) * s
        low = spec.weight.bits - 4
        m = 2**low
        sz = torch.stack([s, (o + (8 * m + m // 2) * s) / (m + 1)], dim=-1)
        sz = F.pad(sz, (0, 0, 0, 0, 0, rows - spec.out_features)).transpose(0, 1).to(torch.bfloat16).contiguous()
        lo = _int4_packed((q & (m - 1)) + (8 - m // 2), rows)
        return Prepared(self.name, spec, {"hi": _int4_packed(q >> low, rows), "lo": lo, "sz": sz}, {"m": m})

    def matmul(self, x: torch.Tensor, prepared: Prepared, out: torch.Tensor | None = None) -> torch.Tensor:
        t, spec = prepared.tensors, prepared.spec
        g = spec.weight.group_size
        assert g is not None
        x2 = _bf16_2d(x, spec.in_features)
        if x2.shape[0] == 0:
            return _finish(x2.new_empty(0, spec.out_features), x, out)
        hi = _int4_mm(x2, t["hi"], g, t["sz"]).float()
        y = hi.mul_(prepared.meta["m"]).add_(_int4_mm(x2, t["lo"], g, t["sz"]))  # combined in fp32
        if y.shape[1] != spec.out_features:
            y = y[:, : spec.out_features]
        return _finish(y, x, out)


@register_kernel("int8-intmm")
class Int8IntMMKernel(Kernel):
    """W8A8 (and W8A4): per-token symmetric int activations x per-channel int8 weights, exact int32 sums.

    Quantizes its input exactly as ``fake_quantize_act`` does (fp32 scale ``absmax / (2**(b-1) - 1)`` per
    token, round half to even, clamp to the symmetric grid), multiplies with ``torch._int_mm`` (int8 x int8
    -> int32, exact) and rescales by token and channel scale in fp32. An asymmetric weight (``w8ca``) adds
    ``s_t * rowsum(q_x) * (o + 128*s)``. Holds the plan's bytes: int8 codes + the fp16 scales/offsets.
    """

    priority = 22
    quantizes_acts = True

    def supports(self, fmt: WeightFormat, device: torch.device, shape: tuple[int, int], act: ActFormat) -> bool:
        return (
            device.type == "cpu"
            and _per_channel_8bit(fmt)
            and act.kind == "int"
            and hasattr(torch, "_int_mm")
        )

    def prepare(self, weight: WeightSource, spec: LinearSpec) -> Prepared:
        assert isinstance(weight, QuantizedWeight)
        tensors = {"q": _int8_codes(weight), "scales": weight.scales[:, 0].contiguous()}
        if weight.offsets is not None:
            tensors["offsets"] = weight.offsets[:, 0].contiguous()
        return Prepared(self.name, spec, tensors)

    def matmul(self, x: torch.Tensor, prepared: Prepared, out: torch.Tensor | None = None) -> torch.Tensor:
        t, spec = prepared.tensors, prepared.spec
        top = 2 ** (spec.act.bits - 1) - 1
        xf = x.reshape(-1, spec.in_features).float()
        if xf.shape[0] == 0:
            return _finish(xf.new_empty(0, spec.out_features), x, out)
        s_tok = xf.abs().amax(dim=-1, keepdim=True).div_(top).clamp_min_(1e-12)
        q = torch.round(xf / s_tok).clamp_(-top, top).to(torch.int8)
        y = torch._int_mm(q, t["q"].t()).float()
        s = t["scales"].float()
        y.mul_(s_tok).mul_(s.view(1, -1))
        if "offsets" in t:
            rows = q.sum(-1, keepdim=True, dtype=torch.int32).float().mul_(s_tok)
            y.addmm_(rows, (t["offsets"].float() + 128 * s).view(1, -1))
        return _finish(y, x, out)


@register_kernel("dense-bf16")
class DenseBF16Kernel(Kernel):
    """Unquantized 16-bit weights, multiplied in bf16 (an fp16 weight is held as bf16: same bytes, bf16 math)."""

    priority = 30

    def supports(self, fmt: WeightFormat, device: torch.device, shape: tuple[int, int], act: ActFormat) -> bool:
        return device.type == "cpu" and fmt.kind == "float"

    def compute_dtype(self, x_dtype: torch.dtype) -> torch.dtype:
        return torch.bfloat16

    def prepare(self, weight: WeightSource, spec: LinearSpec) -> Prepared:
        assert isinstance(weight, torch.Tensor)
        w = weight if weight.dtype == torch.bfloat16 else weight.to(torch.bfloat16)
        return Prepared(self.name, spec, {"weight": w.contiguous()})

    def matmul(self, x: torch.Tensor, prepared: Prepared, out: torch.Tensor | None = None) -> torch.Tensor:
        x2 = _bf16_2d(x, prepared.spec.in_features)
        return _finish(F.linear(x2, prepared.tensors["weight"]), x, out)


from bitplan.kernels import _cpu_int4, _cpu_lut  # noqa: E402, F401  (register the int4 and table kernels)
