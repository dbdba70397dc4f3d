"""Header hygiene in both directions: allowlists, never denylists.

Towards the upstream only the headers an API call needs survive; the client's credentials, cookies and
forwarding headers (its IP) never leave the proxy. Towards the client only the headers it can use survive;
nothing that names the owner's account (`openai-organization`, `anthropic-organization-id`, cookies).
"""

import re
import weakref

from mitmproxy import http
from mitmproxy.net.http import http1

from addons.apierrors import ANTHROPIC, api_of_path, error_response, fail_closed
from addons.flowstate import flow_state
from addons.routes import forward_route
from llmproxy.api import DEFAULT_ANTHROPIC_VERSION

CLIENT_CREDENTIALS = (
    "authorization",
    "x-api-key",
    "api-key",
    "proxy-authorization",
    "cookie",
    "openai-organization",
    "openai-project",
)

_REQUEST_ALLOWED = frozenset(
    {
        "content-type",
        "accept",
        "user-agent",
        "anthropic-version",
        "anthropic-beta",
        "openai-beta",
        "idempotency-key",
        "anthropic-dangerous-direct-browser-access",  # sent by the Anthropic SDK in browsers and by Claude Code
    }
)
_REQUEST_ALLOWED_PREFIXES = ("x-stainless-",)  # the official SDKs' platform headers; nothing account-related

_RESPONSE_ALLOWED = frozenset(
    {"content-type", "cache-control", "retry-after", "retry-after-ms", "x-request-id", "request-id", "date"}
)
_RESPONSE_ALLOWED_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")
# What a browser script may read of an answer, beyond the CORS-safelisted headers: every header the proxy passes
# on or makes that a client acts on (waits, limits, errors, ids). Listed by name: `*` is not read everywhere.
EXPOSED_HEADERS = ", ".join(
    [
        "retry-after",
        "retry-after-ms",
        "x-request-id",
        "request-id",
        "x-proxy-error",
        "x-proxy-error-status",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",  # the proxy's own per-user limit
        *(f"x-ratelimit-{part}-{kind}" for part in ("limit", "remaining", "reset") for kind in ("requests", "tokens")),
        *(
            f"anthropic-ratelimit-{kind}-{part}"
            for kind in ("requests", "tokens", "input-tokens", "output-tokens")
            for part in ("limit", "remaining", "reset")
        ),
    ]
)

# The token a client presented, kept beside the flow (never on it) for the gatekeeper and the admin API.
_client_tokens: "weakref.WeakKeyDictionary[http.HTTPFlow, str]" = weakref.WeakKeyDictionary()

_UNSAFE_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 9110 §5.6.3: the only whitespace HTTP allows around a field value. str.strip() would also take a no-break
# space, U+3000 or \x1f off a token, and so accept a token that is not the one configured.
OPTIONAL_WHITESPACE = " \t"


def _connection_tokens(connection_values: list[str]) -> set[str]:
    """Header names listed in `Connection`: hop-by-hop by declaration, so never forwarded."""
    return {token.strip().lower() for value in connection_values for token in value.split(",")}


def client_token(flow: http.HTTPFlow) -> str:
    """The token the client presented: `Authorization: Bearer ...`, else `x-api-key`, else `api-key`; or ""."""
    return _client_tokens.get(flow, "")


def presented_token(headers: http.Headers) -> str:
    """The token exactly as sent, less the spaces and tabs around it; every other character is part of it.

    mitmproxy decodes header values as UTF-8 with surrogateescape, so a byte that is not UTF-8 stays in the token
    as a lone surrogate, which `gatekeeper.secret_matches` compares as the byte it was.
    """
    authorization = headers.get("authorization", "").strip(OPTIONAL_WHITESPACE)
    scheme, _, credentials = authorization.partition(" ")  # RFC 9110 §11.4: scheme, 1*SP, credentials
    if scheme.lower() == "bearer" and (credentials := credentials.strip(OPTIONAL_WHITESPACE)):
        return credentials
    return (headers.get("x-api-key") or headers.get("api-key") or "").strip(OPTIONAL_WHITESPACE)


def upstream_request_headers(headers: http.Headers, api: str) -> http.Headers:
    """The headers the upstream may see, without the key (the dispatcher adds it last)."""
    hop_by_hop = _connection_tokens(headers.get_all("connection"))
    kept = []
    for name, value in headers.items(multi=True):
        lower = name.lower()
        if lower in hop_by_hop or _UNSAFE_VALUE.search(value):
            continue
        if lower in _REQUEST_ALLOWED or lower.startswith(_REQUEST_ALLOWED_PREFIXES):
            kept.append((lower.encode(), value.encode("utf-8", "surrogateescape")))
    result = http.Headers(kept)
    result["accept-encoding"] = "identity"  # streamed bytes are passed on as they come; no decoding needed
    if api == ANTHROPIC and "anthropic-version" not in result:
        result["anthropic-version"] = DEFAULT_ANTHROPIC_VERSION
    return result


def client_response_headers(upstream_headers) -> list[tuple[bytes, bytes]]:
    """The upstream response headers the client may see. Framing headers are dropped: each hop frames anew."""
    hop_by_hop = _connection_tokens(upstream_headers.getall("connection", []))
    kept = []
    for name, value in upstream_headers.items():
        lower = name.lower()
        if lower in hop_by_hop:
            continue
        if lower in _RESPONSE_ALLOWED or lower.startswith(_RESPONSE_ALLOWED_PREFIXES):
            kept.append((lower.encode(), value.encode("utf-8", "surrogateescape")))
    return kept


class HeaderHygiene:
    """Takes client credentials off every flow, and leaves forwarded requests with allowlisted headers only."""

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        state = flow_state(flow)
        if state.passthrough:
            return
        # RFC 9112 §9.6: a client that asks to close gets `Connection: close` on the answer. Read now, because
        # the allowlist removes the header from forwarded requests (mitmproxy would then keep the socket open).
        state.client_closes = http1.connection_close(flow.request.http_version, flow.request.headers)
        # Removed before any other addon, mitmweb or a flow dump can see them.
        if token := presented_token(flow.request.headers):
            _client_tokens[flow] = token
        for name in CLIENT_CREDENTIALS:
            flow.request.headers.pop(name, None)

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        if (route := forward_route(flow)) is None:
            return
        if flow.request.headers.get("content-encoding", "identity") != "identity":
            try:
                flow.request.decode()
            except ValueError:
                flow.response = error_response(
                    api_of_path(flow.request.data.path),
                    415,
                    "The request body's Content-Encoding could not be decoded; send it uncompressed.",
                    "unsupported_content_encoding",
                )
                return
        flow.request.headers = upstream_request_headers(flow.request.headers, route.api)

    @fail_closed
    async def responseheaders(self, flow: http.HTTPFlow) -> None:
        state, headers = flow_state(flow), flow.response.headers
        if state.passthrough:
            return
        # Browser-based chat clients call the proxy cross-origin; they never send cookies, so `*` is safe.
        headers["access-control-allow-origin"] = "*"
        headers["access-control-expose-headers"] = EXPOSED_HEADERS
        headers.pop("server", None)
        # Node's connection pools reuse a socket unless the answer says it closes; saying it is what RFC 9112 asks.
        if state.client_closes:  # never for HTTP/2 clients: they cannot send `Connection`
            headers["connection"] = "close"
