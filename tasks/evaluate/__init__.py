"""The `evaluate` stage: metrics, sets, running the modes, tables, plots."""
