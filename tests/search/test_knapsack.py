"""The knapsack: exact against brute force on tiny spaces, honest infeasibility messages, seeds."""

from __future__ import annotations

import itertools
import re
from typing import Any

import numpy as np
import pytest

from bitplan.errors import BitplanError
from bitplan.graph import ModelGraph, build_graph
from bitplan.search import Budgets, BytesCostModel, LatencyTable, SearchSpace
from bitplan.search._knapsack import check_feasible, measure, minimum, resources, seed_choices, solve
from bitplan.search._space import Decision, Option

from ._synth import synth_table

FIELDS = {
    "avg_bits": "max_avg_bits",
    "memory": "max_memory",
    "kv_bits": "max_kv_bits",
    "latency": "max_latency_ms",
}


@pytest.fixture(scope="module")
def graph(make_random_lm: Any) -> ModelGraph:
    return build_graph(make_random_lm("llama"))


def _tiny_space(graph: ModelGraph, seed: int, n_options: int = 3) -> tuple[SearchSpace, LatencyTable]:
    """Three weight units, one act layer and one KV layer with random options (several scored 0)."""
    rng = np.random.default_rng(seed)
    decisions = []
    for u in graph.units("fused")[:3]:
        opts = [Option("bf16", 0.0, 16.0 * u.numel)]
        for k in range(n_options - 1):
            score = float(rng.choice([0.0, rng.exponential(1.0)], p=[0.2, 0.8]))
            opts.append(
                Option(f"w{8 - k}g64a", score, float(rng.integers(2, 16) * u.numel + rng.integers(0, 999)))
            )
        decisions.append(
            Decision(u.name, "weight", (int(u.layer or 0),), (u.name,), u.numel, u.in_features, tuple(opts))
        )
    acts = [
        Option("a16", 0.0),
        *(Option(f"a{b}t", float(rng.exponential(0.1)), nominal_bits=b) for b in (8, 4)),
    ]
    decisions.append(Decision("layers.0.acts", "act", (0,), options=tuple(acts[:n_options])))
    kv = [Option("k16v16", 0.0, 0.0, 256.0, 16.0)]
    for k in range(n_options - 1):
        bits = float(rng.integers(2, 9))
        kv.append(
            Option(f"k{k}", float(rng.exponential(0.5)), 0.0, 256.0 * bits / 16 + rng.uniform(0, 8), bits)
        )
    decisions.append(Decision("layers.1.kv", "kv", (1,), options=tuple(kv)))
    space = SearchSpace(graph, tuple(decisions), context=64)
    per = [rng.uniform(0.0, 1.0, len(d.options)) for d in space.decisions]
    return space, LatencyTable(per, 0.5, "random")


def _brute(space: SearchSpace, latency: LatencyTable) -> list[tuple[list[int], dict[str, float]]]:
    ranges = [range(len(d.options)) for d in space.decisions]
    return [(list(idx), measure(space, idx, latency)) for idx in itertools.product(*ranges)]


def _meets(values: dict[str, float], limits: dict[str, float]) -> bool:
    return all(values[k] <= v for k, v in limits.items())


@pytest.mark.parametrize("seed", range(40))
def test_solve_is_exact_against_brute_force(graph: ModelGraph, seed: int) -> None:
    space, lat = _tiny_space(graph, seed, n_options=3 + seed % 2)
    plans = _brute(space, lat)
    rng = np.random.default_rng(1000 + seed)
    limits = {}
    for name in FIELDS:  # each budget at a random quantile of what plans reach, or below all of them
        if rng.random() < 0.6:
            q = rng.uniform(-0.1, 0.5)
            values = [v[name] for _, v in plans]
            limits[name] = float(np.quantile(values, q) if q >= 0 else min(values) * (1 + q))
    budgets = Budgets(**{FIELDS[k]: v for k, v in limits.items()})
    feasible = [v for _, v in plans if _meets(v, limits)]
    idx = solve(space, budgets, lat)
    if feasible:
        assert idx is not None
        got = measure(space, idx, lat)
        assert _meets(got, limits)
        assert got["score"] == pytest.approx(min(v["score"] for v in feasible), rel=1e-9, abs=1e-12)
        check_feasible(space, budgets, lat)
        for name in limits:  # minimum: the smallest value of one resource within the other budgets
            others = {k: v for k, v in limits.items() if k != name}
            want = min(v[name] for _, v in plans if _meets(v, others))
            assert minimum(space, name, budgets, lat) == pytest.approx(want, rel=1e-9)
        return
    assert idx is None
    with pytest.raises(BitplanError) as e:
        check_feasible(space, budgets, lat)
    msg = str(e.value)
    assert "\n" not in msg
    alone = {k: min(v[k] for _, v in plans) for k, lim in limits.items() if min(v[k] for _, v in plans) > lim}
    if not alone:
        assert "cannot" in msg and "be met" in msg
        return
    for name, smallest in alone.items():  # the message states each smallest value (as printed)
        flag = "--" + FIELDS[name].replace("_", "-").removesuffix("-ms")
        part = msg.split(flag, 1)[1]
        number = re.search(r"reaches is ([0-9.]+)( [kMG]?B)?", part)
        assert number is not None, msg
        unit = {None: 1, " B": 1, " kB": 1e3, " MB": 1e6, " GB": 1e9}[number.group(2)]
        assert float(number.group(1)) * unit == pytest.approx(smallest, rel=5e-3, abs=5e-3), msg


