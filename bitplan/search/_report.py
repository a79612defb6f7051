"""A search run's outputs: every front plan as JSON, the trials table, the pick (``best.json``), a report.

Layout of the run directory (written as one set, see :class:`bitplan._io.FileSet`)::

    front/plan-01.json ...   every Pareto-front plan, numbered by proxy quality (01 = least proxy harm)
    trials.parquet           every trial: objectives, constraints, proxy metrics, verification numbers
    best.json                one plan, picked by --pick (quality / memory / latency), metadata says why
    report.html              self-contained (plotly.js embedded once): opens offline, years later
    outputs.json             written last: the SHA-256 of each file above (``check_outputs`` verifies them)

Why the quality pick trusts *measured* KL over the proxy: the proxy only adds single-unit harms; where some
front plans were verified on held-out text (:mod:`bitplan.search._verify`), their measured KL is the better
judge among them, and the proxy decides only when nothing was measured. Memory and latency picks need no
measurement: the cost sums are exact for memory and are the cost model's own numbers for latency (the
report labels a bytes-based latency as an estimate, so nobody mistakes it for a hardware measurement).

Every file is staged as a temporary first; only when all are written do they replace the previous run's
(stale ``plan-*.json`` deleted in the same commit, ``summary.json`` -- the CLI's, written after the final
evaluation -- removed with the old manifest). A kill while staging leaves the previous set whole; the
manifest tells a set interrupted inside the commit's renames, and the rerun rewrites it.
"""

from __future__ import annotations

import html
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from optuna.trial import FrozenTrial, TrialState

from bitplan._io import FileSet, check_file_set
from bitplan.errors import BitplanError
from bitplan.search._budgets import Budgets
from bitplan.search._space import SearchSpace
from bitplan.search._study import is_feasible, trial_constraints, trials_frame
from bitplan.search._verify import LATENCY_KEYS, VERIFY_KEYS, proxy_quality, rank_agreement, with_verification

__all__ = ["OUTPUTS_MANIFEST", "PICKS", "check_outputs", "write_outputs"]

PICKS = ("quality", "memory", "latency")
OUTPUTS_MANIFEST = "outputs.json"

_PROXY_KEYS = (
    "quality",
    "avg_weight_bits",
    "weight_bytes",
    "kv_bytes",
    "avg_kv_bits",
    "memory_bytes",
    "latency_ms",
)


@dataclass(frozen=True)
class _Row:
    """One front plan as the outputs show it."""

    rank: int
    trial: FrozenTrial
    proxy: dict[str, float]
    verification: dict[str, float] | None
    feasible: bool
    constraints: dict[str, float]
    file: Path
    latency: dict[str, float] | None = None  # measured decode latency (see bitplan.search._latency)
    latency_ok: bool | None = None  # meets the latency budget when measured; None: not timed or no budget

    @property
    def origin(self) -> str:
        return str(self.trial.user_attrs.get("origin", "sampler"))


def _proxy(t: FrozenTrial, space: SearchSpace) -> dict[str, float]:
    """The ``proxy`` user attr, completed from the space and the objectives where a key is missing."""
    raw = t.user_attrs.get("proxy")
    out = {k: float(v) for k, v in raw.items() if k in _PROXY_KEYS} if isinstance(raw, Mapping) else {}
    if any(k not in out for k in _PROXY_KEYS):
        m = space.metrics(space.index({k: str(v) for k, v in t.params.items()}))
        derived = {"quality": m.quality, "avg_weight_bits": m.avg_weight_bits, "weight_bytes": m.weight_bytes,
                   "kv_bytes": m.kv_bytes, "avg_kv_bits": m.avg_kv_bits, "memory_bytes": m.memory_bytes}  # fmt: skip
        if t.values and len(t.values) >= 3:
            derived.update(quality=t.values[0], memory_bytes=t.values[1], latency_ms=t.values[2])
        out = {**{k: float(v) for k, v in derived.items()}, **out}
        out.setdefault("latency_ms", math.nan)
    return {k: out[k] for k in _PROXY_KEYS}


