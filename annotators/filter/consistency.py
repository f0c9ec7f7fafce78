"""`consistency`: how well a region's text matches the region's pixels, by a CLIP-style model.

Each region gets the cosine similarity (in [-1, 1]) of its image embedding and the embedding of
its text (``long_caption`` or ``caption``). Below ``threshold`` a region is rejected: dropped
with the failure reason ``inconsistent_text``, or kept and flagged (``action``). The scorer only
scores and judges; the pipeline stage that calls it applies the verdict.

Two kinds of model, both loaded from local files only (nothing is ever downloaded):

* ``open_clip``: a state dict for an open_clip architecture (a bundled config name such as
  ``ViT-B-32``, or the path of a model-config JSON). The model sees the region's box grown by
  10% on each side (clipped to the image), with the pixels outside the mask greyed to the
  model's mean colour (``crop: masked``) or not (``crop: box``), padded square and passed through
  the model's own inference transform.
* ``trainer``: a RegionCLIP checkpoint written by ``trainer.checkpoint.save`` (its
  ``step-N`` folder or the ``model.safetensors`` in it); the model is rebuilt from the
  ``config.yaml`` saved beside the weights (or the trainer config YAML given as ``arch``). It
  takes the mask as input and sees the region exactly as it was trained, through the trainer's
  own rendering (``trainer.samples``): a long caption is scored against the mask-prompted whole
  image (the ``mask`` branch), a short caption against the square crop around the box with its
  mask (the ``crop`` branch). ``crop`` does not apply.

A box-only region (no mask) uses its box as its mask, as the trainer does. A region with empty
text scores 0.0 (no evidence either way; the text-missing failure belongs to the captioner).
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, NamedTuple, Protocol, Sequence

import numpy as np
from PIL import Image

from annotators.base import Annotator
from annotators.devices import torch_device, valid_device
from annotators.weights import file_sha256
from settings import ConfigError, require

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

VERSION = "1"
FAILURE_REASON = "inconsistent_text"
MODELS = ("open_clip", "trainer")
TEXTS = ("long_caption", "caption")
ACTIONS = ("drop", "flag")
CROPS = ("masked", "box")
MARGIN = 0.1            # open_clip crops: the box grown by this fraction of its size on each side
_TRAINER_WEIGHTS = "model.safetensors"
_TRAINER_CONFIG = "config.yaml"


class RegionText(NamedTuple):
    """One region to score: its box [x, y, w, h] in image pixels, its (H, W) bool mask over the
    whole image (None for a box-only region) and the text to match against it."""

    bbox: Sequence[float]
    mask: np.ndarray | None
    text: str


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ConsistencySettings:
    """Which model scores region text against pixels, and what a low score does."""

    model: str                          # open_clip | trainer
    checkpoint: str                     # open_clip: state dict file; trainer: step-N folder or its weights
    arch: str = ""                      # open_clip: config name or model-config JSON; trainer: "" (the
                                        # config.yaml beside the weights) or the trainer config YAML
    text: str = "long_caption"          # long_caption | caption
    threshold: float | None = None      # reject below this cosine similarity; None = only score
    action: str = "drop"                # drop | flag
    crop: str = "masked"                # open_clip only: masked | box
    batch_size: int = 64                # regions per forward pass
    device: str = "auto"                # auto | cpu | cuda | cuda:N

    RUN_ONLY: ClassVar[frozenset[str]] = frozenset({"batch_size"})

    def check(self) -> None:
        """Validate values; raise ConfigError naming the field."""
        for name, choices in (("model", MODELS), ("text", TEXTS), ("action", ACTIONS), ("crop", CROPS)):
            value = getattr(self, name)
            require(value in choices, name, f"unknown {name} {value!r}; use one of {', '.join(choices)}")
        missing = [m for m in ("torch", "open_clip") if importlib.util.find_spec(m) is None]
        require(not missing, "model", f"the consistency filter needs {' and '.join(missing)}: install "
                "the project's 'train' extra (pip install -c constraints.txt -e '.[train]'; "
                "make build-dataset does it when the config has a consistency section)")
        require(self.threshold is None or -1.0 <= self.threshold <= 1.0, "threshold",
                f"{self.threshold} is not in [-1, 1] (a cosine similarity); or leave it out to only score")
        require(self.batch_size >= 1, "batch_size", "must be 1 or more")
        require(valid_device(self.device), "device", "use auto, cpu, cuda or cuda:N")
        require(bool(self.checkpoint.strip()), "checkpoint", "is empty; give the path of the weights file")
        if self.model == "open_clip":
            _check_open_clip_files(self.checkpoint, self.arch)
        else:
            trainer_files(self.checkpoint, self.arch)


def _check_open_clip_files(checkpoint: str, arch: str) -> None:
    require(os.path.isfile(checkpoint), "checkpoint", f"{checkpoint!r} is not a file; give the path "
            "of a local open_clip state dict (.pt, .bin, .safetensors)")
    require(bool(arch), "arch", "open_clip needs its architecture: a bundled config name (e.g. ViT-B-32) "
            "or the path of a model-config JSON")
    require(not arch.startswith(("hf-hub:", "local-dir:")), "arch",
            f"{arch!r}: hub and local-dir models are not supported; give a config name or JSON path "
            "and the weights as checkpoint")
    require(not arch.endswith(".json") or os.path.isfile(arch), "arch",
            f"{arch!r}: no such model-config JSON")


def trainer_files(checkpoint: str, arch: str) -> tuple[Path, Path]:
    """(weights, trainer config) of a trainer checkpoint: a ``step-N`` folder or its
    ``model.safetensors``, and ``arch`` or else the ``config.yaml`` saved beside the weights."""
    path = Path(checkpoint)
    if path.is_dir() and not (path / _TRAINER_WEIGHTS).is_file() and (path / "checkpoints").is_dir():
        pointer = path / "checkpoints" / "latest"
        newest = pointer.read_text().strip() if pointer.is_file() else "step-N"
        raise ConfigError(f"checkpoint: {checkpoint!r} is a training output folder; point at one of "
                          f"its checkpoints, e.g. {path / 'checkpoints' / newest}")
    weights = path / _TRAINER_WEIGHTS if path.is_dir() else path
    require(weights.is_file(), "checkpoint", f"{str(weights)!r} does not exist; give a trainer checkpoint "
            f"folder (OUTPUT/checkpoints/step-N) or the {_TRAINER_WEIGHTS} in it")
    require(weights.suffix == ".safetensors", "checkpoint",
            f"{str(weights)!r}: trainer weights are a .safetensors file ({_TRAINER_WEIGHTS})")
    config = Path(arch) if arch else weights.parent / _TRAINER_CONFIG
    require(config.is_file(), "arch", f"{str(config)!r} does not exist; give the trainer config YAML "
            f"the checkpoint was trained with (trainer.checkpoint.save writes {_TRAINER_CONFIG} beside it)")
    return weights, config


# --------------------------------------------------------------------------- the scorer


class ConsistencyScorer(Annotator):
    """Cosine similarity of each region's pixels and text under a CLIP-style model."""

    name = "consistency"
    version = VERSION
    role = "consistency"
    Settings = ConsistencySettings

    def __init__(self, settings: Mapping[str, Any] | None, where: str = "consistency") -> None:
        super().__init__(settings, where)
        self.where = where
        self.backend: _Backend | None = None
        self.device = ""                     # where setup() put the model ("cpu", "cuda:0", ...)
        self._provenance: dict[str, Any] | None = None

    def setup(self) -> None:
        """Load the model once (eval mode, no gradients), from local files only."""
        if self.backend is not None:
            return
        s = self.settings
        try:
            device = torch_device(s.device)
            self.backend = _OpenClip(s, device) if s.model == "open_clip" else _Trainer(s, device)
            self.device = str(device)
        except ConfigError as exc:
            raise ConfigError(f"{self.where}.{exc}") from None
        log.info("%s: %s %s on %s (%s)", self.name, s.model, self.backend.arch, device,
                 os.path.basename(s.checkpoint))

    def teardown(self) -> None:
        """Drop the model (and cached GPU memory)."""
        self.backend = None
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def provenance(self) -> dict[str, Any]:
        """Model kind, arch, checkpoint (file name + first 12 hex of its sha256), text field, what
        the model sees (``crop``), threshold, action, module version. Computed once."""
        if self._provenance is None:
            s = self.settings
            if s.model == "open_clip":
                weights = Path(s.checkpoint)
                name, arch, crop = weights.name, _open_clip_name(s.arch, register=False), s.crop
            else:
                weights, config_path = trainer_files(s.checkpoint, s.arch)
                config = _trainer_config(config_path)
                name = f"{weights.parent.name}/{weights.name}"   # the step-N folder says which one
                arch, crop = config.model.name, f"trainer:{_trainer_view(config, s.text)}"
            self._provenance = {"name": self.name, "version": self.version, "model": s.model,
                                "arch": arch, "checkpoint": name,
                                "checkpoint_sha256": file_sha256(str(weights), f"{self.where}.checkpoint")[:12],
                                "text": s.text, "crop": crop, "threshold": s.threshold, "action": s.action}
        return dict(self._provenance)

    def rejects(self, score: float) -> bool:
        """True when ``score`` is below the threshold (never without one)."""
        return self.settings.threshold is not None and not score >= self.settings.threshold

    def score(self, image: np.ndarray, regions: Sequence[RegionText]) -> list[float]:
        """Cosine similarity in [-1, 1] of each region's pixels and text, same order; 0.0 for a
        region with empty text. ``image`` is (H, W, 3) uint8 RGB."""
        if self.backend is None:
            raise RuntimeError(f"{self.name}: call setup() before score()")
        _check_inputs(image, regions)
        import torch

        scores = [0.0] * len(regions)
        todo = [i for i, region in enumerate(regions) if region.text.strip()]
        prepared = self.backend.prepare(image) if todo else None
        size = self.settings.batch_size
        for start in range(0, len(todo), size):
            chunk = todo[start:start + size]
            picked = [regions[i] for i in chunk]
            with torch.inference_mode():
                pixels = self.backend.encode_regions(prepared, picked)
                texts = self.backend.encode_texts([r.text for r in picked])
            sims = (pixels * texts).sum(-1).clamp(-1.0, 1.0).tolist()
            for i, value in zip(chunk, sims, strict=True):
                scores[i] = float(value)
        return scores


