"""gatewayd's logs: JSON lines (one object per record) or plain text, on stderr.

A JSON record holds ``time``, ``level``, ``logger``, ``message`` and the
``lun`` a record is about when there is one.  Nothing logged here carries key
material or CHAP secrets: messages name key ids and paths only.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name,
            "message": record.getMessage(),
        }
        lun = getattr(record, "lun", None)
        if lun is not None:
            doc["lun"] = lun
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup(fmt: str, level: str = "info") -> None:
    """Send every log record to stderr as ``fmt`` (json or text)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
