"""Claude on AWS Bedrock, on the wire: the client's Anthropic Messages request as Bedrock's `InvokeModel` /
`InvokeModelWithResponseStream`, signed with SigV4, and Bedrock's answers and errors back in Anthropic's format.

Facts about the real service, and where they come from:

- Operations, paths, error types and their HTTP statuses: botocore's `bedrock-runtime` and `bedrock` service models
  (botocore/data/bedrock-runtime/2023-09-30/service-2.json, botocore/data/bedrock/2023-04-20/service-2.json). Both
  are signed as service `bedrock` (their `signingName`), the runtime on host `bedrock-runtime.<region>`, the control
  plane on `bedrock.<region>`.
- The body: Anthropic's Messages body without `model` and `stream` (Bedrock's closed schema refuses them: "extraneous
  key [model] is not permitted"), with `anthropic_version` and the betas in `anthropic_beta`, as the Anthropic SDK's
  `AnthropicBedrock` client builds it (anthropic/lib/bedrock/_client.py).
- The stream: AWS event stream frames, each `chunk` event's payload `{"bytes": base64(one Anthropic stream event),
  "p": padding}`; the decoded `message_stop` event carries `amazon-bedrock-invocationMetrics`. Exceptions arrive as
  frames with `:message-type: exception` and `:exception-type` (botocore/parsers.py `BaseEventStreamParser`).
- An error answer names its type in the `x-amzn-errortype` header (`ThrottlingException:http://...`), the message in
  the JSON body's `message` (botocore/parsers.py, `RestJSONParser._inject_error_code`).
"""

import base64
import binascii
import json
import logging
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import aiohttp
from yarl import URL

from llmproxy import scrub
from llmproxy.api import ANTHROPIC, sse
from llmproxy.config import ConfigError, split_list
from llmproxy.pool.keys import Verdict
from llmproxy.services.anthropic import CLAUDE_ENDPOINTS, CLOUD_MODELS, claude_families
from llmproxy.services.base import USER_AGENT, KeyCheck, Outgoing, Service, ServiceOption, UpstreamFailure

logger = logging.getLogger(__name__)

CREDENTIALS_SETTING = "AWS_CREDENTIALS"
SIGNING_NAME = "bedrock"  # both services' `signingName` in botocore's service models
ANTHROPIC_VERSION = "bedrock-2023-05-31"  # the body's version when the client names none (Bedrock's Claude docs)
INVOCATION_METRICS = "amazon-bedrock-invocationMetrics"
_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-\d+")  # us-east-1, us-gov-west-1, ap-southeast-3
_ACCESS_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # AWS's are [A-Z0-9]{16,128}; the fakes add markers like -429
# Access key ids as AWS issues them (long-term AKIA, temporary ASIA): an upstream message must not carry one.
_AWS_KEY_SHAPE = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")


@dataclass(frozen=True)
class AwsCredential:
    """One IAM access key and the region whose Bedrock it calls."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    region: str


def parse_credentials(value: str) -> list[AwsCredential]:
    """The credentials of `AWS_CREDENTIALS=access_key:secret:region,...`; ConfigError for a malformed entry, naming
    its position and never its parts (a mistyped entry may have its secret where the region belongs)."""
    return parse_entries(split_list(value))


def parse_entries(entries: list[str]) -> list[AwsCredential]:
    """`parse_credentials` for the setting's entries, already split at its commas (as the proxy reads key settings)."""
    credentials: list[AwsCredential] = []
    for position, entry in enumerate(entries, 1):
        parts = entry.split(":")
        where = f"{CREDENTIALS_SETTING} entry {position}"
        if len(parts) != 3:
            raise ConfigError(f"{where} is not of the form access_key:secret:region.")
        access_key_id, secret, region = (part.strip() for part in parts)
        if not _ACCESS_KEY_ID.fullmatch(access_key_id):
            raise ConfigError(f"{where} does not start with an access key id (letters and digits).")
        if not secret or any(character.isspace() for character in secret):
            raise ConfigError(f"{where} has no secret access key between its colons.")
        if not _REGION.fullmatch(region):
            raise ConfigError(f"{where} does not end in an AWS region such as us-east-1.")
        if repeated := next((n for n, c in enumerate(credentials, 1) if c.access_key_id == access_key_id), None):
            raise ConfigError(f"{where} repeats the access key id of entry {repeated}.")
        credentials.append(AwsCredential(access_key_id, secret, region))
    return credentials


