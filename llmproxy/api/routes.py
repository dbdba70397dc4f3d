"""The routes the proxy answers, as an exact table of request targets.

One normalisation only: runs of slashes become one (as Envoy's `merge_slashes` does), because chat frontends
join a base URL that ends in `/` with `/v1/...`. Nothing else is canonicalised: the path then either equals one
of the finite set of targets below or it is rejected. `..`, `%2e`, `;`, a trailing slash, other case, NUL or
non-ASCII bytes can never equal an entry, so no decoding rule can be tricked into reaching another upstream
path. The upstream path is taken from this table, never from the client's bytes.
"""

import re
from dataclasses import dataclass

from llmproxy.api import ANTHROPIC, OPENAI

_SLASH_RUNS = re.compile(rb"//+")
API_HOSTS = {"api.openai.com": OPENAI, "api.anthropic.com": ANTHROPIC}  # as apps with a hard-coded URL name them
FORWARD = "forward"  # sent upstream with a pool key
LOCAL = "local"  # answered by the proxy itself


@dataclass(frozen=True)
class Route:
    name: str  # e.g. "openai.chat_completions"; used in logs, metrics and flow state
    api: str  # the upstream API: OPENAI or ANTHROPIC, or "" for the proxy's own pages
    method: str
    kind: str
    upstream_path: str = ""
    client_format: str = ""  # the API format the client speaks, when it is not the upstream's
    counts_tokens: bool = False  # a token count: no generation, so its own rate limit and no quota

    @property
    def dialect(self) -> str:
        """The API whose request, answer and error formats the client uses."""
        return self.client_format or self.api


_SERVICE_ROUTES = {
    OPENAI: [
        ("chat_completions", "POST", FORWARD, "/v1/chat/completions"),
        ("completions", "POST", FORWARD, "/v1/completions"),
        ("responses", "POST", FORWARD, "/v1/responses"),
        ("responses_compact", "POST", FORWARD, "/v1/responses/compact"),  # Codex's remote compaction
        ("responses_input_tokens", "POST", FORWARD, "/v1/responses/input_tokens", "", True),
        ("embeddings", "POST", FORWARD, "/v1/embeddings"),
        ("models", "GET", LOCAL, "/v1/models"),
    ],
    ANTHROPIC: [
        ("messages", "POST", FORWARD, "/v1/messages"),
        ("chat_completions", "POST", FORWARD, "/v1/messages", OPENAI),  # OpenAI format, translated
        ("count_tokens", "POST", FORWARD, "/v1/messages/count_tokens", "", True),
        ("complete", "POST", FORWARD, "/v1/complete"),
        ("models", "GET", LOCAL, "/v1/models"),
    ],
}

_PAGES = [
    ("status_page", "/"),
    ("status", "/status"),
    ("health", "/health"),
    ("user_usage", "/user/usage"),
    ("metrics", "/metrics"),
]

# A query string is accepted (SDKs add `?beta=true`, list calls add `?limit=`) but never forwarded.
_QUERY = re.compile(rb"(\?[A-Za-z0-9_.=&,\-]*)?")
# The admin API's paths are parametric (user ids); the admin addon matches them exactly against its own table.
_ADMIN_PATH = re.compile(rb"/admin/[a-z0-9_.\-]+(/[a-z0-9_.\-]+)*")
# A stored Responses API object (`GET`/`DELETE /v1/responses/{id}`, `.../cancel`, `.../input_items`): it lives
# in the organisation of whichever key created it, so the proxy answers these itself (router: a clear refusal).
STORED_RESPONSE_PATH = re.compile(rb"/proxy/openai(/v1)?/responses/resp_[A-Za-z0-9_\-]+(/cancel|/input_items)?")


def _build_table() -> dict[bytes, list[Route]]:
    table: dict[bytes, list[Route]] = {}
    for api, entries in _SERVICE_ROUTES.items():
        for name, method, kind, upstream_path, *extra in entries:
            route = Route(f"{api}.{name}", api, method, kind, upstream_path, *extra)
            client_format = route.client_format
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


def merge_slashes(raw_path: bytes) -> bytes:
    """`raw_path` with each run of slashes as one (`/proxy/openai/v1//chat` -> `/proxy/openai/v1/chat`)."""
    return _SLASH_RUNS.sub(b"/", raw_path)


def request_path(raw_target: bytes) -> bytes:
    """The path of a raw request target, runs of slashes merged; the query is not part of it."""
    return merge_slashes(raw_target.partition(b"?")[0])


def lookup(method: bytes, raw_target: bytes) -> Match:
    """Matches the raw method and request target (path and query, as the client sent them)."""
    path, query = request_path(raw_target), raw_target.partition(b"?")[2]
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
    path = request_path(raw_target)
    return path in TABLE or bool(_ADMIN_PATH.fullmatch(path) or STORED_RESPONSE_PATH.fullmatch(path))
