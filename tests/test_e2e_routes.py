"""Everything that is not a text-generation route is answered by the proxy and never reaches the upstream."""

import json
import socket

import httpx
import pytest

from tests.harness import send_raw

pytestmark = pytest.mark.e2e

BODY = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}'


def raw_request(proxy, request_line: bytes, headers: bytes = b"", body: bytes = BODY) -> tuple[int, bytes, bytes]:
    """Sends bytes exactly as given (with a host, a content type and the body's length) and returns (status,
    headers, body) of the answer."""
    return send_raw(
        proxy.port,
        request_line
        + b"\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + headers
        + b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n"
        + body,
    )


HOSTILE_TARGETS = [
    b"/proxy/openai/v1/chat/completions/../../organization/api_keys",
    b"/proxy/openai/v1/../v1/chat/completions",
    b"/proxy/openai/v1/./chat/completions",
    b"/proxy/openai/v1/chat/completions/",
    b"/proxy/openai/v1/%2e%2e/chat/completions",
    b"/proxy/openai/v1/chat%2fcompletions",
    b"/proxy/openai/v1/chat%2Fcompletions",
    b"/proxy/openai/v1/chat%5ccompletions",
    b"/proxy/openai/v1/chat\\completions",
    b"/proxy/openai/v1/chat/completions;x=1",
    b"/proxy/openai/v1/chat/completions%00",
    b"/proxy/openai/v1/chat/completions%00.json",
    b"/proxy/openai/v1/%c0%ae%c0%ae/chat/completions",
    b"/proxy/openai/v1/chat/completions\xe2\x80\xa5",
    b"/proxy/openai/v1/Chat/Completions",
    b"/PROXY/openai/v1/chat/completions",
    b"/proxy/OpenAI/v1/chat/completions",
    b"/proxy/openai/v1/chat/completions?key=..%2f..%2forganization",
    b"/proxy/openai/v1/chat/completions#frag",
    b"/proxy/anthropic/v1/messages/../../v1/organizations",
    b"/proxy/anthropic/v1/messages/",
    b"/proxy/anthropic/v1/Messages",
    b"/proxy/openai/v1/messages",  # the other API's route under this prefix
    b"/proxy/anthropic/v1/embeddings",
    b"/v1/chat/completions",  # no service prefix
    b"/proxy/v1/chat/completions",
]

ADMINISTRATIVE_TARGETS = [
    b"/proxy/openai/v1/organization/api_keys",
    b"/proxy/openai/v1/organization/projects",
    b"/proxy/openai/v1/organization/users",
    b"/proxy/openai/v1/organization/usage/completions",
    b"/proxy/openai/v1/organization/costs",
    b"/proxy/openai/v1/projects",
    b"/proxy/openai/v1/api_keys",
    b"/proxy/openai/v1/files",
    b"/proxy/openai/v1/fine_tuning/jobs",
    b"/proxy/openai/v1/batches",
    b"/proxy/openai/v1/assistants",
    b"/proxy/openai/v1/threads",
    b"/proxy/openai/v1/vector_stores",
    b"/proxy/openai/v1/uploads",
    b"/proxy/openai/v1/images/generations",
    b"/proxy/openai/v1/audio/speech",
    b"/proxy/openai/v1/moderations",
    b"/proxy/openai/dashboard/billing/usage",
    b"/proxy/openai/dashboard/billing/subscription",
    b"/proxy/openai/v1/dashboard/billing/credit_grants",
    b"/proxy/openai/v1/usage",
    b"/proxy/openai/v1/admin",
    b"/proxy/anthropic/v1/organizations/api_keys",
    b"/proxy/anthropic/v1/organizations/workspaces",
    b"/proxy/anthropic/v1/organizations/users",
    b"/proxy/anthropic/v1/organizations/usage_report/messages",
    b"/proxy/anthropic/v1/messages/batches",
    b"/proxy/anthropic/v1/files",
    b"/proxy/anthropic/v1/admin",
]


@pytest.mark.parametrize("target", HOSTILE_TARGETS + ADMINISTRATIVE_TARGETS, ids=repr)
@pytest.mark.parametrize("method", [b"POST", b"GET", b"DELETE"])
def test_unknown_targets_are_refused_locally(proxy, fake, method, target):
    status, _, content = raw_request(proxy, method + b" " + target + b" HTTP/1.1")
    assert status in (400, 404, 405)
    error = json.loads(content)
    if target.startswith(b"/proxy/anthropic"):
        assert error["type"] == "error" and error["error"]["message"]
    else:
        assert error["error"]["message"]
    assert fake.requests == []


