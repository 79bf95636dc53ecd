"""Write docs/config.md, the reference of every config key, from the pydantic models that read the YAML files.

    python scripts/config_docs.py           # (re)write docs/config.md
    python scripts/config_docs.py --check   # exit 1 if docs/config.md is not what the models say, or a
                                            # field has no description

One section per kind of config file (the command that reads it and the files in configs/ that are one), one
table per model and sub-model: dotted key, type (with its bounds), default and description. A description
is the field's `description=`; every field of every documented model must have one (`undocumented`). A model used in
several places has one table, where it appears first; the others link to it. The output depends only on
the models and this file (no dates, no paths of this machine), so the committed file can be compared with
a fresh rendering (tests/unit/test_config_docs.py). Importing the models imports no torch.
"""
from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "config.md"
STALE = "docs/config.md is stale: run python scripts/config_docs.py"

if str(ROOT) not in sys.path:  # `python scripts/config_docs.py` puts scripts/, not the root, on the path
    sys.path.insert(0, str(ROOT))

from pydantic import BaseModel, SecretStr  # noqa: E402
from pydantic_core import PydanticUndefined  # noqa: E402


@dataclass
class Section:
    id: str  # anchor prefix
    title: str
    model: type[BaseModel]
    commands: str
    files: list[str]
    intro: str
    own_fields_only: bool = False  # a model extending another section's root: document only what it adds
    skip: dict[str, tuple[str, ...]] = field(default_factory=dict)  # sub-model path -> keys set elsewhere


def load_sections() -> list[Section]:
    """The sections in document order (the imports are the config models, light by design)."""
    from actors.traffic import TraceSpec
    from dvi.run.config import RUN_OWNED, RunConfig
    from dvi.serve.config import ServeConfig
    from dvi.studies.drift_config import STUDY_OWNED, DriftConfig
    from learner.config import LearnerConfig
    from selfspec.config import OnlineConfig

    owned = ", ".join(f"`{'.'.join(path)}`" for path in STUDY_OWNED)
    return [
        Section("run", "`dvi run`", RunConfig, "`dvi run --config FILE`",
                ["configs/local.yaml", "configs/gpu.yaml", "configs/spec-bench.yaml"],
                "The whole system on one trace: Redis, generation actors, the learner group and the replay. "
                "The run sets what its parts must agree on once, at the top level (`model`, `exit_layer`, "
                "`head`, `redis`, `stream`, ...): the same keys inside `actors:` or `learner:` are errors.",
                skip=dict(RUN_OWNED)),
        Section("serve", "`dvi serve`", ServeConfig, "`dvi serve --config FILE`",
                ["configs/serve.yaml", "configs/serve_gpu.yaml"],
                "The same system behind an OpenAI-compatible endpoint: every key of [`dvi run`](#run) except "
                "`trace` and `seed`, and the endpoint's own keys below (`serve:`). `actors:` are the generation "
                "replicas.", own_fields_only=True),
        Section("drift", "`dvi drift`", DriftConfig, "`dvi drift --config FILE`", ["configs/drift.yaml"],
                "A drift study: every key of [`dvi run`](#run) (the base every arm runs with), except "
                f"{owned}, which each arm sets, and the study's own keys below.",
                own_fields_only=True),
        Section("learner", "`dvi learner`", LearnerConfig,
                "`dvi learner --config FILE` (and `dvi bench-learner --config FILE`)", ["configs/learner.yaml"],
                "The DeepSpeed learner on its own, against a running Redis. Inside a `dvi run` config these keys "
                "go under `learner:`, except those the run sets at its top level."),
        Section("online", "`dvi online`", OnlineConfig, "`dvi online --config FILE`, `dvi ablate --config FILE`",
                ["configs/online.yaml"],
                "In-process online learning of the drafter head: no Redis, no Ray."),
        Section("trace", "`dvi trace make`", TraceSpec, "`dvi trace make --config FILE`",
                ["configs/traces/drift_demo.yaml"],
                "A replayable traffic trace. Inside a `dvi run` config the same keys go under `trace.make`."),
    ]


# Which section gives a shared model its table: trace specs first (their union members), then dvi run's.
HOMING_ORDER = ("trace", "run", "learner", "online", "serve", "drift")


# ---------------------------------------------------------------- types


