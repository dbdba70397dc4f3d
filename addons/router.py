"""Decides what a request is, before anything else looks at it: a known route, or a rejection."""

from collections.abc import Sequence

from mitmproxy import ctx, exceptions, http
from mitmproxy.net.http import url
from mitmproxy.proxy import mode_specs

from addons.apierrors import error_response, fail_closed, refuses_config_errors
from addons.flowstate import flow_state, new_flow_state
from llmproxy.api import OPENAI, routes
from llmproxy.api.errors import api_of_path
from llmproxy.api.routes import RouteTable
from llmproxy.config import size_setting
from llmproxy.services.base import Service

# What each client connection's protocol (ALPN) may call itself; a cleartext HTTP/1 connection has none.
_VERSIONS_SPOKEN = {b"h2": ("HTTP/2.0",), b"h3": ("HTTP/3",)}

_CORS_ALLOWED_HEADERS = (
    b"authorization, x-api-key, content-type, anthropic-version, anthropic-beta, openai-beta, "
    b"anthropic-dangerous-direct-browser-access"
)


def _under_upstream(request: http.Request, services: Sequence[Service]) -> bytes | None:
    """The proxy's own target (`/proxy/<service>/...`) for a request to a configured upstream URL, or None."""
    for service in services:
        scheme, host, port, base_path = url.parse(getattr(ctx.options, f"{service.option_prefix}_upstream_url"))
        prefix, path = base_path.rstrip(b"/"), request.data.path
        if (request.scheme, request.host, request.port) == (scheme.decode(), host.decode(), port) and path.startswith(
            prefix + b"/"
        ):
            return f"/proxy/{service.name}".encode() + path[len(prefix) :]
    return None


def _show_as_sent(flow: http.HTTPFlow) -> None:
    """mitmproxy names the reverse listener's stand-in target as every request's destination; mitmweb shows the
    request as the client sent it instead (the dispatcher later shows a forwarded one at its upstream URL)."""
    request, client = flow.request, flow.client_conn
    scheme = "https" if client.tls_established else "http"
    try:
        host, port = url.parse_authority(request.host_header or "", check=True)
    except ValueError:
        host, port = client.sockname[0], client.sockname[1]
    request.data.scheme, request.data.host = scheme.encode(), host
    request.data.port = port or url.default_port(scheme)


