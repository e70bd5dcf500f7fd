"""Request IDs and the service's log format: plain text for a terminal, one JSON object per line for a collector.

Every request carries an id: the client's X-Request-ID when it is a plausible one, else a new one. The id is
echoed in the response's X-Request-ID header and in every error body, and a context variable hands it to
every log line written while the request is handled (RequestContextFilter), so one grep follows a request
from its access line to its errors.

    DIFFAD_LOG_FORMAT=text   2026-12-02T10:00:00 INFO diffad.access [3f2a...]: 10.0.0.7 "POST /inspect" 200 41.2ms
    DIFFAD_LOG_FORMAT=json   {"timestamp": "...", "level": "INFO", "logger": "diffad.access", "request_id": "3f2a...",
                              "message": "...", "method": "POST", "path": "/inspect", "status": 200, ...}
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_STATE_KEY = "request_id"  # in the ASGI scope's state, for handlers outside the middleware
NO_REQUEST = "-"
# What a load balancer or client library sends: UUIDs, hex, base64url-ish tokens, dotted trace ids.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")

request_id: ContextVar[str | None] = ContextVar("diffad_request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"


def new_request_id() -> str:
    return uuid.uuid4().hex


def accepted_request_id(value: str | None) -> str:
    """The client's id when it is printable and short (it lands in logs and headers), else a new one."""
    if value is not None and _VALID_REQUEST_ID.fullmatch(value):
        return value
    return new_request_id()


class RequestContextFilter(logging.Filter):
    """Gives every record a request_id: the one being handled, or '-' outside any request."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get() or NO_REQUEST
        return True


def json_formatter() -> logging.Formatter:
    from pythonjsonlogger.core import RESERVED_ATTRS
    from pythonjsonlogger.json import JsonFormatter

    # Fields given with extra= (the access line's method, status, latencies...) become keys of their own,
    # except uvicorn's color_message (the message again, with terminal colour codes).
    # timestamp=True: ISO 8601 in UTC with microseconds, what collectors parse without a format string.
    return JsonFormatter("%(levelname)s %(name)s %(request_id)s %(message)s", timestamp=True,
                         rename_fields={"levelname": "level", "name": "logger"},
                         reserved_attrs=[*RESERVED_ATTRS, "color_message"])


def configure_logging(level: str, log_format: str = "text") -> None:
    """One handler on the root logger, to stderr, in the chosen format; replaces what was there."""
    if log_format not in ("text", "json"):
        raise ValueError(f"log format must be text or json, got {log_format!r}")
    handler = logging.StreamHandler()
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(json_formatter() if log_format == "json"
                         else logging.Formatter(TEXT_FORMAT, datefmt=DATE_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
