"""The Bedrock wire functions (llmproxy/services/bedrock.py) against the fake Bedrock (tests/fakes/bedrock.py), and
the fake against AWS's own clients (boto3, the Anthropic SDK's AnthropicBedrock), so that each keeps the other
honest: a signing, encoding or framing mistake on either side fails here."""

import base64
import json
from urllib.parse import urlsplit

import aiohttp
import anthropic
import boto3
import httpx
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from llmproxy.api import sse
from llmproxy.config import ConfigError
from llmproxy.pool.keys import PoolKey, Verdict
from llmproxy.services.base import USER_AGENT, UpstreamFailure
from llmproxy.services.bedrock import (
    DEFAULT_URL,
    INVOCATION_METRICS,
    AwsCredential,
    Bedrock,
    EventStreamError,
    EventStreamToSSE,
    InconclusiveAnswer,
    anthropic_error,
    bedrock_model_id,
    check_requests,
    invocable_models,
    invoke_request,
    key_verdict,
    logging_enabled,
    parse_credentials,
)
from llmproxy.upstream.client import UpstreamRequest
from tests.fakes.bedrock import (
    CATALOGUE,
    INVALID_MODEL,
    NEEDS_PROFILE,
    UNKNOWN_KEY,
    WRONG_REGION,
    WRONG_SERVICE,
    FakeBedrock,
    chunk_frame,
    encode_frame,
    exception_frame,
)
from tests.fakeupstream import REPLY
from tests.harness import wait_until

# Shaped like AWS's own documentation examples, so that the runtime's scrubbing of key ids is tested too.
ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
LOGGED_KEY = "AKIAI44QH8DHBEXAMPLE"
LOGGED_SECRET = "je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY"
HAIKU_ONLY_KEY = "AKIAHAIKUONLYEXAMPLE"
HAIKU = "anthropic.claude-haiku-4-5-20251001-v1:0"
REGION = "us-east-1"
SONNET = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
MARKED_KEYS = {marker: f"AKIAMARKED{marker}" for marker in ("-401", "-429", "-500", "-quota")}
NO_RETRIES = Config(retries={"max_attempts": 1})


@pytest.fixture(scope="module")
def bedrock(fake):
    bedrock = FakeBedrock(fake.url).start_in_thread()
    bedrock.add_credential(ACCESS_KEY, SECRET, region=REGION)
    bedrock.add_credential(LOGGED_KEY, LOGGED_SECRET, logging=True)
    bedrock.add_credential(HAIKU_ONLY_KEY, SECRET, models=[HAIKU])
    for key in MARKED_KEYS.values():
        bedrock.add_credential(key, SECRET)
    yield bedrock
    bedrock.stop_in_thread()


@pytest.fixture(autouse=True)
def fresh(bedrock):
    bedrock.reset()
    bedrock.clock_offset = 0.0


def credential(access_key: str = ACCESS_KEY, secret: str = SECRET, region: str = REGION) -> AwsCredential:
    return AwsCredential(access_key, secret, region)


def messages_body(prompt: str = "hello there", **extra) -> bytes:
    """A client's Anthropic Messages request body."""
    body = {"model": "claude-sonnet-4-5-20250929", "max_tokens": 64, "messages": [{"role": "user", "content": prompt}]}
    return json.dumps(body | extra).encode()


async def send(url: str, headers: list[tuple[str, str]], data: bytes | None = None, method: str = "POST"):
    """Status, headers and body of one request, sent as given (its path too: signed as it is)."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, URL(url, encoded=True), headers=headers, data=data) as answer,
    ):
        return answer.status, dict(answer.headers), await answer.read()


async def invoke(bedrock, prompt: str = "hello", model_id: str = SONNET, key: AwsCredential | None = None, **extra):
    """Send a client's request to the fake as invoke_request makes it."""
    url, headers, data = invoke_request(
        key or credential(), model_id, messages_body(prompt, **extra), {}, False, bedrock.url
    )
    return await send(url, headers, data)


def sign(key: AwsCredential, method: str, url: str, body: bytes | None, service: str = "bedrock") -> list:
    """Headers signed by botocore as the caller chooses (another service, a body invoke_request would not send)."""
    request = AWSRequest(method=method, url=url, headers={"content-type": "application/json"}, data=body)
    SigV4Auth(Credentials(key.access_key_id, key.secret_access_key), service, key.region).add_auth(request)
    return list(request.headers.items())


def parsed_events(stream: bytes) -> list[tuple[str, dict]]:
    return [(event.event, json.loads(event.data)) for event in sse.Parser().feed(stream)]


def runtime_client(bedrock, access_key: str = ACCESS_KEY, secret: str = SECRET):
    return boto3.client(
        "bedrock-runtime",
        region_name=REGION,
        endpoint_url=bedrock.url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret,
        config=NO_RETRIES,
    )


# -- AWS's clients against the fake ---------------------------------------------------------------------------------


