"""How refusals reach the user: as real errors, or as an assistant message a chat frontend will show.

`PROXY_ERROR_FORMAT=error` (the default) keeps the error status and the API's JSON error, so SDKs raise properly.
`completion` answers HTTP 200 with a made-up assistant message in the client's own format, streamed as SSE when
the client asked to stream (llmproxy/api/fakecompletion.py), because some chat frontends show nothing but message
text.
"""

import json

from mitmproxy import ctx, exceptions, http

from addons.apierrors import fail_closed
from addons.flowstate import flow_state, parsed_body
from llmproxy.api.fakecompletion import MESSAGE_ROUTES, fake_completion

ERROR_FORMATS = ("error", "completion")


class RefusalFormat:
    """Rewrites error answers of generation routes into assistant messages when PROXY_ERROR_FORMAT=completion."""

    def load(self, loader):
        loader.add_option(
            "proxy_error_format",
            str,
            "error",
            "error: real error statuses; completion: HTTP 200 with the error as an assistant message.",
        )

    def configure(self, updated):
        if "proxy_error_format" in updated and ctx.options.proxy_error_format not in ERROR_FORMATS:
            raise exceptions.OptionsError(f"PROXY_ERROR_FORMAT must be one of {', '.join(ERROR_FORMATS)}.")

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        route = flow_state(flow).route
        response = flow.response
        if (
            ctx.options.proxy_error_format != "completion"
            or route is None
            or response.stream
            or response.status_code < 400
            or route.form not in MESSAGE_ROUTES
        ):
            return
        try:
            error = json.loads(response.content).get("error", {})
            message = error.get("message") if isinstance(error, dict) else str(error)
        except (ValueError, AttributeError):
            message = response.text[:500]
        try:
            body = parsed_body(flow)
        except ValueError:
            body = {}
        text = f"**Proxy error (HTTP {response.status_code})**\n\n{message}"
        content, content_type = fake_completion(
            route.form, str(body.get("model", "")), text, body.get("stream") is True
        )
        headers = response.headers.copy()
        headers.pop("content-length", None)
        headers["content-type"] = content_type
        headers["x-proxy-error-status"] = str(response.status_code)
        headers.setdefault("x-proxy-error", "upstream_error")
        flow.response = http.Response.make(200, content, headers)
