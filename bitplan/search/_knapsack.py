"""Exact optima of the additive proxy: a multiple-choice knapsack, solved as a MILP (HiGHS via scipy).

Why a knapsack. Every quantity the search minimises or limits -- summed harm, average weight bits,
memory, average KV bits, decode latency -- is a sum over decisions of one entry per chosen option
(:mod:`bitplan.search._space`, :mod:`bitplan.search._cost`). Picking one option per decision to minimise
one such sum under limits on the others is a multiple-choice knapsack: NP-hard in general, but small
here (about 1300 binaries and a handful of knapsack rows on the main model), so HiGHS's branch and bound
proves the optimum in a fraction of a second. That buys the search three things:

* seeds: the proxy's exact optimum under the budgets and a sweep of optima at tighter limits (the proxy's
  Pareto front) start the Optuna study where the proxy is best, so its trials go to what the proxy cannot
  see (interactions, measured KL, real latency) instead of rediscovering the front by sampling;
* honest errors: the smallest value each budgeted quantity can reach, so an impossible budget is refused
  before any trial runs, with a message that says what *is* possible;
* a yardstick for how far a sampler's best trial is from the proxy's optimum.

Exactness. The rows replicate :meth:`SearchSpace.metrics` except that weight bytes are taken as bits/8
where ``metrics`` floors them (at most one byte conservative). Every solution is re-measured with
``space.metrics`` and the latency table; if a solver tolerance let a limit slip by a hair, that row is
tightened and the problem solved again, so a choice returned here meets the limits by ``space.metrics``.
Ties in the objective (options of equal harm, e.g. several scored 0) go to the option with fewer bytes
(then less latency, then fewer activation bits): an option no better than another of its decision on the
objective, that tie-break and every binding row is dropped before the solve, and after it each decision
moves to an equal-harm option of lower tie-break where the rows allow. Free savings are taken, not left
to the solver's whim.

Speed. On a space the size of the main model (120 weight decisions x 7 options, 30 x 3 activation, 30 x
6 KV) one solve takes 0.05-0.6 s; :func:`seed_choices` (about 30 solves) a few seconds.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import sys
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from itertools import combinations

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from bitplan.errors import BitplanError
from bitplan.search._budgets import Budgets
from bitplan.search._cost import LatencyTable
from bitplan.search._space import SearchSpace

__all__ = [
    "RESOURCES", "Resource", "check_feasible", "measure", "minimum", "resources", "seed_choices", "solve",
]  # fmt: skip

_log = logging.getLogger("bitplan")

RESOURCES = ("avg_bits", "memory", "kv_bits", "latency")  # the budgeted quantities
_FLAG = {
    "avg_bits": "--max-avg-bits", "memory": "--max-memory", "kv_bits": "--max-kv-bits", "latency": "--max-latency",
}  # fmt: skip
_WHAT = {
    "avg_bits": "average weight bits", "memory": "memory (weights + KV cache)",
    "kv_bits": "average KV bits", "latency": "decode latency", "score": "summed harm",
}  # fmt: skip
_PLURAL = {"weight": "weights", "head": "head", "act": "acts", "kv": "KV"}
_OBJ_SCALE = 1e4  # the objective's span after scaling: HiGHS's absolute gap (1e-6) is then ~1e-10 of it
_TIME_LIMIT_S = 60.0
_RETRIES = 4
_MAX_UNIFORM = 40


@dataclass(frozen=True)
class Resource:
    """One quantity as a linear function of the choice: ``offset + sum over decisions of coef[d][j_d]``."""

    name: str
    coef: tuple[np.ndarray, ...]
    offset: float
    limit: float | None = None  # the budget, None when unbudgeted

    def value(self, index: Sequence[int]) -> float:
        return self.offset + float(sum(a[j] for a, j in zip(self.coef, index, strict=True)))


def resources(
    space: SearchSpace, budgets: Budgets | None = None, latency: LatencyTable | None = None
) -> dict[str, Resource]:
    """``score`` and the budgeted quantities of ``space`` as linear rows, with their budget limits.

    Definitions follow :meth:`SearchSpace.metrics` term by term (memory takes bits/8 for floor(bits/8)).
    ``latency`` is present only with a latency table; a ratio budget is resolved against its reference.
    """
    b = budgets or Budgets()
    if latency is None and (b.max_latency_ms is not None or b.max_latency_ratio is not None):
        raise BitplanError("--max-latency needs a latency cost model, and none was given")
    bits, kvb, kvbits = space.arrays("storage_bits"), space.arrays("kv_bytes"), space.arrays("kv_bits")
    unit_bits = space.arrays("unit_bits")
    up, n_layers = space.unit_params, space.graph.num_layers
    undecided = up - sum(d.params for d in space.decisions if d.kind == "weight")
    fixed_kv_layers = n_layers - len(space.kv_layers_decided)
    zeros = tuple(np.zeros(len(d.options)) for d in space.decisions)
    out = {
        "score": Resource("score", tuple(space.arrays("score")), 0.0),
        "avg_bits": Resource("avg_bits", tuple(a / up for a in unit_bits) if up else zeros,
                             16.0 * undecided / up if up else 16.0, b.max_avg_bits),
        "memory": Resource("memory", tuple(w / 8 + k for w, k in zip(bits, kvb, strict=True)),
                           space.fixed_weight_bytes + space.fixed_kv_bytes(), b.max_memory),
        "kv_bits": Resource("kv_bits", tuple(a / n_layers for a in kvbits) if n_layers else zeros,
                            16.0 * fixed_kv_layers / n_layers if n_layers else 16.0, b.max_kv_bits),
    }  # fmt: skip
    if latency is not None:
        per = tuple(np.asarray(a, dtype=np.float64) for a in latency.per_option)
        out["latency"] = Resource("latency", per, latency.fixed_ms, b.latency_limit(latency.reference()))
    return out


def measure(
    space: SearchSpace, index: Sequence[int], latency: LatencyTable | None = None
) -> dict[str, float]:
    """The exact values the search checks budgets with (``space.metrics``, ``latency.total``)."""
    m = space.metrics(index)
    out = {
        "score": m.quality,
        "avg_bits": m.avg_weight_bits,
        "memory": m.memory_bytes,
        "kv_bits": m.avg_kv_bits,
    }
    if latency is not None:
        out["latency"] = latency.total(list(index))
    return out


@dataclass(frozen=True)
class _Row:
    flat: np.ndarray  # coefficients less each decision's minimum, concatenated over decisions
    base: float  # offset plus the sum of the minima: the row's smallest possible value
    span: float  # sum over decisions of (max - min): base + span is its largest


def _shift(r: Resource) -> _Row:
    mins = [float(a.min()) if len(a) else 0.0 for a in r.coef]
    flat = np.concatenate([a - m for a, m in zip(r.coef, mins, strict=True)]) if r.coef else np.zeros(0)
    span = float(sum(float(a.max()) - m for a, m in zip(r.coef, mins, strict=True) if len(a)))
    return _Row(flat, r.offset + sum(mins), span)


@contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Keep HiGHS's stray debug line off stdout for the length of a solve.

    HiGHS 1.12 (bundled with scipy 1.17) printf()s ``HighsMipSolverData::transformNewIntegerFeasibleSolution
    tmpSolver.run();`` on some solves whatever its log options (HiGHS issue #2783); it would land in the
    middle of the CLI's output. Where stdout has no file descriptor (captured), there is nothing to guard.
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            try:
                yield
            finally:
                with suppress(Exception):
                    ctypes.CDLL(None).fflush(None)  # C stdio buffers still hold the line: drop it here
                os.dup2(saved, fd)
    finally:
        os.close(saved)


class _Solver:
    """The MILP of one space: a binary per (decision, option), ``sum = 1`` per decision, knapsack rows.

    Before each solve, options dominated within their decision -- no better on the objective, the
    tie-break and every row that can bind -- are dropped: exact (a plan using one can swap to its
    dominator and lose nothing), and it fixes most decisions when few budgets are active.
    """

    def __init__(
        self, space: SearchSpace, table: Mapping[str, Resource], latency: LatencyTable | None
    ) -> None:
        self.space, self.table, self.latency = space, dict(table), latency
        sizes = np.array([len(d.options) for d in space.decisions], dtype=int)
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        self.decision_of = np.repeat(np.arange(len(sizes)), sizes)
        self.rows = {name: _shift(r) for name, r in self.table.items()}
        acts = tuple(
            np.array([o.nominal_bits * (d.kind == "act") for o in d.options]) for d in space.decisions
        )
        self.rows["act_bits"] = _shift(Resource("act_bits", acts, 0.0))

    def _normed(self, name: str) -> np.ndarray:
        row = self.rows[name]
        return row.flat / row.span if row.span > 0 else np.zeros_like(row.flat)

    def _secondary(self, objective: str) -> np.ndarray:
        """Tie-break: harm for a resource objective; for harm, bytes (and latency), then act bits."""
        if objective != "score":
            return self._normed("score")
        out = self._normed("memory") + 1e-3 * self._normed("act_bits")
        return out + self._normed("latency") if "latency" in self.rows else out

    def _undominated(self, crit: np.ndarray) -> np.ndarray:
        """Mask of the options no other option of their decision dominates (ties: the first is kept)."""
        keep = np.ones(len(crit), dtype=bool)
        for a, b in zip(self.starts[:-1], self.starts[1:], strict=True):
            m = crit[a:b]
            le = (m[:, None, :] <= m[None, :, :]).all(-1)  # le[k, j]: k is nowhere worse than j
            lt = (m[:, None, :] < m[None, :, :]).any(-1)
            first = np.tri(b - a, k=-1, dtype=bool).T  # first[k, j]: k comes before j
            dom = le & (lt | first)
            np.fill_diagonal(dom, False)
            keep[a:b] = ~dom.any(0)
        return keep

    def _once(self, objective: str, bounds: Mapping[str, float]) -> list[int] | None:
        """Minimise ``objective`` under ``bounds`` on the linear rows; ties go to the tie-break."""
        live = []
        for name, ub in bounds.items():
            row = self.rows[name]
            rhs = ub - row.base
            if rhs < -1e-12 * max(abs(ub), 1.0):
                return None  # below the smallest value the row can take
            if rhs < row.span:  # else it can never bind
                live.append((row.flat, max(rhs, 0.0)))
        obj, sec = self.rows[objective], self._secondary(objective)
        cols = np.flatnonzero(self._undominated(np.column_stack([obj.flat, sec, *(f for f, _ in live)])))
        dec = self.decision_of[cols]
        n_dec = len(self.starts) - 1
        if len(cols) == n_dec:  # one option left everywhere
            x = np.ones(len(cols))
        else:
            eq = sparse.csr_array((np.ones(len(cols)), (dec, np.arange(len(cols)))), shape=(n_dec, len(cols)))
            cons = [LinearConstraint(eq, 1.0, 1.0)]
            if live:  # each row scaled to coefficients <= 1
                sc = [max(float(f[cols].max()), 1e-300) for f, _ in live]
                a = sparse.csr_array(np.vstack([f[cols] / s for (f, _), s in zip(live, sc, strict=True)]))
                cons.append(LinearConstraint(a, -np.inf, [r / s for (_, r), s in zip(live, sc, strict=True)]))
            c = obj.flat[cols] * (_OBJ_SCALE / obj.span) if obj.span > 0 else np.zeros(len(cols))
            with _quiet_stdout():
                res = milp(c, integrality=np.ones(len(cols)), bounds=Bounds(0.0, 1.0), constraints=cons,
                           options={"mip_rel_gap": 1e-9, "time_limit": _TIME_LIMIT_S})  # fmt: skip
            if res.status not in (0, 2):
                _log.warning("knapsack MILP: %s", res.message)
            if res.x is None:
                return None
            x = res.x
        seg = np.searchsorted(dec, np.arange(n_dec + 1))
        pairs = enumerate(zip(seg[:-1], seg[1:], strict=True))
        idx = [int(cols[a + np.argmax(x[a:b])] - self.starts[d]) for d, (a, b) in pairs]
        return self._tiebreak(idx, self.table[objective].coef, sec, live)

    def _tiebreak(
        self, idx: list[int], obj: Sequence[np.ndarray], sec: np.ndarray, live: list[tuple[np.ndarray, float]]
    ) -> list[int]:
        """Swap each decision to the option of equal objective and lowest tie-break that keeps the rows."""
        pos = self.starts[:-1] + np.asarray(idx)
        totals = [float(f[pos].sum()) for f, _ in live]
        for d, j in enumerate(idx):
            a = int(self.starts[d])
            best = j
            for k in np.flatnonzero(obj[d] == obj[d][j]):
                if sec[a + k] < sec[a + best] and all(
                    t + f[a + k] - f[a + j] <= max(rhs, t) for t, (f, rhs) in zip(totals, live, strict=True)
                ):
                    best = int(k)
            if best != j:
                totals = [t + f[a + best] - f[a + j] for t, (f, _) in zip(totals, live, strict=True)]
                idx[d] = best
        return idx

    def optimize(self, objective: str, limits: Mapping[str, float]) -> list[int] | None:
        """Exact minimum of ``objective`` with every limit met as :func:`measure` counts, or None."""
        bounds = dict(limits)
        for _ in range(_RETRIES):
            idx = self._once(objective, bounds)
            if idx is None:
                return None
            values = measure(self.space, idx, self.latency)
            over = {k: values[k] - lim for k, lim in limits.items() if values[k] > lim}
            if not over:
                return idx
            for k, excess in over.items():  # a solver tolerance let a row slip: tighten it and solve again
                bounds[k] -= 2 * excess + 1e-9 * abs(limits[k])
        _log.warning("knapsack: could not meet %s exactly after %d tries", ", ".join(limits), _RETRIES)
        return None


def _limits(table: Mapping[str, Resource], extra: Mapping[str, float] | None = None) -> dict[str, float]:
    out = {k: r.limit for k, r in table.items() if r.limit is not None}
    for k, v in (extra or {}).items():
        if k not in table:
            raise ValueError(f"unknown resource {k!r}; have {', '.join(table)}")
        out[k] = min(v, out.get(k, math.inf))
    return out


def solve(
    space: SearchSpace,
    budgets: Budgets,
    latency: LatencyTable | None = None,
    *,
    objective: str = "score",
    extra_limits: Mapping[str, float] | None = None,
) -> list[int] | None:
    """Option indices minimising the summed ``objective`` within the budgets (and ``extra_limits``), or None.

    ``objective`` is ``score`` (summed harm) or a resource; ``extra_limits`` (``{resource: limit}``, the
    tighter of it and the budget wins) is how the seeds sweep the proxy's Pareto front.
    """
    table = resources(space, budgets, latency)
    if objective not in table:
        raise ValueError(f"unknown objective {objective!r}; have {', '.join(table)}")
    return _Solver(space, table, latency).optimize(objective, _limits(table, extra_limits))


def minimum(
    space: SearchSpace, resource: str, budgets: Budgets, latency: LatencyTable | None = None
) -> float:
    """The smallest value of ``resource`` any choice reaches within the *other* budgets (inf if none does)."""
    table = resources(space, budgets, latency)
    if resource not in table:
        raise ValueError(f"unknown resource {resource!r}; have {', '.join(table)}")
    limits = {k: v for k, v in _limits(table).items() if k != resource}
    idx = _Solver(space, table, latency).optimize(resource, limits)
    return math.inf if idx is None else measure(space, idx, latency)[resource]


# -- messages ---------------------------------------------------------------------------------------
def _fmt_bytes(v: float, digits: int) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(v) >= f:
            return f"{v / f:.{digits}g} {unit}"
    return f"{v:.{digits}g} B"


def _fmt(name: str, v: float, reference: float | None, digits: int) -> str:
    if name == "memory":
        return _fmt_bytes(v, digits + 2)
    if name == "latency":
        ms = f"{v:.{digits + 2}g} ms"
        return f"{v / reference:.{digits}f}x of 16-bit ({ms})" if reference else ms
    return f"{v:.{digits}f}"


def _fmt_limit(name: str, v: float, budgets: Budgets) -> str:
    if name == "memory":
        return _fmt_bytes(v, 6).replace(" ", "")
    if name == "latency":
        return f"{budgets.max_latency_ratio:g}x" if budgets.max_latency_ratio is not None else f"{v:g}ms"
    return f"{v:g}"


def _fmt_reached(name: str, v: float, limit: float, reference: float | None) -> str:
    """``v`` with enough digits that it does not print like the limit it exceeds."""
    for digits in range(2, 12):
        text = _fmt(name, v, reference, digits)
        if text != _fmt(name, limit, reference, digits):
            return text
    return text


def _describe(space: SearchSpace, idx: Sequence[int], resource: Resource) -> str:
    """The choice's labels on the decisions ``resource`` depends on: ``w2g64a everywhere`` or
    ``weights w2g64a on 100 of 120 units, w3g64a on 20; KV k2v2 everywhere``."""
    varies = {d.kind for d, a in zip(space.decisions, resource.coef, strict=True) if np.ptp(a) > 0}
    parts = []
    for kind in (k for k in ("weight", "head", "kv", "act") if k in varies):
        counts: Counter[str] = Counter()
        for d, j in zip(space.decisions, idx, strict=True):
            if d.kind == kind:
                counts[d.options[j].label] += len(d.layers) if kind == "kv" else 1
        if not counts:
            continue
        n, noun = sum(counts.values()), {"weight": "units", "head": "head", "act": "layers", "kv": "layers"}[kind]
        top = counts.most_common(2)
        if kind == "head":
            text = top[0][0]
        elif len(counts) == 1:
            text = f"{top[0][0]} everywhere"
        else:
            text = f"{top[0][0]} on {top[0][1]} of {n} {noun}, {top[1][0]} on {top[1][1]}"
            text += ", ..." if len(counts) > 2 else ""
        parts.append((kind, text))
    if len(parts) == 1:
        return parts[0][1]
    return "; ".join(f"{_PLURAL[k]} {t}" for k, t in parts)


def check_feasible(space: SearchSpace, budgets: Budgets, latency: LatencyTable | None = None) -> None:
    """Raise :class:`BitplanError` (one line) when no choice meets the budgets, saying what is reachable.

    A budget no plan meets even alone is named with the smallest value any plan reaches; budgets that
    are each reachable but not together are named with the smallest value of one given the others.
    """
    table = resources(space, budgets, latency)
    solver = _Solver(space, table, latency)
    limits = _limits(table)
    if not limits or solver.optimize("score", limits) is not None:
        return
    # latency reads as a ratio of 16-bit only where the budget was given as one
    ref = latency.reference() if latency is not None and budgets.max_latency_ratio is not None else None
    active = [k for k in RESOURCES if k in limits]

    def reach(name: str, given: Sequence[str]) -> tuple[float, str]:
        idx = solver.optimize(name, {k: limits[k] for k in given})
        if idx is None:  # only when the given budgets conflict among themselves (not the case when called)
            return math.inf, "no plan"
        return measure(space, idx, latency)[name], _describe(space, idx, table[name])

    def flag(name: str) -> str:
        return f"{_FLAG[name]} {_fmt_limit(name, limits[name], budgets)}"

    alone = []
    for k in active:
        v, how = reach(k, ())
        if v > limits[k]:
            alone.append(
                f"{flag(k)} is infeasible: the smallest {_WHAT[k]} any plan in this search space reaches is "
                f"{_fmt_reached(k, v, limits[k], ref)} ({how})"
            )
    if alone:
        raise BitplanError("; ".join(alone))
    for a, b in combinations(active, 2):
        if solver.optimize("score", {a: limits[a], b: limits[b]}) is None:
            v, how = reach(b, (a,))
            raise BitplanError(
                f"{flag(a)} and {flag(b)} cannot both be met: with {_WHAT[a]} <= {_fmt_limit(a, limits[a], budgets)} "
                f"the smallest {_WHAT[b]} is {_fmt_reached(b, v, limits[b], ref)} ({how})"
            )
    last, others = active[-1], active[:-1]
    v, how = reach(last, others)
    raise BitplanError(
        f"{', '.join(flag(k) for k in active)} cannot all be met: within the other budgets the smallest "
        f"{_WHAT[last]} is {_fmt_reached(last, v, limits[last], ref)} ({how})"
    )


# -- seeds ------------------------------------------------------------------------------------------
def _uniform_seeds(space: SearchSpace) -> list[tuple[str, list[int]]]:
    """Every kind's labels applied everywhere, and weight x KV pairs of alike bits up to the cap."""

    def labels(kind: str) -> list[tuple[str, float]]:
        seen: dict[str, float] = {}
        for d in space.decisions:
            if d.kind == kind:
                for o in d.options:
                    seen.setdefault(o.label, o.nominal_bits)
        return sorted(seen.items(), key=lambda t: (-t[1], t[0]))

    ws, acts, kvs = labels("weight"), labels("act"), labels("kv")
    w_ref, kv_ref = ws[0][0] if ws else "bf16", "k16v16"
    out: list[tuple[str, list[int]]] = []

    def add(w: str, a: str, kv: str) -> None:
        idx = space.uniform(weight=w, act=a, kv=kv)
        if idx is not None:
            out.append((" ".join(["uniform", w, *([a] if a != "a16" else []), kv]), idx))

    add("bf16", "a16", kv_ref)
    for w, _ in ws:
        add(w, "a16", kv_ref)
    for kv, _ in kvs:
        add(w_ref, "a16", kv)
    for a, _ in acts:
        add(w_ref, a, kv_ref)
    pairs = [(abs(wb - kb), w, kv) for w, wb in ws for kv, kb in kvs if w != "bf16" and kv != kv_ref]
    for _, w, kv in sorted(pairs):
        if len(out) >= _MAX_UNIFORM:
            break
        add(w, "a16", kv)
    return out


