"""Hardware profiles: measured latency of every option on a device, and the cost model built on them.

    from bitplan.profiles import profile_hw, HardwareProfile, predict
    hw = profile_hw(model, device="cpu", batch=1, contexts=(128, 1024), output="hw.parquet")
    p = predict(plan, HardwareProfile.load("hw.parquet"), build_graph(model), context=512)
    p.decode_ms, p.prefill_ms, p.peak_bytes

A profile is tied to the device it was measured on (:class:`DeviceFingerprint`; using another's is an
error unless allowed) and to one model's shapes. The search uses it through :class:`ProfileCostModel`.
"""

from bitplan.profiles._cost import ProfileCostModel, load_profile
from bitplan.profiles._decode import paired_decode_ms
from bitplan.profiles._fingerprint import DeviceFingerprint, device_fingerprint
from bitplan.profiles._measure import decode_ms_per_token, profile_hw, stubbed
from bitplan.profiles._predict import Prediction, ProfileIndex, predict
from bitplan.profiles._table import HardwareProfile, HWRow, ProfileMeta

__all__ = [
    "DeviceFingerprint",
    "HWRow",
    "HardwareProfile",
    "Prediction",
    "ProfileCostModel",
    "ProfileIndex",
    "ProfileMeta",
    "decode_ms_per_token",
    "device_fingerprint",
    "load_profile",
    "paired_decode_ms",
    "predict",
    "profile_hw",
    "stubbed",
]
