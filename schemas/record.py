"""Record schema (version 3) and the index/failure table schemas: the single definition.

Everything else (validation, parquet schemas, docs/SCHEMA.md) is generated from this module.
"""
from __future__ import annotations

import pyarrow as pa

from schemas.spec import Column, F

SCHEMA_VERSION = "3"
KEY_PATTERN = r"^[A-Za-z0-9_-]{1,200}$"
REGION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
PROVENANCE_ID_PATTERN = r"^[sc]-[0-9a-f]{12}$"

_TAGS = F("array", "Short lowercase tags.", items=F("string", "A tag."))
_JUDGE = F("object", "A judge step's verdict on this text (e.g. LongGRIT's consistency judge).",
           required=False, fields={
               "keep": F("boolean", "Whether the judge found the text consistent with the pixels; "
                         "false only when the program flags instead of dropping (`on_reject: flag`)."),
               "reason": F("string", "The judge's short reason."),
           })
_STEPS = F("object", "Outputs of the caption program's intermediate steps, by step name (text, or "
           "JSON for structured steps); what a later step read, kept so `make recaption` can reuse it.",
           required=False, open=True)
_PROVENANCE_OPEN = F("object", "Free-form provenance: annotator name, version, model, prompt, settings.",
                     open=True)


def _provenance_ref(role: str) -> F:
    return F("string", f"Id of the {role} provenance in the record's `provenance.annotators`.",
             extra={"pattern": PROVENANCE_ID_PATTERN})


_RLE = F("object", "COCO run-length encoding of the mask over the stored image.", nullable=True,
         fields={
             "size": F("array", "[height, width] of the stored image.",
                       items=F("integer", "Pixels."), extra={"minItems": 2, "maxItems": 2}),
             "counts": F("string", "Compressed COCO RLE counts (pycocotools string form)."),
         })

REGION = F("object", "One region of the image: a box (level region) or a mask (level pixel).", fields={
    "id": F("string", "Region id, unique within the record.", extra={"pattern": REGION_ID_PATTERN}),
    "level": F("string", "Granularity: `region` = box, `pixel` = mask.",
               extra={"enum": ["region", "pixel"]}),
    "parent": F("string", "Id of the region this one lies in (whole → part → subpart), or null.",
                nullable=True),
    "bbox": F("array", "[x, y, w, h] in pixels of the stored image; for masks, the mask's tight box.",
              items=F("number", "Pixels."), extra={"minItems": 4, "maxItems": 4}),
    "area": F("number", "Pixels: the mask's pixel count, or w*h for a box.", extra={"minimum": 0}),
    "mask": _RLE,
    "scores": F("object", "Numeric scores: the segmenter's (e.g. predicted_iou, stability), `judge_keep` "
                "(1 kept, 0 flagged), `consistency` (text–region similarity) and `consistency_flag` (1: below "
                "the threshold, kept).", open=True),
    "caption": F("string", "Short caption of the region."),
    "long_caption": F("string", "Long description of the region."),
    "tags": _TAGS,
    "judge": _JUDGE,
    "steps": _STEPS,
    "given": F("object", "What came with the input for this region.", required=False, fields={
        "label": F("string", "Its label or phrase: a manifest's `labels` / `mask_labels` entry, a GRIT "
                   "referring expression, a COCO category name.", required=False),
    }),
    "provenance": F("object", "Which annotators produced this region and its text (ids into the record's "
                    "`provenance.annotators`).", fields={
        "segmenter": _provenance_ref("segmenter"),
        "captioner": _provenance_ref("captioner"),
    }),
})

RECORD = F("object", "One image with its text at every granularity.", fields={
    "schema_version": F("string", "Record schema version.", extra={"const": SCHEMA_VERSION}),
    "key": F("string", "Stable sample id; also the sample's key in the shard.",
             extra={"pattern": KEY_PATTERN}),
    "source": F("object", "Where the image came from.", open=True, fields={
        "uri": F("string", "Path or URI of the input (file, tar member, synthetic scene, ...)."),
        "sha256": F("string", "sha256 of the input bytes as read.", extra={"pattern": "^[0-9a-f]{64}$"}),
        "dataset": F("string", "Name of the source dataset, if known.", required=False, nullable=True),
        "ground_truth": F("array", "Known objects (synthetic scenes): shape, colour, bbox, mask.",
                          required=False, items=F("object", "A known object.", open=True)),
    }),
    "image": F("object", "The stored image the masks and boxes refer to.", fields={
        "width": F("integer", "Pixels.", extra={"minimum": 1}),
        "height": F("integer", "Pixels.", extra={"minimum": 1}),
        "format": F("string", "Extension of the image member in the shard.",
                    extra={"enum": ["jpg", "png"]}),
        "original_width": F("integer", "Width of the decoded input before resizing.", required=False),
        "original_height": F("integer", "Height of the decoded input before resizing.", required=False),
        "source_mode": F("string", "Pillow mode of the input (RGB, CMYK, I;16, P, ...).", required=False),
        "exif_transposed": F("boolean", "EXIF orientation was applied.", required=False),
        "exif_orientation": F("integer", "The input's EXIF orientation (2-8) that was applied.",
                              required=False, extra={"minimum": 1, "maximum": 8}),
        "alpha_flattened": F("boolean", "The input had transparency; it was composited over white.",
                             required=False),
        "animated": F("boolean", "The input had several frames; the first one is stored.",
                      required=False),
    }),
    "image_level": F("object", "Text for the whole image.", fields={
        "caption": F("string", "Short caption of the image."),
        "long_caption": F("string", "Long description of the image."),
        "tags": _TAGS,
        "provenance": _provenance_ref("captioner"),
        "judge": _JUDGE,
        "steps": _STEPS,
        "given": F("object", "What came with the input for the whole image.", required=False, fields={
            "caption": F("string", "The image caption given with the input (a manifest's `caption`).",
                         required=False),
        }),
    }),
    "regions": F("array", "Regions, parents before children.", items=REGION),
    "provenance": F("object", "How the record was made (no timestamps).", fields={
        "pipeline_version": F("string", "Version of the pipeline that wrote it."),
        "settings_hash": F("string", "Hash of the settings that change the output bytes."),
        "annotators": F("object", "Each distinct annotator provenance of the record once, by id: `s-…` "
                        "segmenter, `c-…` captioner; the id is a hash of the provenance, so equal ids "
                        "mean equal provenance across the whole dataset. Values: free-form provenance "
                        "(annotator name, version, model, prompt and its hash, visual prompt, settings).",
                        open=True, extra={"propertyNames": {"pattern": PROVENANCE_ID_PATTERN},
                                          "additionalProperties": {"type": "object"}}),
    }),
})

