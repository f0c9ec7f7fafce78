"""One object per machine, shared by every SDK process on it.

Runners start several SDK worker processes per machine (Dataflow: one per vCPU; locally
``--workers N``: FnApiRunner's multi_processing mode). A model server or a loaded model must
exist once per machine, not once per process. This module does it the way Beam's
``RunInference`` shares large models: ``apache_beam.utils.multi_process_shared.MultiProcessShared``.

How it works
------------
* An object is keyed by a *tag* (``tag(kind, identity)``: a stable hash of what makes it
  different, e.g. a server's command, environment and port). Its lock and address files live in
  ``SHARE_DIR`` (per user, in the temp directory).
* The first process that asks for a tag builds the object (under a file lock) and serves it with
  a ``multiprocessing`` manager from a daemon thread; the others get proxies whose method calls
  run in that *owner* process. The owner calls the object directly (``always_proxy`` off), so a
  single-process run works exactly as without sharing.
* ``spawn_process`` is off on purpose: with it the object would live in an extra process that
  leaves with ``os._exit`` when its creator ends, skipping every cleanup hook. Living in the
  owner (an SDK worker), the object's resources go with it: ``atexit`` hooks run and a managed
  server's parent-death signal fires when the owner ends.
* ``MachineShared`` is one process's handle. When the owner process is gone (its worker ended
  or crashed) a call fails with a connection error; the handle then takes the object over: the
  stale address file is dropped, this process becomes the new owner, and the call is repeated.

Managed servers (``SharedServer``, ``SharedServerHandle``): only the server is shared (process
handle, port, readiness, restarts, stop); every process keeps its own HTTP client pointed at the
shared server's URL. The owner counts users per process; the last ``detach`` stops the server.
Two runs on one machine asking for the same server share it as well; when the owner's run ends,
the other run's next batch takes the server over (it starts again, on a new port if the port
was chosen freely, and the clients follow).

In-process models (``SharedModel``, opt-in per annotator with ``share_across_processes``): the
owner process builds the annotator and loads its model; the batch calls of every process run
there, one at a time.

Every managed server also leaves a record in ``RECORD_DIR`` (``annotators.serving.processes``),
so that the pipeline driver can stop the servers its worker processes started.

(A little over 400 lines: the generic handle and its two uses stay together, so that the
ownership and take-over rules above are read in one place.)
"""
from __future__ import annotations

import atexit
import functools
import logging
import os
import tempfile
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from settings import stable_hash

if TYPE_CHECKING:
    from annotators.serving.managed_server import ServerSettings

log = logging.getLogger(__name__)

SHARE_DIR = Path(tempfile.gettempdir()) / f"multigran-shared-{os.getuid()}"
RECORD_DIR = SHARE_DIR / "servers"

# A proxy call whose owner process is gone fails with one of these.
_OWNER_LOST = (EOFError, ConnectionError)
_ATTEMPTS = 3


def tag(kind: str, identity: Any) -> str:
    """The machine-wide key of a shared object: ``kind`` and a stable hash of ``identity``."""
    return f"{kind}-{stable_hash(identity)}"


# --------------------------------------------------------------------------- generic handle


class MachineShared:
    """This process's handle on the machine's one object for ``tag``.

    ``constructor`` must be cheap and must not fail for a transient reason (it runs while the
    other processes wait on the file lock); do slow work in a method. ``on_acquire(obj)`` runs
    after every (re)acquisition, e.g. to register this process as a user.
    """

    def __init__(self, constructor: Callable[[], Any], tag: str,
                 on_acquire: Callable[[Any], Any] | None = None) -> None:
        self.constructor = constructor
        self.tag = tag
        self.on_acquire = on_acquire
        self._shared: Any = None
        self._obj: Any = None
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"MachineShared({self.tag}, connected={self._obj is not None})"

    def acquire(self) -> Any:
        """The shared object (a direct reference in its owner, a proxy elsewhere)."""
        with self._lock:
            for attempt in range(_ATTEMPTS):
                if self._obj is not None:
                    break
                try:
                    self._open()
                except _OWNER_LOST as exc:   # the owner ended while we connected
                    if attempt + 1 == _ATTEMPTS:
                        raise
                    log.info("shared %s: owner went away while connecting (%s); again",
                             self.tag, exc)
            return self._obj

    def call(self, method: str, *args: Any) -> Any:
        """``obj.method(*args)``; if the owner process is gone, take the object over and retry."""
        obj = self.acquire()
        try:
            return getattr(obj, method)(*args)
        except _OWNER_LOST as exc:
            log.warning("shared %s: its owner process is gone (%s: %s); taking it over",
                        self.tag, type(exc).__name__, exc)
            with self._lock:
                if self._obj is obj:
                    self._obj = self._shared = None
            return getattr(self.acquire(), method)(*args)

    def release(self) -> None:
        """Give back this process's reference (the object stays with its owner)."""
        with self._lock:
            obj, shared = self._obj, self._shared
            self._obj = self._shared = None
        if obj is not None:
            try:
                shared.release(obj)
            except _OWNER_LOST:
                pass
            except Exception:   # releasing must never hide the caller's own error
                log.debug("shared %s: release failed", self.tag, exc_info=True)

    def _open(self) -> None:
        from apache_beam.utils.multi_process_shared import MultiProcessShared

        SHARE_DIR.mkdir(parents=True, exist_ok=True)
        shared = MultiProcessShared(self.constructor, tag=self.tag, path=str(SHARE_DIR),
                                    always_proxy=False, spawn_process=False)
        obj = shared.acquire()
        _forget_address_at_exit(shared, SHARE_DIR / f"{self.tag}.address")
        self._shared, self._obj = shared, obj
        if self.on_acquire is not None:
            try:
                self.on_acquire(obj)
            except BaseException:
                self._obj = self._shared = None
                try:
                    shared.release(obj)
                except Exception:
                    pass
                raise


