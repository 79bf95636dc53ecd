"""`dvi run`: its config (config.py), the run itself (runner.py) on the learning plane it shares with `dvi serve`
(plane.py), with its monitor thread (monitor.py), the
numbers of summary.json (summary.py) and the run directory read back (files.py)."""