def _fmt_level(name: str, v: float) -> str:
    if name == "memory":
        return "memory<=" + _fmt_bytes(v, 4).replace(" ", "")
    if name == "latency":
        return f"latency<={v:.4g}ms"
    return f"{name}<={v:.3g}"


def seed_choices(
    space: SearchSpace, budgets: Budgets, latency: LatencyTable | None = None, *, levels: int = 6
) -> list[tuple[str, list[int]]]:
    """Labelled choices to enqueue in the Optuna study before it samples: uniform plans, then knapsack optima.

    Uniform plans are kept even when they break a budget (the study records them as infeasible, which is
    informative). The knapsack optima sweep each relevant resource over ``levels`` limits from its
    smallest reachable value up to its value at the unswept optimum (beyond which the limit no longer binds):
    points on the proxy's Pareto front, all within the budgets. Identical choices are kept once, under their
    first label (a uniform plan that is the optimum reads ``uniform ... (knapsack optimum)``).
    """
    seeds: list[tuple[str, list[int]]] = []
    seen: dict[tuple[int, ...], int] = {}  # choice -> its position in seeds

    def add(label: str, idx: list[int] | None) -> None:
        if idx is None:
            return
        if tuple(idx) not in seen:
            seen[tuple(idx)] = len(seeds)
            seeds.append((label, idx))
        elif label == "knapsack optimum":  # a uniform plan is the optimum: say so
            at = seen[tuple(idx)]
            seeds[at] = (f"{seeds[at][0]} (knapsack optimum)", idx)

    for label, idx in _uniform_seeds(space):
        add(label, idx)
    table = resources(space, budgets, latency)
    solver = _Solver(space, table, latency)
    limits = _limits(table)
    best = solver.optimize("score", limits)
    if best is None:
        return seeds
    add("knapsack optimum", best)
    for name in RESOURCES:
        if name not in table or solver.rows[name].span <= 0:
            continue  # not in the table, or no decision changes it
        low = solver.optimize(name, {k: v for k, v in limits.items() if k != name})
        if low is None:
            continue
        # Linear values (>= the measured ones: bits/8 vs floor) keep the lowest level reachable. Above the
        # optimum's own value a limit no longer binds, so the sweep stops there rather than at 16 bits.
        lo = max(table[name].value(low), measure(space, low, latency)[name]) * (1 + 1e-9)
        hi = table[name].value(best)
        if hi <= lo:
            continue
        for level in np.linspace(lo, hi, max(levels, 0), endpoint=False):
            at = {**limits, name: min(float(level), limits.get(name, math.inf))}
            add(f"knapsack {_fmt_level(name, float(level))}", solver.optimize("score", at))
    return seeds
