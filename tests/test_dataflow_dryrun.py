"""The job Dataflow would receive does not grow with the number of inputs: inputs are listed and
read by workers, never embedded in the pipeline (Dataflow rejects job graphs over ~20 MiB).

- In this venv: the portable pipeline proto (``create_pipeline(argv).to_runner_api()``) for a
  manifest of 100 rows and one of 100,000 rows.
- In a Dataflow venv (tools/dataflow/setup.sh: apache-beam[gcp] + this project): a real
  DataflowRunner translation, offline (``--dry_run=True --no_auth``), of the same two manifests;
  ``result.job.proto_pipeline`` is what the service would receive.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "tools" / "dataflow" / "setup.sh"
VENV = REPO / ".venv-dataflow"
ROWS = (100, 100_000)
SLACK_BYTES = 500   # the paths differ in length; nothing else may
DRY_RUN = ["--runner=DataflowRunner", "--dry_run=True", "--project=demo", "--region=us-central1",
           "--temp_location=gs://demo/tmp", "--sdk_location=container", "--no_auth"]

TRANSLATE = r'''
import json, sys, time
from pipelines.build_dataset import create_pipeline

flags, runs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
sizes = {}
for rows, manifest, output in runs:
    start = time.perf_counter()
    pipeline = create_pipeline(["--input", manifest, "--output", output, *flags])
    result = pipeline.run()
    proto = result.job.proto_pipeline
    sizes[rows] = {"bytes": len(proto.SerializeToString()), "state": str(result.state),
                   "transforms": sorted(t.unique_name for t in proto.components.transforms.values()),
                   "runner": type(pipeline.runner).__name__,
                   "job": type(result.job).__module__, "seconds": round(time.perf_counter() - start, 2)}
print(json.dumps(sizes))
'''


@pytest.fixture(scope="module")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """A manifest of 100 rows and one of 100,000 (paths only: the images need not exist to translate)."""
    root = tmp_path_factory.mktemp("manifests")
    found = {}
    for rows in ROWS:
        path = root / f"images-{rows}.jsonl"
        path.write_text("".join(json.dumps({"path": f"images/img-{i:07d}.jpg"}) + "\n" for i in range(rows)))
        found[rows] = path
    return found


def test_pipeline_size_does_not_grow_with_inputs(manifests: dict[int, Path], tmp_path: Path) -> None:
    from pipelines.build_dataset import create_pipeline

    sizes = {rows: len(create_pipeline(["--input", str(path), "--output", str(tmp_path / f"out-{rows}")])
                       .to_runner_api().SerializeToString())
             for rows, path in manifests.items()}
    assert abs(sizes[100] - sizes[100_000]) <= SLACK_BYTES, sizes
    assert not (tmp_path / "out-100").exists()   # constructing the pipeline writes nothing


@pytest.fixture(scope="module")
def dataflow_python() -> Path:
    """The Dataflow venv's python; skips only when the registry cannot provide the packages."""
    setup = subprocess.run(["bash", str(SETUP)], cwd=REPO, capture_output=True, text=True, timeout=1800)
    if setup.returncode == 3:
        pytest.skip(f"no Dataflow venv: the package registry could not provide apache-beam[gcp] "
                    f"(tools/dataflow/setup.sh):\n{setup.stderr[-2000:]}")
    assert setup.returncode == 0, f"tools/dataflow/setup.sh failed:\n{setup.stdout}\n{setup.stderr}"
    return VENV / "bin" / "python"


@pytest.mark.integration
@pytest.mark.slow
def test_dataflow_job_is_built_offline_and_does_not_grow(dataflow_python: Path, manifests: dict[int, Path],
                                                          tmp_path: Path) -> None:
    runs = [[rows, str(path), str(tmp_path / f"out-{rows}")] for rows, path in manifests.items()]
    result = subprocess.run([str(dataflow_python), "-c", TRANSLATE, json.dumps(DRY_RUN), json.dumps(runs)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    jobs = {int(rows): job for rows, job in json.loads(result.stdout.strip().splitlines()[-1]).items()}
    for job in jobs.values():
        assert job["runner"] == "DataflowRunner" and job["job"].startswith("apache_beam.runners.dataflow"), job
        assert job["bytes"] > 10_000
        assert any(name.endswith("WriteShards") for name in job["transforms"]), job["transforms"]
    small, large = jobs[100], jobs[100_000]
    assert small["transforms"] == large["transforms"]
    assert abs(small["bytes"] - large["bytes"]) <= SLACK_BYTES, {r: j["bytes"] for r, j in jobs.items()}
    assert not (tmp_path / "out-100").exists()   # a dry run writes nothing
