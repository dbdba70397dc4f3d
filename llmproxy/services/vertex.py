"""GCP Vertex AI's Claude models: service-account credentials, OAuth2 access tokens, and the wire format.

Clients speak Anthropic's Messages API; Vertex AI serves the same models as Anthropic "publisher models" behind
`rawPredict` (a JSON answer) and `streamRawPredict` (Anthropic's own SSE stream, passed through as it is). Sources:
Anthropic, "Claude on Vertex AI" (API guide) and the anthropic SDK's Vertex client (`anthropic/lib/vertex/_client.py`):

- the URL carries the project, the region and the model; the body carries no `model`, and `anthropic_version` in
  the body instead of the `anthropic-version` header ("must be set to the value vertex-2023-10-16");
- a stream keeps `"stream": true` in the body (the SDK leaves it there and picks `streamRawPredict` by it);
- the `anthropic-beta` header is sent as a header: the SDK's Vertex client passes it on untouched (only its Bedrock
  client moves betas into the body), and Vertex reads it there (it refuses unknown values with "Unexpected value(s)
  ... for the `anthropic-beta` header", reported in anthropics/claude-code#12429 and vercel/ai#10981);
- an access token is a Bearer token from Google's OAuth2 token endpoint, for a JWT signed with the service account's
  key (google-auth's `service_account.Credentials`, scope cloud-platform).

Vertex answers errors of its own in Google's format (`{"error": {"code", "message", "status"}}`, a JSON list of such
on streaming methods), and passes the model's own refusals through in Anthropic's format (a 400
`invalid_request_error` whose request id starts `req_vrtx_`).
"""

import asyncio
import base64
import binascii
import functools
import json
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

import aiohttp
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from yarl import URL

from llmproxy import scrub
from llmproxy.api import ANTHROPIC
from llmproxy.config import ConfigError
from llmproxy.pool.keys import Verdict
from llmproxy.services.anthropic import CLAUDE_ENDPOINTS, CLOUD_MODELS, claude_families
from llmproxy.services.base import USER_AGENT, KeyCheck, Outgoing, Service, ServiceOption, UpstreamFailure

if TYPE_CHECKING:
    from llmproxy.pool.keys import PoolKey

logger = logging.getLogger(__name__)

GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
VERTEX_ANTHROPIC_VERSION = "vertex-2023-10-16"
REFRESH_MARGIN = 300.0  # seconds: a token with less validity left than this is refreshed before use
TOKEN_TIMEOUT = 30.0  # seconds for one call to the token endpoint (google-auth's own default is 120)
DEFAULT_TOKEN_LIFETIME = 3600.0  # seconds, when the token endpoint names none (Google's tokens last an hour)
# The token endpoint's OAuth2 error codes (RFC 6749 section 5.2) that mean the service account or its key can no
# longer get tokens: a deleted key or wrong signature, a disabled or deleted account. Anything else (a server error,
# an unreadable answer, invalid_scope) is no verdict on the credential.
DEAD_GRANT_ERRORS = {"invalid_grant", "invalid_client", "unauthorized_client", "access_denied"}
REFUSAL_MEMORY = 60.0  # seconds a token endpoint's refusal of a credential is answered from memory

_REGION = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")  # it becomes part of a host name, so nothing else may pass
_PEM_ARMOUR = re.compile(r"-----(?:BEGIN|END) [A-Z ]*PRIVATE KEY-----")
_KEY_FILLER = re.compile(r"\\[nr]|\s")  # JSON-escaped line ends, as copied out of the key file, and whitespace
_SECRET_SHAPES = re.compile(r"eyJ[\w-]*\.[\w-]*\.[\w-]*|ya29\.[\w.-]+")  # a signed JWT, a Google access token


