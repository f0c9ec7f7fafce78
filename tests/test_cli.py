"""The command line: progress, --print-config with secrets masked, quiet logs, --help."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines import progress
from pipelines.config import mask_secrets

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.build_dataset", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_secrets_are_masked_everywhere_in_a_settings_tree() -> None:
    settings = {"captioner": {"server": {"command": ["vllm", "serve", "m", "--api-key", "sk-live-123456789",
                                                      "--hf-token=hf_abcdefghijkl", "--port", "8000"],
                                         "env": {"HF_TOKEN": "hf_abcdefghijkl", "OMP_NUM_THREADS": "4"}},
                              "client": {"extra_body": {"api_key": "x"}, "api_key_env": "VLLM_API_KEY",
                                         "timeout_s": 5}},
                "note": "sk-abcdefghijklmnop"}
    masked = mask_secrets(settings)
    text = yaml.safe_dump(masked)
    for secret in ("sk-live-123456789", "hf_abcdefghijkl", "sk-abcdefghijklmnop"):
        assert secret not in text
    assert masked["captioner"]["server"]["command"] == ["vllm", "serve", "m", "--api-key", "***",
                                                        "--hf-token=***", "--port", "8000"]
    assert masked["captioner"]["server"]["env"]["OMP_NUM_THREADS"] == "4"
    assert masked["captioner"]["client"]["timeout_s"] == 5


def test_progress_lines_sum_every_worker(tmp_path: Path) -> None:
    out, run = str(tmp_path), "run1"
    assert "listing inputs" in progress.line(progress.read(out, run), 1.0)
    progress.write_total(10, out, run)
    base = Path(progress.progress_dir(out, run))
    (base / "1-a.json").write_text('{"done": 3, "written": 2, "permanent": 1, "transient": 0}')
    (base / "2-b.json").write_text('{"done": 2, "written": 1, "permanent": 0, "transient": 1, '
                                   '"in_flight": 7}')
    counts = progress.read(out, run)
    assert counts == {"done": 5, "written": 3, "permanent": 1, "transient": 1, "in_flight": 7, "total": 10}
    text = progress.line(counts, 10.0)
    assert text.startswith("images 5/10 (50%) · 0.5 img/s · ETA 10s")
    assert "1 permanent, 1 transient · 7 requests in flight" in text


@pytest.mark.slow
def test_cli_shows_progress_prints_config_and_stays_quiet(tmp_path: Path) -> None:
    built = _cli("--input", "synthetic://3?size=64", "--output", str(tmp_path / "out"))
    assert built.returncode == 0, built.stderr
    assert "images 3/3 (100%)" in built.stderr and "done" in built.stderr   # not a TTY: log lines
    assert "WARNING" not in built.stderr and "apitools" not in built.stderr
    assert not (tmp_path / "out" / "_work" / "progress").exists()
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"captioner": {"name": "vllm", "model": "m", "server": {
        "command": ["python", "-m", "vllm.entrypoints.openai.api_server", "--api-key", "sk-secret-value-1"],
        "env": {"HF_TOKEN": "hf_secretsecret"}}}}))
    shown = _cli("--input", "samples", "--config", str(config), "--print-config")
    assert shown.returncode == 0, shown.stderr
    assert "sk-secret-value-1" not in shown.stdout and "hf_secretsecret" not in shown.stdout
    assert "settings_hash:" in shown.stdout and "samples_per_shard: 64" in shown.stdout
    helped = _cli("--help")
    assert "examples:" in helped.stdout and "--prune-vanished" in helped.stdout


@pytest.mark.slow
def test_secrets_reach_no_output_and_do_not_change_the_hash(tmp_path: Path) -> None:
    from pipelines.config import config_from_dict
    from tests.conftest import build
    from tests.fault_server import FaultConfig, serve_faults

    def config(url: str, key: str) -> dict:
        return {"segmenter": {"name": "given"}, "regions": {"max_regions": 2, "min_area_frac": 0.0},
                "captioner": {"name": "vllm", "model": "fake-vlm", "program": "umg", "endpoints": [url],
                              "client": {"extra_body": {"api_key": key}}}}

    with serve_faults(FaultConfig()) as server:
        out, _ = build(tmp_path, "synthetic://2?size=64", config=config(server.base_url, "sk-first-secret-1"))
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ".tar", ".parquet"):
            assert b"sk-first-secret-1" not in path.read_bytes(), path
    first = config_from_dict(config("http://x/v1", "sk-first-secret-1")).settings_hash()
    second = config_from_dict(config("http://x/v1", "sk-other-secret-2")).settings_hash()
    assert first == second
    served = {"name": "vllm", "model": "m", "server": {"command": ["serve", "--api-key", "sk-a-secret-1"]}}
    other = {"name": "vllm", "model": "m", "server": {"command": ["serve", "--api-key", "sk-b-secret-2"]}}
    assert config_from_dict({"captioner": served}).settings_hash() == \
        config_from_dict({"captioner": other}).settings_hash()


@pytest.mark.parametrize("text, hidden, kept", [
    ("http_401 at http://user:pw123@host:8000/v1", "pw123", "host:8000/v1"),
    ("Authorization: Bearer sk-abcdefghijkl1", "sk-abcdefghijkl1", "Bearer"),
    ("api_key=abc123 more", "abc123", "more"),
    ("GET https://x/v1?key=AIzaSy123&b=1", "AIzaSy123", "b=1"),
    ("HF_TOKEN=hf_xyzxyzxyz1 set", "hf_xyzxyzxyz1", "set"),
    ("password: hunter2", "hunter2", "password"),
])
def test_free_text_secrets_are_masked(text: str, hidden: str, kept: str) -> None:
    from settings.secrets import mask_text

    masked = mask_text(text)
    assert hidden not in masked and kept in masked and "***" in masked


def test_free_text_without_secrets_is_unchanged() -> None:
    from settings.secrets import mask_text

    for text in ("max_tokens=512 reached", "token budget: 5 tokens left", "http_503 at http://127.0.0.1:8000/v1"):
        assert mask_text(text) == text


def test_failure_rows_and_budget_messages_carry_no_credentials() -> None:
    from pipelines.budget import endpoint_of
    from pipelines.types import Failure

    detail = "HTTP 503 from http://svc:s3cr3t-pass@10.0.0.5:8000/v1 (Authorization: Bearer sk-abcdefghijkl1)"
    row = Failure("k", "a.png", "caption", "http_503", detail).row()
    assert "s3cr3t-pass" not in row["detail"] and "sk-abcdefghijkl1" not in row["detail"]
    assert "10.0.0.5:8000/v1" in row["detail"]
    assert endpoint_of(detail) == "http://***@10.0.0.5:8000/v1"
