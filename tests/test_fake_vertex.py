"""The Vertex AI wire layer (llmproxy/services/vertex.py) against the fake Vertex AI and token endpoint
(tests/fakes/vertex.py), and the fake itself against the anthropic SDK's Vertex client."""

import asyncio
import json
import secrets
import socket

import aiohttp
import google.auth.exceptions
import pytest
from anthropic import AnthropicVertex
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.oauth2 import service_account
from yarl import URL

from llmproxy.api import sse
from llmproxy.config import ConfigError
from llmproxy.pool.keys import PoolKey, Verdict
from llmproxy.services.base import UpstreamFailure
from llmproxy.services.vertex import (
    CLOUD_PLATFORM_SCOPE,
    GOOGLE_TOKEN_URI,
    VERTEX_ANTHROPIC_VERSION,
    GcpCredential,
    TokenError,
    TokenSource,
    Vertex,
    _refusal,
    anthropic_error,
    check_request,
    check_verdict,
    credential_from_file,
    key_spellings,
    key_verdict,
    parse_credentials,
    predict_request,
    vertex_model_id,
)
from llmproxy.upstream.client import UpstreamRequest
from tests.fakes.vertex import FakeVertex
from tests.fakeupstream import REPLY

MODEL = "claude-sonnet-4-5@20250929"
USER = [{"role": "user", "content": "hi there"}]


@pytest.fixture(scope="module")
def vertex(fake):
    vertex = FakeVertex(fake.url).start_in_thread()
    yield vertex
    vertex.stop_in_thread()


@pytest.fixture(autouse=True)
def _fresh_vertex(vertex):
    vertex.reset()


def new_account(vertex: FakeVertex, project: str = "proj-a", marker: str = "") -> dict:
    """A service account of its own for each test (so disabling one touches no other test); `marker` is a key
    marker of the fake upstream (-429, -401...) put in the email's local part."""
    return vertex.make_service_account(project, f"svc{secrets.token_hex(4)}{marker}@{project}.iam.gserviceaccount.com")


def credential_of(info: dict, region: str = "us-east5", project: str | None = None) -> GcpCredential:
    return GcpCredential(
        project or info["project_id"], info["client_email"], region, info["private_key"], info["token_uri"]
    )


def rsa_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return pem.decode()


def key_body(pem: str) -> str:
    """The base64 body of a PEM, without armour or line ends."""
    return "".join(line for line in pem.splitlines() if not line.startswith("-----"))


async def post(url: str, headers: list[tuple[str, str]], body: bytes) -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession() as session, session.post(url, headers=headers, data=body) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.read()


def messages_body(**fields) -> bytes:
    return json.dumps({"model": "claude-sonnet-4-5-20250929", "max_tokens": 50, "messages": USER, **fields}).encode()


# -- the anthropic SDK's own Vertex client, against the fake ---------------------------------------------------


def sdk_client(vertex: FakeVertex, info: dict) -> AnthropicVertex:
    credentials = service_account.Credentials.from_service_account_info(info, scopes=[CLOUD_PLATFORM_SCOPE])
    return AnthropicVertex(
        region="us-east5",
        project_id=info["project_id"],
        credentials=credentials,
        base_url=f"{vertex.url}/v1",
        max_retries=0,
    )


def test_anthropic_vertex_sdk_creates_a_message(vertex, fake):
    info = new_account(vertex)
    message = sdk_client(vertex, info).messages.create(model=MODEL, max_tokens=50, messages=USER)
    assert message.content[0].text == REPLY
    token_call, predict = vertex.requests
    assert token_call.path == "/token"
    assert predict.path == f"/v1/projects/proj-a/locations/us-east5/publishers/anthropic/models/{MODEL}:rawPredict"
    sent = json.loads(predict.body)
    assert "model" not in sent and "anthropic_version" in sent
    [upstream] = fake.requests
    assert upstream.key == info["client_email"]
    assert json.loads(upstream.body)["model"] == "claude-sonnet-4-5-20250929"


def test_anthropic_vertex_sdk_streams_a_message(vertex, fake):
    info = new_account(vertex)
    with sdk_client(vertex, info).messages.stream(model=MODEL, max_tokens=50, messages=USER) as stream:
        text = "".join(stream.text_stream)
    assert text == REPLY
    assert vertex.requests[-1].path.endswith(f"/models/{MODEL}:streamRawPredict")
    assert json.loads(fake.requests[-1].body)["stream"] is True


