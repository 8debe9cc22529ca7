"""The evaluation room: sets (specs, protocol, cached synthetic sets), run (the modes and
metrics.json), tables and plots (the reports), stage (the `evaluate` stage that ties them)."""
