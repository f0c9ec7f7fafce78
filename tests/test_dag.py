"""The Airflow DAG (dags/build_dataset.py): a real `airflow dags test` run, a parse check, and what
a trigger may ask for (dags/run_request.py, standard library only: tested here without Airflow).

The integration tests set up Airflow in its own venv with tools/airflow_env.sh (first use: about
a minute; later: a stamp check) and run the DAG with the interpreter running these tests as the
deployment's (MULTIGRAN_PYTHON), so build and validate use exactly the code under test.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from pipelines.validate import validate

REPO = Path(__file__).resolve().parents[1]
DAG_FILE = REPO / "dags" / "build_dataset.py"
REQUEST_FILE = REPO / "dags" / "run_request.py"
SETUP = REPO / "tools" / "airflow_env.sh"
PUBLISHED_DIRS = ("index/images", "index/regions", "failures")


def _load_run_request() -> ModuleType:
    """dags/run_request.py, imported by path (the dags folder is not a package)."""
    spec = importlib.util.spec_from_file_location("run_request", REQUEST_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_request"] = module   # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


rr = _load_run_request()


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


def _deployment_env(tmp_path: Path) -> dict[str, str]:
    """The deployment of the DAG runs here: this interpreter, every root ``tmp_path``."""
    return {"MULTIGRAN_PYTHON": sys.executable, "MULTIGRAN_INPUT_ROOTS": str(tmp_path),
            "MULTIGRAN_OUTPUT_ROOTS": str(tmp_path), "MULTIGRAN_CONFIG_ROOTS": str(tmp_path),
            "MULTIGRAN_PUBLISH_ROOT": str(tmp_path)}


def dags_test(conf: dict[str, Any], tmp_path: Path,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`airflow dags test build_dataset -c CONF` in the environment of tools/airflow_env.sh, with
    the deployment of ``_deployment_env``."""
    command = ["bash", str(SETUP), "--", "airflow", "dags", "test", "build_dataset",
               "-c", json.dumps(conf)]
    return subprocess.run(command, check=False, cwd=REPO,
                          env={**_clean_env(), **_deployment_env(tmp_path), **(env or {})},
                          capture_output=True, text=True, timeout=600)


def _conf(tmp_path: Path, config: str = "") -> dict[str, Any]:
    """Every DAG param for a 3-image synthetic build under ``tmp_path``."""
    return {"input": "synthetic://3", "output": str(tmp_path / "out"), "config": config,
            "extra_args": "", "publish_dir": str(tmp_path / "published")}


def _top_level_imports(path: Path) -> set[str]:
    """The top-level packages ``path`` imports at module level."""
    imported = set()
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    return imported


def test_dag_file_is_light_and_parses() -> None:
    """The DAG file compiles and imports only the standard library, Airflow and dags/run_request.py
    (itself standard library only) at top level."""
    tree = ast.parse(DAG_FILE.read_text(), filename=str(DAG_FILE))
    imported = _top_level_imports(DAG_FILE)
    heavy = imported - set(sys.stdlib_module_names) - {"__future__", "airflow", "run_request"}
    assert not heavy, f"top-level imports beyond stdlib and airflow: {sorted(heavy)}"
    assert {"airflow", "run_request"} <= imported
    assert not _top_level_imports(REQUEST_FILE) - set(sys.stdlib_module_names) - {"__future__"}
    ids = [kw.value.value for node in ast.walk(tree) if isinstance(node, ast.Call)
           for kw in node.keywords if kw.arg == "dag_id" and isinstance(kw.value, ast.Constant)]
    assert ids == ["build_dataset"]


