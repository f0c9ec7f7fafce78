"""`vllm`: caption programs run against OpenAI-compatible server(s) — vLLM, or any server that
speaks the same API — with one ``VllmChatClient`` per client name the program uses.

The servers are given (``endpoints``) or started, watched and always stopped by the pipeline
(``server``: ``annotators.serving.managed_server``; one per machine, shared by its SDK
processes). Texts and failures come from ``annotators.caption.engine``.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from annotators.base import CaptionInput, CaptionResult
from annotators.caption.backends.openai_api.client import VllmChatClient
from annotators.caption.backends.openai_api.settings import ClientSettings
from annotators.caption.engine import ProgramCaptioner
from annotators.caption.program import (
    DEFAULT_CLIENT,
    load_program,
    program_hash_view,
    require_clients,
)
from annotators.serving import managed_server
from settings import hashed_fields, hashed_view, parse_settings, require

MANAGED_URL = "http://managed/v1"   # stands in for the managed server's URL before it starts
_SECRET = re.compile(r"(api_?key|secret|password|authorization|bearer)", re.I)


@dataclass
class VllmSettings:
    """Settings of the vLLM captioner.

    ``client`` is passed to every chat client (ClientSettings fields: max_in_flight, timeout_s,
    max_retries, image_max_pixels, ...). ``clients`` adds named clients for steps that set
    ``client:``; each entry overrides the default client's settings (model, endpoints, ...).
    ``server`` starts a managed server (annotators.serving.managed_server.ServerSettings);
    clients without their own endpoints then talk to it.
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
        require_clients(load_program(self.program), self.clients)
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


def scrub_secrets(value: Any) -> Any:
    """``value`` without any mapping entry whose name looks like a credential."""
    if isinstance(value, dict):
        return {k: scrub_secrets(v) for k, v in value.items() if not _SECRET.search(str(k))}
    if isinstance(value, list):
        return [scrub_secrets(v) for v in value]
    return value


class VllmCaptioner(ProgramCaptioner):
    """Runs a caption program against vLLM server(s); see the module docstring."""

    name = "vllm"
    version = "1"
    Settings = VllmSettings

    def __init__(self, settings: Mapping[str, Any] | None = None, where: str = "") -> None:
        super().__init__(settings, where)
        self.clients: dict[str, VllmChatClient] = {}  # type: ignore[assignment]
        # the managed server: this process's own, or a handle on the machine's shared one
        self.server: managed_server.ManagedServer | managed_server.shared.SharedServerHandle \
            | None = None
        self._server_url: str | None = None       # the URL the clients were built for

    def setup(self) -> None:
        """Start the managed server (if configured) and one chat client per client name."""
        if self.settings.server is not None and self.server is None:
            settings = parse_settings(managed_server.ServerSettings, self.settings.server, "server")
            self.server = managed_server.acquire(settings)
        self._server_url = None if self.server is None else self.server.base_url
        super().setup()

    def new_client(self, name: str) -> VllmChatClient:
        where = "client" if name == DEFAULT_CLIENT else f"clients.{name}"
        return VllmChatClient(self.settings.client_values(name, self._server_url), where)

    def client_settings(self, name: str) -> ClientSettings:
        return parse_settings(ClientSettings, self.settings.client_values(name, MANAGED_URL), name)

    def teardown(self) -> None:
        """Close the clients and give back the managed server."""
        super().teardown()
        server, self.server = self.server, None
        if server is not None:
            managed_server.release(server)

    def step_context(self, client: str) -> dict[str, Any]:
        """The ``ProgramCaptioner`` context, credentials left out, plus the managed server's
        command (which model answers) for the clients that talk to it."""
        context = super().step_context(client)
        context["client"] = scrub_secrets(context["client"])
        if self.settings.server is not None and \
                self.settings.client_values(client, MANAGED_URL)["endpoints"] == [MANAGED_URL]:
            context["server"] = hashed_view(
                parse_settings(managed_server.ServerSettings, self.settings.server, "server"))
        return context

    def build_provenance(self) -> dict[str, Any]:
        """Name, version, model, program id/version/hash, visual prompts, client settings.

        Only the name of the API key's environment variable is a setting; it and anything else
        that looks like a credential is left out.
        """
        clients = {}
        for name in self.client_names():
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
                "models": models, **self.program_provenance(), "clients": clients,
                "managed_server": self.settings.server is not None}

    def caption_batch(self, items: list[CaptionInput]) -> list[CaptionResult]:
        if not self.clients:
            self.setup()
        if self.server is not None:
            self.server.ensure_running()
            if self.server.base_url != self._server_url:
                # a shared server whose owner process ended was started again elsewhere
                ProgramCaptioner.teardown(self)
                self.setup()
        return super().caption_batch(items)