@pytest.mark.parametrize(
    "target, upstream_path",
    [
        (b"/proxy/openai//v1/chat/completions", "/v1/chat/completions"),
        (b"/proxy/openai/v1//chat/completions", "/v1/chat/completions"),  # a base URL typed with a trailing slash
        (b"//proxy//openai///v1/chat//completions?x=1", "/v1/chat/completions"),
        (b"/proxy/anthropic//v1/messages", "/v1/messages"),
    ],
)
def test_repeated_slashes_are_merged_before_routing(proxy, fake, target, upstream_path):
    body = BODY if b"openai" in target else b'{"model": "claude-sonnet-5", "max_tokens": 5, "messages": []}'
    status, _, _ = raw_request(proxy, b"POST " + target + b" HTTP/1.1", body=body)
    assert status == 200
    assert [r.path for r in fake.requests] == [upstream_path]


def test_websocket_upgrades_get_426_so_codex_falls_back_to_https_at_once(proxy, fake):
    upgrade = b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    status, _, content = raw_request(proxy, b"GET /proxy/openai/v1/responses HTTP/1.1", upgrade, body=b"")
    assert status == 426 and json.loads(content)["error"]["code"] == "websocket_not_supported"
    assert fake.requests == []


@pytest.mark.parametrize(
    "method, target",
    [
        (b"GET", b"/proxy/openai/v1/responses/resp_0123abcd"),
        (b"DELETE", b"/proxy/openai/v1/responses/resp_0123abcd"),
        (b"POST", b"/proxy/openai/v1/responses/resp_0123abcd/cancel"),
        (b"GET", b"/proxy/openai/v1/responses/resp_0123abcd/input_items"),
    ],
)
def test_stored_responses_are_refused_with_a_reason(proxy, fake, method, target):
    status, _, content = raw_request(proxy, method + b" " + target + b" HTTP/1.1", body=b"")
    assert status == 404
    error = json.loads(content)["error"]
    assert error["code"] == "stored_responses_not_served" and "stored responses" in error["message"]
    assert fake.requests == []


def test_codex_compaction_and_input_token_counts_are_forwarded(proxy, fake):
    body = {"model": "gpt-5.4", "input": [{"role": "user", "content": "hello"}], "instructions": "be brief"}
    compact = httpx.post(f"{proxy.url}/proxy/openai/v1/responses/compact", json=body)
    counted = httpx.post(f"{proxy.url}/proxy/openai/v1/responses/input_tokens", json=body)
    assert compact.status_code == 200 and compact.json()["usage"]["input_tokens"] > 0
    assert counted.status_code == 200 and counted.json()["input_tokens"] > 0
    assert [r.path for r in fake.requests] == ["/v1/responses/compact", "/v1/responses/input_tokens"]
    assert all(json.loads(r.body) == body for r in fake.requests)


def test_background_responses_are_refused_because_the_proxy_could_not_account_for_them(proxy, fake):
    response = httpx.post(
        f"{proxy.url}/proxy/openai/v1/responses", json={"model": "gpt-5.4", "input": "x", "background": True}
    )
    assert response.status_code == 400 and "background" in response.json()["error"]["message"]
    assert fake.requests == []


@pytest.mark.parametrize(
    "request_line",
    [
        b"POST http://127.0.0.1:9/v1/chat/completions HTTP/1.1",
        b"POST http://api.openai.com/proxy/openai/v1/chat/completions HTTP/1.1",
        b"POST https://evil.example:443/proxy/openai/v1/chat/completions HTTP/1.1",
    ],
)
def test_absolute_form_targets_are_refused(proxy, fake, request_line):
    status, _, content = raw_request(proxy, request_line)
    assert status in (400, 404)
    assert "error" in json.loads(content)
    assert fake.requests == []


@pytest.mark.parametrize("method", [b"GET", b"PUT", b"DELETE", b"PATCH", b"post", b"CONNECT"])
def test_wrong_method_on_known_route(proxy, fake, method):
    status, head, content = raw_request(proxy, method + b" /proxy/openai/v1/chat/completions HTTP/1.1")
    assert status in (400, 405)
    if status == 405:
        assert b"allow: OPTIONS, POST" in head.lower().replace(b"allow: options, post", b"allow: OPTIONS, POST")
        assert json.loads(content)["error"]["code"] == "method_not_allowed"
    assert fake.requests == []


def test_anthropic_errors_use_anthropic_format(proxy, fake):
    response = httpx.get(f"{proxy.url}/proxy/anthropic/v1/organizations/api_keys")
    assert response.status_code == 404
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "not_found_error"


