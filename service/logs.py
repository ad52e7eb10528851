"""Structured logging: one JSON object per line, and a per-request context for the access line."""

from __future__ import annotations

import itertools
import logging
import logging.config
import time
import traceback
from contextvars import ContextVar
from typing import Any

import orjson

# What every LogRecord would otherwise gather and JsonFormatter never prints: the caller's file and
# line (a walk up the stack), thread, process and multiprocessing names. Turned off as the logging
# HOWTO's "Optimization" section describes: the access line cost 38 us, 16 us without (issue 10).
logging._srcfile = None
logging.logThreads = False
logging.logProcesses = False
logging.logMultiprocessing = False

_request_fields: ContextVar[dict[str, Any] | None] = ContextVar("request_fields", default=None)

# LogRecord attributes that are not "extra" fields given by the caller.
_PLAIN_RECORD = logging.LogRecord("", 0, "", 0, "", (), None).__dict__
_STANDARD = set(_PLAIN_RECORD) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's ANSI-coloured copy of msg
}
# A record's own attributes come first (its __init__ sets them, always the same ones), the
# caller's extras after them (makeRecord): only the tail need be looked at, not all two dozen.
_OWN_ATTRIBUTES = len(_PLAIN_RECORD)
# A caller's many fields in one `extra` entry, printed as if given one by one: logging copies
# extras into the record one at a time, with a check each (the access line's dozen were 3% of a
# turn's bytecode, issue 10).
FIELDS = "fields"


def annotate(**fields: Any) -> None:
    """Add fields to the current request's access log line (no-op outside a request)."""
    current = _request_fields.get()
    if current is not None:
        current.update(fields)


def begin_request() -> dict[str, Any]:
    fields: dict[str, Any] = {}
    _request_fields.set(fields)
    return fields


class JsonFormatter(logging.Formatter):
    # The last second formatted: lines come many per second, strftime costs a tenth of a line.
    _second: tuple[int, str] = (-1, "")

    def _seconds(self, created: float) -> str:
        second = int(created)
        if second != self._second[0]:
            self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        return self._second[1]

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": f"{self._seconds(record.created)}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in itertools.islice(record.__dict__.items(), _OWN_ATTRIBUTES, None):
            if key == FIELDS:
                entry.update(value)
            elif key not in _STANDARD:
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            # The type and the frames, not the message: messages can quote request content.
            entry["error"] = record.exc_info[0].__name__
            entry["traceback"] = "".join(traceback.format_tb(record.exc_info[2]))
        return orjson.dumps(entry, default=str).decode()


def logging_config(level: str) -> dict[str, Any]:
    """A dictConfig: JSON lines on stderr for our loggers and uvicorn's. uvicorn's own access log
    is off: ours carries the request id, tenant and timings. Given to uvicorn as `log_config`, so
    every worker process applies it too."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "service.logs.JsonFormatter"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {
            "uvicorn": {"handlers": [], "propagate": True},
            "uvicorn.error": {"handlers": [], "propagate": True},
            "uvicorn.access": {"handlers": [], "propagate": False},
        },
    }


def configure_logging(level: str) -> None:
    logging.config.dictConfig(logging_config(level))
    logging.getLogger("uvicorn.access").disabled = True
