"""A model server (e.g. vLLM) started, watched and stopped by the pipeline itself.

``ManagedServer`` runs a configured command in its own process group, waits until its HTTP API
answers, restarts it if it dies (a bounded number of times) and stops the whole process group
(SIGTERM, then SIGKILL after a grace period). The server's output goes to a log file, never to
the pipeline's output.

The server must never outlive the pipeline:

* Linux parent-death signal (``processes.dying_with_parent``): the child gets SIGTERM when the
  thread that started it ends. That thread is a module-level spawn thread that lives as long as
  the interpreter (Beam runs ``DoFn.setup`` in pool threads that may end earlier, which would
  kill the server too soon).
* A module-level registry and an ``atexit`` hook stop every server still running; the pipeline
  driver also calls ``stop_all()`` in a ``finally``. Every server also leaves a record (see
  ``annotators.serving.processes``), so the driver's ``stop_all()`` stops servers started by its
  worker processes too, and only those.

``acquire``/``release`` share one server among everyone on the machine that asks for the same
server (command, environment, port): the DoFn instances of a process and the SDK processes of a
machine (Dataflow: one per vCPU; ``--workers N`` locally). The first process to ask owns the
server; the others reach it through ``apache_beam.utils.multi_process_shared`` and keep their own
HTTP clients pointed at its URL (``annotators.serving.shared``). ``share_across_processes:
false`` keeps one server per process.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import logging
import os
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar, Mapping

from annotators.serving import processes, shared
from settings import parse_settings, require, stable_hash
from settings.secrets import mask_secrets

log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """The managed server could not be started, did not become ready, or died too often."""


@dataclass
class ServerSettings:
    """How to run a managed model server.

    ``command`` is an argv list; ``{port}`` and ``{host}`` inside its items are filled in (port 0
    means a free port, chosen once and kept across restarts so clients stay pointed at it).
    """

    command: list[str]
    port: int = 0
    host: str = "127.0.0.1"
    api_path: str = "/v1"                 # the OpenAI base URL is http://HOST:PORT<api_path>
    ready_paths: list[str] = field(default_factory=lambda: ["/v1/models", "/health"])
    ready_timeout_s: float = 900.0        # model loading can take minutes
    poll_interval_s: float = 0.5
    max_restarts: int = 2                 # restarts after the first start; beyond -> ServerError
    stop_grace_s: float = 15.0            # SIGTERM, then SIGKILL after this long
    env: dict[str, str] = field(default_factory=dict)   # added to the inherited environment
    cwd: str | None = None
    log_path: str = ""                    # server stdout+stderr; "" -> a file in the temp dir
    # One server per machine for all SDK processes asking for the same command/env/port
    # (annotators.serving.shared); false: one per process.
    share_across_processes: bool = True

    # Lifecycle, address and logs. ``command`` stays hashed: it names the weights and the serving
    # flags (dtype, quantization, context length) that change what the model writes, while the
    # captioner's ``model`` is only the served name. ``env`` holds machine settings and
    # credentials; serving choices that change answers belong in the command.
    RUN_ONLY: ClassVar[frozenset[str]] = frozenset({
        "port", "host", "api_path", "ready_paths", "ready_timeout_s", "poll_interval_s",
        "max_restarts", "stop_grace_s", "env", "cwd", "log_path", "share_across_processes"})

    def check(self) -> None:
        """Reject values that cannot work, naming the field and the fix."""
        require(bool(self.command) and all(isinstance(a, str) for a in self.command), "command",
                "give the server's argv as a list of strings, e.g. "
                "['bash', 'tools/vllm_cpu/serve.sh', '--port', '{port}']")
        require(0 <= self.port <= 65535, "port", "must be 0 (pick a free port) or a TCP port")
        require(self.ready_timeout_s > 0, "ready_timeout_s", "must be > 0 seconds")
        require(self.poll_interval_s > 0, "poll_interval_s", "must be > 0 seconds")
        require(self.max_restarts >= 0, "max_restarts", "must be >= 0")
        require(self.stop_grace_s >= 0, "stop_grace_s", "must be >= 0 seconds")
        require(bool(self.ready_paths), "ready_paths", "give at least one path, e.g. /health")
        require(all(isinstance(v, str) for v in self.env.values()), "env",
                "values must be strings (quote numbers in YAML)")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# One long-lived thread starts every server (see the module docstring on PDEATHSIG).
_SPAWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                 thread_name_prefix="managed-server-spawn")


class ManagedServer:
    """One model server process group: start, wait for readiness, restart, stop."""

    def __init__(self, settings: ServerSettings | Mapping[str, Any], where: str = "server") -> None:
        if not isinstance(settings, ServerSettings):
            settings = parse_settings(ServerSettings, settings, where)
        self.settings: ServerSettings = settings
        self.port = settings.port
        self.restarts = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._lock = threading.RLock()
        self.log_path = settings.log_path

    def __repr__(self) -> str:
        pid = self.process.pid if self.process is not None else None
        return f"ManagedServer(port={self.port}, pid={pid}, restarts={self.restarts})"

    @property
    def base_url(self) -> str:
        """OpenAI base URL of the server, e.g. http://127.0.0.1:PORT/v1."""
        return f"http://{self.settings.host}:{self.port}{self.settings.api_path}"

    @property
    def pid(self) -> int | None:
        """Process id of the server's main process (its process group id too), if started."""
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        """True while the server's main process runs."""
        return self.process is not None and self.process.poll() is None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "ManagedServer":
        """Start the command and wait until it answers; raises ServerError if it cannot."""
        with self._lock:
            if self.alive():
                return self
            if self.port == 0:
                self.port = free_port(self.settings.host)
            self._launch()
            _register(self)
            try:
                self._wait_ready()
            except BaseException:
                self.stop()
                raise
            log.info("managed server ready at %s (pid %s, log %s)", self.base_url, self.pid,
                     self.log_path)
            return self

    def ensure_running(self) -> None:
        """Restart the server if it died; beyond ``max_restarts`` restarts raise ServerError."""
        with self._lock:
            if self.alive():
                return
            if self.process is None:
                self.start()
                return
            code = self.process.returncode
            if self.restarts >= self.settings.max_restarts:
                raise ServerError(
                    f"managed server died (exit code {code}) and was already restarted "
                    f"{self.restarts} time(s), the limit (server.max_restarts); see its log "
                    f"{self.log_path}: {self.log_tail()}")
            self.restarts += 1
            log.warning("managed server died (exit code %s); restart %d of %d", code,
                        self.restarts, self.settings.max_restarts)
            self._close_log()
            processes.forget_server(self.process.pid)
            self.process = None
            self.start()

    def stop(self) -> None:
        """Stop the whole process group: SIGTERM, SIGKILL after the grace period. Idempotent."""
        with self._lock:
            process, self.process = self.process, None
            if process is not None:
                processes.terminate_group(process, self.settings.stop_grace_s)
                processes.forget_server(process.pid)
                log.info("managed server (pid %s) stopped", process.pid)
            self._close_log()
            _unregister(self)

    # ------------------------------------------------------------ internals

    def argv(self) -> list[str]:
        """The command with {port} and {host} filled in (other braces are left alone)."""
        return [a.replace("{port}", str(self.port)).replace("{host}", self.settings.host)
                for a in self.settings.command]

    def _launch(self) -> None:
        s = self.settings
        if not self.log_path:
            fd, self.log_path = tempfile.mkstemp(prefix=f"managed-server-{self.port}-",
                                                 suffix=".log")
            os.close(fd)
        Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        env = {**os.environ, **s.env}
        argv = self.argv()
        log.info("starting managed server: %s (log %s)", " ".join(mask_secrets(argv)), self.log_path)

        def spawn() -> subprocess.Popen[bytes]:
            return subprocess.Popen(processes.dying_with_parent(argv, env, s.cwd),
                                    stdin=subprocess.DEVNULL, stdout=self._log,
                                    stderr=subprocess.STDOUT, env=env, cwd=s.cwd,
                                    start_new_session=True)

        try:
            self.process = _SPAWNER.submit(spawn).result()
        except OSError as exc:
            self._close_log()
            raise ServerError(f"server.command: cannot run {argv[0]!r}: {exc}; check the "
                              f"command and its working directory") from exc
        processes.record_server(self)

    def _wait_ready(self) -> None:
        s = self.settings
        deadline = time.monotonic() + s.ready_timeout_s
        while True:
            assert self.process is not None
            code = self.process.poll()
            if code is not None:
                raise ServerError(f"managed server exited with code {code} before it was ready; "
                                  f"see its log {self.log_path}: {self.log_tail()}")
            if self._answers():
                return
            if time.monotonic() >= deadline:
                raise ServerError(f"managed server did not answer GET {s.ready_paths} on port "
                                  f"{self.port} within {s.ready_timeout_s} s "
                                  f"(server.ready_timeout_s); see its log {self.log_path}: "
                                  f"{self.log_tail()}")
            time.sleep(s.poll_interval_s)

    def _answers(self) -> bool:
        root = f"http://{self.settings.host}:{self.port}"
        for path in self.settings.ready_paths:
            try:
                with urllib.request.urlopen(root + path, timeout=2) as response:
                    if 200 <= response.status < 300:
                        return True
            except (OSError, urllib.error.URLError, ValueError):
                continue
        return False

    def log_tail(self, chars: int = 600) -> str:
        """The last characters of the server's log (for error messages)."""
        try:
            data = Path(self.log_path).read_bytes()[-chars:]
        except OSError:
            return "(no log)"
        return repr(data.decode("utf-8", "replace"))

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


