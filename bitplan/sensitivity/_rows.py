"""One scored option: the unit of work every sensitivity engine produces and the table stores."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["Kind", "ScoreRow", "ScoreMethod"]

Kind = Literal["weight", "act", "kv"]
ScoreMethod = Literal["fisher", "kl"]


@dataclass(frozen=True)
class ScoreRow:
    """Harm of quantizing *only* ``unit`` with ``format``.

    ``unit`` is a decision-unit name (``layers.7.mlp.down_proj``) for weights, ``layers.7.acts`` for a
    layer's activation format and ``layers.7.kv`` for its KV cache. ``score`` is in nats per token in
    both methods: the measured mean KL(p_ref || p_quant) ("kl") or its second-order Fisher estimate
    ("fisher"), so the two are directly comparable and additive scores sum to a plan's predicted KL.
    """

    unit: str
    layer: int
    kind: Kind
    format: str  # canonical string of the format actually used (fitted to the unit)
    quantizer: str  # weight quantizer method ("rtn", "hqq", ...); "" for act / kv rows
    method: ScoreMethod
    score: float
    loss_delta: float = math.nan  # change of mean NLL on the calibration tokens ("kl" only)
    params: int = 0  # weights in the unit (weight rows), for memory accounting downstream
    bits: float = math.nan  # stored bits per weight / per cached element of the option
    tokens: int = 0  # calibration tokens behind the score
    seconds: float = 0.0  # compute time attributed to this row

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return (self.unit, self.kind, self.format, self.quantizer, self.method)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
