"""Airflow DAG `build_dataset`: build → validate → publish, each a run of the project's own code.

- **build** first checks the settings (`--print-config`: bad settings fail the task at once, with
  no retry), then runs `python -m pipelines.build_dataset --input … --output … [--config …]
  [extra args]` with the project's interpreter (the one `make build-dataset` uses), so the DAG
  and Airflow's environment never share packages with Beam. When the Apache Beam provider
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

Manual trigger only (no schedule). Every setting is a DAG param, given with the trigger's
configuration (`airflow dags trigger build_dataset -c '{"input": "/data/images"}'` or
`airflow dags test build_dataset -c '{…}'`); a param left out takes the value of its environment
variable, else the fallback:

| param | variable, fallback | meaning |
|---|---|---|
| `input` | `MULTIGRAN_INPUT`, `samples` | `--input`: dir, glob, manifest, tars, `synthetic://N` |
| `output` | `MULTIGRAN_OUTPUT`, `out/dataset` | output directory |
| `config` | `MULTIGRAN_CONFIG`, empty | settings YAML; empty: the embedded defaults |
| `python` | `MULTIGRAN_PYTHON`, `.venv/bin/python` | the project's interpreter (`make venv` creates it) |
| `extra_args` | `MULTIGRAN_EXTRA_ARGS`, empty | more build flags, shell-quoted (`--workers 2`, Beam's) |
| `publish_dir` | `MULTIGRAN_PUBLISH_DIR`, `out/published` | where the index, card and manifest are copied |

Relative paths are relative to the repository root, which is also the working directory of
the build and validate commands. Publishing copies local files only; build and validate take
any Beam filesystem path.

Retries and timeouts, per task (environment variables read when the DAG is parsed):

| task | retries | retry delay | timeout |
|---|---|---|---|
| build | `MULTIGRAN_BUILD_RETRIES`, 2 (a rerun redoes only unfinished shards) | 5 min, doubling | `MULTIGRAN_BUILD_TIMEOUT_H`, 24 h |
| validate | 1 | 1 min | 2 h |
| publish | 2 | 1 min | 30 min |

Bad settings (exit status 2) fail the run without retries.

Only the standard library and Airflow are imported here, so the file parses in milliseconds.
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
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Param, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

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


def _params() -> dict[str, Any]:
    """The params of the running DAG run (trigger configuration applied)."""
    return dict(get_current_context()["params"])


def _local(path: str) -> Path:
    """A local path; relative ones are taken from the repository root."""
    if "://" in path:
        raise ValueError(f"'{path}': publish works on local paths only")
    resolved = Path(path).expanduser()
    return resolved if resolved.is_absolute() else REPO / resolved


def _interpreter(params: dict[str, Any]) -> str:
    """The project interpreter named by the ``python`` param (a path, or a name on PATH)."""
    python = params["python"]
    if os.sep not in python:
        found = shutil.which(python)
        if found is None:
            raise FileNotFoundError(f"python '{python}' is not on PATH; set the 'python' param")
        return found
    resolved = Path(python).expanduser()
    if not resolved.is_absolute():
        resolved = REPO / resolved
    if not os.access(resolved, os.X_OK):
        raise FileNotFoundError(f"python '{python}' is not an executable file; create the project "
                                f"venv with `make venv` or set the 'python' param")
    return str(resolved)


def build_command(params: dict[str, Any]) -> list[str]:
    """The pipeline command line for ``params``."""
    command = [_interpreter(params), "-m", "pipelines.build_dataset",
               "--input", params["input"], "--output", params["output"]]
    if params.get("config"):
        command += ["--config", params["config"]]
    return command + shlex.split(params.get("extra_args") or "")


def validate_command(params: dict[str, Any]) -> list[str]:
    """The validation command line for ``params``."""
    return [_interpreter(params), "-m", "pipelines.validate", params["output"]]


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


def beam_pipeline(params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(runner, pipeline options) of the build for the Beam operator: the flags of
    ``build_command`` as a dict (``--k v`` / ``--k=v`` → k: v, a bare ``--k`` → True, a
    repeated flag → a list)."""
    options: dict[str, Any] = {"input": params["input"], "output": params["output"]}
    if params.get("config"):
        options["config"] = params["config"]
    args = shlex.split(params.get("extra_args") or "")
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
        if name in options and name not in ("input", "output", "config"):
            previous = options[name]
            options[name] = (previous if isinstance(previous, list) else [previous]) + [value]
        else:
            options[name] = value
        i += 1
    return str(options.pop("runner", LOCAL_RUNNER)), options