# -- models ---------------------------------------------------------------------------------------------------------


class BedrockModel(NamedTuple):
    """A Claude model as Bedrock names it, and whether Bedrock serves it only through a cross-region inference
    profile (no on-demand throughput in a single region: "Invocation of model ID ... with on-demand throughput isn't
    supported. Retry your request with the ID or ARN of an inference profile that contains this model.")."""

    foundation_id: str
    profile_only: bool


# Anthropic's model names -> Bedrock's: `anthropic.<name>-v<N>:<M>` up to Claude Opus 4.5 (Bedrock's model ID
# table), the bare `anthropic.<name>` since, Opus 4.6 excepted (as code that calls Bedrock names them, with
# `us.`/`eu.`/`global.` profiles). Claude 3 Haiku, 3 Sonnet and 3.5 Sonnet (June) have on-demand throughput in their
# regions; every later model is served through inference profiles only.
MODELS: dict[str, BedrockModel] = {
    "claude-3-haiku-20240307": BedrockModel("anthropic.claude-3-haiku-20240307-v1:0", False),
    "claude-3-sonnet-20240229": BedrockModel("anthropic.claude-3-sonnet-20240229-v1:0", False),
    "claude-3-opus-20240229": BedrockModel("anthropic.claude-3-opus-20240229-v1:0", True),
    "claude-3-5-sonnet-20240620": BedrockModel("anthropic.claude-3-5-sonnet-20240620-v1:0", False),
    "claude-3-5-sonnet-20241022": BedrockModel("anthropic.claude-3-5-sonnet-20241022-v2:0", True),
    "claude-3-5-haiku-20241022": BedrockModel("anthropic.claude-3-5-haiku-20241022-v1:0", True),
    "claude-3-7-sonnet-20250219": BedrockModel("anthropic.claude-3-7-sonnet-20250219-v1:0", True),
    "claude-sonnet-4-20250514": BedrockModel("anthropic.claude-sonnet-4-20250514-v1:0", True),
    "claude-opus-4-20250514": BedrockModel("anthropic.claude-opus-4-20250514-v1:0", True),
    "claude-opus-4-1-20250805": BedrockModel("anthropic.claude-opus-4-1-20250805-v1:0", True),
    "claude-sonnet-4-5-20250929": BedrockModel("anthropic.claude-sonnet-4-5-20250929-v1:0", True),
    "claude-haiku-4-5-20251001": BedrockModel("anthropic.claude-haiku-4-5-20251001-v1:0", True),
    "claude-opus-4-5-20251101": BedrockModel("anthropic.claude-opus-4-5-20251101-v1:0", True),
    "claude-opus-4-6": BedrockModel("anthropic.claude-opus-4-6-v1", True),
    "claude-sonnet-4-6": BedrockModel("anthropic.claude-sonnet-4-6", True),
    "claude-opus-4-7": BedrockModel("anthropic.claude-opus-4-7", True),
    "claude-opus-4-8": BedrockModel("anthropic.claude-opus-4-8", True),
    "claude-sonnet-5": BedrockModel("anthropic.claude-sonnet-5", True),
    "claude-opus-5": BedrockModel("anthropic.claude-opus-5", True),
    "claude-haiku-5-5": BedrockModel("anthropic.claude-haiku-5-5", True),
    "claude-sonnet-5-5": BedrockModel("anthropic.claude-sonnet-5-5", True),
    "claude-opus-5-5": BedrockModel("anthropic.claude-opus-5-5", True),
}
# Anthropic's aliases, as its API resolves them.
ALIASES = {
    "claude-3-5-sonnet-latest": "claude-3-5-sonnet-20241022",
    "claude-3-5-haiku-latest": "claude-3-5-haiku-20241022",
    "claude-3-7-sonnet-latest": "claude-3-7-sonnet-20250219",
    "claude-sonnet-4-0": "claude-sonnet-4-20250514",
    "claude-opus-4-0": "claude-opus-4-20250514",
    "claude-opus-4-1": "claude-opus-4-1-20250805",
    "claude-sonnet-4-5": "claude-sonnet-4-5-20250929",
    "claude-haiku-4-5": "claude-haiku-4-5-20251001",
    "claude-opus-4-5": "claude-opus-4-5-20251101",
}
_BY_FOUNDATION_ID = {model.foundation_id: model for model in MODELS.values()}
# A Bedrock id as a client may send it: a foundation model id, or an inference profile's (`<geography>.` before it).
_BEDROCK_ID = re.compile(
    r"(?:(?P<geography>[a-z]+(?:-[a-z]+)?)\.)?(?P<foundation>anthropic\.claude-[a-z0-9-]+(?::\w+)*)"
)
# The geographies of the cross-region inference profiles that a region may call: its own area's, and the global one
# (any commercial region). Japan's and Australia's profiles are called from Asia-Pacific regions.
_PROFILES_BY_AREA = {"us": ("us",), "us-gov": ("us-gov",), "eu": ("eu",), "apac": ("apac", "jp", "au")}
_GLOBAL_PROFILE = "global"


