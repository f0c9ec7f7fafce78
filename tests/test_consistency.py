"""`consistency` filter: region text ↔ pixels scores from tiny random open_clip and RegionCLIP models.

Nothing is downloaded: the open_clip model is built from a model-config JSON written here, the
RegionCLIP from the trainer's own tiny config, and both are saved the way their users save them.
Scores are checked against paths the scorer does not use (open_clip's encoders on crops made
here; the trainer's shard sample → batch → ``evaluate.embed`` path).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from annotators.filter.consistency import ConsistencyScorer, RegionText
from settings import ConfigError
from trainer.checkpoint import save
from trainer.config import load_config
from trainer.evaluate import embed
from trainer.model import MODEL_CONFIGS, build_model, load_weights
from trainer.optim import build_optimizer, build_scheduler
from trainer.samples import SampleOptions, build_example, collate
from trainer.testing import make_sample

TEXTS = ["a red square on grey", "a blue bar", "green grass under a sky", "two cats"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model-config JSON, state dict) of a tiny random open_clip model."""
    root = tmp_path_factory.mktemp("open_clip")
    config = root / "consistency-tiny.json"
    config.write_text((MODEL_CONFIGS / "mg-tiny.json").read_text())
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("consistency-tiny")
    weights = root / "tiny.pt"
    torch.save(model.state_dict(), weights)
    return config, weights


def _trainer_checkpoint(root: Path, alpha_std: float) -> Path:
    """A tiny RegionCLIP saved by ``trainer.checkpoint.save``; mask conv ~ N(0, alpha_std)."""
    cfg = load_config(None, ["model.name=mg-tiny"])
    torch.manual_seed(0)
    model, _ = build_model(cfg)
    if alpha_std:
        with torch.no_grad():
            model.mask_conv.alpha.weight.normal_(std=alpha_std)
    optimizer = build_optimizer(model, cfg)
    return save(root, 1, model, optimizer, build_scheduler(optimizer, cfg), {}, cfg, keep=1)


@pytest.fixture(scope="module")
def trainer_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _trainer_checkpoint(tmp_path_factory.mktemp("trainer"), alpha_std=0.5)


@pytest.fixture(scope="module")
def inert_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """As trained from scratch at step 0: the mask conv is still zero."""
    return _trainer_checkpoint(tmp_path_factory.mktemp("inert"), alpha_std=0.0)


def _image(height: int = 80, width: int = 96) -> np.ndarray:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image[10:40, 20:60] = (220, 40, 40)
    image[50:75, 5:90] = (40, 80, 220)
    return image


