"""Odd framing and odd bodies: what the proxy checked is exactly what the upstream gets, or nothing is sent."""

import json
import socket
import threading

import httpx
import pytest

from llmproxy.api.body import MAX_NESTING
from tests.conftest import proxy_env
from tests.harness import is_whole, send_raw

pytestmark = pytest.mark.e2e

CHAT = "/proxy/openai/v1/chat/completions"
MESSAGES = "/proxy/anthropic/v1/messages"


def exchange(proxy, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Sends one raw request; the answer's status and body."""
    status, _, content = send_raw(proxy.port, head + body)
    return status, content


def chat_body(**extra) -> dict:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], **extra}


def post_raw(proxy, path: str, raw: bytes) -> httpx.Response:
    return httpx.post(f"{proxy.url}{path}", content=raw, headers={"content-type": "application/json"})


# -- the request line --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, shape", [(CHAT, "error"), (MESSAGES, "type")])
def test_a_request_line_over_8_kib_gets_414_before_the_rest_arrives(proxy, fake, path, shape):
    # Neither the line's end nor the announced body is ever sent: the answer comes from the first 8 KiB alone.
    status, content = exchange(proxy, f"POST {path}?{'a' * 9000}".encode())
    assert status == 414
    answer = json.loads(content)
    assert shape in answer and "8192" in answer["error"]["message"]
    head = f"POST {path}?{'a' * 9000} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n".encode()
    assert exchange(proxy, head)[0] == 414
    assert fake.requests == []
    assert httpx.post(f"{proxy.url}{CHAT}", json=chat_body()).status_code == 200


def test_a_head_over_64_kib_gets_431_and_the_proxy_holds_no_more_of_it(proxy, fake):
    headers = "".join(f"X-Padding-{number}: {'b' * 1000}\r\n" for number in range(70))
    status, content = exchange(proxy, f"POST {CHAT} HTTP/1.1\r\nHost: x\r\n{headers}".encode())
    assert status == 431 and json.loads(content)["error"]["code"] == "request_head_too_large"
    status, _ = exchange(proxy, f"POST {CHAT} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: 0\r\n\r\n".encode())
    assert status == 431
    # A 60 KiB head (long beta lists, many cookies) is still served.
    headers = "".join(f"X-Padding-{number}: {'b' * 1000}\r\n" for number in range(60))
    assert (
        httpx.post(
            f"{proxy.url}{CHAT}", json=chat_body(), headers={f"x-padding-{number}": "b" * 1000 for number in range(60)}
        ).status_code
        == 200
    )
    assert len(fake.requests) == 1


def test_a_request_line_just_under_the_bound_is_served(proxy, fake):
    query = "a" * (8192 - len(f"POST {CHAT}? HTTP/1.1"))
    assert len(f"POST {CHAT}?{query} HTTP/1.1") == 8192
    assert httpx.post(f"{proxy.url}{CHAT}?{query}", json=chat_body()).status_code == 200
    assert len(fake.requests) == 1


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/3.0", b"HTTP/1.2", b"HTTP/0.9", b"HTTP/9.9"])
@pytest.mark.parametrize("target", [CHAT.encode(), b"http://elsewhere.example" + CHAT.encode()])
def test_only_http_1_0_and_1_1_are_spoken_on_the_cleartext_port(proxy, fake, version, target):
    body = json.dumps(chat_body()).encode()
    head = b"POST %s %s\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (
        target,
        version,
        len(body),
    )
    status, content = exchange(proxy, head, body)
    assert status == 505 and json.loads(content)["error"]["code"] == "http_version_not_supported"
    assert fake.requests == []


def test_http_1_0_is_still_served(proxy, fake):
    body = json.dumps(chat_body()).encode()
    head = b"POST %s HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (
        CHAT.encode(),
        len(body),
    )
    status, _ = exchange(proxy, head, body)
    assert status == 200 and fake.requests[0].body == body


# -- one body, one meaning ---------------------------------------------------------------------------------------


PLAIN = json.dumps(chat_body())


@pytest.mark.parametrize(
    "raw, words",
    [
        (b"\xef\xbb\xbf" + PLAIN.encode(), "byte-order mark"),
        (PLAIN.encode("utf-16"), "UTF-8"),
        (PLAIN.encode("utf-16-le"), "UTF-8"),
        (PLAIN.encode("utf-16-be"), "UTF-8"),
        (PLAIN.encode("utf-32"), "UTF-8"),
        (PLAIN.encode("utf-32-le"), "UTF-8"),
        (PLAIN.encode()[:-2] + b'\xff"}', "UTF-8"),
    ],
    ids=["bom", "utf16", "utf16le", "utf16be", "utf32", "utf32le", "bad-byte"],
)
def test_only_utf8_without_a_byte_order_mark_is_read(proxy, fake, raw, words):
    for path in (CHAT, MESSAGES):
        response = post_raw(proxy, path, raw)
        assert response.status_code == 400 and words in response.json()["error"]["message"]
        assert response.json()["error"]["code" if path == CHAT else "type"] in ("invalid_body", "invalid_request_error")
    assert fake.requests == []