# -- TokenSource -------------------------------------------------------------------------------------------------


async def test_token_is_fetched_once_and_reused(vertex):
    source = TokenSource(credential_of(new_account(vertex)))
    first = await source.token()
    assert first.startswith("ya29.") and await source.token() == first
    assert vertex.token_calls() == 1


async def test_token_close_to_expiry_is_refreshed(vertex):
    vertex.token_lifetime = 60  # under the 5 minutes of validity a token must have left to be used
    source = TokenSource(credential_of(new_account(vertex)))
    first, second = await source.token(), await source.token()
    assert first != second and vertex.token_calls() == 2


async def test_invalidate_forces_a_new_token(vertex):
    source = TokenSource(credential_of(new_account(vertex)))
    first = await source.token()
    source.invalidate()
    assert await source.token() != first and vertex.token_calls() == 2


async def test_concurrent_callers_share_one_refresh(vertex):
    source = TokenSource(credential_of(new_account(vertex)))
    tokens = await asyncio.gather(*(source.token() for _ in range(20)))
    assert len(set(tokens)) == 1 and vertex.token_calls() == 1


async def test_disabled_account_is_a_dead_credential(vertex):
    info = new_account(vertex)
    source = TokenSource(credential_of(info))
    token = await source.token()
    vertex.disable(info["client_email"])
    source.invalidate()
    with pytest.raises(TokenError) as caught:
        await source.token()
    assert caught.value.dead
    message = str(caught.value)
    assert "invalid_grant" in message and info["client_email"] in message
    assert token not in message and key_body(info["private_key"])[:40] not in message


async def test_a_key_that_is_not_the_accounts_is_refused(vertex):
    info, other = new_account(vertex), new_account(vertex)
    forged = GcpCredential("proj-a", info["client_email"], "us-east5", other["private_key"], vertex.token_uri)
    with pytest.raises(TokenError) as caught:
        await TokenSource(forged).token()
    assert caught.value.dead and "Invalid JWT Signature" in str(caught.value)


async def test_unreachable_token_endpoint_is_not_a_dead_credential(vertex):
    with socket.socket() as closed:  # a port nothing listens on once the socket is closed
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    info = new_account(vertex)
    credential = GcpCredential(
        "proj-a", info["client_email"], "us-east5", info["private_key"], f"http://127.0.0.1:{port}/token"
    )
    with pytest.raises(TokenError) as caught:
        await TokenSource(credential).token()
    assert not caught.value.dead and "unreachable" in str(caught.value)


async def test_a_dead_refusal_is_remembered_for_a_while(vertex):
    info = new_account(vertex)
    vertex.disable(info["client_email"])
    source = TokenSource(credential_of(info))
    for _ in range(3):
        with pytest.raises(TokenError) as caught:
            await source.token()
        assert caught.value.dead and "account disabled" in caught.value.message
    assert vertex.token_calls() == 1  # the endpoint's word stands for REFUSAL_MEMORY seconds
    source.invalidate()
    with pytest.raises(TokenError):
        await source.token()
    assert vertex.token_calls() == 2


async def test_an_unreachable_endpoint_is_asked_again_every_time(vertex):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    info = new_account(vertex)
    source = TokenSource(
        GcpCredential("proj-a", info["client_email"], "us-east5", info["private_key"], f"http://127.0.0.1:{port}/t")
    )
    for _ in range(2):
        with pytest.raises(TokenError) as caught:
            await source.token()
        assert not caught.value.dead
    assert source._refused is None


async def test_invalidating_an_older_token_keeps_the_newer_one(vertex):
    source = TokenSource(credential_of(new_account(vertex)))
    old = await source.token()
    source.invalidate(old)
    new = await source.token()
    source.invalidate(old)  # a late 401 to the old token
    assert await source.token() == new and vertex.token_calls() == 2


# -- predict_request against the fake ---------------------------------------------------------------------------


async def test_predict_request_json(vertex, fake):
    credential = credential_of(new_account(vertex))
    token = await TokenSource(credential).token()
    url, headers, body = predict_request(
        credential, token, MODEL, messages_body(), {"Anthropic-Beta": "context-1m-2025-08-07"}, False, vertex.url
    )
    status, content_type, answer = await post(url, headers, body)
    assert status == 200 and content_type.startswith("application/json")
    assert json.loads(answer)["content"][0]["text"] == REPLY
    assert ("anthropic-beta", "context-1m-2025-08-07") in fake.requests[-1].headers


