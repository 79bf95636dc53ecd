"""Reports of what runs and studies left on disk: a run directory's report.md (run.py), a drift study's
(drift.py), their plots (plots.py), and the numbers, tables and files they share (format.py)."""