def _area(region: str) -> str | None:
    """The cross-region inference profile geography a region belongs to (its profiles' prefix), if any."""
    if region.startswith("us-gov-"):
        return "us-gov"
    return {"us": "us", "eu": "eu", "ap": "apac"}.get(region.split("-", 1)[0])


def _invocable_id(model: BedrockModel, area: str | None) -> str | None:
    """The id to invoke a known model by: its own, or its inference profile in the region's geography."""
    if not model.profile_only:
        return model.foundation_id
    return f"{area}.{model.foundation_id}" if area else None


def bedrock_model_id(model: str, region: str) -> str | None:
    """The model id to invoke for `model` (an Anthropic model name, or a Bedrock model or inference profile id) from
    `region`; None when that region cannot invoke it (no such model, or a profile of another geography)."""
    area = _area(region)
    if match := _BEDROCK_ID.fullmatch(model):
        if match["geography"] is not None:
            callable_here = _PROFILES_BY_AREA.get(area or "", ()) + (() if area == "us-gov" else (_GLOBAL_PROFILE,))
            return model if match["geography"] in callable_here else None
        known = _BY_FOUNDATION_ID.get(match["foundation"])
        return model if known is None else _invocable_id(known, area)  # an unknown one as the client names it
    known = MODELS.get(ALIASES.get(model, model))
    return None if known is None else _invocable_id(known, area)


def foundation_model_id(model_id: str) -> str:
    """The foundation model an inference profile id stands for (`us.anthropic.x` -> `anthropic.x`): the id that
    `ListFoundationModels` lists."""
    match = _BEDROCK_ID.fullmatch(model_id)
    return match["foundation"] if match else model_id


# -- requests -------------------------------------------------------------------------------------------------------


def _signed_headers(
    credential: AwsCredential, method: str, url: str, headers: dict[str, str], body: bytes | None
) -> list[tuple[str, str]]:
    """`headers` plus botocore's SigV4 signature (`x-amz-date`, `authorization`) for this request, as of now."""
    # botocore is imported where it is used: 6 MB of memory that a proxy without AWS credentials never needs.
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    request = AWSRequest(method=method, url=url, headers=headers, data=body)
    signer = SigV4Auth(
        Credentials(credential.access_key_id, credential.secret_access_key), SIGNING_NAME, credential.region
    )
    signer.add_auth(request)
    return [(name.lower(), value) for name, value in request.headers.items()]


def _percent_encode(model_id: str) -> str:
    """A model id as botocore's `percent_encode` puts it in the path (RFC 3986 unreserved characters kept, `:` as
    `%3A`): the signature covers the path so encoded."""
    return urllib.parse.quote(model_id, safe="-_.~")


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """A header's value, whatever its case; several fields of that name joined with commas."""
    values = [value for key, value in headers.items() if key.lower() == name]
    return ",".join(values) if values else None