async def test_predict_request_sse(vertex):
    credential = credential_of(new_account(vertex))
    token = await TokenSource(credential).token()
    url, headers, body = predict_request(credential, token, MODEL, messages_body(stream=True), {}, True, vertex.url)
    status, content_type, answer = await post(url, headers, body)
    assert status == 200 and content_type.startswith("text/event-stream")
    events = sse.Parser().feed(answer)
    assert [events[0].event, events[-1].event] == ["message_start", "message_stop"]
    deltas = [json.loads(e.data)["delta"] for e in events if e.event == "content_block_delta"]
    assert "".join(delta["text"] for delta in deltas) == REPLY


async def test_stream_dropped_upstream_is_dropped_by_the_fake(vertex):
    credential = credential_of(new_account(vertex))
    token = await TokenSource(credential).token()
    body = messages_body(stream=True, messages=[{"role": "user", "content": "#fake:reset_after=1 hi"}])
    url, headers, body = predict_request(credential, token, MODEL, body, {}, True, vertex.url)
    with pytest.raises(aiohttp.ClientPayloadError):
        await post(url, headers, body)


@pytest.mark.parametrize("stream", [False, True])
async def test_expired_token_gets_401(vertex, stream):
    vertex.token_lifetime = 0
    credential = credential_of(new_account(vertex))
    token = await TokenSource(credential).token()
    url, headers, body = predict_request(credential, token, MODEL, messages_body(), {}, stream, vertex.url)
    status, _, answer = await post(url, headers, body)
    assert status == 401
    error = (json.loads(answer)[0] if stream else json.loads(answer))["error"]  # a list on the streaming method
    assert error["status"] == "UNAUTHENTICATED"
    assert key_verdict(status, answer) == "revoked"
    converted_status, converted = anthropic_error(status, answer)
    assert converted_status == 401 and json.loads(converted)["error"]["type"] == "authentication_error"


async def test_token_of_another_project_is_denied(vertex):
    info = new_account(vertex, project="proj-a")
    token = await TokenSource(credential_of(info)).token()
    url, headers, body = predict_request(
        credential_of(info, project="proj-b"), token, MODEL, messages_body(), {}, False, vertex.url
    )
    status, _, answer = await post(url, headers, body)
    assert status == 403 and json.loads(answer)["error"]["status"] == "PERMISSION_DENIED"
    assert key_verdict(status, answer) == "forbidden"
    assert anthropic_error(status, answer)[0] == 403


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_rate_limit_is_vertex_quota(vertex, stream):
    credential = credential_of(new_account(vertex, marker="-429"))
    token = await TokenSource(credential).token()
    url, headers, body = predict_request(credential, token, MODEL, messages_body(), {}, stream, vertex.url)
    status, _, answer = await post(url, headers, body)
    assert status == 429 and "online_prediction_requests_per_base_model" in answer.decode()
    assert key_verdict(status, answer) == "rate_limited"
    converted_status, converted = anthropic_error(status, answer)
    assert converted_status == 429 and json.loads(converted)["error"]["type"] == "rate_limit_error"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model": MODEL}, "model: Extra inputs are not permitted"),
        ({"anthropic_version": None}, "anthropic_version: Field required"),
        ({"messages": []}, "messages: at least one message is required"),
    ],
)
async def test_fake_refuses_bodies_vertex_refuses(vertex, fields, message):
    token = await TokenSource(credential_of(new_account(vertex))).token()
    body = {"anthropic_version": VERTEX_ANTHROPIC_VERSION, "max_tokens": 50, "messages": USER} | fields
    body = {name: value for name, value in body.items() if value is not None}
    url = f"{vertex.url}/v1/projects/proj-a/locations/us-east5/publishers/anthropic/models/{MODEL}:rawPredict"
    status, _, answer = await post(url, [("authorization", f"Bearer {token}")], json.dumps(body).encode())
    assert status == 400
    assert json.loads(answer)["error"] == {"type": "invalid_request_error", "message": message}
    assert anthropic_error(status, answer) == (400, answer)  # the model's own refusal passes as it is


