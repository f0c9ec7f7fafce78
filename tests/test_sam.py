"""SAM segmenters end to end on a tiny randomly initialised SAM (real generator and predictor code).

Random weights give few, arbitrary masks, so the tests check code paths and contracts: RLE round
trips, bbox/area agree with the mask, filters are applied, the fast generator reproduces the stock
one, sam-boxes answers once per box in one decoder call, checkpoints load from files, provenance.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamPredictor
from segment_anything.modeling.image_encoder import ImageEncoderViT
from segment_anything.utils.amg import mask_to_rle_pytorch

from annotators.base import AnnotatorFailure, SegmentInput, SegmentOutput
from annotators.registry import build_segmenter
from annotators.segment import masks, sam_fast
from annotators.segment.frame import InputFrame
from annotators.segment.sam import SamAutoSegmenter, SamBoxesSegmenter
from annotators.segment.sam_model import build_tiny_sam
from bench import sam_bench
from settings import ConfigError

# Thresholds at which the tiny model keeps some masks and drops others.
LOOSE = {"pred_iou_thresh": 0.7, "stability_score_thresh": 0.5}
# No score filters: on a black background the tiny model with seed 2 gives distinct, local masks.
UNFILTERED = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "init_seed": 2}


def shapes_image(height: int = 128, width: int = 160, background: tuple[int, int, int] = (40, 70, 100),
                 seed: int = 0) -> np.ndarray:
    """A small RGB image with a few flat shapes and a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    img = np.zeros((height, width, 3), np.float64) + background
    img[15:70, 20:90] = [235, 235, 235]
    img[(yy - 85) ** 2 + (xx - 115) ** 2 < 30 ** 2] = [210, 40, 30]
    img[90:125, 5:55] = [30, 190, 60]
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def auto(**settings: Any) -> SamAutoSegmenter:
    """A set-up sam-auto segmenter on the tiny model (CPU)."""
    segmenter = SamAutoSegmenter({"model_type": "tiny", "device": "cpu", "points_per_side": 8,
                                  **settings})
    segmenter.setup()
    return segmenter


def run_one(segmenter: Any, rgb: np.ndarray, given: dict | None = None) -> SegmentOutput:
    """Segment one image and insist on a SegmentOutput."""
    out = segmenter.segment_batch([SegmentInput("k", rgb, given)])[0]
    assert isinstance(out, SegmentOutput), out
    return out


def comparable(out: SegmentOutput) -> list[tuple]:
    """Everything about an output's candidates, for exact comparison."""
    return [(c.rle, c.bbox, c.area, c.scores, c.source) for c in out.candidates]


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return shapes_image()


@pytest.fixture(scope="module")
def many(image: np.ndarray) -> SegmentOutput:
    """Stock sam-auto output with NMS off, so many candidates survive."""
    return run_one(auto(box_nms_thresh=1.0, **LOOSE), image)


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("settings, field", [
    ({"model_type": "vit_x"}, "segmenter.model_type"),
    ({"model_type": "vit_h"}, "segmenter.checkpoint"),
    ({"model_type": "tiny", "points_per_side": 0}, "segmenter.points_per_side"),
    ({"model_type": "tiny", "points_per_side": "8"}, "segmenter.points_per_side"),
    ({"model_type": "tiny", "pred_iou_thresh": 1.5}, "segmenter.pred_iou_thresh"),
    ({"model_type": "tiny", "box_nms_thresh": 0.0}, "segmenter.box_nms_thresh"),
    ({"model_type": "tiny", "device": "gpu"}, "segmenter.device"),
    ({"model_type": "tiny", "min_mask_region_area": -1}, "segmenter.min_mask_region_area"),
    ({"model_type": "tiny", "points_per_sides": 8}, "segmenter.points_per_sides"),
    ({"model_type": "vit_b", "random_weights": True, "checkpoint": "x.pth"},
     "segmenter.random_weights"),
    ({"model_type": "tiny", "checkpoint": "x.pth", "checkpoint_sha256": "abc"},
     "segmenter.checkpoint_sha256"),
])
def test_bad_settings_name_the_field(settings: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build_segmenter({"name": "sam-auto", **settings})


def test_registry_and_defaults() -> None:
    auto_seg = build_segmenter({"name": "sam-auto", "model_type": "tiny"})
    boxes_seg = build_segmenter({"name": "sam-boxes", "model_type": "tiny"})
    assert isinstance(auto_seg, SamAutoSegmenter) and isinstance(boxes_seg, SamBoxesSegmenter)
    s = auto_seg.settings
    assert (s.points_per_side, s.pred_iou_thresh, s.stability_score_thresh, s.box_nms_thresh,
            s.fast, s.bf16, s.device) == (32, 0.88, 0.95, 0.7, False, False, "auto")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"segmenter\.device"):
            build_segmenter({"name": "sam-auto", "model_type": "tiny", "device": "cuda:0"}).setup()