class TokenError(Exception):
    """No access token: `dead` when the token endpoint refused the credential itself, else the endpoint could not
    be reached or gave no usable answer (try again later). The message names no secret."""

    def __init__(self, message: str, dead: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.dead = dead


@dataclass(frozen=True)
class GcpCredential:
    """A service account that calls Vertex AI in one project and region; `private_key` is its PEM (PKCS#8) key."""

    project_id: str
    client_email: str
    region: str
    private_key: str
    token_uri: str = GOOGLE_TOKEN_URI

    def __repr__(self) -> str:
        return (
            f"GcpCredential(project_id={self.project_id!r}, client_email={self.client_email!r}, "
            f"region={self.region!r}, token_uri={self.token_uri!r}, private_key=<hidden>)"
        )


def _private_key_pem(text: str) -> str | None:
    """The key as a PKCS#8 PEM, from a PEM (real or JSON-escaped line ends, armour lines or not) or its bare base64
    body; None when it is no unencrypted RSA key (google-auth signs service-account JWTs with RS256 only)."""
    body = _KEY_FILLER.sub("", _PEM_ARMOUR.sub("", text))
    try:
        key = serialization.load_der_private_key(base64.b64decode(body, validate=True), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm, binascii.Error):
        return None
    if not isinstance(key, rsa.RSAPrivateKey):
        return None
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return pem.decode()


def _credential(
    where: str, project_id: str, client_email: str, region: str, private_key: str, token_uri: str
) -> GcpCredential:
    """A checked credential; `where` starts each error sentence ("GCP_CREDENTIALS entry 2", a file)."""
    if not project_id:
        raise ConfigError(f"{where} has no project id.")
    if "@" not in client_email:
        raise ConfigError(f"{where} has no client email (the service account's NAME@PROJECT.iam.gserviceaccount.com).")
    if not _REGION.fullmatch(region):
        raise ConfigError(f"{where} has no valid region (such as us-east5, europe-west1 or global).")
    pem = _private_key_pem(private_key)
    if pem is None:
        raise ConfigError(f"{where} has a private key that does not load as an unencrypted RSA key.")
    return GcpCredential(project_id, client_email, region, pem, token_uri)


def parse_credentials(value: str | Sequence[str], token_uri: str | None = None) -> list[GcpCredential]:
    """`GCP_CREDENTIALS`: comma-separated `project:client_email:region:private_key` entries (or the entries already
    split), the original project's format. The key is written as the original's users write it: the PEM with its
    armour lines on one line and its line ends JSON-escaped (`\\n`, as copied from the key file), or just the base64
    body (the original strips the armour, `\\n` and line ends itself, src/shared/key-management/gcp/checker.ts)."""
    credentials = []
    entries = value.split(",") if isinstance(value, str) else value
    for position, entry in enumerate((part.strip() for part in entries), start=1):
        if not entry:
            continue
        where = f"GCP_CREDENTIALS entry {position}"
        parts = _entry_parts(entry)
        if parts is None:
            raise ConfigError(f"{where} is not of the form project:client_email:region:private_key.")
        credentials.append(_credential(where, *parts, token_uri or GOOGLE_TOKEN_URI))
    return credentials


def _entry_parts(entry: str) -> list[str] | None:
    """An entry's project, client email, region and key as written, read from the right: the key, region and email
    hold no colon, a domain-scoped project id does (example.com:p). None when one is missing."""
    parts = [part.strip() for part in entry.strip().rsplit(":", 3)]
    return parts if len(parts) == 4 and all(parts) else None


def key_spellings(written: str) -> list[str]:
    """Every way the private key written in an entry may show up in text, for the log scrubber: as written, its
    base64 body in one piece and in PEM lines, and the PEM it loads as (with real and JSON-escaped line ends).
    Lines too short to be told apart from ordinary text (a PEM's last) are left out."""
    written = written.strip()
    bodies = [_KEY_FILLER.sub("", _PEM_ARMOUR.sub("", written))]
    spellings = [written, bodies[0]]
    if (pem := _private_key_pem(written)) is not None:
        bodies.append(_KEY_FILLER.sub("", _PEM_ARMOUR.sub("", pem)))
        spellings += [pem, pem.strip(), pem.replace("\n", "\\n"), bodies[-1]]
    for body in bodies:
        spellings += [line for start in range(0, len(body), 64) if len(line := body[start : start + 64]) >= 16]
    return list(dict.fromkeys(spelling for spelling in spellings if spelling))


def credential_from_file(path: str | Path, region: str, token_uri: str | None = None) -> GcpCredential:
    """A service account's JSON key file as Google issues it, used in `region`; `token_uri` overrides the file's."""
    where = f"The service account key file {path}"
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{where} cannot be read: {error.strerror}.") from None
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"{where} is not JSON.") from None
    if not isinstance(info, dict) or info.get("type") != "service_account":
        raise ConfigError(f"{where} is not a service account key (its type must be service_account).")
    fields = [info.get(name) for name in ("project_id", "client_email", "private_key")]
    if not all(isinstance(field, str) for field in fields):
        raise ConfigError(f"{where} lacks project_id, client_email or private_key.")
    project_id, client_email, private_key = fields
    uri = token_uri or info.get("token_uri") or GOOGLE_TOKEN_URI
    return _credential(where, project_id, client_email, region, private_key, uri)