class Router:
    """Matches the raw request target against the route table; answers everything that does not match."""

    def __init__(self, services: Sequence[Service], table: RouteTable):
        self.services = services
        self.table = table
        self.max_request_body = 0

    def load(self, loader):
        loader.add_option(
            "max_request_body", str, "4m", "Largest request body accepted (k, m, g suffixes); larger ones get 413."
        )
        loader.add_option(
            "local_other_hosts",
            str,
            "pass",
            "./run.sh local: pass (untouched) or block requests to hosts other than the APIs'.",
        )

    @refuses_config_errors
    def configure(self, updated):
        if "local_other_hosts" in updated and ctx.options.local_other_hosts not in ("pass", "block"):
            raise exceptions.OptionsError("LOCAL_OTHER_HOSTS must be pass or block.")
        if "max_request_body" in updated:
            self.max_request_body = size_setting("max_request_body", ctx.options.max_request_body, "4m")
            if self.max_request_body <= 0:
                raise exceptions.OptionsError("MAX_REQUEST_BODY must be larger than zero.")
            # mitmproxy's own limit answers in HTML, before any hook runs; it stays as the memory backstop for
            # bodies that announce no length, at twice ours, so a declared oversize gets our JSON 413 instead.
            ctx.options.body_size_limit = str(2 * self.max_request_body)
        elif "body_size_limit" in updated and ctx.options.body_size_limit != str(2 * self.max_request_body):
            raise exceptions.OptionsError("body_size_limit is set by this proxy; use MAX_REQUEST_BODY instead.")

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        raw_target = request.data.path
        state = new_flow_state(flow)
        if flow.is_replay == "request" and (upstream_target := _under_upstream(request, self.services)):
            # A flow mitmweb replays shows the upstream URL the request went to: it is that API's request again.
            raw_target = upstream_target
        elif isinstance(flow.client_conn.proxy_mode, mode_specs.RegularMode):  # ./run.sh local
            host_service = self.table.hosts.get(request.pretty_host)
            if host_service is None:
                if ctx.options.local_other_hosts == "block":
                    state.decision = "blocked_host"
                    flow.response = error_response(
                        OPENAI, 403, "This proxy only lets the LLM APIs through.", "host_blocked"
                    )
                else:
                    state.passthrough = True  # not an API: not ours to touch
                return
            raw_target = f"/proxy/{host_service}".encode() + raw_target  # the API's own path, under our prefix
        else:
            _show_as_sent(flow)
        api = api_of_path(raw_target)
        if request.http_version not in _VERSIONS_SPOKEN.get(flow.client_conn.alpn, ("HTTP/1.0", "HTTP/1.1")):
            # mitmproxy takes any `HTTP/d.d`; `HTTP/2.0` on an HTTP/1 connection would skip the absolute-form check.
            state.decision = "blocked_path"
            flow.response = error_response(
                api,
                505,
                f"This proxy speaks HTTP/1.0 and HTTP/1.1 here, not {request.http_version}.",
                "http_version_not_supported",
            )
            return
        if self._too_large(request.headers.get("content-length", "0")):
            state.decision = "too_large"
            flow.response = self._too_large_response(api)
            return
        if request.http_version.startswith("HTTP/1") and request.data.authority:
            # mitmproxy would forward an absolute-form target (`POST http://elsewhere/...`) as it came.
            state.decision = "blocked_path"
            flow.response = error_response(
                api, 400, "Absolute-form request targets are not accepted; send the path only.", "absolute_form"
            )
            return
        if request.data.method == b"OPTIONS" and self.table.is_known_path(raw_target):
            state.decision = "preflight"
            flow.response = self._preflight(request)
            return
        if request.headers.get("upgrade", "").lower() == "websocket":
            # 426, not 404 or 405: Codex retries those for seconds before it falls back to HTTPS; 426 at once.
            state.decision = "blocked_path"
            flow.response = error_response(
                api,
                426,
                "This proxy does not accept WebSocket connections; send the request as HTTPS POST.",
                "websocket_not_supported",
            )
            return
        if routes.STORED_RESPONSE_PATH.fullmatch(routes.request_path(raw_target)):
            state.decision = "blocked_path"
            flow.response = error_response(
                api,
                404,
                "This proxy does not serve stored responses (GET, DELETE or cancel of "
                "/v1/responses/{id}): its keys belong to different organisations. Keep the output you need, "
                "or send the whole conversation again.",
                "stored_responses_not_served",
            )
            return
        match = self.table.lookup(request.data.method, raw_target)
        if match.route is not None:
            state.route, state.upstream_path, state.path_model = match.route, match.upstream_path, match.model
            state.dialect = match.route.dialect  # the error format of everything that follows
            return
        state.decision = "blocked_path"
        if (
            request.data.method == b"GET"
            and routes.request_path(raw_target).startswith(b"/proxy/")
            and self._is_browser(request)
        ):
            flow.response = http.Response.make(302, b"", {"location": "/"})
        elif match.allowed_methods:
            flow.response = error_response(
                api,
                405,
                f"This endpoint accepts {', '.join(match.allowed_methods)} only.",
                "method_not_allowed",
                {"allow": ", ".join(match.allowed_methods)},
            )
        else:
            flow.response = error_response(
                api,
                404,
                "This proxy forwards text-generation endpoints only; this one does not exist here.",
                "not_found",
            )

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        """Bodies sent without a declared length are measured once read."""
        if not flow.response and flow.live and self._too_large(len(flow.request.raw_content or b"")):
            flow_state(flow).decision = "too_large"
            flow.response = self._too_large_response(api_of_path(flow.request.data.path))

    def _too_large(self, size: int | str) -> bool:
        return str(size).isdigit() and int(size) > self.max_request_body

    def _too_large_response(self, api: str) -> http.Response:
        return error_response(
            api,
            413,
            f"The request body is larger than this proxy accepts ({ctx.options.max_request_body}).",
            "request_too_large",
        )

    @staticmethod
    def _is_browser(request: http.Request) -> bool:
        return "text/html" in request.headers.get("accept", "")

    @staticmethod
    def _preflight(request: http.Request) -> http.Response:
        """CORS preflight, answered locally. No credentials mode: cookies are never accepted anyway."""
        requested = request.headers.get("access-control-request-headers", "")
        allowed = _CORS_ALLOWED_HEADERS
        if requested and all(token.strip().replace("-", "").isalnum() for token in requested.split(",")):
            allowed = requested.encode()
        return http.Response.make(
            204,
            b"",
            {
                "access-control-allow-origin": "*",
                "access-control-allow-methods": "GET, POST, OPTIONS",
                "access-control-allow-headers": allowed,
                "access-control-max-age": "600",
            },
        )