@pytest.mark.integration
def test_dag_builds_validates_and_publishes(airflow_env: None, tmp_path: Path) -> None:
    """build → validate → publish succeed; the output validates and the publish dir matches it."""
    run = dags_test(_conf(tmp_path), tmp_path)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-6000:]
    # the deployment's interpreter runs the pipeline, with the checked (resolved) paths
    assert f"running: {sys.executable} -m pipelines.build_dataset --input synthetic://3 " \
           f"--output {tmp_path / 'out'}" in log, log[-6000:]
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
    run = dags_test(_conf(tmp_path, str(config)), tmp_path)
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
    run = dags_test(conf, tmp_path, env={"MULTIGRAN_BEAM_OPERATOR": "tests.fake_beam_operator:BeamRunPythonPipelineOperator",
                               "PYTHONPATH": str(REPO)})
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-6000:]
    assert "running the build through tests.fake_beam_operator.BeamRunPythonPipelineOperator (runner FnApiRunner)" \
        in log, log[-6000:]
    assert "-m', 'pipelines.build_dataset', '--runner=FnApiRunner', '--input=synthetic://3'" in log, log[-6000:]
    assert "'--workers=1', '--labels=airflow-version=v3-3-2'" in log, log[-6000:]
    assert validate(str(tmp_path / "out")).ok
    assert (tmp_path / "published" / "manifest.json").is_file()


# ---------------------------------------------------------------- what a trigger may ask for

@pytest.fixture(scope="module")
def pipeline_flags() -> dict[str, tuple[str, bool]]:
    """The pipeline's flags as the DAG gets them: its parser, asked through the interpreter."""
    return rr.pipeline_flags(sys.executable)


@pytest.fixture
def deployment(tmp_path: Path) -> Any:
    """A deployment whose roots are folders of ``tmp_path``, with a file and a link outside them."""
    for name in ("in", "out", "configs", "published", "outside"):
        (tmp_path / name).mkdir()
    (tmp_path / "configs" / "ok.yaml").write_text("{}\n")
    (tmp_path / "published" / "escape").symlink_to(tmp_path / "outside", target_is_directory=True)
    (tmp_path / "published" / "inner").symlink_to(tmp_path / "published" / "real", target_is_directory=True)
    return rr.Deployment.from_env({
        "MULTIGRAN_PYTHON": sys.executable, "MULTIGRAN_INPUT_ROOTS": f"{tmp_path / 'in'}, gs://bucket/images",
        "MULTIGRAN_OUTPUT_ROOTS": f"{tmp_path / 'out'},gs://bucket/out",
        "MULTIGRAN_CONFIG_ROOTS": str(tmp_path / "configs"), "MULTIGRAN_PUBLISH_ROOT": str(tmp_path / "published")})


def _params(tmp_path: Path, **changes: str) -> dict[str, str]:
    """A benign trigger's params (every DAG param) under the ``deployment`` fixture, with ``changes``."""
    return {"input": "synthetic://3", "output": str(tmp_path / "out" / "run"), "config": "",
            "extra_args": "", "publish_dir": str(tmp_path / "published" / "run")} | changes


def test_pipeline_flags_are_the_parsers_own(pipeline_flags: dict[str, tuple[str, bool]]) -> None:
    """The allow-list's pipeline part is pipelines/build_dataset.py's parser: every spelling, its long
    form, and whether it takes a value."""
    from pipelines.build_dataset import arg_parser

    assert set(pipeline_flags) == {s for a in arg_parser()._actions for s in a.option_strings}
    assert pipeline_flags["--workers"] == ("--workers", True)
    assert pipeline_flags["--overwrite"] == ("--overwrite", False)
    assert pipeline_flags["-v"] == ("--verbose", False)


def test_python_param_is_refused_and_the_deployment_interpreter_runs(tmp_path: Path, deployment: Any) -> None:
    """A trigger naming an interpreter (or any key that is not a param) is refused; the commands run
    the deployment's interpreter, by default the project's venv."""
    with pytest.raises(rr.RequestRefused, match=r"python: not a trigger param.*MULTIGRAN_PYTHON"):
        rr.check_request(_params(tmp_path, python="/bin/sh"), _params(tmp_path), deployment)
    with pytest.raises(rr.RequestRefused, match=r"^command: not params of this DAG"):
        rr.check_request(_params(tmp_path, command="id"), _params(tmp_path), deployment)
    request = rr.check_request(_params(tmp_path), _params(tmp_path), deployment)
    assert rr.build_command(request, deployment)[:3] == [sys.executable, "-m", "pipelines.build_dataset"]
    assert rr.validate_command(request, deployment)[0] == sys.executable
    assert rr.Deployment.from_env({}).python == str(REPO / ".venv" / "bin" / "python")