def test_boto3_invoke_model(bedrock, fake):
    bedrock_body = json.dumps(
        {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
    )
    answer = runtime_client(bedrock).invoke_model(
        modelId=SONNET, body=bedrock_body, contentType="application/json", accept="application/json"
    )
    message = json.loads(answer["body"].read())
    assert message["content"][0]["text"] == REPLY and message["model"] == "claude-sonnet-4-5-20250929"
    headers = answer["ResponseMetadata"]["HTTPHeaders"]
    assert headers["x-amzn-bedrock-output-token-count"] == str(message["usage"]["output_tokens"])
    assert headers["x-amzn-bedrock-input-token-count"] == str(message["usage"]["input_tokens"])
    # boto3 encodes the model id into the path exactly as invoke_request does (its `:` as %3A).
    [record] = bedrock.requests
    url, _, _ = invoke_request(credential(), SONNET, messages_body(), {}, False, bedrock.url)
    assert record.path == urlsplit(url).path == "/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/invoke"
    # The fake upstream was asked with the access key and the Anthropic name, in the Messages API's own body.
    [upstream] = fake.requests
    assert upstream.key == ACCESS_KEY and upstream.path == "/v1/messages"
    assert json.loads(upstream.body) == {"model": "claude-sonnet-4-5-20250929", "max_tokens": 50} | {
        "messages": [{"role": "user", "content": "hi"}]
    }


def test_boto3_invoke_model_with_response_stream(bedrock):
    bedrock_body = json.dumps(
        {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 50, "messages": [{"role": "user", "content": "x"}]}
    ).replace('"x"', '"#fake:events=4"')
    answer = runtime_client(bedrock).invoke_model_with_response_stream(modelId=SONNET, body=bedrock_body)
    events = [json.loads(event["chunk"]["bytes"]) for event in answer["body"]]
    assert [event["type"] for event in events] == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert "".join(event["delta"]["text"] for event in events if event["type"] == "content_block_delta") == REPLY
    metrics = events[-1][INVOCATION_METRICS]
    assert metrics["outputTokenCount"] == events[-2]["usage"]["output_tokens"]
    assert metrics["inputTokenCount"] == events[0]["message"]["usage"]["input_tokens"]


def test_anthropic_sdk_bedrock_client(bedrock, fake):
    """AnthropicBedrock leaves the model id's `:` unencoded and signs every header it sends: the fake accepts it."""
    client = anthropic.AnthropicBedrock(
        aws_access_key=ACCESS_KEY, aws_secret_key=SECRET, aws_region=REGION, base_url=bedrock.url, max_retries=0
    )
    message = client.messages.create(
        model=SONNET,
        max_tokens=50,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"anthropic-beta": "context-1m-2025-08-07"},
    )
    assert message.content[0].text == REPLY
    assert ("anthropic-beta", "context-1m-2025-08-07") in fake.requests[-1].headers
    with client.messages.stream(
        model=SONNET, max_tokens=50, messages=[{"role": "user", "content": "#fake:events=5"}]
    ) as stream:
        assert stream.get_final_text() == REPLY
    assert bedrock.requests[-1].path.endswith("/invoke-with-response-stream")


def test_boto3_control_plane(bedrock):
    def control(access_key, secret):
        return boto3.client(
            "bedrock",
            region_name="eu-west-1",
            endpoint_url=bedrock.url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret,
            config=NO_RETRIES,
        )

    haiku_only = control(HAIKU_ONLY_KEY, SECRET).list_foundation_models(byProvider="anthropic")["modelSummaries"]
    assert [(m["modelId"], m["modelArn"]) for m in haiku_only] == [
        (HAIKU, f"arn:aws:bedrock:eu-west-1::foundation-model/{HAIKU}")
    ]
    assert haiku_only[0]["inferenceTypesSupported"] == ["INFERENCE_PROFILE"]
    logged = control(LOGGED_KEY, LOGGED_SECRET).get_model_invocation_logging_configuration()
    assert logged["loggingConfig"]["textDataDeliveryEnabled"] is True
    assert "loggingConfig" not in control(HAIKU_ONLY_KEY, SECRET).get_model_invocation_logging_configuration()


def test_boto3_refusals(bedrock):
    body = json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 5, "messages": []})
    with pytest.raises(ClientError) as refused:
        runtime_client(bedrock, secret="not-the-secret").invoke_model(modelId=SONNET, body=body)
    assert refused.value.response["Error"]["Code"] == "InvalidSignatureException"
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(ClientError) as refused:
        runtime_client(bedrock, access_key="AKIANOSUCHKEYEXAMPLE").invoke_model(modelId=SONNET, body=body)
    assert refused.value.response["Error"] == {"Code": "UnrecognizedClientException", "Message": UNKNOWN_KEY}
    client = runtime_client(bedrock, access_key=MARKED_KEYS["-429"])
    with pytest.raises(client.exceptions.ThrottlingException) as throttled:
        client.invoke_model(modelId=SONNET, body=body)
    assert throttled.value.response["Error"]["Message"] == "Too many requests, please wait before trying again."


# -- invoke_request -------------------------------------------------------------------------------------------------


