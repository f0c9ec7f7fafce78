"""`transformers`: caption programs generated in-process with Hugging Face transformers, for
small runs (tests, a laptop, one GPU without a server).

``LocalChatClient`` is the backend: it loads ``AutoProcessor`` + ``AutoModelForImageTextToText``
once and answers ``generate(requests)`` in chunks of ``batch_size`` (left padding; greedy at
temperature 0, else sampled with a seed). Images are handed to the processor decoded (RGB PIL
images, each decoded once per call; no data URLs), fit to ``image_max_pixels`` exactly as the
HTTP backend would send them (``backends.images.decode_image``; the engine's whole image and
visual prompts arrive already fit and encoded, and are decoded as they are). There is no
grammar-constrained decoding: for a request with a ``json_schema`` the schema is added to the
prompt and the answer is parsed and validated afterwards, failing with ``answer_not_json`` or
``answer_schema`` when it does not match. Every answer goes through the same cleaning and
checks as the HTTP backend (``check_answer``: answer_too_large, empty, refusal, repetition,
truncated, answer_too_deep, answer_not_json, answer_schema; ``allow_truncated`` honoured). ``TransformersCaptioner`` runs programs on it
(``annotators.caption.engine``), one client per client name.

Cost: each request's ``cost`` counts one call per try (a row of a generated chunk; failed ones
apart), prompt tokens as the row's input ids without padding (image tokens included) and
completion tokens as the ids generated up to and including the end-of-answer token, whether or
not the answer passes its checks. No bytes go over a wire (0).

Longer than most modules (about 500 lines) on purpose: the settings, the backend and the
captioner that names it in configs live together, so that another in-process backend (e.g.
vLLM's ``LLM``) is one file to copy and one registry line.

Nothing is downloaded unless ``allow_download`` is true: ``model`` is a local folder (or a name
already in the local Hugging Face cache).
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Mapping, Sequence

from annotators.base import AnnotatorFailure, CaptionInput, CaptionResult
from annotators.caption.backends.base import (
    Backend,
    ChatAnswer,
    ChatResult,
    GenerationRequest,
    ImageLike,
    prepare_images,
)
from annotators.caption.backends.checks import ANSWER_REASONS, AnswerChecks, check_answer
from annotators.caption.backends.images import decode_image
from annotators.caption.engine import ProgramCaptioner
from annotators.caption.program import (
    DEFAULT_CLIENT,
    load_program,
    program_hash_view,
    require_clients,
)
from annotators.devices import device_name, dtype_name, valid_device
from annotators.serving.shared import SharedModel
from settings import ConfigError, hashed_fields, parse_settings, require

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

BACKEND = "transformers"
CLIENT_VERSION = "1"
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
SCHEMA_INSTRUCTION = ("Answer with one JSON value and nothing else. It must match this JSON "
                      "Schema: {schema}")
_PATH_LIKE = ("/", "./", "../", "~")


# --------------------------------------------------------------------------- settings


@dataclass
class LocalClientSettings:
    """Settings of one in-process chat client (one loaded model).

    ``max_new_tokens`` is used when a step sets no ``max_tokens``; ``max_new_tokens_cap`` (when
    set) bounds every answer, whatever the step asks, to keep CPU runs short.
    """

    model: str = ""                          # local folder, or a name in the local HF cache
    device: str = "auto"                     # auto (cuda when available), cpu, cuda, cuda:N
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU
    batch_size: int = 8                      # requests generated together (left-padded)
    max_new_tokens: int = 512
    max_new_tokens_cap: int | None = None
    temperature: float = 0.0                 # 0: greedy; a step's temperature overrides it
    seed: int | None = 0                     # torch seed before each sampled chunk
    generate_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. repetition_penalty
    allow_download: bool = False             # let transformers fetch ``model`` from the hub
    image_max_pixels: int = 1024 * 1024      # resize budget of the images put into requests
    image_format: Literal["auto", "jpeg", "png"] = "auto"   # the whole image, when re-encoded
    jpeg_quality: int = 90
    # visual prompts, at prompt_quality: as ClientSettings (alpha ones WebP unless "png")
    prompt_format: Literal["jpeg", "webp", "png"] = "jpeg"
    prompt_quality: int = 90
    answer_retries: int = 1                  # re-asks for answers failing a listed check
    retry_answer_reasons: list[str] = field(
        default_factory=lambda: ["answer_not_json", "answer_schema"])
    answer_retry_temperature: float | None = 0.5
    allow_truncated: bool = False            # keep free text cut at the token limit

    # Chunk size of generation (which requests share a chunk already depends on how the runner
    # batches images) and whether weights may be fetched (``model`` names them, and is hashed).
    # device and dtype stay hashed: they change the arithmetic and so, at times, the text.
    RUN_ONLY: ClassVar[frozenset[str]] = frozenset({"batch_size", "allow_download"})

    def check(self) -> None:
        """Reject values that cannot work, naming the field and the fix."""
        require(bool(self.model), "model", "give a local model folder (saved model + processor) "
                "or a model name in the local Hugging Face cache")
        if self.model.startswith(_PATH_LIKE):
            require(Path(self.model).expanduser().is_dir(), "model",
                    f"{self.model!r} is not a folder; give a folder with a saved model and "
                    f"processor (save_pretrained)")
        require(valid_device(self.device, ("mps",)), "device",
                f"{self.device!r} is not a device; use auto, cpu, cuda or cuda:N")
        require(self.batch_size >= 1, "batch_size", "must be at least 1")
        require(self.max_new_tokens >= 1, "max_new_tokens", "must be at least 1")
        require(self.max_new_tokens_cap is None or self.max_new_tokens_cap >= 1,
                "max_new_tokens_cap", "must be at least 1 (or null for no cap)")
        require(self.temperature >= 0, "temperature", "must be >= 0")
        require(self.image_max_pixels >= 1024, "image_max_pixels", "must be at least 1024")
        require(1 <= self.jpeg_quality <= 95, "jpeg_quality", "must be within 1..95")
        require(1 <= self.prompt_quality <= 95, "prompt_quality", "must be within 1..95 (JPEG / "
                "WebP quality of visual prompts)")
        require(self.answer_retries >= 0, "answer_retries", "must be >= 0")
        unknown = sorted(set(self.retry_answer_reasons) - set(ANSWER_REASONS))
        require(not unknown, "retry_answer_reasons",
                f"unknown reason(s) {unknown}; use some of {list(ANSWER_REASONS)}")

    def token_limit(self, request: GenerationRequest) -> int:
        """New tokens allowed for ``request``: its own limit or the default, within the cap."""
        limit = request.max_tokens or self.max_new_tokens
        return min(limit, self.max_new_tokens_cap) if self.max_new_tokens_cap else limit


_CLIENT_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LocalClientSettings))


@dataclass
class TransformersSettings(LocalClientSettings):
    """Settings of the transformers captioner: the client settings, a program, named clients.

    ``clients`` adds named clients for program steps that set ``client:``; each entry overrides
    the top-level client settings (another ``model``, ``dtype``, ...).
    """

    program: str = "umg"
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    # One loaded model per machine for all SDK processes (annotators.serving.shared); worth
    # it on a GPU.
    share_across_processes: bool = False

    RUN_ONLY: ClassVar[frozenset[str]] = frozenset({"share_across_processes"})

    def hash_view(self) -> dict[str, Any]:
        """The hashed settings: the default client's output settings, the program's content, and
        the output settings of every named client the program uses (defaults filled in)."""
        view = hashed_fields(self)
        program = load_program(self.program)
        view["program"] = program_hash_view(program)
        view["clients"] = {
            name: hashed_fields(parse_settings(LocalClientSettings, self.client_values(name),
                                               f"clients.{name}"))
            for name in sorted(program.clients() - {DEFAULT_CLIENT})}
        return view

    def check(self) -> None:
        """Check the client settings, load the program and validate every named client."""
        super().check()
        require_clients(load_program(self.program), self.clients)
        for name in self.clients:
            parse_settings(LocalClientSettings, self.client_values(name), f"clients.{name}")

    def client_values(self, name: str) -> dict[str, Any]:
        """LocalClientSettings values of client ``name``."""
        values = {key: getattr(self, key) for key in _CLIENT_FIELDS}
        if name != DEFAULT_CLIENT:
            values.update(self.clients.get(name) or {})
        return values


# --------------------------------------------------------------------------- messages


def processor_messages(request: GenerationRequest, images: Sequence[Any]) -> list[dict[str, Any]]:
    """The messages of ``request`` as a processor's chat template expects them: the system
    prompt, then one user message with an image part per image and the text. With a
    ``json_schema`` the schema is appended to the user message as an instruction."""
    out: list[dict[str, Any]] = []
    if request.system:
        out.append({"role": "system", "content": [{"type": "text", "text": request.system}]})
    content: list[dict[str, Any]] = [{"type": "image"} for _ in images]
    if request.text:
        content.append({"type": "text", "text": request.text})
    if request.json_schema is not None:
        schema = json.dumps(request.json_schema, separators=(",", ":"))
        content.append({"type": "text", "text": "\n" + SCHEMA_INSTRUCTION.format(schema=schema)})
    out.append({"role": "user", "content": content})
    return out


def transformers_version() -> str:
    """The installed transformers version ("" when it is not installed)."""
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return ""


# --------------------------------------------------------------------------- the client


@dataclass
class _Prepared:
    """One request ready for the processor."""

    index: int
    prompt: str
    images: list[Any]
    limit: int
    temperature: float


class LocalChatClient(Backend):
    """The in-process backend: one transformers model answering generation requests.

    ``generate(requests)`` never raises: each result is a ChatAnswer or an AnnotatorFailure
    (answer-check reasons as the HTTP backend; ``prompt_error`` when an image cannot be read,
    ``client_error`` when a prompt cannot be built or its chunk cannot be generated). Calls are
    serialised (one generation at a time).
    """

    def __init__(self, settings: LocalClientSettings | Mapping[str, Any],
                 where: str = "client") -> None:
        if not isinstance(settings, LocalClientSettings):
            settings = parse_settings(LocalClientSettings, settings, where)
        self.settings: LocalClientSettings = settings
        self.where = where
        self.checks = dataclasses.replace(AnswerChecks(), allow_truncated=settings.allow_truncated)
        self.metrics: dict[str, Any] = {"requests": 0, "answers": 0, "retries": 0, "chunks": 0,
                                        "failures": Counter(), "retry_reasons": Counter()}
        self.device = device_name(settings.device)
        self.dtype = dtype_name(settings.dtype, self.device)
        self.model: Any = None
        self.processor: Any = None
        self._eos: set[int] = set()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        s = self.settings
        return f"LocalChatClient(model={s.model!r}, device={self.device!r}, dtype={self.dtype!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self.settings, "where": self.where}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["settings"], state["where"])  # type: ignore[misc]

    def provenance(self) -> dict[str, Any]:
        """Backend, model, transformers version, resolved device and dtype, settings."""
        return {"name": "local-chat-client", "version": CLIENT_VERSION, "backend": BACKEND,
                "model": self.settings.model, "transformers_version": transformers_version(),
                "device": self.device, "dtype": self.dtype,
                "settings": dataclasses.asdict(self.settings)}

    # ------------------------------------------------------------ lifecycle

    def setup(self) -> None:
        """Load the processor and the model once; ConfigError names ``model`` if that fails."""
        with self._lock:
            if self.model is None:
                self._load()

    def _load(self) -> None:
        """Load processor and model from ``model`` onto the device, left padding."""
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        s = self.settings
        options = {"local_files_only": not s.allow_download}
        try:
            processor = AutoProcessor.from_pretrained(s.model, **options)
            model = AutoModelForImageTextToText.from_pretrained(
                s.model, dtype=getattr(torch, self.dtype), **options)
        except (OSError, ValueError, KeyError) as exc:
            hint = "" if s.allow_download else " (nothing is downloaded unless allow_download)"
            raise ConfigError(f"{self.where}.model: cannot load {s.model!r}{hint}: "
                              f"{type(exc).__name__}: {str(exc)[:300]}; give a folder with a "
                              f"saved image-text-to-text model and its processor") from None
        if not getattr(processor, "chat_template", None):
            raise ConfigError(f"{self.where}.model: {s.model!r} has no chat template; save one "
                              f"with the processor (processor.chat_template)")
        processor.tokenizer.padding_side = "left"
        self.processor, self.model = processor, model.to(self.device).eval()
        self._eos = self._eos_ids()
        log.info("loaded %s on %s (%s)", s.model, self.device, self.dtype)

    def _eos_ids(self) -> set[int]:
        """Token ids that end an answer (generation config and tokenizer)."""
        ids = self.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        eos = self.processor.tokenizer.eos_token_id
        return set(ids) | ({eos} if eos is not None else set())

    def teardown(self) -> None:
        """Drop the model and processor (and the GPU cache); ``generate`` afterwards reloads."""
        with self._lock:
            on_gpu = self.model is not None and self.device.startswith("cuda")
            self.model = self.processor = None
        if on_gpu:
            import torch

            torch.cuda.empty_cache()

    # ------------------------------------------------------------ requests

    def picture(self, image: ImageLike) -> Image.Image:
        """``image`` as the model gets it: RGB pixels fit to this client's image settings."""
        s = self.settings
        return decode_image(image, s.image_max_pixels, s.image_format, s.jpeg_quality)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[ChatResult]:
        """Answer ``requests`` in batches of ``batch_size``; results in input order.

        Each image is decoded once per call. Answers failing a check listed in
        ``retry_answer_reasons`` are asked again (sampled at ``answer_retry_temperature``) up to
        ``answer_retries`` times.
        """
        if not requests:
            return []
        self.setup()
        prepared = prepare_images(requests, self.picture)
        live = {i: images for i, images in enumerate(prepared)
                if not isinstance(images, AnnotatorFailure)}
        results: dict[int, ChatResult] = {i: failure for i, failure in enumerate(prepared)
                                          if isinstance(failure, AnnotatorFailure)}
        for i in live:
            requests[i].cost.requests += 1
        with self._lock:
            self.metrics["requests"] += len(live)
            answers = self._attempt(requests, live, sorted(live), 0)
            for retry in range(1, self.settings.answer_retries + 1):
                again = sorted(i for i, r in answers.items() if self._retryable(r))
                if not again:
                    break
                for i in again:
                    self.metrics["retry_reasons"][answers[i].reason] += 1
                self.metrics["retries"] += len(again)
                answers.update(self._attempt(requests, live, again, retry))
        for result in answers.values():
            if isinstance(result, AnnotatorFailure):
                self.metrics["failures"][result.reason] += 1
            else:
                self.metrics["answers"] += 1
        results.update(answers)
        return [results[i] for i in range(len(requests))]

    def _retryable(self, result: ChatResult) -> bool:
        """True when ``result`` failed a check worth asking again for."""
        return isinstance(result, AnnotatorFailure) and \
            result.reason in self.settings.retry_answer_reasons

    def _attempt(self, requests: Sequence[GenerationRequest], images: Mapping[int, list[Any]],
                 indices: list[int], retry: int) -> dict[int, ChatResult]:
        """One try of ``requests[i]`` for each i in ``indices``, chunked by token limit."""
        results: dict[int, ChatResult] = {}
        prepared: list[_Prepared] = []
        for i in indices:
            item = self._prepare(i, requests[i], images[i], retry)
            if isinstance(item, AnnotatorFailure):
                results[i] = item
            else:
                prepared.append(item)
        for chunk in self._chunks(prepared):
            results.update(self._generate(chunk, requests, retry))
        return results

    def _chunks(self, prepared: list[_Prepared]) -> list[list[_Prepared]]:
        """At most ``batch_size`` requests each, sharing one token limit and temperature."""
        groups: dict[tuple[int, float], list[_Prepared]] = {}
        for item in prepared:
            groups.setdefault((item.limit, item.temperature), []).append(item)
        size = self.settings.batch_size
        return [group[k:k + size] for group in groups.values()
                for k in range(0, len(group), size)]

    def _prepare(self, index: int, request: GenerationRequest, images: list[Any],
                 retry: int) -> _Prepared | AnnotatorFailure:
        """The prompt, images, token limit and temperature of one try of ``request``."""
        s = self.settings
        temperature = s.temperature if request.temperature is None else request.temperature
        if retry and s.answer_retry_temperature is not None:
            temperature = s.answer_retry_temperature
        try:
            messages = processor_messages(request, images)
            prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True,
                                                        tokenize=False)
        except Exception as exc:  # one bad request must not cost the batch
            return AnnotatorFailure("client_error", f"cannot build the prompt: "
                                    f"{type(exc).__name__}: {exc}"[:500], request.region_id)
        return _Prepared(index, prompt, images, s.token_limit(request), float(temperature))

    def _generate(self, chunk: list[_Prepared], requests: list[GenerationRequest],
                  retry: int) -> dict[int, ChatResult]:
        """Generate one chunk; a failure of the chunk fails each of its requests."""
        started = time.perf_counter()
        for p in chunk:
            requests[p.index].cost.calls += 1
        try:
            inputs, output = self._run_model(chunk, retry)
        except Exception as exc:  # e.g. out of memory: fail these requests, keep the batch
            log.warning("generation of %d request(s) failed", len(chunk), exc_info=True)
            detail = f"generation failed: {type(exc).__name__}: {exc}"[:500]
            for p in chunk:
                requests[p.index].cost.failed_calls += 1
            return {p.index: AnnotatorFailure("client_error", detail, requests[p.index].region_id)
                    for p in chunk}
        latency = time.perf_counter() - started
        self.metrics["chunks"] += 1
        width = inputs["input_ids"].shape[1]
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        return {p.index: self._answer(output[row, width:].tolist(), p, int(prompt_tokens[row]),
                                      requests[p.index], latency)
                for row, p in enumerate(chunk)}

    def _run_model(self, chunk: list[_Prepared], retry: int) -> tuple[Any, torch.Tensor]:
        """Processor inputs of ``chunk`` and the generated ids (prompt included)."""
        import torch

        images = [image for p in chunk for image in p.images]
        inputs = self.processor(text=[p.prompt for p in chunk], images=images or None,
                                padding=True, return_tensors="pt").to(self.device)
        temperature = chunk[0].temperature
        options: dict[str, Any] = {"max_new_tokens": chunk[0].limit, "do_sample": temperature > 0,
                                   **self.settings.generate_kwargs}
        if temperature > 0:
            options["temperature"] = temperature
            if self.settings.seed is not None:
                torch.manual_seed(self.settings.seed + retry)
        with torch.inference_mode():
            output = self.model.generate(**inputs, **options)
        return inputs, output

    def _answer(self, tokens: list[int], item: _Prepared, prompt_tokens: int,
                request: GenerationRequest, latency: float) -> ChatResult:
        """Check one generated sequence; a ChatAnswer or the failure of the first check."""
        stop = next((k for k, t in enumerate(tokens) if t in self._eos), None)
        finish = "stop" if stop is not None or len(tokens) < item.limit else "length"
        # generated: up to and including the end token (the padding after it is not an answer's)
        generated = len(tokens) if stop is None else stop + 1
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                 "total_tokens": prompt_tokens + generated}
        request.cost.add_usage(usage)
        tokens = tokens if stop is None else tokens[:stop]
        text = self.processor.tokenizer.decode(tokens, skip_special_tokens=True)
        text, parsed, problem = check_answer(text, finish, request.json_schema, self.checks)
        if problem:
            request.cost.failed_calls += 1
            return AnnotatorFailure(problem[0], problem[1], request.region_id)
        return ChatAnswer(text=text, parsed=parsed, finish_reason=finish, usage=usage,
                          latency_s=latency, total_s=latency, endpoint=f"local:{self.device}",
                          region_id=request.region_id)


