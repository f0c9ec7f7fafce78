"""OpenAI chat messages, ordered for prefix caching, and the request that carries them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from annotators.caption.backends.base import CallCost, ImageLike
from annotators.caption.backends.images import encode_image


@dataclass
class ChatRequest:
    """One chat completion to ask for.

    ``json_schema`` asks vLLM for structured output (``response_format`` json_schema, strict) and
    makes the answer's JSON parsed and validated. ``region_id`` is copied into a failure.
    ``extra`` is merged into the request body (vLLM sampling extras). The client adds what the
    request cost (calls, tokens, bytes) to ``cost``.
    """

    messages: list[dict[str, Any]]
    json_schema: dict[str, Any] | None = None
    schema_name: str = "answer"
    region_id: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    cost: CallCost = field(default_factory=CallCost)


def build_messages(*, system: str | None = None, shared_text: str = "",
                   shared_images: Sequence[ImageLike] = (), region_images: Sequence[ImageLike] = (),
                   text: str = "", max_pixels: int = 1024 * 1024, image_format: str = "auto",
                   jpeg_quality: int = 90) -> list[dict[str, Any]]:
    """OpenAI chat messages ordered for prefix caching: shared parts first, region parts last.

    Order: system message; then one user message with ``shared_text``, ``shared_images`` (the
    whole image), ``region_images`` (crops, visual prompts), and the region's ``text``. Encode a
    shared image once with ``encode_image`` and pass the URL to every region's request.
    """
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    content: list[dict[str, Any]] = []
    if shared_text:
        content.append({"type": "text", "text": shared_text})
    for image in [*shared_images, *region_images]:
        url = encode_image(image, max_pixels, image_format, jpeg_quality)
        content.append({"type": "image_url", "image_url": {"url": url}})
    if text:
        content.append({"type": "text", "text": text})
    messages.append({"role": "user", "content": content})
    return messages
