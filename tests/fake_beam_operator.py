"""A stand-in for the Apache Beam provider's ``BeamRunPythonPipelineOperator`` (provider 6.3.1),
for the DAG test in an Airflow environment without the provider (it needs the Google provider,
~130 more packages). Same keyword arguments; ``execute`` runs the command line the provider's
``BeamHook.start_python_pipeline`` builds: ``[py_interpreter, *py_options, py_file,
--runner=RUNNER, *options]``, with the provider's ``labels`` option added. Standard library only.
"""
from __future__ import annotations

import json
import logging
import subprocess
from typing import Any

LOG = logging.getLogger(__name__)


def beam_options_to_args(options: dict[str, Any]) -> list[str]:
    """The provider's translation of pipeline options into flags."""
    args: list[str] = []
    for name, value in options.items():
        if isinstance(value, bool):
            if value:
                args.append(f"--{name}")
        elif isinstance(value, list):
            args += [f"--{name}={v}" for v in value]
        elif isinstance(value, dict):
            args.append(f"--{name}={json.dumps(value)}")
        elif value is not None:
            args.append(f"--{name}={value}")
    return args


class BeamRunPythonPipelineOperator:
    """See the module docstring."""

    def __init__(self, *, task_id: str, py_file: str, runner: str = "DirectRunner",
                 default_pipeline_options: dict | None = None, pipeline_options: dict | None = None,
                 py_interpreter: str = "python3", py_options: list[str] | None = None,
                 py_requirements: list[str] | None = None, py_system_site_packages: bool = False,
                 gcp_conn_id: str = "google_cloud_default", dataflow_config: Any = None,
                 deferrable: bool = False, **kwargs: Any) -> None:
        self.task_id, self.py_file, self.runner = task_id, py_file, runner
        self.options = {**(default_pipeline_options or {}), **(pipeline_options or {})}
        self.py_interpreter, self.py_options = py_interpreter, py_options or []

    def execute(self, context: Any) -> None:
        options = dict(self.options)
        options["labels"] = ["airflow-version=v3-3-2"]
        command = [self.py_interpreter, *self.py_options, self.py_file, f"--runner={self.runner}",
                   *beam_options_to_args(options)]
        LOG.info("stand-in BeamRunPythonPipelineOperator running: %s", command)
        run = subprocess.run(command, capture_output=True, text=True, check=False)
        for line in (run.stdout + run.stderr).splitlines():
            LOG.info("%s", line)
        if run.returncode != 0:
            raise RuntimeError(f"Apache Beam process failed with return code {run.returncode}")