def _measured(t: FrozenTrial, keys: Sequence[str]) -> dict[str, float] | None:
    """A trial's stored ``verify_*`` numbers of one kind (``VERIFY_KEYS`` or ``LATENCY_KEYS``), unprefixed;
    None when the first key (the measurement itself) is missing."""
    if keys[0] not in t.user_attrs:
        return None
    return {k.removeprefix("verify_"): t.user_attrs[k] for k in keys if k in t.user_attrs}


def _named(t: FrozenTrial, names: Sequence[str]) -> dict[str, float]:
    """A trial's constraint values by the study's ``constraint_names`` (by position where a name is missing)."""
    values = trial_constraints(t) or []
    return {(names[i] if i < len(names) else str(i)): float(v) for i, v in enumerate(values)}


def _pick(rows: Sequence[_Row], best_pick: str) -> tuple[_Row | None, str]:
    """The picked row and a one-line reason (feasible rows only, unless none is feasible).

    Once plans were timed against a latency budget, only plans that met it when measured are eligible:
    a prediction that the measurement contradicted is not handed back, and no pick is better than one
    that breaks the budget (the reason says so)."""
    timed = [r for r in rows if r.latency_ok is not None]
    if timed:
        rows = [r for r in timed if r.latency_ok and r.feasible]
        if not rows:
            worst = min(float((r.latency or {}).get("ratio", math.inf)) for r in timed)
            return None, (f"none of the {len(timed)} front plans timed meets the latency budget when measured "
                          f"(fastest: {worst:.3f}x of 16-bit); loosen --max-latency")  # fmt: skip
    pool = [r for r in rows if r.feasible] or list(rows)
    caveat = "" if any(r.feasible for r in rows) else " (no front plan meets the budgets)"
    if timed:
        caveat += f"; {len(rows)} of {len(timed)} timed plans met the latency budget when measured"
    if best_pick == "quality":
        measured = [r for r in pool if r.verification is not None]
        if measured:
            best = min(measured, key=lambda r: (r.verification["kl"] if r.verification else math.inf, r.rank))
            v = best.verification or {}
            return best, (f"lowest measured KL ({v['kl']:.4g} nats/token on {int(v.get('tokens', 0))} held-out "
                          f"tokens) among {len(measured)} verified front plans{caveat}")  # fmt: skip
        best = min(pool, key=lambda r: r.rank)
        return best, f"lowest proxy KL ({best.proxy['quality']:.4g} nats/token); no plan was verified{caveat}"
    key = {"memory": "memory_bytes", "latency": "latency_ms"}[best_pick]
    if key == "latency_ms" and timed:
        best = min(pool, key=lambda r: (float((r.latency or {})["ms"]), r.rank))
        return best, f"least measured latency ({(best.latency or {})['ms']:.4g} ms/token) among {len(pool)} front plans{caveat}"
    best = min(pool, key=lambda r: (r.proxy[key], r.rank))
    what = (
        f"{best.proxy[key] / 1e6:.2f} MB" if key == "memory_bytes" else f"{best.proxy[key]:.4g} ms predicted"
    )
    return best, f"least {best_pick} ({what}) among {len(pool)} front plans{caveat}"


# -- trials.parquet ----------------------------------------------------------------------------------------
def _trials_table(study: Any) -> pa.Table:
    """:func:`~bitplan.search._study.trials_frame` with the ``verify_*`` columns taken from the study.

    Verification numbers live in study user attrs (see :func:`~bitplan.search._verify.record_verification`);
    a table built from the raw trials would show them empty, so those columns are rebuilt from
    :func:`~bitplan.search._verify.with_verification` (a no-op when the table already has them).
    """
    table = trials_frame(study)
    merged = {t.number: t.user_attrs for t in with_verification(study, study.get_trials(deepcopy=False))}
    numbers = table.column("number").to_pylist()
    for key in (*VERIFY_KEYS, *LATENCY_KEYS):
        at = table.schema.get_field_index(key)
        typ = table.schema.field(at).type if at >= 0 else pa.float64()
        column = pa.array([merged.get(n, {}).get(key) for n in numbers], type=typ)
        table = table.set_column(at, key, column) if at >= 0 else table.append_column(key, column)
    return table


