"""The record schema: validation, parquet schemas and the schema document, all from ``record``."""
from schemas.record import (FAILURE_COLUMNS, IMAGE_COLUMNS, KEY_PATTERN, RECORD, REGION_COLUMNS,
                            SCHEMA_VERSION)
from schemas.provenance import ProvenanceTable, image_provenance, provenance_id, region_provenance
from schemas.spec import arrow_schema, json_schema
from schemas.validation import RecordError, check_record, record_errors

RECORD_JSON_SCHEMA = {"$schema": "https://json-schema.org/draft/2020-12/schema",
                      "$id": f"record-v{SCHEMA_VERSION}", **json_schema(RECORD)}
IMAGES_SCHEMA = arrow_schema(IMAGE_COLUMNS, SCHEMA_VERSION)
REGIONS_SCHEMA = arrow_schema(REGION_COLUMNS, SCHEMA_VERSION)
FAILURES_SCHEMA = arrow_schema(FAILURE_COLUMNS, SCHEMA_VERSION)

__all__ = ["SCHEMA_VERSION", "KEY_PATTERN", "RECORD_JSON_SCHEMA", "IMAGES_SCHEMA", "REGIONS_SCHEMA",
           "FAILURES_SCHEMA", "RecordError", "check_record", "record_errors", "ProvenanceTable",
           "image_provenance", "provenance_id", "region_provenance"]