def test_resources_are_the_metrics(graph: ModelGraph) -> None:
    space = SearchSpace.from_table(synth_table(graph), graph)
    lat = BytesCostModel().latency(space)
    table = resources(space, Budgets(), lat)
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = [int(rng.integers(len(d.options))) for d in space.decisions]
        exact = measure(space, idx, lat)
        for name, r in table.items():
            tol = 1.0 if name == "memory" else 1e-9 * max(abs(exact[name]), 1.0)  # bits/8 vs floor(bits/8)
            assert 0 <= r.value(idx) - exact[name] + 1e-9 <= tol + 1e-9


def test_equal_harm_goes_to_fewer_bytes(graph: ModelGraph) -> None:
    # w8g64a scores exactly 0 like bf16 in the synthetic table; a8t is cheap but not free
    space = SearchSpace.from_table(synth_table(graph), graph)
    idx = solve(space, Budgets())
    assert idx is not None
    labels = space.labels(idx)
    assert {v for k, v in labels.items() if not k.endswith((".acts", ".kv"))} == {"w8g64a"}
    assert {v for k, v in labels.items() if k.endswith((".acts", ".kv"))} == {"a16", "k16v16"}


def test_ties_by_hand(graph: ModelGraph) -> None:
    u = graph.units("fused")[0]
    n = u.numel
    weight = (Option("bf16", 0.0, 16.0 * n), Option("w8g64a", 0.0, 8.5 * n), Option("w4g64a", 0.1, 4.5 * n),
              Option("w4g64a@hqq", 0.05, 4.5 * n), Option("w4g64a@x", 0.05, 4.5 * n + 64))  # fmt: skip
    acts = (Option("a16", 0.0), Option("a8t", 0.0, nominal_bits=8.0), Option("a4t", 0.2, nominal_bits=4.0))
    space = SearchSpace(graph, (
        Decision(u.name, "weight", (0,), (u.name,), n, u.in_features, weight),
        Decision("layers.0.acts", "act", (0,), options=acts),
    ))  # fmt: skip
    assert space.labels(solve(space, Budgets()) or []) == {u.name: "w8g64a", "layers.0.acts": "a8t"}
    fewest = solve(space, Budgets(), objective="avg_bits")  # equal bits: the lower harm wins
    assert fewest is not None and space.labels(fewest)[u.name] == "w4g64a@hqq"
    tight = measure(space, space.index({u.name: "w4g64a@x"}))["memory"]
    assert space.labels(solve(space, Budgets(max_memory=tight)) or [])[u.name] == "w4g64a@hqq"  # fewer bytes
    assert minimum(space, "memory", Budgets(max_memory=1.0)) == measure(space, fewest)["memory"]


def test_infeasible_messages(graph: ModelGraph) -> None:
    space = SearchSpace.from_table(synth_table(graph), graph)
    lat = BytesCostModel().latency(space)
    smallest = measure(space, space.uniform(weight="w2g64a") or [], lat)["avg_bits"]
    with pytest.raises(BitplanError) as e:
        check_feasible(space, Budgets(max_avg_bits=1.5), lat)
    assert str(e.value) == (
        "--max-avg-bits 1.5 is infeasible: the smallest average weight bits any plan in this search space "
        f"reaches is {smallest:.2f} (w2g64a everywhere)"
    )
    with pytest.raises(
        BitplanError, match=r"^--max-kv-bits 1 is infeasible: .* is 2\.00 \(k2v2 everywhere\)"
    ):
        check_feasible(space, Budgets(max_kv_bits=1.0), lat)
    with pytest.raises(BitplanError, match=r"--max-latency 0\.1x is infeasible: .* is 0\.\d+x of 16-bit"):
        check_feasible(space, Budgets(max_latency_ratio=0.1), lat)
    with pytest.raises(BitplanError, match="needs a latency cost model"):
        check_feasible(space, Budgets(max_latency_ratio=0.5))


