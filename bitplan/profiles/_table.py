"""The hardware profile: measured rows in a Parquet table whose metadata says what was measured where.

Rows (one :class:`HWRow` each) are of four parts:

* ``linear``: one linear shape x weight format x activation format x kernel at one M (``phase`` decode:
  M = batch; prefill: M = batch x chunk), timed as the module the model would run;
* ``skeleton``: the whole model with every decision-unit linear replaced by a stub, decoding (or
  prefilling) at a given context with a given uniform KV format -- everything no weight plan changes
  (embedding, norms, rotary, attention, the 16-bit lm_head, sampling, the framework's per-step work),
  measured in place rather than summed from pieces;
* ``stub``: one call of that stub, subtracted once per stubbed linear;
* ``fixed``: the pieces of the skeleton timed alone (norm, embedding row, lm_head, rotary, sampling), for
  the report; the prediction uses the skeleton.

Metadata (Parquet key ``bitplan``): kind, schema version, device fingerprint, model fingerprint, batch,
contexts, prefill chunk, compute dtype.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bitplan._io import atomic_path
from bitplan.errors import BitplanError, DataError
from bitplan.profiles._fingerprint import DeviceFingerprint

__all__ = ["HWRow", "HardwareProfile", "ProfileMeta"]

PROFILE_KIND = "bitplan-hw-profile"
SCHEMA_VERSION = 1
PARTS = ("linear", "skeleton", "stub", "fixed")


@dataclass(frozen=True)
class HWRow:
    part: str
    name: str = ""  # fixed: which piece; linear: "lm_head" for the head shape, else ""
    phase: str = "decode"  # decode / prefill
    m: int = 1  # rows of the linear's input (batch, or batch x chunk)
    context: int = 0  # skeleton: cached tokens while decoding
    out_features: int = 0
    in_features: int = 0
    weight: str = ""  # linear: canonical weight format ("bf16" for the model's own nn.Linear)
    act: str = ""
    kv: str = ""  # skeleton: uniform KV format
    kernel: str = ""  # linear: kernel name ("torch" for nn.Linear)
    median_ms: float = 0.0
    p10_ms: float = 0.0
    p90_ms: float = 0.0
    reps: int = 0
    resident_bytes: int = 0  # linear: bytes the kernel's layout holds

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.part, self.name, self.phase, self.m, self.context, self.out_features, self.in_features,
                self.weight, self.act, self.kv, self.kernel)  # fmt: skip


_COLUMNS = [f.name for f in fields(HWRow)]
_INT = {f.name for f in fields(HWRow) if f.type in ("int", int)}
_FLOAT = {f.name for f in fields(HWRow) if f.type in ("float", float)}


@dataclass(frozen=True)
class ProfileMeta:
    device: DeviceFingerprint
    model_fingerprint: str
    model_name: str
    batch: int
    contexts: tuple[int, ...]
    chunk: int
    dtype: str
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """What must match for measured rows to be reused (resume). Not the timing budget (``extra.budget_s``):
        it buys precision, not a different quantity, and every row carries its own reps and p10/p90."""
        return {"device": self.device.to_dict(), "model_fingerprint": self.model_fingerprint, "batch": self.batch,
                "contexts": list(self.contexts), "chunk": self.chunk, "dtype": self.dtype}  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["device"] = self.device.to_dict()
        d["contexts"] = list(self.contexts)
        return {"kind": PROFILE_KIND, "schema_version": SCHEMA_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> ProfileMeta:
        if d.get("kind") != PROFILE_KIND:
            raise DataError(f"{source}: not a bitplan hardware profile (kind {d.get('kind')!r})")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise DataError(f"{source}: unsupported hardware profile schema_version {d.get('schema_version')!r}; this bitplan reads {SCHEMA_VERSION}")
        try:
            return cls(
                device=DeviceFingerprint.from_dict(d["device"], source),
                model_fingerprint=str(d["model_fingerprint"]),
                model_name=str(d.get("model_name", "")),
                batch=int(d["batch"]),
                contexts=tuple(int(c) for c in d["contexts"]),
                chunk=int(d["chunk"]),
                dtype=str(d["dtype"]),
                created=str(d.get("created", "")),
                extra=dict(d.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{source}: hardware profile metadata is malformed ({e})") from None


def rows_to_arrow(rows: list[HWRow], meta: ProfileMeta | None = None) -> pa.Table:
    cols = {c: [getattr(r, c) for r in rows] for c in _COLUMNS}
    types = {c: pa.int64() if c in _INT else pa.float64() if c in _FLOAT else pa.string() for c in _COLUMNS}
    table = pa.table({c: pa.array(v, type=types[c]) for c, v in cols.items()})
    if meta is not None:
        table = table.replace_schema_metadata({"bitplan": json.dumps(meta.to_dict())})
    return table


def arrow_to_rows(table: pa.Table, source: str) -> list[HWRow]:
    missing = [c for c in _COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"{source}: hardware profile lacks column(s) {', '.join(missing)}")
    data = table.select(_COLUMNS).to_pydict()
    rows = [HWRow(**{c: data[c][i] for c in _COLUMNS}) for i in range(table.num_rows)]
    bad = sorted({r.part for r in rows} - set(PARTS))
    if bad:
        raise DataError(f"{source}: unknown row part(s) {', '.join(bad)}")
    return rows


@dataclass(frozen=True)
class HardwareProfile:
    """Measured rows + what they were measured on. Load with :meth:`load`, query with :mod:`._predict`."""

    rows: tuple[HWRow, ...]
    meta: ProfileMeta

    def save(self, path: str | os.PathLike[str]) -> None:
        with atomic_path(path, ".parquet") as tmp:
            pq.write_table(rows_to_arrow(list(self.rows), self.meta), tmp)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> HardwareProfile:
        p = Path(path)
        if not p.is_file():
            raise BitplanError(f"hardware profile {p} does not exist")
        try:
            table = pq.read_table(p)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{p}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
        raw = (table.schema.metadata or {}).get(b"bitplan")
        if raw is None:
            raise DataError(f"{p}: no bitplan metadata; not a hardware profile")
        try:
            meta = ProfileMeta.from_dict(json.loads(raw), str(p))
        except json.JSONDecodeError:
            raise DataError(f"{p}: hardware profile metadata is not JSON") from None
        return cls(tuple(arrow_to_rows(table, str(p))), meta)

    def check_model(self, fingerprint: str, source: str = "hardware profile") -> None:
        if fingerprint != self.meta.model_fingerprint:
            raise BitplanError(
                f"{source} was measured for model {self.meta.model_name or self.meta.model_fingerprint} "
                f"(fingerprint {self.meta.model_fingerprint}), not this one ({fingerprint})"
            )

    def by_part(self, part: str) -> list[HWRow]:
        return [r for r in self.rows if r.part == part]
