"""Upstream failures become clear errors in the API's format, and no key leaks through any of them."""

import json
import socket
import time

import anthropic
import httpx
import openai
import pytest

from tests.conftest import ANTHROPIC_KEYS, CANARY, OPENAI_KEYS, proxy_env
from tests.harness import wait_until
from tests.test_e2e_sdk import anthropic_client, openai_client

pytestmark = pytest.mark.e2e

CHAT = "/proxy/openai/v1/chat/completions"
MESSAGES = "/proxy/anthropic/v1/messages"


def chat(content: str, stream: bool = False) -> dict:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": content}], "stream": stream}


def message(content: str, stream: bool = False) -> dict:
    return {
        "model": "claude-sonnet-5",
        "max_tokens": 20,
        "messages": [{"role": "user", "content": content}],
        "stream": stream,
    }


@pytest.mark.parametrize(
    "directive, status, sdk_error, attempts",
    [
        ("#fake:status=400 #fake:echo_key=1", 400, openai.BadRequestError, 1),
        ("#fake:error=server_error #fake:echo_key=1", 500, openai.InternalServerError, 2),  # one retry, other key
    ],
)
def test_openai_upstream_errors_pass_through_scrubbed(proxy, fake, directive, status, sdk_error, attempts):
    with pytest.raises(sdk_error) as raised:
        openai_client(proxy).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": directive}])
    assert raised.value.status_code == status
    body = raised.value.response.text
    assert CANARY not in body and "org-FAKEORG" not in body
    assert json.loads(body)["error"]["message"]
    assert len({recorded.key for recorded in fake.requests}) == len(fake.requests) == attempts


@pytest.mark.parametrize(
    "directive, sdk_error",
    [
        ("#fake:status=400 #fake:echo_key=1", anthropic.BadRequestError),
        ("#fake:error=server_error #fake:echo_key=1", anthropic.InternalServerError),
    ],
)
def test_anthropic_upstream_errors_pass_through_scrubbed(proxy, fake, directive, sdk_error):
    with pytest.raises(sdk_error) as raised:
        anthropic_client(proxy).messages.create(
            model="claude-sonnet-5", max_tokens=5, messages=[{"role": "user", "content": directive}]
        )
    assert CANARY not in raised.value.response.text
    assert raised.value.response.json()["type"] == "error"


def test_streamed_request_with_upstream_error_gets_the_error_status(proxy, fake):
    response = httpx.post(f"{proxy.url}{CHAT}", json=chat("#fake:status=400 #fake:echo_key=1", stream=True))
    assert response.status_code == 400
    assert CANARY not in response.text


def test_stream_that_stalls_ends_with_an_error_event(proxy, fake):
    """The session proxy tolerates 2 s of upstream silence; the fake stalls 6 s after its first chunk."""
    with httpx.stream("POST", f"{proxy.url}{CHAT}", json=chat("#fake:stall_ms=6000 #fake:events=3", True)) as stream:
        text = "".join(stream.iter_text())
    assert stream.status_code == 200
    last_event = [line for line in text.splitlines() if line.startswith("data: ")][-1]
    assert json.loads(last_event.removeprefix("data: "))["error"]["code"] == "upstream_broken"


def test_stream_cut_by_the_upstream_ends_with_an_error_event(proxy, fake):
    with httpx.stream("POST", f"{proxy.url}{MESSAGES}", json=message("#fake:reset_after=2 #fake:events=5", True)) as s:
        text = "".join(s.iter_text())
    assert "event: error" in text
    assert [(recorded.stream_ending, recorded.content_events_sent) for recorded in fake.requests] == [("aborted", 2)]
    request = message("#fake:reset_after=2 #fake:events=5")
    del request["stream"]
    with pytest.raises(anthropic.APIStatusError), anthropic_client(proxy).messages.stream(**request) as stream:
        "".join(stream.text_stream)


