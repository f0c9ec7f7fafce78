"""The settings hash covers what changes the output, and only that.

Run settings (transport, endpoints, timeouts, retries, server lifecycle, batch sizes, the failure
budget) may change between runs of one build without changing the hash; everything that can
change a caption, a mask or a shard's members must change it.
"""
from __future__ import annotations

import copy
import dataclasses
import pickle
from pathlib import Path
from typing import Any

import pytest
import yaml

from annotators import registry
from annotators.caption.backends.openai_api.settings import ClientSettings
from annotators.caption.backends.transformers_local import LocalClientSettings
from annotators.caption.program import load_program
from annotators.serving.managed_server import ServerSettings
from pipelines import config as config_module
from pipelines.config import LimitSettings, config_from_dict
from settings import ConfigError, run_only_fields

VLLM = {"name": "vllm", "model": "fake-vlm", "program": "umg",
        "endpoints": ["http://127.0.0.1:8000/v1"]}
SERVER = {"command": ["vllm", "serve", "/models/qwen2-vl", "--port", "{port}"]}
SAM = {"name": "sam-auto", "model_type": "tiny", "device": "cpu"}


def merged(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``change`` applied; nested mappings are merged, other values replaced."""
    out = copy.deepcopy(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def settings_hash(data: dict[str, Any]) -> str:
    return config_from_dict(data).settings_hash()


BASES: dict[str, dict[str, Any]] = {
    "vllm": {"captioner": VLLM},
    "vllm-server": {"captioner": {**{k: v for k, v in VLLM.items() if k != "endpoints"},
                                  "server": SERVER}},
    "vllm-named": {"captioner": {**VLLM, "program": "PROGRAM_WITH_TAGGER",
                                 "clients": {"tagger": {"model": "tag-model"}}}},
    "sam": {"segmenter": SAM},
    "transformers": {"captioner": {"name": "transformers", "model": "some-local-model"}},
    "default": {},
}


@pytest.fixture(scope="module")
def tagger_program(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A copy of the umg program whose tags step uses a second client named 'tagger'."""
    data = yaml.safe_load(Path(load_program("umg").source).read_text())
    for steps in data["steps"].values():
        for step in steps:
            if step["name"] == "tags":
                step["client"] = "tagger"
    path = tmp_path_factory.mktemp("programs") / "tagged.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def base_config(name: str, tagger_program: str) -> dict[str, Any]:
    data = copy.deepcopy(BASES[name])
    if data.get("captioner", {}).get("program") == "PROGRAM_WITH_TAGGER":
        data["captioner"]["program"] = tagger_program
    return data


RUN_CHANGES = [
    ("vllm", {"captioner": {"client": {"timeout_s": 7.5}}}),
    ("vllm", {"captioner": {"endpoints": ["http://127.0.0.1:8000/v1", "http://10.0.0.2:8000/v1"]}}),
    ("vllm", {"captioner": {"client": {"max_in_flight": 12}}}),
    ("vllm", {"captioner": {"client": {"max_retries": 9}}}),
    ("vllm", {"captioner": {"client": {"backoff_base_s": 2.0, "backoff_max_s": 60.0}}}),
    ("vllm", {"captioner": {"client": {"endpoint_fail_threshold": 9,
                                       "endpoint_cooldown_s": 1.0}}}),
    ("vllm", {"captioner": {"client": {"transport": "direct", "balance": "round_robin",
                                       "quiet_http_logs": False}}}),
    ("vllm", {"captioner": {"client": {"api_key_env": "OTHER_KEY"}}}),
    ("vllm-server", {"captioner": {"server": {"port": 8123, "host": "0.0.0.0"}}}),
    ("vllm-server", {"captioner": {"server": {"ready_timeout_s": 5.0, "poll_interval_s": 2.0,
                                              "max_restarts": 7, "stop_grace_s": 1.0}}}),
    ("vllm-server", {"captioner": {"server": {"env": {"CUDA_VISIBLE_DEVICES": "1"},
                                              "cwd": "/tmp", "log_path": "/tmp/server.log"}}}),
    ("vllm-named", {"captioner": {"clients": {"tagger": {"timeout_s": 3.0,
                                                         "max_in_flight": 4}}}}),
    ("transformers", {"captioner": {"batch_size": 2, "allow_download": True}}),
    ("default", {"batch": {"segment": 1, "caption": 32}}),
    ("default", {"limits": {"max_transient_fraction": 0.5, "min_samples": 5, "window": 50}}),
    ("default", {"dataset_name": "renamed"}),
]


@pytest.mark.parametrize("base,change", RUN_CHANGES,
                         ids=[f"{b}:{sorted(c)[0]}-{i}" for i, (b, c) in enumerate(RUN_CHANGES)])
def test_run_settings_leave_the_hash_unchanged(base: str, change: dict[str, Any],
                                               tagger_program: str) -> None:
    data = base_config(base, tagger_program)
    changed = merged(data, change)
    assert config_from_dict(changed).to_dict() != config_from_dict(data).to_dict()
    assert settings_hash(changed) == settings_hash(data)


OUTPUT_CHANGES = [
    ("sam", {"segmenter": {"points_per_batch": 16}}),   # batched kernels move scores by ~1e-6
    ("sam", {"segmenter": {"encoder_batch": 2}}),
    ("vllm", {"captioner": {"program": "longgrit"}}),
    ("vllm", {"captioner": {"model": "other-vlm"}}),
    ("vllm", {"captioner": {"client": {"temperature": 0.7}}}),
    ("vllm", {"captioner": {"client": {"seed": 1}}}),
    ("vllm", {"captioner": {"client": {"max_tokens": 64}}}),
    ("vllm", {"captioner": {"client": {"image_max_pixels": 200_000}}}),
    ("vllm", {"captioner": {"client": {"jpeg_quality": 80}}}),
    ("vllm", {"captioner": {"client": {"prompt_quality": 80}}}),
    ("vllm", {"captioner": {"client": {"prompt_format": "webp"}}}),
    ("vllm", {"captioner": {"client": {"extra_body": {"repetition_penalty": 1.1}}}}),
    ("vllm", {"captioner": {"client": {"answer_retries": 0}}}),
    ("vllm", {"captioner": {"client": {"answer_retry_temperature": 0.9}}}),
    ("vllm", {"captioner": {"client": {"refusal_phrases": ["nope"]}}}),
    ("vllm", {"captioner": {"client": {"repetition_max_repeats": 3}}}),
    ("vllm", {"captioner": {"client": {"allow_truncated": True}}}),
    ("vllm", {"captioner": {"client": {"max_answer_chars": 4096}}}),
    ("vllm-server", {"captioner": {"server": {"command": ["vllm", "serve", "/models/other",
                                                          "--port", "{port}"]}}}),
    ("vllm-named", {"captioner": {"clients": {"tagger": {"model": "other-tagger"}}}}),
    ("vllm-named", {"captioner": {"clients": {"tagger": {"temperature": 0.3}}}}),
    ("sam", {"segmenter": {"pred_iou_thresh": 0.5}}),
    ("sam", {"segmenter": {"stability_score_thresh": 0.7}}),
    ("sam", {"segmenter": {"points_per_side": 8}}),
    ("sam", {"segmenter": {"init_seed": 3}}),
    ("sam", {"segmenter": {"bf16": True}}),
    ("sam", {"segmenter": {"fast": True}}),
    ("sam", {"segmenter": {"name": "sam-boxes"}}),
    ("transformers", {"captioner": {"temperature": 0.5}}),
    ("transformers", {"captioner": {"dtype": "bfloat16"}}),
    ("transformers", {"captioner": {"max_new_tokens": 17}}),
    ("transformers", {"captioner": {"prompt_quality": 80}}),
    ("default", {"decode": {"max_side": 512}}),
    ("default", {"decode": {"jpeg_quality": 80}}),
    ("default", {"regions": {"max_regions": 8}}),
    ("default", {"regions": {"dedup_iou": 0.5}}),
    ("default", {"shards": {"samples_per_shard": 8}}),
    ("default", {"segmenter": {"name": "classical", "scale": 60.0}}),
    ("default", {"segmenter": {"name": "given", "use_boxes": False}}),
    ("default", {"captioner": {"name": "attributes", "texture_threshold": 10.0}}),
]


@pytest.mark.parametrize("base,change", OUTPUT_CHANGES,
                         ids=[f"{b}:{sorted(c)[0]}-{i}" for i, (b, c) in enumerate(OUTPUT_CHANGES)])
def test_output_settings_change_the_hash(base: str, change: dict[str, Any],
                                         tagger_program: str) -> None:
    data = base_config(base, tagger_program)
    assert settings_hash(merged(data, change)) != settings_hash(data)


def test_program_content_is_hashed_not_its_name(tmp_path: Path) -> None:
    source = Path(load_program("umg").source)
    same = tmp_path / "same.yaml"
    same.write_text(source.read_text())
    edited = tmp_path / "edited.yaml"
    data = yaml.safe_load(source.read_text())
    data["steps"]["pixel"][0]["prompt"] += " Be brief."
    edited.write_text(yaml.safe_dump(data))
    base = settings_hash({"captioner": VLLM})
    assert settings_hash({"captioner": {**VLLM, "program": str(same)}}) == base
    assert settings_hash({"captioner": {**VLLM, "program": str(edited)}}) != base


def test_visual_prompt_defaults_and_versions_are_hashed(monkeypatch: pytest.MonkeyPatch) -> None:
    from annotators.caption import visual_prompts

    base = settings_hash({"captioner": VLLM})
    monkeypatch.setattr(visual_prompts, "VERSION", visual_prompts.VERSION + "-changed")
    assert settings_hash({"captioner": VLLM}) != base


def test_annotator_and_pipeline_versions_are_hashed(monkeypatch: pytest.MonkeyPatch) -> None:
    from annotators.caption.backends.openai_api.captioner import VllmCaptioner

    base = settings_hash({"captioner": VLLM})
    monkeypatch.setattr(VllmCaptioner, "version", "2")
    assert settings_hash({"captioner": VLLM}) != base
    monkeypatch.undo()
    monkeypatch.setattr(config_module, "PIPELINE_VERSION", "9.9.9")
    assert settings_hash({"captioner": VLLM}) != base


def test_defaults_written_out_hash_like_defaults_left_out() -> None:
    explicit = merged({"captioner": VLLM}, {"captioner": {"client": {"temperature": 0.0,
                                                                     "seed": 0}}})
    assert settings_hash(explicit) == settings_hash({"captioner": VLLM})


def test_run_settings_stay_in_the_manifest_dict() -> None:
    data = merged({"captioner": VLLM}, {"captioner": {"client": {"timeout_s": 7.5}},
                                        "limits": {"window": 300}, "batch": {"caption": 3}})
    config = config_from_dict(data)
    plain = config.to_dict()
    assert plain["captioner"]["client"]["timeout_s"] == 7.5
    assert plain["captioner"]["endpoints"] == VLLM["endpoints"]
    assert plain["limits"] == {"max_transient_fraction": 0.05, "min_samples": 20, "window": 300}
    assert plain["batch"]["caption"] == 3
    assert config.run_settings() == {"batch": plain["batch"], "limits": plain["limits"],
                                     "dataset_name": "dataset"}
    hashed = str(config.hashed_settings())
    assert "timeout_s" not in hashed and "endpoints" not in hashed and "limits" not in hashed


def test_hash_follows_changes_after_it_was_computed_and_survives_pickling() -> None:
    config = config_from_dict({"captioner": VLLM})
    first = config.settings_hash()
    config.decode.max_side = 512
    second = config.settings_hash()
    assert second != first
    config.batch.caption = 2
    assert config.settings_hash() == second
    assert pickle.loads(pickle.dumps(config)).settings_hash() == second
    assert dataclasses.replace(config).settings_hash() == second


@pytest.mark.parametrize("limits,field_name", [
    ({"max_transient_fraction": 0}, "limits.max_transient_fraction"),
    ({"max_transient_fraction": 1.5}, "limits.max_transient_fraction"),
    ({"max_transient_fraction": -0.1}, "limits.max_transient_fraction"),
    ({"min_samples": 0}, "limits.min_samples"),
    ({"window": 10}, "limits.window"),
    ({"min_samples": 50, "window": 40}, "limits.window"),
    ({"window": "200"}, "limits.window"),
    ({"windw": 200}, "limits.windw"),
])
def test_bad_limits_are_config_errors_naming_the_field(limits: dict[str, Any],
                                                       field_name: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field_name}: "):
        config_from_dict({"limits": limits})


def test_limits_defaults_and_edges() -> None:
    assert config_from_dict({}).limits == LimitSettings(0.05, 20, 200)
    edge = config_from_dict({"limits": {"max_transient_fraction": 1, "min_samples": 1,
                                        "window": 1}}).limits
    assert (edge.max_transient_fraction, edge.min_samples, edge.window) == (1, 1, 1)


def test_run_only_names_real_fields() -> None:
    classes = [ClientSettings, ServerSettings, LocalClientSettings]
    for table in (registry.SEGMENTERS, registry.CAPTIONERS):
        for name in table:
            classes.append(registry._load(table, "annotator", name).Settings)
    for cls in classes:
        run_only_fields(cls)   # raises on a name that is not a field

    @dataclasses.dataclass
    class Broken:
        a: int = 0
        RUN_ONLY = frozenset({"b"})

    with pytest.raises(TypeError, match="Broken.RUN_ONLY"):
        run_only_fields(Broken)
