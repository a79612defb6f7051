"""Multi-objective Optuna search over per-layer formats under memory and latency budgets (issue: search)."""