# -- report.html ---------------------------------------------------------------------------------------
def _figures(study: Any) -> list[str]:
    """Two 2-D views of the 3-objective front (quality vs memory, quality vs latency), as HTML divs.

    ``targets=`` picks the axes while the front itself stays the 3-objective one. Optuna 5 reads
    ``set_constraint`` values (and Optuna 4 a sampler's copies) from system attrs itself, and deprecates
    ``constraints_func``; constraints kept only in user attrs go through that argument, its warning silenced.
    """
    from optuna.visualization import plot_pareto_front

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    native = any(k == "constraints" or k.startswith("constraints:") for t in done for k in t.system_attrs)
    legacy = not native and any(trial_constraints(t) for t in done)
    views = [("memory (MB)", lambda t: [t.values[1] / 1e6, t.values[0]]),
             ("predicted latency (ms)", lambda t: [t.values[2], t.values[0]])]  # fmt: skip
    out: list[str] = []
    for i, (xname, targets) in enumerate(views):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            fig = plot_pareto_front(study, target_names=[xname, "proxy KL (nats/token)"], targets=targets,
                                    constraints_func=(lambda t: trial_constraints(t) or []) if legacy else None)  # fmt: skip
        fig.update_layout(title=f"Pareto front: proxy KL vs {xname}", height=460)
        # plotly.js embedded in the first figure only: the page works offline, and is ~4.5 MB, not 9
        out.append(fig.to_html(full_html=False, include_plotlyjs=i == 0, default_height="460px"))
    return out