def check_settings(params: dict[str, Any]) -> None:
    """Fail the task without retries when the settings are bad (``--print-config`` exits 2)."""
    command = build_command(params) + ["--print-config"]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                         check=False)
    if run.returncode == BAD_SETTINGS:
        raise AirflowFailException(f"bad settings: {run.stderr.strip()[-2000:]}")
    if run.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} exited with {run.returncode}:\n{run.stderr[-4000:]}")


def run_build(params: dict[str, Any], context: Any) -> None:
    """The build, through the Beam operator when there is one, else as a logged command."""
    check_settings(params)
    operator = beam_operator()
    if operator is None:
        run_logged(build_command(params))
        return
    runner, options = beam_pipeline(params)
    LOG.info("running the build through %s.%s (runner %s)", operator.__module__, operator.__name__, runner)
    os.chdir(REPO)   # relative paths are the repository's, as for the command (this task's process only)
    operator(task_id="build_pipeline", py_file="pipelines.build_dataset", py_options=["-m"],
             py_interpreter=_interpreter(params), runner=runner, pipeline_options=options).execute(context)


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


def publish_output(output: str, publish_dir: str) -> dict[str, Any]:
    """Copy the index, card and manifest of ``output`` into ``publish_dir``; returns a summary."""
    source, target = _local(output), _local(publish_dir)
    if source.resolve() == target.resolve():
        raise ValueError(f"publish_dir '{publish_dir}' is the output directory itself")
    missing = [name for name in PUBLISHED_FILES + PUBLISHED_DIRS[:2] if not (source / name).exists()]
    if missing:
        raise FileNotFoundError(f"{source}: missing {', '.join(missing)}; was the build complete?")
    counts = check_manifest(json.loads((source / "manifest.json").read_text()))
    files: dict[str, str] = {}
    for name in published_names(source):
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(destination.name + ".partial")
        shutil.copyfile(source / name, partial)
        digest = _sha256(source / name)
        if _sha256(partial) != digest:
            raise OSError(f"{destination}: copy differs from {source / name}")
        partial.replace(destination)
        files[name] = digest
    LOG.info("published %s: %d records, %d failed of %d inputs → %s", source, counts["written"],
             counts["failed"], counts["inputs"], target)
    return {"output": str(source), "publish_dir": str(target), "counts": counts, "sha256": files}


with DAG(
    dag_id="build_dataset",
    description="Build, validate and publish a multi-granularity image-text dataset",
    doc_md=__doc__,
    schedule=None,
    catchup=False,
    max_active_runs=1,          # two runs into one output would race on its shards
    tags=["multigran", "beam"],
    default_args={"retries": 0, "retry_delay": timedelta(minutes=1)},
    params={
        "input": Param(_default("input", "samples"), type="string", minLength=1,
                       description="dir | glob | manifest | .tar shards | samples | synthetic://N"),
        "output": Param(_default("output", "out/dataset"), type="string", minLength=1,
                        description="output directory (relative: to the repository root)"),
        "config": Param(_default("config", ""), type="string",
                        description="settings YAML; empty: the embedded defaults"),
        "python": Param(_default("python", str(REPO / ".venv" / "bin" / "python")), type="string",
                        minLength=1, description="the project's Python interpreter"),
        "extra_args": Param(_default("extra_args", ""), type="string",
                            description="more build flags, shell-quoted (--workers 2, Beam flags)"),
        "publish_dir": Param(_default("publish_dir", "out/published"), type="string", minLength=1,
                             description="local folder the index, card and manifest are copied to"),
    },
) as dag:

    @task(retries=int(_default("build_retries", "2")), retry_delay=timedelta(minutes=5),
          retry_exponential_backoff=True,
          execution_timeout=timedelta(hours=float(_default("build_timeout_h", "24"))))
    def build() -> None:
        """Run the Beam pipeline (reruns skip shards that are already complete)."""
        run_build(_params(), get_current_context())

    @task(retries=1, execution_timeout=timedelta(hours=2))
    def validate() -> None:
        """Check every shard, the index, failures table and manifest; fails on any problem."""
        run_logged(validate_command(_params()))

    @task(retries=2, execution_timeout=timedelta(minutes=30))
    def publish() -> dict[str, Any]:
        """Copy index, card and manifest to ``publish_dir``; returns what was published."""
        params = _params()
        return publish_output(params["output"], params["publish_dir"])

    build() >> validate() >> publish()
