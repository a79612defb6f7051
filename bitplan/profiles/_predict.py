"""``predict``: a plan's memory and latency from a hardware profile's measured rows, not from its bytes.

    decode ms/token = skeleton(context, 16-bit KV)                       everything no plan changes, in place
                    + sum over linears of (kernel ms at M=batch - stub ms)  the chosen kernel per linear
                    + sum over layers of (skeleton(context, KV_l) - skeleton(context, 16-bit)) / layers
                    (+ head ms in the plan's format - 16-bit head ms, when the plan quantizes lm_head)

Contexts between or beyond the measured ones are interpolated linearly (attention work is linear in the
cached tokens). The kernel per linear is chosen as ``apply_plan`` chooses it with this profile's
latencies (``kernel_latency``): the fastest measured kernel that holds the plan's bytes under ``auto``.

Memory: the plan's exact held weight bytes (unquantized tensors at the profiled model's dtype: 4 bytes in a
float32 model), its KV bytes at ``batch`` x ``context``, and a workspace estimate (one prefill chunk's widest
activation twice, plus fp32 logits) for the peak.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bitplan.errors import BitplanError
from bitplan.formats import ActFormat, KVFormat, WeightFormat, parse_weight
from bitplan.graph import ModelGraph
from bitplan.plan import Plan
from bitplan.profiles._table import HardwareProfile, HWRow

__all__ = ["Prediction", "ProfileIndex", "predict"]

_SIXTEEN = parse_weight("bf16")


@dataclass(frozen=True)
class Prediction:
    weight_bytes: int
    kv_bytes: int
    peak_bytes: int
    decode_ms: float  # per generated token, at batch sequences and context cached tokens
    prefill_ms: float  # one chunk of the profile's prefill length, per batch
    batch: int
    context: int
    breakdown: dict[str, float] = field(default_factory=dict)  # decode ms by part
    kernels: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _interp(points: Sequence[tuple[int, float]], x: float) -> float:
    """Piecewise-linear through ``points`` (sorted by x), extended linearly past both ends."""
    pts = sorted(points)
    if len(pts) == 1:
        return pts[0][1]
    i = 1
    while i < len(pts) - 1 and x > pts[i][0]:
        i += 1
    (x0, y0), (x1, y1) = pts[i - 1], pts[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


class ProfileIndex:
    """Fast lookups into a profile: kernel times per linear, skeleton and KV terms per context."""

    def __init__(self, profile: HardwareProfile) -> None:
        self.profile = profile
        self.linear: dict[tuple[str, int, int, str, str], list[HWRow]] = {}
        for r in profile.by_part("linear"):
            self.linear.setdefault((r.phase, r.out_features, r.in_features, r.weight, r.act), []).append(r)
        self.stub = {r.phase: r.median_ms for r in profile.by_part("stub")}
        self.skeleton: dict[tuple[str, str], list[tuple[int, float]]] = {}
        for r in profile.by_part("skeleton"):
            self.skeleton.setdefault((r.phase, r.kv), []).append((r.context, r.median_ms))

    def kernel_rows(self, phase: str, shape: tuple[int, int], fmt: WeightFormat, act: ActFormat) -> list[HWRow]:
        rows = self.linear.get((phase, shape[0], shape[1], str(fmt.compute_format), str(act)))  # d6/d8 run decoded
        if not rows:
            raise BitplanError(
                f"the hardware profile has no {phase} timing for a {shape[0]}x{shape[1]} linear in {fmt}/{act}; "
                f"rerun `bitplan profile-hw` with that format in --weights/--acts"
            )
        return rows

    def linear_ms(self, phase: str, shape: tuple[int, int], fmt: WeightFormat, act: ActFormat, policy: str = "auto") -> tuple[float, str]:
        """(ms, kernel) of the kernel ``apply_plan(kernels=policy)`` would choose with this profile."""
        from bitplan.kernels import LinearSpec, get_kernel

        if not fmt.is_quantized and not act.is_quantized:
            fmt = _SIXTEEN  # the model's own linear, whatever its 16-bit dtype
        rows = self.kernel_rows(phase, shape, fmt, act)
        if rows[0].kernel == "torch":
            return rows[0].median_ms, "torch"
        spec = LinearSpec(fmt, act, *shape)
        if policy == "auto":
            rows = [r for r in rows if get_kernel(r.kernel).holds_plan_bytes(spec)] or rows
        elif policy != "fastest":
            rows = [r for r in rows if r.kernel == policy]
            if not rows:
                raise BitplanError(f"the hardware profile has no timing of kernel {policy!r} for {spec}")
        best = min(rows, key=lambda r: r.median_ms)
        return best.median_ms, best.kernel

    def skeleton_ms(self, phase: str, context: int, kv: KVFormat | str = "k16v16") -> float:
        pts = self.skeleton.get((phase, str(kv)))
        if not pts:
            raise BitplanError(f"the hardware profile has no {phase} skeleton timing with KV {kv}; rerun `bitplan profile-hw` with it in --kv")
        return _interp(pts, context)

    def kv_delta_ms(self, context: int, kv: KVFormat, num_layers: int) -> float:
        """Extra decode ms of one layer holding ``kv`` instead of a 16-bit cache."""
        if not kv.is_quantized:
            return 0.0
        return (self.skeleton_ms("decode", context, kv) - self.skeleton_ms("decode", context)) / num_layers

    def kernel_latency(self, phase: str = "decode") -> Callable[[Any, Any], float | None]:
        """A ``latency=`` callback for :func:`bitplan.apply_plan` / ``choose_kernel``: measured ms or None."""

        def latency(kernel: Any, spec: Any) -> float | None:
            for r in self.linear.get((phase, spec.out_features, spec.in_features, str(spec.weight), str(spec.act)), []):
                if r.kernel == kernel.name:
                    return r.median_ms
            return None

        return latency


def predict(
    plan: Plan,
    profile: HardwareProfile | ProfileIndex,
    graph: ModelGraph,
    *,
    batch: int | None = None,
    context: int | None = None,
    kernels: str = "auto",
) -> Prediction:
    """Predicted memory and latency of ``plan`` on the profiled device (see the module docstring).

    Pass a :class:`ProfileIndex` (built once) when predicting many plans from one profile.
    """
    idx = profile if isinstance(profile, ProfileIndex) else ProfileIndex(profile)
    profile = idx.profile
    profile.check_model(graph.fingerprint)
    plan = plan.validate(graph)
    meta = profile.meta
    batch = meta.batch if batch is None else batch
    if batch != meta.batch:
        raise BitplanError(f"the hardware profile was measured at batch {meta.batch}; profile again with --batch {batch}")
    context = max(meta.contexts) if context is None else context
    if context < 1:
        raise BitplanError(f"--context must be at least 1, got {context}")
    units = {u.name: u for u in graph.units(plan.granularity)}
    acts = plan.act_formats()
    out: dict[str, float] = {"skeleton": idx.skeleton_ms("decode", context), "linears": 0.0, "kv": 0.0, "head": 0.0}
    prefill = idx.skeleton_ms("prefill", meta.chunk)
    kernels_used: dict[str, int] = {}
    for name, choice in plan.unit_choices():
        if name == "lm_head":
            if choice.format.is_quantized:
                head = graph.lm_head
                assert head is not None  # validated
                shape = (head.out_features, head.in_features)
                ms, k = idx.linear_ms("decode", shape, choice.format, ActFormat(), kernels)
                ms16, _ = idx.linear_ms("decode", shape, _SIXTEEN, ActFormat())
                out["head"] += ms - ms16
                p, _ = idx.linear_ms("prefill", shape, choice.format, ActFormat(), kernels)
                p16, _ = idx.linear_ms("prefill", shape, _SIXTEEN, ActFormat())
                prefill += p - p16
                kernels_used[k] = kernels_used.get(k, 0) + 1
            continue
        unit = units[name]
        act = acts[unit.layer or 0]
        for member in unit.members:
            shape = (member.out_features, member.in_features)
            fmt = choice.format.fit_group(member.in_features)
            ms, k = idx.linear_ms("decode", shape, fmt, act, kernels)
            out["linears"] += ms - idx.stub.get("decode", 0.0)
            p, _ = idx.linear_ms("prefill", shape, fmt, act, kernels)
            prefill += p - idx.stub.get("prefill", 0.0)
            kernels_used[k] = kernels_used.get(k, 0) + 1
    for kv in plan.kv_formats():
        out["kv"] += idx.kv_delta_ms(context, kv, graph.num_layers)
    s = plan.summary()
    kv_bytes = int(s.kv_bytes(context, batch))
    widest = max([graph.hidden_size, *(m.out_features for u in units.values() for m in u.members)])
    dtype_bytes = 2 if meta.dtype in ("bfloat16", "float16") else 4
    # the summary counts unquantized tensors at 16 bits; a model run in float32 holds them at 4 bytes
    unquantized = graph.total_params - s.unit_params + sum(
        n for f, n in s.weight_formats.items() if not parse_weight(f).is_quantized
    )
    weight_bytes = s.weight_bytes + (dtype_bytes - 2) * unquantized
    workspace = 2 * batch * meta.chunk * widest * dtype_bytes + 4 * batch * graph.vocab_size
    return Prediction(
        weight_bytes=weight_bytes, kv_bytes=kv_bytes, peak_bytes=weight_bytes + kv_bytes + workspace,
        decode_ms=sum(out.values()), prefill_ms=prefill, batch=batch, context=context, breakdown=out,
        kernels=dict(sorted(kernels_used.items())),
    )  # fmt: skip
