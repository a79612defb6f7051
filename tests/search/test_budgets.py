"""Budgets: command-line parsing of sizes and latencies, and one-line errors that name the flag."""

from __future__ import annotations

import pytest

from bitplan.errors import BitplanError
from bitplan.search import Budgets, parse_bytes, parse_latency


@pytest.mark.parametrize(
    "text, expected",
    [
        ("60MB", 60e6), ("60 mb", 60e6), ("1.5GiB", 1.5 * 2**30), ("500kB", 5e5), ("2KiB", 2048),
        ("500000000", 5e8), ("1e9", 1e9), ("12b", 12), (123.0, 123.0), (7, 7.0),
    ],
)  # fmt: skip
def test_parse_bytes(text: str | float, expected: float) -> None:
    assert parse_bytes(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text, expected",
    [("12ms", (12.0, None)), ("12", (12.0, None)), ("0.5s", (500.0, None)), ("0.6x", (None, 0.6)),
     (" 0.6X ", (None, 0.6)), (8, (8.0, None))],
)  # fmt: skip
def test_parse_latency(text: str | float, expected: tuple[float | None, float | None]) -> None:
    assert parse_latency(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"max_memory": "60 parsecs"}, "--max-memory"), ({"max_memory": "-5MB"}, "--max-memory"),
        ({"max_memory": "0MB"}, "--max-memory"), ({"max_memory": ""}, "--max-memory"),
        ({"max_latency": "fast"}, "--max-latency"), ({"max_latency": "0x"}, "--max-latency"),
        ({"max_latency": "-3ms"}, "--max-latency"), ({"max_latency": "12us"}, "--max-latency"),
        ({"max_avg_bits": "abc"}, "--max-avg-bits"), ({"max_avg_bits": "-1"}, "--max-avg-bits"),
        ({"max_avg_bits": "0"}, "--max-avg-bits"), ({"max_avg_bits": "nan"}, "--max-avg-bits"),
        ({"max_kv_bits": "inf"}, "--max-kv-bits"), ({"max_kv_bits": 0}, "--max-kv-bits"),
    ],
)  # fmt: skip
def test_bad_budgets_name_the_flag(kwargs: dict[str, str | float], flag: str) -> None:
    with pytest.raises(BitplanError, match=flag) as e:
        Budgets.parse(**kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "kwargs, flag",
    [({"max_avg_bits": -1.0}, "--max-avg-bits"), ({"max_memory": 0.0}, "--max-memory"),
     ({"max_latency_ms": float("nan")}, "--max-latency"), ({"max_latency_ratio": -0.5}, "--max-latency")],
)  # fmt: skip
def test_constructor_checks_too(kwargs: dict[str, float], flag: str) -> None:
    with pytest.raises(BitplanError, match=f"{flag} must be positive"):
        Budgets(**kwargs)


def test_parse_and_resolve() -> None:
    b = Budgets.parse(max_avg_bits="4.25", max_memory="1.5GiB", max_kv_bits=4, max_latency="0.6x")
    assert b == Budgets(max_avg_bits=4.25, max_memory=1.5 * 2**30, max_kv_bits=4.0, max_latency_ratio=0.6)
    assert b.latency_limit(20.0) == pytest.approx(12.0)
    assert b.active() == ["max_avg_bits", "max_memory", "max_kv_bits", "max_latency_ratio"]
    assert "0.6x of 16-bit" in b.describe() and "1610.6 MB" in b.describe()
    ms = Budgets.parse(max_latency="0.5s")
    assert ms.max_latency_ms == 500.0 and ms.latency_limit(20.0) == 500.0
    assert (
        Budgets().active() == []
        and Budgets().describe() == "no budgets"
        and Budgets().latency_limit(9.0) is None
    )
    with pytest.raises(BitplanError, match="not both"):
        Budgets(max_latency_ms=10.0, max_latency_ratio=0.5)