def _unwrap(tp):
    """(type without Annotated, discriminator or None)."""
    discriminator = None
    while typing.get_origin(tp) is typing.Annotated:
        tp, *meta = typing.get_args(tp)
        for m in meta:
            discriminator = getattr(m, "discriminator", None) or discriminator
    return tp, discriminator


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _is_model(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _kind(model: type[BaseModel]) -> str | None:
    """The `kind` Literal value of a discriminated union member."""
    f = model.model_fields.get("kind")
    if f is not None and typing.get_origin(f.annotation) is typing.Literal:
        return str(typing.get_args(f.annotation)[0])
    return None


def _tagged_union(tp) -> list[type[BaseModel]] | None:
    tp, _ = _unwrap(tp)
    if not _is_union(tp):
        return None
    members = [_unwrap(a)[0] for a in typing.get_args(tp)]
    if members and all(_is_model(m) and _kind(m) for m in members):
        return members
    return None


def nested(tp) -> list[tuple[str, type[BaseModel]]]:
    """The models a field's values are, with the path suffix for each: '' for a model, '[]' for a list
    item, '<kind>' for each member of a tagged union (None and plain types left out)."""
    tp, _ = _unwrap(tp)
    if _is_model(tp):
        return [("", tp)]
    members = _tagged_union(tp)
    if members:
        return [(f"<{_kind(m)}>", m) for m in members]
    origin = typing.get_origin(tp)
    if _is_union(tp):
        return [x for a in typing.get_args(tp) if a is not type(None) for x in nested(a)]
    if origin in (list, tuple, set, frozenset):
        return [(f"[]{suffix}", m) for a in typing.get_args(tp) for suffix, m in nested(a)]
    if origin is dict:
        return [(f".KEY{suffix}", m) for suffix, m in nested(typing.get_args(tp)[1])]
    return []


BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))


def _bounds(metadata) -> str:
    parts = []
    for m in metadata:
        for attr, sign in BOUNDS:
            value = getattr(m, attr, None)
            if value is not None:
                parts.append(f"{sign} {_plain(value)}")
        if getattr(m, "min_length", None) is not None:
            parts.append(f"at least {m.min_length} item{'s' if m.min_length != 1 else ''}")
        if getattr(m, "max_length", None) is not None:
            parts.append(f"at most {m.max_length} items")
    return ", ".join(parts)


def type_text(tp, link) -> str:
    tp, _ = _unwrap(tp)
    members = _tagged_union(tp)
    if members:
        return "one of " + ", ".join(link(m, f"kind: {_kind(m)}") for m in members)
    if _is_union(tp):
        args = typing.get_args(tp)
        text = " or ".join(type_text(a, link) for a in args if a is not type(None))
        return text + (" or null" if type(None) in args else "")
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        values = typing.get_args(tp)
        return " or ".join(f"`{v}`" for v in values) if len(values) > 1 else f"`{values[0]}`"
    if origin in (list, tuple, set, frozenset):
        return "list of " + ", ".join(type_text(a, link) for a in typing.get_args(tp) if a is not Ellipsis)
    if origin is dict:
        key, value = typing.get_args(tp)
        return f"mapping of {type_text(key, link)} to {type_text(value, link)}"
    if _is_model(tp):
        return link(tp, tp.__name__)
    if tp is SecretStr:
        return "str (secret)"
    return getattr(tp, "__name__", str(tp))


# ---------------------------------------------------------------- defaults and descriptions


