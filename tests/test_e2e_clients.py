"""The real clients through the proxy: their recorded requests replayed, the CLIs and SDKs live, a pooled client.

The fixtures come from `python -m tests.clients.record` (the clients against the fake upstream, no proxy), so a
proxy change that refuses or alters what a real client sends fails here. The CLIs come from `./run.sh test`.
"""

import base64
import contextlib
import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests import fakeupstream
from tests.clients import CLIENTS_DIR, find_binary
from tests.clients.scenarios import SCENARIOS, THINKING, TOOL_OUTPUT, Bases

pytestmark = pytest.mark.e2e

FIXTURES = sorted((Path(__file__).parent / "fixtures" / "clients").glob("*.json"))
CLIENT_TOKEN = "sk-client-placeholder-token"
PREFIX = {"openai": "/proxy/openai", "anthropic": "/proxy/anthropic"}
BINARIES = {"claude-code": "claude", "codex-cli": "codex"}
# Hop-by-hop and framing headers: httpx sets its own, the recorded ones describe the recording's connection.
NOT_REPLAYED = {
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
}
NEVER_FORWARDED = {"api_key", "base_url", "api_base", "organization", "project"}  # the proxy drops these fields
USAGE_ASKED = {"/v1/chat/completions", "/v1/completions"}  # streamed, the proxy asks for usage on these
TOOL_RESULT_TYPES = {"tool_result", "function_call_output", "custom_tool_call_output"}


def proxy_bases(proxy, url: str | None = None) -> Bases:
    url = url or proxy.url
    return Bases(f"{url}/proxy/openai/v1", f"{url}/proxy/anthropic")


def is_websocket(recorded: dict) -> bool:
    return any(name.lower() == "upgrade" and value.lower() == "websocket" for name, value in recorded["headers"])


def recorded_requests(websocket: bool) -> list:
    """Each fixture's plain requests, or its first websocket upgrade (Codex repeats it while the fake says 404)."""
    params = []
    for path in FIXTURES:
        fixture = json.loads(path.read_text())
        chosen = [
            (index, recorded)
            for index, recorded in enumerate(fixture["requests"])
            if is_websocket(recorded) == websocket
        ]
        params += [
            pytest.param(fixture["api"], recorded, id=f"{path.stem}-{index}")
            for index, recorded in (chosen[:1] if websocket else chosen)
        ]
    return params


def replay(proxy, api: str, recorded: dict) -> httpx.Response:
    dropped = NOT_REPLAYED - ({"connection", "upgrade"} if is_websocket(recorded) else set())
    headers = [(name, value) for name, value in recorded["headers"] if name.lower() not in dropped]
    content = None if recorded["body"] is None else json.dumps(recorded["body"]).encode()
    return httpx.request(
        recorded["method"], proxy.url + PREFIX[api] + recorded["path"], headers=headers, content=content, timeout=30
    )


def expected_upstream_body(path: str, body: dict) -> dict:
    """The recorded body after the two changes the proxy documents."""
    expected = {name: value for name, value in body.items() if name not in NEVER_FORWARDED}
    if path in USAGE_ASKED and body.get("stream") is True and "include_usage" not in body.get("stream_options", {}):
        expected["stream_options"] = {**body.get("stream_options", {}), "include_usage": True}
    return expected


@pytest.mark.parametrize("api, recorded", recorded_requests(websocket=False))
def test_recorded_request_passes_unchanged(proxy, fake, api, recorded):
    response = replay(proxy, api, recorded)
    assert response.is_success, response.text[:1000]
    (received,) = fake.requests
    path = recorded["path"].partition("?")[0]
    assert received.path == path
    assert json.loads(received.body) == expected_upstream_body(path, recorded["body"])


@pytest.mark.parametrize("api, recorded", recorded_requests(websocket=True))
def test_recorded_websocket_upgrade_is_answered_426(proxy, fake, api, recorded):
    """426 makes Codex fall back to HTTPS at once; 404, 403 or 405 make it retry for seconds first."""
    assert replay(proxy, api, recorded).status_code == 426
    assert fake.requests == []


def run_live(proxy, name: str, url: str | None = None) -> str:
    scenario = SCENARIOS[name]
    if scenario.client in BINARIES:
        binary, reason = find_binary(BINARIES[scenario.client])
        if binary is None:
            pytest.skip(reason)
    return scenario.run(proxy_bases(proxy, url), CLIENT_TOKEN)


def tool_results(value) -> list:
    """Every tool result item anywhere in a request body, in any of the APIs' shapes."""
    if isinstance(value, list):
        return [found for item in value for found in tool_results(item)]
    if not isinstance(value, dict):
        return []
    here = [value] if value.get("type") in TOOL_RESULT_TYPES or value.get("role") == "tool" else []
    return here + [found for item in value.values() for found in tool_results(item)]