def test_browser_get_under_proxy_redirects_home(proxy, fake):
    response = httpx.get(
        f"{proxy.url}/proxy/openai/v1/chat/completions", headers={"accept": "text/html,application/xhtml+xml"}
    )
    assert response.status_code == 302 and response.headers["location"] == "/"


def test_cors_preflight_is_answered_locally(proxy, fake):
    response = httpx.options(
        f"{proxy.url}/proxy/openai/v1/chat/completions",
        headers={
            "origin": "https://chat.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == "*"
    assert "authorization" in response.headers["access-control-allow-headers"]
    assert "access-control-allow-credentials" not in response.headers
    assert fake.requests == []


def test_browsers_may_read_the_headers_clients_act_on(proxy, fake):
    served = httpx.post(
        f"{proxy.url}/proxy/openai/v1/chat/completions", content=BODY, headers={"origin": "https://chat.example"}
    )
    refused = httpx.get(f"{proxy.url}/proxy/anthropic/v1/files", headers={"origin": "https://chat.example"})
    for response in (served, refused):
        exposed = {name.strip() for name in response.headers["access-control-expose-headers"].split(",")}
        assert {
            "retry-after",
            "x-proxy-error",
            "request-id",
            "x-request-id",
            "x-ratelimit-remaining",
            "x-ratelimit-remaining-requests",
            "anthropic-ratelimit-requests-remaining",
        } <= exposed
        assert response.headers["access-control-allow-origin"] == "*"
    assert "x-ratelimit-remaining-requests" in served.headers


@pytest.mark.parametrize("size", [5 * 1024 * 1024, 9 * 1024 * 1024])
def test_declared_body_over_the_limit_is_refused_in_json(proxy, fake, size):
    """4 MiB is the default limit; mitmproxy's own (HTML) backstop is at twice that."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(
            b"POST /proxy/anthropic/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: " + str(size).encode() + b"\r\n\r\n"
        )
        if size < 8 * 1024 * 1024:
            sock.sendall(b"x" * size)  # our limit answers once the request is read; mitmproxy's at the headers
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 413")
    if size < 8 * 1024 * 1024:
        assert json.loads(received.partition(b"\r\n\r\n")[2])["error"]["type"] == "request_too_large"
    assert fake.requests == []


def test_chunked_body_over_the_limit_is_refused(proxy, fake):
    response = httpx.post(
        f"{proxy.url}/proxy/openai/v1/chat/completions", content=iter([b"x" * (1024 * 1024)] * 5), timeout=10
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert fake.requests == []


def test_pipe_refuses_requests_that_skipped_the_pipeline(proxy):
    """The dispatcher's pipe, where streamed answers pass on loopback: without a token it only ever refuses."""
    pipe_port = int(proxy.wait_for_log(r"the pipe .* listens on 127\.0\.0\.1:(\d+)").group(1))
    response = httpx.post(f"http://127.0.0.1:{pipe_port}/proxy/openai/v1/chat/completions", content=BODY)
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "proxy_internal_error"
    guessed = httpx.post(f"http://127.0.0.1:{pipe_port}/pipe/guessed-token", content=BODY)
    assert guessed.status_code == 500


def test_streams_one_after_another_on_one_connection_each_arrive_whole(proxy, fake):
    """mitmproxy keeps its connection to the pipe for the client's next request: each streamed answer is framed
    on its own, and a buffered answer between them takes no part."""
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "Hello #fake:events=5"}]}
    with httpx.Client(base_url=proxy.url) as client:
        for _ in range(3):
            response = client.post("/proxy/openai/v1/chat/completions", json=body)
            assert response.status_code == 200 and response.text.rstrip().endswith("data: [DONE]")
            assert response.text.count('"chat.completion.chunk"') == 7  # a role chunk, 5 with content, the end
        buffered = client.post("/proxy/openai/v1/chat/completions", json={**body, "stream": False})
        assert buffered.json()["object"] == "chat.completion"
        again = client.post("/proxy/openai/v1/chat/completions", json=body)
        assert again.text.count('"chat.completion.chunk"') == 7 and again.text.rstrip().endswith("data: [DONE]")
    assert [request.stream_ending for request in fake.requests] == ["completed"] * 3 + [None, "completed"]


def test_health_and_status(proxy):
    assert httpx.get(f"{proxy.url}/health").text == "OK"
    status = httpx.get(f"{proxy.url}/status").json()
    assert status["endpoints"]["openai"] == f"{proxy.url}/proxy/openai/v1"
    assert status["openai"]["keys"]["active"] == 2
    assert status["anthropic"]["keys"]["total"] == 1
    page = httpx.get(f"{proxy.url}/")
    assert page.headers["content-type"].startswith("text/html")
    assert f"{proxy.url}/proxy/anthropic/v1" in page.text
