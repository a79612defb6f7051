"""Calibrated weight options (``@gptq``, ``@awq``, ``@smoothquant``) in the profile: quantized once, cached.

A calibrated option is scored on the weights the method really produces, not on a stand-in: GPTQ's
error-compensated codes, AWQ's scaled-and-clipped weights. The profile scores one unit at a time with the
rest of the model in float, so each unit's method sees the float model's inputs to that unit. They are
gathered in one streaming pass over the calibration windows, one decoder layer at a time
(:func:`bitplan._layerwise.quantize_layerwise`, the model left untouched so the float outputs propagate),
and every (unit, option) is quantized right after its layer's statistics are complete. The results are
kept packed (a :class:`~bitplan.quantizers.QuantizedWeight` per member, plus the migrated input scale) in a
temporary file, not in memory, so the Fisher and the measured-KL scorers read the same weights and neither
recomputes them; a layer's input statistics are dropped before the next layer runs.

AWQ and SmoothQuant migrate a scale ``s`` into the op before the unit (``bitplan._smooth``); with every other
unit in float the folded model computes exactly ``Q(W diag(s)) diag(s)^-1`` for this one, which is what is
scored. ``s`` is searched for the unit's own members (at ``tensor`` granularity ``apply_plan`` searches one
scale for all AWQ units of a shared input), and is 1 where ``apply_plan`` could not fold it either.
"""

from __future__ import annotations

import io
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any, cast

import torch
from torch import Tensor, nn

from bitplan.graph import ModelGraph, Unit
from bitplan.quantizers import QuantizedWeight, get_weight_quantizer
from bitplan.sensitivity._candidates import WeightOption

__all__ = ["CalibratedWeights", "is_calibrated", "precompute"]


def is_calibrated(option: WeightOption) -> bool:
    return option.format.is_quantized and get_weight_quantizer(option.method).needs_calibration


@dataclass
class CalibratedWeights:
    """Packed calibrated weights per ``(unit name, option string)``: one per member, and the input scale.

    They are copies of every layer's weights, one per calibrated option (3 options at ~4.5 bits of an 8B model:
    ~13 GB), so they are kept in an unnamed temporary file (in ``TMPDIR``; Linux removes it when it is closed
    or the process dies, even by SIGKILL) and read back one unit at a time: memory holds none of them."""

    entries: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)  # -> (offset, length) in the file
    seconds: float = 0.0
    _file: IO[bytes] | None = field(default=None, repr=False)

    def add(self, unit: str, option: WeightOption | str, value: tuple[list[QuantizedWeight], Tensor | None]) -> None:
        buf = io.BytesIO()
        torch.save(value, buf)
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="bitplan-calibrated-")
        self._file.seek(0, io.SEEK_END)
        self.entries[(unit, str(option))] = (self._file.tell(), buf.tell())
        self._file.write(buf.getbuffer())

    def get(self, unit: str, option: WeightOption | str) -> tuple[list[QuantizedWeight], Tensor | None]:
        offset, length = self.entries[(unit, str(option))]
        assert self._file is not None
        self._file.seek(offset)
        # our own file, written above: its pickles are the QuantizedWeight dataclasses, not arbitrary input
        return cast(tuple[list[QuantizedWeight], Tensor | None], torch.load(io.BytesIO(self._file.read(length)), weights_only=False))

    def dequantized(self, unit: str, option: WeightOption) -> list[Tensor]:
        """The members' ``[out, in]`` weights as the folded model computes them (float32)."""
        packed, s = self.get(unit, option)
        return [q.dequantize() if s is None else q.dequantize() / s for q in packed]

    def __contains__(self, key: tuple[str, WeightOption]) -> bool:
        return (key[0], str(key[1])) in self.entries

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _weight(model: nn.Module, path: str, transposed: bool) -> Tensor:
    param = model.get_submodule(path).weight
    assert isinstance(param, Tensor)
    w = param.detach().float()
    return w.t() if transposed else w


def quantize_option(
    option: WeightOption, weights: list[Tensor], stats: Any, foldable: bool
) -> tuple[list[QuantizedWeight], Tensor | None]:
    """One calibrated option of one unit from its input statistics (:class:`bitplan._smooth.InputStats`)."""
    from bitplan._smooth import MIGRATING, migration_scale

    quantizer = get_weight_quantizer(option.method)
    if option.method not in MIGRATING:
        return [quantizer.quantize_hessian(w, option.format, stats.h) for w in weights], None
    s = migration_scale(option.method, weights, [option.format] * len(weights), stats) if foldable else torch.ones(stats.h.shape[0])
    hs = stats.h / torch.outer(s, s).double()
    return [quantizer.quantize_hessian(w * s, option.format, hs) for w in weights], s


def precompute(
    model: nn.Module,
    graph: ModelGraph,
    calib: Any,
    work: Sequence[tuple[Unit, Sequence[WeightOption]]],
    *,
    progress: bool = False,
) -> CalibratedWeights:
    """Quantize every calibrated option of every unit in ``work`` from the float model's inputs."""
    from bitplan._layerwise import quantize_layerwise
    from bitplan._smooth import input_groups

    out = CalibratedWeights()
    by_layer: dict[int, list[tuple[Unit, list[WeightOption]]]] = {}
    for unit, options in work:
        opts = [o for o in options if is_calibrated(o)]
        if opts and unit.layer is not None:
            by_layer.setdefault(unit.layer, []).append((unit, opts))
    if not by_layer:
        return out
    start = time.perf_counter()

    def paths(i: int) -> list[str]:
        return [u.members[0].path for u, _ in by_layer.get(i, [])]

    def on_layer(i: int, stats: dict[str, Any]) -> None:
        if i not in by_layer:
            return
        groups = input_groups(model, graph, i)
        for unit, opts in by_layer[i]:
            first = unit.members[0].path
            foldable = any(first in g.consumers and g.producer is not None for g in groups)
            weights = [_weight(model, m.path, m.transposed) for m in unit.members]
            for opt in opts:
                out.add(unit.name, opt, quantize_option(opt, weights, stats[first], foldable))

    with torch.no_grad():
        quantize_layerwise(model, graph, calib, on_layer, paths, progress=progress)
    out.seconds = time.perf_counter() - start
    return out
