"""Tests of how the caption-program engine prepares images: the whole image once per image and
client image settings, each visual prompt drawn and encoded once, however many steps send it;
with a recording in-memory backend (no server, no model)."""
from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pytest
from PIL import Image

from annotators.base import AnnotatorFailure, CaptionInput
from annotators.caption import visual_prompts as vp
from annotators.caption.backends.base import (
    Backend,
    ChatAnswer,
    ChatResult,
    Encoded,
    GenerationRequest,
)
from annotators.caption.backends.openai_api.settings import ClientSettings
from annotators.caption.engine import ProgramCaptioner
from annotators.caption.program import DEFAULT_CLIENT, load_program
from settings import parse_settings
from tests.helpers import make_item


class Recorder(Backend):
    """Answers every request at once (a caption, or JSON for a schema) and keeps them."""

    def __init__(self) -> None:
        self.calls: list[list[GenerationRequest]] = []

    def generate(self, requests: Sequence[GenerationRequest]) -> list[ChatResult]:
        self.calls.append(list(requests))
        out: list[ChatResult] = []
        for r in requests:
            props = (r.json_schema or {}).get("properties", {})
            parsed = {"keep": True, "reason": "fine"} if "keep" in props else \
                {"tags": ["thing"]} if r.json_schema else None
            out.append(ChatAnswer(text="a thing", parsed=parsed, region_id=r.region_id))
        return out

    @property
    def requests(self) -> list[GenerationRequest]:
        return [r for call in self.calls for r in call]


@dataclass
class RecordingSettings:
    """``client``: ClientSettings values of every client; ``clients``: per-name overrides."""

    program: str = "umg"
    client: dict[str, Any] = field(default_factory=dict)
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)


class RecordingCaptioner(ProgramCaptioner):
    """A program captioner whose clients are ``Recorder``s."""

    name = "recording"
    Settings = RecordingSettings

    def new_client(self, name: str) -> Recorder:
        return Recorder()

    def client_settings(self, name: str) -> ClientSettings:
        values = {"model": "fake", **self.settings.client, **self.settings.clients.get(name, {})}
        return parse_settings(ClientSettings, values, name)

    def build_provenance(self) -> dict[str, Any]:
        return {"name": self.name, **self.program_provenance()}


def program_with(tmp_path: Any, **changes: Any) -> str:
    """umg with a 'tagger' client for the pixel tags step, written to a file."""
    import yaml

    data = yaml.safe_load(open(load_program("umg").source).read())
    data["steps"]["pixel"][2]["client"] = "tagger"
    data.update(changes)
    path = tmp_path / "program.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def counting(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the image decodes, whole-image preparations and prompt encodes."""
    calls = {"decode_rgb": 0, "prepare_image": 0, "encode_pixels": 0}
    for name in calls:
        original = getattr(vp, name)

        def counted(*args: Any, _original: Any = original, _name: str = name,
                    **kwargs: Any) -> Any:
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(vp, name, counted)
    return calls


def test_whole_image_once_per_image_and_each_prompt_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cap = RecordingCaptioner({"client": {"image_max_pixels": 2048}})   # 64x48 -> 52x39
    assert cap.prompt_specs() == {}            # nothing for the pipeline to render
    calls = counting(monkeypatch)
    items = [make_item(f"img{i}", {}) for i in range(3)]
    results = cap.caption_batch(items)
    assert all(r.failures == [] and len(r.regions) == 3 for r in results)
    requests = cap.clients[DEFAULT_CLIENT].requests
    steps = load_program("umg").steps
    assert len(requests) == 3 * (len(steps["image"]) + len(steps["region"])
                                 + 2 * len(steps["pixel"]))
    # 3 images: each decoded once and its whole image prepared once, for all steps and
    # targets; prompts: r0's box, p0's and p1's contour and masked, once each per image
    assert calls == {"decode_rgb": 3, "prepare_image": 3, "encode_pixels": 3 * 5}
    # every request starts with its image's whole image: one object per image, in all 11
    per_image = len(steps["image"]) + len(steps["region"]) + 2 * len(steps["pixel"])
    wholes = Counter(id(r.images[0]) for r in requests)
    assert sorted(wholes.values()) == [per_image] * 3
    assert all(isinstance(image, Encoded) for r in requests for image in r.images)
    # the same prompt object in every step that sends it (3 pixel steps)
    pixel = [r for r in requests if r.region_id == "p0"]
    assert len(pixel) == 3 * 3 and len({id(r.images[1]) for r in pixel}) == 3


