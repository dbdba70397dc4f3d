"""Header hygiene on every flow (llmproxy/api/headers.py): the client's credentials come off as the request arrives,
forwarded requests keep allowlisted headers only, and answers get the CORS headers browsers need."""

import contextlib
import weakref
from http.cookies import CookieError, SimpleCookie

from mitmproxy import http
from mitmproxy.net.http import http1

from addons.apierrors import error_response, fail_closed
from addons.flowstate import flow_state, forward_route
from llmproxy.api.errors import api_of_path
from llmproxy.api.headers import CLIENT_CREDENTIALS, EXPOSED_HEADERS, presented_token, upstream_request_headers
from llmproxy.api.routes import PAGE_ROUTES

# The token a client presented, kept beside the flow (never on it) for the gatekeeper and the admin API.
_client_tokens: "weakref.WeakKeyDictionary[http.HTTPFlow, str]" = weakref.WeakKeyDictionary()
# The cookies a browser sent to the web pages (a session cookie is as good as the admin key), kept the same way.
_client_cookies: "weakref.WeakKeyDictionary[http.HTTPFlow, dict[str, str]]" = weakref.WeakKeyDictionary()


def client_token(flow: http.HTTPFlow) -> str:
    """The token the client presented (llmproxy/api/headers.py's presented_token), or ""."""
    return _client_tokens.get(flow, "")


def client_cookies(flow: http.HTTPFlow) -> dict[str, str]:
    """The cookies a browser sent to a web page (name -> value); none for any other route."""
    return _client_cookies.get(flow, {})


class HeaderHygiene:
    """Takes client credentials off every flow, and leaves forwarded requests with allowlisted headers only."""

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        state = flow_state(flow)
        if state.passthrough:
            return
        # RFC 9112 §9.6: a client that asks to close gets `Connection: close` on the answer. Read now, because
        # the allowlist removes the header from forwarded requests (mitmproxy would then keep the socket open).
        state.client_closes = http1.connection_close(flow.request.http_version, flow.request.headers)
        # Removed before any other addon, mitmweb or a flow dump can see them.
        if token := presented_token(flow.request.headers):
            _client_tokens[flow] = token
        if state.route_name in PAGE_ROUTES and (cookie := flow.request.headers.get("cookie")):
            with contextlib.suppress(CookieError):  # a malformed Cookie header is no session
                _client_cookies[flow] = {name: morsel.value for name, morsel in SimpleCookie(cookie).items()}
        for name in CLIENT_CREDENTIALS:
            flow.request.headers.pop(name, None)

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
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
        fields = flow.request.headers.items(multi=True)
        flow.request.headers = http.Headers(upstream_request_headers(fields, route.wire))

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
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
