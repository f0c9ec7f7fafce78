"""Validated settings: dataclasses built from config mappings, and the hash of what they change.

Both ``pipelines/`` (the build's sections) and ``annotators/`` (each annotator's settings) build
their settings here; this package imports nothing of the project.

A settings class is a dataclass, optionally with a ``check()`` that calls ``require``;
``parse_settings`` builds it from a mapping and turns unknown fields, wrong types and failed
checks into a ``ConfigError`` that names the field and the fix.

Settings are of two kinds. Most change what is written (model, prompts, thresholds, seed, ...)
and go into the build's settings hash. *Run settings* only change how the work is done
(endpoints, timeouts, retries, batch sizes, server lifecycle); a settings class lists them in
``RUN_ONLY`` (collected over its base classes), or defines ``hash_view()`` when its hashed part is
more than a subset of its fields. A field not listed is hashed, so a new field is safe by default.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from typing import Any, Mapping


class ConfigError(ValueError):
    """A setting is wrong. The message names the field and says how to fix it."""


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if typing.get_origin(annotation) is typing.Literal:
        return value in typing.get_args(annotation)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def parse_settings(cls: type, values: Mapping[str, Any] | None, where: str) -> Any:
    """Build dataclass ``cls`` from ``values``; unknown fields and wrong types raise ConfigError.

    ``where`` is the dotted config path of the section (e.g. ``segmenter``), used in messages.
    """
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for name in values:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known fields: {', '.join(names)}"
            raise ConfigError(f"{where}.{name}: unknown setting; {hint}")
    for name, value in values.items():
        if not _type_ok(value, hints[name]):
            raise ConfigError(
                f"{where}.{name}: expected {_type_name(hints[name])}, got {value!r}; "
                f"set it to a value of that type"
            )
    try:
        obj = cls(**values)
    except TypeError as exc:
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in values]
        raise ConfigError(f"{where}: missing required setting(s) {missing}; add them") from exc
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except ConfigError as exc:
            raise ConfigError(f"{where}.{exc}") from None
    return obj


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))


def require(condition: bool, field_name: str, message: str) -> None:
    """Raise ConfigError('<field>: <message>') unless ``condition`` holds (for ``check()``)."""
    if not condition:
        raise ConfigError(f"{field_name}: {message}")


def run_only_fields(cls: type) -> frozenset[str]:
    """The fields of dataclass ``cls`` declared run-only: ``RUN_ONLY`` of it and its bases."""
    names: set[str] = set()
    for klass in cls.__mro__:
        names |= set(vars(klass).get("RUN_ONLY", ()))
    unknown = names - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"{cls.__name__}.RUN_ONLY names no field: {sorted(unknown)}")
    return frozenset(names)


def hashed_fields(settings: Any) -> dict[str, Any]:
    """Every field of dataclass ``settings`` except its run-only ones, as plain data."""
    run_only = run_only_fields(type(settings))
    return {name: value for name, value in dataclasses.asdict(settings).items()
            if name not in run_only}


def hashed_view(settings: Any) -> dict[str, Any]:
    """What of ``settings`` goes into the settings hash: its ``hash_view()`` if it has one,
    else ``hashed_fields``."""
    own = getattr(settings, "hash_view", None)
    return own() if callable(own) else hashed_fields(settings)


def stable_hash(obj: Any) -> str:
    """Short sha256 of the canonical JSON of ``obj`` (dataclasses allowed)."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(data).hexdigest()[:16]


__all__ = ["ConfigError", "hashed_fields", "hashed_view", "parse_settings", "require",
           "run_only_fields", "stable_hash"]