@pytest.mark.parametrize("extra_args, refusal", [
    ("; rm -rf /", r"';' holds a shell metacharacter"),
    ("--workers 1 ; rm -rf /", r"';' holds a shell metacharacter"),
    ("--workers=1;id", r"'--workers=1;id' holds a shell metacharacter"),
    ("$(touch /tmp/owned)", r"'\$\(touch' holds a shell metacharacter"),
    ("--job_name=$(id)", r"'--job_name=\$\(id\)' holds a shell metacharacter"),
    ("--job_name=`id`", r"holds a shell metacharacter"),
    ("--job_name 'a b'", r"'a b' holds a shell metacharacter or space"),
    ("--output=/etc", r"'--output' is set by the DAG; set the 'output' param"),
    ("--output /etc", r"'--output' is set by the DAG"),
    ("--input=/etc/passwd", r"'--input' is set by the DAG; set the 'input' param"),
    ("--config=/tmp/evil.yaml", r"'--config' is set by the DAG"),
    ("--print-config", r"'--print-config' is set by the DAG"),
    ("-h", r"'-h' is set by the DAG"),
    ("--out=/etc", r"'--out' is not an allowed flag; allowed flags: .*--workers"),
    ("--no-such-flag", r"'--no-such-flag' is not an allowed flag; allowed flags: .*--runner"),
    ("--setup_file=/tmp/setup.py", r"'--setup_file' is not an allowed flag"),
    ("--sdk_container_image=evil/image", r"'--sdk_container_image' is not an allowed flag"),
    ("--environment_type=PROCESS", r"'--environment_type' is not an allowed flag"),
    ("--workers 1\n--output /etc", r"control character"),
    ("--job_name=a\nb", r"control character"),
    ("--job_name --output=/etc", r"'--job_name' needs a value"),
    ("--job_name=--output=/etc", r"--job_name='--output=/etc': the value must be one plain token"),
    ("--runner=evil.module.Runner", r"--runner=evil.module.Runner: allowed values: .*DataflowRunner"),
    ("--temp_location=/etc/tmp", r"extra_args --temp_location: '/etc/tmp' is outside the allowed roots"),
    ("--overwrite=yes", r"'--overwrite' takes no value"),
    ("rm -rf /", r"'rm' is not a flag"),
    ("--workers 'unbalanced", r"No closing quotation"),
])
def test_hostile_extra_args_are_refused(extra_args: str, refusal: str, deployment: Any,
                                        pipeline_flags: dict[str, tuple[str, bool]]) -> None:
    """extra_args hold only allowed flags with plain values; the refusal names the argument."""
    with pytest.raises(rr.RequestRefused, match=r"^extra_args"):
        rr.check_extra_args(extra_args, pipeline_flags, deployment)
    with pytest.raises(rr.RequestRefused, match=refusal):
        rr.check_extra_args(extra_args, pipeline_flags, deployment)


def test_benign_extra_args_pass_as_flags(tmp_path: Path, deployment: Any,
                                         pipeline_flags: dict[str, tuple[str, bool]]) -> None:
    """Pipeline and listed Beam flags pass, as --flag / --flag=value, and reach the command."""
    text = (f"--workers 2 -v --overwrite --runner=DirectRunner --num_workers=3 --experiments=a=1 "
            f"--experiments b --temp_location={tmp_path / 'out' / 'tmp'} --staging_location=gs://bucket/out/s")
    extra = rr.check_extra_args(text, pipeline_flags, deployment)
    assert extra == ("--workers=2", "--verbose", "--overwrite", "--runner=DirectRunner", "--num_workers=3",
                     "--experiments=a=1", "--experiments=b", f"--temp_location={tmp_path / 'out' / 'tmp'}",
                     "--staging_location=gs://bucket/out/s")
    assert rr.check_extra_args("", pipeline_flags, deployment) == ()
    request = rr.check_request(_params(tmp_path), _params(tmp_path), deployment)
    command = rr.build_command(replace(request, extra_args=extra), deployment)
    assert command[-len(extra):] == list(extra)