def _check_inputs(image: np.ndarray, regions: Sequence[RegionText]) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
    for i, region in enumerate(regions):
        if region.mask is not None and region.mask.shape != image.shape[:2]:
            raise ValueError(f"region {i}: mask shape {region.mask.shape} != image {image.shape[:2]}")
        if len(region.bbox) != 4:
            raise ValueError(f"region {i}: bbox must be [x, y, w, h], got {region.bbox!r}")


# --------------------------------------------------------------------------- models


class _Backend(Protocol):
    """One kind of model: what it sees of a region, and its two encoders (normalised outputs)."""

    arch: str

    def prepare(self, image: np.ndarray) -> Any: ...

    def encode_regions(self, prepared: Any, regions: list[RegionText]) -> torch.Tensor: ...

    def encode_texts(self, texts: list[str]) -> torch.Tensor: ...


def _open_clip_name(arch: str, register: bool = True) -> str:
    """The open_clip model name of ``arch``; a JSON path is registered under its file stem."""
    if not arch.endswith(".json"):
        return arch
    if register:
        import open_clip

        open_clip.add_model_config(Path(arch).resolve())
    return Path(arch).stem


def _needs_hub(name: str, config: dict[str, Any]) -> bool:
    """True when building the model or its tokenizer would fetch from the Hugging Face hub."""
    text = config.get("text_cfg", {})
    return "hf_model_name" in text or "hf_tokenizer_name" in text or "siglip" in name.lower()


