"""Drop-in modules that hold packed weights: :class:`QuantLinear` and :class:`QuantEmbedding`.

The packed tensors are registered *buffers*, so ``state_dict()``, ``load_state_dict()`` and ``.to(device)``
see them, and a module built from shapes alone (the constructor) can receive a saved packed state.
Their dtypes are part of the format, not of the model's compute dtype: ``model.to(torch.bfloat16)``
would otherwise silently cast the fp16 scales (a lossy change that breaks the exact byte accounting),
so ``_apply`` keeps each storage buffer's dtype and lets only its device change.

``QuantLinear.forward`` fake-quantizes the input per token (unless its kernel quantizes activations
itself) and hands the multiply to a kernel from :mod:`bitplan.kernels`, named by ``kernel``. A new module
runs the ``reference`` kernel on the canonical buffers (dequantize, ``F.linear``); :meth:`QuantLinear.set_kernel`
re-lays the weight for a faster kernel and releases the canonical buffers, so the module holds one copy. ``QuantEmbedding`` gathers the packed rows of the requested ids and
dequantizes only those, so a lookup never materialises the full float table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from bitplan.errors import FormatError
from bitplan.formats import ActFormat, WeightFormat, parse_act, parse_weight
from bitplan.quantizers import _dq
from bitplan.quantizers._act import fake_quantize_act
from bitplan.quantizers._base import QuantizedWeight, WeightQuantizer, get_weight_quantizer
from bitplan.quantizers.packing import packed_numel

if TYPE_CHECKING:
    from bitplan.kernels import Kernel, LinearSpec, Prepared

__all__ = ["QuantEmbedding", "QuantLinear"]

_STORAGE = ("codes", "scales", "offsets", "qparams", "superscales", "weight")
_KERNEL_PREFIX = "k_"  # buffers of a kernel's prepared layout: k_<name>
_FLOAT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _as_weight_format(fmt: WeightFormat | str) -> WeightFormat:
    return parse_weight(fmt) if isinstance(fmt, str) else fmt


def _as_act_format(fmt: ActFormat | str) -> ActFormat:
    return parse_act(fmt) if isinstance(fmt, str) else fmt


def _quantizer(method: str | WeightQuantizer) -> WeightQuantizer:
    return get_weight_quantizer(method) if isinstance(method, str) else method


class _PackedStorage(nn.Module):
    """Holds one ``[rows, cols]`` weight as packed buffers (or a 16-bit float buffer) with frozen dtypes."""

    weight_format: WeightFormat
    method: str
    weight: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None

    def _init_storage(
        self, rows: int, cols: int, fmt: WeightFormat, method: str, device: torch.device | str | None
    ) -> None:
        self.weight_format = fmt
        self.method = method if fmt.is_quantized else "none"
        self._shape = (rows, cols)
        if not fmt.is_quantized:
            self.register_buffer(
                "weight", torch.zeros(rows, cols, dtype=_FLOAT_DTYPES[fmt.float_dtype], device=device)
            )
            return
        fmt.check_applicable(cols)
        groups = cols // fmt.effective_group(cols)
        self.register_buffer(
            "codes", torch.zeros(rows, packed_numel(cols, fmt.bits), dtype=torch.uint8, device=device)
        )
        if fmt.scale_bits is not None:  # double-quantized: packed parameter codes + fp16 super-scales
            qshape, sshape = _dq.packed_shapes(fmt, rows, cols)
            self.register_buffer("qparams", torch.zeros(qshape, dtype=torch.uint8, device=device))
            self.register_buffer("superscales", torch.zeros(sshape, dtype=torch.float16, device=device))
            return
        self.register_buffer("scales", torch.zeros(rows, groups, dtype=torch.float16, device=device))
        offsets = torch.zeros(rows, groups, dtype=torch.float16, device=device) if fmt.has_offset else None
        self.register_buffer("offsets", offsets)

    def _load_weight(self, qw: QuantizedWeight | torch.Tensor) -> None:
        if isinstance(qw, QuantizedWeight):
            if qw.fmt != self.weight_format or qw.shape != self._shape:
                raise ValueError(
                    f"expected a {self.weight_format} {self._shape} weight, got {qw.fmt} {qw.shape}"
                )
            for name, t in qw.storage().items():
                setattr(self, name, t)
            self.method = qw.method
        else:
            self.weight = qw.detach().to(self.weight.dtype).contiguous()

    def _check_canonical(self) -> None:
        if self._buffers.get("codes" if self.weight_format.is_quantized else "weight") is None:
            raise FormatError(
                f"this {self.weight_format} weight is held in kernel {getattr(self, 'kernel', '?')!r}'s layout; "
                "its canonical buffers were released (apply with kernels='reference' to keep them)"
            )

    @property
    def quantized_weight(self) -> QuantizedWeight:
        """The packed weight as a :class:`QuantizedWeight` (sharing the buffers)."""
        if not self.weight_format.is_quantized:
            raise FormatError(f"{self.weight_format} weights are not quantized")
        self._check_canonical()
        return QuantizedWeight.from_storage(self.weight_format, self._shape, self._stored(), self.method)

    def _stored(self, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The canonical stored tensors (of the given rows only)."""
        return {n: t if rows is None else t[rows] for n in _STORAGE if (t := self._buffers.get(n)) is not None}

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if not self.weight_format.is_quantized:
            self._check_canonical()
            return self.weight.to(dtype)
        return self.quantized_weight.dequantize(dtype)

    @property
    def packed_nbytes(self) -> int:
        """Bytes of the stored weight (codes + scales + offsets), ``== fmt.storage_bits(rows, cols) // 8``."""
        bufs = [t for n, t in self._buffers.items() if _is_storage(n)]
        return sum(t.numel() * t.element_size() for t in bufs if isinstance(t, torch.Tensor))

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:  # type: ignore[override]
        before = {n: b for n, b in self._buffers.items() if b is not None and _is_storage(n)}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:  # a dtype cast: keep the dtype, take the device
                self._buffers[name] = old.to(device=new.device)
        return self


