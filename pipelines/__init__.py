
import logging as _logging


class _QuietImports(_logging.Filter):
    """Drops the one warning Apache Beam logs at import when the optional GCP client libraries are
    absent (``apitools not found…``): not actionable for anyone not using BigQuery."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith("apitools not found")


_logging.getLogger().addFilter(_QuietImports())