class _OpenClip:
    """A local open_clip model; regions are box crops (masked or not) through its own transform."""

    def __init__(self, s: ConsistencySettings, device: torch.device) -> None:
        import open_clip

        self.arch = _open_clip_name(s.arch)
        config = open_clip.get_model_config(self.arch)
        if config is None:
            raise ConfigError(f"arch: {s.arch!r} is neither a bundled open_clip config nor a model-config "
                              "JSON; give a name from open_clip.list_models() or a .json path")
        if _needs_hub(self.arch, config):
            raise ConfigError(f"arch: {self.arch} needs the Hugging Face hub (its text tower or tokenizer); "
                              "only models with open_clip's own tokenizer run offline")
        try:   # an absolute path is never taken for a pretrained tag (a tag would download)
            model, _, self.transform = open_clip.create_model_and_transforms(
                self.arch, pretrained=str(Path(s.checkpoint).resolve()), device=device)
        except RuntimeError as exc:
            raise ConfigError(f"checkpoint: cannot load {s.checkpoint!r} as {self.arch} ({exc})") from None
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(self.arch)
        self.fill = tuple(int(round(255 * m)) for m in model.visual.preprocess_cfg["mean"])
        self.masked = s.crop == "masked"
        self.device = device

    def prepare(self, image: np.ndarray) -> np.ndarray:
        return image

    def encode_regions(self, prepared: np.ndarray, regions: list[RegionText]) -> torch.Tensor:
        import torch

        crops = [self.transform(region_crop(prepared, r.bbox, r.mask, self.fill, self.masked))
                 for r in regions]
        return self.model.encode_image(torch.stack(crops).to(self.device), normalize=True).float()

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device), normalize=True).float()


