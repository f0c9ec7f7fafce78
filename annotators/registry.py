"""Annotators by name. Entries are import paths so optional dependencies load only when used."""
from __future__ import annotations

import importlib
from typing import Any, Mapping

from annotators.base import Captioner, Segmenter
from settings import ConfigError

SEGMENTERS: dict[str, str] = {
    "classical": "annotators.segment.classical:ClassicalSegmenter",
    "given": "annotators.segment.given:GivenSegmenter",
    "sam-auto": "annotators.segment.sam:SamAutoSegmenter",
    "sam-boxes": "annotators.segment.sam:SamBoxesSegmenter",
}

CAPTIONERS: dict[str, str] = {
    "attributes": "annotators.caption.attributes:AttributesCaptioner",
    "none": "annotators.caption.no_captions:NoCaptioner",
    "vllm": "annotators.caption.backends.openai_api.captioner:VllmCaptioner",
    "transformers": "annotators.caption.backends.transformers_local:TransformersCaptioner",
}


def _load(table: dict[str, str], role: str, name: str) -> type:
    """The class of a registered name, or of an import path ``package.module:Class`` (an
    annotator that lives outside this project)."""
    if name not in table and ":" not in name:
        raise ConfigError(f"{role}.name: unknown {role} '{name}'; use one of: {', '.join(sorted(table))} "
                          f"or an import path 'package.module:Class'")
    module_name, _, cls_name = table.get(name, name).partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"{role}.name: '{name}' needs an optional dependency that is not installed ({exc}); "
            f"install the project's extra for it (see README, 'Extras')") from exc
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise ConfigError(f"{role}.name: '{module_name}' has no class '{cls_name}'")
    return cls


def build_segmenter(config: Mapping[str, Any]) -> Segmenter:
    """Segmenter from a config section {name: ..., <settings>}."""
    config = dict(config)
    cls = _load(SEGMENTERS, "segmenter", config.pop("name", "classical"))
    return cls(config, where="segmenter")


def build_captioner(config: Mapping[str, Any]) -> Captioner:
    """Captioner from a config section {name: ..., <settings>}."""
    config = dict(config)
    cls = _load(CAPTIONERS, "captioner", config.pop("name", "attributes"))
    return cls(config, where="captioner")
