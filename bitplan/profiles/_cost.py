"""The search's cost model from a measured hardware profile (replaces the bytes-based stand-in).

Per decision and option the additive table charges what ``predict`` would: a weight option the sum of its
linears' measured kernel times (16-bit activations), an activation option the change it makes to its
layer's linears at their 16-bit weights, a KV option its measured attention delta at the search's context;
the fixed part is the skeleton. Activation formats interact with weight formats (they choose the kernel),
so trials are charged the exact ``predict`` of their plan (``LatencyTable.exact``), and only the knapsack
seeds use the additive table.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bitplan.errors import BitplanError
from bitplan.formats import ActFormat, parse_act, parse_kv, parse_weight
from bitplan.profiles._fingerprint import device_fingerprint
from bitplan.profiles._predict import ProfileIndex, predict
from bitplan.profiles._table import HardwareProfile
from bitplan.search._cost import CostModel, LatencyTable
from bitplan.search._space import SearchSpace

__all__ = ["ProfileCostModel", "load_profile"]

_A16 = ActFormat()


def load_profile(path: str | os.PathLike[str], device: str = "cpu", *, allow_foreign: bool = False) -> HardwareProfile:
    """Load a profile and refuse it unless it was measured on this ``device`` (or ``allow_foreign``)."""
    profile = HardwareProfile.load(path)
    profile.meta.device.check_matches(device_fingerprint(device), allow_foreign=allow_foreign, source=f"hardware profile {path}")
    return profile


@dataclass(frozen=True)
class _ExactLatency:
    """Picklable: the predicted decode ms of a choice's plan (one index of the profile, built once)."""

    space: SearchSpace
    index: ProfileIndex

    def __call__(self, choice: Sequence[int]) -> float:
        plan = self.space.to_plan(list(choice))
        return predict(plan, self.index, self.space.graph, batch=self.space.batch, context=self.space.context).decode_ms


@dataclass(frozen=True)
class ProfileCostModel(CostModel):
    """Measured latency (``bitplan profile-hw``) for the search's objectives and budgets."""

    profile: HardwareProfile
    name: str = "profile"

    def kernel_latency(self) -> Callable[[Any, Any], float | None]:
        return ProfileIndex(self.profile).kernel_latency()

    def latency(self, space: SearchSpace) -> LatencyTable:
        g, prof = space.graph, self.profile
        prof.check_model(g.fingerprint)
        if space.batch != prof.meta.batch:
            raise BitplanError(f"the hardware profile was measured at batch {prof.meta.batch}, the search asks for batch {space.batch}")
        idx = ProfileIndex(prof)
        stub = idx.stub.get("decode", 0.0)
        units = {u.name: u for u in g.units(space.granularity)}
        layer_units = {i: [u for u in units.values() if u.layer == i] for i in range(g.num_layers)}
        linears = g.unit_map(space.granularity, include_head=True)

        def unit_ms(unit_name: str, label: str, act: ActFormat = _A16) -> float:
            fmt = parse_weight(label.partition("@")[0])
            return sum(
                idx.linear_ms("decode", (m.out_features, m.in_features), fmt.fit_group(m.in_features), act)[0] - stub
                for m in linears[unit_name].members
            )

        per: list[np.ndarray] = []
        decided_units: set[str] = set()
        for d in space.decisions:
            if d.kind == "weight":
                per.append(np.array([sum(unit_ms(u, o.label) for u in d.units) for o in d.options]))
                decided_units.update(d.units)
            elif d.kind == "head":  # the skeleton ran the 16-bit head: charge the change
                per.append(np.array([unit_ms(d.name, o.label) - unit_ms(d.name, "bf16") for o in d.options]))
            elif d.kind == "act":
                base = sum(unit_ms(u.name, "bf16") for i in d.layers for u in layer_units[i])
                per.append(np.array([sum(unit_ms(u.name, "bf16", parse_act(o.label)) for i in d.layers for u in layer_units[i]) - base
                                     for o in d.options]))  # fmt: skip
            else:
                per.append(np.array([len(d.layers) * idx.kv_delta_ms(space.context, parse_kv(o.label), g.num_layers) for o in d.options]))
        fixed = idx.skeleton_ms("decode", space.context) + sum(unit_ms(n, "bf16") for n in units if n not in decided_units)
        fp = prof.meta.device
        source = f"measured profile ({fp.name}, {fp.kind}, batch {prof.meta.batch}, {prof.meta.dtype}; context {space.context})"
        return LatencyTable(per, fixed, source, exact=_ExactLatency(space, idx))
