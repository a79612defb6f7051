"""Multi-objective Optuna search over per-layer formats under memory and latency budgets.

From a sensitivity table to a verified Pareto front: :class:`SearchSpace` turns the table into one Optuna
parameter per decision (``layers.7.mlp.down_proj``, ``layers.7.acts``, ``layers.7.kv``), :class:`Budgets`
states the limits, a :class:`CostModel` prices decode latency (:class:`BytesCostModel` stands in until a
hardware profile exists), :func:`search` seeds the study with exact knapsack optima of the additive proxy,
runs the sampler, verifies the best front plans on the model and writes the run directory;
:func:`run_pipeline` is ``bitplan search``: sensitivity, search, verification and report in one call.
"""

from bitplan.search._budgets import Budgets, parse_bytes, parse_latency
from bitplan.search._cost import BytesCostModel, CostModel, LatencyTable
from bitplan.search._pipeline import PipelineInputs, run_pipeline
from bitplan.search._report import check_outputs
from bitplan.search._run import SearchConfig, SearchResult, search, seed_improvement
from bitplan.search._space import Decision, Option, ProxyMetrics, SearchSpace

__all__ = [
    "Budgets",
    "BytesCostModel",
    "CostModel",
    "Decision",
    "LatencyTable",
    "Option",
    "PipelineInputs",
    "ProxyMetrics",
    "SearchConfig",
    "SearchResult",
    "SearchSpace",
    "check_outputs",
    "parse_bytes",
    "parse_latency",
    "run_pipeline",
    "search",
    "seed_improvement",
]