def _f(x: Any, spec: str = ".4g", scale: float = 1.0) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "&ndash;"
    return html.escape(format(x * scale if scale != 1.0 else x, spec))


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    thead = f"<thead><tr>{th}</tr></thead>" if any(head) else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}">{thead}<tbody>{body}</tbody></table>'


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f3f3f3}td:nth-child(3){text-align:left}
table.kv td{text-align:left}tr.best{background:#e8f4e8;font-weight:600}.warn{background:#fff3cd;color:#7a5b00;
padding:.1em .4em;border-radius:3px;font-weight:600}pre{background:#f7f7f7;padding:1em;overflow:auto}"""


def _render(model: str, budgets: Budgets | None, latency_source: str, rows: Sequence[_Row], best: _Row | None,
            reason: str, agreement: Mapping[str, Any], extra: Mapping[str, Any], figures: Sequence[str]) -> str:  # fmt: skip
    e = html.escape
    estimate = "estimate" in latency_source.lower() or latency_source.lower().startswith("bytes")
    lat = e(latency_source or "unknown")
    if estimate:
        lat += ' <span class="warn">ESTIMATE from bytes moved, not measured on hardware</span>'
    head = [("model", e(model or "unknown")), ("budgets", e(budgets.describe() if budgets else "no budgets")),
            ("latency source", lat), ("front plans", str(len(rows))),
            ("pick", e(f"trial {best.trial.number} ({best.file.name}): {reason}") if best else "none")]  # fmt: skip
    for k in ("space", "seeds", "trials_complete", "proxy_trials_per_second"):
        if k in extra and not isinstance(extra[k], (Mapping, list)):
            head.append(
                (k.replace("_", " "), _f(extra[k]) if isinstance(extra[k], float) else e(str(extra[k])))
            )
    parts = [
        f"<h1>bitplan search: {e(model or 'unknown model')}</h1>",
        _table(["", ""], [[f"<b>{k}</b>", v] for k, v in head], "kv"),
    ]
    timings = extra.get("stage_seconds") or extra.get("timings")
    if isinstance(timings, Mapping) and timings:
        parts += [
            "<h2>Stage timings</h2>",
            _table(["stage", "seconds"], [[e(str(k)), _f(v, ".1f")] for k, v in timings.items()]),
        ]
    parts += ["<h2>Pareto front</h2>", *figures]
    trs = []
    for r in rows:
        v, p, lt = r.verification or {}, r.proxy, r.latency or {}
        cells = [str(r.rank), str(r.trial.number), e(r.origin), _f(p["avg_weight_bits"], ".3f"),
                 _f(p["weight_bytes"], ".2f", 1e-6), _f(p["kv_bytes"], ".2f", 1e-6), _f(p["latency_ms"], ".3f"),
                 _f(p["quality"]), _f(v.get("kl")), _f(v.get("ppl"), ".3f"), "yes" if r.feasible else "<b>no</b>",
                 _f(lt.get("ms"), ".3f"), _f(lt.get("ratio"), ".3f"),
                 {None: "&ndash;", True: "yes", False: "<b>no</b>"}[r.latency_ok]]  # fmt: skip
        trs.append(cells)
    table = _table(["rank", "trial", "origin", "avg weight bits", "weight MB", "KV MB", "predicted latency ms",
                    "proxy KL", "measured KL", "ppl", "feasible", "measured ms", "x 16-bit", "meets latency"],
                   trs, "front")  # fmt: skip
    if best is not None:  # highlight the pick
        table = table.replace(f"<tr><td>{best.rank}</td>", f'<tr class="best"><td>{best.rank}</td>', 1)
    parts += ["<h2>Front plans</h2>", "<p>KL in nats/token; proxy KL is the search's additive prediction, "
              "measured KL and ppl are on held-out calibration text (verified plans only); measured ms is decode ms per "
              "token timed on this device, x 16-bit its median ratio to the unquantized model timed in the same "
              "rounds (timed plans only).</p>", table]  # fmt: skip
    if agreement and agreement.get("n"):
        a = agreement
        lines = [["plans verified", str(a.get("n"))], ["discordant pairs", f"{a.get('discordant')} of {a.get('pairs')} "
                  f"({_f(a.get('discordant_fraction'), '.0%')})"], ["Kendall tau", _f(a.get("kendall_tau"), ".3f")],
                 ["Spearman", _f(a.get("spearman"), ".3f")],
                 ["proxy's best is measured best", e(str(a.get("best_agrees")))]]  # fmt: skip
        parts += ["<h2>Proxy vs measured order</h2>", _table(["", ""], lines, "kv")]
    details = json.dumps(dict(extra), indent=2, default=str)
    parts.append(f"<details><summary>run details</summary><pre>{e(details)}</pre></details>")
    title = e(f"bitplan search report: {model}")
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title><style>{_CSS}</style>'
            f"</head><body>\n" + "\n".join(parts) + "\n</body></html>\n")  # fmt: skip


def check_outputs(run_dir: str | Path) -> dict[str, str]:
    """The run directory's output files (relative path -> SHA-256) if they are one complete set, as the last
    search wrote it; else :class:`~bitplan.errors.BitplanError` naming what is missing or changed."""
    return check_file_set(run_dir, OUTPUTS_MANIFEST)

