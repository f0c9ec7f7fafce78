"""The ready files for Dataflow, Flink and Spark (deploy/): every flag is one Beam 2.77 parses
with the meaning intended, the Dataflow config loads, the worker Dockerfile copies every package
and its Python install step resolves under constraints.txt. (Submitting to a real cluster or
building the image needs a cloud project and Docker Hub; README says how.)"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from apache_beam.options.pipeline_options import (DebugOptions, FlinkRunnerOptions, GoogleCloudOptions,
                                                  PipelineOptions, PortableOptions, SetupOptions,
                                                  SparkRunnerOptions, StandardOptions, WorkerOptions)

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "deploy" / "dataflow" / "Dockerfile"
ENVS = {
    "dataflow": {"PROJECT": "demo", "REGION": "us-central1", "BUCKET": "gs://demo-bucket",
                 "IMAGE": "us-central1-docker.pkg.dev/demo/images/multigran-worker:0.1.0",
                 "SUBNETWORK": "regions/us-central1/subnetworks/data", "SERVICE_ACCOUNT": "w@demo.iam"},
    "flink": {"FLINK_MASTER": "flink-jm:8081"},
    "spark": {"SPARK_MASTER": "spark://spark-master:7077"},
}


def flags(runner: str) -> list[str]:
    """The Beam flags deploy/RUNNER/run.sh passes (its --print-flags)."""
    run = subprocess.run(["bash", str(REPO / "deploy" / runner / "run.sh"), "--print-flags"], capture_output=True,
                         text=True, check=True, env={**os.environ, **ENVS[runner]})
    return run.stdout.splitlines()


def unknown(argv: list[str]) -> set[str]:
    """Flags Beam does not know (it would drop them with a warning)."""
    options = PipelineOptions(argv)
    return set(options.get_all_options(retain_unknown_options=True)) - set(options.get_all_options())


def test_dataflow_flags_mean_what_the_readme_says() -> None:
    argv = flags("dataflow")
    assert not unknown(argv), unknown(argv)
    options = PipelineOptions(argv)
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    cloud = options.view_as(GoogleCloudOptions)
    assert (cloud.project, cloud.region, cloud.temp_location) == ("demo", "us-central1", "gs://demo-bucket/tmp")
    assert cloud.dataflow_service_options == ["worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"]
    assert cloud.service_account_email == "w@demo.iam"
    worker = options.view_as(WorkerOptions)
    assert worker.sdk_container_image == ENVS["dataflow"]["IMAGE"] and worker.machine_type == "g2-standard-8"
    assert worker.max_num_workers == 8 and worker.disk_size_gb == 100 and worker.use_public_ips is False
    assert worker.subnetwork == ENVS["dataflow"]["SUBNETWORK"]
    assert set(options.view_as(DebugOptions).experiments) >= {"use_runner_v2", "no_use_multiple_sdk_containers"}
    assert options.view_as(SetupOptions).sdk_location == "container"


def test_flink_and_spark_flags() -> None:
    for runner in ("flink", "spark"):
        argv = flags(runner)
        assert not unknown(argv), (runner, unknown(argv))
        options = PipelineOptions(argv)
        portable = options.view_as(PortableOptions)
        assert (portable.environment_type, portable.environment_config) == ("EXTERNAL", "localhost:50000")
    flink = PipelineOptions(flags("flink"))
    assert flink.view_as(StandardOptions).runner == "FlinkRunner"
    assert flink.view_as(FlinkRunnerOptions).flink_master == "flink-jm:8081"
    assert flink.view_as(FlinkRunnerOptions).flink_version == "1.20"
    spark = PipelineOptions(flags("spark"))
    assert spark.view_as(StandardOptions).runner == "SparkRunner"
    assert spark.view_as(SparkRunnerOptions).spark_master_url == "spark://spark-master:7077"


def _beam_flags() -> set[str]:
    """Every flag Beam 2.77's options define (all PipelineOptions subclasses, runners' included)."""
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    for options in PipelineOptions.__subclasses__():
        options._add_argparse_args(parser)
    return {flag for action in parser._actions for flag in action.option_strings}


def _build_flags() -> set[str]:
    run = subprocess.run([sys.executable, "-m", "pipelines.build_dataset", "--help"], cwd=REPO,
                         capture_output=True, text=True, check=True)
    return set(re.findall(r"--[a-z][a-z0-9_-]*", run.stdout))


def test_every_flag_in_the_readme_runner_sections_exists() -> None:
    """Flags written in README's runner sections are Beam 2.77's or the build command's."""
    readme = (REPO / "README.md").read_text()
    sections = [s for s in re.split(r"\n## ", readme)
                if s.startswith(("Running on Dataflow", "Dataflow, Flink and Spark", "Segment Anything"))]
    assert len(sections) == 3
    written = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*(?:-[a-z0-9_]+)*", "\n".join(sections)))
    not_beam = written - _beam_flags() - _build_flags()
    # flags of vLLM's server, docker run and the worker image, not Beam's
    vllm = {"--served-model-name", "--max-model-len", "--limit-mm-per-prompt", "--enable-prefix-caching",
            "--max-num-seqs", "--gpu-memory-utilization", "--mm-processor-kwargs", "--api-key", "--host",
            "--port", "--tensor-parallel-size", "--gpus", "--worker_pool", "--net",
            "--print-flags"}   # and deploy/*/run.sh's own option
    assert not_beam <= vllm, sorted(not_beam - vllm)


