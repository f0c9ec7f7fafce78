"""`classical`: weight-free segmentation (scikit-image) merged into a 3-level hierarchy.

Felzenszwalb superpixels are merged on a region adjacency graph at two colour-distance
thresholds. Merging by threshold only joins superpixels, so every mid-level segment lies inside
exactly one coarse segment, and every fine one inside a mid one: containment (and thus the
parent links built later) is exact. A fallback that runs anywhere, not a learned segmenter.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from annotators.base import AnnotatorFailure, Candidate, SegmentInput, SegmentOutput, Segmenter
from annotators.segment import masks as rle
from settings import require


@dataclass
class ClassicalSettings:
    """Settings of the classical segmenter."""

    work_side: int = 256          # segmentation runs at this longest side; masks are upscaled
    scale: float = 120.0          # felzenszwalb scale of the finest level
    sigma: float = 0.8
    min_size_frac: float = 0.002  # smallest superpixel as a fraction of the work image
    mid_threshold: float = 24.0   # RAG mean-colour distance merged into parts
    coarse_threshold: float = 48.0  # ... and into wholes
    levels: int = 3               # 1 = wholes only, 2 = + parts, 3 = + subparts

    def check(self) -> None:
        require(32 <= self.work_side <= 2048, "work_side", "must be in 32..2048")
        require(self.scale > 0, "scale", "must be > 0")
        require(0 < self.mid_threshold < self.coarse_threshold, "mid_threshold",
                "need 0 < mid_threshold < coarse_threshold")
        require(self.levels in (1, 2, 3), "levels", "must be 1, 2 or 3")


class ClassicalSegmenter(Segmenter):
    """Hierarchical colour segmentation with scikit-image; no weights."""

    name = "classical"
    version = "1"
    Settings = ClassicalSettings

    def segment_batch(self, images: list[SegmentInput]) -> list[SegmentOutput | AnnotatorFailure]:
        return self.each_image(images, lambda item: self._segment(item.rgb), "segmenter_error")

    def _levels(self, small: np.ndarray) -> list[np.ndarray]:
        from skimage import segmentation

        s = self.settings
        min_size = max(4, int(s.min_size_frac * small.shape[0] * small.shape[1]))
        fine = segmentation.felzenszwalb(small, scale=s.scale, sigma=s.sigma, min_size=min_size)
        pairs, weights = _adjacency(small, fine)
        mid = _merge_below(fine, pairs, weights, s.mid_threshold)
        coarse = _merge_below(fine, pairs, weights, s.coarse_threshold)
        return [coarse, mid, fine][: s.levels]

    def _segment(self, rgb: np.ndarray) -> SegmentOutput:
        height, width = rgb.shape[:2]
        scale = min(1.0, self.settings.work_side / max(height, width))
        small_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = np.asarray(Image.fromarray(rgb).resize(small_size, Image.Resampling.BILINEAR))
        candidates: list[Candidate] = []
        for level, labels in enumerate(self._levels(small)):
            full = np.asarray(Image.fromarray(labels.astype(np.int32), mode="I").resize(
                (width, height), Image.Resampling.NEAREST))
            for value in np.unique(full):
                mask = full == value
                encoded = rle.encode(mask)
                candidates.append(Candidate(bbox=rle.bbox(encoded), area=float(mask.sum()),
                                            rle=encoded, scores={}, source=f"classical:level{level}"))
        return SegmentOutput(candidates=candidates)


def _adjacency(image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Region adjacency graph of ``labels``: unique neighbouring label pairs (8-connectivity) and
    the distance between their mean colours (what skimage's ``rag_mean_color`` computes)."""
    n = int(labels.max()) + 1
    flat = labels.ravel()
    means = np.stack([np.bincount(flat, image[..., c].ravel().astype(np.float64), n)
                      for c in range(image.shape[2])], axis=1)
    means /= np.maximum(np.bincount(flat, minlength=n), 1)[:, None]
    a = np.concatenate([labels[:, :-1].ravel(), labels[:-1, :].ravel(),
                        labels[:-1, :-1].ravel(), labels[:-1, 1:].ravel()])
    b = np.concatenate([labels[:, 1:].ravel(), labels[1:, :].ravel(),
                        labels[1:, 1:].ravel(), labels[1:, :-1].ravel()])
    differ = a != b
    pairs = np.unique(np.sort(np.stack([a[differ], b[differ]], axis=1), axis=1), axis=0)
    weights = np.linalg.norm(means[pairs[:, 0]] - means[pairs[:, 1]], axis=1)
    return pairs, weights


def _merge_below(labels: np.ndarray, pairs: np.ndarray, weights: np.ndarray,
                 threshold: float) -> np.ndarray:
    """Join neighbouring regions whose edge weight is below ``threshold`` (connected components
    of the thresholded graph, as skimage's ``cut_threshold``); returns the merged label image."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = int(labels.max()) + 1
    keep = pairs[weights < threshold]
    graph = coo_matrix((np.ones(len(keep)), (keep[:, 0], keep[:, 1])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    return component[labels]