def invoke_request(
    credential: AwsCredential,
    model_id: str,
    body: bytes,
    headers: Mapping[str, str],
    stream: bool,
    endpoint: str | None = None,
) -> tuple[str, list[tuple[str, str]], bytes]:
    """The URL, signed headers and body of `InvokeModel` (or `InvokeModelWithResponseStream`) for a client's Anthropic
    Messages request (`body`, `headers`). The signature is made now: call this for every attempt. The request must
    reach the URL's host with that `Host` header, its body unchanged, and its path byte for byte as given: AWS signs
    the path as it arrives, and aiohttp would send `%3A` as `:` (pass it `yarl.URL(url, encoded=True)`). ValueError
    for a body that is no JSON object."""
    payload = json.loads(body)
    if not isinstance(payload, dict):
        raise ValueError("an Anthropic Messages request body is a JSON object")
    payload.pop("model", None)
    payload.pop("stream", None)
    payload.setdefault("anthropic_version", ANTHROPIC_VERSION)
    betas = [beta.strip() for beta in (_header(headers, "anthropic-beta") or "").split(",") if beta.strip()]
    if betas:
        listed = payload.setdefault("anthropic_beta", [])
        if isinstance(listed, list):  # anything else is the client's own error, for Bedrock to name
            listed.extend(beta for beta in betas if beta not in listed)
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    base = (endpoint or f"https://bedrock-runtime.{credential.region}.amazonaws.com").rstrip("/")
    # The model id is one path label, percent-encoded by botocore's rules (`:` becomes %3A) as boto3 sends it.
    url = f"{base}/model/{_percent_encode(model_id)}/{'invoke-with-response-stream' if stream else 'invoke'}"
    # What AnthropicBedrock sends, streaming or not: the answer's format is Bedrock's choice either way.
    signed = _signed_headers(
        credential, "POST", url, {"content-type": "application/json", "accept": "application/json"}, data
    )
    return url, signed, data


def check_requests(
    credential: AwsCredential, endpoint: str | None = None
) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """The key checker's GET requests, which spend no tokens: (operation, URL, signed headers) of
    `ListFoundationModels` (Anthropic's models in the region) and `GetModelInvocationLoggingConfiguration`."""
    base = (endpoint or f"https://bedrock.{credential.region}.amazonaws.com").rstrip("/")
    return [
        (operation, url, _signed_headers(credential, "GET", url, {"accept": "application/json"}, None))
        for operation, url in (
            ("ListFoundationModels", f"{base}/foundation-models?byProvider=anthropic"),
            ("GetModelInvocationLoggingConfiguration", f"{base}/logging/modelinvocations"),
        )
    ]


def invocable_models(body: bytes) -> set[str]:
    """The model ids a `ListFoundationModels` answer names as active and invocable on demand or through an inference
    profile (not those that need provisioned throughput); none when the answer has another shape."""
    try:
        summaries = json.loads(body)["modelSummaries"]
        return {
            str(summary["modelId"])
            for summary in summaries
            if isinstance(summary, dict)
            and (summary.get("modelLifecycle") or {}).get("status") == "ACTIVE"
            and {"ON_DEMAND", "INFERENCE_PROFILE"} & set(summary.get("inferenceTypesSupported") or ())
        }
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return set()


def logging_enabled(body: bytes) -> bool:
    """Whether a `GetModelInvocationLoggingConfiguration` answer says prompts are logged (to the account owner's S3 or
    CloudWatch). An answer that cannot be read counts as logging: only a readable answer can rule it out."""
    try:
        config = json.loads(body).get("loggingConfig")
    except (ValueError, AttributeError, RecursionError):
        return True
    if not config:  # no configuration: logging was never set up, or was deleted
        return False
    return not isinstance(config, dict) or config.get("textDataDeliveryEnabled") is not False


# -- errors ---------------------------------------------------------------------------------------------------------

SUCCESS, RATE_LIMITED, REVOKED, FORBIDDEN, SERVER_ERROR, CLIENT_ERROR = (
    "success",
    "rate_limited",
    "revoked",
    "forbidden",
    "server_error",
    "client_error",
)


class _Meaning(NamedTuple):
    status: int  # the status the client gets
    anthropic_type: str  # the Anthropic error type it gets
    verdict: str  # what the error says about the credential