@pytest.mark.parametrize(
    ("marker", "project", "verdict"),
    [("", None, "success"), ("-429", None, "rate_limited"), ("", "proj-b", "forbidden")],
)
async def test_check_request(vertex, marker, project, verdict):
    info = new_account(vertex, marker=marker)
    token = await TokenSource(credential_of(info)).token()
    status, _, answer = await post(*check_request(credential_of(info, project=project), token, MODEL, vertex.url))
    assert check_verdict(status, answer) == verdict


# -- credentials -------------------------------------------------------------------------------------------------


def test_parse_credentials_accepts_the_ways_a_key_is_written():
    pem = rsa_pem()
    body = key_body(pem)
    written = [
        pem.replace("\n", "\\n"),  # as copied out of the JSON key file
        pem.replace("\n", ""),  # armour and body on one line, the original's documented example
        body,  # the base64 body alone
        pem,  # real line ends
    ]
    value = ",".join(f"proj-{n}:svc@proj-{n}.iam.gserviceaccount.com:us-east5:{key}" for n, key in enumerate(written))
    credentials = parse_credentials(value + ", ,example.com:proj:svc@x.iam.gserviceaccount.com:global:" + body)
    assert [c.project_id for c in credentials] == ["proj-0", "proj-1", "proj-2", "proj-3", "example.com:proj"]
    assert {c.private_key for c in credentials} == {pem}
    assert {c.token_uri for c in credentials} == {GOOGLE_TOKEN_URI}
    assert credentials[4].region == "global"
    assert parse_credentials("", token_uri="http://fake/token") == []
    assert parse_credentials(value, token_uri="http://fake/token")[0].token_uri == "http://fake/token"


def test_credential_repr_hides_the_key():
    pem = rsa_pem()
    [credential] = parse_credentials(f"proj:svc@proj.iam.gserviceaccount.com:us-east5:{key_body(pem)}")
    assert key_body(pem)[:40] not in repr(credential) and "PRIVATE KEY" not in repr(credential)
    assert "svc@proj.iam.gserviceaccount.com" in repr(credential)


@pytest.mark.parametrize(
    ("entry", "complaint"),
    [
        ("proj:svc@proj.iam.gserviceaccount.com:{key}", "not of the form"),
        ("proj::us-east5:{key}", "not of the form"),
        ("proj:svc-at-proj:us-east5:{key}", "no client email"),
        ("proj:svc@proj.iam.gserviceaccount.com:evil.example/x:{key}", "no valid region"),
        ("proj:svc@proj.iam.gserviceaccount.com:us-east5:{key}xyz", "does not load"),
        ("proj:svc@proj.iam.gserviceaccount.com:us-east5:{ec_key}", "does not load"),
    ],
)
def test_parse_credentials_refuses_bad_entries_without_naming_the_key(entry, complaint):
    key = key_body(rsa_pem())
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ec_key = key_body(ec_pem.decode())
    good = f"proj:svc@proj.iam.gserviceaccount.com:us-east5:{key}"
    with pytest.raises(ConfigError) as caught:
        parse_credentials(f"{good},{entry.format(key=key, ec_key=ec_key)}")
    message = str(caught.value)
    assert message.startswith("GCP_CREDENTIALS entry 2 ") and complaint in message
    assert key[:20] not in message and ec_key[:20] not in message


def test_credential_from_file(vertex, tmp_path):
    info = new_account(vertex)
    path = tmp_path / "key.json"
    path.write_text(json.dumps(info))
    credential = credential_from_file(path, "europe-west1")
    assert (credential.project_id, credential.client_email, credential.region) == (
        "proj-a",
        info["client_email"],
        "europe-west1",
    )
    assert credential.token_uri == vertex.token_uri and credential.private_key == info["private_key"]
    assert credential_from_file(path, "global", token_uri="http://other/token").token_uri == "http://other/token"


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        (None, "cannot be read"),
        ("{not json", "is not JSON"),
        (json.dumps({"type": "authorized_user"}), "not a service account key"),
        (json.dumps({"type": "service_account", "project_id": "p"}), "lacks"),
    ],
)
def test_credential_from_file_refuses_bad_files(tmp_path, content, complaint):
    path = tmp_path / "key.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=complaint) as caught:
        credential_from_file(path, "us-east5")
    assert str(path) in str(caught.value)


