"""`python -m dvi.cli ...`: the same as the `dvi` command."""
import sys

from dvi.cli import main

sys.exit(main())