LIVE = [name for name in SCENARIOS if name != "anthropic-count-tokens"]  # count_tokens answers no text


@pytest.mark.parametrize("name", LIVE)
def test_live_client_through_proxy(proxy, fake, name):
    assert run_live(proxy, name) == fakeupstream.REPLY
    if "tool" in name:  # the tool really ran and its output went back upstream in the follow-up request
        results = [
            result
            for recorded in fake.requests
            if recorded.method == "POST"
            for result in tool_results(json.loads(recorded.body))
        ]
        assert any(TOOL_OUTPUT in json.dumps(result) for result in results), results


@pytest.mark.parametrize("name", ["anthropic-tool-thinking", "anthropic-tool-thinking-stream"])
def test_thinking_block_and_signature_survive_the_round_trip(proxy, fake, name):
    run_live(proxy, name)
    first, second = (json.loads(recorded.body) for recorded in fake.requests)
    assert first["thinking"] == THINKING
    (thinking,) = [block for block in second["messages"][1]["content"] if block["type"] == "thinking"]
    assert thinking["thinking"] == fakeupstream.THINKING
    assert base64.b64decode(thinking["signature"], validate=True)


class UpgradeClock:
    """A TCP relay in front of the proxy that notes when the first websocket upgrade request passes through."""

    def __init__(self, port: int):
        self.target = ("127.0.0.1", port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.first_upgrade: float | None = None
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_client and self.first_upgrade is None and b"upgrade: websocket" in data.lower():
                    self.first_upgrade = time.monotonic()
                sink.sendall(data)
        except OSError:
            pass
        finally:  # either side gone: end the pair; shutdown (not close alone) wakes the other thread's recv
            for end in (source, sink):
                _shut(end)

    def close(self) -> None:
        _shut(self.server)  # wakes the accept


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # not connected, or already shut
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def test_codex_falls_back_from_websocket_without_retry_delays(proxy, fake):
    clock = UpgradeClock(proxy.port)
    first_post: list[float] = []
    done = threading.Event()

    def watch_fake() -> None:
        while not done.is_set() and not first_post:
            if any(recorded.method == "POST" for recorded in list(fake.requests)):
                first_post.append(time.monotonic())
            time.sleep(0.002)

    watcher = threading.Thread(target=watch_fake, daemon=True)
    watcher.start()
    try:
        assert run_live(proxy, "codex-plain", url=clock.url) == fakeupstream.REPLY
    finally:
        done.set()
        watcher.join()
        clock.close()
    assert clock.first_upgrade is not None and first_post, "Codex did not try a websocket, or never POSTed"
    fallback = first_post[0] - clock.first_upgrade
    print(f"Codex websocket fallback: {fallback:.3f} s from the first upgrade to the first POST at the upstream")
    assert fallback < 3, f"{fallback:.1f} s: Codex went through its retry schedule instead of falling back at once"
    assert {recorded.method for recorded in fake.requests} == {"POST"}  # no upgrade was forwarded


CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello"}]}
POOLED_SEQUENCE = [  # (request, status): local answers, refusals and forwarded requests, mixed on one socket
    ({"method": "GET", "path": "/no-such-path"}, 404),
    ({"method": "GET", "path": "/proxy/openai/v1/models"}, 200),
    ({"method": "POST", "path": "/proxy/openai/v1/chat/completions", "body": CHAT}, 200),
    ({"method": "POST", "path": "/proxy/openai/v1/chat/completions", "body": {"messages": CHAT["messages"]}}, 400),
    ({"method": "POST", "path": "/proxy/openai/v1/chat/completions", "body": CHAT}, 200),
]


@pytest.mark.parametrize("close", [True, False], ids=["connection-close", "keep-alive"])
def test_pooled_client_gets_every_answer(proxy, fake, close):
    """A `Connection: close` request is answered with `Connection: close` (RFC 9112 §9.6): a pool must never
    reuse a socket the proxy is about to close. Without it, the socket stays open for the next request."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed: ./run.sh test installs Debian's nodejs")
    headers = {"connection": "close"} if close else {}
    requests = [request | {"headers": headers} for request, _ in POOLED_SEQUENCE]
    completed = subprocess.run(
        ["node", CLIENTS_DIR / "pooled_client.mjs", proxy.url],
        input=json.dumps(requests),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    results = json.loads(completed.stdout)
    assert [result.get("status") for result in results] == [status for _, status in POOLED_SEQUENCE], results
    for result in results:
        assert isinstance(result["body"], dict), result
        assert ("close" in result["headers"].get("connection", "").lower()) == close, result