def test_credential_from_file_refuses_a_broken_key(tmp_path):
    path = tmp_path / "key.json"
    broken = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n"
    path.write_text(
        json.dumps({"type": "service_account", "project_id": "p", "client_email": "s@p", "private_key": broken})
    )
    with pytest.raises(ConfigError, match="does not load") as caught:
        credential_from_file(path, "us-east5")
    assert "MIIEvQ" not in str(caught.value)


# -- models, errors, verdicts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "vertex_id"),
    [
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5@20250929"),
        ("claude-3-5-haiku-20241022", "claude-3-5-haiku@20241022"),
        ("claude-opus-4-1-20250805", "claude-opus-4-1@20250805"),
        ("claude-haiku-4-5-20251001", "claude-haiku-4-5@20251001"),
        ("claude-sonnet-4-20250514", "claude-sonnet-4@20250514"),
        ("claude-3-7-sonnet-20250219", "claude-3-7-sonnet@20250219"),
        ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet-v2@20241022"),
        ("claude-sonnet-4-5", "claude-sonnet-4-5@20250929"),
        ("claude-3-5-sonnet-latest", "claude-3-5-sonnet-v2@20241022"),
        ("claude-opus-4-6", "claude-opus-4-6"),
        ("claude-sonnet-4-5@20250929", "claude-sonnet-4-5@20250929"),
        ("claude-3-5-sonnet-v2@20241022", "claude-3-5-sonnet-v2@20241022"),
        ("claude-future-9-20300101", "claude-future-9@20300101"),
        ("gpt-4o", None),
        ("claude-sonnet-4-5@2025", None),
        ("claude-sonnet/../x", None),
        ("", None),
    ],
)
def test_vertex_model_id(model, vertex_id):
    assert vertex_model_id(model) == vertex_id


def google_error(code: int, status: str, message: str = "m") -> dict:
    return {"error": {"code": code, "message": message, "status": status}}


@pytest.mark.parametrize(
    ("status", "body", "expected_status", "expected_type"),
    [
        (429, google_error(429, "RESOURCE_EXHAUSTED"), 429, "rate_limit_error"),
        (429, [google_error(429, "RESOURCE_EXHAUSTED")], 429, "rate_limit_error"),
        (403, google_error(403, "PERMISSION_DENIED"), 403, "permission_error"),
        (401, google_error(401, "UNAUTHENTICATED"), 401, "authentication_error"),
        (400, google_error(400, "INVALID_ARGUMENT"), 400, "invalid_request_error"),
        (400, google_error(400, "FAILED_PRECONDITION"), 400, "invalid_request_error"),
        (404, google_error(404, "NOT_FOUND"), 404, "not_found_error"),
        (503, google_error(503, "UNAVAILABLE"), 529, "overloaded_error"),
        (500, google_error(500, "INTERNAL"), 500, "api_error"),
        (409, google_error(409, "ABORTED"), 409, "invalid_request_error"),  # no Anthropic kind: by its HTTP status
        (502, "<html>Bad Gateway</html>", 502, "api_error"),
    ],
)
def test_anthropic_error(status, body, expected_status, expected_type):
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    converted_status, converted = anthropic_error(status, raw)
    error = json.loads(converted)
    assert converted_status == expected_status
    assert error["type"] == "error" and error["error"]["type"] == expected_type
    assert error["error"]["message"] == ("m" if isinstance(body, dict | list) else "Vertex AI answered HTTP 502.")


def test_anthropic_error_keeps_anthropic_bodies():
    body = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_vrtx_1"}'
    assert anthropic_error(529, body) == (529, body)


@pytest.mark.parametrize(
    ("status", "body", "verdict"),
    [
        (200, b"{}", "success"),
        (429, google_error(429, "RESOURCE_EXHAUSTED"), "rate_limited"),
        (401, google_error(401, "UNAUTHENTICATED"), "revoked"),
        (403, google_error(403, "PERMISSION_DENIED"), "forbidden"),
        (503, [google_error(503, "UNAVAILABLE")], "server_error"),
        (500, google_error(500, "INTERNAL"), "server_error"),
        (404, google_error(404, "NOT_FOUND"), "client_error"),
        (400, google_error(400, "FAILED_PRECONDITION"), "client_error"),
        # Message text says nothing: it may echo the request.
        (
            400,
            google_error(400, "INVALID_ARGUMENT", "Quota exceeded RESOURCE_EXHAUSTED PERMISSION_DENIED"),
            "client_error",
        ),
        (429, b"not json", "rate_limited"),
        (529, b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}', "rate_limited"),
        (400, b'{"type":"error","error":{"type":"invalid_request_error","message":"x"}}', "client_error"),
        (502, b"<html></html>", "server_error"),
        (400, {"error": {"status": ["not", "a", "name"]}}, "client_error"),
    ],
)
def test_key_verdict(status, body, verdict):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    assert key_verdict(status, raw) == verdict