class TokenSource:
    """Access tokens for one credential, from google-auth's service-account credentials.

    `token()` answers from the current token while it has more than REFRESH_MARGIN left, else refreshes it in a
    thread (google-auth's refresh blocks); concurrent callers share one refresh. The token endpoint's refusal of the
    credential as dead is answered from memory for REFUSAL_MEMORY seconds, so that requests that meet a dead
    credential until it retires do not each wait for the endpoint's word again. google-auth's `requests` transport
    is the one that needs nothing installed beyond the proxy's own dependencies: requests comes with tiktoken, while
    the `urllib3` transport also imports `packaging`, which nothing at run time installs.
    """

    def __init__(self, credential: GcpCredential) -> None:
        # google-auth is imported where it is used: 6 MB of memory that a proxy without GCP credentials never needs.
        import google.auth.transport.requests

        self.credential = credential
        self._http = google.auth.transport.requests.Request()  # one connection pool for this credential's refreshes
        self._google = None  # google-auth's service-account credentials, made in the refresh thread (loads the key)
        self._token: str | None = None
        self._fresh_until = 0.0  # time.monotonic() when the token gets within REFRESH_MARGIN of its expiry
        self._refresh: asyncio.Future[str] | None = None
        self._refused: tuple[float, str] | None = None  # until when (monotonic) a dead refusal stands, its message

    async def token(self) -> str:
        """A valid access token; TokenError when none can be had."""
        if self._token is not None and time.monotonic() < self._fresh_until:
            return self._token
        if self._refused is not None and time.monotonic() < self._refused[0]:
            raise TokenError(self._refused[1], dead=True)
        if self._refresh is None:
            self._refresh = asyncio.ensure_future(self._refreshed())
        # Shielded: a caller that gives up does not cancel the refresh the others wait for.
        return await asyncio.shield(self._refresh)

    def invalidate(self, token: str | None = None) -> None:
        """Forgets the token (only if it still is `token`, when given: a 401 to an older one says nothing about a
        newer one), and a remembered refusal, so that the next `token()` asks the token endpoint."""
        if token is None or token == self._token:
            self._token = None
        self._refused = None

    async def _refreshed(self) -> str:
        try:
            token, lifetime = await asyncio.to_thread(self._fetch)
        except TokenError as error:
            if error.dead:
                self._refused = (time.monotonic() + REFUSAL_MEMORY, error.message)
            raise
        finally:
            self._refresh = None
        self._token, self._fresh_until = token, time.monotonic() + lifetime - REFRESH_MARGIN
        self._refused = None
        return token

    def _fetch(self) -> tuple[str, float]:
        """A new token and its seconds of validity (blocking)."""
        import google.auth.exceptions
        from google.oauth2 import service_account

        credential = self.credential
        try:
            if self._google is None:
                self._google = service_account.Credentials.from_service_account_info(
                    {
                        "project_id": credential.project_id,
                        "client_email": credential.client_email,
                        "private_key": credential.private_key,
                        "token_uri": credential.token_uri,
                    },
                    scopes=[CLOUD_PLATFORM_SCOPE],
                )
            self._google.refresh(functools.partial(self._http, timeout=TOKEN_TIMEOUT))
        except google.auth.exceptions.RefreshError as error:
            raise _refusal(credential, error) from None
        except google.auth.exceptions.TransportError as error:
            cause = type(error.__cause__ or error).__name__
            host = urlsplit(credential.token_uri).netloc
            raise TokenError(f"The token endpoint {host} is unreachable ({cause}).") from None
        expiry = self._google.expiry  # naive UTC, as google-auth keeps it
        lifetime = (expiry - datetime.now(UTC).replace(tzinfo=None)).total_seconds() if expiry else None
        return self._google.token, DEFAULT_TOKEN_LIFETIME if lifetime is None else lifetime