# --------------------------------------------------------------------------- the captioner


class TransformersCaptioner(ProgramCaptioner):
    """Runs a caption program with in-process transformers models (see the module docstring)."""

    name = "transformers"
    version = "1"
    Settings = TransformersSettings

    def __init__(self, settings: Mapping[str, Any] | None = None, where: str = "") -> None:
        if importlib.util.find_spec("transformers") is None:
            raise ConfigError(f"{where or self.role}.name: 'transformers' needs the transformers "
                              f"package; install the project's 'hf' extra")
        super().__init__(settings, where)
        self.where = where or self.role
        self.clients: dict[str, LocalChatClient] = {}  # type: ignore[assignment]
        self.shared_model: SharedModel | None = None   # share_across_processes: the owner's

    def setup(self) -> None:
        """Load one local client (processor + model) per client name the program uses (per
        worker, or per machine with share_across_processes)."""
        if self.settings.share_across_processes:
            if self.shared_model is None:
                self.shared_model = SharedModel(self, self.where).open()
            return
        super().setup()

    def new_client(self, name: str) -> LocalChatClient:
        where = self.where if name == DEFAULT_CLIENT else f"{self.where}.clients.{name}"
        return LocalChatClient(self.settings.client_values(name), where)

    def client_settings(self, name: str) -> LocalClientSettings:
        return parse_settings(LocalClientSettings, self.settings.client_values(name), name)

    def teardown(self) -> None:
        """Unload the models (or give back the machine's shared copy)."""
        shared_model, self.shared_model = self.shared_model, None
        if shared_model is not None:
            shared_model.close()
        super().teardown()

    def caption_batch(self, items: list[CaptionInput]) -> list[CaptionResult]:
        if self.settings.share_across_processes:
            self.setup()
            assert self.shared_model is not None
            return self.shared_model.call("caption_batch", items)
        return super().caption_batch(items)

    def build_provenance(self) -> dict[str, Any]:
        """Name, version, backend, model, transformers version, dtype, device, program, clients."""
        clients = {}
        for name in self.client_names():
            values = parse_settings(LocalClientSettings, self.settings.client_values(name), name)
            device = device_name(values.device)
            clients[name] = {**dataclasses.asdict(values), "device": device,
                             "dtype": dtype_name(values.dtype, device)}
        default = clients[DEFAULT_CLIENT]
        return {"name": self.name, "version": self.version, "backend": BACKEND,
                "model": self.settings.model,
                "models": sorted({c["model"] for c in clients.values()}),
                "transformers_version": transformers_version(), "device": default["device"],
                "dtype": default["dtype"], **self.program_provenance(), "clients": clients,
                "managed_server": False}
