"""A fake Amazon Bedrock: the runtime (`InvokeModel`, `InvokeModelWithResponseStream`) and the two control-plane
reads the key checker makes (`ListFoundationModels`, `GetModelInvocationLoggingConfiguration`), on one port.

It knows credentials (`add_credential`) and refuses, as AWS does, every request without a valid SigV4 signature by
one of them: the signature is computed again with botocore from the request as it arrived (method, path, query,
the signed headers, the body's hash) and the registered secret. An unknown access key is AWS's
`UnrecognizedClientException`, a wrong secret or a changed byte `InvalidSignatureException`, as are a date more than
5 minutes off the fake's clock (`clock_offset` moves that clock), a scope of another service than `bedrock`, or of
another region than a credential registered with one.

An invocation is validated as Bedrock validates Claude's (`anthropic_version` required; `model` and `stream` not
permitted; a known model id, through an inference profile where Bedrock requires one; a model the credential may
use; at least one message, refused after the fake upstream's say on the key, as the proxy's key probe expects),
then answered by the fake upstream (tests/fakeupstream.py): a `POST /v1/messages` with `x-api-key: <access key
id>`, so its key markers (`-429`, `-401`, `-quota`, `-500`), per-key overrides and `#fake:` directives work through
Bedrock too. The checker's reads ask the fake upstream's `GET /v1/models` with that key first, so key markers and
overrides refuse them alike. The upstream's errors become Bedrock's (`UPSTREAM_ERRORS`); a successful answer is
Bedrock's JSON (the Messages body, token counts in `x-amzn-bedrock-*` headers) or event stream (one `chunk` frame
per Anthropic event, `amazon-bedrock-invocationMetrics` on the last), framed with `encode_frame`.

Every request is recorded in `requests`, with the upstream's answer as it came (`upstream_answer`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import random
import re
import struct
import time
import uuid
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from aiohttp import web
from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from llmproxy.api import DEFAULT_ANTHROPIC_VERSION, sse
from llmproxy.services.bedrock import INVOCATION_METRICS, MODELS, SIGNING_NAME, foundation_model_id
from tests.fakes.server import FakeServer
from tests.fakeupstream import RecordedRequest

# Bedrock's Claude models: foundation model id -> (Anthropic's name, only through an inference profile).
CATALOGUE = {model.foundation_id: (name, model.profile_only) for name, model in MODELS.items()}
MAX_SKEW = timedelta(minutes=5)  # how far a signature's date may be from AWS's clock
# The namespaces AWS names in x-amzn-errortype: the authentication layer's, and the service's own.
AUTH_NAMESPACE = "http://internal.amazon.com/coral/com.amazon.coral.service/"
SERVICE_NAMESPACE = "http://internal.amazon.com/coral/com.amazon.bedrock/"
AUTH_ERRORS = {
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "IncompleteSignatureException",
    "MissingAuthenticationTokenException",
}
AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256\s+Credential=(?P<credential>[^,\s]+),\s*SignedHeaders=(?P<signed>[^,\s]+),"
    r"\s*Signature=(?P<signature>[0-9a-f]+)"
)
# AWS's messages, as its services word them.
UNKNOWN_KEY = "The security token included in the request is invalid."
SIGNATURE_MISMATCH = (
    "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access "
    "Key and signing method. Consult the service documentation for details."
)
WRONG_SERVICE = f"Credential should be scoped to correct service: '{SIGNING_NAME}'. "
WRONG_REGION = "Credential should be scoped to a valid region. "
INVALID_MODEL = "The provided model identifier is invalid."
NO_MODEL_ACCESS = "You don't have access to the model with the specified model ID."
NEEDS_PROFILE = (
    "Invocation of model ID {} with on-demand throughput isn't supported. Retry your request with the ID or ARN of "
    "an inference profile that contains this model."
)
MALFORMED = "Malformed input request: {}, please reformat your input and try again."
NO_MESSAGES = "#/messages: expected minimum item count: 1, found: 0"
STREAM_BROKE = "An error occurred while streaming the response. Retry your request."
# The fake upstream's error status -> Bedrock's error type, status and message (None: the upstream's own message).
UPSTREAM_ERRORS: dict[int, tuple[str, int, str | None]] = {
    400: ("ValidationException", 400, None),
    401: ("UnrecognizedClientException", 403, UNKNOWN_KEY),
    402: (
        "ServiceQuotaExceededException",
        400,
        "Your request exceeds the service quota for your account. You can view your quotas at Viewing service "
        "quotas. You can resubmit your request later.",
    ),
    403: ("AccessDeniedException", 403, NO_MODEL_ACCESS),
    404: (
        "ResourceNotFoundException",
        404,
        "Model use case details have not been submitted for this account. Fill out the Anthropic use case details "
        "form before using the model.",
    ),
    408: ("ModelTimeoutException", 408, "Model has timed out in processing the request. Try your request again."),
    424: ("ModelErrorException", 424, None),
    429: ("ThrottlingException", 429, "Too many requests, please wait before trying again."),
    500: (
        "InternalServerException",
        500,
        "The system encountered an unexpected error during processing. Try your request again.",
    ),
    503: ("ServiceUnavailableException", 503, "Bedrock is unable to process your request."),
}
UPSTREAM_ERRORS[504] = UPSTREAM_ERRORS[408]
UPSTREAM_ERRORS[529] = UPSTREAM_ERRORS[503]
# What Bedrock pads each chunk's payload with (a random-length prefix), so that sizes tell nothing of the text.
PADDING = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
LOGGING_CONFIG = {
    "cloudWatchConfig": {
        "logGroupName": "bedrock-model-invocations",
        "roleArn": "arn:aws:iam::123456789012:role/BedrockInvocationLogging",
        "largeDataDeliveryS3Config": {"bucketName": "bedrock-invocation-logs", "keyPrefix": "large-data"},
    },
    "textDataDeliveryEnabled": True,
    "imageDataDeliveryEnabled": True,
    "embeddingDataDeliveryEnabled": True,
}


def encode_frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One AWS event stream message: prelude (total and headers lengths, their CRC32), string headers, payload,
    and the CRC32 of all before it."""
    encoded = b"".join(
        struct.pack("B", len(name.encode()))
        + name.encode()
        + b"\x07"
        + struct.pack(">H", len(value.encode()))
        + value.encode()
        for name, value in headers.items()
    )
    prelude = struct.pack(">II", 12 + len(encoded) + len(payload) + 4, len(encoded))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + encoded + payload
    return message + struct.pack(">I", zlib.crc32(message))


