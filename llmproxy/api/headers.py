"""Header hygiene in both directions: allowlists, never denylists.

Towards the upstream only the headers an API call needs survive; the client's credentials, cookies and
forwarding headers (its IP) never leave the proxy. Towards the client only the headers it can use survive;
nothing that names the owner's account (`openai-organization`, `anthropic-organization-id`, cookies).
"""

import re
from collections.abc import Iterable, Mapping

from llmproxy.api import ANTHROPIC, DEFAULT_ANTHROPIC_VERSION

CLIENT_CREDENTIALS = (
    "authorization",
    "x-api-key",
    "x-goog-api-key",
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

_UNSAFE_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 9110 §5.6.3: the only whitespace HTTP allows around a field value. str.strip() would also take a no-break
# space, U+3000 or \x1f off a token, and so accept a token that is not the one configured.
OPTIONAL_WHITESPACE = " \t"


def _connection_tokens(connection_values: Iterable[str]) -> set[str]:
    """Header names listed in `Connection`: hop-by-hop by declaration, so never forwarded."""
    return {token.strip().lower() for value in connection_values for token in value.split(",")}


def presented_token(headers: Mapping[str, str]) -> str:
    """The token exactly as sent (`Authorization: Bearer ...`, else `x-api-key`, `x-goog-api-key` (Gemini's SDK) or
    `api-key`), less the spaces and
    tabs around it; every other character is part of it. `headers` looks names up in any case, as mitmproxy's do.

    mitmproxy decodes header values as UTF-8 with surrogateescape, so a byte that is not UTF-8 stays in the token
    as a lone surrogate, which `identity.secret_matches` compares as the byte it was.
    """
    authorization = headers.get("authorization", "").strip(OPTIONAL_WHITESPACE)
    scheme, _, credentials = authorization.partition(" ")  # RFC 9110 §11.4: scheme, 1*SP, credentials
    if scheme.lower() == "bearer" and (credentials := credentials.strip(OPTIONAL_WHITESPACE)):
        return credentials
    others = headers.get("x-api-key") or headers.get("x-goog-api-key") or headers.get("api-key") or ""
    return others.strip(OPTIONAL_WHITESPACE)


def upstream_request_headers(fields: Iterable[tuple[str, str]], api: str) -> list[tuple[bytes, bytes]]:
    """The request header fields (name, value, as mitmproxy decodes them) the upstream may see, without the key (the
    dispatcher adds it last)."""
    fields = list(fields)
    hop_by_hop = _connection_tokens(value for name, value in fields if name.lower() == "connection")
    kept = []
    for name, value in fields:
        lower = name.lower()
        if lower in hop_by_hop or _UNSAFE_VALUE.search(value):
            continue
        if lower in _REQUEST_ALLOWED or lower.startswith(_REQUEST_ALLOWED_PREFIXES):
            kept.append((lower.encode(), value.encode("utf-8", "surrogateescape")))
    kept.append((b"accept-encoding", b"identity"))  # streamed bytes are passed on as they come; no decoding needed
    if api == ANTHROPIC and all(name != b"anthropic-version" for name, _ in kept):
        kept.append((b"anthropic-version", DEFAULT_ANTHROPIC_VERSION.encode()))
    return kept


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
