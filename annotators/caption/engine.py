"""The caption-program engine: runs a program (``annotators.caption.program``) over a batch of
images on model backends (``annotators.caption.backends``), whatever the backend is.

Execution: step k runs for every target (the image and each region) of every image in the batch
in one ``generate`` call per client (hundreds of requests in flight on a server), the clients in
parallel; then step k+1. A target whose step fails is dropped with the backend's failure reason
(a region: that region only; the image: the whole image) and takes no part in later steps.

Images: the engine prepares every image a request carries, once per image and backend image
settings (``visual_prompts.ImagePrompts``): the whole image is fit to the client's
``image_max_pixels`` and encoded once, and shared by all of its targets' requests; each visual
prompt is drawn directly at that size and encoded (``prompt_format`` / ``prompt_quality``) once,
however many steps send it. Backends send these ``Encoded`` bytes as they are. So the pipeline
renders nothing for a program captioner (``prompt_specs()`` is empty).

Reuse (``make recaption``): ``CaptionInput.reuse`` gives, per target, earlier outputs of steps
whose hash (``step_hashes``: the step, its client's output-changing settings, its visual prompts
and the hashes of the steps it reads) is unchanged; those steps send no request.

Cost: every request's ``cost`` (filled in by its backend: calls, tokens, bytes) is summed per
image into ``CaptionResult.cost``, so the pipeline can account for it per image and shard.

``ProgramCaptioner`` is the base of the captioners that run programs (``vllm``,
``transformers``): a subclass gives its settings (with ``program``), ``new_client(name)``, the
backend of each client name the program uses, and ``client_settings(name)``, that client's
parsed settings (its image settings decide how images are prepared).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from annotators.base import (
    AnnotatorFailure,
    Captioner,
    CaptionInput,
    CaptionResult,
    RegionView,
    TextOut,
)
from annotators.caption import visual_prompts as vp
from annotators.caption.attributes import position_name, size_name
from annotators.caption.backends.base import (
    Backend,
    CallCost,
    ChatResult,
    Encoded,
    GenerationRequest,
)
from annotators.caption.backends.images import ImageOptions
from annotators.caption.program import (
    DEFAULT_CLIENT,
    SPECIAL_STEPS,
    WHOLE_IMAGE,
    Program,
    Step,
    load_program,
    prompt_clients,
    resolved_visual_prompts,
    step_inputs,
)
from settings import hashed_view, stable_hash

log = logging.getLogger(__name__)


@dataclass
class _Target:
    """The image or one region of one item, with what its steps produced so far."""

    item: int
    id: str                       # "image" or the region id
    level: str
    region: RegionView | None
    fields: dict[str, Any]
    outputs: dict[str, Any] = field(default_factory=dict)
    failure: AnnotatorFailure | None = None
    reuse: dict[str, Any] = field(default_factory=dict)   # step name -> an earlier output


class BatchImages:
    """The images of one ``caption_batch`` call as the backends get them: one
    ``visual_prompts.ImagePrompts`` per item and image settings (the whole image encoded once,
    each prompt drawn and encoded once), and each region's mask decoded once."""

    def __init__(self, items: list[CaptionInput]) -> None:
        self.items = items
        self._images: dict[tuple[int, ImageOptions], vp.ImagePrompts] = {}
        self._masks: dict[tuple[int, str], vp.MaskCrop] = {}
        self._rgb: dict[int, np.ndarray] = {}

    def of(self, index: int, options: ImageOptions) -> vp.ImagePrompts:
        """Item ``index``'s images under ``options``."""
        key = (index, options)
        if key not in self._images:
            self._images[key] = vp.ImagePrompts(self.items[index].image, options,
                                                decoded=lambda: self.rgb(index))
        return self._images[key]

    def rgb(self, index: int) -> np.ndarray:
        """Item ``index``'s pixels, decoded once for every image settings."""
        if index not in self._rgb:
            self._rgb[index] = vp.decode_rgb(self.items[index].image)
        return self._rgb[index]

    def mask(self, index: int, region: RegionView | None) -> vp.MaskCrop | None:
        """The region's mask, cut to its pixels (None for the image and box-only regions)."""
        if region is None or region.rle is None:
            return None
        key = (index, region.id)
        if key not in self._masks:
            from annotators.segment import masks

            self._masks[key] = vp.MaskCrop.of(masks.decode(region.rle))
        return self._masks[key]