def test_deployment_beam_flags_are_added_and_not_overridable(tmp_path: Path, deployment: Any,
                                                             pipeline_flags: dict[str, tuple[str, bool]]) -> None:
    """MULTIGRAN_BEAM_ARGS (e.g. the worker image) end every build command; a trigger cannot set them."""
    deployed = replace(deployment, beam_args=("--runner=DataflowRunner", "--sdk_container_image=img:1"))
    with pytest.raises(rr.RequestRefused, match=r"'--runner' is set by the deployment \(MULTIGRAN_BEAM_ARGS\)"):
        rr.check_extra_args("--runner=DirectRunner", pipeline_flags, deployed)
    request = rr.check_request(_params(tmp_path), _params(tmp_path), deployed)
    assert rr.build_command(request, deployed)[-2:] == ["--runner=DataflowRunner", "--sdk_container_image=img:1"]


@pytest.mark.parametrize("param, value, refusal", [
    ("publish_dir", "../" * 40 + "etc", r"publish_dir: '(\.\./)+etc' \(resolved: /etc\) is outside the allowed roots"),
    ("publish_dir", "/etc", r"publish_dir: '/etc' is outside the allowed roots .*MULTIGRAN_PUBLISH_ROOT"),
    ("publish_dir", "{tmp}/published/../outside", r"publish_dir: .* is outside the allowed roots"),
    ("publish_dir", "{tmp}/published/escape", r"publish_dir: .*\(resolved: {tmp}/outside\) is outside"),
    ("publish_dir", "{tmp}/published/escape/sub", r"publish_dir: .*\(resolved: {tmp}/outside/sub\) is outside"),
    ("publish_dir", "gs://bucket/out/pub", r"publish_dir: .*publishing copies to a local folder"),
    ("publish_dir", "{tmp}/published/run\n", r"publish_dir: holds a control character"),
    ("output", "/etc", r"output: '/etc' is outside the allowed roots .*MULTIGRAN_OUTPUT_ROOTS"),
    ("output", "../../../../../../tmp", r"output: .* is outside the allowed roots"),
    ("output", "{tmp}/published", r"output: .* is outside the allowed roots"),
    ("output", "gs://attacker/out", r"output: 'gs://attacker/out' is outside the allowed roots"),
    ("output", "gs://bucket/out/../../attacker", r"output: .* holds '.' or '..' segments"),
    ("output", "gs://bucket/outer", r"output: 'gs://bucket/outer' is outside"),
    ("input", "/etc/passwd", r"input: '/etc/passwd' is outside the allowed roots .*MULTIGRAN_INPUT_ROOTS"),
    ("input", "{tmp}/in/../outside/*.jpg", r"input: .* is outside the allowed roots"),
    ("input", "file:///etc/passwd", r"input: 'file:///etc/passwd' is outside"),
    ("config", "/tmp/evil.yaml", r"config: '/tmp/evil.yaml' is outside the allowed roots .*CONFIG_ROOTS"),
])
def test_hostile_paths_are_refused(param: str, value: str, refusal: str, tmp_path: Path, deployment: Any) -> None:
    """input, output, config and publish_dir resolve (.., symlinks) under the deployment's roots."""
    tmp = str(tmp_path)
    with pytest.raises(rr.RequestRefused, match=refusal.replace("{tmp}", tmp)):
        rr.check_request(_params(tmp_path, **{param: value.replace("{tmp}", tmp)}), _params(tmp_path), deployment)


def test_publish_dir_in_the_output_is_refused(tmp_path: Path, deployment: Any) -> None:
    """Publishing into the output it copies from is refused, whatever the roots allow."""
    wide = replace(deployment, output_roots=(str(tmp_path),))
    for publish in (tmp_path / "published", tmp_path / "published" / "index"):
        with pytest.raises(rr.RequestRefused, match=r"publish_dir: .* lies in the output directory"):
            rr.check_request(_params(tmp_path, output=str(tmp_path / "published"), publish_dir=str(publish)),
                             _params(tmp_path), wide)


