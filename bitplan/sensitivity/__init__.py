"""Sensitivity profiling: how much each unit's weight, activation and K/V format hurts the model (issue: sensitivity)."""
