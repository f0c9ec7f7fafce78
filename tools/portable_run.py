"""Run the dataset build on Beam's portable runner, with external SDK worker processes.

    python tools/portable_run.py [--sdk-workers N] [--report FILE] -- BUILD_ARGS...
    make build-dataset-portable INPUT=... OUTPUT=... [CONFIG=...] [SDK_WORKERS=2] [ARGS=...]

The portable path is what Flink, Spark and Dataflow Runner v2 run: the pipeline is translated to
its portable proto, submitted to a job service over the Job API, and every bundle runs in SDK
worker processes that the runner asks a worker pool to start (environment EXTERNAL). Here:

1. a worker pool, ``python -m apache_beam.runners.worker.worker_pool_main --service_port=PORT``,
   starts on a free port with this interpreter's ``bin`` first on PATH (the pool starts each
   worker as a bare ``python``), in its own process group; we wait until it listens;
2. a local job service starts in this process. It is Beam's own (the one behind
   ``--job_endpoint=embed``) except that it runs each job on N SDK workers: Beam's embedded job
   service always uses exactly one, whatever ``--sdk_worker_parallelism`` or
   ``--direct_num_workers`` say (both are honoured only by other runners);
3. the build runs as ``python -m pipelines.build_dataset BUILD_ARGS --runner=PortableRunner
   --job_endpoint=localhost:JOB_PORT --environment_type=EXTERNAL
   --environment_config=localhost:POOL_PORT --sdk_worker_parallelism=N``;
4. whatever happens (success, failure, Ctrl-C, SIGTERM), the job service and the whole pool
   process group (pool and workers) are stopped; a process still there after SIGTERM gets
   SIGKILL.

Exit status: the build's (0 ok, 1 failed run, 2 bad settings); 1 if the pool never came up or a
process survived SIGKILL; 130 / 143 / 129 when stopped by SIGINT / SIGTERM / SIGHUP. If this
process is killed outright (SIGKILL), the pool still gets SIGTERM at once and its workers exit when
their connection to the runner breaks. At the end it prints the SDK worker processes it saw (pid
and CPU seconds); ``--report FILE`` writes that, the ports and any leftover process as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
POOL_MODULE = "apache_beam.runners.worker.worker_pool_main"
OWN_FLAGS = ("--runner", "--job_endpoint", "--environment_type", "--environment_config",
             "--sdk_worker_parallelism")
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def log(message: str) -> None:
    print(f"[portable] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("localhost", port), timeout=0.5):
            return True
    except OSError:
        return False


def _die_with_parent() -> None:
    """In the pool's child process: SIGTERM when this process dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except Exception:   # not Linux: the finally block and signal handlers still stop the pool
        pass


# ------------------------------------------------------------------------------ processes
def _stat(pid: int) -> tuple[int, int, float] | None:
    """(ppid, pgid, cpu seconds) of a process, from /proc; None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # after the command: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
    return int(fields[1]), int(fields[2]), (int(fields[11]) + int(fields[12])) / CLK_TCK


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(text[2]) == pgid and text[0] != "Z":
                found.append(int(entry.name))
    return found


class WorkerWatch(threading.Thread):
    """Samples the pool's child processes (the SDK workers) and their CPU time while the build runs."""

    def __init__(self, pool_pid: int) -> None:
        super().__init__(daemon=True)
        self.pool_pid = pool_pid
        self.cpu: dict[int, float] = {}
        self.done = threading.Event()

    def sample(self) -> None:
        if not Path("/proc").is_dir():
            return
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                stat = _stat(int(entry.name))
                if stat is not None and stat[0] == self.pool_pid:
                    self.cpu[int(entry.name)] = max(stat[2], self.cpu.get(int(entry.name), 0.0))

    def run(self) -> None:
        while not self.done.wait(0.5):
            self.sample()


class WorkerPool:
    """``worker_pool_main`` on a free port, in its own process group; ``stop()`` ends the group."""

    def __init__(self, log_path: Path, attempts: int = 5, ready_timeout_s: float = 60.0) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.port = 0
        bin_dir = os.path.dirname(sys.executable)
        if not os.access(os.path.join(bin_dir, "python"), os.X_OK):
            raise RuntimeError(f"no 'python' next to {sys.executable}: the pool starts workers as "
                               f"'python', so run this with a virtualenv's python")
        env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
        for _ in range(attempts):
            self.port = free_port()
            with open(log_path, "ab") as out:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", POOL_MODULE, f"--service_port={self.port}"],
                    cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True, preexec_fn=_die_with_parent)
            deadline = time.monotonic() + ready_timeout_s
            while self.proc.poll() is None and time.monotonic() < deadline:
                if listening(self.port):
                    return
                time.sleep(0.1)
            self.stop()   # exited (port taken since we picked it) or never listened: next port
        raise RuntimeError(f"the worker pool did not start; its log: {log_path}")

    def stop(self, grace_s: float = 10.0) -> list[int]:
        """SIGTERM the pool's process group, SIGKILL what is left; returns pids that survived both."""
        if self.proc is None:
            return []
        pgid = self.proc.pid

        def alive() -> bool:
            return self.proc.poll() is None or bool(group_members(pgid))

        for sig, grace in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            if not alive():
                break
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while alive() and time.monotonic() < deadline:
                time.sleep(0.1)
        return group_members(pgid)