def _mask(height: int, width: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _regions() -> list[RegionText]:
    return [RegionText([20.0, 10.0, 40.0, 30.0], _mask(80, 96, 12, 38, 25, 55), TEXTS[0]),
            RegionText([5.0, 50.0, 85.0, 25.0], _mask(80, 96, 50, 75, 5, 90), TEXTS[1]),
            RegionText([0.0, 0.0, 96.0, 80.0], None, TEXTS[2]),
            RegionText([70.5, 3.2, 20.1, 30.7], _mask(80, 96, 5, 30, 72, 88), TEXTS[3])]


def _clip(clip_files: tuple[Path, Path], **extra: object) -> ConsistencyScorer:
    config, weights = clip_files
    scorer = ConsistencyScorer({"model": "open_clip", "checkpoint": str(weights), "arch": str(config),
                                "device": "cpu", **extra})
    scorer.setup()
    return scorer


# --------------------------------------------------------------------------- open_clip


def test_open_clip_score_is_the_cosine_of_open_clips_own_encoders(clip_files: tuple[Path, Path]) -> None:
    """Region 0's box [20,10,40,30] grown 10% is x 16..64, y 7..43 (48×36), padded to 48×48 with
    the mean colour, outside the mask greyed; encoded by a separately loaded model."""
    image, regions = _image(), _regions()
    scores = _clip(clip_files).score(image, regions[:1])
    fill = tuple(round(255 * m) for m in open_clip.OPENAI_DATASET_MEAN)
    crop = image[7:43, 16:64].copy()
    crop[~regions[0].mask[7:43, 16:64]] = fill
    square = np.empty((48, 48, 3), np.uint8)
    square[:] = fill
    square[6:42] = crop
    model = open_clip.create_model("consistency-tiny", pretrained=str(clip_files[1])).eval()
    pixels = open_clip.image_transform(64, is_train=False)(Image.fromarray(square))[None]
    with torch.no_grad():
        a = model.encode_image(pixels, normalize=True)
        b = model.encode_text(open_clip.tokenize([TEXTS[0]]), normalize=True)
    assert scores[0] == pytest.approx(float((a * b).sum()), abs=1e-5)
    assert -1.0 <= scores[0] <= 1.0


def test_other_texts_give_other_scores_and_repeats_the_same(clip_files: tuple[Path, Path]) -> None:
    scorer, image, region = _clip(clip_files), _image(), _regions()[0]
    scores = scorer.score(image, [region._replace(text=t) for t in TEXTS])
    assert len(set(scores)) == len(TEXTS)
    assert scorer.score(image, [region._replace(text=t) for t in TEXTS]) == scores


def test_scores_follow_the_texts_and_not_the_batching(clip_files: tuple[Path, Path]) -> None:
    """Every (region, text) pair scored alone equals the same pair inside a shuffled batch of all
    pairs, at batch size 1 and 64."""
    image, regions = _image(), _regions()
    pairs = [r._replace(text=t) for r in regions for t in TEXTS]
    single = _clip(clip_files)
    alone = [single.score(image, [p])[0] for p in pairs]
    order = np.random.default_rng(1).permutation(len(pairs))
    for batch_size in (1, 64):
        batched = _clip(clip_files, batch_size=batch_size).score(image, [pairs[i] for i in order])
        np.testing.assert_allclose(batched, [alone[i] for i in order], atol=1e-5)
    matrix = np.array(alone).reshape(len(regions), len(TEXTS))
    assert not np.allclose(matrix, matrix[:, :1])       # the text matters, per region
    assert not np.allclose(matrix, matrix[:1, :])       # the pixels matter, per text


def test_masked_crop_greys_outside_the_mask_with_the_mean_colour(clip_files: tuple[Path, Path]) -> None:
    """A partial mask changes the score; a mask over the whole crop, or an image already the mean
    colour outside the mask, does not (so the grey is exactly the model's mean colour)."""
    image, region = _image(), _regions()[0]
    masked, box = _clip(clip_files), _clip(clip_files, crop="box")
    assert masked.score(image, [region]) != pytest.approx(box.score(image, [region]), abs=1e-4)
    full = region._replace(mask=np.ones(image.shape[:2], bool))
    assert masked.score(image, [full]) == box.score(image, [full])
    grey = image.copy()
    grey[~region.mask] = tuple(round(255 * m) for m in open_clip.OPENAI_DATASET_MEAN)
    assert masked.score(grey, [region]) == pytest.approx(box.score(grey, [region]), abs=1e-6)


def test_empty_text_scores_zero_and_threshold_judges(clip_files: tuple[Path, Path]) -> None:
    image, regions = _image(), _regions()
    scorer = _clip(clip_files, threshold=0.5, action="flag")
    scores = scorer.score(image, [regions[0]._replace(text="  "), regions[1]])
    assert scores[0] == 0.0 and scores[1] == _clip(clip_files).score(image, [regions[1]])[0]
    assert scorer.rejects(0.49) and not scorer.rejects(0.5) and scorer.rejects(math.nan)
    assert not _clip(clip_files).rejects(-1.0)
    assert scorer.score(image, []) == []


def test_provenance_names_the_weights_by_hash(clip_files: tuple[Path, Path]) -> None:
    config, weights = clip_files
    scorer = ConsistencyScorer({"model": "open_clip", "checkpoint": str(weights), "arch": str(config),
                                "threshold": 0.2, "batch_size": 8})
    expected = {"name": "consistency", "version": "1", "model": "open_clip", "arch": "consistency-tiny",
                "checkpoint": "tiny.pt", "checkpoint_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()[:12],
                "text": "long_caption", "crop": "masked", "threshold": 0.2, "action": "drop"}
    assert scorer.provenance() == expected          # before setup: nothing loaded
    assert "batch_size" not in scorer.hash_view()["settings"]


# --------------------------------------------------------------------------- trainer


def _trainer(checkpoint: Path, **extra: object) -> ConsistencyScorer:
    scorer = ConsistencyScorer({"model": "trainer", "checkpoint": str(checkpoint), "device": "cpu", **extra})
    scorer.setup()
    return scorer


def _notched(sample: dict) -> dict:
    """The sample with a quarter cut out of each mask (its box unchanged): masks that are not boxes."""
    record = json.loads(sample["json"])
    for region in record["regions"]:
        if region["mask"] is not None:
            x, y, w, h = region["bbox"]
            mask = mask_utils.decode({"size": region["mask"]["size"], "counts": region["mask"]["counts"].encode()})
            mask[y:y + h // 2, x:x + w // 2] = 0
            encoded = mask_utils.encode(np.asfortranarray(mask))
            region["mask"]["counts"] = encoded["counts"].decode()
            region["area"] = float(mask.sum())
    return {**sample, "json": json.dumps(record).encode()}


def test_trainer_scores_match_the_trainers_own_data_and_eval_path(trainer_ckpt: Path) -> None:
    """A shard sample through build_example → collate → evaluate.embed gives the same cosines as
    the scorer on the decoded image and masks: long captions on the mask branch, captions on the
    crop branch."""
    sample = _notched(make_sample("k0", np.random.default_rng(3), size=48))
    record = json.loads(sample["json"])
    image = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
    cfg = load_config(trainer_ckpt / "config.yaml")
    model, tokenizer = build_model(cfg)
    load_weights(model, trainer_ckpt / "model.safetensors")
    opts = SampleOptions(image_size=model.image_size, regions_per_image=100, crop_context=cfg.data.crop_context)
    batch = collate([build_example(sample, opts)], tokenizer) | {"worker": 0, "errors": {}}
    emb = embed(model.eval(), [batch], lambda b: b)["emb"]
    regions = [RegionText(r["bbox"], None if r["mask"] is None else
                          mask_utils.decode({"size": r["mask"]["size"], "counts": r["mask"]["counts"].encode()}),
                          "") for r in record["regions"]]
    long = _trainer(trainer_ckpt).score(image, [r._replace(text=x["long_caption"])
                                                for r, x in zip(regions, record["regions"])])
    short = _trainer(trainer_ckpt, text="caption").score(image, [r._replace(text=x["caption"])
                                                                 for r, x in zip(regions, record["regions"])])
    np.testing.assert_allclose(long, (emb["mask"] * emb["long"]).sum(-1).numpy(), atol=1e-5)
    np.testing.assert_allclose(short, (emb["crop"] * emb["short"]).sum(-1).numpy(), atol=1e-5)
    assert len(set(np.round(long, 6))) > 1


def test_trainer_mask_matters_once_the_mask_conv_is_trained(trainer_ckpt: Path, inert_ckpt: Path) -> None:
    """Same box, different masks: different scores on both branches; with the zero-initialised
    mask conv the mask branch sees only the whole image, so the scores are equal."""
    image = _image()
    box = [20.0, 10.0, 40.0, 30.0]
    a = RegionText(box, _mask(80, 96, 10, 40, 20, 60), TEXTS[0])
    b = RegionText(box, _mask(80, 96, 10, 25, 20, 40), TEXTS[0])
    for text in ("long_caption", "caption"):
        scores = _trainer(trainer_ckpt, text=text).score(image, [a, b])
        assert abs(scores[0] - scores[1]) > 1e-4, text
    inert = _trainer(inert_ckpt).score(image, [a, b, a._replace(mask=None)])
    assert inert[0] == pytest.approx(inert[1], abs=1e-6) == pytest.approx(inert[2], abs=1e-6)


def test_trainer_checkpoint_folder_or_weights_file(trainer_ckpt: Path) -> None:
    image, regions = _image(), _regions()
    by_folder = _trainer(trainer_ckpt, batch_size=2).score(image, regions)
    by_file = _trainer(trainer_ckpt / "model.safetensors").score(image, regions)
    np.testing.assert_allclose(by_folder, by_file, atol=1e-5)
    prov = _trainer(trainer_ckpt, text="caption").provenance()
    assert prov["model"] == "trainer" and prov["arch"] == "mg-tiny" and prov["crop"] == "trainer:crop"
    assert prov["checkpoint"] == f"{trainer_ckpt.name}/model.safetensors"
    digest = hashlib.sha256((trainer_ckpt / "model.safetensors").read_bytes()).hexdigest()[:12]
    assert prov["checkpoint_sha256"] == digest


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(("change", "field", "says"), [
    ({"checkpoint": "/no/such/weights.pt"}, "consistency.checkpoint", "not a file"),
    ({"model": "clip"}, "consistency.model", "open_clip, trainer"),
    ({"threshold": 1.5}, "consistency.threshold", "[-1, 1]"),
    ({"action": "delete"}, "consistency.action", "drop, flag"),
    ({"text": "tags"}, "consistency.text", "long_caption, caption"),
    ({"crop": "tight"}, "consistency.crop", "masked, box"),
    ({"arch": ""}, "consistency.arch", "ViT-B-32"),
    ({"arch": "hf-hub:org/model"}, "consistency.arch", "not supported"),
    ({"batch_size": 0}, "consistency.batch_size", "1 or more"),
    ({"device": "gpu"}, "consistency.device", "cuda"),
])
def test_bad_settings_name_the_field(clip_files: tuple[Path, Path], change: dict, field: str, says: str) -> None:
    config, weights = clip_files
    values = {"model": "open_clip", "checkpoint": str(weights), "arch": str(config), **change}
    with pytest.raises(ConfigError) as info:
        ConsistencyScorer(values)
    assert str(info.value).startswith(field + ":") and says in str(info.value)


def test_missing_settings_and_unknown_arch(clip_files: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing required setting\(s\) \['model', 'checkpoint'\]"):
        ConsistencyScorer(None)
    unknown = ConsistencyScorer({"model": "open_clip", "checkpoint": str(clip_files[1]), "arch": "No-Such-Net"})
    with pytest.raises(ConfigError, match=r"^consistency\.arch: 'No-Such-Net' is neither"):
        unknown.setup()
    with pytest.raises(ConfigError, match=r"^consistency\.checkpoint: .* training output folder"):
        (tmp_path / "checkpoints").mkdir()
        ConsistencyScorer({"model": "trainer", "checkpoint": str(tmp_path)})
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"^consistency\.arch: .*config\.yaml"):
        ConsistencyScorer({"model": "trainer", "checkpoint": str(weights)})
