"""Reading server-sent events as the WHATWG HTML spec defines them (§9.2.6): pure, no I/O.

The upstream's stream is read in whatever pieces the network delivers; this decoder turns them into
events: lines end in CRLF, LF or CR (a CRLF split across two pieces is one line end), `data` lines
of one event are joined with newlines, `event` names it, `id` sets the last event id, lines starting
with `:` are comments (keep-alives), a blank line dispatches. It bounds how much it holds, so a
stream that never ends a line cannot grow memory without limit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_EVENT_BYTES = 1024 * 1024  # one line, or one event's data: a stream chunk is far smaller

_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


class EventTooLarge(ValueError):
    """A line or an event's data passed the decoder's limit."""


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    data: str
    event: str = "message"
    id: str | None = None


class SSEDecoder:
    """Feed it bytes as they come; it returns the events each piece completed."""

    def __init__(self, max_bytes: int = MAX_EVENT_BYTES) -> None:
        self._max = max_bytes
        self._buffer = b""
        self._started = False
        self._skip_lf = False  # the last piece ended in CR: an LF opening the next one is its pair
        self._data: list[str] = []
        self._data_size = 0
        self._event = ""
        self._last_id: str | None = None

    def feed(self, piece: bytes) -> list[ServerSentEvent]:
        if not self._started and piece:
            self._started = True
            piece = piece.removeprefix(_BOM)
        if self._skip_lf and piece:
            self._skip_lf = False
            piece = piece.removeprefix(b"\n")
        buffer = self._buffer + piece
        events: list[ServerSentEvent] = []
        start = 0
        for end in _LINE_END.finditer(buffer):
            event = self._line(buffer[start : end.start()])
            if event is not None:
                events.append(event)
            start = end.end()
            if end.group() == b"\r" and start == len(buffer):
                self._skip_lf = True
        self._buffer = buffer[start:]
        if len(self._buffer) > self._max:
            raise EventTooLarge(f"a line of the stream is over {self._max} bytes")
        return events

    def _line(self, raw: bytes) -> ServerSentEvent | None:
        if len(raw) > self._max:
            raise EventTooLarge(f"a line of the stream is over {self._max} bytes")
        if not raw:
            return self._dispatch()
        if raw.startswith(b":"):  # a comment: a keep-alive, nothing to read
            return None
        field, colon, value = raw.decode("utf-8", "replace").partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data_size += len(value) + 1
            if self._data_size > self._max:
                raise EventTooLarge(f"an event of the stream is over {self._max} bytes")
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id" and "\0" not in value:
            self._last_id = value
        # `retry` and unknown fields are ignored, as the spec says
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        data, event = self._data, self._event
        self._data, self._data_size, self._event = [], 0, ""
        if not data:  # an event with no data is not dispatched
            return None
        return ServerSentEvent(data="\n".join(data), event=event or "message", id=self._last_id)