def _refusal(credential: GcpCredential, error: Exception) -> TokenError:
    """The token endpoint's answer (google-auth's RefreshError) as a TokenError: its OAuth2 error code decides whether
    the credential is dead."""
    data = error.args[1] if len(error.args) > 1 and isinstance(error.args[1], dict) else {}
    code, description = data.get("error"), data.get("error_description")
    if not isinstance(code, str):
        host = urlsplit(credential.token_uri).netloc
        return TokenError(f"The token endpoint {host} gave no token for {credential.client_email} and no reason.")
    detail = f" ({_SECRET_SHAPES.sub('[redacted]', description)[:200]})" if isinstance(description, str) else ""
    if code in DEAD_GRANT_ERRORS:
        return TokenError(f"The token endpoint refused {credential.client_email}: {code}{detail}.", dead=True)
    return TokenError(f"The token endpoint gave no token for {credential.client_email}: {code}{detail}.")


# Anthropic model names -> Vertex AI model ids. Sources: Anthropic, "Claude on Vertex AI" (its model id table) and
# Google, "Request predictions with Claude models": Vertex writes the snapshot date after an @, Claude 3.5 Sonnet's
# second version is `-v2`, and the 4.6 models carry no date on either side.
VERTEX_MODELS = {
    "claude-opus-4-6": "claude-opus-4-6",
    "claude-sonnet-4-6": "claude-sonnet-4-6",
    "claude-opus-4-5-20251101": "claude-opus-4-5@20251101",
    "claude-haiku-4-5-20251001": "claude-haiku-4-5@20251001",
    "claude-sonnet-4-5-20250929": "claude-sonnet-4-5@20250929",
    "claude-opus-4-1-20250805": "claude-opus-4-1@20250805",
    "claude-opus-4-20250514": "claude-opus-4@20250514",
    "claude-sonnet-4-20250514": "claude-sonnet-4@20250514",
    "claude-3-7-sonnet-20250219": "claude-3-7-sonnet@20250219",
    "claude-3-5-haiku-20241022": "claude-3-5-haiku@20241022",
    "claude-3-5-sonnet-20241022": "claude-3-5-sonnet-v2@20241022",
    "claude-3-5-sonnet-20240620": "claude-3-5-sonnet@20240620",
    "claude-3-opus-20240229": "claude-3-opus@20240229",
    "claude-3-haiku-20240307": "claude-3-haiku@20240307",
}
# Anthropic's aliases, each naming its current snapshot (Anthropic, "Models overview").
MODEL_ALIASES = {
    "claude-opus-4-5": "claude-opus-4-5-20251101",
    "claude-haiku-4-5": "claude-haiku-4-5-20251001",
    "claude-sonnet-4-5": "claude-sonnet-4-5-20250929",
    "claude-opus-4-1": "claude-opus-4-1-20250805",
    "claude-opus-4-0": "claude-opus-4-20250514",
    "claude-sonnet-4-0": "claude-sonnet-4-20250514",
    "claude-3-7-sonnet-latest": "claude-3-7-sonnet-20250219",
    "claude-3-5-haiku-latest": "claude-3-5-haiku-20241022",
    "claude-3-5-sonnet-latest": "claude-3-5-sonnet-20241022",
    "claude-3-opus-latest": "claude-3-opus-20240229",
}
_VERTEX_ID = re.compile(r"claude-[a-z0-9]+(?:-[a-z0-9]+)*@\d{8}")
_DATED_NAME = re.compile(r"(claude-[a-z0-9]+(?:-[a-z0-9]+)*)-(\d{8})")
_UNDATED_NAME = re.compile(r"claude-[a-z0-9]+(?:-[a-z0-9]+)*")


def vertex_model_id(model: str) -> str | None:
    """The Vertex AI id of a Claude model a client names (an Anthropic name or alias, or a Vertex id as it is);
    None for a name that is no Claude model. Names newer than the table follow Vertex's rules: a dated name gets its
    date after an @, an undated one (as from Claude 4.6 on) is the same on Vertex."""
    model = MODEL_ALIASES.get(model, model)
    if (known := VERTEX_MODELS.get(model)) is not None:
        return known
    if _VERTEX_ID.fullmatch(model):
        return model
    if dated := _DATED_NAME.fullmatch(model):
        return f"{dated[1]}@{dated[2]}"
    return model if _UNDATED_NAME.fullmatch(model) else None


def _vertex_host(region: str) -> str:
    """The region's Vertex AI endpoint, as the anthropic SDK's Vertex client picks it (global and the multi-regions
    have their own hosts)."""
    if region == "global":
        return "https://aiplatform.googleapis.com"
    if region in ("us", "eu"):
        return f"https://aiplatform.{region}.rep.googleapis.com"
    return f"https://{region}-aiplatform.googleapis.com"


