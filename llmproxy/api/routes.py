"""The routes the proxy answers, as an exact table of request targets.

One normalisation only: runs of slashes become one (as Envoy's `merge_slashes` does), because chat frontends
join a base URL that ends in `/` with `/v1/...`. Nothing else is canonicalised: the path then either equals one
of the finite set of targets below or it is rejected. `..`, `%2e`, `;`, a trailing slash, other case, NUL or
non-ASCII bytes can never equal an entry, so no decoding rule can be tricked into reaching another upstream
path. The upstream path is taken from this table, never from the client's bytes.
"""

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmproxy.services.base import Service

_SLASH_RUNS = re.compile(rb"//+")
FORWARD = "forward"  # sent upstream with a pool key
LOCAL = "local"  # answered by the proxy itself


@dataclass(frozen=True)
class Route:
    name: str  # e.g. "openai.chat_completions"; used in logs, metrics and flow state
    service: str  # the upstream service (llmproxy/services), or "" for the proxy's own pages
    method: str
    kind: str
    upstream_path: str = ""
    client_format: str = ""  # the dialect the client speaks, when it is not the service's
    counts_tokens: bool = False  # a token count: no generation, so its own rate limit and no quota
    wire: str = ""  # the service's dialect: the format of what goes upstream and comes back
    form: str = ""  # the endpoint as its wire format names it, whichever service serves it: "openai.chat_completions"
    streams: bool = False  # it always streams, whatever the body says

    @property
    def dialect(self) -> str:
        """The dialect whose request, answer and error formats the client uses."""
        return self.client_format or self.wire


_PAGES = [
    ("status_page", "/"),
    ("status", "/status"),
    ("health", "/health"),
    ("user_usage", "/user/usage"),
    ("metrics", "/metrics"),
]

# A query string is accepted (SDKs add `?beta=true`, list calls add `?limit=`) but never forwarded.
_QUERY = re.compile(rb"(\?[A-Za-z0-9_.=&,\-]*)?")
# The web pages' queries also hold what a browser sends for a search box: `+` and percent-escapes.
_PAGE_QUERY = re.compile(rb"(\?[A-Za-z0-9_.=&,\-+%*~]*)?")
# The web pages (browsers, session cookie and forms): the owner's under /admin, the users' under /user.
_PAGE_PATHS = (
    (re.compile(rb"/admin(/login|/logout|/manage(/[a-z0-9_.\-]+)*)?"), "admin_pages"),
    (re.compile(rb"/user(/lookup|/captcha(/challenge|/verify)?)?"), "user_pages"),
)
PAGE_ROUTES = tuple(name for _, name in _PAGE_PATHS)
PAGE_METHODS = ("GET", "POST")
_PAGE_PREFIXES = (b"/admin", b"/user")  # the API routes, on every request, skip the patterns above
# The admin API's paths are parametric (user ids); the admin addon matches them exactly against its own table.
_ADMIN_PATH = re.compile(rb"/admin/[a-z0-9_.\-]+(/[a-z0-9_.\-]+)*")
# A stored Responses API object (`GET`/`DELETE /v1/responses/{id}`, `.../cancel`, `.../input_items`): it lives
# in the organisation of whichever key created it, so the proxy answers these itself (router: a clear refusal).
STORED_RESPONSE_PATH = re.compile(rb"/proxy/openai(/v1)?/responses/resp_[A-Za-z0-9_\-]+(/cancel|/input_items)?")
ADMIN = Route("admin", "", "*", LOCAL)
ADMIN_METHODS = ("DELETE", "GET", "PATCH", "POST")


@dataclass(frozen=True)
class Match:
    """The outcome of looking up a request: a route, or why there is none."""

    route: Route | None = None
    allowed_methods: tuple[str, ...] = ()  # non-empty when the path is known but the method is not
    upstream_path: str = ""  # a parametric route's path (and query) upstream, rebuilt by its service
    model: str = ""  # the model a parametric route's path names


def merge_slashes(raw_path: bytes) -> bytes:
    """`raw_path` with each run of slashes as one (`/proxy/openai/v1//chat` -> `/proxy/openai/v1/chat`)."""
    return _SLASH_RUNS.sub(b"/", raw_path)


def request_path(raw_target: bytes) -> bytes:
    """The path of a raw request target, runs of slashes merged; the query is not part of it."""
    return merge_slashes(raw_target.partition(b"?")[0])