def context_box(bbox: Sequence[float], width: int, height: int,
                margin: float = MARGIN) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): the box grown by ``margin`` of its size on each side, clipped to the
    image, at least one pixel."""
    x, y, w, h = (float(v) for v in bbox)
    x0 = min(max(0, math.floor(x - margin * w)), width - 1)
    y0 = min(max(0, math.floor(y - margin * h)), height - 1)
    x1 = max(min(width, math.ceil(x + w + margin * w)), x0 + 1)
    y1 = max(min(height, math.ceil(y + h + margin * h)), y0 + 1)
    return x0, y0, x1, y1


def box_mask(bbox: Sequence[float], height: int, width: int) -> np.ndarray:
    """A box-only region's mask: the pixels of its box (rounded as ``trainer.samples`` does)."""
    x, y, w, h = bbox
    mask = np.zeros((height, width), bool)
    mask[int(round(y)):int(round(y + h)), int(round(x)):int(round(x + w))] = True
    return mask


def region_crop(image: np.ndarray, bbox: Sequence[float], mask: np.ndarray | None,
                fill: tuple[int, ...], masked: bool) -> Image.Image:
    """The open_clip view of a region: its context box, pixels outside the mask set to ``fill``
    when ``masked``, centred on a ``fill`` square."""
    height, width = image.shape[:2]
    x0, y0, x1, y1 = context_box(bbox, width, height)
    pixels = image[y0:y1, x0:x1].copy()
    if masked:
        inside = (box_mask(bbox, height, width) if mask is None else mask.astype(bool))[y0:y1, x0:x1]
        pixels[~inside] = fill
    side = max(x1 - x0, y1 - y0)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(Image.fromarray(pixels), ((side - (x1 - x0)) // 2, (side - (y1 - y0)) // 2))
    return canvas


def _trainer_config(path: Path) -> Any:
    """The trainer config at ``path``; its errors as ConfigError naming ``arch``."""
    from trainer.config import ConfigError as TrainerConfigError, load_config

    try:
        return load_config(path)
    except (TrainerConfigError, OSError) as exc:
        raise ConfigError(f"arch: {path}: not a usable trainer config ({exc})") from None


def _trainer_view(config: Any, text: str) -> str:
    """The RegionCLIP branch trained on ``text``: long captions ↔ the mask-prompted image
    (``mask``), short captions ↔ the box crop (``crop``); the other one if that was off."""
    preferred, other = ("mask", "crop") if text == "long_caption" else ("crop", "mask")
    if getattr(config.loss, preferred).enabled or not getattr(config.loss, other).enabled:
        return preferred
    return other


class _Trainer:
    """A RegionCLIP checkpoint of ``trainer``; regions rendered by the trainer's own functions."""

    def __init__(self, s: ConsistencySettings, device: torch.device) -> None:
        import torch

        from trainer.model import build_model, load_weights

        weights, config_path = trainer_files(s.checkpoint, s.arch)
        config = _trainer_config(config_path)
        # The checkpoint holds every weight: nothing to read from where training started.
        config.model.pretrained = config.model.init_from = None
        with torch.random.fork_rng(devices=[]):   # random init (overwritten) must not move the caller's RNG
            try:
                model, self.tokenizer = build_model(config)
            except (FileNotFoundError, RuntimeError, ValueError) as exc:
                raise ConfigError(f"arch: cannot build the model of {config_path} ({exc})") from None
        try:
            load_weights(model, weights, allow_new_temperatures=True)
        except ValueError as exc:
            raise ConfigError(f"checkpoint: {exc}") from None
        self.model = model.to(device).eval().requires_grad_(False)
        self.arch = config.model.name
        self.view = _trainer_view(config, s.text)
        self.context = config.data.crop_context
        self.device = device

    def prepare(self, image: np.ndarray) -> tuple[Image.Image, np.ndarray | None]:
        from trainer.samples import FILL, _array, _letterbox

        pil = Image.fromarray(image)
        size = self.model.image_size
        if self.view != "mask":
            return pil, None
        return pil, _array(_letterbox(pil, size, Image.Resampling.BILINEAR, FILL))

    def _render(self, prepared: tuple[Image.Image, np.ndarray | None],
                region: RegionText) -> tuple[np.ndarray, np.ndarray]:
        """(pixels [3,S,S], mask [1,S,S]) uint8, as ``trainer.samples.build_example`` renders them."""
        from trainer.samples import FILL, _array, _crop, _letterbox, _square_box, region_mask

        image, whole = prepared
        width, height = image.size
        size = self.model.image_size
        inside = region_mask({"bbox": list(region.bbox)}, height, width) if region.mask is None \
            else region.mask.astype(bool).astype(np.uint8)
        mask = Image.fromarray(inside * 255)
        if whole is not None:
            return whole, _array(_letterbox(mask, size, Image.Resampling.BOX, 0))
        box = _square_box(list(region.bbox), self.context)
        return (_array(_crop(image, box, size, Image.Resampling.BILINEAR, FILL)),
                _array(_crop(mask, box, size, Image.Resampling.BOX, 0)))

    def encode_regions(self, prepared: tuple[Image.Image, np.ndarray | None],
                       regions: list[RegionText]) -> torch.Tensor:
        import torch

        rendered = [self._render(prepared, r) for r in regions]
        pixels = torch.from_numpy(np.stack([p for p, _ in rendered])).to(self.device)
        masks = torch.from_numpy(np.stack([m for _, m in rendered])).to(self.device)
        return self.model.encode_image(pixels, masks)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = {k: v.to(self.device) for k, v in self.tokenizer(texts).items()}
        return self.model.encode_text(tokens)


__all__ = ["ACTIONS", "CROPS", "FAILURE_REASON", "MODELS", "TEXTS", "VERSION", "ConsistencyScorer",
           "ConsistencySettings", "RegionText", "box_mask", "context_box", "region_crop", "trainer_files"]