def _forget_address_at_exit(shared: Any, address_file: Path) -> None:
    """In the owner: remove the address file at exit (if it is still ours), so the next process
    asking for the tag builds the object at once instead of first failing to connect."""
    server = getattr(shared, "_server", None)   # set only where this handle built the object
    address = getattr(server, "address", None)
    if not address:
        return
    mine = "%s:%d" % tuple(address)

    def forget() -> None:
        try:
            if address_file.read_text() == mine:
                address_file.unlink()
        except OSError:
            pass

    atexit.register(forget)


def _count_in(users: dict[int, int], pid: int) -> None:
    """One more handle of process ``pid`` uses the object."""
    users[pid] = users.get(pid, 0) + 1


def _count_out(users: dict[int, int], pid: int) -> bool:
    """One handle of process ``pid`` less; True when nobody uses the object any more."""
    left = users.get(pid, 0) - 1
    if left > 0:
        users[pid] = left
    else:
        users.pop(pid, None)
    return not users


class _UserHandle:
    """This process as a counted user of a machine-wide object: counted in (``attach``) on
    every (re)acquisition, counted out (``detach``) by ``close``."""

    def __init__(self, constructor: Callable[[], Any], tag: str) -> None:
        self.tag = tag
        self._attached = False
        self._shared = MachineShared(constructor, tag, on_acquire=self._attach)

    def _attach(self, obj: Any) -> None:
        self._attached_as(obj.attach(os.getpid()))
        self._attached = True

    def _attached_as(self, answer: Any) -> None:
        """What ``attach`` answered (e.g. the server's URL)."""

    def open(self) -> Any:
        """Attach, building the object (here or in its owner) if needed."""
        self._shared.acquire()
        return self

    def close(self) -> None:
        """Count this user out (the last one stops or unloads the object) and drop the
        reference."""
        if self._attached:
            self._attached = False
            try:
                self._shared.acquire().detach(os.getpid())
            except _OWNER_LOST:
                pass   # the owner ended, and its object with it
        self._shared.release()


# --------------------------------------------------------------------------- managed servers

_HOSTED: "weakref.WeakSet[SharedServer]" = weakref.WeakSet()


class SharedServer:
    """The machine's managed server; lives in its owner process (see the module docstring)."""

    def __init__(self, settings: "ServerSettings") -> None:
        from annotators.serving.managed_server import ManagedServer

        self.server: ManagedServer = ManagedServer(settings)
        self.users: dict[int, int] = {}            # process id -> attached handles
        self._lock = threading.RLock()
        _HOSTED.add(self)

    def attach(self, pid: int) -> str:
        """Count a user in, start the server if it is not running; returns its base URL."""
        with self._lock:
            self.server.ensure_running()
            _count_in(self.users, pid)
            return self.server.base_url

    def detach(self, pid: int) -> int:
        """Count a user out; the last one stops the server. Returns the users left."""
        with self._lock:
            if _count_out(self.users, pid):
                self.server.stop()
            return sum(self.users.values())

    def ensure_running(self) -> str:
        """Restart the server if it died (ServerError beyond max_restarts); its base URL."""
        self.server.ensure_running()
        return self.server.base_url

    def status(self) -> dict[str, Any]:
        """Plain facts for handles in other processes."""
        server = self.server
        return {"pid": server.pid, "port": server.port, "alive": server.alive(),
                "restarts": server.restarts, "base_url": server.base_url,
                "log_path": server.log_path, "owner": os.getpid(), "users": dict(self.users)}

    def stop(self) -> None:
        """Stop the server now, whoever still uses it; the user count starts over."""
        with self._lock:
            self.users.clear()
            self.server.stop()


def reset_hosted() -> None:
    """Forget the user counts of the shared servers this process owns (their servers were just
    stopped by ``managed_server.stop_all``; a later user starts them again)."""
    for shared in list(_HOSTED):
        shared.users.clear()