def test_check_verdict_reads_a_google_not_found_as_forbidden():
    assert check_verdict(404, json.dumps(google_error(404, "NOT_FOUND")).encode()) == "forbidden"
    assert check_verdict(400, json.dumps(google_error(400, "FAILED_PRECONDITION")).encode()) == "client_error"


# -- predict_request's URL, headers and body ---------------------------------------------------------------------


CREDENTIAL = GcpCredential("proj", "svc@proj.iam.gserviceaccount.com", "us-east5", "unused", GOOGLE_TOKEN_URI)


@pytest.mark.parametrize(
    ("region", "endpoint", "base"),
    [
        ("us-east5", None, "https://us-east5-aiplatform.googleapis.com"),
        ("global", None, "https://aiplatform.googleapis.com"),
        ("eu", None, "https://aiplatform.eu.rep.googleapis.com"),
        ("us-east5", "http://127.0.0.1:9/", "http://127.0.0.1:9"),
    ],
)
def test_predict_request_url(region, endpoint, base):
    credential = GcpCredential("proj", CREDENTIAL.client_email, region, "unused")
    url, _, _ = predict_request(credential, "t", MODEL, b"{}", {}, False, endpoint)
    assert url == f"{base}/v1/projects/proj/locations/{region}/publishers/anthropic/models/{MODEL}:rawPredict"
    stream_url, _, _ = predict_request(credential, "t", MODEL, b"{}", {}, True, endpoint)
    assert stream_url == url.removesuffix(":rawPredict") + ":streamRawPredict"


def test_predict_request_body_and_headers():
    body = messages_body(stream=True, metadata={"user_id": "ü"})
    _, headers, sent = predict_request(
        CREDENTIAL, "tok", MODEL, body, {"anthropic-beta": "a,b", "x-api-key": "no"}, True
    )
    payload = json.loads(sent)
    assert "model" not in payload and payload["stream"] is True
    assert payload["anthropic_version"] == VERTEX_ANTHROPIC_VERSION and payload["metadata"] == {"user_id": "ü"}
    assert headers == [
        ("authorization", "Bearer tok"),
        ("content-type", "application/json"),
        ("anthropic-beta", "a,b"),
    ]
    _, headers, sent = predict_request(
        CREDENTIAL, "tok", MODEL, messages_body(stream=True, anthropic_version="v"), {}, False
    )
    assert "stream" not in json.loads(sent) and json.loads(sent)["anthropic_version"] == "v"
    assert [name for name, _ in headers] == ["authorization", "content-type"]


@pytest.mark.parametrize("body", [b"[]", b"{", b"\xff", b"[" * 100_000])
def test_predict_request_refuses_a_body_that_is_no_object(body):
    with pytest.raises(ValueError):
        predict_request(CREDENTIAL, "tok", MODEL, body, {}, False)


def test_check_request_is_an_empty_message_list():
    url, headers, body = check_request(CREDENTIAL, "tok", MODEL)
    assert url.endswith(":rawPredict") and ("authorization", "Bearer tok") in headers
    assert json.loads(body) == {"messages": [], "max_tokens": 1, "anthropic_version": VERTEX_ANTHROPIC_VERSION}


def test_token_error_redacts_what_a_token_endpoint_echoes():
    echo = {"error": "invalid_grant", "error_description": "Bad assertion eyJhbGc.eyJpc3M.c2ln, token ya29.a0Af-x"}
    error = _refusal(CREDENTIAL, google.auth.exceptions.RefreshError("invalid_grant", echo))
    assert error.dead and "eyJ" not in error.message and "ya29" not in error.message
    assert error.message.count("[redacted]") == 2