def test_tiny_model_is_small_and_seeded() -> None:
    a, b, c = build_tiny_sam(0), build_tiny_sam(0), build_tiny_sam(1)
    assert 300_000 < sum(p.numel() for p in a.parameters()) < 500_000
    assert a.image_encoder.img_size == 256
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


# --------------------------------------------------------------------------- sam-auto


def assert_mask_contract(out: SegmentOutput, image: np.ndarray, thresholds: dict) -> None:
    """Every candidate: str RLE of the image size that round-trips; bbox/area measured on it."""
    h, w = image.shape[:2]
    for cand in out.candidates:
        assert cand.source == "sam-auto" and cand.rle is not None
        assert isinstance(cand.rle["counts"], str) and cand.rle["size"] == [h, w]
        decoded = mask_utils.decode({"size": cand.rle["size"], "counts": cand.rle["counts"].encode()})
        again = mask_utils.encode(np.asfortranarray(decoded))
        assert again["counts"].decode() == cand.rle["counts"]           # RLE round trip
        ys, xs = np.nonzero(decoded)
        tight = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                 float(ys.max() - ys.min() + 1)]
        assert cand.bbox == tight == masks.bbox(cand.rle)
        assert cand.area == float(decoded.sum()) == masks.area(cand.rle)
        assert set(cand.scores) == {"predicted_iou", "stability"}
        assert cand.scores["predicted_iou"] > thresholds["pred_iou_thresh"]
        assert cand.scores["stability"] >= thresholds["stability_score_thresh"]


def test_auto_candidates_follow_the_mask_contract(image: np.ndarray, many: SegmentOutput) -> None:
    assert len(many.candidates) > 5
    assert_mask_contract(many, image, LOOSE)
    dark = shapes_image(background=(0, 0, 0))
    local = run_one(auto(**UNFILTERED), dark)
    assert any(c.bbox[2] < dark.shape[1] / 2 for c in local.candidates)
    assert_mask_contract(local, dark, UNFILTERED)


def test_auto_filters_apply(image: np.ndarray, many: SegmentOutput) -> None:
    with_nms = run_one(auto(**LOOSE), image)
    assert 0 < len(with_nms.candidates) < len(many.candidates)
    strict = run_one(auto(pred_iou_thresh=0.85, stability_score_thresh=0.5, box_nms_thresh=1.0),
                     image)
    assert len(strict.candidates) < len(many.candidates)


def test_zero_mask_image_is_a_valid_empty_output(tmp_path: Path) -> None:
    model = build_tiny_sam(0)
    with torch.no_grad():
        model.mask_decoder.iou_prediction_head.layers[-1].bias.fill_(-10.0)   # IoU always -10
    path = tmp_path / "never.pth"
    torch.save(model.state_dict(), path)
    for fast in (False, True):
        for crop_n_layers in (0, 1):
            segmenter = auto(checkpoint=str(path), pred_iou_thresh=0.5, fast=fast,
                             crop_n_layers=crop_n_layers)
            out = run_one(segmenter, shapes_image())
            assert out.candidates == [] and out.dropped == {}


