"""The sensitivity table: scored options as a Parquet file with identity metadata, plus a resume store.

Identity. A table is only valid for one model (fingerprint), one set of calibration tokens (hash of the
token ids), one window length, one granularity and one compute dtype; these go into the Parquet
schema metadata (key ``bitplan``) together with the schema version, so a table is reused exactly when
the same inputs are asked for again, and refused for another model.

Resume. Profiling the main model takes minutes to hours. While it runs, finished groups of rows are
written as small Parquet part files into ``<output>.partial/`` (each written atomically, with the
identity beside them). A killed run restarted with the same inputs reads the parts, skips the rows
already there and computes only the rest; the final table is written atomically and the part
directory removed. A row is identified by ``(unit, kind, format, quantizer, method)``, so a part
written twice (killed between writing it and recording progress) cannot duplicate rows.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bitplan._io import atomic_path, atomic_write_json
from bitplan.errors import DataError
from bitplan.sensitivity._rows import ScoreRow

__all__ = ["SCHEMA_VERSION", "SensitivityTable", "TableMeta", "describe", "rank_units"]

SCHEMA_VERSION = 1
TABLE_KIND = "bitplan.sensitivity"
_META_KEY = b"bitplan"

ARROW_SCHEMA = pa.schema(
    [
        ("unit", pa.string()),
        ("layer", pa.int32()),
        ("kind", pa.string()),
        ("format", pa.string()),
        ("quantizer", pa.string()),
        ("method", pa.string()),
        ("score", pa.float64()),
        ("loss_delta", pa.float64()),
        ("params", pa.int64()),
        ("bits", pa.float64()),
        ("tokens", pa.int64()),
        ("seconds", pa.float64()),
    ]
)
_IDENTITY = ("model_fingerprint", "calib_hash", "tokens", "window", "granularity", "dtype")


@dataclass(frozen=True)
class TableMeta:
    model_fingerprint: str
    model_name: str
    calib_hash: str
    calib_source: str
    tokens: int
    window: int
    granularity: str
    dtype: str
    num_kv_heads: int
    head_dim: int
    candidates: dict[str, list[str]] = field(default_factory=dict)
    bitplan_version: str = ""
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # kv_reduction, k_vs_v, additivity, timings

    def identity(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _IDENTITY}

    def to_dict(self) -> dict[str, Any]:
        return {"kind": TABLE_KIND, "schema_version": SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> TableMeta:
        if d.get("kind") != TABLE_KIND:
            raise DataError(f"{source}: not a bitplan sensitivity table (kind {d.get('kind')!r})")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise DataError(f"{source}: unsupported sensitivity table schema_version {d.get('schema_version')!r}; this bitplan reads {SCHEMA_VERSION}")
        names = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.default is not None and f.name not in d and f.name in _IDENTITY]
        if missing:
            raise DataError(f"{source}: table metadata lacks {', '.join(missing)}")
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as e:
            raise DataError(f"{source}: malformed table metadata ({e})") from None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _rows_to_arrow(rows: Sequence[ScoreRow], meta: TableMeta | None) -> pa.Table:
    cols = {name: [getattr(r, name) for r in rows] for name in ARROW_SCHEMA.names}
    table = pa.Table.from_pydict(cols, schema=ARROW_SCHEMA)
    if meta is not None:
        table = table.replace_schema_metadata({_META_KEY: json.dumps(meta.to_dict()).encode()})
    return table


def _read_parquet(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except FileNotFoundError:
        raise DataError(f"{path}: sensitivity table not found") from None
    except (pa.ArrowException, OSError) as e:
        msg = " ".join(str(e).split())[:200]
        raise DataError(f"{path}: not a readable Parquet table ({msg})") from None


def _arrow_to_rows(table: pa.Table, source: str) -> list[ScoreRow]:
    missing = [n for n in ARROW_SCHEMA.names if n not in table.column_names]
    if missing:
        raise DataError(f"{source}: sensitivity table lacks column(s) {', '.join(missing)}")
    try:
        table = table.select(ARROW_SCHEMA.names).cast(ARROW_SCHEMA)
    except (pa.ArrowException, ValueError) as e:
        raise DataError(f"{source}: sensitivity table has columns of the wrong type ({e})") from None
    return [ScoreRow(**rec) for rec in table.to_pylist()]


def _dedupe(rows: Iterable[ScoreRow]) -> list[ScoreRow]:
    seen: dict[tuple[str, ...], ScoreRow] = {}
    for r in rows:
        seen.setdefault(r.key, r)
    return list(seen.values())


class SensitivityTable:
    """Scored options of one model on one calibration set (see the module docstring)."""

    def __init__(self, rows: Sequence[ScoreRow], meta: TableMeta) -> None:
        self.rows = _dedupe(rows)
        self.meta = meta

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        kinds = {k: sum(r.kind == k for r in self.rows) for k in ("weight", "act", "kv")}
        return f"SensitivityTable({len(self.rows)} rows {kinds}, model {self.meta.model_fingerprint}, {self.meta.tokens} tokens)"

    # -- queries ----------------------------------------------------------------------------------
    @property
    def methods(self) -> list[str]:
        return sorted({r.method for r in self.rows})

    def select(self, kind: str | None = None, method: str | None = None) -> list[ScoreRow]:
        return [r for r in self.rows if (kind is None or r.kind == kind) and (method is None or r.method == method)]

    def scores(self, method: str) -> dict[tuple[str, str, str], float]:
        """``(unit, format, quantizer) -> score`` for one scoring method (the search's additive proxy)."""
        return {(r.unit, r.format, r.quantizer): r.score for r in self.rows if r.method == method}

    def with_extra(self, **items: Any) -> SensitivityTable:
        return SensitivityTable(self.rows, replace(self.meta, extra={**self.meta.extra, **items}))

    def check_model(self, fingerprint: str, source: str = "sensitivity table") -> None:
        if fingerprint != self.meta.model_fingerprint:
            raise DataError(
                f"{source} was profiled on another model ('{self.meta.model_name}', fingerprint "
                f"{self.meta.model_fingerprint}); this model's fingerprint is {fingerprint}"
            )

    # -- I/O --------------------------------------------------------------------------------------
    def to_arrow(self) -> pa.Table:
        return _rows_to_arrow(self.rows, self.meta)

    def save(self, path: str | os.PathLike[str]) -> None:
        with atomic_path(path, suffix=".parquet") as tmp:
            pq.write_table(self.to_arrow(), tmp)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SensitivityTable:
        p = Path(path)
        table = _read_parquet(p)
        raw = (table.schema.metadata or {}).get(_META_KEY)
        if raw is None:
            raise DataError(f"{p}: Parquet file has no bitplan metadata; not a sensitivity table")
        try:
            meta = TableMeta.from_dict(json.loads(raw), str(p))
        except json.JSONDecodeError:
            raise DataError(f"{p}: corrupted bitplan metadata") from None
        return cls(_arrow_to_rows(table, str(p)), meta)


class PartialStore:
    """Crash-safe progress for one profiling run: ``<output>.partial/`` with atomic part files."""

    def __init__(self, output: str | os.PathLike[str], meta: TableMeta) -> None:
        self.output = Path(output)
        self.dir = self.output.with_name(self.output.name + ".partial")
        self.meta = meta
        ident = self.dir / "identity.json"
        if self.dir.is_dir():
            try:
                same = json.loads(ident.read_text()) == meta.identity()
            except (OSError, json.JSONDecodeError):
                same = False
            if not same:  # progress of other inputs: not ours to reuse
                shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if not ident.exists():
            atomic_write_json(ident, meta.identity())
        self._count = len(self._parts())

    def _parts(self) -> list[Path]:
        return sorted(self.dir.glob("part-*.parquet"))

    def rows(self) -> list[ScoreRow]:
        """Rows already finished (parts that cannot be read -- a torn write is impossible, but a
        foreign file is not -- are ignored and recomputed)."""
        out: list[ScoreRow] = []
        for part in self._parts():
            try:
                out.extend(_arrow_to_rows(pq.read_table(part), str(part)))
            except (pa.ArrowException, OSError, DataError):
                continue
        return _dedupe(out)

    def append(self, rows: Sequence[ScoreRow]) -> None:
        if not rows:
            return
        self._count += 1
        with atomic_path(self.dir / f"part-{self._count:06d}.parquet") as tmp:
            pq.write_table(_rows_to_arrow(rows, None), tmp)

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def rank_units(rows: Iterable[ScoreRow]) -> list[ScoreRow]:
    """One row per unit -- its harshest (lowest-bit) option -- most sensitive first.

    Ranking every unit at its lowest-bit option compares units under the same kind of stress.
    """
    harshest: dict[str, ScoreRow] = {}
    for r in rows:
        cur = harshest.get(r.unit)
        if cur is None or (r.bits, -r.score) < (cur.bits, -cur.score):
            harshest[r.unit] = r
    return sorted(harshest.values(), key=lambda r: r.score, reverse=True)


def describe(table: SensitivityTable, top: int = 10) -> str:
    """Human summary: per kind and method, the most and least sensitive units at their harshest option.

    A unit's harshest option is its lowest-bit one (fewest bits per weight / element), so units are
    compared at the same kind of stress; the option used is printed beside each unit.
    """
    m = table.meta
    lines = [
        f"sensitivity table: model '{m.model_name}' ({m.model_fingerprint}), {m.tokens} calibration tokens "
        f"({m.window}-token windows, {m.calib_source or 'tokens'}), {m.granularity} units, {m.dtype} compute",
    ]
    for kind in ("weight", "act", "kv"):
        for method in table.methods:
            rows = table.select(kind, method)
            if not rows:
                continue
            ranked = rank_units(rows)
            n = min(top, len(ranked))
            lines.append(f"\n{kind} / {method}: {len(rows)} rows over {len(ranked)} units")
            lines.append(f"  most sensitive ({n}):")
            lines += [f"    {r.unit:<34} {r.format:<10} {r.score:.3e}" for r in ranked[:n]]
            lines.append(f"  least sensitive ({n}):")
            lines += [f"    {r.unit:<34} {r.format:<10} {r.score:.3e}" for r in ranked[::-1][:n]]
    extra = m.extra
    if "kv_reduction" in extra:
        kr = extra["kv_reduction"]
        lines.append(f"\nKV space: {kr.get('summary', '')}")
    if "k_vs_v" in extra:
        kv = extra["k_vs_v"]
        k_more = sorted(int(i) for i, v in kv.items() if v.get("k_more_sensitive"))
        lines.append(f"K more sensitive than V in {len(k_more)} of {len(kv)} layers")
    if "additivity" in extra:
        for meth, a in extra["additivity"].get("stats", {}).items():
            lines.append(
                f"additivity ({meth}): Spearman rho {a['spearman']:.3f}, median relative error "
                f"{a['median_rel_err']:.2f}, sum/measured {a['median_ratio']:.2f} over {a['n']} plans"
            )
    if "timings" in extra:
        lines.append("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in extra["timings"].items()))
    return "\n".join(lines)
