"""Process groups of managed servers: started so that they die with the pipeline, stopped as a
whole, and recorded so that a driver can stop the ones its worker processes left.

* ``dying_with_parent``: a server's argv wrapped so that Linux sends it SIGTERM when the thread
  that started it ends (the parent-death signal), without ``preexec_fn`` (see below).
* ``terminate_group``: SIGTERM to the whole process group, SIGKILL after a grace period.
* Server records (``record_server``, ``forget_server``, ``stop_started_below``): every managed
  server writes a small file naming its process group and the process tree that started it, so
  that the pipeline driver's ``managed_server.stop_all()`` also stops servers started by its
  worker processes (even one whose worker was killed), and only those.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from annotators.serving.shared import RECORD_DIR

if TYPE_CHECKING:
    from annotators.serving.managed_server import ManagedServer

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


# --------------------------------------------------------------------------- process groups


# Runs first in the child: asks Linux to SIGTERM it when the thread that started it ends, then
# becomes the server (exec keeps that setting). Not a ``preexec_fn``: that makes Python fork()
# instead of vfork(), and in a Beam SDK worker gRPC's at-fork handlers then restart threads in the
# child that can abort it ("epoll_wait error: Bad file descriptor") before the server runs.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True)"
    f".prctl({_PR_SET_PDEATHSIG}, int(signal.SIGTERM), 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit('managed server: the pipeline process ended before the server started')\n"
    "os.execv(sys.argv[2], sys.argv[3:])\n"
)


def dying_with_parent(argv: list[str], env: Mapping[str, str], cwd: str | None) -> list[str]:
    """``argv`` started through ``_DIE_WITH_PARENT`` (Linux); OSError if its program cannot run.
    The program is looked up as execvp would (PATH of ``env``; a relative path from ``cwd``)."""
    if not sys.platform.startswith("linux"):
        return argv
    program = argv[0]
    if os.sep in program:
        program = os.path.join(cwd or os.getcwd(), program)
        found = program if os.path.isfile(program) and os.access(program, os.X_OK) else None
    else:
        found = shutil.which(program, path=env.get("PATH", os.defpath))
    if found is None:
        raise FileNotFoundError(errno.ENOENT, "no such executable file", argv[0])
    return [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), found, *argv]


def terminate_group(process: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the process group of ``process``, SIGKILL it after ``grace_s``, reap the leader."""
    pgid = process.pid   # start_new_session: the leader's pid is the group id
    _signal_group(pgid, signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        log.warning("managed server (pid %s) ignored SIGTERM for %.0f s; killing it",
                    process.pid, grace_s)
    _signal_group(pgid, signal.SIGKILL)   # children that outlived the leader go too
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        log.error("managed server (pid %s) did not die after SIGKILL", process.pid)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass



# --------------------------------------------------------------------------- server records


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state is [0], ppid [1], pgrp [2],
    session [3], starttime [19]); None if there is no such process or it is a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields


def _start_time(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[19] if fields else None


def _ancestors(pid: int) -> list[int]:
    """Parent, grandparent, ... of ``pid`` (up to init)."""
    out: list[int] = []
    fields = _stat(pid)
    while fields is not None and len(out) < 64:
        parent = int(fields[1])
        if parent <= 1:
            break
        out.append(parent)
        fields = _stat(parent)
    return out


def _group_alive(pgid: int) -> bool:
    """True while a live (non-zombie) process of process group ``pgid`` exists."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[2]) == pgid:
                return True
    return False


def record_server(server: ManagedServer) -> None:
    """Note a just-started server (its process group leads the group) and who started it."""
    pid = server.pid
    if pid is None:
        return
    record = {"pid": pid, "start": _start_time(pid), "owner": os.getpid(),
              "ancestors": _ancestors(os.getpid()), "grace_s": server.settings.stop_grace_s,
              "command": server.argv()[:3], "log": server.log_path}
    try:
        RECORD_DIR.mkdir(parents=True, exist_ok=True)
        tmp = RECORD_DIR / f".{pid}.json.tmp"
        tmp.write_text(json.dumps(record))
        tmp.rename(RECORD_DIR / f"{pid}.json")
    except OSError as exc:   # a record only helps a driver stop leftovers; never fail a start
        log.warning("could not record managed server %s: %s", pid, exc)


def forget_server(pid: int | None) -> None:
    """Drop the record of a stopped server."""
    if pid is not None:
        try:
            (RECORD_DIR / f"{pid}.json").unlink()
        except OSError:
            pass


def stop_started_below(root: int | None = None) -> list[int]:
    """Stop every recorded server started by ``root`` (default: this process) or by a process
    below it (its workers), whatever process owns it now; drop stale records of servers that are
    gone. Returns the process groups signalled.

    Safe against process id reuse: a group whose leader runs but is not the recorded process
    is left alone (Linux does not reuse a process id while its process group still exists).
    """
    root = os.getpid() if root is None else root
    stopped: list[int] = []
    try:
        files = list(RECORD_DIR.glob("*.json"))
    except OSError:
        return stopped
    for path in files:
        try:
            record = json.loads(path.read_text())
            pid = int(record["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        started = _start_time(pid)
        if started is not None and started != record.get("start"):
            forget_server(pid)          # the leader is gone and its id reused: nothing of ours
            continue
        ours = root == record.get("owner") or root in record.get("ancestors", [])
        if not _group_alive(pid):
            forget_server(pid)          # stale: the server is gone
            continue
        if not ours:
            continue
        log.warning("stopping managed server %s left by process %s", pid, record.get("owner"))
        _stop_group(pid, float(record.get("grace_s", 15.0)))
        stopped.append(pid)
        forget_server(pid)
    return stopped


def _stop_group(pgid: int, grace_s: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not _group_alive(pgid):
            return
