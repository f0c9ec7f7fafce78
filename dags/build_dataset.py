"""Airflow DAG `build_dataset`: build → validate → publish, each a run of the project's own code.

- **build** runs `python -m pipelines.build_dataset --input … --output … [--config …] [extra args]`
  with the project's interpreter (the one `make build-dataset` uses), so the DAG and Airflow's
  environment never share packages with Beam;
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

Only the standard library and Airflow are imported here, so the file parses in milliseconds.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
from collections import deque
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Param, get_current_context, task

LOG = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
# What publish copies, relative to the output directory: the per-shard index and failures files,
# then the card, and manifest.json last on purpose.
PUBLISHED_DIRS = ("index/images", "index/regions", "failures")
PUBLISHED_FILES = ("README.md", "manifest.json")


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

    Raises RuntimeError with the last ``tail`` lines when it exits non-zero.
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
        raise RuntimeError(f"{shlex.join(command)} exited with {process.returncode}:\n" + "\n".join(last))


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
    default_args={"retries": 0},
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

    @task
    def build() -> None:
        """Run the Beam pipeline (reruns skip shards that are already complete)."""
        run_logged(build_command(_params()))

    @task
    def validate() -> None:
        """Check every shard, the index, failures table and manifest; fails on any problem."""
        run_logged(validate_command(_params()))

    @task
    def publish() -> dict[str, Any]:
        """Copy index, card and manifest to ``publish_dir``; returns what was published."""
        params = _params()
        return publish_output(params["output"], params["publish_dir"])

    build() >> validate() >> publish()