# Bedrock's error types (with their status in Bedrock's service models) as an Anthropic client would have met them.
# The signature errors are not the key's death: a wrong secret says so, but so do a skewed clock, a credential
# scoped to another region, a signed header changed on the way, and a signing bug of ours, which would fail every
# key at once; only the message tells them apart, and the message is no evidence (clients can make an upstream
# echo any words). So they are a server error: the key stays, the request may go to another.
_ERRORS = {
    "ThrottlingException": _Meaning(429, "rate_limit_error", RATE_LIMITED),  # 429
    "ServiceQuotaExceededException": _Meaning(429, "rate_limit_error", RATE_LIMITED),  # 400: the account's quota
    "AccessDeniedException": _Meaning(403, "permission_error", FORBIDDEN),  # 403: no access to this model (or any)
    "UnrecognizedClientException": _Meaning(401, "authentication_error", REVOKED),  # 403: no such access key
    "ExpiredTokenException": _Meaning(401, "authentication_error", REVOKED),  # 403
    "InvalidSignatureException": _Meaning(401, "authentication_error", SERVER_ERROR),  # 403
    "IncompleteSignatureException": _Meaning(401, "authentication_error", SERVER_ERROR),  # 403
    "MissingAuthenticationTokenException": _Meaning(401, "authentication_error", SERVER_ERROR),  # 403
    "ValidationException": _Meaning(400, "invalid_request_error", CLIENT_ERROR),  # 400
    "ConflictException": _Meaning(400, "invalid_request_error", CLIENT_ERROR),  # 400
    # 404: the model is not offered to this account in this region (or its use case form is missing): another
    # credential may have it, as with a refused model.
    "ResourceNotFoundException": _Meaning(404, "not_found_error", FORBIDDEN),
    "ModelNotReadyException": _Meaning(503, "overloaded_error", SERVER_ERROR),  # 429: the model is being loaded
    "ServiceUnavailableException": _Meaning(503, "overloaded_error", SERVER_ERROR),  # 503
    "ModelTimeoutException": _Meaning(504, "timeout_error", SERVER_ERROR),  # 408
    "ModelErrorException": _Meaning(500, "api_error", SERVER_ERROR),  # 424
    "ModelStreamErrorException": _Meaning(500, "api_error", SERVER_ERROR),  # 424
    "InternalServerException": _Meaning(500, "api_error", SERVER_ERROR),  # 500
}


def _error_type(headers: Mapping[str, str]) -> str:
    """The error type an `x-amzn-errortype` header names, as botocore reads it (`Type:namespace`, `ns#Type`)."""
    return (_header(headers, "x-amzn-errortype") or "").split(":", 1)[0].rsplit("#", 1)[-1].strip()


def _meaning(status: int, error_type: str) -> _Meaning:
    """What an error of this type, or of this status when the type is unknown, means."""
    if known := _ERRORS.get(error_type):
        return known
    if status == 429:
        return _ERRORS["ThrottlingException"]
    # Bedrock names the type of every refusal of its own: an untyped 401 or 403 came from something on the way.
    if status >= 500 or status in (401, 403):
        return _ERRORS["InternalServerException"]
    return _ERRORS["ValidationException"]


def _clean(message: str) -> str:
    """An upstream message without any credential in it."""
    return _AWS_KEY_SHAPE.sub(scrub.REDACTED, scrub.text(message))


def _anthropic_body(anthropic_type: str, message: str) -> dict:
    # The shape of llmproxy/api/errors.py's bodies, built here: that module imports the services' table, which will
    # import this one.
    return {"type": "error", "error": {"type": anthropic_type, "message": message}}


def anthropic_error(status: int, headers: Mapping[str, str], body: bytes) -> tuple[int, bytes]:
    """A Bedrock error answer as the status and Anthropic error body the client gets; its message is Bedrock's,
    without our credential."""
    try:
        parsed = json.loads(body)
        message = str(parsed.get("message") or parsed.get("Message") or "")
    except (ValueError, AttributeError, RecursionError):
        message = ""
    error_type = _error_type(headers)
    meaning = _meaning(status, error_type)
    text = _clean(message) or f"Amazon Bedrock answered HTTP {status}{f' ({error_type})' if error_type else ''}."
    return meaning.status, json.dumps(_anthropic_body(meaning.anthropic_type, text)).encode()


def key_verdict(status: int, headers: Mapping[str, str], body: bytes) -> str:
    """What an answer says about the credential that got it: success, rate_limited, revoked, forbidden (not this
    model), server_error or client_error. Read from the status and the error type only, never the message: a client
    can make the upstream echo any words. (`body` is taken for a caller's uniformity and not read.)"""
    if status < 300:
        return SUCCESS
    return _meaning(status, _error_type(headers)).verdict


# -- the answer stream ----------------------------------------------------------------------------------------------


class EventStreamError(Exception):
    """An `InvokeModelWithResponseStream` answer that is no valid AWS event stream: nothing after it can be read."""