def _segment(value: str) -> str:
    return quote(value, safe="@:")  # path-segment characters stay; no value can add a segment or a query


def predict_request(
    credential: GcpCredential,
    token: str,
    model_id: str,
    body: bytes | dict,
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
    stream: bool,
    endpoint: str | None = None,
) -> tuple[str, list[tuple[str, str]], bytes]:
    """The Vertex AI request for a client's Anthropic Messages request: URL, headers, body.

    `body` is the client's (as bytes, or already read: it is not changed); `headers` are the client's, a mapping or
    (name, value) pairs (only `anthropic-beta` is passed on); `endpoint` replaces the region's
    `https://...googleapis.com` (scheme and host, the path follows). ValueError if `body` is no JSON object.
    """
    payload = dict(body) if isinstance(body, dict) else _json(body)
    if not isinstance(payload, dict):
        raise ValueError("an Anthropic Messages request body is a JSON object")
    payload.pop("model", None)
    payload.setdefault("anthropic_version", VERTEX_ANTHROPIC_VERSION)
    if stream:
        payload["stream"] = True
    else:
        payload.pop("stream", None)
    method = "streamRawPredict" if stream else "rawPredict"
    base = (endpoint or _vertex_host(credential.region)).rstrip("/")
    project, region = _segment(credential.project_id), _segment(credential.region)
    url = f"{base}/v1/projects/{project}/locations/{region}/publishers/anthropic/models/{_segment(model_id)}:{method}"
    out = [("authorization", f"Bearer {token}"), ("content-type", "application/json")]
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    if betas := [value for name, value in pairs if name.lower() == "anthropic-beta"]:
        out.append(("anthropic-beta", ",".join(betas)))
    return url, out, json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass(frozen=True)
class _GoogleStatus:
    http_status: int  # the status of the Anthropic error the client gets
    anthropic_type: str
    verdict: str  # what the answer says about the credential (see key_verdict)


# google.rpc.Code names (the `status` of Google's error body), as Anthropic errors and as verdicts on the key.
# Sources: Google, "AIP-193 Errors" and google/rpc/code.proto (code <-> HTTP status); Anthropic, "Errors".
GOOGLE_STATUSES = {
    "INVALID_ARGUMENT": _GoogleStatus(400, "invalid_request_error", "client_error"),
    "FAILED_PRECONDITION": _GoogleStatus(400, "invalid_request_error", "client_error"),
    "OUT_OF_RANGE": _GoogleStatus(400, "invalid_request_error", "client_error"),
    "UNAUTHENTICATED": _GoogleStatus(401, "authentication_error", "revoked"),
    # A service account without the Vertex AI User role, a project without the Vertex AI API, a model not enabled
    # for the project: Google's status does not tell them apart. Taken as this model being refused to this
    # credential, like Anthropic's 403 (the pool forbids the model's family; a credential refused every family is
    # useless all the same).
    "PERMISSION_DENIED": _GoogleStatus(403, "permission_error", "forbidden"),
    "NOT_FOUND": _GoogleStatus(404, "not_found_error", "client_error"),
    "RESOURCE_EXHAUSTED": _GoogleStatus(429, "rate_limit_error", "rate_limited"),
    "INTERNAL": _GoogleStatus(500, "api_error", "server_error"),
    "UNKNOWN": _GoogleStatus(500, "api_error", "server_error"),
    "UNAVAILABLE": _GoogleStatus(529, "overloaded_error", "server_error"),  # Anthropic's status for overloaded
    "DEADLINE_EXCEEDED": _GoogleStatus(504, "timeout_error", "server_error"),
}
# The Anthropic error type of an HTTP status, for a Google error without a known `status`.
_ANTHROPIC_TYPES = {google.http_status: google.anthropic_type for google in GOOGLE_STATUSES.values()}


def _json(body: bytes) -> object:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _is_anthropic_error(payload: object) -> bool:
    return isinstance(payload, dict) and payload.get("type") == "error" and isinstance(payload.get("error"), dict)


def _google_error(payload: object) -> dict:
    """The `error` object of Google's error body, or of the first in a list of them (streaming methods); {} if none."""
    if isinstance(payload, list) and payload:
        payload = payload[0]
    error = payload.get("error") if isinstance(payload, dict) else None
    return error if isinstance(error, dict) else {}


def _google_status(error: dict) -> _GoogleStatus | None:
    status = error.get("status")
    return GOOGLE_STATUSES.get(status) if isinstance(status, str) else None


