"""docs/config.md is what scripts/config_docs.py renders from the config models, and rendering it needs no torch."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("config_docs", ROOT / "scripts" / "config_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_committed_config_md_is_what_the_models_say():
    generator = _generator()
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == generator.render(), generator.STALE


def test_every_config_field_has_a_description():
    generator = _generator()
    assert generator.undocumented() == [], "add description= to these fields, then run python scripts/config_docs.py"


def test_a_field_without_a_description_is_flagged():
    from pydantic import BaseModel, Field

    generator = _generator()

    class Inner(BaseModel):
        bare: int = 0

    class Root(BaseModel):
        told: int = Field(0, description="has one")
        inner: Inner = Field(Inner(), description="has one")

    section = generator.Section("x", "x", Root, "x", [], "")
    assert generator.undocumented([section]) == [f"{__name__}.{Inner.__qualname__}.bare"]


def test_every_config_file_is_documented_and_loads_with_its_model():
    generator = _generator()
    documented = {f: s.model for s in generator.load_sections() for f in s.files}
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")}
    assert shipped == set(documented)
    for name, model in documented.items():
        model.model_validate(yaml.safe_load((ROOT / name).read_text()))


def test_rendering_imports_no_torch():
    code = ("import sys; sys.path.insert(0, 'scripts'); import config_docs; config_docs.render(); "
            "print(sorted(m for m in ('torch', 'transformers', 'ray', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