class EventStreamToSSE:
    """Turns the AWS event stream of an `InvokeModelWithResponseStream` answer into Anthropic's SSE, however its
    bytes are cut: `feed` returns the events that each piece completed. Bedrock's invocation metrics, which it adds to
    the last event, are taken out (the client gets Anthropic's events as Anthropic sends them) and kept in
    `invocation_metrics`. An exception Bedrock sends becomes an Anthropic `error` event."""

    def __init__(self) -> None:
        from botocore.eventstream import EventStreamBuffer  # as in _signed_headers

        self._buffer = EventStreamBuffer()
        self.invocation_metrics: dict | None = None

    def feed(self, data: bytes) -> bytes:
        """The SSE bytes of every message `data` completed; EventStreamError if a frame is corrupt."""
        from botocore.eventstream import ParserError as EventStreamParserError

        self._buffer.add_data(data)
        events = []
        try:
            for message in self._buffer:
                events.append(self._event(message.headers, message.payload))
        except EventStreamParserError as error:  # a checksum mismatch, or lengths no frame can have
            raise EventStreamError(f"The Bedrock answer stream is corrupt: {error}") from None
        return b"".join(events)

    def _event(self, headers: dict, payload: bytes) -> bytes:
        message_type = headers.get(":message-type")
        if message_type == "exception":
            exception_type = str(headers.get(":exception-type", ""))  # lowerCamelCase: throttlingException
            return self._error(exception_type[:1].upper() + exception_type[1:], self._message(payload))
        if message_type == "error":
            return self._error(str(headers.get(":error-code", "")), str(headers.get(":error-message", "")))
        if headers.get(":event-type") != "chunk":
            return b""
        try:
            text = base64.b64decode(json.loads(payload)["bytes"], validate=True).decode()
            event = json.loads(text)
        except (ValueError, KeyError, TypeError, binascii.Error, RecursionError):
            raise EventStreamError("A Bedrock answer stream chunk is not a base64-encoded JSON event.") from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str) or not event["type"].isprintable():
            return b""  # no Anthropic event: nothing a client could route
        if INVOCATION_METRICS in event:
            self.invocation_metrics = event.pop(INVOCATION_METRICS)
            text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        return sse.event(text, event["type"])

    @staticmethod
    def _message(payload: bytes) -> str:
        try:
            return str(json.loads(payload).get("message") or "")
        except (ValueError, AttributeError, RecursionError):
            return ""

    @staticmethod
    def _error(error_type: str, message: str) -> bytes:
        meaning = _ERRORS.get(error_type, _ERRORS["InternalServerException"])
        text = _clean(message) or f"Amazon Bedrock ended the stream with {error_type or 'an error'}."
        return sse.event(json.dumps(_anthropic_body(meaning.anthropic_type, text)), "error")


# -- The service ---------------------------------------------------------------------------------------------------
DEFAULT_URL = "https://bedrock-runtime.amazonaws.com"  # stands for each credential's region's endpoint
ALLOW_LOGGING_OPTION = "allow_aws_logging"
# Invoked on demand by its own id, so that a probe names a model id whatever the region (only a fallback).
PROBE_FALLBACK_MODEL = MODELS["claude-3-haiku-20240307"].foundation_id
_VERDICTS = {
    SUCCESS: Verdict.SUCCESS,
    RATE_LIMITED: Verdict.RATE_LIMITED,
    REVOKED: Verdict.REVOKED,
    FORBIDDEN: Verdict.FAMILY_FORBIDDEN,
    SERVER_ERROR: Verdict.SERVER_ERROR,
    CLIENT_ERROR: Verdict.CLIENT_ERROR,
}


