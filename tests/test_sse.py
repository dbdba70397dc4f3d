"""The SSE module against the WHATWG event stream format: whatever the chunks, the same events as the spec's
algorithm read on the whole stream; and what the encoders write parses back to what they were given.

Hypothesis examples are derandomised and bounded, as in test_properties.py.
"""

import contextlib
import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmproxy.api import sse
from llmproxy.api.sse import Comment, Event
from llmproxy.api.usage import StreamMeter

EXAMPLES = settings(max_examples=300, deadline=None, derandomize=True, database=None)


def parse(stream: bytes, cuts=()) -> tuple[list, str, int | None]:
    """What a parser reads from `stream` cut at `cuts`, and its last event ID and retry after it."""
    parser = sse.Parser(comments=True)
    bounds = itertools.pairwise([0, *sorted(cuts), len(stream)])
    items = [item for start, end in bounds for item in parser.feed(stream[start:end])]
    return items, parser.last_event_id, parser.retry


def spec(stream: bytes) -> tuple[list, str, int | None]:
    """The spec's interpretation, read literally: the whole stream decoded, then split into lines."""
    text = stream.decode("utf-8", "replace").removeprefix("\ufeff")
    *lines, _unterminated = re.split("\r\n|\r|\n", text)
    items, data, kind, id_buffer, last_id, retry = [], [], "", "", "", None
    for line in lines:
        if not line:
            last_id = id_buffer
            if data:
                items.append(Event("\n".join(data), kind or "message", last_id))
            data, kind = [], ""
        elif line.startswith(":"):
            items.append(Comment(line[1:].removeprefix(" ")))
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            elif name == "event":
                kind = value
            elif name == "id" and "\0" not in value:
                id_buffer = value
            elif name == "retry" and value.isascii() and value.isdigit():
                with contextlib.suppress(ValueError):  # beyond int()'s digits, as the parser has it
                    retry = int(value)
    return items, last_id, retry


# Lines made of the pieces that matter to a parser: field names, colons and spaces, UTF-8 sequences of every
# length, bytes that are no UTF-8, byte order marks, each of the three line ends; and maybe a last line left
# unterminated. Cut anywhere, they cover the cases that break parsers.
_STARTS = [b"data", b"data:", b"data: ", b"event: ", b"id: ", b"id:", b"retry: ", b":", b": ", b"\xef\xbb\xbf"]
_PIECES = [b"x", b" ", b":", b"12", b"\0", b"\xc3\xa9", b"\xe2\x82\xac", b"\xf0\x9f\x98\x80", b"\xff", b"\xe2\x82"]
_ENDS = st.sampled_from([b"\r", b"\n", b"\r\n"])
_lines = _ENDS | st.tuples(  # as many blank lines as others
    st.sampled_from(_STARTS), st.lists(st.sampled_from(_PIECES), max_size=3).map(b"".join), _ENDS
).map(b"".join)
streams = st.tuples(st.lists(_lines, max_size=30).map(b"".join), st.sampled_from([b"", b"data: x"])).map(b"".join)

RICH = (
    "\ufeff: hello\r\n"
    "event: add\rdata:  two spaces\ndata:none\r\ndata\n\n"
    "id: 7\r\nretry: 1500\r\n\r\n"
    "data: é€😀\r\r"
    "event: lost\n\n"
    ": mid\ndata: a\n: event\ndata: b\r\n\n"
    "data: unterminated"
).encode()


def test_the_rich_stream_reads_as_the_spec_says():
    assert parse(RICH) == (
        [
            Comment("hello"),
            Event(" two spaces\nnone\n", "add"),
            Event("é€😀", id="7"),
            Comment("mid"),
            Comment("event"),
            Event("a\nb", id="7"),
        ],
        "7",
        1500,
    )
    assert parse(RICH) == spec(RICH)


def test_a_stream_cut_anywhere_reads_as_the_whole():
    whole = parse(RICH)
    for cut in range(len(RICH) + 1):
        assert parse(RICH, [cut]) == whole, cut
    assert parse(RICH, range(len(RICH))) == whole  # byte by byte


@EXAMPLES
@given(streams, st.data())
def test_any_stream_in_any_chunks_reads_as_the_spec_reads_it_whole(stream, data):
    read = spec(stream)
    assert parse(stream) == read
    assert parse(stream, range(len(stream))) == read  # byte by byte
    assert parse(stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=len(stream)))) == read


@pytest.mark.parametrize("end", [b"\n", b"\r", b"\r\n"])
def test_each_line_end_ends_lines(end):
    assert parse(b"data: a" + end + b"data: b" + end + end)[0] == [Event("a\nb")]