@pytest.mark.parametrize(
    "fragment, words",
    [
        (b'"\\ud800"', "surrogate"),
        (b'"x\\udfffy"', "surrogate"),
        (b'"\\ud83d"', "surrogate"),  # the first half of a pair, alone
        (b'"\\ude00\\ud83d"', "surrogate"),  # both halves, in the wrong order
        (b"NaN", "NaN"),
        (b"Infinity", "Infinity"),
        (b"-Infinity", "Infinity"),
        (b"1e400", "range"),
        (b"-1e400", "range"),
        (str(2**63).encode(), "range"),
        (str(-(2**63) - 1).encode(), "range"),
        (b"1" * 5000, "range"),
    ],
)
def test_values_two_parsers_could_read_differently_are_refused(proxy, fake, fragment, words):
    raw = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "metadata": {"v": %s}}' % fragment
    response = post_raw(proxy, CHAT, raw)
    assert response.status_code == 400 and words in response.json()["error"]["message"]
    assert fake.requests == []


@pytest.mark.parametrize(
    "fragment",
    [
        b'"\\ud83d\\ude00"',
        str(2**63 - 1).encode(),
        str(-(2**63)).encode(),
        b"1.7976931348623157e308",
        b"1e-400",
        b'"\\u00e9\\u0000"',
    ],
)
def test_values_every_parser_reads_alike_are_forwarded_byte_for_byte(proxy, fake, fragment):
    raw = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "seed": %s}' % fragment
    assert post_raw(proxy, CHAT, raw).status_code == 200
    assert fake.requests[0].body == raw


def nested(depth: int) -> bytes:
    """A body whose deepest value sits `depth` containers down, the body itself counting as the first."""
    inner = b"[" * (depth - 2) + b"]" * (depth - 2)
    return b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "metadata": %s}' % (
        b'{"a": ' + inner + b"}" if depth > 2 else b"{}"
    )


def test_nesting_is_refused_beyond_the_bound_in_every_field(proxy, fake):
    response = post_raw(proxy, CHAT, nested(MAX_NESTING + 1))
    assert response.status_code == 400 and f"{MAX_NESTING} levels" in response.json()["error"]["message"]
    response = post_raw(proxy, MESSAGES, nested(MAX_NESTING + 1).replace(b"gpt-4o", b"claude-sonnet-5"))
    assert response.status_code == 400 and response.json()["type"] == "error"
    assert fake.requests == []
    # Brackets inside strings are text, not nesting.
    text = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "%s"}]}' % (b"[{" * 5000)
    assert post_raw(proxy, CHAT, text).status_code == 200
    raw = nested(MAX_NESTING)
    assert post_raw(proxy, CHAT, raw).status_code == 200
    assert [request.body for request in fake.requests] == [text, raw]


# -- what the upstream sends -------------------------------------------------------------------------------------


class RawUpstream:
    """An upstream that answers every request with the same bytes, which no HTTP library would write."""

    def __init__(self, answer: bytes):
        self.answer = answer
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return  # closed
            with connection:
                received = b""
                while not is_whole(received):
                    received += connection.recv(65536)
                connection.sendall(self.answer)


@pytest.mark.parametrize("stream", [False, True])
def test_a_header_byte_that_is_not_utf8_from_the_upstream_costs_no_answer(start_proxy, fake, stream):
    events = b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\ndata: [DONE]\n\n'
    content = events if stream else json.dumps({"choices": [{"message": {"content": "Hi"}}]}).encode()
    kind = b"text/event-stream" if stream else b"application/json"
    upstream = RawUpstream(
        b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nx-request-id: req-\xff\xfe\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (kind, len(content), content)
    )
    proxy = start_proxy(proxy_env(fake, OPENAI_UPSTREAM_URL=upstream.url))
    response = httpx.post(f"{proxy.url}{CHAT}", json=chat_body(stream=stream))
    assert response.status_code == 200 and response.content == content
    upstream.server.close()


def test_a_cookie_an_api_sets_goes_to_no_one_else(start_proxy, fake):
    """The APIs set cookies (Cloudflare's `__cf_bm`); a client library keeps them and sends them with every later
    request, which here would be every user's. The fake sets one on each answer; under a host name (cookies from a
    bare IP address are dropped by any jar) no later request carries it."""
    named = fake.url.replace("127.0.0.1", "localhost")
    proxy = start_proxy(proxy_env(fake, OPENAI_UPSTREAM_URL=named, ANTHROPIC_UPSTREAM_URL=named))
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}
    for token in ("first-user", "second-user"):
        chat = f"{proxy.url}/proxy/openai/v1/chat/completions"
        answer = httpx.post(chat, json=body, headers={"authorization": token})
        assert answer.status_code == 200 and "set-cookie" not in answer.headers
    assert len(fake.requests) == 2
    assert all(name.lower() != "cookie" for request in fake.requests for name, _ in request.headers)