def target_fields(item: CaptionInput, region: RegionView | None) -> dict[str, Any]:
    """Template fields of a target (see ``program.TARGET_FIELDS``)."""
    width, height = item.width, item.height
    bbox = region.bbox if region is not None else [0.0, 0.0, float(width), float(height)]
    area = region.area if region is not None else float(width * height)
    x, y, w, h = (float(v) for v in bbox)
    frac = area / float(max(width * height, 1))
    norm = [round(1000 * v / max(s, 1)) for v, s in ((x, width), (y, height), (x + w, width),
                                                       (y + h, height))]
    return {
        "width": width, "height": height, "level": region.level if region else "image",
        "bbox": f"[{round(x)}, {round(y)}, {round(w)}, {round(h)}]",
        "bbox_xyxy": f"[{round(x)}, {round(y)}, {round(x + w)}, {round(y + h)}]",
        "bbox_norm": "[" + ", ".join(str(v) for v in norm) + "]",
        "area_pct": f"{100 * frac:.1f}", "size": size_name(frac),
        "position": position_name(x + w / 2, y + h / 2, width, height) if region else "whole image",
        # what came with the input: a region's label or phrase (GRIT, COCO category), the image's
        # caption; "" when there is none
        "label": str((region.given if region else {}).get("label") or ""),
        "given_caption": str(item.given.get("caption") or ""),
    }


def clean_tags(value: Any) -> list[str]:
    """Tags from a structured answer: lowercased, stripped, deduplicated, order kept."""
    raw = value.get("tags", []) if isinstance(value, dict) else value
    out: list[str] = []
    for tag in raw if isinstance(raw, list) else []:
        text = " ".join(str(tag).split()).strip().strip(".,;:").lower()
        if text and text not in out:
            out.append(text)
    return out