def test_benign_paths_pass_resolved(tmp_path: Path, deployment: Any) -> None:
    """Paths under the roots pass, local ones resolved (a link inside a root stays allowed)."""
    (tmp_path / "published" / "real").mkdir()
    params = _params(tmp_path, input=str(tmp_path / "in" / "**" / "*.jpg"), output="gs://bucket/out/run1",
                     config=str(tmp_path / "configs" / "ok.yaml"),
                     publish_dir=str(tmp_path / "published" / "inner"))
    request = rr.check_request(params, _params(tmp_path), deployment)
    assert request == rr.Request(input=str(tmp_path / "in" / "**" / "*.jpg"), output="gs://bucket/out/run1",
                                 config=str(tmp_path / "configs" / "ok.yaml"),
                                 publish_dir=str(tmp_path / "published" / "real"))
    for source in ("samples", "synthetic://3?seed=1&size=96", "gs://bucket/images/a/*.jpg"):
        assert rr.check_request(_params(tmp_path, input=source), _params(tmp_path), deployment).input == source
    assert rr.check_request(_params(tmp_path, output="gs://bucket/out"), _params(tmp_path), deployment).output \
        == "gs://bucket/out"


@pytest.mark.integration
@pytest.mark.parametrize("hostile", ["python", "extra_args", "publish_dir"])
def test_dag_refuses_a_hostile_trigger_before_any_work(hostile: str, airflow_env: None, tmp_path: Path) -> None:
    """A trigger naming an interpreter, a flag that moves the output, or a publish folder that is a
    link out of the publish root fails the build task at once (no retry): no command runs, nothing
    is written or published."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "published").mkdir()
    (tmp_path / "published" / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    conf = _conf(tmp_path) | {"python": {"python": "/bin/sh"}, "extra_args": {"extra_args": "--output=/etc"},
                              "publish_dir": {"publish_dir": str(tmp_path / "published" / "link")}}[hostile]
    run = dags_test(conf, tmp_path, env={"MULTIGRAN_PUBLISH_ROOT": str(tmp_path / "published")})
    log = run.stdout + run.stderr
    assert run.returncode != 0 and "DagRun failed" in log, log[-6000:]
    assert f"AirflowFailException: trigger refused: {hostile}" in log, log[-6000:]
    assert "up_for_retry" not in log.lower() and "running:" not in log, log[-6000:]
    assert "end task task_id=validate" not in log and "end task task_id=publish" not in log, log[-6000:]
    assert not (tmp_path / "out").exists() and not any((tmp_path / "outside").iterdir())


PUBLISH_THROUGH_LINK = """
import json, sys
from pathlib import Path
sys.path.insert(0, "dags")
import build_dataset as dag
from run_request import Request
out, published = Path(sys.argv[1]), Path(sys.argv[2])
try:
    dag.publish_output(Request(input="samples", output=str(out), config="", publish_dir=str(published)))
except ValueError as exc:
    print("refused:", exc)
"""


@pytest.mark.integration
def test_publish_refuses_a_link_inside_publish_dir(airflow_env: None, tmp_path: Path) -> None:
    """A link planted inside publish_dir (after the trigger was checked) is not written through."""
    out, published, outside = tmp_path / "out", tmp_path / "published", tmp_path / "outside"
    for folder in (out / "index" / "images", out / "index" / "regions", published, outside):
        folder.mkdir(parents=True)
    (out / "index" / "images" / "00000.parquet").write_bytes(b"table")
    (out / "README.md").write_text("card\n")
    (out / "manifest.json").write_text(json.dumps({"counts": {"inputs": 1, "written": 1, "failed": 0,
                                                              "in_shards": 1, "awaiting_retry": 0}}))
    (published / "index").symlink_to(outside, target_is_directory=True)
    command = ["bash", str(SETUP), "--", "python", "-c", PUBLISH_THROUGH_LINK, str(out), str(published)]
    run = subprocess.run(command, check=False, cwd=REPO, env=_clean_env(), capture_output=True, text=True,
                         timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log
    assert f"refused: {published / 'index' / 'images'} resolves outside publish_dir" in run.stdout, log
    assert not any(outside.rglob("*"))
