"""`none`: no captions. Records keep their masks and boxes with empty texts, flagged in provenance
(``captioned: false``) — for segmenting now and captioning later, and for measuring the pipeline
without a captioning model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from annotators.base import CaptionInput, CaptionResult, Captioner, TextOut


@dataclass
class NoCaptionSettings:
    """No settings: nothing is written."""

    def check(self) -> None:
        """Nothing to check."""


class NoCaptioner(Captioner):
    """Empty caption, long caption and tags for the image and every region."""

    name = "none"
    version = "1"
    Settings = NoCaptionSettings
    reads_other_regions = False

    def provenance(self) -> dict[str, Any]:
        return super().provenance() | {"captioned": False}

    def caption_batch(self, items: list[CaptionInput]) -> list[CaptionResult]:
        provenance = self.provenance()
        results = []
        for item in items:
            empty = TextOut("", "", [], provenance=provenance)
            results.append(CaptionResult(empty, {r.id: empty for r in item.regions}))
        return results