def test_checkpoint_file_round_trip(tmp_path: Path, image: np.ndarray) -> None:
    path = tmp_path / "tiny_sam.pth"
    torch.save(build_tiny_sam(0).state_dict(), path)
    from_file = auto(checkpoint=str(path), **LOOSE)
    random_init = auto(**LOOSE)
    saved = torch.load(path, weights_only=True)
    assert from_file.model is not None
    loaded = from_file.model.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert comparable(run_one(from_file, image)) == comparable(run_one(random_init, image))
    prov = from_file.provenance()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert prov["checkpoint"] == "tiny_sam.pth"
    assert prov["checkpoint_sha256"] == digest and prov["weights"] == f"sha256:{digest}"
    # Provenance before setup reads the same hash; a configured hash is checked at setup.
    fresh = SamAutoSegmenter({"model_type": "tiny", "checkpoint": str(path), "device": "cpu",
                              "points_per_side": 8, **LOOSE})
    assert fresh.provenance() == prov
    wrong = SamAutoSegmenter({"model_type": "tiny", "checkpoint": str(path),
                              "checkpoint_sha256": "0" * 64})
    with pytest.raises(ConfigError, match=r"segmenter\.checkpoint_sha256"):
        wrong.setup()


def test_bad_checkpoints_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"segmenter\.checkpoint: cannot read"):
        auto(checkpoint=str(tmp_path / "missing.pth"))
    state = build_tiny_sam(0).state_dict()
    state.pop(next(iter(state)))
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ConfigError, match="does not fit the model_type"):
        auto(checkpoint=str(tmp_path / "partial.pth"))


def test_provenance_names_model_weights_library_and_settings() -> None:
    segmenter = SamAutoSegmenter({"model_type": "tiny", "init_seed": 3, "device": "cpu"})
    prov = segmenter.provenance()
    assert prov["name"] == "sam-auto" and prov["version"]
    assert prov["model_type"] == "tiny" and prov["checkpoint"] is None
    assert prov["weights"] == "random-init seed 3"
    assert prov["segment_anything_version"] == "1.0"
    assert prov["device"] == "cpu"
    assert set(prov["settings"]) >= {"points_per_side", "points_per_batch", "pred_iou_thresh",
                                     "stability_score_thresh", "box_nms_thresh", "crop_n_layers",
                                     "crop_nms_thresh", "min_mask_region_area", "fast", "bf16",
                                     "device", "checkpoint", "model_type"}
    json.dumps(prov)


def test_bad_image_is_a_failure_for_that_image_only(image: np.ndarray) -> None:
    segmenter = auto(**LOOSE)
    outs = segmenter.segment_batch([SegmentInput("bad", image[..., :2].copy()),
                                    SegmentInput("good", image)])
    assert isinstance(outs[0], AnnotatorFailure) and outs[0].reason == "bad_image"
    assert isinstance(outs[1], SegmentOutput)


# --------------------------------------------------------------------------- fast path


@pytest.mark.parametrize("settings, background, at_least", [
    ({**LOOSE}, (40, 70, 100), 1),
    ({**LOOSE, "box_nms_thresh": 1.0}, (40, 70, 100), 20),
    ({**LOOSE, "crop_n_layers": 1, "min_mask_region_area": 30}, (40, 70, 100), 1),
    ({**UNFILTERED}, (0, 0, 0), 4),
    ({**UNFILTERED, "crop_n_layers": 1, "min_mask_region_area": 30}, (0, 0, 0), 3),
])
def test_fast_path_matches_stock_exactly_on_cpu(settings: dict, background: tuple[int, int, int],
                                                at_least: int) -> None:
    image = shapes_image(background=background)
    stock = run_one(auto(**settings), image)
    fast = run_one(auto(fast=True, **settings), image)
    assert len(stock.candidates) >= at_least
    assert comparable(fast) == comparable(stock)
    assert fast.dropped == stock.dropped


def test_bf16_is_ignored_on_cpu_and_provenance_says_float32(image: np.ndarray,
                                                            many: SegmentOutput) -> None:
    assert len(many.candidates) >= 20                        # stock, float32
    for fast in (False, True):
        bf16 = auto(fast=fast, box_nms_thresh=1.0, bf16=True, **LOOSE)
        assert comparable(run_one(bf16, image)) == comparable(many), fast  # no bf16 arithmetic
        assert bf16.provenance()["dtype"] == "float32"
        assert bf16.provenance()["settings"]["bf16"] is True  # what was asked is kept as well