# -- entry point -----------------------------------------------------------------------------------------
def write_outputs(
    run_dir: str | Path,
    study: Any,
    space: SearchSpace,
    front_trials: Sequence[FrozenTrial],
    *,
    best_pick: str = "quality",
    budgets: Budgets | None = None,
    latency_source: str = "",
    extra_summary: Mapping[str, Any] | None = None,
    latency_margin: float = 0.0,
) -> dict[str, Any]:
    """Write ``front/plan-NN.json``, ``trials.parquet``, ``best.json`` and ``report.html`` into ``run_dir``.

    ``front_trials``: the (feasible) Pareto front; each is re-read from ``study`` with the verification
    numbers :func:`~bitplan.search._verify.record_verification` stored, even after the list was taken.
    ``best_pick``: ``quality`` (lowest measured KL among verified plans, else lowest proxy KL), ``memory``
    or ``latency``. ``extra_summary`` goes into the returned summary and the report (``stage_seconds``,
    ``agreement``, ``space``, ... are shown; ``model`` overrides the space's model name). ``latency_margin``:
    a timed plan meets the latency budget only within it less this fraction (see ``_latency``). Returns the
    summary: paths (``front``, ``trials``, ``best``, ``report``), ``best_trial``, ``best_metrics``.
    """
    if best_pick not in PICKS:
        raise BitplanError(f"--pick must be one of {', '.join(PICKS)}, got {best_pick!r}")
    run_dir = Path(run_dir)
    front_dir = run_dir / "front"
    extra = dict(extra_summary or {})
    fresh = {t.number: t for t in study.get_trials(deepcopy=False)}
    trials = sorted(with_verification(study, [fresh.get(t.number, t) for t in front_trials]),
                    key=lambda t: (proxy_quality(t), *(list(t.values or [])[1:]), t.number))  # fmt: skip
    names = list(study.user_attrs.get("constraint_names", []))
    width = max(2, len(str(len(trials))))
    from bitplan.search._latency import latency_ok

    budgets_ = budgets or Budgets()
    rows = [_Row(i, t, _proxy(t, space), _measured(t, VERIFY_KEYS), is_feasible(t), _named(t, names),
                 front_dir / f"plan-{i:0{width}d}.json", _measured(t, LATENCY_KEYS),
                 latency_ok(budgets_, t.user_attrs, latency_margin))
            for i, t in enumerate(trials, 1)]  # fmt: skip
    common = {"budgets": budgets.to_dict() if budgets else None, "latency_source": latency_source}
    best, reason = _pick(rows, best_pick) if rows else (None, "no front plan")
    agreement = extra.get("agreement") or {}
    if not agreement:
        verified = [r.trial for r in rows if r.verification is not None]
        agreement = rank_agreement(verified) if verified else {}
    best_metrics = None
    if best is not None:
        best_metrics = {**best.proxy, **{f"verify_{k}": v for k, v in {**(best.verification or {}), **(best.latency or {})}.items()}}
    model = str(extra.get("model") or space.name_or_path or getattr(space.graph, "architecture", ""))
    page = _render(model, budgets, latency_source, rows, best, reason, agreement, extra, _figures(study))
    trials_path, best_path, report_path = run_dir / "trials.parquet", run_dir / "best.json", run_dir / "report.html"
    # one set: a kill while writing leaves the previous run's outputs; outputs.json lists the committed ones
    with FileSet(run_dir, OUTPUTS_MANIFEST, "bitplan.search-outputs", invalidates=("summary.json",)) as files:
        for r in rows:
            meta = {"created_by": "bitplan search", "trial": r.trial.number, "rank": r.rank, "origin": r.origin,
                    "proxy": r.proxy, "verification": r.verification, "feasible": r.feasible,
                    "constraints": r.constraints, **common}  # fmt: skip
            if r.latency is not None:
                meta["measured_latency"] = {**r.latency, "meets_budget": r.latency_ok}
            plan = space.to_plan({k: str(v) for k, v in r.trial.params.items()}, meta)
            files.write_text(f"front/{r.file.name}", plan.to_json())
            if r is best:
                picked = plan.with_metadata(picked_by=best_pick, pick_reason=reason, front_file=f"front/{r.file.name}")
                files.write_text("best.json", picked.to_json())
        written = {r.file.name for r in rows}
        for old in front_dir.glob("plan-*.json") if front_dir.is_dir() else ():
            if old.name not in written:
                files.remove(f"front/{old.name}")
        if best is None:
            files.remove("best.json")  # a previous run's pick would be a lie about this one
        pq.write_table(_trials_table(study), files.path("trials.parquet", suffix=".parquet"))
        files.write_text("report.html", page)
    return {
        **extra,
        "run_dir": str(run_dir),
        "front": [str(r.file) for r in rows],
        "trials": str(trials_path),
        "report": str(report_path),
        "best": str(best_path) if best is not None else None,
        "best_pick": best_pick,
        "best_trial": best.trial.number if best is not None else None,
        "best_reason": reason,
        "best_metrics": best_metrics,
        "agreement": agreement,
        "latency_source": latency_source,
        "budgets": common["budgets"],
    }
