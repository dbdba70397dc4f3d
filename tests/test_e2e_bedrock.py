"""AWS Bedrock (Claude) end to end: the proxy started with `AWS_CREDENTIALS` against the fake Bedrock
(tests/fakes/bedrock.py), which verifies every SigV4 signature as AWS does and has the fake upstream make the
answers. Clients are the official SDKs: anthropic's on `/proxy/aws/claude`, openai's on its chat route.

Every access key id and secret here carries the session's CANARY, which must show nowhere a client or a log reader
looks.
"""

import json
import re

import anthropic
import httpx
import openai
import pytest

from llmproxy.services.base import USER_AGENT
from tests.conftest import CANARY, proxy_env
from tests.fakes.bedrock import FakeBedrock
from tests.fakeupstream import REPLY
from tests.harness import ProxyProcess, wait_until

pytestmark = pytest.mark.e2e

REGION = "us-east-1"
ADMIN_KEY = f"admin-{CANARY}"
SECRET = f"wJalrXUtnFEMI/K7MDENG/{CANARY}+Key"
GOOD = f"AKIAGOOD{CANARY}"  # may use every model, signs for us-east-1 only
LIMITED = f"AKIALIMITED{CANARY}-429"  # the fake upstream rate-limits it: Bedrock's ThrottlingException
WRONG = f"AKIAWRONG{CANARY}"  # configured with another secret than the fake knows: InvalidSignatureException
UNKNOWN = f"AKIAUNKNOWN{CANARY}"  # unknown to the fake: UnrecognizedClientException
LOGGED = f"AKIALOGGED{CANARY}"  # its account logs model invocations
HAIKU_ONLY = f"AKIAHAIKU{CANARY}"  # may use Claude Haiku 4.5 only
ANYWHERE = f"AKIAANYWHERE{CANARY}"  # signs for any region (the tests give it regions without Sonnet profiles)
HAIKU_4_5 = "anthropic.claude-haiku-4-5-20251001-v1:0"
SONNET_PATH = "/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0"
USAGE_LINE = re.compile(r'\{"route": "aws\.[^\n]*\}')


def entry(access_key: str, secret: str = SECRET, region: str = REGION) -> str:
    return f"{access_key}:{secret}:{region}"


@pytest.fixture(scope="module")
def bedrock_server(fake):
    bedrock = FakeBedrock(fake.url).start_in_thread()
    bedrock.add_credential(GOOD, SECRET, region=REGION)
    for access_key in (LIMITED, WRONG, ANYWHERE):
        bedrock.add_credential(access_key, SECRET)
    bedrock.add_credential(LOGGED, SECRET, logging=True)
    bedrock.add_credential(HAIKU_ONLY, SECRET, models=[HAIKU_4_5])
    yield bedrock
    bedrock.stop_in_thread()


@pytest.fixture
def bedrock(bedrock_server):
    """The fake Bedrock with no requests recorded yet, on time."""
    bedrock_server.reset()
    bedrock_server.clock_offset = 0.0
    yield bedrock_server
    bedrock_server.clock_offset = 0.0


def bedrock_env(fake, bedrock, *entries: str, **overrides) -> dict[str, str]:
    return proxy_env(fake, AWS_CREDENTIALS=",".join(entries), AWS_UPSTREAM_URL=bedrock.url, **overrides)


@pytest.fixture(scope="module")
def served(fake, bedrock_server):
    """A proxy with one good credential."""
    with ProxyProcess(bedrock_env(fake, bedrock_server, entry(GOOD))) as proxy:
        yield proxy


def claude(proxy) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{proxy.url}/proxy/aws/claude", api_key="unused", max_retries=0)


def ask(proxy, content: str = "hi", model: str = "claude-sonnet-4-5", **fields):
    return claude(proxy).messages.create(
        model=model, max_tokens=64, messages=[{"role": "user", "content": content}], **fields
    )