def test_provenance_dtype_is_bfloat16_only_with_bf16_on_cuda() -> None:
    def dtype(device: str, bf16: bool) -> str:
        segmenter = SamAutoSegmenter({"model_type": "tiny", "device": device, "bf16": bf16})
        return segmenter.provenance()["dtype"]     # no setup: no GPU needed to ask

    assert dtype("cuda", True) == dtype("cuda:1", True) == "bfloat16"
    assert dtype("cuda", False) == dtype("cpu", True) == dtype("cpu", False) == "float32"
    assert dtype("auto", True) == ("bfloat16" if torch.cuda.is_available() else "float32")


def test_fast_path_encodes_a_batch_of_images_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    images = [shapes_image(128, 160, seed=1), shapes_image(96, 96, (0, 0, 0), seed=2),
              shapes_image(150, 110, seed=3)]
    stock = auto(**UNFILTERED)
    expected = [comparable(run_one(stock, im)) for im in images]
    calls: list[int] = []
    embed = sam_fast.FastMaskGenerator.embed

    def counting_embed(self: Any, batch: list[np.ndarray]) -> Any:
        calls.append(len(batch))
        return embed(self, batch)

    monkeypatch.setattr(sam_fast.FastMaskGenerator, "embed", counting_embed)
    fast = auto(fast=True, encoder_batch=3, **UNFILTERED)
    outs = fast.segment_batch([SegmentInput(f"k{i}", im) for i, im in enumerate(images)])
    assert calls == [3]                                  # one encoder call for the three images
    # Same masks as one image at a time, up to float batching effects (~1e-6 in the embedding).
    assert sum(len(e) for e in expected) >= 3
    for out, want in zip(outs, expected, strict=True):
        assert_same_masks(out, want)
    bad = SegmentInput("bad", images[0][..., :2].copy())
    outs = fast.segment_batch([bad, SegmentInput("good", images[1])])
    assert isinstance(outs[0], AnnotatorFailure)
    assert comparable(outs[1]) == expected[1]            # a chunk with a bad image: one by one


def assert_same_masks(out: SegmentOutput, want: list[tuple]) -> None:
    """Same candidates: scores within 1e-4, masks overlapping with IoU >= 0.99."""
    got = comparable(out)
    assert len(got) == len(want)
    for (rle_a, _, _, scores_a, _), (rle_b, _, _, scores_b, _) in zip(got, want, strict=True):
        assert scores_a.keys() == scores_b.keys()
        assert all(abs(scores_a[k] - scores_b[k]) < 1e-4 for k in scores_a)
        assert masks.iou([rle_a], [rle_b])[0, 0] >= 0.99


def test_fast_path_chunking_and_out_of_memory_split(image: np.ndarray, many: SegmentOutput,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sam_fast, "UPSCALE_CHUNK", 5)
    monkeypatch.setattr(sam_fast, "RLE_CHUNK", 7)
    decode = sam_fast.FastMaskGenerator._decode

    def flaky_decode(self: Any, points: np.ndarray, crop_size: tuple) -> Any:
        if len(points) > 16:
            raise torch.cuda.OutOfMemoryError("simulated")
        return decode(self, points, crop_size)

    monkeypatch.setattr(sam_fast.FastMaskGenerator, "_decode", flaky_decode)
    segmenter = auto(fast=True, points_per_batch=64, box_nms_thresh=1.0, **LOOSE)
    out = run_one(segmenter, image)
    assert comparable(out) == comparable(many)
    assert getattr(segmenter.generator, "points_per_batch", None) == 16


def test_fast_path_with_other_batch_size_agrees(image: np.ndarray, many: SegmentOutput) -> None:
    # 7 does not divide the 64 points, and its batches round differently (~1e-7) from stock's.
    out = run_one(auto(fast=True, points_per_batch=7, box_nms_thresh=1.0, **LOOSE), image)
    assert len(many.candidates) > 5
    # One to one, in order: each stock mask has its fast twin and each fast mask its stock twin.
    # (Matching each mask to any mask of the other output would prove little here: most of these
    # masks have a near-copy at IoU >= 0.99 in the same output.)
    assert_same_masks(out, comparable(many))