def test_joint_infeasibility_names_both(graph: ModelGraph) -> None:
    # a latency model where fewer bits are slower (as unpacking can be): few bits and speed conflict
    space = SearchSpace.from_table(synth_table(graph), graph)
    per = [
        np.array([1 / o.nominal_bits if d.kind == "weight" else 0.0 for o in d.options])
        for d in space.decisions
    ]
    lat = LatencyTable(per, 0.0, "fewer bits are slower")
    n = sum(d.kind == "weight" for d in space.decisions)
    budgets = Budgets(max_avg_bits=2.6, max_latency_ms=0.1 * n)
    for alone in (Budgets(max_avg_bits=2.6), Budgets(max_latency_ms=0.1 * n)):
        check_feasible(space, alone, lat)
    assert solve(space, budgets, lat) is None
    with pytest.raises(BitplanError) as e:
        check_feasible(space, budgets, lat)
    msg = str(e.value)
    assert msg.startswith(f"--max-avg-bits 2.6 and --max-latency {0.1 * n:g}ms cannot both be met: ")
    smallest = minimum(space, "latency", Budgets(max_avg_bits=2.6), lat)
    assert smallest > 0.1 * n and f"the smallest decode latency is {smallest:.4g} ms" in msg


def test_seeds(graph: ModelGraph) -> None:
    space = SearchSpace.from_table(synth_table(graph), graph)
    lat = BytesCostModel().latency(space)
    ref = measure(space, [0] * len(space.decisions), lat)
    budgets = Budgets(max_memory=0.45 * ref["memory"], max_kv_bits=6.0, max_latency_ratio=0.6)
    seeds = seed_choices(space, budgets, lat, levels=4)
    labels = [label for label, _ in seeds]
    assert len(set(labels)) == len(labels) and len({tuple(i) for _, i in seeds}) == len(seeds)
    uniform = [label for label in labels if label.startswith("uniform ")]
    assert 0 < len(uniform) <= 40
    assert {"uniform bf16 k16v16", "uniform w4g64a k16v16", "uniform w3g64a@hqq k16v16", "uniform bf16 k2v2",
            "uniform bf16 a8t k16v16", "uniform w2g64a k2v2"} <= set(uniform)  # fmt: skip
    limits = {"memory": 0.45 * ref["memory"], "kv_bits": 6.0, "latency": 0.6 * lat.reference()}
    knapsack = [(label, i) for label, i in seeds if label.startswith("knapsack")]
    optimum = [(label, i) for label, i in seeds if "knapsack optimum" in label]
    assert len(optimum) == 1 and optimum[0][1] == solve(space, budgets, lat)
    assert (
        optimum[0][0] == "uniform w8g64a k4v4 (knapsack optimum)"
    )  # free 8-bit weights, 4-bit KV: no more needed
    assert len(knapsack) >= 4 and any(label.startswith("knapsack memory<=") for label, _ in knapsack)
    for label, idx in [*knapsack, *optimum]:
        assert _meets(measure(space, idx, lat), limits), label
    best = measure(space, optimum[0][1], lat)["score"]
    assert all(measure(space, i, lat)["score"] >= best for _, i in knapsack)  # the sweep trades harm for cost
    # infeasible budgets: only the uniform plans (the search reports the error before it seeds)
    none = seed_choices(space, Budgets(max_avg_bits=1.0), lat)
    assert none and all(label.startswith("uniform ") for label, _ in none)


def test_main_sized_space_beats_every_uniform_plan(make_random_lm: Any) -> None:
    g = build_graph(make_random_lm("llama", num_hidden_layers=30))
    space = SearchSpace.from_table(synth_table(g), g, prune_kv=False)
    assert len(space.decisions) == 30 * 6
    lat = BytesCostModel().latency(space)
    budgets = Budgets(max_avg_bits=4.3, max_kv_bits=5.0, max_latency_ratio=0.5)
    idx = solve(space, budgets, lat)
    assert idx is not None
    best = measure(space, idx, lat)
    limits = {"avg_bits": 4.3, "kv_bits": 5.0, "latency": 0.5 * lat.reference()}
    assert _meets(best, limits)
    for _, u in seed_choices(space, budgets, lat, levels=2):
        values = measure(space, u, lat)
        if _meets(values, limits):
            assert best["score"] <= values["score"] + 1e-12