def test_prompts_are_drawn_at_each_clients_size_and_format(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    cap = RecordingCaptioner({"program": program_with(tmp_path),
                              "client": {"image_max_pixels": 1200},
                              "clients": {"tagger": {"image_max_pixels": 3072,
                                                     "prompt_format": "png"}}})
    calls = counting(monkeypatch)
    item = make_item("img", {})
    [result] = cap.caption_batch([item])
    assert result.failures == []
    default = cap.clients[DEFAULT_CLIENT].requests
    tagger = cap.clients["tagger"].requests
    assert len(tagger) == 2                     # p0's and p1's tags
    # one decode; one whole image and one contour and masked per region per image settings
    assert calls["decode_rgb"] == 1 and calls["prepare_image"] == 2
    assert calls["encode_pixels"] == 1 + 2 * 2 + 2 * 2
    contour = next(r for r in default if r.region_id == "p0").images[1]
    assert contour.format == "JPEG" and contour.size == (40, 30)           # 64x48 in 1200 px
    tagged = tagger[0].images[1]
    assert tagged.format == "PNG" and tagged.size == (64, 48)              # within 3072 px
    whole = tagger[0].images[0]
    assert whole.data == item.image                                       # fits: as stored
    shrunk = Image.open(io.BytesIO(default[0].images[0].data))
    assert shrunk.size == (40, 30)
    sent = cap.provenance()["visual_prompts"]["pixel"]
    assert sent[0]["name"] == "contour" and sent[0]["sent"] == {
        "default": {"max_pixels": 1200, "format": "jpeg", "quality": 90},
        "tagger": {"max_pixels": 3072, "format": "png", "quality": None}}


def test_alpha_prompts_go_as_webp_at_a_quarter_of_the_budget(tmp_path: Any) -> None:
    import yaml

    data = yaml.safe_load(open(load_program("umg").source).read())
    data["visual_prompts"]["pixel"].append({"name": "cutout", "kind": "alpha"})
    data["steps"]["pixel"][0]["images"] = ["image", "cutout"]
    path = tmp_path / "alpha.yaml"
    path.write_text(yaml.safe_dump(data))
    cap = RecordingCaptioner({"program": str(path), "client": {"image_max_pixels": 4096}})
    item = make_item("img", {})
    [result] = cap.caption_batch([item])
    assert result.failures == []
    request = next(r for r in cap.clients[DEFAULT_CLIENT].requests if r.region_id == "p0")
    cutout = request.images[1]
    assert cutout.format == "WEBP" and cutout.size[0] * cutout.size[1] <= 1024
    img = Image.open(io.BytesIO(cutout.data))
    assert img.mode == "RGBA" and set(np.unique(np.asarray(img)[..., 3])) <= {0, 255}
    spec = next(s for s in cap.provenance()["visual_prompts"]["pixel"] if s["name"] == "cutout")
    assert spec["kind"] == "alpha" and spec["version"] == vp.VERSION
    assert spec["sent"] == {"default": {"max_pixels": 1024, "format": "webp", "quality": 90}}


def test_an_unreadable_image_fails_its_targets_not_the_batch() -> None:
    cap = RecordingCaptioner({})
    bad = make_item("bad", {})
    bad.image = b"not an image"
    good = make_item("good", {})
    bad_result, good_result = cap.caption_batch([bad, good])
    assert bad_result.image_level is None
    assert bad_result.failures and all(f.reason == "prompt_error" for f in bad_result.failures)
    assert isinstance(bad_result.failures[0], AnnotatorFailure)
    assert good_result.failures == [] and len(good_result.regions) == 3


def test_a_broken_mask_fails_its_region_only() -> None:
    cap = RecordingCaptioner({})
    item = make_item("img", {})
    item.regions[1].rle = {"size": [48, 64], "counts": 12345}     # not an RLE
    [result] = cap.caption_batch([item])
    assert [(f.reason, f.region_id) for f in result.failures] == [("prompt_error", "p0")]
    assert set(result.regions) == {"r0", "p1"} and result.image_level is not None