class QuantLinear(_PackedStorage):
    """A linear layer with a packed weight and per-token dynamic activation quantization."""

    kernel: str = "reference"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_format: WeightFormat | str,
        act_format: ActFormat | str = "a16",
        *,
        bias: bool = True,
        method: str = "rtn",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """An empty (all-zero) module of the given shape and formats, e.g. to ``load_state_dict`` into."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.act_format = _as_act_format(act_format)
        self._init_storage(out_features, in_features, _as_weight_format(weight_format), method, device)
        zeros = torch.zeros(out_features, dtype=dtype, device=device)
        self.bias = nn.Parameter(zeros, requires_grad=False) if bias else None

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        fmt: WeightFormat | str,
        act_fmt: ActFormat | str = "a16",
        *,
        method: str | WeightQuantizer = "rtn",
        activations: torch.Tensor | None = None,
        hessian: torch.Tensor | None = None,
    ) -> QuantLinear:
        """Quantize an ``nn.Linear`` or a transformers GPT-2 ``Conv1D`` (weight ``[in, out]``).

        Calibrated methods take ``activations [n, in]``, or ``hessian``: the accumulated ``X^T X / n`` of a
        layer-wise pass (see ``WeightQuantizer.quantize_hessian``)."""
        weight, bias = _linear_weight(module)
        out_features, in_features = weight.shape
        fmt = _as_weight_format(fmt)
        quantizer = _quantizer(method)
        q = cls(
            in_features,
            out_features,
            fmt,
            act_fmt,
            bias=bias is not None,
            method=quantizer.name,
            device=weight.device,
            dtype=bias.dtype if bias is not None else torch.float32,
        )
        if not fmt.is_quantized:
            q._load_weight(weight)
        elif hessian is not None:
            q._load_weight(quantizer.quantize_hessian(weight, fmt, hessian))
        else:
            q._load_weight(quantizer.quantize(weight, fmt, activations=activations))
        if q.bias is not None and bias is not None:
            q.bias.data.copy_(bias.detach())
        return q

    @property
    def spec(self) -> LinearSpec:
        from bitplan.kernels import LinearSpec

        return LinearSpec(self.weight_format, self.act_format, self.out_features, self.in_features)

    def set_kernel(self, kernel: str | Kernel) -> QuantLinear:
        """Re-lay the weight for ``kernel`` (a name or instance) and compute with it from now on.

        Any kernel other than ``reference`` releases the canonical buffers: the module then holds only
        the kernel's layout (``packed_nbytes`` counts it). Needs the canonical buffers, so it runs once.
        """
        from bitplan.kernels import get_kernel

        k = get_kernel(kernel) if isinstance(kernel, str) else kernel
        if k.name == self.kernel:
            return self
        self._check_canonical()
        source = self.quantized_weight if self.weight_format.is_quantized else self.weight
        device = source.codes.device if isinstance(source, QuantizedWeight) else source.device
        if device.type not in k.device_kinds or not k.supports(self.weight_format, device, self._shape, self.act_format):
            raise FormatError(f"kernel {k.name!r} cannot run {self.spec} on {device.type}")
        prepared = k.prepare(source, self.spec)
        for name in [n for n in self._buffers if n.startswith(_KERNEL_PREFIX)]:
            del self._buffers[name]
        if k.name == "reference":
            self._kernel_buffers = {t: t for t in prepared.tensors}
        else:
            for name in _STORAGE:
                if name in self._buffers:
                    self._buffers[name] = None
            self._kernel_buffers = {t: _KERNEL_PREFIX + t for t in prepared.tensors}
            for t, buf in self._kernel_buffers.items():
                self.register_buffer(buf, prepared.tensors[t])
        self._kernel_meta = dict(prepared.meta)
        self._kernel_obj = k
        self.kernel = k.name
        return self

    def prepared(self) -> Prepared:
        """The weight in the current kernel's layout (the module's live buffers, after any ``.to()``)."""
        from bitplan.kernels import Prepared

        names = getattr(self, "_kernel_buffers", None)
        if names is None:  # a new module: the reference kernel on the canonical buffers
            names = {n: n for n in _STORAGE if self._buffers.get(n) is not None}
        tensors = {t: self._buffers[b] for t, b in names.items()}
        return Prepared(self.kernel, self.spec, tensors, getattr(self, "_kernel_meta", {}))  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = getattr(self, "_kernel_obj", None)
        if kernel is None:
            from bitplan.kernels import get_kernel

            kernel = self._kernel_obj = get_kernel(self.kernel)
        if not kernel.quantizes_acts:
            x = fake_quantize_act(x, self.act_format)
        y = kernel.matmul(x, self.prepared())
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight={self.weight_format}, method={self.method}, act={self.act_format}, kernel={self.kernel}"
        )


def _is_storage(name: str) -> bool:
    return name in _STORAGE or name.startswith(_KERNEL_PREFIX)


def is_packed_buffer(name: str) -> bool:
    """A buffer of quantization data (canonical codes/scales/offsets or a kernel's layout), not a float weight."""
    return name != "weight" and _is_storage(name)


def _linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [out, in], bias)`` of an ``nn.Linear`` or a GPT-2 ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.weight.detach(), module.bias
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        Conv1D = ()  # type: ignore[assignment,misc]  # noqa: N806
    if isinstance(module, Conv1D):  # y = x @ W + b with W [in, out], i.e. F.linear(x, W.T, b)
        return module.weight.detach().t(), module.bias
    raise TypeError(
        f"QuantLinear.from_float expects nn.Linear or transformers Conv1D, got {type(module).__name__}"
    )


