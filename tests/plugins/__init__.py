"""Annotators that exist only for tests, loaded by import path (``name: tests.plugins:Class``)."""
from __future__ import annotations

import os
from typing import Any

from annotators.segment.classical import ClassicalSegmenter


class WhereSegmenter(ClassicalSegmenter):
    """The classical segmenter, whose provenance says which process set it up (like a SAM
    segmenter whose ``device: auto`` resolves to CUDA only on the workers)."""

    name = "where"

    def __init__(self, config: dict[str, Any], where: str = "segmenter") -> None:
        super().__init__(config, where)
        self.set_up_in: int | None = None

    def setup(self) -> None:
        super().setup()
        self.set_up_in = os.getpid()

    def provenance(self) -> dict[str, Any]:
        device = f"worker-{self.set_up_in}" if self.set_up_in else "not set up"
        return super().provenance() | {"device": device}
