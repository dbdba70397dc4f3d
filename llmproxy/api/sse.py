"""Server-sent events, read and written as the WHATWG HTML standard's event stream format defines them.

Both APIs stream their answers as SSE; the proxy reads every streamed chunk (usage, translation) and writes events
of its own (errors, heartbeats, made-up answers), all through this module.
"""

import contextlib
import re
from dataclasses import dataclass

MEDIA_TYPE = "text/event-stream"
_BOM = b"\xef\xbb\xbf"
_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class Event:
    """A dispatched event: its data lines joined with LF, its type (`message` unless named), the stream's last
    event ID when it was dispatched."""

    data: str
    event: str = "message"
    id: str = ""

    def __bytes__(self) -> bytes:
        """The event as `event()` writes it; parsed on its own, it gives this event back."""
        return event(self.data, None if self.event == "message" else self.event, self.id or None)


@dataclass(frozen=True, slots=True)
class Comment:
    """A comment line's text (after the colon and one optional space), which clients ignore."""

    text: str

    def __bytes__(self) -> bytes:
        return comment(self.text)


class Parser:
    """Reads an event stream chunk by chunk, wherever the chunks split it (inside a line, a CRLF, a UTF-8
    sequence): `feed` returns what each chunk completed. Invalid UTF-8 reads as U+FFFD, as the spec decodes it.

    A stream that ends without a blank line after its last event ends with that event undispatched, as the spec
    has it: a client discards it too, so there is nothing to call at the end.
    """

    def __init__(self, comments: bool = False):
        self.comments = comments  # whether `feed` returns comments too (a relay that rewrites a stream keeps them)
        self.last_event_id = ""
        self.retry: int | None = None  # the reconnection time the stream asked for, in milliseconds
        self._pending: list[bytes] = []  # the start of a line whose end has not arrived
        self._after_cr = False  # the last chunk ended in CR, so an LF starting the next one ends no second line
        self._started = False  # whether the first line was read (it may start with a byte order mark)
        self._data: list[bytes] = []
        self._type = b""
        self._id = ""

    def feed(self, chunk: bytes) -> list[Event | Comment]:
        """The events (and comments) completed by `chunk`, in stream order."""
        if self._after_cr and chunk[:1] == b"\n":
            chunk, self._after_cr = chunk[1:], False
        if not chunk:
            return []
        self._after_cr = chunk[-1] == 0x0D
        lines = chunk.splitlines()  # at CR, LF and CRLF only, for bytes
        rest = None if chunk[-1] in b"\r\n" else lines.pop()
        if lines and self._pending:
            lines[0] = b"".join(self._pending) + lines[0]
            self._pending.clear()
        if rest is not None:
            self._pending.append(rest)  # joined once its line ends: a long line costs no quadratic copying
        if lines and not self._started:
            self._started = True
            lines[0] = lines[0].removeprefix(_BOM)
        out: list[Event | Comment] = []
        for line in lines:
            if not line:
                self._dispatch(out)
            elif line[0] == 0x3A:  # ":"
                if self.comments:
                    text = line[2:] if line[1:2] == b" " else line[1:]
                    out.append(Comment(text.decode("utf-8", "replace")))
            else:
                name, _, value = line.partition(b":")
                if value[:1] == b" ":
                    value = value[1:]
                if name == b"data":
                    self._data.append(value)
                elif name == b"event":
                    self._type = value
                elif name == b"id":
                    if b"\0" not in value:
                        self._id = value.decode("utf-8", "replace")
                elif name == b"retry" and value.isdigit():  # ASCII digits only, for bytes
                    with contextlib.suppress(ValueError):  # more digits than int() reads: no time anyone meant
                        self.retry = int(value)
        return out

    def _dispatch(self, out: list[Event | Comment]) -> None:
        """A blank line: the event read so far, if it has data (one without is no event, per the spec)."""
        self.last_event_id = self._id
        if self._data:
            data = b"\n".join(self._data).decode("utf-8", "replace")
            out.append(Event(data, self._type.decode("utf-8", "replace") or "message", self.last_event_id))
        self._data, self._type = [], b""


def _one_line(value: str, what: str) -> str:
    if "\n" in value or "\r" in value:
        raise ValueError(f"an SSE {what} is one line: {value!r}")
    return value


def event(data: str, name: str | None = None, id: str | None = None) -> bytes:
    """One event, ended by its blank line. Each line of `data` becomes a data line (so a CR or CRLF in it reads
    back as LF: SSE carries no CR); `name` is its type, `id` its event ID."""
    head = f"event: {_one_line(name, 'event name')}\n" if name is not None else ""
    if id is not None:
        head += f"id: {_one_line(id, 'event ID')}\n"
    body = _LINE_END.sub("\ndata: ", data) if "\n" in data or "\r" in data else data
    return f"{head}data: {body}\n\n".encode()


def comment(text: str) -> bytes:
    """A comment (a heartbeat) that clients ignore, with a blank line after it (which dispatches nothing) for
    readers that split a stream at blank lines."""
    return (": " + _LINE_END.sub("\n: ", text) + "\n\n").encode()
