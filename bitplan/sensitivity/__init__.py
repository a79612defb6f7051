"""Sensitivity profiling: how much each unit's weights, activations and K/V cache hurt the model.

For every decision unit and candidate weight option, every layer's activation formats and every
attention layer's (K bits, V bits) pairs, the harm of quantizing *only that* is scored in nats per
token, as the mean KL(p_ref || p_quant) of next-token distributions:

* ``kl`` (measured): the KL itself, on calibration tokens; the unquantized prefix of the network is
  run once and reused, so each option costs only the layers from its own onwards;
* ``fisher`` (fast): its second-order estimate from the Fisher at each unit's output, scoring all
  options of all units from one forward+backward per batch.

The output head (kind ``head``: ``weight`` rows of unit ``lm_head``) is always measured, one forward per
option (``_head``).

The search adds these scores; :func:`additivity_check` measures how well that holds. Results go into a
:class:`SensitivityTable` (Parquet with identity metadata, reused for the same inputs, resumable).
"""

from bitplan.sensitivity._additivity import (
    AdditivityReport,
    additivity_check,
    predicted_kl,
    random_mixed_plans,
)
from bitplan.sensitivity._calib import CalibData, load_calib
from bitplan.sensitivity._candidates import Candidates, WeightOption, parse_weight_option
from bitplan.sensitivity._kvreduce import KVReduction, k_vs_v, reduce_kv
from bitplan.sensitivity._profile import profile
from bitplan.sensitivity._rows import ScoreRow
from bitplan.sensitivity._table import SensitivityTable, TableMeta, describe

__all__ = [
    "AdditivityReport",
    "CalibData",
    "Candidates",
    "ScoreRow",
    "SensitivityTable",
    "TableMeta",
    "KVReduction",
    "WeightOption",
    "additivity_check",
    "describe",
    "k_vs_v",
    "load_calib",
    "parse_weight_option",
    "predicted_kl",
    "profile",
    "random_mixed_plans",
    "reduce_kv",
]
