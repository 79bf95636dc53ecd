"""`dvi run`: its config (config.py), the run itself (runner.py) with its monitor thread (monitor.py), the
numbers of summary.json (summary.py) and the run directory read back (files.py)."""
