"""The routes the proxy answers, as an exact table of request targets.

Nothing is canonicalised: a raw request target either equals one of the finite set of targets below or
it is rejected. `..`, `%2e`, `//`, `;`, a trailing slash, other case, NUL or non-ASCII bytes can never equal
an entry, so no decoding rule can be tricked into reaching another upstream path. The upstream path is
taken from this table, never from the client's bytes.
"""

import re
from dataclasses import dataclass

from addons.apierrors import ANTHROPIC, OPENAI

FORWARD = "forward"  # sent upstream with a pool key
LOCAL = "local"  # answered by the proxy itself


@dataclass(frozen=True)
class Route:
    name: str  # e.g. "openai.chat_completions"; used in logs, metrics and flow metadata
    api: str  # the upstream API: OPENAI or ANTHROPIC, or "" for the proxy's own pages
    method: str
    kind: str
    upstream_path: str = ""
    client_format: str = ""  # the API format the client speaks, when it is not the upstream's

    @property
    def dialect(self) -> str:
        """The API whose request, answer and error formats the client uses."""
        return self.client_format or self.api


_SERVICE_ROUTES = {
    OPENAI: [
        ("chat_completions", "POST", FORWARD, "/v1/chat/completions"),
        ("completions", "POST", FORWARD, "/v1/completions"),
        ("responses", "POST", FORWARD, "/v1/responses"),
        ("embeddings", "POST", FORWARD, "/v1/embeddings"),
        ("models", "GET", LOCAL, "/v1/models"),
    ],
    ANTHROPIC: [
        ("messages", "POST", FORWARD, "/v1/messages"),
        ("chat_completions", "POST", FORWARD, "/v1/messages", OPENAI),  # OpenAI format, translated
        ("count_tokens", "POST", FORWARD, "/v1/messages/count_tokens"),
        ("complete", "POST", FORWARD, "/v1/complete"),
        ("models", "GET", LOCAL, "/v1/models"),
    ],
}

_PAGES = [("status_page", "/"), ("status", "/status"), ("health", "/health"), ("user_usage", "/user/usage"),
          ("metrics", "/metrics")]

# A query string is accepted (SDKs add `?beta=true`, list calls add `?limit=`) but never forwarded.
_QUERY = re.compile(rb"(\?[A-Za-z0-9_.=&,\-]*)?")
# The admin API's paths are parametric (user ids); the admin addon matches them exactly against its own table.
_ADMIN_PATH = re.compile(rb"/admin/[a-z0-9_.\-]+(/[a-z0-9_.\-]+)*")


def _build_table() -> dict[bytes, list[Route]]:
    table: dict[bytes, list[Route]] = {}
    for api, entries in _SERVICE_ROUTES.items():
        for name, method, kind, upstream_path, *client_format in entries:
            route = Route(f"{api}.{name}", api, method, kind, upstream_path, *client_format)
            own_path = "/v1/chat/completions" if client_format else upstream_path
            for client_path in (own_path, own_path.removeprefix("/v1")):  # `/v1` is optional
                table.setdefault(f"/proxy/{api}{client_path}".encode(), []).append(route)
    for name, path in _PAGES:
        table[path.encode()] = [Route(name, "", "GET", LOCAL)]
    return table


TABLE = _build_table()
ADMIN = Route("admin", "", "*", LOCAL)
ADMIN_METHODS = ("DELETE", "GET", "PATCH", "POST")
ROUTES_BY_NAME = {route.name: route for routes in TABLE.values() for route in routes} | {"admin": ADMIN}


@dataclass(frozen=True)
class Match:
    """The outcome of looking up a request: a route, or why there is none."""

    route: Route | None = None
    allowed_methods: tuple[str, ...] = ()  # non-empty when the path is known but the method is not


def lookup(method: bytes, raw_target: bytes) -> Match:
    """Matches the raw method and request target (path and query, as the client sent them)."""
    path, _, query = raw_target.partition(b"?")
    if query and not _QUERY.fullmatch(b"?" + query):
        return Match()
    if _ADMIN_PATH.fullmatch(path):
        if method.decode("latin-1") in ADMIN_METHODS:
            return Match(ADMIN)
        return Match(allowed_methods=tuple(sorted((*ADMIN_METHODS, "OPTIONS"))))
    routes = TABLE.get(path)
    if not routes:
        return Match()
    for route in routes:
        if method == route.method.encode():
            return Match(route)
    return Match(allowed_methods=tuple(sorted({r.method for r in routes} | {"OPTIONS"})))


def is_known_path(raw_target: bytes) -> bool:
    path = raw_target.partition(b"?")[0]
    return path in TABLE or bool(_ADMIN_PATH.fullmatch(path))


def forward_route(flow) -> Route | None:
    """The route of a live, still unanswered flow that is to go upstream; None for every other flow."""
    if flow.response or not flow.live:
        return None
    route = ROUTES_BY_NAME.get(flow.metadata.get("llmproxy", {}).get("route"))
    return route if route is not None and route.kind == FORWARD else None
