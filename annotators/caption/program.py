"""Caption programs: which model calls write the text of an image and of each of its regions.

A program is data (YAML in ``annotators/caption/programs/<name>.yaml``, or any path). Fields:

* ``id``, ``version``, ``system`` (system prompt of every step unless a step sets its own);
* ``visual_prompts``: per level ("image", "region", "pixel") a list of ``{name, kind, **params}``
  (kinds: ``annotators.caption.visual_prompts``), drawn by the engine at the size each client
  sends images at, and encoded once per image;
* ``steps``: per level an ordered list of calls, each ``{name, prompt, images, json_schema?,
  client?, max_tokens?, temperature?, system?}``. ``prompt`` is a ``str.format`` template over the
  target's fields (``TARGET_FIELDS``) and the outputs of earlier steps of the same level.
  ``images`` lists "image" (the whole stored image: shared by all targets of an image and sent
  first, so a server's prefix cache reuses it) and/or visual prompt names of that level (sent
  after); an empty list makes a text-only call. ``json_schema`` asks for structured output.
  ``client`` names an entry of the captioner's ``clients`` setting (another model or endpoint).
* any other top-level key starting with ``_`` or named ``schemas`` is ignored (YAML anchors).

Step names with a meaning: ``caption``, ``long_caption`` (defaults to the caption), ``tags``
(JSON ``{"tags": [...]}``: lowercased, stripped, deduplicated) and ``judge`` (JSON ``{"keep":
bool, "reason": str}``, kept in the record as the target's verdict; with ``on_reject: drop``, the
default, keep=false drops the target with reason ``judge_rejected``, with ``on_reject: flag`` it
stays, marked). Other steps are intermediate: later templates use their text, and the record keeps
them under ``steps``. ``annotators.caption.engine`` runs programs.
"""
from __future__ import annotations

import dataclasses
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from settings import ConfigError, require, stable_hash

PROGRAM_DIR = Path(__file__).resolve().parent / "programs"
LEVELS: tuple[str, ...] = ("image", "region", "pixel")
WHOLE_IMAGE = "image"
DEFAULT_CLIENT = "default"
SPECIAL_STEPS: tuple[str, ...] = ("caption", "long_caption", "tags", "judge")
TARGET_FIELDS: tuple[str, ...] = ("width", "height", "level", "bbox", "bbox_xyxy", "bbox_norm",
                                  "area_pct", "size", "position", "label", "given_caption")
_PROGRAM_KEYS = ("id", "version", "system", "description", "visual_prompts", "steps", "schemas")
_STEP_KEYS = ("name", "prompt", "images", "json_schema", "client", "max_tokens", "temperature",
              "system", "on_reject")
ON_REJECT = ("drop", "flag")


@dataclass(frozen=True)
class Step:
    """One model call of a program level."""

    name: str
    prompt: str
    images: tuple[str, ...] = (WHOLE_IMAGE,)
    json_schema: dict[str, Any] | None = None
    client: str = DEFAULT_CLIENT
    max_tokens: int | None = None
    temperature: float | None = None
    system: str | None = None
    on_reject: str = "drop"       # judge steps: what keep=false does ("drop" | "flag")


@dataclass(frozen=True)
class Program:
    """A loaded, checked caption program."""

    id: str
    version: str
    system: str
    visual_prompts: dict[str, list[dict[str, Any]]]
    steps: dict[str, tuple[Step, ...]]
    hash: str
    source: str

    def clients(self) -> set[str]:
        """Client names the steps use."""
        return {s.client for steps in self.steps.values() for s in steps}


def program_path(name_or_path: str) -> Path:
    """The YAML file of a program given by name (``umg``) or path."""
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:
        return Path(name_or_path)
    return PROGRAM_DIR / f"{name_or_path}.yaml"


def available_programs() -> list[str]:
    """Names of the programs shipped in ``annotators/caption/programs``."""
    return sorted(p.stem for p in PROGRAM_DIR.glob("*.yaml"))


