"""A fake GCP Vertex AI (Claude publisher models) with Google's OAuth2 token endpoint, verifying what it receives.

``POST /token`` serves the JWT-bearer grant as Google's token endpoint does (RFC 7523): the assertion's RS256
signature must verify with a key of a service account made by ``make_service_account``, its ``iss`` be that
account's email, ``aud`` Google's token endpoint (google-auth always sends ``https://oauth2.googleapis.com/token``,
whatever the key file's ``token_uri``; the original project sent the older ``.../oauth2/v4/token``), ``scope``
include cloud-platform, and ``iat``/``exp`` span at most an hour around now. It answers a Bearer token lasting
``token_lifetime`` seconds, or Google's OAuth2 error (``{"error": "invalid_grant", "error_description": ...}``).

``POST /v1/projects/{project}/locations/{region}/publishers/anthropic/models/{model}:rawPredict`` (and
``:streamRawPredict``) wants a token this fake issued, unexpired, to a service account of ``{project}``: else 401
UNAUTHENTICATED or 403 PERMISSION_DENIED in Google's error format (a JSON list of one error on the streaming method).
The answer comes from the fake upstream (tests/fakeupstream.py): the body, with ``model`` set to the model's
Anthropic name and without ``anthropic_version``, goes to its ``POST /v1/messages`` with the service account's email
as ``x-api-key``, so key markers in the email's local part (``svc-429@...``) and ``#fake:`` directives work. JSON
and SSE answers pass back unchanged; the upstream's errors come back as Vertex gives them: 401, 403, 404, 429 and
5xx as Google errors (429 with Vertex's quota message), a 400 in Anthropic's format as it is, as Vertex passes the
model's own refusals through. After the upstream's answer, Anthropic's checks of the Vertex body apply: no
``model`` ("Extra inputs are not permitted", as Vertex's Claude refuses any unknown field), ``anthropic_version``
present, at least one message. So Google's checks and the key's fate come first, as on Vertex, where an empty
message list reaches the model only if token, project and quota allowed it.

Every request is recorded in ``requests`` (``RecordedRequest`` of tests/fakeupstream.py; ``key`` is the bearer
token).
"""

import base64
import contextlib
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.fakes.server import FakeServer
from tests.fakeupstream import FakeUpstream, RecordedRequest, _bearer, _id

JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
GOOGLE_TOKEN_AUDIENCES = {"https://oauth2.googleapis.com/token", "https://www.googleapis.com/oauth2/v4/token"}
MAX_ASSERTION_LIFETIME = 3600  # seconds from iat to exp that Google accepts
CLOCK_SKEW = 300  # seconds an iat may lie in the future
PREDICT_PATH = re.compile(
    r"/v1/projects/(?P<project>[^/]+)/locations/(?P<region>[^/]+)"
    r"/publishers/anthropic/models/(?P<model>[^/:]+):(?P<method>rawPredict|streamRawPredict)"
)
# Google's wording (token endpoint and Vertex AI), as their answers show it.
BAD_TIMES = (
    "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. "
    "Check your iat and exp values in the JWT claim."
)
UNAUTHENTICATED = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid "
    "authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project."
)
PERMISSION_DENIED = "Permission 'aiplatform.endpoints.predict' denied on resource '{resource}' (or it may not exist)."
QUOTA_EXCEEDED = (
    "Quota exceeded for aiplatform.googleapis.com/online_prediction_requests_per_base_model with base model: "
    "anthropic-{base_model}. Please submit a quota increase request. "
    "https://cloud.google.com/vertex-ai/docs/generative-ai/quotas-genai."
)
# The fake upstream's error statuses -> Vertex's own answer (HTTP status, google.rpc.Code name, message).
UPSTREAM_ERRORS = {
    401: (401, "UNAUTHENTICATED", UNAUTHENTICATED),
    403: (403, "PERMISSION_DENIED", PERMISSION_DENIED),
    404: (404, "NOT_FOUND", "Publisher Model `{name}` not found."),
    429: (429, "RESOURCE_EXHAUSTED", QUOTA_EXCEEDED),
    500: (500, "INTERNAL", "Internal error encountered."),
    503: (503, "UNAVAILABLE", "The service is currently unavailable."),
    529: (503, "UNAVAILABLE", "The service is currently unavailable."),
}


@dataclass
class ServiceAccount:
    project_id: str
    client_email: str
    public_keys: dict[str, rsa.RSAPublicKey] = field(default_factory=dict)  # private_key_id -> its public key
    disabled: bool = False


@dataclass
class IssuedToken:
    client_email: str
    project_id: str
    expires_at: float  # time.monotonic()


class GrantRefused(Exception):
    """The token endpoint's OAuth2 error: ``error`` code and ``error_description``."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(error, description)
        self.error, self.description = error, description


def _b64url_json(part: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def _google_error(status: int, code_name: str, message: str, reason: str | None = None) -> dict:
    """Google's error body (AIP-193), with an ErrorInfo detail when a reason is given."""
    error: dict[str, Any] = {"code": status, "message": message, "status": code_name}
    if reason:
        error["details"] = [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason, "domain": "googleapis.com"}
        ]
    return {"error": error}