def test_client_leaving_mid_stream_closes_the_upstream(proxy, fake):
    """The fake streams 50 events over 5 s; the client leaves after the first, and the proxy hangs up on the fake."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        body = json.dumps(chat("#fake:events=50 #fake:interval_ms=100", stream=True)).encode()
        sock.sendall(
            f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        received = b""
        while b"data: " not in received:
            received += sock.recv(65536)
    # Waited on for longer than the whole stream, so that a stream left running shows up as "completed".
    (stream,) = wait_until(
        lambda: [
            recorded
            for recorded in httpx.get(f"{fake.url}/_fake/requests").json()
            if recorded["stream_ending"] is not None
        ],
        timeout=10,
    )
    assert stream["path"] == "/v1/chat/completions" and stream["stream_ending"] == "cancelled"
    assert stream["content_events_sent"] < 20  # 2 s of the stream; the proxy notices within a few events
    assert httpx.get(f"{proxy.url}/health").status_code == 200


def test_unreachable_upstream_gives_502_in_each_format(start_proxy, fake):
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{placeholder.getsockname()[1]}"
    proxy = start_proxy(proxy_env(fake, OPENAI_UPSTREAM_URL=dead, ANTHROPIC_UPSTREAM_URL=dead))
    response = httpx.post(f"{proxy.url}{CHAT}", json=chat("x"))
    assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_unreachable"
    response = httpx.post(f"{proxy.url}{MESSAGES}", json=message("x"))
    assert response.status_code == 502 and response.json()["type"] == "error"


def test_stalled_upstream_gives_504(start_proxy, fake):
    proxy = start_proxy(proxy_env(fake, UPSTREAM_TIMEOUT="1"))
    started = time.monotonic()
    response = httpx.post(f"{proxy.url}{CHAT}", json=chat("#fake:delay_ms=4000"), timeout=10)
    assert response.status_code == 504 and response.json()["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - started < 3
    with pytest.raises(anthropic.APIStatusError) as raised:
        anthropic_client(proxy).messages.create(**message("#fake:delay_ms=4000"))
    assert raised.value.status_code == 504 and raised.value.body["error"]["type"] == "timeout_error"


def test_no_keys_gives_503_and_the_status_page_says_how_to_add_them(start_proxy, fake):
    proxy = start_proxy({"OPENAI_UPSTREAM_URL": fake.url, "ANTHROPIC_UPSTREAM_URL": fake.url})
    with pytest.raises(openai.APIStatusError) as raised:
        openai_client(proxy).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert raised.value.status_code == 503
    response = httpx.post(f"{proxy.url}{MESSAGES}", json=message("x"))
    assert response.status_code == 503 and response.json()["error"]["type"] == "overloaded_error"
    assert "OPENAI_KEY" in httpx.get(f"{proxy.url}/").text
    assert [model.id for model in openai_client(proxy).models.list()] == []
    assert fake.requests == []


def test_canary_key_appears_nowhere(start_proxy, fake):
    """Drives every kind of outcome, key retirement included, then reads all a client or a log reader sees."""
    proxy = start_proxy(proxy_env(fake), args=["--set", "flow_detail=4", "--set", "termlog_verbosity=debug"])
    seen = []

    def record(response: httpx.Response):
        seen.append(f"{response.status_code} {response.headers!r} {response.text}")

    with httpx.Client(base_url=proxy.url, timeout=15) as client:
        for content in [
            "ok",
            "#fake:status=400 #fake:echo_key=1",
            "#fake:error=server_error #fake:echo_key=1",
            "#fake:error=rate_limit #fake:echo_key=1 #fake:retry_after=1",
            "#fake:error=insufficient_quota #fake:echo_key=1",
            "#fake:error=invalid_key #fake:echo_key=1",
        ]:
            for stream in (False, True):
                record(client.post(CHAT, json=chat(content, stream)))
                record(client.post(MESSAGES, json=message(content, stream)))
        # A key retires only when the checker's own probe confirms it: every key really dies now.
        for key in [*OPENAI_KEYS, *ANTHROPIC_KEYS]:
            fake.set_key_behaviour(key, "invalid_key", echo_key=1)
        for path, body in ((CHAT, chat("dying")), (MESSAGES, message("dying"))):
            wait_until(
                lambda path=path, body=body: (
                    record(response := client.post(path, json=body)) or response.status_code == 503
                )
            )
        record(client.post(CHAT, content=b"{not json"))
        record(client.post(MESSAGES, content=b"[" * 10000))
        for path in [
            "/",
            "/status",
            "/health",
            "/proxy/openai/v1/models",
            "/proxy/anthropic/v1/models",
            "/proxy/openai/v1/organization/api_keys",
            "/proxy/openai/v1/chat/completions/../../files",
        ]:
            record(client.get(path))
    statuses = [int(text.split()[0]) for text in seen]
    assert {200, 400, 500, 503} <= set(statuses)  # success, passed-on errors, and every key retired in the end
    for text in seen:
        assert CANARY not in text
    log = proxy.log()
    assert "Hello from the fake upstream" in log  # the log really shows bodies
    assert "is now revoked" in log or "is now over_quota" in log
    assert CANARY not in log