# ---------------------------------------------------------------------------- job service
def start_job_service(sdk_workers: int) -> tuple[Any, int]:
    """Beam's local job service, running each job with ``sdk_workers`` SDK workers."""
    from apache_beam.portability.api import beam_job_api_pb2
    from apache_beam.runners.portability import local_job_service
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    class ParallelJob(local_job_service.BeamJob):
        def _invoke_runner(self):   # as BeamJob's, with N workers per environment
            self.set_state(beam_job_api_pb2.JobState.RUNNING)
            runner = fn_runner.FnApiRunner(provision_info=self._provision_info)
            if not hasattr(runner, "_num_workers"):
                raise RuntimeError("this Beam's FnApiRunner has no _num_workers; tools/portable_run.py "
                                   "was written for Beam 2.77")
            runner._num_workers = sdk_workers
            return runner.run_via_runner_api(self._pipeline_proto, self.pipeline_options())

    service = local_job_service.LocalJobServicer(beam_job_type=ParallelJob)
    return service, service.start_grpc_server(0)


# ---------------------------------------------------------------------------------- main
class Stop(Exception):
    """SIGTERM / SIGHUP: unwind through the finally blocks."""


def _on_signal(signum: int, _frame: Any) -> None:
    raise Stop(signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s [--sdk-workers N] [--report FILE] -- BUILD_ARGS...")
    parser.add_argument("--sdk-workers", type=int, default=2, help="SDK worker processes (default 2)")
    parser.add_argument("--report", type=Path, help="write ports, worker processes and leftovers as JSON")
    parser.add_argument("--log-dir", type=Path, help="keep the worker pool's log here (default: a temporary "
                                                     "folder, deleted unless something fails)")
    parser.add_argument("build_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    build_args = args.build_args[1:] if args.build_args[:1] == ["--"] else args.build_args
    if args.sdk_workers < 1:
        parser.error("--sdk-workers: must be at least 1")
    clash = [a for a in build_args if a.split("=", 1)[0] in OWN_FLAGS]
    if clash:
        parser.error(f"{' '.join(clash)}: set by this tool (use --sdk-workers for the parallelism)")

    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="portable-run-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    pool_log = log_dir / "worker_pool.log"
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)

    report: dict[str, Any] = {"sdk_workers": args.sdk_workers, "pool_log": str(pool_log)}
    rc = 1
    pool = job_service = build = watch = None
    try:
        pool = WorkerPool(pool_log)
        report.update(pool_port=pool.port, pool_pid=pool.proc.pid)
        log(f"worker pool listening on localhost:{pool.port} (pid {pool.proc.pid})")
        job_service, job_port = start_job_service(args.sdk_workers)
        report["job_port"] = job_port
        command = [sys.executable, "-m", "pipelines.build_dataset", *build_args,
                   "--runner=PortableRunner", f"--job_endpoint=localhost:{job_port}",
                   "--environment_type=EXTERNAL", f"--environment_config=localhost:{pool.port}",
                   f"--sdk_worker_parallelism={args.sdk_workers}"]
        report["command"] = command
        log(f"job service on localhost:{job_port}; running the build on {args.sdk_workers} SDK workers")
        watch = WorkerWatch(pool.proc.pid)
        watch.start()
        build = subprocess.Popen(command, cwd=REPO)
        rc = build.wait()
    except KeyboardInterrupt:
        log("interrupted")
        rc = 130
    except Stop as exc:
        log(f"stopped by signal {exc.args[0]}")
        rc = 128 + int(exc.args[0])
    except RuntimeError as exc:
        log(f"error: {exc}")
        rc = 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)   # cleanup is not interrupted
        if build is not None and build.poll() is None:
            build.terminate()
            try:
                build.wait(timeout=20)
            except subprocess.TimeoutExpired:
                build.kill()
                build.wait()
        if watch is not None:
            watch.sample()
            watch.done.set()
        if job_service is not None:
            job_service.stop()
        leftover = pool.stop() if pool is not None else []
        workers = sorted((watch.cpu if watch is not None else {}).items())
        report.update(build_rc=rc, leftover=leftover,
                      worker_processes=[{"pid": pid, "cpu_s": round(cpu, 2)} for pid, cpu in workers])
        log(f"{len(workers)} SDK worker processes: "
            + (", ".join(f"pid {pid} ({cpu:.1f} s CPU)" for pid, cpu in workers) or "none seen"))
        if leftover:
            log(f"processes still running after SIGKILL: {leftover}")
            rc = rc or 1
        log("worker pool stopped" + ("" if leftover else ", no process left"))
        if args.report:
            args.report.write_text(json.dumps(report, indent=2))
        if rc == 0 and args.log_dir is None:
            import shutil

            shutil.rmtree(log_dir, ignore_errors=True)
        elif rc != 0:
            log(f"worker pool log: {pool_log}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