class Bedrock(Service):
    """AWS Bedrock's Claude models, for clients of Anthropic's Messages API (and its OpenAI-format twin) under
    `/proxy/aws/claude/v1/...`, with `AWS_CREDENTIALS`."""

    name = "aws"
    path_prefix = "/claude"
    title = "AWS Bedrock (Claude)"
    dialect = ANTHROPIC
    key_setting = "aws_credentials"
    key_prefix = "aws"
    default_url = DEFAULT_URL
    endpoints = CLAUDE_ENDPOINTS
    families = claude_families("aws-", "anthropic.")
    models = CLOUD_MODELS
    price_fallback = "anthropic"
    stream_media_type = "application/vnd.amazon.eventstream"
    options = (
        ServiceOption(
            ALLOW_LOGGING_OPTION,
            bool,
            False,
            """
            Serve AWS credentials whose account has model invocation logging on (Bedrock then stores every prompt
            and completion in the account's CloudWatch or S3). Off: the key check retires them.
            """,
        ),
    )
    allow_logging = False  # ALLOW_AWS_LOGGING, set by `configure`

    def configure(self, values: Mapping[str, object]) -> None:
        if ALLOW_LOGGING_OPTION in values:
            self.allow_logging = bool(values[ALLOW_LOGGING_OPTION])

    def parse_keys(self, values: list[str]) -> list[str]:
        """Each entry checked and written as `access_key_id:secret:region` (whitespace around its parts dropped)."""
        return [
            f"{credential.access_key_id}:{credential.secret_access_key}:{credential.region}"
            for credential in parse_entries(values)
        ]

    def secret_parts(self, key: str) -> list[str]:
        credential = credential_of(key)
        return [credential.secret_access_key, credential.access_key_id]

    async def prepare(self, request, route, key, base: URL) -> Outgoing:
        """InvokeModel (or its streaming twin) for the model the body names, as the credential's region calls it,
        signed now. A model the region cannot invoke fails this attempt (UpstreamFailure), so that another
        credential, maybe of another region, gets the request."""
        credential = credential_of(key.secret)
        try:
            payload = json.loads(request.body)
        except (ValueError, RecursionError):
            payload = None
        if not isinstance(payload, dict):
            raise UpstreamFailure(400, "invalid_request", "The request body must be a JSON object.")
        model = payload.get("model")
        model_id = bedrock_model_id(model, credential.region) if isinstance(model, str) else None
        if model_id is None:
            shown = json.dumps(model if isinstance(model, str) else None)[:100]
            raise UpstreamFailure(
                400,
                "model_not_available",
                f"Amazon Bedrock offers no model {shown} in the region of the AWS credential the proxy chose.",
            )
        client_headers: dict[str, str] = {}
        for name, value in request.headers:
            name = name.lower()
            client_headers[name] = f"{client_headers[name]},{value}" if name in client_headers else value
        url, headers, body = invoke_request(
            credential, model_id, request.body, client_headers, payload.get("stream") is True, _endpoint(base)
        )
        return Outgoing(url, headers, body)

    def verdict(self, status: int, headers: Mapping[str, str], body: bytes) -> Verdict:
        return _VERDICTS[key_verdict(status, headers, body)]

    def client_error(self, status: int, headers: Mapping[str, str], body: bytes) -> tuple[int, bytes]:
        return anthropic_error(status, headers, body)

    def stream_decoder(self) -> Callable[[bytes], bytes]:
        # The pipe calls it only with the bytes that came, never at the stream's end: a decoder that needs no
        # flush. A corrupt frame raises, and the pipe ends the client's stream with an error event.
        return EventStreamToSSE().feed

    async def check(self, key, session, base: URL) -> KeyCheck:
        """`ListFoundationModels` (the Claude models the region can invoke, as Anthropic names them) and
        `GetModelInvocationLoggingConfiguration`: a credential whose account logs prompts, or may (the configuration
        cannot be read), is retired unless ALLOW_AWS_LOGGING, which only has it logged as a warning. Neither spends
        tokens. An answer that says nothing about the credential (throttled, a server or signature error) raises
        InconclusiveAnswer, so that the checker tries again soon."""
        credential = credential_of(key.secret)
        (_, models_url, models_headers), (_, logging_url, logging_headers) = check_requests(credential, _endpoint(base))
        status, headers, body = await _get(session, models_url, models_headers)
        verdict = self.verdict(status, headers, body)
        if verdict in (Verdict.REVOKED, Verdict.OVER_QUOTA, Verdict.CLIENT_ERROR):
            return KeyCheck(status, verdict, reason=f"ListFoundationModels got {_answer(status, headers)}")
        if verdict in (Verdict.RATE_LIMITED, Verdict.SERVER_ERROR):
            raise _inconclusive("ListFoundationModels", status, headers)
        # Refused (AccessDeniedException): the credential is known, only the list is not for it; no family is ruled
        # out then.
        models = invocable_names(body, credential.region) if verdict is Verdict.SUCCESS else []
        status, headers, body = await _get(session, logging_url, logging_headers)
        verdict = self.verdict(status, headers, body)
        if verdict is Verdict.REVOKED:
            return KeyCheck(
                status, verdict, reason=f"GetModelInvocationLoggingConfiguration got {_answer(status, headers)}"
            )
        if verdict is Verdict.SUCCESS and _is_json_object(body):
            logged, how = logging_enabled(body), "model invocation logging is on"
        elif verdict in (Verdict.RATE_LIMITED, Verdict.SERVER_ERROR) and not self.allow_logging:
            raise _inconclusive("GetModelInvocationLoggingConfiguration", status, headers)
        else:  # refused to this credential, or no readable answer: logging cannot be ruled out
            logged = True
            how = (
                "model invocation logging cannot be ruled out (GetModelInvocationLoggingConfiguration got "
                f"{_answer(status, headers)})"
            )
        if logged and not self.allow_logging:
            reason = f"{how}: the account stores prompts and completions; ALLOW_AWS_LOGGING=true serves it anyway"
            return KeyCheck(status, Verdict.REVOKED, models, reason=reason)
        if logged:
            logger.warning("key %s: %s, and served because ALLOW_AWS_LOGGING is set", key.id, how)
        return KeyCheck(status, Verdict.SUCCESS, models, reason="the key check succeeded")

    async def probe(self, key, model: str, session, base: URL) -> tuple[int, Verdict]:
        """InvokeModel with no messages, for the suspect's model as the credential's region invokes it (a model
        every region has, if it has none): Bedrock refuses it as invalid (ValidationException) to a working
        credential, and as unknown or expired to a dead one, without running the model."""
        credential = credential_of(key.secret)
        model_id = bedrock_model_id(model, credential.region) or PROBE_FALLBACK_MODEL
        url, headers, body = invoke_request(
            credential, model_id, json.dumps(self.probe_body(model)).encode(), {}, False, _endpoint(base)
        )
        async with session.post(URL(url, encoded=True), data=body, headers=_checker(headers)) as response:
            status, answer = response.status, await response.read()
        return status, self.verdict(status, response.headers, answer)


