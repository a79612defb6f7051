from __future__ import annotations

import pytest

from bitplan.errors import FormatError
from bitplan.formats import parse_kv
from bitplan.sensitivity import Candidates
from bitplan.sensitivity._candidates import parse_kv_set


def test_bit_sets_expand_to_every_pair_but_the_reference() -> None:
    pairs = parse_kv_set("2,4,16")
    assert [str(p) for p in pairs] == ["k2v2", "k2v4", "k2v16", "k4v2", "k4v4", "k4v16", "k16v2", "k16v4"]


def test_a_bit_set_suffix_applies_to_every_pair() -> None:
    pairs = parse_kv_set("3,4s1")
    assert [str(p) for p in pairs] == ["k3v3s1", "k3v4s1", "k4v3s1", "k4v4s1"]
    assert {p.sink for p in parse_kv_set("2,8g16r8s4")} == {4} and parse_kv_set("2,8g16r8s4")[0].recent == 8
    assert parse_kv_set("k4v2s2") == (parse_kv("k4v2s2"),)


def test_candidates_parse_mixes_sets_and_formats_without_duplicates() -> None:
    c = Candidates.parse([], [], ["2,4s1", "k2v2s1", "k8v8"])
    assert [str(k) for k in c.kv] == ["k2v2s1", "k2v4s1", "k4v2s1", "k4v4s1", "k8v8"]


def test_a_bad_bit_set_is_named_as_given() -> None:
    with pytest.raises(FormatError, match=r"^KV bit set '2,5s1': invalid KV format 'k2v5s1'"):
        parse_kv_set("2,5s1")


@pytest.mark.parametrize("bad", ["2,5", "2,4x", "2,,4", "s1", "2,4s"])
def test_bad_kv_sets_fail_with_the_grammar(bad: str) -> None:
    with pytest.raises(FormatError, match="KV"):
        Candidates.parse([], [], [bad])
