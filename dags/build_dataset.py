"""Airflow DAG `build_dataset`: build → validate → publish, each a run of the project's own code.

- **build** first checks the trigger (below) and the settings (`--print-config`): either failing
  fails the task at once, with no retry. Then it runs `python -m pipelines.build_dataset --input …
  --output … [--config …] [extra args] [the deployment's Beam flags]` with the deployment's
  interpreter (`MULTIGRAN_PYTHON`, the one `make build-dataset` uses), so the DAG and Airflow's
  environment never share packages with Beam. When the Apache Beam provider
  (`apache-airflow-providers-apache-beam`, with the Google provider for Dataflow) is installed,
  the build goes through its `BeamRunPythonPipelineOperator` (`py_file` = the module, run with
  `-m` by the same interpreter; `extra_args` become its pipeline options, `--runner` its runner):
  Beam logs in the task log and, on Dataflow, the job link and cancellation on kill. Without the
  provider it runs the command itself. `MULTIGRAN_BEAM_OPERATOR` picks another operator class
  (`module:Class`, same keyword arguments), or `none` for the command;
- **validate** runs `python -m pipelines.validate OUTPUT` (exit 1 on any problem fails the run);
- **publish** checks `manifest.json` (inputs = written + failed, at least one record) and copies
  `index/`, the `README.md` card and `manifest.json` into `publish_dir`, verifying each copy by
  sha256; the manifest is written last, so a publish folder with a manifest is complete.

Manual trigger only (no schedule). A trigger names data and sizes, given as DAG params with its
configuration (`airflow dags trigger build_dataset -c '{"input": "/data/images"}'` or
`airflow dags test build_dataset -c '{…}'`); a param left out takes the value of its environment
variable, else the fallback:

| param | variable, fallback | meaning |
|---|---|---|
| `input` | `MULTIGRAN_INPUT`, `samples` | `--input`: dir, glob, manifest, tars, `samples`, `synthetic://N` |
| `output` | `MULTIGRAN_OUTPUT`, `out/dataset` | output directory |
| `config` | `MULTIGRAN_CONFIG`, empty | settings YAML; empty: the embedded defaults |
| `extra_args` | `MULTIGRAN_EXTRA_ARGS`, empty | more build flags, shell-quoted (`--workers 2`, some of Beam's) |
| `publish_dir` | `MULTIGRAN_PUBLISH_DIR`, `out/published` | where the index, card and manifest are copied |

What runs and where files may go is the deployment's (environment variables of the Airflow
workers, read when a task runs; roots are comma-separated local folders or URI prefixes such as
`gs://bucket/data`, `gs://` for a whole scheme):

| variable | fallback | meaning |
|---|---|---|
| `MULTIGRAN_PYTHON` | `.venv/bin/python` | the project's interpreter (`make venv` creates it) |
| `MULTIGRAN_INPUT_ROOTS` | the repository | where `input` may read |
| `MULTIGRAN_OUTPUT_ROOTS` | `out` | where `output`, `--temp_location`, `--staging_location` may be |
| `MULTIGRAN_CONFIG_ROOTS` | `configs` | where `config` may be (a settings file can start a server command) |
| `MULTIGRAN_PUBLISH_ROOT` | `out` | the local folder `publish_dir` must lie in |
| `MULTIGRAN_BEAM_ARGS` | empty | Beam flags added to every build, unchecked (worker image, job endpoint) |

The build task refuses a trigger (no retry; the message names the param and the fix) whose
configuration has a key that is not a param (`python` included); whose `input`, `output`,
`config` or `publish_dir` resolves (`..` and symlinks followed) outside its roots, or whose
`publish_dir` lies in `output`; or whose `extra_args` hold anything but the pipeline's own flags
(read from its parser) other than `--input`/`--output`/`--config`/`--print-config`, and the Beam
flags of `run_request.BEAM_FLAGS` (`--runner` (a known runner), `--project`, `--region`,
`--job_name`, `--machine_type`, `--experiments`, `--num_workers`, `--max_num_workers`,
`--disk_size_gb`, `--direct_num_workers`, `--direct_running_mode`, `--parallelism`,
`--temp_location`, `--staging_location`) not already in `MULTIGRAN_BEAM_ARGS`, each value one
plain token: no shell metacharacters, spaces, newlines or leading `-`. Flags that choose the
code or identity a job runs with (`--setup_file`, `--sdk_container_image`, `--environment_type`,
`--job_endpoint`, …) come only from `MULTIGRAN_BEAM_ARGS`. `samples` and `synthetic://N` inputs
read nothing and always pass. Validate and publish check the paths again before using them.

Relative paths are relative to the repository root, which is also the working directory of
the build and validate commands; the commands get them resolved. Publishing copies local files
only; build and validate take any Beam filesystem path under a root.

Retries and timeouts, per task (environment variables read when the DAG is parsed):

| task | retries | retry delay | timeout |
|---|---|---|---|
| build | `MULTIGRAN_BUILD_RETRIES`, 2 (a rerun redoes only unfinished shards) | 5 min, doubling | `MULTIGRAN_BUILD_TIMEOUT_H`, 24 h |
| validate | 1 | 1 min | 2 h |
| publish | 2 | 1 min | 30 min |

Bad settings (exit status 2) fail the run without retries.

Only the standard library, Airflow and dags/run_request.py (standard library only) are imported
here, so the file parses in milliseconds.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shlex
import shutil
import subprocess
from collections import deque
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Param, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from run_request import (Deployment, Request, RequestRefused, build_command, check_extra_args,
                         check_request, pipeline_flags, validate_command)

LOG = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
# What publish copies, relative to the output directory: the per-shard index and failures files,
# then the card, and manifest.json last on purpose.
PUBLISHED_DIRS = ("index/images", "index/regions", "failures")
PUBLISHED_FILES = ("README.md", "manifest.json")
BAD_SETTINGS = 2          # the pipeline's exit status for bad settings: retrying cannot help
BEAM_OPERATOR = "airflow.providers.apache.beam.operators.beam:BeamRunPythonPipelineOperator"
LOCAL_RUNNER = "FnApiRunner"


def published_names(source: Path) -> list[str]:
    """Relative paths publish copies from ``source``, in copy order."""
    tables = sorted(p.relative_to(source).as_posix() for folder in PUBLISHED_DIRS
                    for p in (source / folder).glob("*.parquet"))
    return tables + list(PUBLISHED_FILES)


def _default(name: str, fallback: str) -> str:
    """A param default: the environment variable ``MULTIGRAN_<NAME>``, else ``fallback``."""
    return os.environ.get(f"MULTIGRAN_{name.upper()}", fallback)


def _request(check_args: bool = False) -> tuple[Request, Deployment]:
    """The running DAG run's trigger, checked against the deployment (extra_args too when
    ``check_args``: only the build passes them on); a refusal fails the task without retries."""
    params = dict(get_current_context()["params"])
    deployment = Deployment.from_env()
    try:
        request = check_request(params, PARAMS, deployment)
        if check_args:
            flags = pipeline_flags(deployment.interpreter())
            extra = check_extra_args(params["extra_args"] or "", flags, deployment)
            request = replace(request, extra_args=extra)
    except RequestRefused as exc:
        raise AirflowFailException(f"trigger refused: {exc}") from None
    return request, deployment


def run_logged(command: list[str], tail: int = 40) -> None:
    """Run ``command`` in the repository root, logging its output line by line.

    Raises AirflowFailException (no retry) when it exits with ``BAD_SETTINGS``, RuntimeError
    with the last ``tail`` lines on any other non-zero exit.
    """
    LOG.info("running: %s", shlex.join(command))
    last: deque[str] = deque(maxlen=tail)
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, text=True, errors="replace") as process:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            last.append(line)
            LOG.info("%s", line)
    if process.returncode != 0:
        message = f"{shlex.join(command)} exited with {process.returncode}:\n" + "\n".join(last)
        raise (AirflowFailException if process.returncode == BAD_SETTINGS else RuntimeError)(message)


def beam_operator() -> type | None:
    """The operator class the build runs through, or None to run the command itself.

    ``MULTIGRAN_BEAM_OPERATOR`` (``module:Class`` or ``none``), else the Apache Beam provider's
    ``BeamRunPythonPipelineOperator`` when it imports (it does not without the Google provider).
    """
    spec = os.environ.get("MULTIGRAN_BEAM_OPERATOR", BEAM_OPERATOR)
    if spec.lower() in ("", "none"):
        return None
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as exc:   # not installed, or unusable in this environment
        if spec != BEAM_OPERATOR:
            raise
        LOG.debug("Apache Beam provider not usable (%s); the build runs its command", exc)
        return None


def beam_pipeline(request: Request, deployment: Deployment) -> tuple[str, dict[str, Any]]:
    """(runner, pipeline options) of the build for the Beam operator: the flags of
    ``build_command`` as a dict (``--k v`` / ``--k=v`` → k: v, a bare ``--k`` → True, a
    repeated flag → a list)."""
    options: dict[str, Any] = {"input": request.input, "output": request.output}
    if request.config:
        options["config"] = request.config
    args = list(request.extra_args) + list(deployment.beam_args)
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--"):
            raise ValueError(f"extra_args: expected --flag, got {token!r}")
        name, eq, value = token[2:].partition("=")
        if not eq:
            value = True
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
        if name in options:
            previous = options[name]
            options[name] = (previous if isinstance(previous, list) else [previous]) + [value]
        else:
            options[name] = value
        i += 1
    return str(options.pop("runner", LOCAL_RUNNER)), options


def check_settings(request: Request, deployment: Deployment) -> None:
    """Fail the task without retries when the settings are bad (``--print-config`` exits 2)."""
    command = build_command(request, deployment) + ["--print-config"]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                         check=False)
    if run.returncode == BAD_SETTINGS:
        raise AirflowFailException(f"bad settings: {run.stderr.strip()[-2000:]}")
    if run.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} exited with {run.returncode}:\n{run.stderr[-4000:]}")


def run_build(request: Request, deployment: Deployment, context: Any) -> None:
    """The build, through the Beam operator when there is one, else as a logged command."""
    check_settings(request, deployment)
    operator = beam_operator()
    if operator is None:
        run_logged(build_command(request, deployment))
        return
    runner, options = beam_pipeline(request, deployment)
    LOG.info("running the build through %s.%s (runner %s)", operator.__module__, operator.__name__, runner)
    os.chdir(REPO)   # relative paths are the repository's, as for the command (this task's process only)
    operator(task_id="build_pipeline", py_file="pipelines.build_dataset", py_options=["-m"],
             py_interpreter=deployment.interpreter(), runner=runner, pipeline_options=options).execute(context)


def _sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_manifest(manifest: dict[str, Any]) -> dict[str, int]:
    """The manifest's counts, checked to add up; raises ValueError when they do not or are empty."""
    counts = manifest.get("counts") or {}
    try:
        inputs, written, failed, in_shards, waiting = (
            int(counts[k]) for k in ("inputs", "written", "failed", "in_shards", "awaiting_retry"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"manifest.json: counts must hold integers inputs/written/failed/in_shards/"
                         f"awaiting_retry ({exc})") from exc
    if waiting:
        raise ValueError(f"manifest.json: {waiting} inputs failed transiently and await a retry; "
                         "rerun the build task before publishing")
    if in_shards != written + failed:
        raise ValueError(f"manifest.json: in_shards {in_shards} != written {written} + failed {failed}")
    if written < 1:
        raise ValueError(f"manifest.json: no records written ({failed} of {inputs} inputs failed); "
                         "nothing to publish")
    return {"inputs": inputs, "written": written, "failed": failed}


def publish_output(request: Request) -> dict[str, Any]:
    """Copy the index, card and manifest of the checked ``output`` into ``publish_dir`` (both
    resolved by ``check_request``); returns a summary."""
    if "://" in request.output:
        raise ValueError(f"output '{request.output}': publish works on local paths only")
    source, target = Path(request.output), Path(request.publish_dir)
    missing = [name for name in PUBLISHED_FILES + PUBLISHED_DIRS[:2] if not (source / name).exists()]
    if missing:
        raise FileNotFoundError(f"{source}: missing {', '.join(missing)}; was the build complete?")
    counts = check_manifest(json.loads((source / "manifest.json").read_text()))
    files: dict[str, str] = {}
    for name in published_names(source):
        destination = target / name
        if not destination.parent.resolve().is_relative_to(target):   # a link planted in publish_dir
            raise ValueError(f"{destination.parent} resolves outside publish_dir {target}; remove the link")
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(destination.name + ".partial")
        partial.unlink(missing_ok=True)   # never write through a link left in its place
        shutil.copyfile(source / name, partial)
        digest = _sha256(source / name)
        if _sha256(partial) != digest:
            raise OSError(f"{destination}: copy differs from {source / name}")
        partial.replace(destination)
        files[name] = digest
    LOG.info("published %s: %d records, %d failed of %d inputs → %s", source, counts["written"],
             counts["failed"], counts["inputs"], target)
    return {"output": str(source), "publish_dir": str(target), "counts": counts, "sha256": files}


# The trigger's params: data and sizes only (what runs and where files may go: run_request.Deployment).
PARAMS = {
    "input": Param(_default("input", "samples"), type="string", minLength=1,
                   description="dir | glob | manifest | .tar shards | samples | synthetic://N "
                               "(under MULTIGRAN_INPUT_ROOTS)"),
    "output": Param(_default("output", "out/dataset"), type="string", minLength=1,
                    description="output directory (relative: to the repository root; under "
                                "MULTIGRAN_OUTPUT_ROOTS)"),
    "config": Param(_default("config", ""), type="string",
                    description="settings YAML (under MULTIGRAN_CONFIG_ROOTS); empty: the embedded defaults"),
    "extra_args": Param(_default("extra_args", ""), type="string",
                        description="more build flags, shell-quoted: the pipeline's (--workers 2) and "
                                    "listed Beam flags (--runner, --num_workers, ...)"),
    "publish_dir": Param(_default("publish_dir", "out/published"), type="string", minLength=1,
                         description="local folder the index, card and manifest are copied to "
                                     "(under MULTIGRAN_PUBLISH_ROOT)"),
}

with DAG(
    dag_id="build_dataset",
    description="Build, validate and publish a multi-granularity image-text dataset",
    doc_md=__doc__,
    schedule=None,
    catchup=False,
    max_active_runs=1,          # two runs into one output would race on its shards
    tags=["multigran", "beam"],
    default_args={"retries": 0, "retry_delay": timedelta(minutes=1)},
    params=PARAMS,
) as dag:

    @task(retries=int(_default("build_retries", "2")), retry_delay=timedelta(minutes=5),
          retry_exponential_backoff=True,
          execution_timeout=timedelta(hours=float(_default("build_timeout_h", "24"))))
    def build() -> None:
        """Check the trigger, then run the Beam pipeline (reruns skip shards already complete)."""
        run_build(*_request(check_args=True), get_current_context())

    @task(retries=1, execution_timeout=timedelta(hours=2))
    def validate() -> None:
        """Check every shard, the index, failures table and manifest; fails on any problem."""
        run_logged(validate_command(*_request()))

    @task(retries=2, execution_timeout=timedelta(minutes=30))
    def publish() -> dict[str, Any]:
        """Copy index, card and manifest to ``publish_dir``; returns what was published."""
        request, _ = _request()
        return publish_output(request)

    build() >> validate() >> publish()