def load_program(name_or_path: str) -> Program:
    """Load and check a program; ConfigError names what is wrong and how to fix it."""
    path = program_path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"program: no program {name_or_path!r} ({path}); use one of "
                          f"{available_programs()} or a path to a YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"program: {path} is not valid YAML: {exc}") from None
    return parse_program(data, str(path))


def parse_program(data: Any, source: str = "<dict>") -> Program:
    """A Program from its loaded YAML content (see the module docstring for the format)."""
    where = f"program {source}"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping with id, version, visual_prompts, steps")
    unknown = [k for k in data if k not in _PROGRAM_KEYS and not str(k).startswith("_")]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {list(_PROGRAM_KEYS)}")
    for key in ("id", "version", "steps"):
        if key not in data:
            raise ConfigError(f"{where}: missing '{key}'")
    prompts = _parse_visual_prompts(data.get("visual_prompts") or {}, where)
    raw_steps = data["steps"]
    if not isinstance(raw_steps, dict) or sorted(raw_steps) != sorted(LEVELS):
        raise ConfigError(f"{where}.steps: give a list of steps for each level {list(LEVELS)}")
    steps = {level: _parse_steps(raw_steps[level], level, prompts[level], f"{where}.steps.{level}")
             for level in LEVELS}
    content = {"id": str(data["id"]), "version": str(data["version"]),
               "system": str(data.get("system") or ""), "visual_prompts": prompts,
               "steps": {lv: [dataclasses.asdict(s) for s in st] for lv, st in steps.items()}}
    return Program(content["id"], content["version"], content["system"], prompts, steps,
                   stable_hash(content), source)


def resolved_visual_prompts(program: Program) -> dict[str, list[dict[str, Any]]]:
    """Every visual prompt of ``program`` per level: name, kind, renderer version, parameters
    with defaults filled in."""
    from annotators.caption import visual_prompts as vp

    return {level: [{"name": s["name"], **vp.spec_provenance(
        s["kind"], {k: v for k, v in s.items() if k not in ("name", "kind")})} for s in items]
        for level, items in program.visual_prompts.items()}


def prompt_clients(program: Program) -> dict[str, dict[str, list[str]]]:
    """Per level, each visual prompt's name -> the clients whose steps send it (sorted)."""
    out: dict[str, dict[str, set[str]]] = {level: {} for level in LEVELS}
    for level, steps in program.steps.items():
        for step in steps:
            for name in step.images:
                if name != WHOLE_IMAGE:
                    out[level].setdefault(name, set()).add(step.client)
    return {level: {name: sorted(clients) for name, clients in names.items()}
            for level, names in out.items()}


def program_hash_view(program: Program) -> dict[str, Any]:
    """What of a program changes captions: its content hash (not the file's name or path) and
    its visual prompts as rendered (renderer version and default parameters included)."""
    return {"id": program.id, "version": program.version, "hash": program.hash,
            "visual_prompts": resolved_visual_prompts(program)}


def _parse_visual_prompts(raw: Any, where: str) -> dict[str, list[dict[str, Any]]]:
    from annotators.caption import visual_prompts as vp

    if not isinstance(raw, dict) or set(raw) - set(LEVELS):
        raise ConfigError(f"{where}.visual_prompts: a mapping from level {list(LEVELS)} to lists")
    out: dict[str, list[dict[str, Any]]] = {}
    for level in LEVELS:
        specs = list(raw.get(level) or [])
        names = [s.get("name") if isinstance(s, dict) else None for s in specs]
        if any(not isinstance(n, str) or n == WHOLE_IMAGE for n in names) or \
                len(set(names)) != len(names):
            raise ConfigError(f"{where}.visual_prompts.{level}: each entry needs a unique 'name' "
                              f"(not {WHOLE_IMAGE!r}) and a 'kind'")
        for spec in specs:
            params = {k: v for k, v in spec.items() if k not in ("name", "kind")}
            try:
                vp.spec_provenance(spec.get("kind", ""), params)
            except Exception as exc:
                raise ConfigError(f"{where}.visual_prompts.{level}.{spec['name']}: {exc}") from None
        out[level] = [dict(s) for s in specs]
    return out