def _google_answer(status: int, code_name: str, message: str, stream: bool, reason: str | None = None) -> web.Response:
    """A Google error answer; on a streaming method, a JSON list of one error (as the original project found them:
    its checker reads both shapes, src/shared/key-management/gcp/checker.ts)."""
    body = _google_error(status, code_name, message, reason)
    return web.json_response([body] if stream else body, status=status)


def anthropic_name(model_id: str) -> str:
    """The Anthropic name of a Vertex model id (``claude-sonnet-4-5@20250929`` -> ``claude-sonnet-4-5-20250929``)."""
    return model_id.replace("-v2@", "-").replace("@", "-")


class FakeVertex(FakeServer):
    """The fake server; ``start()`` it on a loop, or ``start_in_thread()``."""

    def __init__(self, anthropic_fake_url: str) -> None:
        super().__init__()
        self.anthropic_fake_url = anthropic_fake_url.rstrip("/")
        self.requests: list[RecordedRequest] = []
        self.token_lifetime = 3600  # seconds the tokens issued from now on last (0: issued already expired)
        self.accounts: dict[str, ServiceAccount] = {}
        self.tokens: dict[str, IssuedToken] = {}

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._record])
        app.router.add_post("/token", self._token)
        app.router.add_route("*", "/{tail:.*}", self._predict)
        return app

    def make_session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    def reset(self) -> None:
        """Forget recorded requests; tokens last an hour again. Accounts and issued tokens stay."""
        self.requests.clear()
        self.token_lifetime = 3600

    def make_service_account(self, project_id: str, client_email: str) -> dict:
        """A new service account with a fresh RSA key, as the JSON key file Google issues for it."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        key_id = secrets.token_hex(20)
        account = self.accounts.setdefault(client_email, ServiceAccount(project_id, client_email))
        account.public_keys[key_id] = key.public_key()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return {
            "type": "service_account",
            "project_id": project_id,
            "private_key_id": key_id,
            "private_key": pem.decode(),
            "client_email": client_email,
            "client_id": str(secrets.randbelow(10**21)).rjust(21, "1"),
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": f"https://www.googleapis.com/robot/v1/metadata/x509/{quote(client_email)}",
            "universe_domain": "googleapis.com",
        }

    def disable(self, client_email: str) -> None:
        """Disable a service account: its tokens stop working and it gets no new ones."""
        self.accounts[client_email].disabled = True
        for token in [token for token, issued in self.tokens.items() if issued.client_email == client_email]:
            del self.tokens[token]

    def token_calls(self) -> int:
        """How many token requests arrived."""
        return sum(recorded.path == "/token" for recorded in self.requests)

    # -- recording -----------------------------------------------------------------

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.read()  # cached: the handler reads it again
        self.requests.append(
            RecordedRequest(
                request.method,
                request.raw_path,
                [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
                body,
                _bearer(request),
            )
        )
        return await handler(request)

    # -- Google's OAuth2 token endpoint ----------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        """``POST /token``: the JWT-bearer grant."""
        form = await request.post()
        try:
            if form.get("grant_type") != JWT_BEARER_GRANT:
                raise GrantRefused("unsupported_grant_type", f"Invalid grant_type: {form.get('grant_type')}")
            assertion = form.get("assertion")
            if not isinstance(assertion, str) or not assertion:
                raise GrantRefused("invalid_request", "Missing required parameter: assertion")
            account = self._verified_account(assertion)
        except GrantRefused as refusal:
            return web.json_response({"error": refusal.error, "error_description": refusal.description}, status=400)
        token = "ya29.fake-" + secrets.token_urlsafe(48)
        self.tokens[token] = IssuedToken(
            account.client_email, account.project_id, time.monotonic() + self.token_lifetime
        )
        return web.json_response({"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer"})

    def _verified_account(self, assertion: str) -> ServiceAccount:
        """The service account whose valid assertion this is; GrantRefused as Google words it otherwise."""
        try:
            header_part, claims_part, signature_part = assertion.split(".")
            header, claims = _b64url_json(header_part), _b64url_json(claims_part)
            signature = base64.urlsafe_b64decode(signature_part + "=" * (-len(signature_part) % 4))
        except ValueError:
            raise GrantRefused("invalid_grant", "Invalid JWT: the assertion is not a JWS.") from None
        if not isinstance(header, dict) or not isinstance(claims, dict) or header.get("alg") != "RS256":
            raise GrantRefused("invalid_grant", "Invalid JWT: the assertion is not an RS256 JWS.")
        issuer = claims.get("iss")
        account = self.accounts.get(issuer) if isinstance(issuer, str) else None
        if account is None:
            raise GrantRefused("invalid_grant", "Invalid grant: account not found")
        if account.disabled:
            raise GrantRefused("invalid_grant", "Invalid grant: account disabled")
        # A key id names the key to check with (a deleted key's id, none); without one, any of the account's keys.
        key_id = header.get("kid")
        if key_id is None:
            keys = list(account.public_keys.values())
        else:
            keys = [key for name, key in account.public_keys.items() if name == key_id]
        signed = f"{header_part}.{claims_part}".encode()
        if not any(self._signature_holds(key, signature, signed) for key in keys):
            raise GrantRefused("invalid_grant", "Invalid JWT Signature.")
        if claims.get("aud") not in GOOGLE_TOKEN_AUDIENCES:
            raise GrantRefused("invalid_grant", "Invalid JWT: Failed audience check.")
        issued, expires, now = claims.get("iat"), claims.get("exp"), time.time()
        if not (isinstance(issued, int) and isinstance(expires, int)) or not (
            0 < expires - issued <= MAX_ASSERTION_LIFETIME and issued <= now + CLOCK_SKEW and expires > now
        ):
            raise GrantRefused("invalid_grant", BAD_TIMES)
        if CLOUD_PLATFORM_SCOPE not in str(claims.get("scope", "")).split():
            raise GrantRefused("invalid_scope", "Invalid OAuth scope or ID token audience provided.")
        return account

    @staticmethod
    def _signature_holds(key: rsa.RSAPublicKey, signature: bytes, signed: bytes) -> bool:
        try:
            key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            return False
        return True

    # -- Vertex AI -----------------------------------------------------------------

    async def _predict(self, request: web.Request) -> web.StreamResponse:
        """``rawPredict`` and ``streamRawPredict`` of an Anthropic publisher model."""
        match = PREDICT_PATH.fullmatch(request.path)
        stream = match is not None and match["method"] == "streamRawPredict"
        if match is None or request.method != "POST":
            message = f"The requested URL {request.path} was not found on this server."
            return _google_answer(404, "NOT_FOUND", message, stream)
        project, region, model = match["project"], match["region"], match["model"]
        resource = (
            f"//aiplatform.googleapis.com/projects/{project}/locations/{region}/publishers/anthropic/models/{model}"
        )
        issued = self.tokens.get(_bearer(request) or "")
        if issued is None or time.monotonic() >= issued.expires_at:
            reason = "ACCESS_TOKEN_EXPIRED" if issued else None
            return _google_answer(401, "UNAUTHENTICATED", UNAUTHENTICATED, stream, reason)
        if issued.project_id != project:
            message = PERMISSION_DENIED.format(resource=resource)
            return _google_answer(403, "PERMISSION_DENIED", message, stream, "IAM_PERMISSION_DENIED")
        try:
            payload = json.loads(await request.read())
            if not isinstance(payload, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError):
            return _google_answer(400, "INVALID_ARGUMENT", "Invalid JSON payload received.", stream)
        headers = {"x-api-key": issued.client_email, "anthropic-version": "2023-06-01"}
        if beta := request.headers.get("anthropic-beta"):
            headers["anthropic-beta"] = beta
        upstream_body = {"model": anthropic_name(model)} | {
            name: value for name, value in payload.items() if name not in ("model", "anthropic_version")
        }
        assert self._session is not None
        async with self._session.post(
            f"{self.anthropic_fake_url}/v1/messages", json=upstream_body, headers=headers
        ) as upstream:
            if upstream.status >= 400:
                return self._upstream_error(upstream.status, await upstream.read(), model, resource, stream)
            if (refusal := self._anthropic_refusal(payload)) is not None:
                return web.json_response(refusal, status=400)
            content_type = upstream.headers.get("Content-Type", "application/json")
            if not content_type.startswith("text/event-stream"):
                return web.Response(body=await upstream.read(), headers={"Content-Type": content_type})
            response = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
                await FakeUpstream._abort(request)  # the upstream dropped the stream: so does Vertex
                return response
            except ConnectionResetError:  # the client left
                return response
            with contextlib.suppress(ConnectionResetError):
                await response.write_eof()
            return response

    @staticmethod
    def _upstream_error(status: int, body: bytes, model: str, resource: str, stream: bool) -> web.Response:
        """The fake upstream's error as Vertex answers it: Google's error, or the model's own 4xx as it is."""
        if status not in UPSTREAM_ERRORS and status < 500:
            return web.Response(body=body, status=status, content_type="application/json")
        vertex_status, code_name, template = UPSTREAM_ERRORS.get(status, UPSTREAM_ERRORS[500])
        name = resource.removeprefix("//aiplatform.googleapis.com/")
        message = template.format(resource=resource, name=name, base_model=model.partition("@")[0])
        return _google_answer(vertex_status, code_name, message, stream)

    @staticmethod
    def _anthropic_refusal(payload: dict) -> dict | None:
        """Anthropic's 400 for a Vertex body it refuses, as Vertex passes it through; None for a good body."""
        if "model" in payload:
            message = "model: Extra inputs are not permitted"
        elif "anthropic_version" not in payload:
            message = "anthropic_version: Field required"
        elif "messages" not in payload:
            message = "messages: Field required"
        elif payload["messages"] == []:
            message = "messages: at least one message is required"
        else:
            return None
        _, body = FakeUpstream._anthropic_error("bad_request", None, False, message)
        return body | {"request_id": _id("req_vrtx_011C")}