IMAGE_COLUMNS = [
    Column("key", pa.string(), "Sample key."),
    Column("shard", pa.string(), "Shard file name (under shards/)."),
    Column("source_uri", pa.string(), "Input path or URI."),
    Column("source_sha256", pa.string(), "sha256 of the input bytes."),
    Column("dataset", pa.string(), "Source dataset name.", nullable=True),
    Column("width", pa.int32(), "Stored image width."),
    Column("height", pa.int32(), "Stored image height."),
    Column("format", pa.string(), "jpg or png."),
    Column("n_regions", pa.int32(), "Regions of level region (boxes)."),
    Column("n_pixel", pa.int32(), "Regions of level pixel (masks)."),
    Column("caption", pa.string(), "Image caption."),
    Column("caption_chars", pa.int32(), "Length of the image caption."),
    Column("long_caption_chars", pa.int32(), "Length of the image long caption."),
    Column("tags", pa.list_(pa.string()), "Image tags."),
    Column("captioner_provenance", pa.string(), "Id of the image-level captioner provenance."),
]

REGION_COLUMNS = [
    Column("key", pa.string(), "Sample key."),
    Column("shard", pa.string(), "Shard file name."),
    Column("region_id", pa.string(), "Region id within the record."),
    Column("level", pa.string(), "region or pixel."),
    Column("parent", pa.string(), "Parent region id.", nullable=True),
    Column("x", pa.float32(), "Box left."),
    Column("y", pa.float32(), "Box top."),
    Column("w", pa.float32(), "Box width."),
    Column("h", pa.float32(), "Box height."),
    Column("area", pa.float64(), "Pixels."),
    Column("has_mask", pa.bool_(), "Whether the region has a mask."),
    Column("caption", pa.string(), "Region caption."),
    Column("caption_chars", pa.int32(), "Length of the caption."),
    Column("long_caption_chars", pa.int32(), "Length of the long caption."),
    Column("tags", pa.list_(pa.string()), "Region tags."),
    Column("scores_json", pa.string(), "The region's scores as JSON."),
    Column("segmenter_provenance", pa.string(), "Id of the segmenter provenance (same id, same "
           "provenance, in every record)."),
    Column("captioner_provenance", pa.string(), "Id of the captioner provenance."),
    Column("label", pa.string(), "The label or phrase given with the input for this region.",
           nullable=True),
    Column("judge_keep", pa.bool_(), "A judge step's verdict (false: flagged as inconsistent); null "
           "without a judge.", nullable=True),
    Column("judge_reason", pa.string(), "The judge's reason; null without a judge.", nullable=True),
    Column("consistency", pa.float32(), "Text–region similarity from the consistency filter; null "
           "without one.", nullable=True),
    Column("consistency_flagged", pa.bool_(), "Below the consistency threshold and kept "
           "(`consistency.action: flag`); null without a threshold.", nullable=True),
]

FAILURE_COLUMNS = [
    Column("key", pa.string(), "Sample key of the input."),
    Column("source", pa.string(), "Input path or URI."),
    Column("stage", pa.string(), "Pipeline stage that rejected it (read, decode, dedup, segment, ...)."),
    Column("reason", pa.string(), "Machine-readable reason (truncated, duplicate, http_500, ...)."),
    Column("class", pa.string(), "permanent (the input or a model answer is bad: final) or "
           "transient (infrastructure: the shard is not complete; a rerun redoes the input)."),
    Column("detail", pa.string(), "Human-readable detail."),
    Column("region_id", pa.string(), "Region id for a rejected region; null for a whole input.",
           nullable=True),
    Column("shard", pa.string(), "Shard the input was assigned to."),
]
