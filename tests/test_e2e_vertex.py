"""GCP Vertex AI (Claude) end to end: the proxy with `GCP_CREDENTIALS` against the fake Vertex AI and its token
endpoint (tests/fakes/vertex.py), which has the answers made by the session's fake upstream. Clients are the
official SDKs: the anthropic SDK on `/proxy/gcp/claude`, the openai SDK on its chat route."""

import json
import secrets
import time
from urllib.parse import parse_qs

import anthropic
import httpx
import openai
import pytest

from llmproxy.services.vertex import REFRESH_MARGIN, VERTEX_ANTHROPIC_VERSION
from tests.conftest import proxy_env
from tests.fakes.vertex import FakeVertex
from tests.fakeupstream import REPLY
from tests.harness import ProxyProcess, wait_until

pytestmark = pytest.mark.e2e

SONNET = "claude-sonnet-4-5-20250929"
SONNET_PATH = "/publishers/anthropic/models/claude-sonnet-4-5@20250929"
# As verbose as the README allows: whatever the proxy logs of a flow, a key or a token must not be in it.
VERBOSE = ["--set", "flow_detail=4", "--set", "termlog_verbosity=debug"]


@pytest.fixture(scope="module")
def vertex_server(fake):
    server = FakeVertex(fake.url).start_in_thread()
    yield server
    server.stop_in_thread()


@pytest.fixture
def vertex(vertex_server):
    """The fake Vertex AI, with no calls recorded and tokens lasting an hour."""
    vertex_server.reset()
    return vertex_server


def new_account(vertex: FakeVertex, marker: str = "", project: str = "proj-e2e") -> dict:
    """A service account of its own (its key file); `marker` is a key marker of the fake upstream (-429...) in
    its email's local part."""
    return vertex.make_service_account(project, f"svc{secrets.token_hex(4)}{marker}@{project}.iam.gserviceaccount.com")


def key_body(info: dict) -> str:
    return "".join(line for line in info["private_key"].splitlines() if not line.startswith("-----"))


def entry(info: dict, region: str = "us-east5", spelling: str = "escaped") -> str:
    """A GCP_CREDENTIALS entry, its key written as users write it: the PEM with JSON-escaped line ends (as copied
    out of the key file), or its base64 body alone."""
    key = info["private_key"].replace("\n", "\\n") if spelling == "escaped" else key_body(info)
    return f"{info['project_id']}:{info['client_email']}:{region}:{key}"


def start_gcp(start_proxy, fake, vertex, infos: list[dict], **settings) -> ProxyProcess:
    env = proxy_env(
        fake,
        GCP_CREDENTIALS=",".join(entry(info, spelling="escaped" if n % 2 else "body") for n, info in enumerate(infos)),
        GCP_UPSTREAM_URL=vertex.url,  # the endpoint of every region
        GCP_TOKEN_URL=vertex.token_uri,
        **settings,
    )
    return start_proxy(env, VERBOSE)