def test_vectorised_rle_matches_segment_anything() -> None:
    rng = np.random.default_rng(0)
    batch = torch.as_tensor(rng.random((9, 13, 11)) > 0.6)
    batch[0] = False
    batch[1] = True
    batch[2, 0, 0] = True
    batch[3, 0, 0] = False
    assert sam_fast.masks_to_uncompressed_rle(batch) == mask_to_rle_pytorch(batch)
    assert sam_fast.masks_to_uncompressed_rle(batch[:0]) == []


def test_sdpa_attention_matches_stock_attention() -> None:
    model = build_tiny_sam(0)
    with torch.no_grad():
        for block in model.image_encoder.blocks:
            block.attn.rel_pos_h.normal_()
            block.attn.rel_pos_w.normal_()
    fused = copy.deepcopy(model)
    assert sam_fast.use_sdpa_attention(fused) == 2
    x = model.preprocess(torch.rand(1, 3, 200, 256) * 255)
    with torch.no_grad():
        expected, got = model.image_encoder(x), fused.image_encoder(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_compile_flag_compiles_the_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[type] = []
    monkeypatch.setattr(ImageEncoderViT, "compile", lambda self, *a, **k: calls.append(type(self)),
                        raising=False)
    auto(fast=True, compile_encoder=True)
    assert calls == [ImageEncoderViT]


# --------------------------------------------------------------------------- sam-boxes


def test_sam_boxes_one_candidate_per_box_in_one_call(image: np.ndarray,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict[str, Any] = {"set_image": 0, "predict_torch": []}
    set_image, predict_torch = SamPredictor.set_image, SamPredictor.predict_torch

    def spy_set_image(self: SamPredictor, *args: Any, **kwargs: Any) -> Any:
        calls["set_image"] += 1
        return set_image(self, *args, **kwargs)

    def spy_predict(self: SamPredictor, *args: Any, **kwargs: Any) -> Any:
        calls["predict_torch"].append(kwargs["boxes"].shape[0])
        return predict_torch(self, *args, **kwargs)

    monkeypatch.setattr(SamPredictor, "set_image", spy_set_image)
    monkeypatch.setattr(SamPredictor, "predict_torch", spy_predict)
    boxes = [[20, 15, 70, 55], [85, 55, 60, 60], [5, 90, 50, 35], [0, 0, 160, 128]]
    labels = ["a brown dog", None, "the red ball", "everything"]
    segmenter = SamBoxesSegmenter({"model_type": "tiny", "device": "cpu"})
    out = run_one(segmenter, image, {"boxes": boxes, "labels": labels})
    assert calls == {"set_image": 1, "predict_torch": [4]}
    # each given box is a region-level candidate with its label; SAM's mask for it lies under it
    given = [c for c in out.candidates if c.rle is None]
    assert [c.bbox for c in given] == [[float(v) for v in b] for b in boxes]
    assert [c.label for c in given] == labels and [c.scores["given_box"] for c in given] == [0, 1, 2, 3]
    assert all(c.source == "given:boxes" and c.within is None for c in given)
    sam = [c for c in out.candidates if c.rle is not None]
    for cand in sam:
        box = given[cand.scores["given_box"]]
        assert cand.within is box and cand.label == box.label and cand.source == "sam-boxes"
        assert isinstance(cand.scores["predicted_iou"], float)
        assert cand.bbox == masks.bbox(cand.rle) and cand.area == masks.area(cand.rle)
        assert cand.rle["size"] == list(image.shape[:2])
    assert len(given) - len(sam) == out.dropped.get("empty_mask", 0)


def test_sam_boxes_without_boxes_or_with_bad_ones(image: np.ndarray) -> None:
    segmenter = SamBoxesSegmenter({"model_type": "tiny", "device": "cpu"})
    given: dict | None
    for given in (None, {}, {"boxes": []}):
        out = run_one(segmenter, image, given)
        assert out.candidates == [] and out.dropped == {"no_boxes": 1}
    out = run_one(segmenter, image, {"boxes": [[10, 10, 0, 5], [300, 300, 5, 5], [10, 10, 40, 40]]})
    assert {c.scores["given_box"] for c in out.candidates} == {2}
    assert out.dropped["bad_box"] == 2


def test_sam_boxes_prompts_with_boxes_mapped_to_the_stored_image(image: np.ndarray,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A box from a 4× larger original reaches SAM scaled to the stored image (not clipped), and
    many boxes are decoded in slices of ``boxes_per_call`` after one image encoding."""
    seen: list[list[float]] = []
    sizes: list[int] = []
    predict_torch, map_box = SamPredictor.predict_torch, InputFrame.box

    def spy_predict(self: SamPredictor, *args: Any, **kwargs: Any) -> Any:
        sizes.append(kwargs["boxes"].shape[0])
        return predict_torch(self, *args, **kwargs)

    def spy_box(self: Any, box: Any, frame: str = "displayed") -> Any:
        mapped = map_box(self, box, frame)
        seen.append(mapped)
        return mapped

    monkeypatch.setattr(SamPredictor, "predict_torch", spy_predict)
    monkeypatch.setattr(InputFrame, "box", spy_box, raising=True)
    height, width = image.shape[:2]                      # stored 128 × 160; the original was 4×
    segmenter = SamBoxesSegmenter({"model_type": "tiny", "device": "cpu", "boxes_per_call": 2})
    boxes = [[200, 80, 240, 160], [0, 0, 640, 512], [600, 500, 100, 100], [40, 40, 80, 40], [4, 4, 8, 8]]
    out = run_one(segmenter, image, {"boxes": boxes, "original_size": (height * 4, width * 4)})
    assert seen[:2] == [[50.0, 20.0, 60.0, 40.0], [0.0, 0.0, 160.0, 128.0]]
    assert seen[2] == [150.0, 125.0, 10.0, 3.0]          # clipped at the stored image's edge
    assert sizes == [2, 2, 1]                              # 5 boxes, 2 per decoder call
    assert [c.scores["given_box"] for c in out.candidates if c.rle is None] == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------- benchmark


def test_bench_smoke_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outputs: list[list[SegmentOutput]] = []            # stock's, then fast's
    time_path = sam_bench.time_path

    def keep_outputs(*args: Any, **kwargs: Any) -> Any:
        report, outs = time_path(*args, **kwargs)
        outputs.append(outs)
        return report, outs

    monkeypatch.setattr(sam_bench, "time_path", keep_outputs)
    path = tmp_path / "bench.json"
    assert sam_bench.main(["--smoke", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["smoke"] is True and report["model_type"] == "tiny" and report["device"] == "cpu"
    assert report["images"] == 2 and report["points_per_side"] == 8 and report["gpu"] is None
    # What the benchmark is for: the fast path gives stock's masks, on every image.
    stock_out, fast_out = outputs
    assert len(stock_out) == len(fast_out) == 2
    assert sum(len(out.candidates) for out in stock_out) >= 2
    for stock, fast in zip(stock_out, fast_out, strict=True):
        assert_same_masks(fast, comparable(stock))
    assert report["mask_agreement"] == 1.0
    # The report describes those runs: per-path numbers in range, bf16 off on a CPU.
    for path_name, outs in (("stock", stock_out), ("fast", fast_out)):
        part = report[path_name]
        assert part["masks_per_image"] == sum(len(o.candidates) for o in outs) / len(outs)
        assert 0 < part["ms_per_image"] < 60_000 and 0 < part["ms_per_image_median"] < 60_000
        assert isinstance(part["points_per_batch"], int) and 1 <= part["points_per_batch"] <= 64
        assert part["bf16"] is False and part["peak_gpu_mb"] is None
    assert report["speedup"] > 0 and np.isfinite(report["speedup"])
    target = report["target"]
    assert target["min_speedup"] > 1 and target["max_fast_ms_per_image"] > 0
    assert "vit_h" in target["applies_to"]
    assert report["versions"] == {"torch": torch.__version__, "segment_anything": "1.0"}
