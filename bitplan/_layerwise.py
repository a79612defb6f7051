"""Layer-wise calibrated quantization: stream calibration data through the model once, layer by layer.

Calibrated methods (GPTQ) need, for every linear, the inputs it will really see: the outputs of the
layers before it *as quantized*, so each layer corrects for the error its predecessors already made. The
standard way, used here: run the model up to the first decoder layer and keep its inputs (hidden states
plus the keyword arguments the model passes every layer: rotary embeddings, masks, positions); then per
layer, (1) run it on every calibration batch with hooks that accumulate each calibrated linear's Hessian
``X^T X``, (2) quantize the layer's units as the plan says, (3) run the *quantized* layer on the same
batches, whose outputs become the next layer's inputs. Only one layer's hidden states (the calibration
tokens x hidden size, in the model's dtype) and the Hessians of one layer's linears are held at a time.
Windows go through one at a time (``batch_size=1``): a layer's attention workspace and the causal mask the
model passes every layer grow with the batch (4 x 2048-token windows: +671 MB on SmolLM2-135M, most of
it attention scores and masks), and the pass is bound by the quantization, not by batching.
The KV cache is not used (``use_cache=False``): calibration is a prefill of whole windows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from bitplan._smooth import InputStats
from bitplan.errors import BitplanError, ModelError
from bitplan.graph import ModelGraph

__all__ = ["calib_windows", "quantize_layerwise"]

_log = logging.getLogger("bitplan")


class _Stop(Exception):
    """Raised by the first layer's pre-hook once its inputs are captured (nothing after it needs to run)."""


def calib_windows(calib: Any) -> torch.Tensor:
    """``[n, window]`` token ids from a :class:`~bitplan.sensitivity.CalibData` or a 1-D/2-D tensor."""
    windows = getattr(calib, "windows", calib)
    if not isinstance(windows, torch.Tensor) or windows.dim() not in (1, 2) or windows.numel() < 2:
        raise BitplanError("calibration data must be token windows [n, window] (CalibData) or a token tensor")
    return windows.reshape(1, -1) if windows.dim() == 1 else windows


def _capture_first_layer(
    model: nn.Module, first: nn.Module, batches: Iterable[torch.Tensor], device: torch.device
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def grab(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), dict(kwargs)))
        raise _Stop

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    model(ids.to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return captured


class _Stats:
    """Per linear: ``X^T X`` (float64), ``sum |x|`` and ``max |x|`` per input channel, and the token count,
    accumulated by forward hooks."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.abs_sums: dict[str, torch.Tensor] = {}
        self.abs_max: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def hook(self, path: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def acc(_m: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            h = self.sums.get(path)
            self.sums[path] = x.T @ x if h is None else h.addmm_(x.T, x)
            a = x.abs()
            prev_sum, prev_max = self.abs_sums.get(path), self.abs_max.get(path)
            self.abs_sums[path] = a.sum(0) if prev_sum is None else prev_sum + a.sum(0)
            self.abs_max[path] = a.amax(0) if prev_max is None else torch.maximum(prev_max, a.amax(0))
            self.counts[path] = self.counts.get(path, 0) + x.shape[0]

        return acc

    def result(self) -> dict[str, InputStats]:
        """``X^T X / n``, mean and max ``|x|`` per linear."""
        out = {}
        for p, h in self.sums.items():
            n = max(1, self.counts[p])
            out[p] = InputStats(h / n, self.abs_sums[p] / n, self.abs_max[p])
        return out


def _run_layer(
    layer: nn.Module, inputs: list[tuple[torch.Tensor, dict[str, Any]]]
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    out = []
    with torch.no_grad():
        for hidden, kwargs in inputs:
            res = layer(hidden, **kwargs)
            out.append(((res[0] if isinstance(res, tuple) else res).detach(), kwargs))
    return out


def quantize_layerwise(
    model: nn.Module,
    graph: ModelGraph,
    calib: Any,
    quantize_layer: Callable[[int, dict[str, InputStats]], None],
    hessian_paths: Callable[[int], list[str]],
    *,
    batch_size: int = 1,
    progress: bool = False,
) -> dict[str, float]:
    """Run the layer-wise pass; ``quantize_layer(i, stats)`` replaces layer ``i``'s units in place.

    ``hessian_paths(i)``: full module paths of layer ``i``'s linears whose input statistics (``X^T X / n`` in
    float64, mean and max ``|x|``) the quantizers need; they are collected from the layer run on its (already
    quantized) inputs and handed to ``quantize_layer``. Returns seconds spent (``capture``, ``hessians``,
    ``quantize``, ``propagate``).
    """
    from tqdm.auto import tqdm

    from bitplan.loading import _param_device

    windows = calib_windows(calib)
    device = _param_device(model)
    timings = {"capture": 0.0, "hessians": 0.0, "quantize": 0.0, "propagate": 0.0}
    t = time.perf_counter()
    layers = [model.get_submodule(info.path) for info in graph.layers]
    if not layers:
        raise ModelError("calibrated quantization needs a model with decoder layers")
    batches = [windows[i : i + batch_size] for i in range(0, windows.shape[0], batch_size)]
    was_training = model.training
    model.eval()
    try:
        inputs = _capture_first_layer(model, layers[0], batches, device)
        if len(inputs) != len(batches):
            raise ModelError("the first decoder layer was not called for every calibration batch")
        timings["capture"] = time.perf_counter() - t
        for i in tqdm(range(len(layers)), desc="calibrate", unit="layer", disable=not progress):
            t = time.perf_counter()
            paths = hessian_paths(i)
            acc = _Stats()
            handles = [model.get_submodule(p).register_forward_hook(acc.hook(p)) for p in paths]
            try:
                if paths:
                    _run_layer(layers[i], inputs)
            finally:
                for h in handles:
                    h.remove()
            stats = acc.result()
            timings["hessians"] += time.perf_counter() - t
            t = time.perf_counter()
            quantize_layer(i, stats)
            del stats
            timings["quantize"] += time.perf_counter() - t
            t = time.perf_counter()
            if i + 1 < len(layers):
                inputs = _run_layer(layers[i], inputs)
            timings["propagate"] += time.perf_counter() - t
    finally:
        model.train(was_training)
    _log.info("layer-wise calibration: %s", ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    return timings
