"""What a trigger of the `build_dataset` DAG may ask for, checked, and the commands it becomes.

A trigger names data and sizes; the deployment decides what runs and where files may go
(``Deployment``: environment variables of the Airflow workers, read when a task runs). The first
task checks a trigger with ``check_request`` and ``check_extra_args`` before any work; a refusal
(``RequestRefused``) names the param and the fix. The rules:

- no ``python`` (or any other undeclared) key in the trigger's configuration: the interpreter
  is ``MULTIGRAN_PYTHON``;
- ``input``, ``output``, ``config`` and ``publish_dir`` lie under the deployment's roots: a local
  path (relative ones from the repository root) is resolved (``..``, symlinks) and must fall
  inside a local root; a URI must start with a URI root (``gs://bucket/data``; ``gs://`` allows
  the whole scheme). ``samples`` and ``synthetic://…`` read nothing and always pass;
- ``extra_args`` holds only the pipeline's own flags (asked from pipelines/build_dataset.py's
  parser) other than the ones the DAG sets, and the Beam flags of ``BEAM_FLAGS``; each value is
  one plain token (no shell metacharacters, no leading ``-``).

Standard library only: the DAG file imports this when it is parsed, and tests without Airflow.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Mapping

REPO = Path(__file__).resolve().parents[1]


class RequestRefused(ValueError):
    """A trigger asked for something the deployment does not allow; the message names the param."""


# Pipeline flags the DAG sets or uses itself: never from extra_args (value: where to set it instead).
DAG_FLAGS = {"--input": "the 'input' param", "--output": "the 'output' param",
             "--config": "the 'config' param", "--print-config": "nothing: the build task uses it itself",
             "--help": "nothing: the build task runs the pipeline, it does not print help"}

TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.,:/=@+-]*")   # one plain value; never starts with '-'
LOCATION = re.compile(r"[A-Za-z0-9/][A-Za-z0-9_.,:/=@+-]*")   # the same, or an absolute path
COUNT = re.compile(r"[0-9]{1,6}")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
SHELL = re.compile(r"""[;&|$`<>(){}\[\]*?!~#'"\\\s]""")
BUILT_IN_INPUTS = re.compile(r"samples(://(skimage)?)?|synthetic://[A-Za-z0-9?=&]*")
RUNNERS = frozenset({"DirectRunner", "FnApiRunner", "PrismRunner", "DataflowRunner", "FlinkRunner",
                     "SparkRunner", "PortableRunner"})

# Beam flags a trigger may pass: where the job runs and how large it is, each with the values it
# takes. Flags that choose the code or the identity a job runs with (--setup_file,
# --requirements_file, --extra_package, --sdk_container_image, --sdk_location,
# --environment_type/--environment_config, --job_endpoint, --service_account_email, ...) would let
# a trigger run anything; the deployment sets those in MULTIGRAN_BEAM_ARGS.
BEAM_FLAGS: dict[str, re.Pattern[str] | frozenset[str]] = {
    "--runner": RUNNERS,
    "--project": TOKEN, "--region": TOKEN, "--job_name": TOKEN, "--machine_type": TOKEN,
    "--experiments": TOKEN,
    "--num_workers": COUNT, "--max_num_workers": COUNT, "--disk_size_gb": COUNT,
    "--direct_num_workers": COUNT, "--parallelism": COUNT,
    "--direct_running_mode": frozenset({"in_memory", "multi_threading", "multi_processing"}),
    "--temp_location": LOCATION, "--staging_location": LOCATION,
}
# Beam flags whose value is where the job writes: it must lie under an output root, like `output`.
BEAM_LOCATIONS = frozenset({"--temp_location", "--staging_location"})

# The pipeline's flags: [[spellings...], takes a value] per option of its argparse parser.
_LIST_FLAGS = ("import json; from pipelines.build_dataset import arg_parser; "
               "print(json.dumps([[a.option_strings, a.nargs != 0] for a in arg_parser()._actions]))")


def _resolve(path: str) -> str:
    """A local path made absolute (relative: from the repository root), ``..`` and symlinks resolved."""
    return os.path.realpath(REPO / Path(path).expanduser())


def _roots(env: Mapping[str, str], name: str, default: str) -> tuple[str, ...]:
    """The comma-separated roots of ``env[name]`` (else ``default``), local ones resolved."""
    items = [item.strip() for item in env.get(name, "").split(",") if item.strip()] or [default]
    return tuple(item if "://" in item else _resolve(item) for item in items)


@dataclass(frozen=True)
class Deployment:
    """What the deployment decides, from the Airflow workers' environment; never from a trigger."""

    python: str                      # MULTIGRAN_PYTHON: the interpreter that runs the pipeline
    input_roots: tuple[str, ...]     # MULTIGRAN_INPUT_ROOTS: where `input` may read
    output_roots: tuple[str, ...]    # MULTIGRAN_OUTPUT_ROOTS: where `output`, Beam temp/staging go
    config_roots: tuple[str, ...]    # MULTIGRAN_CONFIG_ROOTS: settings files (they can start servers)
    publish_root: str                # MULTIGRAN_PUBLISH_ROOT: the local folder publish_dir lies in
    beam_args: tuple[str, ...] = ()  # MULTIGRAN_BEAM_ARGS: Beam flags added unchecked

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Deployment:
        """The deployment described by ``env`` (default: this process's environment)."""
        env = os.environ if env is None else env
        publish = _roots(env, "MULTIGRAN_PUBLISH_ROOT", "out")
        if len(publish) != 1 or "://" in publish[0]:
            raise ValueError(f"MULTIGRAN_PUBLISH_ROOT: one local folder, not {publish}")
        return cls(python=env.get("MULTIGRAN_PYTHON") or str(REPO / ".venv" / "bin" / "python"),
                   input_roots=_roots(env, "MULTIGRAN_INPUT_ROOTS", "."),
                   output_roots=_roots(env, "MULTIGRAN_OUTPUT_ROOTS", "out"),
                   config_roots=_roots(env, "MULTIGRAN_CONFIG_ROOTS", "configs"),
                   publish_root=publish[0],
                   beam_args=tuple(shlex.split(env.get("MULTIGRAN_BEAM_ARGS", ""))))

    def interpreter(self) -> str:
        """The project interpreter (a path, relative ones from the repository root, or a name on PATH)."""
        if os.sep not in self.python:
            found = shutil.which(self.python)
            if found is None:
                raise FileNotFoundError(f"MULTIGRAN_PYTHON '{self.python}' is not on PATH")
            return found
        resolved = REPO / Path(self.python).expanduser()
        if not os.access(resolved, os.X_OK):
            raise FileNotFoundError(f"MULTIGRAN_PYTHON '{self.python}' is not an executable file; create "
                                    f"the project venv with `make venv` or set MULTIGRAN_PYTHON")
        return str(resolved)

    def flags(self) -> set[str]:
        """The flags MULTIGRAN_BEAM_ARGS sets (a trigger cannot set them again)."""
        return {arg.partition("=")[0] for arg in self.beam_args if arg.startswith("-")}


@dataclass(frozen=True)
class Request:
    """A checked trigger: local paths absolute and resolved, extra args as ``--flag[=value]``."""

    input: str
    output: str
    config: str
    publish_dir: str
    extra_args: tuple[str, ...] = ()


def _inside(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or lies under it (local paths resolved, or URIs by prefix)."""
    if "://" in root:
        return path == root.rstrip("/") or path.startswith(root if root.endswith("/") else root + "/")
    return "://" not in path and os.path.commonpath([path, root]) == root


def check_location(param: str, value: str, roots: tuple[str, ...], variable: str) -> str:
    """``value`` when it lies under one of ``roots`` (local paths come back resolved); else refused."""
    if "://" in value:
        if any(part in (".", "..") for part in value.split("://", 1)[1].split("/")):
            raise RequestRefused(f"{param}: '{value}' holds '.' or '..' segments; give the URI without them")
        found = value
    else:
        found = _resolve(value)
    if not any(_inside(found, root) for root in roots):
        shown = "" if found == value else f" (resolved: {found})"
        raise RequestRefused(f"{param}: '{value}'{shown} is outside the allowed roots {', '.join(roots)} "
                             f"({variable}, set by the deployment); give a path under one of them")
    return found


def check_request(params: Mapping[str, Any], declared: Collection[str], deployment: Deployment) -> Request:
    """The trigger's params checked against the deployment: keys, control characters and locations.

    ``declared`` are the DAG's params; extra_args are checked apart (``check_extra_args``).
    """
    unknown = sorted(set(params) - set(declared))
    if "python" in unknown:
        raise RequestRefused("python: not a trigger param; the interpreter is the deployment's "
                             "(MULTIGRAN_PYTHON); drop 'python' from the trigger's configuration")
    if unknown:
        raise RequestRefused(f"{', '.join(unknown)}: not params of this DAG (params: "
                             f"{', '.join(sorted(declared))}); drop them from the trigger's configuration")
    for name, value in params.items():
        if isinstance(value, str) and CONTROL.search(value):
            raise RequestRefused(f"{name}: holds a control character (e.g. a newline); give it on one line")
    source = params["input"]
    if not BUILT_IN_INPUTS.fullmatch(source):
        source = check_location("input", source, deployment.input_roots, "MULTIGRAN_INPUT_ROOTS")
    output = check_location("output", params["output"], deployment.output_roots, "MULTIGRAN_OUTPUT_ROOTS")
    config = params.get("config") or ""
    if config:
        config = check_location("config", config, deployment.config_roots, "MULTIGRAN_CONFIG_ROOTS")
    if "://" in params["publish_dir"]:
        raise RequestRefused(f"publish_dir: '{params['publish_dir']}': publishing copies to a local "
                             f"folder; give a path under {deployment.publish_root}")
    publish = check_location("publish_dir", params["publish_dir"], (deployment.publish_root,),
                             "MULTIGRAN_PUBLISH_ROOT")
    if _inside(publish, output):
        raise RequestRefused(f"publish_dir: '{params['publish_dir']}' lies in the output directory "
                             f"{output}; give a folder outside it")
    return Request(input=source, output=output, config=config, publish_dir=publish)


def pipeline_flags(python: str) -> dict[str, tuple[str, bool]]:
    """The pipeline's own flags, from its argparse parser (run by ``python``): every spelling →
    (its longest spelling, whether it takes a value)."""
    run = subprocess.run([python, "-c", _LIST_FLAGS], cwd=REPO, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, check=False, timeout=600)
    if run.returncode != 0:
        raise RuntimeError(f"listing the pipeline's flags with {python} failed:\n{run.stderr[-2000:]}")
    flags: dict[str, tuple[str, bool]] = {}
    for spellings, takes_value in json.loads(run.stdout.strip().splitlines()[-1]):
        flags.update({spelling: (max(spellings, key=len), takes_value) for spelling in spellings})
    return flags


def _check_value(flag: str, value: str, deployment: Deployment) -> None:
    """Refuse a value ``flag`` does not take (see BEAM_FLAGS; pipeline flags take one plain token)."""
    kind = BEAM_FLAGS.get(flag, TOKEN)
    if isinstance(kind, frozenset):
        if value not in kind:
            raise RequestRefused(f"extra_args: {flag}={value}: allowed values: {', '.join(sorted(kind))}")
    elif not kind.fullmatch(value):
        raise RequestRefused(f"extra_args: {flag}={value!r}: the value must be one plain token "
                             f"({kind.pattern})")
    if flag in BEAM_LOCATIONS:
        check_location(f"extra_args {flag}", value, deployment.output_roots, "MULTIGRAN_OUTPUT_ROOTS")


def check_extra_args(text: str, pipeline: Mapping[str, tuple[str, bool]],
                     deployment: Deployment) -> tuple[str, ...]:
    """The trigger's ``extra_args`` (shell-quoted) as ``--flag`` / ``--flag=value`` items, each a flag
    of ``pipeline`` (``pipeline_flags``) or of BEAM_FLAGS that neither the DAG nor the deployment
    sets; anything else is refused, naming the argument and the allowed flags."""
    if CONTROL.search(text):
        raise RequestRefused("extra_args: holds a control character (e.g. a newline); "
                             "give all flags on one line")
    try:
        args = shlex.split(text)
    except ValueError as exc:
        raise RequestRefused(f"extra_args: {exc}; quote values as a shell would") from None
    known = {**{spelling: flag for spelling, flag in pipeline.items() if flag[0] not in DAG_FLAGS},
             **{flag: (flag, True) for flag in BEAM_FLAGS}}
    allowed = sorted({flag for flag, _ in known.values()} - deployment.flags())
    checked: list[str] = []
    i = 0
    while i < len(args):
        token, i = args[i], i + 1
        if SHELL.search(token):
            raise RequestRefused(f"extra_args: '{token}' holds a shell metacharacter or space; flags are "
                                 f"--name or --name=value with plain values")
        spelling, eq, value = token.partition("=")
        if not spelling.startswith("-"):
            raise RequestRefused(f"extra_args: '{token}' is not a flag; allowed flags: {', '.join(allowed)}")
        flag, takes_value = pipeline.get(spelling) or known.get(spelling) or (spelling, True)
        if flag in DAG_FLAGS:
            raise RequestRefused(f"extra_args: '{spelling}' is set by the DAG; set {DAG_FLAGS[flag]} instead")
        if flag in deployment.flags():
            raise RequestRefused(f"extra_args: '{spelling}' is set by the deployment (MULTIGRAN_BEAM_ARGS)")
        if spelling not in known:
            raise RequestRefused(f"extra_args: '{spelling}' is not an allowed flag; allowed flags: "
                                 f"{', '.join(allowed)}")
        if not takes_value:
            if eq:
                raise RequestRefused(f"extra_args: '{spelling}' takes no value")
            checked.append(flag)
            continue
        if not eq:
            if i == len(args) or args[i].startswith("-"):
                raise RequestRefused(f"extra_args: '{spelling}' needs a value ({spelling}=VALUE)")
            value, i = args[i], i + 1
            if SHELL.search(value):
                raise RequestRefused(f"extra_args: '{value}' holds a shell metacharacter or space")
        _check_value(flag, value, deployment)
        checked.append(f"{flag}={value}")
    return tuple(checked)


def build_command(request: Request, deployment: Deployment) -> list[str]:
    """The pipeline command line: the deployment's interpreter, the checked request, its Beam flags."""
    command = [deployment.interpreter(), "-m", "pipelines.build_dataset",
               "--input", request.input, "--output", request.output]
    if request.config:
        command += ["--config", request.config]
    return command + list(request.extra_args) + list(deployment.beam_args)


def validate_command(request: Request, deployment: Deployment) -> list[str]:
    """The validation command line."""
    return [deployment.interpreter(), "-m", "pipelines.validate", request.output]