def test_predict_request_takes_header_pairs_and_a_read_body():
    body = json.loads(messages_body())
    pairs = [("anthropic-beta", "a"), ("Anthropic-Beta", "b"), ("x-api-key", "no")]
    _, headers, sent = predict_request(CREDENTIAL, "tok", MODEL, body, pairs, False)
    assert ("anthropic-beta", "a,b") in headers and "model" not in json.loads(sent)
    assert body["model"] == "claude-sonnet-4-5-20250929"  # the caller's body stays as it was


# -- the service's own parts -------------------------------------------------------------------------------------


def test_the_service_takes_whole_entries_as_keys_and_checks_them():
    pem = rsa_pem()
    entries = [f"proj:svc@proj.iam.gserviceaccount.com:us-east5:{pem.replace(chr(10), '\\n')}", "nope"]
    with pytest.raises(ConfigError, match="GCP_CREDENTIALS entry 2 is not of the form"):
        Vertex().parse_keys(entries)
    assert Vertex().parse_keys(entries[:1]) == entries[:1]


@pytest.mark.parametrize("spelling", ["escaped", "one line", "body", "real line ends"])
def test_secret_parts_hide_the_key_in_every_spelling(spelling):
    pem = rsa_pem()
    body = key_body(pem)
    written = {
        "escaped": pem.replace("\n", "\\n"),
        "one line": pem.replace("\n", ""),
        "body": body,
        "real line ends": pem,
    }[spelling]
    parts = Vertex().secret_parts(f"example.com:proj:svc@proj.iam.gserviceaccount.com:us-east5:{written}")
    assert {written.strip(), body, pem, pem.replace("\n", "\\n")} <= set(parts)
    assert set(pem.splitlines()[1:-1]) <= set(parts)  # each PEM line (the last if long enough)
    assert all(len(part) >= 16 for part in parts)
    assert not any("svc@proj" in part or part == "us-east5" for part in parts)  # the public parts stay readable
    assert key_spellings(written) == parts


def service_and_key(vertex: FakeVertex, region: str = "us-east5", marker: str = "") -> tuple[Vertex, PoolKey]:
    """The service, getting its tokens from the fake, and a pool key of a new account (its key as the bare body)."""
    service = Vertex()
    service.configure({"gcp_token_url": vertex.token_uri})
    info = new_account(vertex, marker=marker)
    return service, PoolKey("gcp", f"proj-a:{info['client_email']}:{region}:{key_body(info['private_key'])}", "gcp")


def client_request(body: bytes, headers: list[tuple[str, str]] = ()) -> UpstreamRequest:
    return UpstreamRequest("POST", "http://unused/v1/messages", body, list(headers))


async def test_verdict_forgets_a_refused_token_of_this_tasks_last_attempt(vertex):
    service, key = service_and_key(vertex)
    refused = json.dumps(google_error(401, "UNAUTHENTICATED")).encode()

    async def attempt(status: int, body: bytes) -> Verdict:
        await service.prepare(client_request(messages_body()), None, key, URL(vertex.url))
        return service.verdict(status, {}, body)

    assert await attempt(200, b"{}") is Verdict.SUCCESS
    assert await attempt(429, b"{}") is Verdict.RATE_LIMITED
    assert vertex.token_calls() == 1
    assert await attempt(401, refused) is Verdict.REVOKED  # this token is forgotten ...
    assert await attempt(200, b"{}") is Verdict.SUCCESS
    assert vertex.token_calls() == 2  # ... and the next attempt got a new one


async def test_prepare_builds_the_regions_request_and_refuses_unknown_models(vertex):
    service, key = service_and_key(vertex, region="europe-west1")
    request = client_request(messages_body(stream=True), [("anthropic-beta", "x"), ("user-agent", "sdk")])
    outgoing = await service.prepare(request, None, key, URL("https://aiplatform.googleapis.com"))
    assert outgoing.url == (
        "https://europe-west1-aiplatform.googleapis.com/v1/projects/proj-a/locations/europe-west1"
        f"/publishers/anthropic/models/{MODEL}:streamRawPredict"
    )
    token = dict(outgoing.headers)["authorization"].removeprefix("Bearer ")
    assert token in vertex.tokens and dict(outgoing.headers)["accept-encoding"] == "identity"
    assert dict(outgoing.headers)["anthropic-beta"] == "x" and json.loads(outgoing.body)["stream"] is True
    outgoing = await service.prepare(request, None, key, URL(f"{vertex.url}/"))  # another URL: every region's
    assert outgoing.url.startswith(f"{vertex.url}/v1/projects/proj-a/locations/europe-west1/")
    with pytest.raises(UpstreamFailure) as refused:
        await service.prepare(client_request(messages_body(model="gpt-4o")), None, key, URL(vertex.url))
    assert refused.value.status == 400 and refused.value.code == "model_not_available"