# --------------------------------------------------------------------------- registry

_RUNNING: dict[int, ManagedServer] = {}
_SHARED: dict[str, tuple[ManagedServer, int]] = {}
_REGISTRY_LOCK = threading.RLock()


def _register(server: ManagedServer) -> None:
    with _REGISTRY_LOCK:
        _RUNNING[id(server)] = server


def _unregister(server: ManagedServer) -> None:
    with _REGISTRY_LOCK:
        _RUNNING.pop(id(server), None)


def running() -> list[ManagedServer]:
    """Servers started and not yet stopped, in this process."""
    with _REGISTRY_LOCK:
        return list(_RUNNING.values())


def stop_all() -> None:
    """Stop every managed server of this process, and every server started by a process below
    it (the SDK worker processes of a local run), shared ones included. Also run at exit."""
    with _REGISTRY_LOCK:
        servers = list(_RUNNING.values())
        _SHARED.clear()
    for server in servers:
        try:
            server.stop()
        except Exception:   # keep stopping the others
            log.exception("stopping %r failed", server)
    shared.reset_hosted()
    try:
        processes.stop_started_below()
    except Exception:
        log.exception("stopping managed servers of worker processes failed")


atexit.register(stop_all)


def acquire(settings: ServerSettings) -> "ManagedServer | shared.SharedServerHandle":
    """The running server for ``settings``, started if needed (ref-counted; give it back with
    ``release``): the machine's shared one (a ``SharedServerHandle``), or with
    ``share_across_processes: false`` this process's own ``ManagedServer``."""
    if settings.share_across_processes:
        return shared.SharedServerHandle(settings).open()
    key = stable_hash(settings)
    with _REGISTRY_LOCK:
        server, users = _SHARED.get(key, (None, 0))
        if server is None:
            server = ManagedServer(settings)
        server.ensure_running()
        _SHARED[key] = (server, users + 1)
        return server


def release(server: "ManagedServer | shared.SharedServerHandle") -> None:
    """Give back a server from ``acquire``; the last user (on the machine, if shared) stops it."""
    if isinstance(server, shared.SharedServerHandle):
        server.close()
        return
    with _REGISTRY_LOCK:
        for key, (mine, users) in list(_SHARED.items()):
            if mine is server:
                if users > 1:
                    _SHARED[key] = (mine, users - 1)
                    return
                del _SHARED[key]
                break
    server.stop()


__all__ = ["ManagedServer", "ServerError", "ServerSettings", "acquire",
           "free_port", "release", "running", "stop_all"]