def test_invoke_request_builds_the_bedrock_request():
    body = messages_body(stream=True, anthropic_beta=["token-efficient-tools-2025-02-19"])
    headers = {"Anthropic-Beta": "context-1m-2025-08-07, token-efficient-tools-2025-02-19", "x-api-key": "ignored"}
    url, signed, data = invoke_request(
        credential(region="eu-west-1"), "eu.anthropic.claude-x-v1:0", body, headers, True
    )
    assert (
        url
        == "https://bedrock-runtime.eu-west-1.amazonaws.com/model/eu.anthropic.claude-x-v1%3A0/invoke-with-response-stream"
    )
    assert json.loads(data) == {
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "hello there"}],
        "anthropic_beta": ["token-efficient-tools-2025-02-19", "context-1m-2025-08-07"],
        "anthropic_version": "bedrock-2023-05-31",
    }
    names = dict(signed)
    assert set(names) == {"content-type", "accept", "x-amz-date", "authorization"}
    assert names["content-type"] == names["accept"] == "application/json"
    assert names["authorization"].startswith(
        f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/{names['x-amz-date'][:8]}/eu-west-1/bedrock/aws4_request, "
        "SignedHeaders=accept;content-type;host;x-amz-date, Signature="
    )
    assert SECRET not in repr(signed)
    # A version the client set stays; a body that is no object is refused.
    _, _, data = invoke_request(credential(), SONNET, messages_body(anthropic_version="x"), {}, False)
    assert json.loads(data)["anthropic_version"] == "x"
    with pytest.raises(ValueError):
        invoke_request(credential(), SONNET, b"[]", {}, False)


async def test_invoke_request_is_accepted_and_a_changed_byte_is_not(bedrock, fake):
    url, headers, data = invoke_request(
        credential(), SONNET, messages_body("hello"), {"anthropic-beta": "a-1, b-2"}, False, bedrock.url
    )
    status, _, answer = await send(url, headers, data)
    assert status == 200 and json.loads(answer)["content"][0]["text"] == REPLY
    assert ("anthropic-beta", "a-1,b-2") in fake.requests[-1].headers
    status, answer_headers, answer = await send(url, headers, data.replace(b"hello", b"hellp"))
    assert (status, answer_headers["x-amzn-ErrorType"].split(":")[0]) == (403, "InvalidSignatureException")
    assert json.loads(answer)["message"].startswith("The request signature we calculated does not match")
    assert len(fake.requests) == 1  # the changed request never reached the model


async def test_the_fake_checks_scope_and_clock(bedrock):
    async def refusal(url, headers, data=None, method="POST"):
        status, answer_headers, body = await send(url, headers, data, method)
        return status, answer_headers.get("x-amzn-ErrorType", "").split(":")[0], json.loads(body)["message"]

    url, headers, data = invoke_request(credential(), SONNET, messages_body(), {}, False, bedrock.url)
    assert await refusal(url, sign(credential(), "POST", url, data, service="bedrock-runtime"), data) == (
        403,
        "InvalidSignatureException",
        WRONG_SERVICE,
    )
    assert await refusal(
        *invoke_request(credential(region="eu-west-1"), SONNET, messages_body(), {}, False, bedrock.url)
    ) == (
        403,
        "InvalidSignatureException",
        WRONG_REGION,
    )
    bedrock.clock_offset = 400
    status, error_type, message = await refusal(url, headers, data)
    assert (status, error_type) == (403, "InvalidSignatureException") and message.startswith("Signature expired: ")
    bedrock.clock_offset = -400
    assert (await refusal(url, headers, data))[2].startswith("Signature not yet current: ")
    bedrock.clock_offset = 0
    assert await refusal(url, [("content-type", "application/json")], data) == (
        403,
        "MissingAuthenticationTokenException",
        "Missing Authentication Token",
    )


async def test_the_fake_validates_the_body_as_bedrock_does(bedrock, fake):
    url = f"{bedrock.url}/model/{SONNET.replace(':', '%3A')}/invoke"
    body = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": []}).encode()
    status, headers, answer = await send(url, sign(credential(), "POST", url, body), body)
    assert (status, headers["x-amzn-ErrorType"].split(":")[0]) == (400, "ValidationException")
    assert json.loads(answer)["message"] == (
        "Malformed input request: #: required key [anthropic_version] not found#: extraneous key [model] is not "
        "permitted, please reformat your input and try again."
    )
    assert fake.requests == []


# -- the answer stream ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recorded_stream(bedrock):
    """A streamed answer with thinking and a tool call, as the fake sent it, and the fake upstream's SSE for it."""
    body = messages_body(
        "weather? #fake:tool=get_weather #fake:events=4",
        max_tokens=4096,
        thinking={"type": "enabled", "budget_tokens": 1024},
        tools=[{"name": "get_weather", "input_schema": {"type": "object"}}],
    )
    url, headers, data = invoke_request(credential(), SONNET, body, {}, True, bedrock.url)
    answer = httpx.post(url, headers=headers, content=data)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/vnd.amazon.eventstream"
    return answer.content, bedrock.requests[-1].upstream_answer