class QuantEmbedding(_PackedStorage):
    """A quantized ``nn.Embedding``: the table ``[vocab, hidden]`` is grouped along ``hidden``.

    ``forward`` gathers the packed rows of ``ids`` and dequantizes only those, to ``self.dtype`` (the
    original table's dtype; ``.to(dtype)`` / ``.half()`` change it like any float module's).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        weight_format: WeightFormat | str,
        *,
        padding_idx: int | None = None,
        method: str = "rtn",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.dtype = dtype
        self._init_storage(num_embeddings, embedding_dim, _as_weight_format(weight_format), method, device)

    @classmethod
    def from_float(
        cls, embedding: nn.Embedding, fmt: WeightFormat | str, method: str | WeightQuantizer = "rtn"
    ) -> QuantEmbedding:
        weight = embedding.weight.detach()
        fmt = _as_weight_format(fmt)
        quantizer = _quantizer(method)
        q = cls(
            weight.shape[0],
            weight.shape[1],
            fmt,
            padding_idx=embedding.padding_idx,
            method=quantizer.name,
            device=weight.device,
            dtype=weight.dtype,
        )
        q._load_weight(quantizer.quantize(weight, fmt) if fmt.is_quantized else weight)
        return q

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        fmt = self.weight_format
        if not fmt.is_quantized:
            return F.embedding(ids, self.weight).to(self.dtype)
        flat = ids.reshape(-1)
        rows = QuantizedWeight.from_storage(fmt, (flat.numel(), self.embedding_dim), self._stored(flat), self.method)
        return rows.dequantize().reshape(*ids.shape, self.embedding_dim).to(self.dtype)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:  # type: ignore[override]
        # the output dtype follows .to(dtype) / .half() like a float table would
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return (
            f"{self.num_embeddings}, {self.embedding_dim}{pad}, weight={self.weight_format}, "
            f"method={self.method}, dtype={self.dtype}"
        )
