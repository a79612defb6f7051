"""Which device a profile was measured on, and whether it is this one.

A latency table is only true of the hardware and software that produced it: another CPU model, another
core or thread count, another GPU, another torch / Triton build, or another OpenMP wait policy changes
kernel speed. The last is easy to miss: with ``OMP_WAIT_POLICY=PASSIVE`` idle OpenMP threads sleep instead
of spinning, and the many short parallel regions of a packed int4 GEMV then pay a wake-up each; on a 2-core
AVX2 machine that turns uniform w4g64a from 0.71x of the fp32 model's decode time into 1.11x (same plan,
same kernels; bench/RESULTS.md, profiles-omp), so a profile measured under one policy is wrong under the other. So a profile
carries a fingerprint of all of them, and using one whose fingerprint differs from the current device is
refused unless the user says otherwise (``--allow-foreign-profile``).

Nothing here probes a GPU at import; :func:`device_fingerprint` touches CUDA only when asked for it.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, fields
from importlib import metadata
from typing import Any

import torch

from bitplan.errors import BitplanError, DataError

__all__ = ["DeviceFingerprint", "device_fingerprint"]


@dataclass(frozen=True)
class DeviceFingerprint:
    kind: str  # "cpu" / "cuda"
    name: str  # CPU model name / GPU name
    units: int  # CPU cores / GPU streaming multiprocessors
    threads: int  # torch intra-op threads (CPU); 0 on GPU
    torch: str
    triton: str  # "" when Triton is not installed
    omp: str = ""  # OpenMP settings that change CPU kernel speed, e.g. "OMP_WAIT_POLICY=PASSIVE"; "" = defaults

    def __str__(self) -> str:
        unit = "cores" if self.kind == "cpu" else "SMs"
        threads = f", {self.threads} threads" if self.kind == "cpu" else ""
        omp = f", {self.omp}" if self.omp else (", OpenMP defaults" if self.kind == "cpu" else "")
        triton = f", triton {self.triton}" if self.triton else ""
        return f"{self.name} ({self.kind}, {self.units} {unit}{threads}{omp}), torch {self.torch}{triton}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "profile") -> DeviceFingerprint:
        # ``omp`` came later (schema 1 profiles lack it): read as "unknown", which no live device matches
        d = {"omp": "unknown OpenMP settings", **d}
        try:
            return cls(**{f.name: d[f.name] for f in fields(cls)})
        except (KeyError, TypeError) as e:
            raise DataError(f"{source}: device fingerprint lacks {e}") from None

    def check_matches(self, current: DeviceFingerprint, *, allow_foreign: bool = False, source: str = "profile") -> None:
        """Raise unless ``current`` is the device this profile was measured on (or ``allow_foreign``)."""
        if self == current or allow_foreign:
            return
        raise BitplanError(
            f"{source} was measured on {self}, but this device is {current}; measure this device with "
            "`bitplan profile-hw`, or pass --allow-foreign-profile to use it anyway"
        )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _triton_version() -> str:
    try:
        return metadata.version("triton")
    except metadata.PackageNotFoundError:
        return ""


#: Environment variables of the OpenMP runtimes (GNU, Intel/LLVM) that change how fast CPU kernels run.
OMP_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_PROC_BIND", "OMP_PLACES")


def _omp_settings() -> str:
    return " ".join(f"{k}={os.environ[k]}" for k in OMP_ENV if os.environ.get(k))


def device_fingerprint(device: str | torch.device = "cpu") -> DeviceFingerprint:
    """The fingerprint of ``device`` as this process sees it (thread count included on CPU)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return DeviceFingerprint("cpu", _cpu_name(), os.cpu_count() or 0, torch.get_num_threads(), torch.__version__, _triton_version(),
                                 _omp_settings())
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BitplanError("--device cuda: no CUDA device is available")
        props = torch.cuda.get_device_properties(dev)
        return DeviceFingerprint("cuda", props.name, props.multi_processor_count, 0, torch.__version__, _triton_version())
    raise BitplanError(f"unsupported device {dev.type!r}; use cpu or cuda")
