"""`vllm`: captions, long captions and tags from a vision-language model behind vLLM's
OpenAI-compatible API, driven by a caption *program*.

Caption programs
----------------
A program is data (YAML in ``annotators/programs/<name>.yaml``, or any path): which calls make the
text of the image and of each region. Fields:

* ``id``, ``version``, ``system`` (system prompt of every step unless a step sets its own);
* ``visual_prompts``: per level ("image", "region", "pixel") a list of ``{name, kind, **params}``
  — what ``prompt_specs()`` returns, rendered by the pipeline (see annotators.visual_prompts);
* ``steps``: per level an ordered list of calls, each ``{name, prompt, images, json_schema?,
  client?, max_tokens?, temperature?, system?}``. ``prompt`` is a ``str.format`` template over the
  target's fields (``TARGET_FIELDS``) and the outputs of earlier steps of the same level.
  ``images`` lists "image" (the whole stored image: shared by all targets of an image and sent
  first, so vLLM's prefix cache reuses it) and/or visual prompt names of that level (sent after);
  an empty list makes a text-only call. ``json_schema`` asks for structured output. ``client``
  names an entry of the captioner's ``clients`` setting (another model or endpoint).
* any other top-level key starting with ``_`` or named ``schemas`` is ignored (YAML anchors).

Step names with a meaning: ``caption``, ``long_caption`` (defaults to the caption), ``tags``
(JSON ``{"tags": [...]}``: lowercased, stripped, deduplicated) and ``judge`` (JSON ``{"keep":
bool, "reason": str}``; keep=false drops the target with reason ``judge_rejected``). Other steps
are intermediate; later templates use their text.

Execution: step k runs for every target (image and regions) of every image in the batch in one
``run_many`` call (hundreds of requests in flight), then step k+1. A target whose step fails is
dropped with the client's failure reason (a region: that region only; the image: the whole image)
and takes no part in later steps.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

import yaml

from annotators import managed_server
from annotators.attributes import position_name, size_name
from annotators.base import (
    AnnotatorFailure,
    Captioner,
    CaptionInput,
    CaptionResult,
    ConfigError,
    RegionView,
    TextOut,
    hashed_fields,
    hashed_view,
    parse_settings,
    require,
    stable_hash,
)
from annotators.vllm_client import ChatAnswer, ChatRequest, ClientSettings, VllmChatClient

log = logging.getLogger(__name__)

PROGRAM_DIR = Path(__file__).resolve().parent / "programs"
LEVELS: tuple[str, ...] = ("image", "region", "pixel")
WHOLE_IMAGE = "image"
DEFAULT_CLIENT = "default"
MANAGED_URL = "http://managed/v1"   # stands in for the managed server's URL before it starts
SPECIAL_STEPS: tuple[str, ...] = ("caption", "long_caption", "tags", "judge")
TARGET_FIELDS: tuple[str, ...] = ("width", "height", "level", "bbox", "bbox_xyxy", "bbox_norm",
                                  "area_pct", "size", "position")
_PROGRAM_KEYS = ("id", "version", "system", "description", "visual_prompts", "steps", "schemas")
_STEP_KEYS = ("name", "prompt", "images", "json_schema", "client", "max_tokens", "temperature",
              "system")
_SECRET = re.compile(r"(api_?key|secret|password|authorization|bearer)", re.I)


# --------------------------------------------------------------------------- programs


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
    """Names of the programs shipped in ``annotators/programs``."""
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
    from annotators import visual_prompts as vp

    return {level: [{"name": s["name"], **vp.spec_provenance(
        s["kind"], {k: v for k, v in s.items() if k not in ("name", "kind")})} for s in items]
        for level, items in program.visual_prompts.items()}


def program_hash_view(program: Program) -> dict[str, Any]:
    """What of a program changes captions: its content hash (not the file's name or path) and
    its visual prompts as rendered (renderer version and default parameters included)."""
    return {"id": program.id, "version": program.version, "hash": program.hash,
            "visual_prompts": resolved_visual_prompts(program)}


def _parse_visual_prompts(raw: Any, where: str) -> dict[str, list[dict[str, Any]]]:
    from annotators import visual_prompts as vp

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
    return Step(item["name"], item["prompt"], tuple(ordered), schema,
                str(item.get("client") or DEFAULT_CLIENT), item.get("max_tokens"),
                item.get("temperature"), item.get("system"))


def _template_fields(template: str, where: str) -> set[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"{where}.prompt: bad template ({exc}); write literal braces "
                          f"as {{{{ }}}}") from None
    return {re.split(r"[.\[]", name)[0] for _, name, _, _ in parsed if name is not None}


# --------------------------------------------------------------------------- settings


@dataclass
class VllmSettings:
    """Settings of the vLLM captioner.

    ``client`` is passed to every chat client (ClientSettings fields: max_in_flight, timeout_s,
    max_retries, image_max_pixels, ...). ``clients`` adds named clients for steps that set
    ``client:``; each entry overrides the default client's settings (model, endpoints, ...).
    ``server`` starts a managed server (annotators.managed_server.ServerSettings); clients
    without their own endpoints then talk to it.
    """

    model: str = ""
    program: str = "umg"
    endpoints: list[str] = field(default_factory=list)
    client: dict[str, Any] = field(default_factory=dict)
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    server: dict[str, Any] | None = None

    # Where the server is; the clients' and the server's own run settings are left out in
    # hash_view (ClientSettings.RUN_ONLY, ServerSettings.RUN_ONLY).
    RUN_ONLY: ClassVar[frozenset[str]] = frozenset({"endpoints"})

    def hash_view(self) -> dict[str, Any]:
        """The hashed settings: model, the program's content, the output settings of every
        client the program uses (defaults filled in), the server's command."""
        view = hashed_fields(self)
        program = load_program(self.program)
        view["program"] = program_hash_view(program)
        del view["client"]
        view["clients"] = {
            name: scrub_secrets(hashed_view(parse_settings(
                ClientSettings, self.client_values(name, MANAGED_URL), name)))
            for name in sorted({DEFAULT_CLIENT} | program.clients())}
        if self.server is not None:
            view["server"] = hashed_view(
                parse_settings(managed_server.ServerSettings, self.server, "server"))
        return view

    def check(self) -> None:
        """Load the program and validate every client and the server settings."""
        require(bool(self.model), "model", "name the served model (vLLM --served-model-name)")
        require(bool(self.endpoints) != (self.server is not None), "endpoints",
                "give either the server's base URL(s), e.g. [http://127.0.0.1:8000/v1], or a "
                "'server' section to start one (its URL is then used), not both")
        for key in ("model", "endpoints"):
            require(key not in self.client, f"client.{key}", f"set '{key}' at the top level")
        if self.server is not None:
            parse_settings(managed_server.ServerSettings, self.server, "server")
        program = load_program(self.program)
        missing = sorted(program.clients() - {DEFAULT_CLIENT} - set(self.clients))
        require(not missing, "clients", f"the program's steps use client(s) {missing}; add them "
                "under 'clients' (each a mapping of client settings)")
        for name in [DEFAULT_CLIENT, *self.clients]:
            parse_settings(ClientSettings, self.client_values(name, MANAGED_URL),
                           f"clients.{name}" if name != DEFAULT_CLIENT else "client")

    def client_values(self, name: str, server_url: str | None) -> dict[str, Any]:
        """ClientSettings values of client ``name`` (``server_url``: the managed server's)."""
        endpoints = [server_url] if self.server is not None and server_url else list(self.endpoints)
        values: dict[str, Any] = {"model": self.model, **self.client, "endpoints": endpoints}
        if name != DEFAULT_CLIENT:
            values.update(self.clients.get(name) or {})
        return values


# --------------------------------------------------------------------------- targets


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


def target_fields(item: CaptionInput, region: RegionView | None) -> dict[str, Any]:
    """Template fields of a target (see TARGET_FIELDS)."""
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


def scrub_secrets(value: Any) -> Any:
    """``value`` without any mapping entry whose name looks like a credential."""
    if isinstance(value, dict):
        return {k: scrub_secrets(v) for k, v in value.items() if not _SECRET.search(str(k))}
    if isinstance(value, list):
        return [scrub_secrets(v) for v in value]
    return value


# --------------------------------------------------------------------------- the captioner


class VllmCaptioner(Captioner):
    """Runs a caption program against vLLM server(s); see the module docstring."""

    name = "vllm"
    version = "1"
    Settings = VllmSettings

    def __init__(self, settings: Mapping[str, Any] | None = None, where: str = "") -> None:
        super().__init__(settings, where)
        self.program: Program = load_program(self.settings.program)
        self.clients: dict[str, VllmChatClient] = {}
        # the managed server: this process's own, or a handle on the machine's shared one
        self.server: managed_server.ManagedServer | managed_server.shared.SharedServerHandle \
            | None = None
        self._server_url: str | None = None       # the URL the clients were built for
        self._provenance: dict[str, Any] | None = None

    def prompt_specs(self) -> dict[str, list[dict[str, Any]]]:
        return {level: [dict(s) for s in specs]
                for level, specs in self.program.visual_prompts.items()}

    # ------------------------------------------------------------ lifecycle

    def setup(self) -> None:
        """Start the managed server (if configured) and one chat client per client name."""
        url = None
        if self.settings.server is not None and self.server is None:
            settings = parse_settings(managed_server.ServerSettings, self.settings.server, "server")
            self.server = managed_server.acquire(settings)
            url = self.server.base_url
        elif self.server is not None:
            url = self.server.base_url
        self._server_url = url
        for name in sorted({DEFAULT_CLIENT} | self.program.clients()):
            if name not in self.clients:
                where = "client" if name == DEFAULT_CLIENT else f"clients.{name}"
                self.clients[name] = VllmChatClient(self.settings.client_values(name, url), where)
                self.clients[name].setup()
        log.info("vllm captioner ready: program %s v%s (%s), clients %s", self.program.id,
                 self.program.version, self.program.hash, list(self.clients.values()))

    def teardown(self) -> None:
        """Close the clients and give back the managed server."""
        self._close_clients()
        server, self.server = self.server, None
        if server is not None:
            managed_server.release(server)

    def _close_clients(self) -> None:
        for client in self.clients.values():
            client.teardown()
        self.clients = {}

    def provenance(self) -> dict[str, Any]:
        """Name, version, model, program id/version/hash, visual prompts, client settings.

        Only the name of the API key's environment variable is a setting; it and anything else
        that looks like a credential is left out.
        """
        if self._provenance is None:
            self._provenance = self._build_provenance()
        return self._provenance

    def _visual_prompt_provenance(self) -> dict[str, list[dict[str, Any]]]:
        """Every visual prompt of the program with its parameters resolved, per level."""
        return resolved_visual_prompts(self.program)

    def _build_provenance(self) -> dict[str, Any]:
        p = self.program
        specs = self._visual_prompt_provenance()
        clients = {}
        for name in sorted({DEFAULT_CLIENT} | p.clients()):
            values = parse_settings(
                ClientSettings, self.settings.client_values(name, MANAGED_URL), name)
            plain = dataclasses.asdict(values)
            plain.pop("api_key_env", None)
            plain.pop("refusal_phrases", None)
            if self.settings.server is not None and name == DEFAULT_CLIENT:
                plain.pop("endpoints", None)   # a free port, different on every run
            clients[name] = scrub_secrets(plain)
        models = sorted({c["model"] for c in clients.values()})
        return {"name": self.name, "version": self.version, "model": self.settings.model,
                "models": models, "prompt_id": f"{p.id}@{p.version}", "prompt_hash": p.hash,
                "program": {"id": p.id, "version": p.version, "hash": p.hash},
                "visual_prompts": specs, "clients": clients,
                "managed_server": self.settings.server is not None}

    # ------------------------------------------------------------ work

    def caption_batch(self, items: list[CaptionInput]) -> list[CaptionResult]:
        if not self.clients:
            self.setup()
        if self.server is not None:
            self.server.ensure_running()
            if self.server.base_url != self._server_url:
                # a shared server whose owner process ended was started again elsewhere
                self._close_clients()
                self.setup()
        targets = self._targets(items)
        depth = max(len(steps) for steps in self.program.steps.values())
        for index in range(depth):
            self._run_step(index, items, targets)
        return [self._result(i, targets[i]) for i in range(len(items))]

    def _targets(self, items: list[CaptionInput]) -> list[list[_Target]]:
        out = []
        for i, item in enumerate(items):
            row = [_Target(i, WHOLE_IMAGE, "image", None, target_fields(item, None))]
            row += [_Target(i, r.id, r.level, r, target_fields(item, r)) for r in item.regions]
            out.append(row)
        return out

    def _run_step(self, index: int, items: list[CaptionInput],
                  targets: list[list[_Target]]) -> None:
        """Step ``index`` of every live target, one run_many per client, clients in parallel."""
        work: dict[str, list[tuple[_Target, Step, ChatRequest]]] = {}
        urls: dict[tuple[Any, ...], str] = {}
        for row in targets:
            if row[0].failure is not None:
                continue          # the image failed: its regions are not worth asking about
            for target in row:
                steps = self.program.steps.get(target.level, ())
                if target.failure is not None or index >= len(steps):
                    continue
                step = steps[index]
                request = self._request(items[target.item], target, step, urls)
                if isinstance(request, AnnotatorFailure):
                    target.failure = request
                else:
                    work.setdefault(step.client, []).append((target, step, request))
        if not work:
            return
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(work)) as pool:
            futures = {name: pool.submit(self.clients[name].run_many, [w[2] for w in jobs])
                       for name, jobs in work.items()}
            for name, jobs in work.items():
                for (target, step, _), answer in zip(jobs, futures[name].result(), strict=True):
                    self._apply(target, step, answer)

    def _request(self, item: CaptionInput, target: _Target, step: Step,
                 urls: dict[tuple[Any, ...], str]) -> ChatRequest | AnnotatorFailure:
        client = self.clients[step.client]
        region_id = None if target.region is None else target.id
        try:
            text = step.prompt.format(**target.fields, **self._texts(target.outputs))
            shared = [self._url(urls, client, step.client, target.item, WHOLE_IMAGE, item.image)
                      for name in step.images if name == WHOLE_IMAGE]
            own = [self._url(urls, client, step.client, target.item, target.id,
                             self._prompt_png(item, target, name), name)
                   for name in step.images if name != WHOLE_IMAGE]
        except (KeyError, IndexError, ValueError, OSError) as exc:
            return AnnotatorFailure("prompt_error", f"step {step.name}: {type(exc).__name__}: "
                                    f"{exc}"[:500], region_id)
        system = step.system if step.system is not None else self.program.system
        request = client.request(system=system or None, shared_images=shared, region_images=own,
                                 text=text, json_schema=step.json_schema, schema_name=step.name,
                                 region_id=region_id)
        request.max_tokens, request.temperature = step.max_tokens, step.temperature
        return request

    @staticmethod
    def _prompt_png(item: CaptionInput, target: _Target, name: str) -> bytes:
        try:
            return item.prompts[target.id][name]
        except KeyError:
            raise KeyError(f"visual prompt {name!r} was not rendered for {target.id!r}") from None

    @staticmethod
    def _url(cache: dict[tuple[Any, ...], str], client: VllmChatClient, client_name: str,
             item: int, target: str, data: bytes, name: str = WHOLE_IMAGE) -> str:
        """Data URL of an image, encoded once per batch and client (the whole image is shared)."""
        key = (client_name, item, WHOLE_IMAGE if name == WHOLE_IMAGE else target, name)
        if key not in cache:
            cache[key] = client.encode_image(data)
        return cache[key]

    @staticmethod
    def _texts(outputs: dict[str, Any]) -> dict[str, str]:
        """Earlier outputs as template text (tags joined, judge by its reason)."""
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

    @staticmethod
    def _apply(target: _Target, step: Step, answer: ChatAnswer | AnnotatorFailure) -> None:
        region_id = None if target.region is None else target.id
        if isinstance(answer, AnnotatorFailure):
            detail = f"step {step.name}: {answer.detail}"[:1000]
            target.failure = AnnotatorFailure(answer.reason, detail, region_id)
            return
        value: Any = answer.parsed if step.json_schema is not None else answer.text.strip()
        if step.name == "tags":
            value = clean_tags(value)
        if step.name == "judge" and isinstance(value, dict) and value.get("keep") is False:
            target.failure = AnnotatorFailure("judge_rejected", str(value.get("reason", ""))[:500],
                                              region_id)
            return
        target.outputs[step.name] = value

    def _result(self, index: int, row: list[_Target]) -> CaptionResult:
        image = row[0]
        if image.failure is not None:
            return CaptionResult(None, {}, [image.failure])
        provenance = self.provenance()
        regions: dict[str, TextOut] = {}
        failures: list[AnnotatorFailure] = []
        for target in row[1:]:
            if target.failure is not None:
                failures.append(target.failure)
            else:
                regions[target.id] = self._text(target, provenance)
        return CaptionResult(self._text(image, provenance), regions, failures)

    @staticmethod
    def _text(target: _Target, provenance: dict[str, Any]) -> TextOut:
        out = target.outputs
        caption = str(out.get("caption", "")).strip()
        long_caption = str(out.get("long_caption") or caption).strip()
        scores = {}
        if isinstance(out.get("judge"), dict):
            scores["judge_keep"] = 1.0
        return TextOut(caption, long_caption, list(out.get("tags", [])), scores, provenance)