def admin_keys(proxy) -> list[dict]:
    """The service's keys as /admin/keys shows them, in AWS_CREDENTIALS' order."""
    answer = httpx.get(f"{proxy.url}/admin/keys", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    return [key for key in answer.json()["keys"] if key["service"] == "aws"]


def settled_keys(proxy) -> list[dict]:
    """/admin/keys once no suspicion is left open (the checker's probes have answered)."""

    def settled():
        keys = admin_keys(proxy)
        return keys if not any(key["suspected"] or key["suspected_families"] for key in keys) else None

    return wait_until(settled)


def usage_lines(proxy) -> list[dict]:
    """The proxy's log line for each request to the service."""
    return [json.loads(line) for line in USAGE_LINE.findall(proxy.log())]


def assert_no_secret_shown(proxy, *answers: str) -> None:
    """The canary, part of every access key id and secret, is in no answer, nor the status page, nor the log."""
    pages = [httpx.get(f"{proxy.url}{path}").text for path in ("/status", "/")]
    for text in (*answers, *pages, proxy.log()):
        assert CANARY not in text


def test_the_anthropic_sdk_gets_a_message_and_a_stream_from_bedrock(served, bedrock, fake):
    message = ask(served, "hi there")
    assert message.content[0].text == REPLY and message.usage.input_tokens > 0
    with claude(served).messages.stream(
        model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": "#fake:events=4"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == REPLY and final.stop_reason == "end_turn" and final.usage.output_tokens > 0
    # Both went to Bedrock with the credential's signature, which the fake verified before asking the upstream.
    assert [request.path for request in bedrock.requests] == [
        f"{SONNET_PATH}/invoke",
        "/model/us.anthropic.claude-haiku-4-5-20251001-v1%3A0/invoke-with-response-stream",
    ]
    assert all(request.key == GOOD and request.upstream_answer for request in bedrock.requests)
    assert [json.loads(request.body)["model"] for request in fake.requests] == [
        "claude-sonnet-4-5-20250929",
        "claude-haiku-4-5-20251001",
    ]
    # The client gets Anthropic's SSE, without Bedrock's invocation metrics.
    with httpx.stream(
        "POST",
        f"{served.url}/proxy/aws/claude/v1/messages",
        json={
            "model": "claude-sonnet-4-5",
            "max_tokens": 9,
            "stream": True,
            "messages": [{"role": "user", "content": "x"}],
        },
    ) as raw:
        body = raw.read().decode()
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert "event: message_stop" in body and "invocationMetrics" not in body
    assert_no_secret_shown(served, message.model_dump_json(), final.model_dump_json(), body)


def test_an_exception_in_bedrocks_stream_reaches_the_client_as_an_anthropic_error_event(served, bedrock):
    broken = [{"role": "user", "content": "#fake:reset_after=1"}]  # the upstream's stream breaks off
    with (
        pytest.raises(anthropic.APIStatusError, match="An error occurred while streaming the response") as broke,
        claude(served).messages.stream(model="claude-sonnet-4-5", max_tokens=64, messages=broken) as stream,
    ):
        for _ in stream.text_stream:
            pass
    assert broke.value.body["error"]["type"] == "api_error"  # ModelStreamErrorException, as Anthropic words it
    assert bedrock.requests[-1].stream_ending == "aborted"


def test_the_openai_sdk_gets_chat_completions_from_bedrock(served, bedrock):
    client = openai.OpenAI(base_url=f"{served.url}/proxy/aws/claude/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == REPLY and answer.usage.prompt_tokens > 0
    stream = client.chat.completions.create(
        model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == REPLY
    assert [request.path for request in bedrock.requests] == [
        f"{SONNET_PATH}/invoke",
        f"{SONNET_PATH}/invoke-with-response-stream",
    ]
    assert_no_secret_shown(served, answer.model_dump_json())


def test_usage_from_bedrocks_answers_is_billed(served, bedrock, fake):
    before = len(usage_lines(served))
    message = ask(served, "count me")
    with claude(served).messages.stream(
        model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "count me too"}]
    ) as stream:
        final = stream.get_final_message()
    lines = wait_until(lambda: (lines := usage_lines(served)[before:]) and len(lines) == 2 and lines)
    assert [line["route"] for line in lines] == ["aws.messages"] * 2
    assert [line["family"] for line in lines] == ["aws-claude-sonnet"] * 2
    for line, answer in zip(lines, (message, final), strict=True):
        usage = line["usage"]
        assert usage["estimated"] is False  # Bedrock's own figures, not the proxy's estimate
        assert (usage["input"], usage["output"]) == (answer.usage.input_tokens, answer.usage.output_tokens)


def test_the_status_page_shows_the_service_and_its_credential_count(served):
    status = httpx.get(f"{served.url}/status").json()
    assert status["aws"]["keys"]["total"] == 1 and status["awsKeys"] == 1
    assert status["endpoints"]["aws"].endswith("/proxy/aws/claude/v1")
    assert "AWS Bedrock (Claude)" in httpx.get(f"{served.url}/").text
    models = httpx.get(f"{served.url}/proxy/aws/claude/v1/models").json()
    assert "claude-sonnet-4-6" in [model["id"] for model in models["data"]]
    assert_no_secret_shown(served)


def test_every_signature_is_verified_so_a_bad_one_fails(served, bedrock, fake):
    """The fake refuses a signature whose date is more than 5 minutes off its clock, as AWS does: so it checks
    each, and a signing mistake of the proxy's could not pass. The refusal is no verdict on the credential."""
    bedrock.clock_offset = 3600
    with pytest.raises(anthropic.AuthenticationError, match="Signature expired") as refused:
        ask(served)
    assert [(request.key, request.upstream_answer) for request in bedrock.requests] == [(GOOD, b"")]
    assert not fake.requests  # refused before the upstream was asked
    bedrock.clock_offset = 0.0
    assert ask(served).content[0].text == REPLY  # the credential still serves
    assert_no_secret_shown(served, str(refused.value.body))


def test_a_rate_limited_credential_gives_way_to_another(fake, bedrock, start_proxy):
    proxy = start_proxy(bedrock_env(fake, bedrock, entry(LIMITED), entry(GOOD)))
    conversation = iter(range(100))

    def limited_was_tried() -> bool:
        assert ask(proxy, f"hi {next(conversation)}").content[0].text == REPLY
        return LIMITED in {request.key for request in bedrock.requests}

    wait_until(limited_was_tried)
    throttled = [request for request in bedrock.requests if request.key == LIMITED]
    assert throttled and all(b"rate_limit_error" in request.upstream_answer for request in throttled)
    assert bedrock.requests[-1].key == GOOD and bedrock.requests[-1].upstream_answer
    assert_no_secret_shown(proxy)


def test_a_wrong_secret_does_not_retire_its_credential(fake, bedrock, start_proxy):
    """InvalidSignatureException may be our clock or our signing as well as the secret: neither an answer to a
    request nor the key check's retires the credential for it (the check tries again later)."""
    env = bedrock_env(fake, bedrock, entry(WRONG, f"wrong/{CANARY}/secret"), ADMIN_KEY=ADMIN_KEY, CHECK_KEYS="true")
    proxy = start_proxy(env)
    proxy.wait_for_log(r"key aws-[0-9a-f]{8} check failed \(InconclusiveAnswer\); retrying later")
    for _ in range(2):
        with pytest.raises(anthropic.AuthenticationError, match="signature we calculated does not match") as refused:
            ask(proxy)
    invocations = [request for request in bedrock.requests if request.method == "POST"]  # not the checks' GETs
    assert [request.key for request in invocations] == [WRONG, WRONG]
    [key] = settled_keys(proxy)
    assert key["state"] == "active" and key["service"] == "aws"
    assert_no_secret_shown(proxy, str(refused.value.body), json.dumps(admin_keys(proxy)))


def test_a_wrong_secret_gives_way_to_another_credential(fake, bedrock, start_proxy):
    proxy = start_proxy(
        bedrock_env(fake, bedrock, entry(WRONG, f"wrong/{CANARY}/secret"), entry(GOOD), ADMIN_KEY=ADMIN_KEY)
    )
    conversation = iter(range(100))

    def wrong_was_tried() -> bool:
        assert ask(proxy, f"hi {next(conversation)}").content[0].text == REPLY
        return WRONG in {request.key for request in bedrock.requests}

    wait_until(wrong_was_tried)
    assert [key["state"] for key in settled_keys(proxy)] == ["active", "active"]
    assert_no_secret_shown(proxy)


def test_an_unknown_access_key_is_retired_once_the_checker_confirms(fake, bedrock, start_proxy):
    proxy = start_proxy(bedrock_env(fake, bedrock, entry(UNKNOWN), entry(GOOD), ADMIN_KEY=ADMIN_KEY))
    conversation = iter(range(100))

    def unknown_was_tried() -> bool:
        assert ask(proxy, f"hi {next(conversation)}").content[0].text == REPLY
        return UNKNOWN in {request.key for request in bedrock.requests}

    wait_until(unknown_was_tried)
    keys = settled_keys(proxy)
    assert [key["state"] for key in keys] == ["revoked", "active"]
    assert "confirmed it with HTTP 403" in keys[0]["reason"]
    # The checker's probe: an invocation with no messages, which no working credential would have run.
    probes = [request for request in bedrock.requests if (USER_AGENT in dict(request.headers).values())]
    assert probes and all(json.loads(request.body)["messages"] == [] for request in probes)
    assert_no_secret_shown(proxy, json.dumps(keys))


def test_a_working_credential_that_a_request_made_suspect_is_cleared_by_the_probe(fake, bedrock, start_proxy):
    """A request that gets AccessDeniedException (Bedrock's word for a model refused) only makes the credential
    suspect for the family; the probe, which a working credential gets refused as invalid, clears it."""
    proxy = start_proxy(bedrock_env(fake, bedrock, entry(GOOD), ADMIN_KEY=ADMIN_KEY))
    with pytest.raises(anthropic.PermissionDeniedError):
        ask(proxy, "#fake:error=permission")
    [key] = settled_keys(proxy)
    assert key["state"] == "active" and key["families"] is None
    probe = bedrock.requests[-1]
    assert json.loads(probe.body)["messages"] == [] and (USER_AGENT in dict(probe.headers).values())
    assert [request.path for request in fake.requests].count("/v1/messages") == 1  # the probe ran no model
    assert ask(proxy).content[0].text == REPLY


def test_with_key_checks_a_logging_account_is_retired_and_the_others_serve(fake, bedrock, start_proxy):
    credentials = [entry(LOGGED), entry(GOOD), entry(HAIKU_ONLY)]
    proxy = start_proxy(bedrock_env(fake, bedrock, *credentials, CHECK_KEYS="true", ADMIN_KEY=ADMIN_KEY))

    def checked() -> list[dict] | None:
        keys = admin_keys(proxy)
        return keys if all(key["families"] or key["state"] != "active" for key in keys) else None

    logged, good, haiku = wait_until(checked)
    assert logged["state"] == "revoked" and "model invocation logging is on" in logged["reason"]
    assert good["state"] == "active"
    assert {"aws-claude-opus", "aws-claude-sonnet", "aws-claude-haiku"} <= set(good["families"])
    assert haiku["state"] == "active" and haiku["families"] == ["aws-claude-haiku"]
    bedrock.reset()
    for n in range(3):
        assert ask(proxy, f"hi {n}").content[0].text == REPLY
    assert {request.key for request in bedrock.requests} == {GOOD}  # Sonnet: neither the logged nor the Haiku one
    assert_no_secret_shown(proxy, json.dumps(admin_keys(proxy)))


def test_allow_aws_logging_serves_a_logging_account_with_a_warning(fake, bedrock, start_proxy):
    env = bedrock_env(fake, bedrock, entry(LOGGED), CHECK_KEYS="true", ALLOW_AWS_LOGGING="true", ADMIN_KEY=ADMIN_KEY)
    proxy = start_proxy(env)
    [key] = wait_until(lambda: (keys := admin_keys(proxy))[0]["families"] and keys)
    assert key["state"] == "active"
    proxy.wait_for_log(r"model invocation logging is on, and served because ALLOW_AWS_LOGGING is set")
    assert ask(proxy).content[0].text == REPLY and bedrock.requests[-1].key == LOGGED
    assert_no_secret_shown(proxy)


def test_a_model_the_credentials_region_cannot_invoke_goes_to_another_credential(fake, bedrock, start_proxy):
    # ca-central-1 has no inference profiles of its own, which every Claude since 3.5 Sonnet v2 needs.
    canada = entry(ANYWHERE, region="ca-central-1")
    only_canada = start_proxy(bedrock_env(fake, bedrock, canada))
    with pytest.raises(anthropic.BadRequestError, match="offers no model") as refused:
        ask(only_canada)
    assert refused.value.body["error"]["type"] == "invalid_request_error" and not bedrock.requests
    # Claude 3 Haiku runs on demand there, under its own id.
    assert ask(only_canada, model="claude-3-haiku-20240307").content[0].text == REPLY
    assert bedrock.requests[-1].path == "/model/anthropic.claude-3-haiku-20240307-v1%3A0/invoke"
    both = start_proxy(bedrock_env(fake, bedrock, canada, entry(GOOD)))
    for n in range(3):
        assert ask(both, f"hi {n}").content[0].text == REPLY
    assert bedrock.requests[-1].key == GOOD
    # An inference profile of another geography is refused the same way: an EU credential with a US profile id.
    europe = start_proxy(bedrock_env(fake, bedrock, entry(ANYWHERE, region="eu-west-1")))
    with pytest.raises(anthropic.BadRequestError, match="offers no model"):
        ask(europe, model="us.anthropic.claude-sonnet-4-5-20250929-v1:0")
    assert ask(europe).content[0].text == REPLY
    assert bedrock.requests[-1].path == "/model/eu.anthropic.claude-sonnet-4-5-20250929-v1%3A0/invoke"
    assert_no_secret_shown(only_canada, str(refused.value.body))


@pytest.mark.parametrize(
    "malformed, sentence",
    [
        (f"AKIABAD:{SECRET}", "AWS_CREDENTIALS entry 2 is not of the form access_key:secret:region."),
        (f"AKIABAD:{SECRET}:{REGION}:extra", "AWS_CREDENTIALS entry 2 is not of the form access_key:secret:region."),
        ("AKIABAD::us-east-1", "AWS_CREDENTIALS entry 2 has no secret access key between its colons."),
        (f"AKIABAD:{SECRET}:virginia", "AWS_CREDENTIALS entry 2 does not end in an AWS region such as us-east-1."),
        (f"{SECRET}:AKIABAD:{REGION}", "AWS_CREDENTIALS entry 2 does not start with an access key id"),
        (f"{GOOD}:other{SECRET}:{REGION}", "AWS_CREDENTIALS entry 2 repeats the access key id of entry 1."),
    ],
)
def test_malformed_aws_credentials_stop_start_up_with_one_sentence(malformed, sentence):
    process = ProxyProcess({"AWS_CREDENTIALS": f"{entry(GOOD)},{malformed}"})
    assert process.run_to_exit() != 0
    log = process.log()
    assert sentence in log and CANARY not in log and "Traceback" not in log
