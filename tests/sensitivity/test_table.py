"""Sensitivity table: Parquet round trip with identity metadata, clear errors, crash-safe partial store."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bitplan.errors import DataError
from bitplan.sensitivity import ScoreRow, SensitivityTable, TableMeta, describe
from bitplan.sensitivity._table import PartialStore


def _meta(**kw: object) -> TableMeta:
    base = TableMeta(
        model_fingerprint="abcdef0123456789", model_name="m", calib_hash="c0ffee", calib_source="calib.txt",
        tokens=1024, window=512, granularity="fused", dtype="bfloat16", num_kv_heads=2, head_dim=16,
    )  # fmt: skip
    return replace(base, **kw)  # type: ignore[arg-type]


def _rows() -> list[ScoreRow]:
    rows = []
    for layer in range(3):
        for fmt, bits, s in (("w4g64a", 4.5, 0.01), ("w2g64a", 2.5, 0.3)):
            rows.append(ScoreRow(f"layers.{layer}.mlp.down_proj", layer, "weight", fmt, "rtn", "kl", s * (layer + 1), 0.1, 4096, bits, 1024, 0.5))
        rows.append(ScoreRow(f"layers.{layer}.acts", layer, "act", "a8t", "", "fisher", 1e-4 * (3 - layer), bits=8.0))
        rows.append(ScoreRow(f"layers.{layer}.kv", layer, "kv", "k2v2", "", "kl", 0.05 / (layer + 1), bits=3.0))
    return rows


def test_round_trip_keeps_rows_and_metadata(tmp_path: Path) -> None:
    table = SensitivityTable(_rows(), _meta()).with_extra(timings={"kl_seconds": 3.0})
    path = tmp_path / "sens.parquet"
    table.save(path)
    back = SensitivityTable.load(path)
    assert [repr(r) for r in back.rows] == [repr(r) for r in table.rows]  # repr: NaN loss_delta compares equal
    assert back.meta == table.meta
    raw = json.loads(pq.read_schema(path).metadata[b"bitplan"])
    assert raw["schema_version"] == 1 and raw["kind"] == "bitplan.sensitivity"
    assert back.scores("kl")[("layers.2.mlp.down_proj", "w2g64a", "rtn")] == pytest.approx(0.9)
    assert [r.unit for r in back.select("act")] == [f"layers.{i}.acts" for i in range(3)]


def test_duplicate_keys_are_dropped() -> None:
    rows = _rows()
    assert len(SensitivityTable(rows + rows[:3], _meta())) == len(rows)


def test_describe_ranks_units(tmp_path: Path) -> None:
    text = describe(SensitivityTable(_rows(), _meta()), top=2)
    weight = text.split("weight / kl")[1]
    assert weight.index("layers.2.mlp.down_proj") < weight.index("least")  # layer 2 is the most sensitive
    assert "kv / kl" in text and "act / fisher" in text


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:100]), "not a readable Parquet table"),
        (lambda p: p.write_text("hello"), "not a readable Parquet table"),
        (lambda p: pq.write_table(pa.table({"x": [1]}), p), "no bitplan metadata"),
    ],
)
def test_corrupt_tables_fail_clearly(tmp_path: Path, corrupt: object, message: str) -> None:
    path = tmp_path / "sens.parquet"
    SensitivityTable(_rows(), _meta()).save(path)
    corrupt(path)  # type: ignore[operator]
    with pytest.raises(DataError, match=message) as e:
        SensitivityTable.load(path)
    assert "\n" not in str(e.value)


def test_wrong_schema_version_and_other_model(tmp_path: Path) -> None:
    path = tmp_path / "sens.parquet"
    table = SensitivityTable(_rows(), _meta()).to_arrow()
    meta = json.loads(table.schema.metadata[b"bitplan"])
    meta["schema_version"] = 9
    pq.write_table(table.replace_schema_metadata({b"bitplan": json.dumps(meta).encode()}), path)
    with pytest.raises(DataError, match="schema_version 9"):
        SensitivityTable.load(path)
    with pytest.raises(DataError, match="another model"):
        SensitivityTable(_rows(), _meta()).check_model("ffffffffffffffff")
    with pytest.raises(DataError, match="not found"):
        SensitivityTable.load(tmp_path / "missing.parquet")


def test_partial_store_resumes_and_resets_on_other_inputs(tmp_path: Path) -> None:
    out = tmp_path / "sens.parquet"
    rows = _rows()
    store = PartialStore(out, _meta())
    store.append(rows[:4])
    store.append(rows[2:6])  # overlapping write (killed after writing a part): no duplicates
    again = PartialStore(out, _meta())
    assert {r.key for r in again.rows()} == {r.key for r in rows[:6]} and len(again.rows()) == 6
    (again.dir / "part-999999.parquet").write_text("torn")  # unreadable part: ignored, recomputed
    assert len(PartialStore(out, _meta()).rows()) == 6
    other = PartialStore(out, _meta(calib_hash="other"))  # other inputs: progress not reused
    assert other.rows() == []
    other.cleanup()
    assert not other.dir.exists()
