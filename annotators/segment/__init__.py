"""Segmenters: where masks and boxes come from.

``classical`` (scikit-image, no weights; the default), ``given`` (annotations that come with the
input), ``sam`` (Segment Anything: ``sam-auto`` and ``sam-boxes``; ``sam_model`` their settings
and model, ``sam_fast`` the batched generator) and ``masks`` (COCO RLE helpers, the record's
mask format).
"""