def _new_shared_server(settings: "ServerSettings") -> SharedServer:
    return SharedServer(settings)


def server_identity(settings: "ServerSettings") -> dict[str, Any]:
    """What makes two managed servers different processes (the rest is how they are managed)."""
    return {"command": list(settings.command), "env": dict(settings.env), "port": settings.port,
            "host": settings.host, "api_path": settings.api_path, "cwd": settings.cwd}


class SharedServerHandle(_UserHandle):
    """One process's use of the machine's shared managed server.

    Quacks like the parts of ``ManagedServer`` a captioner uses (``base_url``, ``pid``,
    ``ensure_running``, ``alive``); ``close()`` counts this user out.
    """

    def __init__(self, settings: "ServerSettings") -> None:
        self.settings = settings
        self.base_url = ""
        super().__init__(functools.partial(_new_shared_server, settings),
                         tag("managed-server", server_identity(settings)))

    def __repr__(self) -> str:
        return f"SharedServerHandle({self.tag}, {self.base_url or 'not started'})"

    def _attached_as(self, answer: Any) -> None:
        self.base_url = answer

    def ensure_running(self) -> str:
        """Restart the server if it died; take it over if its owner process ended. Its URL
        (it changes only when a new owner had to start it on a new free port)."""
        self.base_url = self._shared.call("ensure_running")
        return self.base_url

    def status(self) -> dict[str, Any]:
        """pid, port, alive, restarts, base_url, log_path, owner (process id), users."""
        return self._shared.call("status")

    @property
    def pid(self) -> int | None:
        return self.status()["pid"]

    @property
    def port(self) -> int:
        return self.status()["port"]

    @property
    def restarts(self) -> int:
        return self.status()["restarts"]

    @property
    def log_path(self) -> str:
        return self.status()["log_path"]

    def alive(self) -> bool:
        return bool(self.status()["alive"])

    def stop(self) -> None:
        """Stop the shared server now, for every process using it."""
        self._shared.call("stop")


# --------------------------------------------------------------------------- in-process models


class _ModelHost:
    """An annotator with its model loaded, in its owner process. Calls run one at a time (one
    device, and a model's per-image state is not thread-safe)."""

    def __init__(self, cls: type, settings: dict[str, Any], where: str) -> None:
        self.cls, self.settings, self.where = cls, settings, where
        self.annotator: Any = None
        self.users: dict[int, int] = {}
        self.loads = 0
        self._lock = threading.RLock()

    def _loaded(self) -> Any:
        if self.annotator is None:
            annotator = self.cls(self.settings, self.where)
            annotator.setup()
            self.annotator = annotator
            self.loads += 1
        return self.annotator

    def attach(self, pid: int) -> None:
        """Count a user in; load the model if it is not loaded."""
        with self._lock:
            self._loaded()
            _count_in(self.users, pid)

    def detach(self, pid: int) -> None:
        """Count a user out; the last one unloads the model."""
        with self._lock:
            if _count_out(self.users, pid) and self.annotator is not None:
                annotator, self.annotator = self.annotator, None
                annotator.teardown()

    def run(self, method: str, *args: Any) -> Any:
        """``annotator.method(*args)`` on the loaded model."""
        with self._lock:
            return getattr(self._loaded(), method)(*args)

    def status(self) -> dict[str, Any]:
        return {"owner": os.getpid(), "users": dict(self.users), "loads": self.loads,
                "loaded": self.annotator is not None}


class SharedModel(_UserHandle):
    """One process's use of the machine's one copy of an annotator and its model.

    The owner process builds the annotator from the same settings (with sharing off) and loads
    it; batch calls from every process run there, one at a time, their inputs and outputs
    pickled across. Opt in with an annotator setting ``share_across_processes: true`` (worth it
    on a GPU, where each process would otherwise hold its own copy of the weights).
    """

    def __init__(self, annotator: Any, where: str) -> None:
        import dataclasses

        cls = type(annotator)
        settings = {**dataclasses.asdict(annotator.settings), "share_across_processes": False}
        identity = {"class": f"{cls.__module__}.{cls.__qualname__}", "settings": settings}
        super().__init__(functools.partial(_ModelHost, cls, settings, where),
                         tag("model", identity))

    def __repr__(self) -> str:
        return f"SharedModel({self.tag})"

    def call(self, method: str, *args: Any) -> Any:
        """``method(*args)`` of the owner's annotator (e.g. ``segment_batch``)."""
        return self._shared.call("run", method, *args)

    def status(self) -> dict[str, Any]:
        """owner (process id), users, loads (how often the owner loaded the model), loaded."""
        return self._shared.call("status")



__all__ = ["MachineShared", "RECORD_DIR", "SHARE_DIR", "SharedModel", "SharedServer",
           "SharedServerHandle", "reset_hosted", "server_identity", "tag"]
