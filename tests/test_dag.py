"""The Airflow DAG (dags/build_dataset.py): a real `airflow dags test` run, and a parse check.

The integration tests set up Airflow in its own venv with tools/airflow_env.sh (first use: about
a minute; later: a stamp check) and run the DAG with the interpreter running these tests as the
project's, so build and validate use exactly the code under test.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipelines.validate import validate

REPO = Path(__file__).resolve().parents[1]
DAG_FILE = REPO / "dags" / "build_dataset.py"
SETUP = REPO / "tools" / "airflow_env.sh"
PUBLISHED_DIRS = ("index/images", "index/regions", "failures")


def _clean_env() -> dict[str, str]:
    """This environment without Airflow or DAG settings, so the setup script's defaults apply."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("AIRFLOW", "MULTIGRAN_")) and k != "PYTHONPATH"}


@pytest.fixture(scope="module")
def airflow_env() -> None:
    """Airflow installed and migrated (tools/airflow_env.sh); fails, never skips, when it cannot be."""
    setup = subprocess.run(["bash", str(SETUP)], check=False, cwd=REPO, env=_clean_env(), capture_output=True,
                           text=True, timeout=900)
    assert setup.returncode == 0, f"tools/airflow_env.sh failed:\n{setup.stdout}\n{setup.stderr}"


def dags_test(conf: dict[str, Any], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`airflow dags test build_dataset -c CONF` in the environment of tools/airflow_env.sh."""
    command = ["bash", str(SETUP), "--", "airflow", "dags", "test", "build_dataset",
               "-c", json.dumps(conf)]
    return subprocess.run(command, check=False, cwd=REPO, env={**_clean_env(), **(env or {})},
                          capture_output=True, text=True, timeout=600)


def _conf(tmp_path: Path, config: str = "") -> dict[str, Any]:
    """Every DAG param for a 3-image synthetic build under ``tmp_path``."""
    return {"input": "synthetic://3", "output": str(tmp_path / "out"), "config": config,
            "python": sys.executable, "extra_args": "", "publish_dir": str(tmp_path / "published")}


def test_dag_file_is_light_and_parses() -> None:
    """The DAG file compiles and imports only the standard library and Airflow at top level."""
    tree = ast.parse(DAG_FILE.read_text(), filename=str(DAG_FILE))
    imported = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    heavy = imported - set(sys.stdlib_module_names) - {"__future__", "airflow"}
    assert not heavy, f"top-level imports beyond stdlib and airflow: {sorted(heavy)}"
    assert "airflow" in imported
    ids = [kw.value.value for node in ast.walk(tree) if isinstance(node, ast.Call)
           for kw in node.keywords if kw.arg == "dag_id" and isinstance(kw.value, ast.Constant)]
    assert ids == ["build_dataset"]


@pytest.mark.integration
def test_dag_builds_validates_and_publishes(airflow_env: None, tmp_path: Path) -> None:
    """build → validate → publish succeed; the output validates and the publish dir matches it."""
    run = dags_test(_conf(tmp_path))
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-6000:]
    for task_id in ("build", "validate", "publish"):
        assert f"[DAG TEST] end task task_id={task_id}" in log, log[-6000:]
    assert "DagRun Finished: dag_id=build_dataset" in log and "state=success" in log, log[-6000:]

    out, published = tmp_path / "out", tmp_path / "published"
    report = validate(str(out))
    assert report.ok, report.text()
    assert report.samples == 3
    copied = sorted(p.relative_to(published).as_posix() for p in published.rglob("*") if p.is_file())
    expected = sorted(p.relative_to(out).as_posix() for folder in PUBLISHED_DIRS
                      for p in (out / folder).glob("*.parquet")) + ["README.md", "manifest.json"]
    assert copied == sorted(expected) and any(name.startswith("index/images/") for name in copied)
    for name in copied:
        assert (published / name).read_bytes() == (out / name).read_bytes(), name
    manifest = json.loads((published / "manifest.json").read_text())
    assert manifest["counts"]["written"] == 3 and manifest["counts"]["inputs"] == 3


@pytest.mark.integration
def test_dag_run_fails_and_publishes_nothing_when_build_fails(airflow_env: None, tmp_path: Path) -> None:
    """A bad setting fails the build task, hence the run; validate and publish never run."""
    config = tmp_path / "bad.yaml"
    config.write_text("decode:\n  max_sid: 512\n")
    run = dags_test(_conf(tmp_path, str(config)))
    log = run.stdout + run.stderr
    assert run.returncode != 0, log[-6000:]
    assert "DagRun failed" in log, log[-6000:]
    assert "decode.max_sid: unknown setting" in log, log[-6000:]
    assert "AirflowFailException" in log and "up_for_retry" not in log.lower(), log[-6000:]
    assert not (tmp_path / "published").exists()
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_task_retries_and_timeouts() -> None:
    """Every task sets its own retries and timeout (parsed from the DAG file, no Airflow needed)."""
    tree = ast.parse(DAG_FILE.read_text(), filename=str(DAG_FILE))
    tasks = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and getattr(deco.func, "id", "") == "task":
                    tasks[node.name] = {kw.arg for kw in deco.keywords}
    assert set(tasks) == {"build", "validate", "publish"}
    for name, keywords in tasks.items():
        assert {"retries", "execution_timeout"} <= keywords, name


@pytest.mark.integration
@pytest.mark.slow
def test_dag_builds_through_the_beam_operator(airflow_env: None, tmp_path: Path) -> None:
    """With a Beam operator (the provider's signature; tests/fake_beam_operator.py stands in for the
    provider, which needs the Google provider), build runs the module through it with the
    extra args as pipeline options and the runner from --runner."""
    conf = _conf(tmp_path) | {"extra_args": "--runner=FnApiRunner --workers 1"}
    run = dags_test(conf, env={"MULTIGRAN_BEAM_OPERATOR": "tests.fake_beam_operator:BeamRunPythonPipelineOperator",
                               "PYTHONPATH": str(REPO)})
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-6000:]
    assert "running the build through tests.fake_beam_operator.BeamRunPythonPipelineOperator (runner FnApiRunner)" \
        in log, log[-6000:]
    assert "-m', 'pipelines.build_dataset', '--runner=FnApiRunner', '--input=synthetic://3'" in log, log[-6000:]
    assert "'--workers=1', '--labels=airflow-version=v3-3-2'" in log, log[-6000:]
    assert validate(str(tmp_path / "out")).ok
    assert (tmp_path / "published" / "manifest.json").is_file()
