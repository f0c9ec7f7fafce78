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

    def _levels(self, small: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Fine segments of ``small`` and, per level (coarse first), the level's label of each
        fine segment."""
        from skimage import segmentation

        s = self.settings
        min_size = max(4, int(s.min_size_frac * small.shape[0] * small.shape[1]))
        fine = segmentation.felzenszwalb(small, scale=s.scale, sigma=s.sigma, min_size=min_size)
        pairs, weights = _adjacency(small, fine)
        n = int(fine.max()) + 1
        mid = _components(n, pairs, weights, s.mid_threshold)
        coarse = _components(n, pairs, weights, s.coarse_threshold)
        return fine, [coarse, mid, np.arange(n)][: s.levels]

    def _segment(self, rgb: np.ndarray) -> SegmentOutput:
        height, width = rgb.shape[:2]
        scale = min(1.0, self.settings.work_side / max(height, width))
        small_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = np.asarray(Image.fromarray(rgb).resize(small_size, Image.Resampling.BILINEAR))
        fine, lookups = self._levels(small)
        full = np.asarray(Image.fromarray(fine.astype(np.int32), mode="I").resize(
            (width, height), Image.Resampling.NEAREST))
        # A level's label image is lookup[fine], and a nearest-neighbour upscale commutes with
        # that, so every level is encoded from the runs of the one upscaled fine image: runs that
        # fall in the same segment of the level join.
        starts, ends, fine_values = rle.label_runs(full)
        candidates: list[Candidate] = []
        for level, lookup in enumerate(lookups):
            values = lookup[fine_values]
            first = np.concatenate(([True], values[1:] != values[:-1]))
            last = np.concatenate((first[1:], [True]))
            _, encoded, areas = rle.encode_runs(starts[first], ends[last], values[first], height, width)
            for mask, box, area in zip(encoded, rle.bboxes(encoded), areas):
                candidates.append(Candidate(bbox=box, area=float(area), rle=mask, scores={},
                                            source=f"classical:level{level}"))
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
    low, high = np.minimum(a, b)[differ], np.maximum(a, b)[differ]
    # unique (low, high) rows in lexicographic order, through one integer key per pair
    keys = np.unique(low.astype(np.int64) * n + high)
    pairs = np.stack([keys // n, keys % n], axis=1).astype(labels.dtype)
    weights = np.linalg.norm(means[pairs[:, 0]] - means[pairs[:, 1]], axis=1)
    return pairs, weights


def _merge_below(labels: np.ndarray, pairs: np.ndarray, weights: np.ndarray,
                 threshold: float) -> np.ndarray:
    """Join neighbouring regions whose edge weight is below ``threshold`` (connected components
    of the thresholded graph, as skimage's ``cut_threshold``); returns the merged label image."""
    return _components(int(labels.max()) + 1, pairs, weights, threshold)[labels]


def _components(n: int, pairs: np.ndarray, weights: np.ndarray, threshold: float) -> np.ndarray:
    """The merged label of each of ``n`` regions (see ``_merge_below``)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    keep = pairs[weights < threshold]
    graph = coo_matrix((np.ones(len(keep)), (keep[:, 0], keep[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]