def test_a_crlf_cut_in_two_is_one_line_end():
    parser = sse.Parser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n") == []  # the LF of the CRLF, no blank line
    assert parser.feed(b"") == []
    assert parser.feed(b"\n") == [Event("a")]


@pytest.mark.parametrize(
    ("line", "data"),
    [(b"data:a", "a"), (b"data: a", "a"), (b"data:  a", " a"), (b"data: a ", "a "), (b"data", ""), (b"data:", "")],
)
def test_one_space_after_the_colon_is_dropped(line, data):
    assert parse(line + b"\n\n")[0] == [Event(data)]


def test_comments_are_read_only_when_asked_for_and_split_no_event():
    stream = b": ping\n\ndata: a\n:\n:  two\ndata: b\n\n"
    assert parse(stream)[0] == [Comment("ping"), Comment(""), Comment(" two"), Event("a\nb")]
    assert sse.Parser().feed(stream) == [Event("a\nb")]


def test_an_event_without_data_is_not_dispatched_and_leaves_no_type():
    assert parse(b"event: x\nid: 3\n\ndata: y\n\n") == ([Event("y", id="3")], "3", None)


def test_odd_ids_and_retries_are_ignored():
    stream = b"id: 1\nretry: 10\n\nid: a\0b\nretry: 1.5\nretry: -2\nretry: \xd9\xa1\nretry: " + b"9" * 5000
    assert parse(stream + b"\ndata: x\n\n") == ([Event("x", id="1")], "1", 10)


def test_an_unterminated_last_event_is_discarded():
    assert parse(b"data: a\n\ndata: b\n") == ([Event("a")], "", None)


def test_utf8_cut_anywhere_and_invalid_utf8():
    stream = "data: é€😀\n\n".encode()
    parser = sse.Parser()
    assert [event for byte in range(len(stream)) for event in parser.feed(stream[byte : byte + 1])] == [Event("é€😀")]
    assert parse(b"event: \xff\ndata: a\xe2\x82\n\n")[0] == [Event("a\ufffd", "\ufffd")]


def test_one_leading_byte_order_mark_is_ignored():
    assert parse(b"\xef\xbb\xbfdata: a\n\n", [1, 2])[0] == [Event("a")]
    assert parse(b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\n")[0] == []  # the second mark is part of the field name


def test_the_encoders_write_what_clients_have_always_been_sent():
    assert sse.event('{"a": 1}') == b'data: {"a": 1}\n\n'
    assert sse.event("[DONE]") == b"data: [DONE]\n\n"
    assert sse.event("{}", "error") == b"event: error\ndata: {}\n\n"
    assert sse.event("a\r\nb\rc\nd", "x", "9") == b"event: x\nid: 9\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
    assert sse.comment("queued, position 1") == b": queued, position 1\n\n"
    assert sse.comment("a\nb") == b": a\n: b\n\n"
    for bad in ("a\nb", "a\r"):
        with pytest.raises(ValueError, match="one line"):
            sse.event("", name=bad)
        with pytest.raises(ValueError, match="one line"):
            sse.event("", id=bad)


one_line = st.text().filter(lambda text: "\n" not in text and "\r" not in text)


@EXAMPLES
@given(st.text(), st.none() | one_line, st.none() | one_line.filter(lambda text: "\0" not in text))
def test_what_is_written_parses_back(data, name, event_id):
    written = sse.event(data, name, event_id)
    expected = Event(re.sub("\r\n|\r", "\n", data), name or "message", event_id or "")
    assert parse(written) == ([expected], event_id or "", None)
    assert parse(bytes(expected))[0] == [expected]


@EXAMPLES
@given(one_line)
def test_a_written_comment_parses_back(text):
    assert parse(sse.comment(text))[0] == [Comment(text)]
    assert bytes(Comment(text)) == sse.comment(text)


def test_a_meter_that_drops_the_usage_chunk_passes_the_rest_on_as_events():
    usage = b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}\r\n\r\n'
    stream = (
        b': keep-alive\r\n\r\ndata:{"choices": [{"delta": {"content": "Hi"}}]}\r\n\r\n'
        + usage
        + b"data: [DONE]\r\n\r\n"
    )
    meter = StreamMeter("openai", drop_usage_chunk=True)
    passed = b"".join(meter.feed(stream[i : i + 5]) for i in range(0, len(stream), 5))
    assert passed == b': keep-alive\n\ndata: {"choices": [{"delta": {"content": "Hi"}}]}\n\ndata: [DONE]\n\n'
    assert meter.finish(prompt_estimate=100).total == 9