class ProgramCaptioner(Captioner):
    """A captioner that runs a caption program, one backend per client name it uses.

    ``clients`` maps client names to their backends once ``setup()`` has run. Provenance is
    built once (``build_provenance``) and shared by every text this captioner writes.
    """

    reads_other_regions = False   # a target's prompts hold its own fields and earlier outputs only

    def __init__(self, settings: Mapping[str, Any] | None = None, where: str = "") -> None:
        super().__init__(settings, where)
        self.program: Program = load_program(self.settings.program)
        self.clients: dict[str, Backend] = {}
        self._provenance: dict[str, Any] | None = None
        self._image_options: dict[str, ImageOptions] = {}
        # per level, prompt name -> (kind, parameters)
        self._prompt_kinds = {level: {s["name"]: (s["kind"], {k: v for k, v in s.items()
                                                               if k not in ("name", "kind")})
                                      for s in specs}
                              for level, specs in self.program.visual_prompts.items()}

    def prompt_specs(self) -> dict[str, list[dict[str, Any]]]:
        """None: the engine draws the program's visual prompts itself, at each client's image
        size, and encodes them once (see the module docstring)."""
        return {}

    def image_options(self, client: str) -> ImageOptions:
        """How client ``client`` sends images (its pixel budget, formats, qualities)."""
        if client not in self._image_options:
            self._image_options[client] = ImageOptions.from_settings(self.client_settings(client))
        return self._image_options[client]

    @abstractmethod
    def client_settings(self, name: str) -> Any:
        """The parsed settings of client ``name`` (with ``ImageOptions.from_settings`` fields)."""

    def client_names(self) -> list[str]:
        """The default client and every client a step names, sorted."""
        return sorted({DEFAULT_CLIENT} | self.program.clients())

    @abstractmethod
    def new_client(self, name: str) -> Backend:
        """The backend of client ``name`` (not set up yet)."""

    # ------------------------------------------------------------ lifecycle

    def setup(self) -> None:
        """One set-up backend per client name."""
        for name in self.client_names():
            if name not in self.clients:
                client = self.new_client(name)
                client.setup()
                self.clients[name] = client
        log.info("%s captioner ready: program %s v%s (%s), clients %s", self.name,
                 self.program.id, self.program.version, self.program.hash,
                 list(self.clients.values()))

    def teardown(self) -> None:
        """Close the backends."""
        for client in self.clients.values():
            client.teardown()
        self.clients = {}

    def provenance(self) -> dict[str, Any]:
        """What wrote the texts (``build_provenance``), built once."""
        if self._provenance is None:
            self._provenance = self.build_provenance()
        return self._provenance

    @abstractmethod
    def build_provenance(self) -> dict[str, Any]:
        """Name, version, model(s), ``program_provenance()``, the clients' settings."""

    def step_context(self, client: str) -> dict[str, Any]:
        """What besides the program decides the answers of a step sent to ``client``: this
        captioner's name and version and the client's output-changing settings (model,
        generation and image settings; not endpoints, timeouts or retries)."""
        return {"name": self.name, "version": self.version,
                "client": hashed_view(self.client_settings(client))}

    def step_hashes(self) -> dict[str, dict[str, str]]:
        """Per level, each step → a hash of the step as written, the system prompt it gets, its
        client's ``step_context``, the visual prompts it sends (renderer version and parameters
        included) and the hashes of the earlier steps whose outputs its prompt reads. Equal
        hash, equal request: an earlier answer can be reused."""
        prompts = resolved_visual_prompts(self.program)
        out: dict[str, dict[str, str]] = {}
        for level, steps in self.program.steps.items():
            specs = {spec["name"]: spec for spec in prompts[level]}
            hashes: dict[str, str] = {}
            for step in steps:
                system = step.system if step.system is not None else self.program.system
                view = {"step": dataclasses.asdict(step), "system": system,
                        "context": self.step_context(step.client),
                        "images": [specs.get(name, name) for name in step.images],
                        "reads": {name: hashes[name] for name in step_inputs(step, hashes)}}
                hashes[step.name] = stable_hash(view)[:12]
            out[level] = hashes
        return out

    def program_provenance(self) -> dict[str, Any]:
        """The program's id, version, hash and resolved visual prompts, for provenance.

        Each visual prompt also says how it was sent, per client that sends it
        (``sent``: pixel budget, format, quality; ``ImageOptions.prompt_provenance``).
        """
        p = self.program
        users = prompt_clients(p)
        prompts = resolved_visual_prompts(p)
        for level, specs in prompts.items():
            for spec in specs:
                spec["sent"] = {client: self.image_options(client).prompt_provenance(
                    vp.has_alpha(spec["kind"])) for client in users[level].get(spec["name"], [])}
        return {"prompt_id": f"{p.id}@{p.version}", "prompt_hash": p.hash,
                "program": {"id": p.id, "version": p.version, "hash": p.hash},
                "visual_prompts": prompts, "steps": self.step_hashes()}

    # ------------------------------------------------------------ work

    def caption_batch(self, items: list[CaptionInput]) -> list[CaptionResult]:
        if not self.clients:
            self.setup()
        targets = self._targets(items)
        images = BatchImages(items)
        costs = [CallCost() for _ in items]
        depth = max(len(steps) for steps in self.program.steps.values())
        for index in range(depth):
            self._run_step(index, images, targets, costs)
        return [self._result(targets[i], costs[i]) for i in range(len(items))]

    def _targets(self, items: list[CaptionInput]) -> list[list[_Target]]:
        out = []
        for i, item in enumerate(items):
            row = [_Target(i, WHOLE_IMAGE, "image", None, target_fields(item, None),
                           reuse=dict(item.reuse.get(WHOLE_IMAGE, {})))]
            row += [_Target(i, r.id, r.level, r, target_fields(item, r),
                            reuse=dict(item.reuse.get(r.id, {}))) for r in item.regions]
            out.append(row)
        return out

    def _run_step(self, index: int, images: BatchImages, targets: list[list[_Target]],
                  costs: list[CallCost]) -> None:
        """Step ``index`` of every live target, one generate call per client, clients in
        parallel; each request's cost added to its image's."""
        work: dict[str, list[tuple[_Target, Step, GenerationRequest]]] = {}
        for row in targets:
            if row[0].failure is not None:
                continue          # the image failed: its regions are not worth asking about
            for target in row:
                steps = self.program.steps.get(target.level, ())
                if target.failure is not None or index >= len(steps):
                    continue
                step = steps[index]
                if step.name in target.reuse:
                    self._keep(target, step, target.reuse[step.name])
                    continue
                request = self._request(images, target, step)
                if isinstance(request, AnnotatorFailure):
                    target.failure = request
                else:
                    work.setdefault(step.client, []).append((target, step, request))
        if not work:
            return
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(work)) as pool:
            futures = {name: pool.submit(self.clients[name].generate, [w[2] for w in jobs])
                       for name, jobs in work.items()}
            for name, jobs in work.items():
                for (target, step, request), answer in zip(jobs, futures[name].result(),
                                                            strict=True):
                    costs[target.item].add(request.cost)
                    self._apply(target, step, answer)

    def _request(self, images: BatchImages, target: _Target,
                 step: Step) -> GenerationRequest | AnnotatorFailure:
        region_id = None if target.region is None else target.id
        try:
            text = step.prompt.format(**target.fields, **self._texts(target.outputs))
            prepared = images.of(target.item, self.image_options(step.client))
            pictures = [prepared.whole() if name == WHOLE_IMAGE else
                        self._prompt(images, prepared, target, name) for name in step.images]
        except Exception as exc:  # an unreadable image or mask costs its target, not the batch
            return AnnotatorFailure("prompt_error", f"step {step.name}: {type(exc).__name__}: "
                                    f"{exc}"[:500], region_id)
        system = step.system if step.system is not None else self.program.system
        return GenerationRequest(text, pictures, system or None, step.json_schema, step.name,
                                 step.max_tokens, step.temperature, region_id)

    def _prompt(self, images: BatchImages, prepared: vp.ImagePrompts, target: _Target,
                name: str) -> Encoded:
        """Visual prompt ``name`` of ``target``, drawn and encoded once per image settings."""
        kind, params = self._prompt_kinds[target.level][name]
        item = images.items[target.item]
        bbox = target.region.bbox if target.region is not None else \
            [0.0, 0.0, float(item.width), float(item.height)]
        return prepared.prompt(kind, images.mask(target.item, target.region), bbox, params,
                               key=(target.id, name))

    @staticmethod
    def _texts(outputs: dict[str, Any]) -> dict[str, str]:
        """Earlier outputs as template text (tags joined, judge by its reason).

        They go into ``str.format`` as values, which are never read as templates: an answer
        holding ``{caption}`` or ``}}{{`` comes out in the next prompt exactly as it was."""
        texts = {}
        for name, value in outputs.items():
            if name == "tags":
                texts[name] = ", ".join(value)
            elif name == "judge":
                reason = value.get("reason", "") if isinstance(value, dict) else value
                texts[name] = str(reason)
            elif isinstance(value, str):
                texts[name] = value.strip()
            else:
                texts[name] = json.dumps(value)
        return texts

    @classmethod
    def _apply(cls, target: _Target, step: Step, answer: ChatResult) -> None:
        if isinstance(answer, AnnotatorFailure):
            region_id = None if target.region is None else target.id
            detail = f"step {step.name}: {answer.detail}"[:1000]
            target.failure = AnnotatorFailure(answer.reason, detail, region_id)
            return
        value: Any = answer.parsed if step.json_schema is not None else answer.text.strip()
        if step.name == "tags":
            value = clean_tags(value)
        if step.name == "judge" and isinstance(value, dict):
            value = {"keep": bool(value.get("keep")), "reason": str(value.get("reason", ""))[:500]}
        cls._keep(target, step, value)

    @staticmethod
    def _keep(target: _Target, step: Step, value: Any) -> None:
        """``value`` as the target's output of ``step``; a judge's keep=false drops the target
        (``on_reject: drop``) or keeps it with its verdict (``flag``)."""
        if step.name == "judge" and isinstance(value, dict) and value.get("keep") is False \
                and step.on_reject == "drop":
            region_id = None if target.region is None else target.id
            target.failure = AnnotatorFailure("judge_rejected", str(value.get("reason", ""))[:500],
                                              region_id)
            return
        target.outputs[step.name] = value

    def _result(self, row: list[_Target], cost: CallCost) -> CaptionResult:
        image = row[0]
        if image.failure is not None:
            return CaptionResult(None, {}, [image.failure], cost.as_dict())
        provenance = self.provenance()
        regions: dict[str, TextOut] = {}
        failures: list[AnnotatorFailure] = []
        for target in row[1:]:
            if target.failure is not None:
                failures.append(target.failure)
            else:
                regions[target.id] = self._text(target, provenance)
        return CaptionResult(self._text(image, provenance), regions, failures, cost.as_dict())

    @staticmethod
    def _text(target: _Target, provenance: dict[str, Any]) -> TextOut:
        out = target.outputs
        caption = str(out.get("caption", "")).strip()
        long_caption = str(out.get("long_caption") or caption).strip()
        scores: dict[str, float] = {}
        judge = out.get("judge")
        if isinstance(judge, dict):
            scores["judge_keep"] = 1.0 if judge.get("keep") else 0.0
        steps = {name: value for name, value in out.items() if name not in SPECIAL_STEPS}
        return TextOut(caption, long_caption, list(out.get("tags", [])), scores, provenance,
                       judge if isinstance(judge, dict) else None, steps)