def anthropic_client(proxy: ProxyProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{proxy.url}/proxy/gcp/claude", api_key="unused", max_retries=0)


def openai_client(proxy: ProxyProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/proxy/gcp/claude/v1", api_key="unused", max_retries=0)


def ask(proxy: ProxyProcess, text: str = "hi") -> anthropic.types.Message:
    """One message, its own conversation (`text`): each goes to the key the pool picks, not the last one's."""
    return anthropic_client(proxy).messages.create(
        model=SONNET, max_tokens=50, messages=[{"role": "user", "content": text}]
    )


def predictions(vertex: FakeVertex) -> list:
    """The calls to Vertex AI's models, the token endpoint's left out."""
    return [recorded for recorded in vertex.requests if recorded.path != "/token"]


def header(recorded, name: str) -> str | None:
    return next((value for key, value in recorded.headers if key.lower() == name), None)


def owner_of(vertex: FakeVertex, token: str) -> str | None:
    issued = vertex.tokens.get(token)
    return issued.client_email if issued else None


def generations_of(fake, info: dict) -> list:
    """The fake upstream's generation requests for an account's Vertex calls (the checker's have no messages)."""
    return [
        recorded
        for recorded in fake.requests
        if recorded.key == info["client_email"] and json.loads(recorded.body).get("messages")
    ]


def assert_no_secret(text: str, vertex: FakeVertex, infos: list[dict]) -> None:
    """Neither a private key, in any spelling or PEM line, nor an access token or a signed assertion in `text`."""
    for info in infos:
        body = key_body(info)
        assert body not in text and info["private_key"].replace("\n", "\\n") not in text
        assert not [line for line in info["private_key"].splitlines()[1:-1] if line in text]
    assert "PRIVATE KEY" not in text and "ya29." not in text
    assert all(token not in text for token in vertex.tokens)
    assertions = [parse_qs(r.body.decode()).get("assertion", [""])[0] for r in vertex.requests if r.path == "/token"]
    assert all(assertion not in text for assertion in assertions if assertion)


def test_the_anthropic_sdk_creates_and_streams_messages_through_vertex(fake, vertex, start_proxy):
    info = new_account(vertex)
    proxy = start_gcp(start_proxy, fake, vertex, [info], SHOW_TOKEN_COSTS="true")
    client = anthropic_client(proxy)
    message = client.messages.create(
        model=SONNET,
        max_tokens=50,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"anthropic-beta": "context-1m-2025-08-07"},
    )
    assert message.content[0].text == REPLY and message.model == SONNET
    with client.messages.stream(
        model="claude-sonnet-4-5", max_tokens=50, messages=[{"role": "user", "content": "stream it"}]
    ) as stream:
        assert "".join(stream.text_stream) == REPLY
        streamed = stream.get_final_message()
    assert streamed.usage.output_tokens > 0

    created, streaming = predictions(vertex)
    assert created.path == f"/v1/projects/proj-e2e/locations/us-east5{SONNET_PATH}:rawPredict"
    assert streaming.path == f"/v1/projects/proj-e2e/locations/us-east5{SONNET_PATH}:streamRawPredict"
    sent, sent_stream = json.loads(created.body), json.loads(streaming.body)
    assert "model" not in sent and sent["anthropic_version"] == VERTEX_ANTHROPIC_VERSION and "stream" not in sent
    assert "model" not in sent_stream and sent_stream["stream"] is True
    assert header(created, "anthropic-beta") == "context-1m-2025-08-07" and header(streaming, "anthropic-beta") is None
    # The fake saw tokens it issued, one for both requests, and nothing of the client's or the key's.
    assert vertex.token_calls() == 1 and created.key == streaming.key
    assert owner_of(vertex, created.key) == info["client_email"]
    for recorded in (created, streaming):
        assert header(recorded, "accept-encoding") == "identity"
        assert {name.lower() for name, _ in recorded.headers}.isdisjoint({"x-api-key", "anthropic-version", "cookie"})
    assert [json.loads(recorded.body)["model"] for recorded in fake.requests] == [SONNET, SONNET]

    # Billed: the family's tokens on the status page are those the client was told of, and cost.
    used = sum(m.usage.input_tokens + m.usage.output_tokens for m in (message, streamed))
    # Both bills, the stream's too (written as it ends), once the page's figures are fresh.
    status = wait_until(lambda: (page := httpx.get(f"{proxy.url}/status").json())["tookens"] == used and page)
    assert status["families"]["gcp-claude-sonnet"]["tokens"] == used
    assert status["families"]["gcp-claude-sonnet"]["costUsd"] > 0  # at Anthropic's prices
    assert status["gcp"]["keys"]["total"] == 1 and status["endpoints"]["gcp"].endswith("/proxy/gcp/claude/v1")
    log = proxy.log()
    assert '"route": "gcp.messages"' in log and '"family": "gcp-claude-sonnet"' in log
    page = httpx.get(f"{proxy.url}/").text
    answers = message.model_dump_json() + streamed.model_dump_json()
    for text in (log, json.dumps(status), page, answers):
        assert_no_secret(text, vertex, [info])


def test_the_openai_sdk_chat_route_is_served_by_vertex(fake, vertex, start_proxy):
    info = new_account(vertex)
    proxy = start_gcp(start_proxy, fake, vertex, [info])
    client = openai_client(proxy)
    answer = client.chat.completions.create(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == REPLY and answer.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model="claude-haiku-4-5", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == REPLY
    assert [recorded.path.rsplit("/", 1)[1] for recorded in predictions(vertex)] == [
        "claude-sonnet-4-5@20250929:rawPredict",
        "claude-haiku-4-5@20251001:streamRawPredict",
    ]
    assert all(owner_of(vertex, recorded.key) == info["client_email"] for recorded in predictions(vertex))
    assert '"route": "gcp.chat_completions"' in proxy.log()
    assert_no_secret(proxy.log() + answer.model_dump_json(), vertex, [info])


def test_tokens_are_reused_until_shortly_before_they_expire(fake, vertex, start_proxy):
    proxy = start_gcp(start_proxy, fake, vertex, [new_account(vertex)])
    vertex.token_lifetime = REFRESH_MARGIN + 4  # fresh enough for 4 s
    ask(proxy, "one"), ask(proxy, "two")
    first, second = predictions(vertex)
    assert vertex.token_calls() == 1 and first.key == second.key
    time.sleep(4.5)
    ask(proxy, "three")
    assert vertex.token_calls() == 2 and predictions(vertex)[-1].key != first.key
    assert all(recorded.key in vertex.tokens for recorded in predictions(vertex))


def test_a_token_vertex_refuses_is_replaced_by_a_new_one(fake, vertex, start_proxy):
    infos = [new_account(vertex), new_account(vertex)]
    proxy = start_gcp(start_proxy, fake, vertex, infos)
    ask(proxy, "one"), ask(proxy, "two")
    tokens = {owner_of(vertex, recorded.key): recorded.key for recorded in predictions(vertex)}
    assert set(tokens) == {info["client_email"] for info in infos}  # each account has served once
    refused = tokens[infos[0]["client_email"]]
    del vertex.tokens[refused]  # Google no longer takes it (as for a token revoked before its expiry)
    sent_before, served_before = len(predictions(vertex)), len(generations_of(fake, infos[0]))

    def first_account_serves_again() -> bool:
        ask(proxy, secrets.token_hex(4))  # answered every time: the other account stands in
        return len(generations_of(fake, infos[0])) > served_before

    wait_until(first_account_serves_again, timeout=15, interval=0.2)
    keys_sent = [recorded.key for recorded in predictions(vertex)][sent_before:]
    assert keys_sent.count(refused) == 1  # it got its 401 once; then the account got a new token
    assert vertex.token_calls() == 3
    renewed = next(token for token in keys_sent if owner_of(vertex, token) == infos[0]["client_email"])
    assert keys_sent.index(renewed) > keys_sent.index(refused)
    proxy.wait_for_log(r"key gcp-[0-9a-f]{8} is back")
    assert_no_secret(proxy.log(), vertex, infos)


def test_a_rate_limited_account_gives_way_to_another(fake, vertex, start_proxy):
    limited, working = new_account(vertex, marker="-429"), new_account(vertex)
    proxy = start_gcp(start_proxy, fake, vertex, [limited, working])
    for n in range(3):
        assert ask(proxy, f"x {n}").content[0].text == REPLY
    with anthropic_client(proxy).messages.stream(
        model=SONNET, max_tokens=50, messages=[{"role": "user", "content": "streamed"}]
    ) as stream:
        assert "".join(stream.text_stream) == REPLY
    owners = [owner_of(vertex, recorded.key) for recorded in predictions(vertex)]
    assert limited["client_email"] in owners  # it was tried, got Vertex's 429, and rests
    assert owners[-1] == working["client_email"] and fake.requests[-1].key == working["client_email"]
    assert all(recorded.key in vertex.tokens for recorded in predictions(vertex))
    assert "rests" in proxy.log()


def test_a_disabled_account_is_retired_by_the_key_checker(fake, vertex, start_proxy):
    disabled, working = new_account(vertex), new_account(vertex)
    vertex.disable(disabled["client_email"])
    proxy = start_gcp(start_proxy, fake, vertex, [disabled, working], CHECK_KEYS="true")
    keys = wait_until(lambda: (k := httpx.get(f"{proxy.url}/status").json()["gcp"]["keys"])["revoked"] == 1 and k)
    assert keys == {"total": 2, "active": 1, "revoked": 1, "overQuota": 0}
    assert proxy.wait_for_log(r"key gcp-[0-9a-f]{8} is now revoked \(The token endpoint refused .*invalid_grant")
    # The working account's check asked each listed model, with no messages: every family is served.
    wait_until(lambda: len(predictions(vertex)) == 3)
    checked = {recorded.path.rsplit("/", 1)[1] for recorded in predictions(vertex)}
    assert checked == {
        "claude-opus-4-8:rawPredict",
        "claude-sonnet-4-6:rawPredict",
        "claude-haiku-4-5@20251001:rawPredict",
    }
    for n in range(3):
        assert ask(proxy, f"x {n}").content[0].text == REPLY
    assert {owner_of(vertex, recorded.key) for recorded in predictions(vertex)} == {working["client_email"]}
    assert not generations_of(fake, disabled)
    assert_no_secret(proxy.log() + httpx.get(f"{proxy.url}/").text, vertex, [disabled, working])


def test_an_account_refused_its_token_mid_service_gives_way_to_another(fake, vertex, start_proxy):
    gone, working = new_account(vertex), new_account(vertex)
    proxy = start_gcp(start_proxy, fake, vertex, [gone, working])  # no key checks: the requests meet it
    vertex.disable(gone["client_email"])
    for n in range(4):
        assert ask(proxy, f"x {n}").content[0].text == REPLY
    assert {owner_of(vertex, recorded.key) for recorded in predictions(vertex)} == {working["client_email"]}
    log = proxy.wait_for_log(r"key (gcp-[0-9a-f]{8}) gets no access token: The token endpoint refused").string
    assert "upstream_credential_refused" in log
    assert_no_secret(log, vertex, [gone, working])


def test_vertex_errors_reach_the_client_in_anthropics_format_without_the_owners_account(fake, vertex, start_proxy):
    info = new_account(vertex)
    proxy = start_gcp(start_proxy, fake, vertex, [info])
    client = anthropic_client(proxy)
    with pytest.raises(anthropic.BadRequestError) as refused:  # the model's own refusal, echoing the account
        client.messages.create(
            model=SONNET, max_tokens=50, messages=[{"role": "user", "content": "#fake:status=400 #fake:echo_key=1"}]
        )
    answer = refused.value.response.text
    assert info["client_email"] not in answer and "[redacted]" in answer
    with pytest.raises(anthropic.InternalServerError) as failed:  # Google's own error, in Anthropic's shape
        client.messages.create(model=SONNET, max_tokens=50, messages=[{"role": "user", "content": "#fake:status=500"}])
    assert failed.value.response.json()["error"] == {"type": "api_error", "message": "Internal error encountered."}
    with pytest.raises(anthropic.BadRequestError, match="serves no Claude model"):
        client.messages.create(
            model="claude-sonnet-4-5@2025", max_tokens=50, messages=[{"role": "user", "content": "x"}]
        )
    assert_no_secret(proxy.log() + answer, vertex, [info])


@pytest.mark.parametrize(
    ("bad", "sentence"),
    [
        ("proj:svc@proj.iam.gserviceaccount.com:{key}", "GCP_CREDENTIALS entry 2 is not of the form"),
        ("proj:svc-at-proj:us-east5:{key}", "GCP_CREDENTIALS entry 2 has no client email"),
        ("proj:svc@proj.iam.gserviceaccount.com:us/east5:{key}", "GCP_CREDENTIALS entry 2 has no valid region"),
        ("proj:svc@proj.iam.gserviceaccount.com:us-east5:{key}Zm9v", "GCP_CREDENTIALS entry 2 has a private key"),
    ],
)
def test_malformed_gcp_credentials_stop_start_up_with_one_sentence_without_the_key(vertex, bad, sentence):
    info = new_account(vertex)
    process = ProxyProcess({"GCP_CREDENTIALS": f"{entry(info)},{bad.format(key=key_body(info))}"})
    assert process.run_to_exit() != 0
    log = process.log()
    assert sentence in log and "Traceback" not in log
    assert key_body(info)[:40] not in log and "PRIVATE KEY" not in log


def test_a_token_url_that_is_no_http_url_stops_start_up(vertex):
    process = ProxyProcess({"GCP_CREDENTIALS": entry(new_account(vertex)), "GCP_TOKEN_URL": "ftp://x/token"})
    assert process.run_to_exit() != 0
    assert "GCP_TOKEN_URL must be an http:// or https:// URL." in process.log() and "Traceback" not in process.log()