_ANTHROPIC_NAMES = {model.foundation_id: name for name, model in MODELS.items()}


def credential_of(secret: str) -> AwsCredential:
    """The credential of a pool key's secret (`access_key_id:secret:region`, as `Bedrock.parse_keys` wrote it)."""
    access_key_id, secret_access_key, region = secret.split(":")
    return AwsCredential(access_key_id, secret_access_key, region)


def invocable_names(body: bytes, region: str) -> list[str]:
    """The models of a `ListFoundationModels` answer that `region` can invoke, by Anthropic's names (a model the
    table does not know by its Bedrock id, which the family table matches too)."""
    return sorted(
        _ANTHROPIC_NAMES.get(model_id, model_id)
        for model_id in invocable_models(body)
        if bedrock_model_id(model_id, region) is not None
    )


def _endpoint(base: URL) -> str | None:
    """The endpoint the requests go to: None (each credential's region's own) for the default URL."""
    return None if str(base).rstrip("/") == DEFAULT_URL else str(base)


def _checker(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Signed headers plus the checker's user agent and no compression (neither is signed: AWS checks only the
    headers a signature names)."""
    return [*headers, ("user-agent", USER_AGENT), ("accept-encoding", "identity")]


async def _get(session, url: str, headers: list[tuple[str, str]]) -> tuple[int, Mapping[str, str], bytes]:
    async with session.get(URL(url, encoded=True), headers=_checker(headers)) as response:
        return response.status, response.headers, await response.read()


def _answer(status: int, headers: Mapping[str, str]) -> str:
    """An answer for the log: its status and Bedrock's error type."""
    error_type = _error_type(headers)
    return f"HTTP {status}{f' ({error_type})' if error_type else ''}"


class InconclusiveAnswer(aiohttp.ClientError):
    """An answer to a key check that says nothing about the credential (throttled, a server or signature error):
    an aiohttp.ClientError, so that the checker tries again soon, with back-off, as after network trouble."""


def _inconclusive(operation: str, status: int, headers: Mapping[str, str]) -> InconclusiveAnswer:
    return InconclusiveAnswer(f"{operation} got {_answer(status, headers)}")


def _is_json_object(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except (ValueError, RecursionError):
        return False