def test_dataflow_config_loads() -> None:
    from pipelines.config import load_config

    config = load_config(str(REPO / "deploy" / "dataflow" / "sam-vllm.yaml"))
    assert config.segmenter["name"] == "sam-auto" and config.captioner["name"] == "vllm"


def test_dockerfile_copies_every_package() -> None:
    from setuptools import find_packages

    packages = {p.split(".")[0] for p in find_packages(
        str(REPO), include=["annotators*", "pipelines*", "schemas*", "settings*", "trainer*"])}
    copied = set(re.findall(r"^COPY (\w+)/ \1/$", DOCKERFILE.read_text(), flags=re.M))
    assert copied == packages


@pytest.mark.slow
@pytest.mark.integration
def test_dockerfile_install_step_resolves(tmp_path: Path) -> None:
    """The image's pip step, as a dry run in this Python: CUDA torch, SAM, Beam with gcp, the
    project, each at its pinned version."""
    text = DOCKERFILE.read_text()
    version = re.search(r"^ARG BEAM_VERSION=(\S+)$", text, flags=re.M).group(1)
    step = re.search(r"^RUN pip install (.+?) && pip check$", text, flags=re.M).group(1)
    args = [a.strip('"') for a in step.replace("${BEAM_VERSION}", version).split()]
    report = tmp_path / "report.json"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
                          "--quiet", "--report", str(report), *args], cwd=REPO, capture_output=True,
                         text=True, timeout=900)
    if run.returncode != 0 and re.search(r"NewConnectionError|Temporary failure in name resolution|"
                                         r"Network is unreachable", run.stderr):
        pytest.skip(f"no package registry: {run.stderr[-500:]}")
    assert run.returncode == 0, run.stderr[-4000:]
    installed = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
                 for i in json.loads(report.read_text())["install"]}
    assert installed["apache-beam"] == version and installed["multigran"] == "0.1.0"
    assert installed["torch"] == "2.14.0" and installed["segment-anything"] == "1.0"
    assert "google-cloud-storage" in installed and "openai" in installed
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    for name, pinned in pins.items():
        key = name.lower().replace("_", "-")
        if key in installed:
            assert installed[key] == pinned, (name, installed[key], pinned)
    logging.getLogger(__name__).info("%d packages", len(installed))