def anthropic_error(status: int, body: bytes) -> tuple[int, bytes]:
    """A Vertex AI error answer as the Anthropic error a client expects: status and body. A body already in
    Anthropic's format (the model's own refusals, which Vertex passes through) stays as it is."""
    payload = _json(body)
    if _is_anthropic_error(payload):
        return status, body
    error = _google_error(payload)
    message = error.get("message")
    if not isinstance(message, str) or not message:
        message = f"Vertex AI answered HTTP {status}."
    if (google_status := _google_status(error)) is not None:
        status, error_type = google_status.http_status, google_status.anthropic_type
    else:
        error_type = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return status, json.dumps({"type": "error", "error": {"type": error_type, "message": message}}).encode()


def key_verdict(status: int, body: bytes) -> str:
    """What a Vertex AI answer says about the credential that got it: "success", "rate_limited", "revoked" (the
    token was refused: invalidate it and retry once; a credential the token endpoint then refuses is dead),
    "forbidden" (this model is refused to this credential), "server_error" or "client_error". Read from the status
    and Google's `status` field only, never from message text, which may echo the request."""
    if status < 300:
        return "success"
    google_status = _google_status(_google_error(_json(body)))
    if google_status is not None:
        return google_status.verdict
    if status == 401:
        return "revoked"
    if status == 403:
        return "forbidden"
    if status in (429, 529):  # 529: Anthropic's overloaded, passed through; the pool cools the key down for it
        return "rate_limited"
    return "server_error" if status >= 500 else "client_error"


def check_request(
    credential: GcpCredential, token: str, model_id: str, endpoint: str | None = None
) -> tuple[str, list[tuple[str, str]], bytes]:
    """A request that proves, at no cost, that the credential may call `model_id`: a `rawPredict` with no messages.

    Getting `token` proved the key. This probe passes every check Google makes (the token, the project's API and
    IAM role, the model's availability in the region, quota) before the model itself refuses the empty message
    list with a 400 in Anthropic's format, so nothing is generated or billed. It is the same path as real traffic,
    which the free `count-tokens` endpoint is not: that is a different model id, served in fewer regions. Read the
    answer with `check_verdict`.
    """
    body = json.dumps({"messages": [], "max_tokens": 1}).encode()
    return predict_request(credential, token, model_id, body, {}, stream=False, endpoint=endpoint)


def check_verdict(status: int, body: bytes) -> str:
    """What the answer to `check_request` means: "success" for the model's own 400 (Anthropic's format) or a 2xx;
    "forbidden" for Google's 403 PERMISSION_DENIED or 404 NOT_FOUND (the model is not enabled or not served for this
    project and region); "revoked" for 401; "rate_limited" for 429 (the credential works, its quota is spent);
    "server_error", or "client_error" for Google's own 400 (a setting of the project, such as a precondition)."""
    if status < 300 or (status == 400 and _is_anthropic_error(_json(body))):
        return "success"
    if status == 404:
        return "forbidden"
    return key_verdict(status, body)


# -- The service ---------------------------------------------------------------------------------------------------
DEFAULT_URL = "https://aiplatform.googleapis.com"  # stands for each credential's region's endpoint
CHECK_TIMEOUT = 60.0  # seconds for one of the key checker's requests (the shared session sets no total)
# What the wire layer's verdicts mean to the pool.
VERDICTS = {
    "success": Verdict.SUCCESS,
    "rate_limited": Verdict.RATE_LIMITED,
    "revoked": Verdict.REVOKED,
    "forbidden": Verdict.FAMILY_FORBIDDEN,
    "server_error": Verdict.SERVER_ERROR,
    "client_error": Verdict.CLIENT_ERROR,
}
# What Vertex's error messages name of the owner's account, besides secrets: service account emails and project ids
# (`Permission ... denied on resource '//aiplatform.googleapis.com/projects/<project>/...'`).
_ACCOUNT_SHAPES = re.compile(r"[\w.+-]+@[\w-]+\.iam\.gserviceaccount\.com|(?<=projects/)[^/\s'\"`\\]+")
# The token source and the token of this task's latest attempt: `verdict`, which is told no key, forgets a token that
# Vertex refused. A request's attempts run one after the other in its own task, `prepare` then `verdict`.
_LAST_ATTEMPT: ContextVar[tuple[TokenSource, str] | None] = ContextVar("vertex_last_attempt", default=None)