class RouteTable:
    """Every route of the proxy: each service's endpoints under `/proxy/<service>` (with and without `/v1`), and the
    proxy's own pages."""

    def __init__(self, services: Iterable["Service"]):
        self.paths: dict[bytes, list[Route]] = {}
        self.hosts: dict[str, str] = {}  # API host -> service, for apps with a hard-coded URL (the forward proxy)
        self.parametric: list[tuple[bytes, Service, dict[str, Route]]] = []  # (prefix, service, its routes)
        for service in services:
            parametric: dict[str, Route] = {}
            for endpoint in service.endpoints:
                wire = endpoint.wire or service.dialect
                route = Route(
                    f"{service.name}.{endpoint.name}",
                    service.name,
                    endpoint.method,
                    endpoint.kind,
                    endpoint.upstream_path,
                    endpoint.client_format,
                    endpoint.counts_tokens,
                    wire,
                    f"{wire}.{endpoint.name}",
                    endpoint.streams,
                )
                if endpoint.parametric:
                    parametric[endpoint.name] = route
                    continue
                optional = endpoint.path[3:] if endpoint.path.startswith("/v1/") else endpoint.path  # `/v1` is optional
                for client_path in dict.fromkeys((endpoint.path, optional)):
                    path = f"/proxy/{service.name}{service.path_prefix}{client_path}"
                    self.paths.setdefault(path.encode(), []).append(route)
            if parametric:
                self.parametric.append((f"/proxy/{service.name}{service.path_prefix}/".encode(), service, parametric))
            self.hosts.update(dict.fromkeys(service.hosts, service.name))
        for name, path in _PAGES:
            self.paths[path.encode()] = [Route(name, "", "GET", LOCAL)]
        self.by_name = {route.name: route for routes in self.paths.values() for route in routes} | {"admin": ADMIN}
        self.by_name |= {name: Route(name, "", "*", LOCAL) for _, name in _PAGE_PATHS}
        self.by_name |= {route.name: route for _, _, routes in self.parametric for route in routes.values()}

    def lookup(self, method: bytes, raw_target: bytes) -> Match:
        """Matches the raw method and request target (path and query, as the client sent them)."""
        path, query = request_path(raw_target), raw_target.partition(b"?")[2]
        for pattern, name in _PAGE_PATHS if path.startswith(_PAGE_PREFIXES) else ():
            if pattern.fullmatch(path):
                if query and not _PAGE_QUERY.fullmatch(b"?" + query):
                    return Match()
                if method.decode("latin-1") in PAGE_METHODS:
                    return Match(self.by_name[name])
                return Match(allowed_methods=(*PAGE_METHODS, "OPTIONS"))
        if query and not _QUERY.fullmatch(b"?" + query):
            return Match()
        if _ADMIN_PATH.fullmatch(path):
            if method.decode("latin-1") in ADMIN_METHODS:
                return Match(ADMIN)
            return Match(allowed_methods=tuple(sorted((*ADMIN_METHODS, "OPTIONS"))))
        routes = self.paths.get(path)
        if not routes:
            return self._parametric(method, merge_slashes(raw_target))
        for route in routes:
            if method == route.method.encode():
                return Match(route)
        return Match(allowed_methods=tuple(sorted({r.method for r in routes} | {"OPTIONS"})))

    def _parametric(self, method: bytes, target: bytes) -> Match:
        """A match among the services' parametric routes (path and query merged of slash runs)."""
        for prefix, service, routes in self.parametric:
            if target.startswith(prefix) and (found := service.match(target[len(prefix) - 1 :])):
                endpoint, upstream_path, model = found
                route = routes[endpoint.name]
                if method != route.method.encode():
                    return Match(allowed_methods=(route.method, "OPTIONS"))
                return Match(route, upstream_path=upstream_path, model=model)
        return Match()

    def is_known_path(self, raw_target: bytes) -> bool:
        path = request_path(raw_target)
        if path in self.paths or _ADMIN_PATH.fullmatch(path) or STORED_RESPONSE_PATH.fullmatch(path):
            return True
        if any(pattern.fullmatch(path) for pattern, _ in _PAGE_PATHS):
            return True
        return self._parametric(b"OPTIONS", merge_slashes(raw_target)).allowed_methods != ()
