"""Verification of front plans on a tiny random Llama: measured KL/ppl, stored attrs, rank agreement."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial

from bitplan.errors import BitplanError, DataError
from bitplan.eval import evaluate
from bitplan.search._space import SearchSpace
from bitplan.search._study import is_feasible
from bitplan.search._verify import (
    Verified,
    default_verify_tokens,
    pick_for_verification,
    rank_agreement,
    record_verification,
    verify,
    with_verification,
)

from ._synth import hand_space

WINDOW = 64


def uniform_params(space: SearchSpace, weight: str, kv: str = "k16v16") -> dict[str, str]:
    return {d.name: (weight if d.kind == "weight" else kv) for d in space.decisions}


def trial(
    space: SearchSpace, params: dict[str, str], number: int = 0, constraint: float = -1.0
) -> FrozenTrial:
    """A finished trial as the search writes it (3 objectives; proxy, origin and constraints user attrs)."""
    m = space.metrics(space.index(params))
    dists: dict[str, Any] = {d.name: CategoricalDistribution(d.labels) for d in space.decisions}
    t = optuna.trial.create_trial(
        params=params, distributions=dists, values=[m.quality, m.memory_bytes, m.memory_bytes / 1e7],
        user_attrs={"proxy": {"quality": m.quality, "memory_bytes": m.memory_bytes}, "origin": "test",
                    "constraints": [constraint]},
    )  # fmt: skip
    t.number = number
    return t


@pytest.fixture(scope="module")
def setup(make_random_lm: Callable[..., Any]) -> dict[str, Any]:
    model = make_random_lm("llama")
    space = hand_space(model)
    tokens = torch.randint(0, 256, (2 * WINDOW,), generator=torch.Generator().manual_seed(0))
    return {"model": model, "space": space, "tokens": tokens}


def test_sixteen_bit_plan_is_exact_and_harsher_plans_measure_worse(setup: dict[str, Any]) -> None:
    model, space, tokens = setup["model"], setup["space"], setup["tokens"]
    trials = [
        trial(space, uniform_params(space, "bf16"), 0),
        trial(space, uniform_params(space, "w4g64a"), 1),
        trial(space, uniform_params(space, "w2g64a", "k4v4"), 2),
    ]
    before = [p.detach().clone() for p in model.parameters()]
    out = verify(model, space, trials, tokens, WINDOW, progress=False)
    assert [v.trial for v in out] == [0, 1, 2]
    plain = evaluate(model, tokens=tokens, window=WINDOW, progress=False)
    assert out[0].kl == pytest.approx(0.0, abs=1e-7)
    assert out[0].ppl == pytest.approx(plain.ppl, rel=1e-6)
    assert out[0].tokens == plain.tokens == 2 * (WINDOW - 1)
    assert 0.0 < out[1].kl < out[2].kl
    assert out[2].ppl != out[0].ppl
    assert [v.proxy_quality for v in out] == [t.values[0] for t in trials]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # model untouched
    assert getattr(model, "bitplan_plan", None) is None


def test_verify_rejects_foreign_decisions(setup: dict[str, Any]) -> None:
    space = setup["space"]
    t = trial(space, uniform_params(space, "bf16"))
    t.params["layers.9.mlp.down_proj"] = "bf16"
    with pytest.raises(BitplanError, match=r"layers\.9\.mlp\.down_proj"):
        verify(setup["model"], space, [t], setup["tokens"], WINDOW, progress=False)
    assert verify(setup["model"], space, [], setup["tokens"], WINDOW, progress=False) == []


def test_record_verification_stores_measurements_on_the_trials(setup: dict[str, Any], tmp_path: Path) -> None:
    model, space, tokens = setup["model"], setup["space"], setup["tokens"]
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(directions=["minimize"] * 3, storage=storage, study_name="s")
    for w in ("bf16", "w4g64a", "w2g64a"):
        study.add_trial(trial(space, uniform_params(space, w)))
    done = study.get_trials(deepcopy=False)
    picked = pick_for_verification(done, k=2)
    assert [t.number for t in picked] == [0, 1]
    verified = verify(model, space, picked, tokens, WINDOW, progress=False)
    record_verification(study, verified)
    reopened = optuna.load_study(study_name="s", storage=storage)  # persisted in the study database
    for study_ in (study, reopened):
        fresh = with_verification(study_, study_.get_trials(deepcopy=False))
        for v in verified:
            attrs = fresh[v.trial].user_attrs
            assert attrs["verify_kl"] == pytest.approx(v.kl)
            assert attrs["verify_ppl"] == pytest.approx(v.ppl)
            assert attrs["verify_tokens"] == v.tokens
            assert attrs["origin"] == "test"  # other attrs kept
        assert "verify_kl" not in fresh[2].user_attrs
    assert "verify_kl" not in study.get_trials(deepcopy=False)[0].user_attrs  # storage objects not mutated
    agreement = rank_agreement([t for t in fresh if "verify_kl" in t.user_attrs])  # trials work as input too
    assert agreement["n"] == 2 and agreement["discordant"] == 0 and agreement["best_agrees"] is True
    with pytest.raises(BitplanError, match="trial 7"):
        record_verification(study, [Verified(7, 0.0, 0.0, 1.0, 10, 0.0)])
    with pytest.raises(ValueError, match="trial 2 was not verified"):
        rank_agreement(fresh)


def test_pick_for_verification_feasible_lowest_proxy_distinct(setup: dict[str, Any]) -> None:
    space = setup["space"]
    ts = [
        trial(space, uniform_params(space, "w2g64a"), 0),
        trial(space, uniform_params(space, "bf16"), 1, constraint=5.0),  # infeasible
        trial(space, uniform_params(space, "w4g64a"), 2),
        trial(space, uniform_params(space, "w4g64a"), 3),  # same plan as trial 2
        trial(space, uniform_params(space, "w4g64a", "k4v4"), 4),
    ]
    assert not is_feasible(ts[1]) and is_feasible(ts[0])
    assert [t.number for t in pick_for_verification(ts, k=8)] == [2, 4, 0]
    assert [t.number for t in pick_for_verification(ts, k=2)] == [2, 4]
    assert pick_for_verification(ts, k=0) == []
    with pytest.raises(ValueError):
        pick_for_verification(ts, k=-1)


def _records(proxy: list[float], kl: list[float]) -> list[Verified]:
    return [Verified(i, p, m, 1.0, 100, 0.0) for i, (p, m) in enumerate(zip(proxy, kl, strict=True))]


def test_rank_agreement_perfect_reversed_and_partial() -> None:
    perfect = rank_agreement(_records([0.1, 0.2, 0.3, 0.4], [0.01, 0.05, 0.06, 0.2]))
    assert perfect["discordant_fraction"] == 0.0 and perfect["pairs"] == 6
    assert perfect["kendall_tau"] == pytest.approx(1.0) and perfect["spearman"] == pytest.approx(1.0)
    assert (
        perfect["best_agrees"] is True and perfect["proxy_best_trial"] == perfect["measured_best_trial"] == 0
    )
    reversed_ = rank_agreement(_records([0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]))
    assert reversed_["discordant_fraction"] == 1.0
    assert reversed_["kendall_tau"] == pytest.approx(-1.0) and reversed_["spearman"] == pytest.approx(-1.0)
    assert reversed_["best_agrees"] is False and reversed_["measured_best_trial"] == 3
    one_swap = rank_agreement(_records([0.1, 0.2, 0.3], [0.02, 0.01, 0.5]))
    assert one_swap["discordant"] == 1 and one_swap["discordant_fraction"] == pytest.approx(1 / 3)
    assert one_swap["best_agrees"] is False
    single = rank_agreement(_records([0.1], [0.2]))
    assert (
        single["kendall_tau"] is None
        and single["discordant_fraction"] is None
        and single["best_agrees"] is True
    )
    empty = rank_agreement([])
    assert empty["n"] == 0 and empty["best_agrees"] is None
    assert not any(isinstance(v, float) and math.isnan(v) for v in reversed_.values())


class WordTokenizer:
    """One token per whitespace-separated word (id = the word's number), enough for load_tokens."""

    def encode(self, text: str, add_special_tokens: bool = False, verbose: bool = False) -> list[int]:
        return [int(w) for w in text.split()]


def test_default_verify_tokens_is_the_tail_after_the_profile(tmp_path: Path) -> None:
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(str(i) for i in range(1000)) + "\n", encoding="utf-8")
    ids = default_verify_tokens(WordTokenizer(), path, 300, 250, 100)
    assert ids.dtype == torch.long and ids.tolist() == list(range(300, 500))  # 2 whole windows of 100
    with pytest.raises(DataError, match=r"only 200 tokens after the 800 .*asked for 400") as err:
        default_verify_tokens(WordTokenizer(), path, 800, 400, 100)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="only 0 tokens"):
        default_verify_tokens(WordTokenizer(), path, 5000, 100, 100)
    with pytest.raises(DataError, match="fewer than one window"):
        default_verify_tokens(WordTokenizer(), path, 0, 50, 100)