def _parse_steps(raw: Any, level: str, prompts: list[dict[str, Any]],
                 where: str) -> tuple[Step, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: give at least one step (a 'caption' step)")
    known = set(TARGET_FIELDS)
    image_names = {WHOLE_IMAGE} | {p["name"] for p in prompts}
    steps: list[Step] = []
    for i, item in enumerate(raw):
        step = _parse_step(item, f"{where}[{i}]")
        here = f"{where}.{step.name}"
        if step.name in {s.name for s in steps} or step.name in known:
            raise ConfigError(f"{here}: step names must be unique and not a target field")
        missing = _template_fields(step.prompt, here) - known
        if missing:
            raise ConfigError(f"{here}.prompt: unknown field(s) {sorted(missing)}; use "
                              f"{sorted(known)} (earlier steps only)")
        bad = [n for n in step.images if n not in image_names]
        if bad:
            raise ConfigError(f"{here}.images: unknown image(s) {bad}; use {sorted(image_names)}")
        if step.name in ("tags", "judge") and step.json_schema is None:
            raise ConfigError(f"{here}: a '{step.name}' step needs a json_schema")
        if step.on_reject != "drop" and step.name != "judge":
            raise ConfigError(f"{here}.on_reject: only a 'judge' step has one")
        steps.append(step)
        known.add(step.name)
    if "caption" not in known:
        raise ConfigError(f"{where}: needs a step named 'caption'")
    return tuple(steps)


def _parse_step(item: Any, where: str) -> Step:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str) or \
            not isinstance(item.get("prompt"), str):
        raise ConfigError(f"{where}: a step is a mapping with at least 'name' and 'prompt'")
    unknown = sorted(set(item) - set(_STEP_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {list(_STEP_KEYS)}")
    images = item.get("images", [WHOLE_IMAGE])
    if not isinstance(images, list) or not all(isinstance(n, str) for n in images):
        raise ConfigError(f"{where}.images: a list of image names")
    ordered = [WHOLE_IMAGE] * (WHOLE_IMAGE in images) + [n for n in images if n != WHOLE_IMAGE]
    schema = item.get("json_schema")
    if schema is not None and not isinstance(schema, dict):
        raise ConfigError(f"{where}.json_schema: a JSON Schema object")
    on_reject = item.get("on_reject", "drop")
    if on_reject not in ON_REJECT:
        raise ConfigError(f"{where}.on_reject: {on_reject!r} is not one of {list(ON_REJECT)}")
    return Step(item["name"], item["prompt"], tuple(ordered), schema,
                str(item.get("client") or DEFAULT_CLIENT), item.get("max_tokens"),
                item.get("temperature"), item.get("system"), on_reject)


def step_inputs(step: Step, earlier: Iterable[str]) -> list[str]:
    """The earlier steps whose outputs ``step``'s prompt reads, sorted."""
    fields = _template_fields(step.prompt, step.name)
    return sorted(fields & set(earlier))


def _template_fields(template: str, where: str) -> set[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"{where}.prompt: bad template ({exc}); write literal braces "
                          f"as {{{{ }}}}") from None
    return {re.split(r"[.\[]", name)[0] for _, name, _, _ in parsed if name is not None}


def require_clients(program: Program, configured: Iterable[str]) -> None:
    """ConfigError naming ``clients`` unless every client the program's steps use is configured."""
    missing = sorted(program.clients() - {DEFAULT_CLIENT} - set(configured))
    require(not missing, "clients", f"the program's steps use client(s) {missing}; add them "
            "under 'clients' (each a mapping of client settings)")