def _scrubbed(body: bytes) -> bytes:
    """An error body for the client, without access tokens, signed JWTs, service account emails or project ids."""
    text = body.decode("utf-8", errors="replace")
    return _ACCOUNT_SHAPES.sub(scrub.REDACTED, _SECRET_SHAPES.sub(scrub.REDACTED, text)).encode()


class Vertex(Service):
    """GCP Vertex AI's Claude models, for clients of Anthropic's Messages API (and its OpenAI-format twin) under
    `/proxy/gcp/claude/v1/...`, with `GCP_CREDENTIALS`.

    Each credential is a service account in a project and region. Its access tokens come from Google's token
    endpoint (`gcp_token_url`), one `TokenSource` per credential, made when the key is first used and reused until
    shortly before they expire; a token Vertex refuses (401) is forgotten, so that the next attempt gets a new one.
    The key checker asks for a token first (a credential the endpoint refuses as dead retires), then sends each
    listed model (`models`) a request with no messages, which the model refuses at no cost once Google let it
    through: the families of the models Google refuses (403, 404) are the ones the credential does not serve.
    """

    name = "gcp"
    path_prefix = "/claude"
    title = "GCP Vertex AI (Claude)"
    dialect = ANTHROPIC
    key_setting = "gcp_credentials"
    key_prefix = "gcp"
    default_url = DEFAULT_URL
    endpoints = CLAUDE_ENDPOINTS
    families = claude_families("gcp-")
    models = CLOUD_MODELS
    price_fallback = "anthropic"
    options = (
        ServiceOption(
            "gcp_token_url",
            str,
            GOOGLE_TOKEN_URI,
            "Google's OAuth2 token endpoint, where the GCP_CREDENTIALS service accounts get their access tokens.",
        ),
    )

    def __init__(self) -> None:
        self.token_url = GOOGLE_TOKEN_URI
        self._sources: dict[str, TokenSource] = {}  # key id -> the token source of its credential

    def configure(self, values: Mapping[str, object]) -> None:
        if "gcp_token_url" in values:
            url = str(values["gcp_token_url"] or "").strip() or GOOGLE_TOKEN_URI
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ConfigError("GCP_TOKEN_URL must be an http:// or https:// URL.")
            if url != self.token_url:
                self.token_url = url
                self._sources.clear()  # tokens from the new endpoint from now on

    # -- keys ---------------------------------------------------------------------------------------------------

    def parse_keys(self, values: list[str]) -> list[str]:
        """Each entry checked (its key loads); the whole entry is the pool key's secret."""
        parse_credentials(values)
        return [value.strip() for value in values if value.strip()]

    def secret_parts(self, key: str) -> list[str]:
        parts = _entry_parts(key)
        return [key] if parts is None else key_spellings(parts[3])

    def token_source(self, key: "PoolKey") -> TokenSource:
        """The token source of the key's credential, made on first use."""
        source = self._sources.get(key.id)
        if source is None:
            [credential] = parse_credentials([key.secret], self.token_url)
            source = self._sources[key.id] = TokenSource(credential)
        return source

    def _endpoint(self, base: URL) -> str | None:
        """The endpoint of every region, or None for each credential's region's own (the default URL)."""
        url = str(base).rstrip("/")
        return None if url == DEFAULT_URL else url

    # -- requests -----------------------------------------------------------------------------------------------

    async def prepare(self, request, route, key, base: URL) -> Outgoing:
        payload = _json(request.body)
        if not isinstance(payload, dict):
            raise UpstreamFailure(400, "invalid_request", "The request body must be a JSON object.")
        model = payload.get("model")
        model_id = vertex_model_id(model) if isinstance(model, str) else None
        if model_id is None:
            named = f"no Claude model named {model[:100]!r}" if isinstance(model, str) else "no model the request names"
            raise UpstreamFailure(400, "model_not_available", f"GCP Vertex AI serves {named}.")
        source = self.token_source(key)
        try:
            token = await source.token()
        except TokenError as error:
            logger.warning("key %s gets no access token: %s", key.id, error.message)
            if error.dead:
                message = "Google refused one of the proxy's GCP credentials an access token; try again shortly."
                raise UpstreamFailure(502, "upstream_credential_refused", message, Verdict.REVOKED) from None
            message = "The proxy could not get an access token from Google; try again shortly."
            raise UpstreamFailure(502, "upstream_token_unavailable", message) from None
        _LAST_ATTEMPT.set((source, token))
        stream = payload.get("stream") is True
        url, headers, body = predict_request(
            source.credential, token, model_id, payload, request.headers, stream, self._endpoint(base)
        )
        # Streams pass as they come: no compressed answers (aiohttp would ask for them).
        return Outgoing(url, [*headers, ("accept-encoding", "identity")], body)

    def verdict(self, status: int, headers: Mapping[str, str], body: bytes) -> Verdict:
        verdict = VERDICTS[key_verdict(status, body)]
        if verdict is Verdict.REVOKED and (attempt := _LAST_ATTEMPT.get()) is not None:
            source, token = attempt
            source.invalidate(token)  # the next attempt with this credential gets a new token
        return verdict

    def client_error(self, status: int, headers: Mapping[str, str], body: bytes) -> tuple[int, bytes]:
        status, body = anthropic_error(status, body)
        return status, _scrubbed(body)

    # -- the key checker ----------------------------------------------------------------------------------------

    async def check(self, key, session, base: URL) -> KeyCheck:
        """A token, then each listed model's check request: the credential works if Google let one through."""
        source = self.token_source(key)
        try:
            await self._checker_token(source)
        except TokenError as error:  # dead
            return KeyCheck(401, Verdict.REVOKED, reason=error.message)
        results: list[tuple[str, int, str]] = []
        for model in self.models:
            if (model_id := vertex_model_id(model)) is None:
                continue
            try:
                status, verdict = await self._check_call(source, model_id, session, base)
            except TokenError as error:
                return KeyCheck(401, Verdict.REVOKED, reason=error.message)
            if verdict == "revoked":
                reason = f"Vertex AI refused a new access token of {source.credential.client_email} ({status})"
                return KeyCheck(status, Verdict.REVOKED, reason=reason)
            results.append((model, status, verdict))
        if not results:  # no model to ask about: the token is all there is to know
            return KeyCheck(200, Verdict.SUCCESS, reason="the key check got an access token")
        summary = ", ".join(f"{model} {status}" for model, status, _ in results)
        if proven := [status for _, status, verdict in results if verdict in ("success", "rate_limited")]:
            # Only Google's refusal rules a model out; a server error or an odd answer says nothing about it.
            usable = [model for model, _, verdict in results if verdict != "forbidden"]
            return KeyCheck(proven[0], Verdict.SUCCESS, usable, reason=f"the key check got {summary}")
        _, status, verdict = next((result for result in results if result[2] != "forbidden"), results[0])
        return KeyCheck(status, VERDICTS[verdict], reason=f"the key check got {summary}")

    async def probe(self, key, model: str, session, base: URL) -> tuple[int, Verdict]:
        """The check request for the suspect's model, with no client input: the model refuses it to a working key."""
        if (model_id := vertex_model_id(model)) is None:
            return 400, Verdict.CLIENT_ERROR  # no Vertex model: no verdict on the key
        source = self.token_source(key)
        try:
            status, verdict = await self._check_call(source, model_id, session, base)
        except TokenError as error:  # dead
            logger.info("key %s: %s", key.id, error.message)
            return 401, Verdict.REVOKED
        return status, VERDICTS[verdict]

    async def _checker_token(self, source: TokenSource) -> str:
        """A token for the checker: TokenError only for a dead credential; an unreachable token endpoint is the
        network trouble the checker tries again later."""
        try:
            return await source.token()
        except TokenError as error:
            if error.dead:
                raise
            raise aiohttp.ClientConnectionError(error.message) from None

    async def _check_call(self, source: TokenSource, model_id: str, session, base: URL) -> tuple[int, str]:
        """The check request for `model_id`: its status and `check_verdict`. A refused token is replaced by a new
        one once: a credential whose new token is refused too is revoked."""
        endpoint = self._endpoint(base)

        async def send(token: str) -> tuple[int, str]:
            url, headers, body = check_request(source.credential, token, model_id, endpoint)
            headers += [("user-agent", USER_AGENT), ("accept-encoding", "identity")]
            timeout = aiohttp.ClientTimeout(total=CHECK_TIMEOUT)
            async with session.post(URL(url, encoded=True), data=body, headers=headers, timeout=timeout) as response:
                status, answer = response.status, await response.read()
            return status, check_verdict(status, answer)

        token = await self._checker_token(source)
        status, verdict = await send(token)
        if verdict == "revoked":
            source.invalidate(token)
            status, verdict = await send(await self._checker_token(source))
        return status, verdict
