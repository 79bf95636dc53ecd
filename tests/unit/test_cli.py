"""The `dvi` command line stays lazy: building its parser (what `dvi --help` does) loads no torch."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_building_the_parser_imports_neither_torch_nor_transformers():
    code = ("import sys, dvi.cli; dvi.cli.build_parser(); "
            "print(','.join(m for m in ('torch', 'transformers') if m in sys.modules) or 'none')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "none", f"imported while building the parser: {done.stdout.strip()}"