def chunk_frame(event: dict[str, Any]) -> bytes:
    """A `chunk` event carrying one Anthropic stream event, padded as Bedrock pads it."""
    payload = {
        "bytes": base64.b64encode(json.dumps(event, separators=(",", ":")).encode()).decode(),
        "p": PADDING[: random.randint(1, len(PADDING))],
    }
    return encode_frame(
        {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"},
        json.dumps(payload).encode(),
    )


def exception_frame(exception_type: str, message: str) -> bytes:
    """An exception in the stream, e.g. `throttlingException` (the stream member's name, lowerCamelCase)."""
    return encode_frame(
        {":exception-type": exception_type, ":content-type": "application/json", ":message-type": "exception"},
        json.dumps({"message": message}).encode(),
    )


@dataclass
class BedrockRecord(RecordedRequest):
    """A request as it reached the fake (`key` is the access key id it was signed with), and the fake upstream's
    answer to it as that arrived (SSE or JSON; empty when the fake refused the request itself)."""

    upstream_answer: bytes = b""


# What the authentication middleware leaves on a request for its route.
RECORD = web.RequestKey("record", BedrockRecord)
ACCESS_KEY_ID = web.RequestKey("access_key_id", str)
SIGNED_REGION = web.RequestKey("signed_region", str)


@dataclass
class FakeCredential:
    secret: str
    region: str | None  # None: any region may be signed for
    logging: bool
    models: set[str]  # the foundation model ids it may invoke (and ListFoundationModels lists)


class BedrockError(Exception):
    """An error answer in Bedrock's format."""

    def __init__(self, error_type: str, status: int, message: str):
        super().__init__(message)
        self.error_type, self.status, self.message = error_type, status, message

    def response(self) -> web.Response:
        namespace = AUTH_NAMESPACE if self.error_type in AUTH_ERRORS else SERVICE_NAMESPACE
        return web.json_response(
            {"message": self.message},
            status=self.status,
            headers={"x-amzn-RequestId": str(uuid.uuid4()), "x-amzn-ErrorType": f"{self.error_type}:{namespace}"},
        )


def _invalid_signature(message: str) -> BedrockError:
    return BedrockError("InvalidSignatureException", 403, message)


def _from_upstream(status: int, body: bytes) -> BedrockError:
    """The Bedrock error for the fake upstream's error answer."""
    try:
        message = str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace")
    if status == 400 and "credit balance" in message:  # the upstream's `-quota`: Bedrock's is the account's quota
        status = 402
    default = UPSTREAM_ERRORS[500] if status >= 500 else UPSTREAM_ERRORS[400]
    error_type, bedrock_status, bedrock_message = UPSTREAM_ERRORS.get(status, default)
    return BedrockError(error_type, bedrock_status, bedrock_message or message)


class FakeBedrock(FakeServer):
    """The fake server; `start()` it on a loop, or `start_in_thread()`."""

    def __init__(self, anthropic_fake_url: str) -> None:
        super().__init__()
        self.anthropic_fake_url = anthropic_fake_url.rstrip("/")
        self.requests: list[BedrockRecord] = []
        self.clock_offset = 0.0  # seconds added to the fake's clock when it checks a signature's date
        self._credentials: dict[str, FakeCredential] = {}

    def add_credential(
        self,
        access_key_id: str,
        secret: str,
        *,
        region: str | None = None,
        logging: bool = False,
        models: set[str] | list[str] | None = None,
    ) -> None:
        """Know an access key: its secret, the region it must sign for (any, if None), whether its account logs
        invocations, and the foundation model ids it may use (all Claude models Bedrock has, if None)."""
        allowed = set(CATALOGUE) if models is None else set(models)
        if unknown := allowed - set(CATALOGUE):
            raise ValueError(f"not Claude models on Bedrock: {sorted(unknown)}")
        self._credentials[access_key_id] = FakeCredential(secret, region, logging, allowed)

    def reset(self) -> None:
        """Forget the recorded requests (credentials stay)."""
        self.requests.clear()

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._authenticated], client_max_size=64 * 1024 * 1024)
        app.router.add_post("/model/{model_id}/invoke", self._invoke)
        app.router.add_post("/model/{model_id}/invoke-with-response-stream", self._invoke)
        app.router.add_get("/foundation-models", self._foundation_models)
        app.router.add_get("/logging/modelinvocations", self._logging_configuration)
        return app

    def make_session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    # -- authentication ------------------------------------------------------------------------------------------

    @web.middleware
    async def _authenticated(self, request: web.Request, handler) -> web.StreamResponse:
        """Record the request, check its signature, then let its route answer; Bedrock's errors as Bedrock's."""
        body = await request.read()
        authorization = AUTHORIZATION.search(request.headers.get("Authorization", ""))
        record = BedrockRecord(
            request.method,
            request.raw_path,
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
            body,
            authorization["credential"].split("/")[0] if authorization else None,
        )
        self.requests.append(record)
        request[RECORD] = record
        try:
            request[ACCESS_KEY_ID], request[SIGNED_REGION] = self._verify(request, body, authorization)
            if request.match_info.http_exception is not None:
                raise BedrockError(
                    "UnknownOperationException", 404, f"Unknown operation {request.method} {request.path}"
                )
            return await handler(request)
        except BedrockError as error:
            return error.response()

    def _verify(self, request: web.Request, body: bytes, authorization: re.Match | None) -> tuple[str, str]:
        """The access key id and region of a correctly signed request; BedrockError as AWS refuses others."""
        if "Authorization" not in request.headers:
            raise BedrockError("MissingAuthenticationTokenException", 403, "Missing Authentication Token")
        if authorization is None:
            raise BedrockError(
                "IncompleteSignatureException",
                403,
                "Authorization header requires 'Credential' parameter. Authorization header requires 'Signature' "
                "parameter. Authorization header requires 'SignedHeaders' parameter.",
            )
        scope = authorization["credential"].split("/")
        if len(scope) != 5 or scope[4] != "aws4_request":
            raise BedrockError(
                "IncompleteSignatureException",
                403,
                "Credential must have exactly 5 slash-delimited elements, e.g. keyid/date/region/service/term, got "
                f"'{authorization['credential']}'",
            )
        access_key_id, scope_date, region, service, _ = scope
        credential = self._credentials.get(access_key_id)
        if credential is None:
            raise BedrockError("UnrecognizedClientException", 403, UNKNOWN_KEY)
        if service != SIGNING_NAME:
            raise _invalid_signature(WRONG_SERVICE)
        if credential.region not in (None, region):
            raise _invalid_signature(WRONG_REGION)
        signed_at = self._signing_time(request.headers.get("X-Amz-Date"))
        if scope_date != signed_at.strftime("%Y%m%d"):
            raise _invalid_signature(
                "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: "
                f"'{scope_date}' != '{signed_at:%Y%m%d}', from '{signed_at.strftime(SIGV4_TIMESTAMP)}'."
            )
        self._check_clock(signed_at)
        signed_names = authorization["signed"].split(";")
        if "host" not in signed_names:
            raise _invalid_signature("'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization.")
        declared_hash = request.headers.get("X-Amz-Content-SHA256")
        if declared_hash is not None and declared_hash != hashlib.sha256(body).hexdigest():
            raise _invalid_signature("The provided 'x-amz-content-sha256' header does not match what was computed.")
        # The request again, as the signer saw it: its signed headers only (botocore signs all it is given).
        signed = AWSRequest(
            method=request.method,
            url=f"http://{request.host}{request.raw_path}",
            headers={name: ",".join(request.headers.getall(name)) for name in signed_names if name in request.headers},
            data=body,
        )
        signed.context["timestamp"] = signed_at.strftime(SIGV4_TIMESTAMP)
        signer = SigV4Auth(Credentials(access_key_id, credential.secret), service, region)
        canonical_request = signer.canonical_request(signed)
        string_to_sign = signer.string_to_sign(signed, canonical_request)
        if not hmac.compare_digest(signer.signature(string_to_sign, signed), authorization["signature"]):
            raise _invalid_signature(
                f"{SIGNATURE_MISMATCH}\n\nThe Canonical String for this request should have been\n"
                f"'{canonical_request}'\n\nThe String-to-Sign should have been\n'{string_to_sign}'\n"
            )
        return access_key_id, region

    @staticmethod
    def _signing_time(value: str | None) -> datetime:
        if value is None:
            raise BedrockError(
                "IncompleteSignatureException",
                403,
                "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header.",
            )
        try:
            return datetime.strptime(value, SIGV4_TIMESTAMP).replace(tzinfo=UTC)
        except ValueError:
            raise BedrockError(
                "IncompleteSignatureException",
                403,
                f"Date must be in ISO-8601 'basic format'. Got '{value}'. See http://en.wikipedia.org/wiki/ISO_8601",
            ) from None

    def _check_clock(self, signed_at: datetime) -> None:
        now = datetime.now(UTC) + timedelta(seconds=self.clock_offset)
        if signed_at < now - MAX_SKEW:
            raise _invalid_signature(
                f"Signature expired: {signed_at.strftime(SIGV4_TIMESTAMP)} is now earlier than "
                f"{(now - MAX_SKEW).strftime(SIGV4_TIMESTAMP)} ({now.strftime(SIGV4_TIMESTAMP)} - 5 min.)"
            )
        if signed_at > now + MAX_SKEW:
            raise _invalid_signature(
                f"Signature not yet current: {signed_at.strftime(SIGV4_TIMESTAMP)} is still later than "
                f"{(now + MAX_SKEW).strftime(SIGV4_TIMESTAMP)} ({now.strftime(SIGV4_TIMESTAMP)} + 5 min.)"
            )

    # -- the runtime -----------------------------------------------------------------------------------------------

    def _model(self, model_id: str, access_key_id: str) -> str:
        """The Anthropic name of the model an invocation names, refused as Bedrock refuses it."""
        foundation_id = foundation_model_id(model_id)
        if foundation_id not in CATALOGUE:
            raise BedrockError("ValidationException", 400, INVALID_MODEL)
        name, profile_only = CATALOGUE[foundation_id]
        if profile_only and model_id == foundation_id:
            raise BedrockError("ValidationException", 400, NEEDS_PROFILE.format(model_id))
        if foundation_id not in self._credentials[access_key_id].models:
            raise BedrockError("AccessDeniedException", 403, NO_MODEL_ACCESS)
        return name

    @staticmethod
    def _payload(body: bytes) -> dict[str, Any]:
        """The invocation body, validated as Bedrock's schema for Claude validates it."""
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            raise BedrockError("ValidationException", 400, MALFORMED.format("#: expected type: JSONObject"))
        problems = [] if "anthropic_version" in payload else ["#: required key [anthropic_version] not found"]
        problems += [f"#: extraneous key [{key}] is not permitted" for key in ("model", "stream") if key in payload]
        if "anthropic_beta" in payload and not isinstance(payload["anthropic_beta"], list):
            problems.append(
                f"#/anthropic_beta: expected type: JSONArray, found: {type(payload['anthropic_beta']).__name__}"
            )
        if problems:
            raise BedrockError("ValidationException", 400, MALFORMED.format("".join(problems)))
        return payload

    async def _invoke(self, request: web.Request) -> web.StreamResponse:
        """`InvokeModel` and `InvokeModelWithResponseStream`, answered by the fake upstream."""
        access_key_id, record = request[ACCESS_KEY_ID], request[RECORD]
        stream = request.path.endswith("/invoke-with-response-stream")
        name = self._model(request.match_info["model_id"], access_key_id)
        payload = self._payload(record.body)
        if payload.get("messages") == []:  # the key checker's probe: refused before the model runs
            await self._refusal(request)
            raise BedrockError("ValidationException", 400, MALFORMED.format(NO_MESSAGES))
        betas = payload.pop("anthropic_beta", [])
        del payload["anthropic_version"]
        headers = {"x-api-key": access_key_id, "anthropic-version": DEFAULT_ANTHROPIC_VERSION}
        if betas:
            headers["anthropic-beta"] = ",".join(map(str, betas))
        upstream_body = {"model": name, **payload} | ({"stream": True} if stream else {})
        started = time.monotonic()
        assert self._session is not None
        async with self._session.post(
            f"{self.anthropic_fake_url}/v1/messages", json=upstream_body, headers=headers
        ) as answer:
            if answer.status >= 400:
                record.upstream_answer = await answer.read()
                raise _from_upstream(answer.status, record.upstream_answer)
            if stream:
                return await self._stream(request, answer, record, started)
            record.upstream_answer = await answer.read()
        usage = json.loads(record.upstream_answer).get("usage", {})
        return web.Response(
            body=record.upstream_answer,
            content_type="application/json",
            headers={
                "x-amzn-RequestId": str(uuid.uuid4()),
                "X-Amzn-Bedrock-Invocation-Latency": str(int((time.monotonic() - started) * 1000)),
                "X-Amzn-Bedrock-Input-Token-Count": str(usage.get("input_tokens", 0)),
                "X-Amzn-Bedrock-Output-Token-Count": str(usage.get("output_tokens", 0)),
                "X-Amzn-Bedrock-Cache-Read-Input-Token-Count": str(usage.get("cache_read_input_tokens", 0)),
                "X-Amzn-Bedrock-Cache-Write-Input-Token-Count": str(usage.get("cache_creation_input_tokens", 0)),
            },
        )

    async def _stream(
        self, request: web.Request, answer: aiohttp.ClientResponse, record: BedrockRecord, started: float
    ) -> web.StreamResponse:
        """The upstream's SSE as an event stream: a chunk per event, the metrics on the last; an exception frame if
        the upstream's stream breaks."""
        response = web.StreamResponse(
            headers={
                "Content-Type": "application/vnd.amazon.eventstream",
                "x-amzn-RequestId": str(uuid.uuid4()),
                "X-Amzn-Bedrock-Content-Type": "application/json",
            }
        )
        response.enable_chunked_encoding()
        await response.prepare(request)
        parser, received, first_byte = sse.Parser(), bytearray(), None
        usage: dict[str, Any] = {}
        try:
            try:
                async for piece in answer.content.iter_any():
                    first_byte = first_byte or time.monotonic()
                    received += piece
                    for event in parser.feed(piece):
                        data = json.loads(event.data)
                        if event.event == "message_start":
                            usage |= data["message"]["usage"]
                        elif event.event == "message_delta":
                            usage |= data.get("usage", {})
                        elif event.event == "message_stop":
                            data[INVOCATION_METRICS] = {
                                "inputTokenCount": usage.get("input_tokens", 0),
                                "outputTokenCount": usage.get("output_tokens", 0),
                                "invocationLatency": int((time.monotonic() - started) * 1000),
                                "firstByteLatency": int((first_byte - started) * 1000),
                                "cacheReadInputTokenCount": usage.get("cache_read_input_tokens", 0),
                                "cacheWriteInputTokenCount": usage.get("cache_creation_input_tokens", 0),
                            }
                        await response.write(chunk_frame(data))
                record.stream_ending = "completed"
            except aiohttp.ClientError:  # the upstream's stream broke off
                await response.write(exception_frame("modelStreamErrorException", STREAM_BROKE))
                record.stream_ending = "aborted"
            await response.write_eof()
        except ConnectionResetError:  # the client left
            record.stream_ending = "cancelled"
        except asyncio.CancelledError:
            record.stream_ending = "cancelled"
            raise
        finally:
            record.upstream_answer = bytes(received)
        return response

    # -- the control plane -----------------------------------------------------------------------------------------

    async def _refusal(self, request: web.Request) -> None:
        """The fake upstream's say on the key (markers, overrides), as for an invocation: BedrockError if it refuses."""
        assert self._session is not None
        headers = {"x-api-key": request[ACCESS_KEY_ID], "anthropic-version": DEFAULT_ANTHROPIC_VERSION}
        async with self._session.get(f"{self.anthropic_fake_url}/v1/models", headers=headers) as answer:
            if answer.status >= 400:
                raise _from_upstream(answer.status, await answer.read())

    async def _foundation_models(self, request: web.Request) -> web.Response:
        """`ListFoundationModels`: the Claude models the credential may use, in the region it signed for."""
        await self._refusal(request)
        provider = request.query.get("byProvider", "anthropic").lower()
        models = sorted(self._credentials[request[ACCESS_KEY_ID]].models) if provider == "anthropic" else []
        summaries = [
            {
                "modelArn": f"arn:aws:bedrock:{request[SIGNED_REGION]}::foundation-model/{model_id}",
                "modelId": model_id,
                "providerName": "Anthropic",
                "inputModalities": ["TEXT", "IMAGE"],
                "outputModalities": ["TEXT"],
                "responseStreamingSupported": True,
                "customizationsSupported": [],
                "inferenceTypesSupported": ["INFERENCE_PROFILE" if CATALOGUE[model_id][1] else "ON_DEMAND"],
                "modelLifecycle": {"status": "ACTIVE"},
            }
            for model_id in models
        ]
        return web.json_response({"modelSummaries": summaries}, headers={"x-amzn-RequestId": str(uuid.uuid4())})

    async def _logging_configuration(self, request: web.Request) -> web.Response:
        """`GetModelInvocationLoggingConfiguration`: no configuration, or one that logs prompts to CloudWatch."""
        await self._refusal(request)
        logging = self._credentials[request[ACCESS_KEY_ID]].logging
        body = {"loggingConfig": LOGGING_CONFIG} if logging else {}
        return web.json_response(body, headers={"x-amzn-RequestId": str(uuid.uuid4())})