async def test_prepare_fails_the_attempt_without_a_token(vertex):
    service, key = service_and_key(vertex)
    vertex.disable(key.secret.split(":")[1])
    with pytest.raises(UpstreamFailure) as failed:
        await service.prepare(client_request(messages_body()), None, key, URL(vertex.url))
    assert failed.value.code == "upstream_credential_refused" and "svc" not in str(failed.value)


@pytest.mark.parametrize(("marker", "verdict"), [("", Verdict.SUCCESS), ("-429", Verdict.RATE_LIMITED)])
async def test_probe_and_check_against_the_fake(vertex, marker, verdict):
    service, key = service_and_key(vertex, marker=marker)
    email = key.secret.split(":")[1]
    async with aiohttp.ClientSession() as session:
        assert (await service.probe(key, "claude-sonnet-4-5", session, URL(vertex.url)))[1] is verdict
        found = await service.check(key, session, URL(vertex.url))
        assert found.verdict is Verdict.SUCCESS and found.models == list(Vertex.models)
        user_agents = {dict(r.headers)["user-agent"] for r in vertex.requests if r.path != "/token"}
        assert user_agents == {"llm-key-proxy/key-check"}
        # A token Vertex refuses is replaced once; a dead credential is revoked with the endpoint's reason.
        del vertex.tokens[next(token for token, issued in vertex.tokens.items() if issued.client_email == email)]
        assert (await service.probe(key, "claude-sonnet-4-5", session, URL(vertex.url)))[1] is verdict
        vertex.disable(email)
        assert await service.probe(key, "claude-sonnet-4-5", session, URL(vertex.url)) == (401, Verdict.REVOKED)
        found = await service.check(key, session, URL(vertex.url))
        assert found.verdict is Verdict.REVOKED and "invalid_grant" in found.reason
    assert vertex.token_calls() == 3


async def test_check_rules_out_the_families_of_models_google_refuses(vertex):
    service, key = service_and_key(vertex)
    service.models = ("claude-sonnet-4-6", "claude-opus-4-8")
    async with aiohttp.ClientSession() as session:
        other_project = PoolKey("gcp", key.secret.replace("proj-a:", "proj-b:", 1), "gcp")  # 403 everywhere
        found = await service.check(other_project, session, URL(vertex.url))
        assert found.verdict is Verdict.FAMILY_FORBIDDEN and found.status == 403
        found = await service.check(key, session, URL(vertex.url))
        assert found.verdict is Verdict.SUCCESS and found.models == ["claude-sonnet-4-6", "claude-opus-4-8"]


async def test_an_unreachable_token_endpoint_is_network_trouble_to_the_checker(vertex):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    service, key = service_and_key(vertex)
    service.configure({"gcp_token_url": f"http://127.0.0.1:{port}/token"})
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            await service.check(key, session, URL(vertex.url))
        with pytest.raises(aiohttp.ClientError):
            await service.probe(key, MODEL, session, URL(vertex.url))


def test_client_error_scrubs_tokens_and_the_owners_account():
    service = Vertex()
    message = (
        "Permission denied on resource '//aiplatform.googleapis.com/projects/owner-proj/locations/us-east5/x' for "
        "svc@owner-proj.iam.gserviceaccount.com with ya29.a0AfH6-secret"
    )
    status, body = service.client_error(403, {}, json.dumps(google_error(403, "PERMISSION_DENIED", message)).encode())
    error = json.loads(body)["error"]
    assert status == 403 and error["type"] == "permission_error"
    assert "owner-proj" not in error["message"] and "ya29" not in error["message"]
    assert error["message"].count("[redacted]") == 3


def test_the_token_url_setting():
    service = Vertex()
    assert service.token_url == GOOGLE_TOKEN_URI
    service.configure({"gcp_token_url": "http://127.0.0.1:9/token"})
    assert service.token_url == "http://127.0.0.1:9/token"
    with pytest.raises(ConfigError, match="GCP_TOKEN_URL must be an http"):
        service.configure({"gcp_token_url": "oauth2.googleapis.com/token"})