def _plain(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_plain(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_plain(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return value if value and not re.search(r"[\s:#,\[\]{}]", value) and value not in ("null", "true", "false") \
            else f'"{value}"'
    return str(value)


def default_text(info) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
    elif info.default is PydanticUndefined:
        return "**required**"
    else:
        value = info.default
    if isinstance(value, BaseModel):
        data = value.model_dump(mode="json", exclude_defaults=True)
        return f"`{_plain(data)}`" if data else "its keys' defaults"
    if isinstance(value, SecretStr):
        return "(secret)"
    return f"`{_plain(value)}`"


def description(model: type[BaseModel], name: str) -> str:
    return model.model_fields[name].description or ""


def all_models(sections: list[Section]) -> list[type[BaseModel]]:
    """Every model the sections read, sub-models included (keys set elsewhere too), in a stable order."""
    seen: dict[type, None] = {}

    def visit(model: type[BaseModel]) -> None:
        if model not in seen:
            seen[model] = None
            for info in model.model_fields.values():
                for _, sub in nested(info.annotation):
                    visit(sub)

    for section in sections:
        visit(section.model)
    return list(seen)


def undocumented(sections: list[Section] | None = None) -> list[str]:
    """`module.Class.field` of every field without a `description=`, named where it is declared."""
    sections = sections if sections is not None else load_sections()
    missing = {}
    for model in all_models(sections):
        for name, info in model.model_fields.items():
            if not (info.description or "").strip():
                owner = next(k for k in model.__mro__ if name in vars(k).get("__annotations__", {}))
                missing[f"{owner.__module__}.{owner.__qualname__}.{name}"] = None
    return list(missing)


def docstring(model: type) -> str:
    doc = vars(model).get("__doc__")
    return " ".join(inspect.cleandoc(doc).split()) if doc else ""


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


# ---------------------------------------------------------------- layout


def own_fields(section: Section, model: type[BaseModel], path: str) -> list[str]:
    names = list(model.model_fields)
    if path == "" and section.own_fields_only:
        names = [n for n in names if n in vars(model).get("__annotations__", {})]
    return names


def walk(section: Section, model: type[BaseModel], path: str, roots: set[type]):
    """(path, field name, suffix, nested model) for every nested model below `model`, depth first, not
    descending into other sections' roots or keys the section sets elsewhere."""
    skipped = section.skip.get(path, ())
    for name in own_fields(section, model, path):
        if name in skipped:
            continue
        for suffix, sub in nested(model.model_fields[name].annotation):
            sub_path = f"{path}.{name}{suffix}" if path else f"{name}{suffix}"
            yield path, name, sub_path, sub
            if sub not in roots:
                yield from walk(section, sub, sub_path, roots)


def anchor(section_id: str, path: str) -> str:
    slug = re.sub(r"[^a-z0-9_.-]+", "", path.lower().replace("<", ".").replace("[]", "").replace(".key", ""))
    return f"{section_id}.{slug}".rstrip(".") if slug else section_id


def key_path(path: str) -> str:
    """A table path as a user writes its keys: `sources[].path`, `arrival.rate` (kind: poisson)."""
    return re.sub(r"<[^>]*>", "", path)


def render(sections: list[Section] | None = None) -> str:
    sections = sections if sections is not None else load_sections()
    roots = {s.model for s in sections}
    homes: dict[type, tuple[Section, str]] = {s.model: (s, "") for s in sections}
    by_id = {s.id: s for s in sections}
    for section in (by_id[i] for i in HOMING_ORDER if i in by_id):
        for _, _, sub_path, sub in walk(section, section.model, "", roots):
            homes.setdefault(sub, (section, sub_path))

    def link(model: type[BaseModel], text: str) -> str:
        home_section, home_path = homes[model]
        return f"[{text}](#{anchor(home_section.id, home_path)})"

    out = ["# Configuration reference", "",
           "<!-- Generated by scripts/config_docs.py from the config models; edit the models' field "
           "descriptions, then run: python scripts/config_docs.py -->", "",
           "Every config file is YAML, read into the pydantic models named below. An unknown key is an error "
           "naming it; `null` is Python's None. On the command line, `--set KEY=VALUE` overrides one key "
           "(dotted for a section: `--set head.lora_rank=8`, a YAML value). Each section's tables give every "
           "key with its type, bounds, default and meaning; a section shared by several files has one table, "
           "which the others link to.", "",
           "| command | config files | section |", "|---|---|---|"]
    for s in sections:
        files = ", ".join(f"[`{f}`](../{f})" for f in s.files)
        out.append(f"| {s.commands} | {files} | [{s.title}](#{s.id}) |")
    out.append("")

    def table(section: Section, model: type[BaseModel], path: str, heading: str) -> None:
        if path:  # the section's own anchor leads to its top-level table
            out.extend([f'<a id="{anchor(section.id, path)}"></a>', ""])
        out.extend([heading, ""])
        doc = docstring(model)
        if doc:
            out.extend([doc, ""])
        skipped = section.skip.get(path, ())
        out.extend([f"Model: `{model.__module__}.{model.__qualname__}`." + (
            " Set at the top level, not here: " + ", ".join(f"`{k}`" for k in skipped) + "." if skipped else ""), ""])
        prefix = f"{key_path(path)}." if path else ""
        rows = ["| key | type | default | description |", "|---|---|---|---|"]
        for name in own_fields(section, model, path):
            if name in skipped:
                continue
            info = model.model_fields[name]
            kind = type_text(info.annotation, link)
            bounds = _bounds(info.metadata)
            if bounds:
                kind = f"{kind}, {bounds}"
            text = description(model, name)
            for suffix, sub in nested(info.annotation):
                home_section = homes[sub][0]
                if sub in roots and home_section is not section:
                    owned = section.skip.get(f"{path}.{name}{suffix}" if path else f"{name}{suffix}", ())
                    note = f"the keys of {home_section.title}" + (
                        ", except " + ", ".join(f"`{k}`" for k in owned) + " (set at the top level)" if owned else "")
                    text = f"{text}; {note}" if text else note
            rows.append(f"| `{prefix}{name}` | {cell(kind)} | {cell(default_text(info))} | {cell(text)} |")
        out.extend(rows)
        out.append("")

    for section in sections:
        files = ", ".join(f"`{f}`" for f in section.files)
        out.extend([f'<a id="{section.id}"></a>', "", f"## {section.title}", "",
                    f"Read by {section.commands}; files: {files}. {section.intro}", ""])
        table(section, section.model, "", "### Top level")
        for parent, name, sub_path, sub in walk(section, section.model, "", roots):
            if homes.get(sub) != (section, sub_path):
                continue
            kind = _kind(sub) if sub_path.endswith(">") else None
            where = f"`{key_path(sub_path)}`" + (f" with `kind: {kind}`" if kind else "")
            table(section, sub, sub_path, f"### {where}")
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/config.md differs from the models")
    args = parser.parse_args(argv)
    missing = undocumented()
    if missing:
        print(f"{len(missing)} config field(s) without a description= (the reference needs one each): "
              + ", ".join(missing), file=sys.stderr)
        return 1
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(STALE, file=sys.stderr)
            return 1
        print("docs/config.md is up to date")
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