def decoded(pieces) -> tuple[list[tuple[str, dict]], EventStreamToSSE]:
    decoder = EventStreamToSSE()
    return parsed_events(b"".join(decoder.feed(piece) for piece in pieces)), decoder


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # the function fixtures only reset the fakes
@given(cut_points=st.data())
def test_the_stream_decodes_in_any_chunking(recorded_stream, cut_points):
    raw, upstream_sse = recorded_stream
    cuts = sorted(cut_points.draw(st.lists(st.integers(0, len(raw)), max_size=40)))
    pieces = [raw[start:end] for start, end in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    events, decoder = decoded(pieces)
    expected = parsed_events(upstream_sse)
    assert events == expected
    assert {"thinking_delta", "signature_delta", "input_json_delta"} <= {
        data["delta"]["type"] for name, data in expected if name == "content_block_delta"
    }
    assert decoder.invocation_metrics["outputTokenCount"] == expected[-2][1]["usage"]["output_tokens"]


def test_the_stream_decodes_byte_by_byte(recorded_stream):
    raw, upstream_sse = recorded_stream
    assert decoded(raw[n : n + 1] for n in range(len(raw)))[0] == parsed_events(upstream_sse)


@pytest.mark.parametrize(
    ("exception_type", "anthropic_type"),
    [
        ("throttlingException", "rate_limit_error"),
        ("modelStreamErrorException", "api_error"),
        ("internalServerException", "api_error"),
        ("validationException", "invalid_request_error"),
        ("serviceUnavailableException", "overloaded_error"),
        ("modelTimeoutException", "timeout_error"),
    ],
)
def test_a_stream_exception_becomes_an_anthropic_error_event(exception_type, anthropic_type):
    start = {"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 1}}}
    frames = chunk_frame(start) + exception_frame(exception_type, f"It went wrong for {ACCESS_KEY}.")
    events, _ = decoded([frames])
    assert events == [
        ("message_start", start),
        ("error", {"type": "error", "error": {"type": anthropic_type, "message": "It went wrong for [redacted]."}}),
    ]


async def test_a_broken_upstream_stream_ends_in_an_error_event(bedrock):
    url, headers, data = invoke_request(
        credential(), SONNET, messages_body("#fake:reset_after=1"), {}, True, bedrock.url
    )
    status, _, raw = await send(url, headers, data)
    events, _ = decoded([raw])
    assert status == 200 and events[0][0] == "message_start"
    assert events[-1] == (
        "error",
        {
            "type": "error",
            "error": {
                "type": "api_error",
                "message": "An error occurred while streaming the response. Retry your request.",
            },
        },
    )
    wait_until(lambda: bedrock.requests[-1].stream_ending is not None)  # marked after the last write
    assert bedrock.requests[-1].stream_ending == "aborted"


@pytest.mark.parametrize("flipped", [2, 20, -1], ids=["prelude", "payload", "message crc"])
def test_a_corrupt_frame_raises(flipped):
    good = chunk_frame({"type": "ping"})
    corrupt = bytearray(chunk_frame({"type": "message_stop"}))
    corrupt[flipped] ^= 0x01
    decoder = EventStreamToSSE()
    assert parsed_events(decoder.feed(good)) == [("ping", {"type": "ping"})]
    with pytest.raises(EventStreamError, match="corrupt"):
        decoder.feed(bytes(corrupt))


def test_a_chunk_without_an_anthropic_event_is_skipped_and_garbage_raises():
    def frame(payload: dict) -> bytes:
        return encode_frame(
            {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"},
            json.dumps(payload).encode(),
        )

    no_type = base64.b64encode(b'{"delta": 1}').decode()
    assert EventStreamToSSE().feed(frame({"bytes": no_type})) == b""
    with pytest.raises(EventStreamError, match="not a base64-encoded JSON event"):
        EventStreamToSSE().feed(frame({"bytes": "not base64!"}))


# -- credentials and models -----------------------------------------------------------------------------------------


def test_parse_credentials():
    parsed = parse_credentials(f" {ACCESS_KEY}:{SECRET}:us-east-1 , AKIAKEY2:s2:us-gov-west-1,")
    assert parsed == [credential(), AwsCredential("AKIAKEY2", "s2", "us-gov-west-1")]
    assert SECRET not in repr(parsed) and ACCESS_KEY in repr(parsed)


@pytest.mark.parametrize(
    "entry",
    [
        f"{ACCESS_KEY}:{SECRET}",  # no region
        f"{ACCESS_KEY}:{SECRET}:us-east-1:extra",
        f"{ACCESS_KEY}::us-east-1",  # no secret
        f"{ACCESS_KEY}:us-east-1:{SECRET}",  # region and secret swapped: the secret must not be echoed as a region
        f"AKIA KEY:{SECRET}:us-east-1",
        f"{ACCESS_KEY}:{SECRET}:useast1",
        f"{ACCESS_KEY}:{SECRET}:eu-west-1",  # the first entry's key again
    ],
)
def test_parse_credentials_names_the_bad_entry_and_never_its_secret(entry):
    with pytest.raises(ConfigError) as refused:
        parse_credentials(f"{ACCESS_KEY}:{SECRET}:us-east-1,{entry}")
    message = str(refused.value)
    assert message.startswith("AWS_CREDENTIALS entry 2 ") and message.endswith(".")
    assert "K7MDENG" not in message


@pytest.mark.parametrize(
    ("model", "region", "expected"),
    [
        ("claude-sonnet-4-5-20250929", "us-east-1", "us.anthropic.claude-sonnet-4-5-20250929-v1:0"),
        ("claude-sonnet-4-5", "eu-west-1", "eu.anthropic.claude-sonnet-4-5-20250929-v1:0"),
        ("claude-3-5-haiku-20241022", "ap-northeast-1", "apac.anthropic.claude-3-5-haiku-20241022-v1:0"),
        ("claude-opus-4-1-20250805", "us-west-2", "us.anthropic.claude-opus-4-1-20250805-v1:0"),
        ("claude-sonnet-4-20250514", "us-gov-west-1", "us-gov.anthropic.claude-sonnet-4-20250514-v1:0"),
        ("claude-3-7-sonnet-20250219", "us-east-2", "us.anthropic.claude-3-7-sonnet-20250219-v1:0"),
        ("claude-haiku-4-5-20251001", "eu-central-1", "eu.anthropic.claude-haiku-4-5-20251001-v1:0"),
        ("claude-3-5-sonnet-20241022", "us-east-1", "us.anthropic.claude-3-5-sonnet-20241022-v2:0"),
        ("claude-opus-4-6", "us-east-1", "us.anthropic.claude-opus-4-6-v1"),
        ("claude-sonnet-4-6", "eu-west-3", "eu.anthropic.claude-sonnet-4-6"),
        # on-demand in the region itself
        ("claude-3-haiku-20240307", "eu-central-1", "anthropic.claude-3-haiku-20240307-v1:0"),
        ("claude-3-5-sonnet-20240620", "us-west-2", "anthropic.claude-3-5-sonnet-20240620-v1:0"),
        # a region in no inference profile's geography cannot invoke profile-only models
        ("claude-3-7-sonnet-20250219", "sa-east-1", None),
        # Bedrock ids as clients send them
        (SONNET, "us-west-2", SONNET),
        (SONNET, "eu-west-1", None),
        (
            "global.anthropic.claude-sonnet-4-5-20250929-v1:0",
            "eu-west-1",
            "global.anthropic.claude-sonnet-4-5-20250929-v1:0",
        ),
        ("global.anthropic.claude-sonnet-4-5-20250929-v1:0", "us-gov-west-1", None),
        (
            "jp.anthropic.claude-sonnet-4-5-20250929-v1:0",
            "ap-northeast-1",
            "jp.anthropic.claude-sonnet-4-5-20250929-v1:0",
        ),
        ("anthropic.claude-sonnet-4-5-20250929-v1:0", "us-east-1", SONNET),
        ("anthropic.claude-3-haiku-20240307-v1:0", "us-east-1", "anthropic.claude-3-haiku-20240307-v1:0"),
        ("anthropic.claude-next-1-v1:0", "us-east-1", "anthropic.claude-next-1-v1:0"),
        ("gpt-4o", "us-east-1", None),
        ("claude-unknown-1", "us-east-1", None),
        ("anthropic.claude-x/../../foundation-models", "us-east-1", None),
    ],
)
def test_bedrock_model_id(model, region, expected):
    assert bedrock_model_id(model, region) == expected


# -- the checker's requests -----------------------------------------------------------------------------------------


async def test_check_requests(bedrock):
    assert [(name, url) for name, url, _ in check_requests(credential(region="eu-west-1"))] == [
        ("ListFoundationModels", "https://bedrock.eu-west-1.amazonaws.com/foundation-models?byProvider=anthropic"),
        ("GetModelInvocationLoggingConfiguration", "https://bedrock.eu-west-1.amazonaws.com/logging/modelinvocations"),
    ]
    for key, models, logs in (
        (credential(HAIKU_ONLY_KEY), {HAIKU}, False),
        (credential(LOGGED_KEY, LOGGED_SECRET), set(CATALOGUE), True),
    ):
        answers = {
            name: await send(url, headers, method="GET") for name, url, headers in check_requests(key, bedrock.url)
        }
        assert {status for status, _, _ in answers.values()} == {200}
        assert invocable_models(answers["ListFoundationModels"][2]) == models
        assert logging_enabled(answers["GetModelInvocationLoggingConfiguration"][2]) is logs
    assert bedrock.requests[0].path == "/foundation-models?byProvider=anthropic"
    [(_, url, headers), _] = check_requests(credential(MARKED_KEYS["-429"]), bedrock.url)
    status, headers, body = await send(url, headers, method="GET")
    assert key_verdict(status, headers, body) == "rate_limited"


def test_invocable_models_and_logging_enabled_read_the_api_shapes():
    def summary(model_id, status, *inference):
        return {"modelId": model_id, "modelLifecycle": {"status": status}, "inferenceTypesSupported": list(inference)}

    listing = {
        "modelSummaries": [
            summary("a.on-demand", "ACTIVE", "ON_DEMAND"),
            summary("a.profile", "ACTIVE", "INFERENCE_PROFILE"),
            summary("a.legacy", "LEGACY", "ON_DEMAND"),
            summary("a.provisioned:0:200k", "ACTIVE", "PROVISIONED"),
            "junk",
        ]
    }
    assert invocable_models(json.dumps(listing).encode()) == {"a.on-demand", "a.profile"}
    assert invocable_models(b"<html>") == invocable_models(b'{"modelSummaries": 3}') == set()
    assert logging_enabled(b"{}") is False
    assert logging_enabled(b'{"loggingConfig": {"s3Config": {"bucketName": "b"}}}') is True
    assert logging_enabled(b'{"loggingConfig": {"s3Config": {}, "textDataDeliveryEnabled": false}}') is False
    assert logging_enabled(b"not json") is logging_enabled(b"[]") is True


# -- errors ---------------------------------------------------------------------------------------------------------

ERROR_CASES = {
    # name: (access key, model id, prompt) -> (Bedrock's error type and status, the client's status and type, verdict)
    "wrong secret": (
        (ACCESS_KEY, SONNET, "x"),
        ("InvalidSignatureException", 403, 401, "authentication_error", "server_error"),
    ),
    "unknown key": (
        ("AKIANOSUCHKEYEXAMPLE", SONNET, "x"),
        ("UnrecognizedClientException", 403, 401, "authentication_error", "revoked"),
    ),
    "revoked key": (
        (MARKED_KEYS["-401"], SONNET, "x"),
        ("UnrecognizedClientException", 403, 401, "authentication_error", "revoked"),
    ),
    "throttled": (
        (MARKED_KEYS["-429"], SONNET, "x"),
        ("ThrottlingException", 429, 429, "rate_limit_error", "rate_limited"),
    ),
    "over quota": (
        (MARKED_KEYS["-quota"], SONNET, "x"),
        ("ServiceQuotaExceededException", 400, 429, "rate_limit_error", "rate_limited"),
    ),
    "server error": (
        (MARKED_KEYS["-500"], SONNET, "x"),
        ("InternalServerException", 500, 500, "api_error", "server_error"),
    ),
    "overloaded": (
        (ACCESS_KEY, SONNET, "#fake:error=overloaded"),
        ("ServiceUnavailableException", 503, 503, "overloaded_error", "server_error"),
    ),
    "refused": (
        (ACCESS_KEY, SONNET, "#fake:error=permission"),
        ("AccessDeniedException", 403, 403, "permission_error", "forbidden"),
    ),
    "model not allowed": (
        (HAIKU_ONLY_KEY, SONNET, "x"),
        ("AccessDeniedException", 403, 403, "permission_error", "forbidden"),
    ),
    "not found": (
        (ACCESS_KEY, SONNET, "#fake:status=404"),
        ("ResourceNotFoundException", 404, 404, "not_found_error", "forbidden"),
    ),
    "timeout": (
        (ACCESS_KEY, SONNET, "#fake:status=408"),
        ("ModelTimeoutException", 408, 504, "timeout_error", "server_error"),
    ),
    "model error": (
        (ACCESS_KEY, SONNET, "#fake:status=424"),
        ("ModelErrorException", 424, 500, "api_error", "server_error"),
    ),
    "bad request": (
        (ACCESS_KEY, SONNET, "#fake:status=400"),
        ("ValidationException", 400, 400, "invalid_request_error", "client_error"),
    ),
    "invalid model": (
        (ACCESS_KEY, "us.anthropic.claude-none-v1:0", "x"),
        ("ValidationException", 400, 400, "invalid_request_error", "client_error"),
    ),
    "needs a profile": (
        (ACCESS_KEY, "anthropic.claude-sonnet-4-5-20250929-v1:0", "x"),
        ("ValidationException", 400, 400, "invalid_request_error", "client_error"),
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
async def test_anthropic_error_and_key_verdict_for_the_fakes_errors(bedrock, case):
    (access_key, model_id, prompt), (error_type, status, client_status, anthropic_type, verdict) = ERROR_CASES[case]
    secret = "not-the-secret" if case == "wrong secret" else SECRET
    status_got, headers, body = await invoke(bedrock, prompt, model_id, credential(access_key, secret))
    assert (status_got, headers["x-amzn-ErrorType"].split(":")[0]) == (status, error_type)
    client_status_got, client_body = anthropic_error(status_got, headers, body)
    error = json.loads(client_body)
    assert (client_status_got, error["type"], error["error"]["type"]) == (client_status, "error", anthropic_type)
    assert error["error"]["message"] == json.loads(body)["message"]  # Bedrock's words, when they hold no key
    assert key_verdict(status_got, headers, body) == verdict


async def test_the_fakes_model_refusals_word_them_as_bedrock(bedrock):
    assert json.loads((await invoke(bedrock, model_id="us.anthropic.claude-none-v1:0"))[2])["message"] == INVALID_MODEL
    foundation = "anthropic.claude-sonnet-4-5-20250929-v1:0"
    assert json.loads((await invoke(bedrock, model_id=foundation))[2])["message"] == NEEDS_PROFILE.format(foundation)


async def test_an_echoed_access_key_never_reaches_the_client(bedrock):
    status, headers, body = await invoke(bedrock, "#fake:status=400 #fake:echo_key=1")
    assert ACCESS_KEY in json.loads(body)["message"]
    _, client_body = anthropic_error(status, headers, body)
    assert ACCESS_KEY not in client_body.decode() and "[redacted]" in client_body.decode()


def test_anthropic_error_and_key_verdict_without_the_fake():
    def answer(error_type, status, message="m"):
        headers = {"X-Amzn-ErrorType": f"{error_type}:http://internal.amazon.com/coral/com.amazon.bedrock/"}
        body = json.dumps({"message": message}).encode()
        return anthropic_error(status, headers, body), key_verdict(status, headers, body)

    assert answer("ModelNotReadyException", 429) == (
        (503, b'{"type": "error", "error": {"type": "overloaded_error", "message": "m"}}'),
        "server_error",
    )
    assert answer("ExpiredTokenException", 403)[1] == "revoked"
    assert answer("InvalidSignatureException", 403)[1] == "server_error"  # our clock or our signing, not the key
    # No type, no JSON: the status decides, and the message says what came.
    (status, body), verdict = anthropic_error(502, {}, b"<html>Bad Gateway</html>"), key_verdict(502, {}, b"")
    assert (status, json.loads(body)["error"]["message"], verdict) == (
        500,
        "Amazon Bedrock answered HTTP 502.",
        "server_error",
    )
    assert key_verdict(429, {}, b"") == "rate_limited" and key_verdict(200, {}, b"{}") == "success"


# -- the service (llmproxy/services/bedrock.py's Bedrock) against the fake --------------------------------------------


def pool_key(access_key: str = ACCESS_KEY, secret: str = SECRET, region: str = REGION) -> PoolKey:
    return PoolKey("aws", f"{access_key}:{secret}:{region}", "aws")


def service(allow_logging: bool = False) -> Bedrock:
    bedrock = Bedrock()
    bedrock.configure({"allow_aws_logging": allow_logging})
    return bedrock


def test_the_service_reads_its_credentials_and_names_their_secret_parts():
    entries = [f" {ACCESS_KEY} : {SECRET} : us-east-1 ", "AKIAKEY2:s2:eu-west-1"]
    secrets = Bedrock().parse_keys(entries)
    assert secrets == [f"{ACCESS_KEY}:{SECRET}:us-east-1", "AKIAKEY2:s2:eu-west-1"]
    assert Bedrock().secret_parts(secrets[0]) == [SECRET, ACCESS_KEY]
    with pytest.raises(ConfigError, match="AWS_CREDENTIALS entry 2 is not of the form") as refused:
        Bedrock().parse_keys([entries[0], f"AKIAKEY3:{SECRET}"])
    assert SECRET not in str(refused.value)


async def test_the_service_prepares_a_signed_invocation_per_attempt(bedrock, fake):
    request = UpstreamRequest(
        "POST",
        "unused",
        messages_body("hi from the service", model="claude-sonnet-4-5", stream=True),
        [("anthropic-beta", "beta-one"), ("Anthropic-Beta", "beta-two"), ("anthropic-version", "2023-06-01")],
    )
    outgoing = await service().prepare(request, None, pool_key(), URL(bedrock.url))
    assert (
        outgoing.url
        == f"{bedrock.url}/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/invoke-with-response-stream"
    )
    assert json.loads(outgoing.body)["anthropic_beta"] == ["beta-one", "beta-two"]
    status, headers, body = await send(outgoing.url, outgoing.headers, outgoing.body)
    assert status == 200 and headers["Content-Type"] == Bedrock.stream_media_type
    decode = service().stream_decoder()
    events = parsed_events(b"".join(decode(body[n : n + 7]) for n in range(0, len(body), 7)))
    assert events[-1] == ("message_stop", {"type": "message_stop"})
    # Default URL: the credential's region's own endpoint.
    outgoing = await service().prepare(request, None, pool_key(region="eu-west-1"), URL(DEFAULT_URL))
    assert outgoing.url.startswith("https://bedrock-runtime.eu-west-1.amazonaws.com/model/eu.anthropic.")
    assert "eu-west-1/bedrock/aws4_request" in dict(outgoing.headers)["authorization"]


async def test_a_model_the_region_cannot_invoke_fails_the_attempt_before_anything_is_sent(bedrock):
    request = UpstreamRequest("POST", "unused", messages_body(model="claude-sonnet-4-5"), [])
    with pytest.raises(UpstreamFailure) as failure:
        await service().prepare(request, None, pool_key(region="ca-central-1"), URL(bedrock.url))
    assert (failure.value.status, failure.value.code) == (400, "model_not_available")
    assert '"claude-sonnet-4-5"' in str(failure.value) and not bedrock.requests


@pytest.mark.parametrize(
    "verdict, expected",
    [
        ("success", Verdict.SUCCESS),
        ("rate_limited", Verdict.RATE_LIMITED),
        ("revoked", Verdict.REVOKED),
        ("forbidden", Verdict.FAMILY_FORBIDDEN),
        ("server_error", Verdict.SERVER_ERROR),
        ("client_error", Verdict.CLIENT_ERROR),
    ],
)
async def test_the_services_verdicts_are_the_pools(bedrock, verdict, expected):
    cases = [name for name, (_, meaning) in ERROR_CASES.items() if meaning[-1] == verdict]
    case = cases[0] if cases else None
    access_key, model_id, prompt = ERROR_CASES[case][0] if case else (ACCESS_KEY, SONNET, "x")
    secret = "not-the-secret" if case == "wrong secret" else SECRET
    status, headers, body = await invoke(bedrock, prompt, model_id, credential(access_key, secret))
    assert service().verdict(status, headers, body) is expected
    if status >= 400:
        assert service().client_error(status, headers, body) == anthropic_error(status, headers, body)


async def test_the_check_lists_the_families_and_retires_a_logging_account(bedrock, fake):
    async with aiohttp.ClientSession() as session:
        found = await service().check(pool_key(), session, URL(bedrock.url))
        assert found.verdict is Verdict.SUCCESS and "claude-sonnet-4-5-20250929" in found.models
        assert "claude-3-haiku-20240307" in found.models and len(found.models) == len(CATALOGUE)
        haiku = await service().check(pool_key(HAIKU_ONLY_KEY), session, URL(bedrock.url))
        assert haiku.verdict is Verdict.SUCCESS and haiku.models == ["claude-haiku-4-5-20251001"]
        # A region without inference profiles of its own invokes only the on-demand models.
        canada = await service().check(pool_key(HAIKU_ONLY_KEY, region="ca-central-1"), session, URL(bedrock.url))
        assert canada.verdict is Verdict.SUCCESS and canada.models == []
        logged = await service().check(pool_key(LOGGED_KEY, LOGGED_SECRET), session, URL(bedrock.url))
        assert logged.verdict is Verdict.REVOKED and "model invocation logging is on" in logged.reason
        allowed = await service(allow_logging=True).check(
            pool_key(LOGGED_KEY, LOGGED_SECRET), session, URL(bedrock.url)
        )
        assert allowed.verdict is Verdict.SUCCESS
        unknown = await service().check(pool_key("AKIANOSUCHKEYEXAMPLE"), session, URL(bedrock.url))
        assert unknown.verdict is Verdict.REVOKED and "UnrecognizedClientException" in unknown.reason
        # A credential refused the reads (AccessDeniedException): logging cannot be ruled out.
        fake.set_key_behaviour(ACCESS_KEY, "permission")
        try:
            refused = await service().check(pool_key(), session, URL(bedrock.url))
            refused_but_allowed = await service(allow_logging=True).check(pool_key(), session, URL(bedrock.url))
        finally:
            fake.clear_key_behaviour(ACCESS_KEY)
        assert refused.verdict is Verdict.REVOKED and "logging cannot be ruled out" in refused.reason
        assert "AccessDeniedException" in refused.reason and refused.models == []
        assert refused_but_allowed.verdict is Verdict.SUCCESS
        # Answers that say nothing of the credential: the checker tries again later.
        for key in (pool_key(secret="not-the-secret"), pool_key(MARKED_KEYS["-429"])):
            with pytest.raises(InconclusiveAnswer):
                await service().check(key, session, URL(bedrock.url))
    agents = {value for request in bedrock.requests for name, value in request.headers if name.lower() == "user-agent"}
    assert agents == {USER_AGENT}


async def test_the_probe_tells_a_working_credential_from_a_dead_one_without_running_the_model(bedrock, fake):
    cases = [
        (pool_key(), "claude-sonnet-4-5", 400, Verdict.CLIENT_ERROR),
        (pool_key(MARKED_KEYS["-401"]), "claude-sonnet-4-5", 403, Verdict.REVOKED),
        (pool_key("AKIANOSUCHKEYEXAMPLE"), "claude-sonnet-4-5", 403, Verdict.REVOKED),
        (pool_key(secret="not-the-secret"), "claude-sonnet-4-5", 403, Verdict.SERVER_ERROR),
        (pool_key(HAIKU_ONLY_KEY), "claude-sonnet-4-5", 403, Verdict.FAMILY_FORBIDDEN),
        (pool_key(HAIKU_ONLY_KEY), "claude-haiku-4-5", 400, Verdict.CLIENT_ERROR),
        (pool_key(), "not-a-claude-model", 400, Verdict.CLIENT_ERROR),  # probed with a fallback model
    ]
    async with aiohttp.ClientSession() as session:
        for key, model, status, verdict in cases:
            assert await service().probe(key, model, session, URL(bedrock.url)) == (status, verdict), key.secret
    assert not [request for request in fake.requests if request.path == "/v1/messages"]
    assert bedrock.requests[-1].path == "/model/anthropic.claude-3-haiku-20240307-v1%3A0/invoke"
