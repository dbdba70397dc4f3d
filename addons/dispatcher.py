"""Sends an allowed request upstream with a pool key, and brings the answer back.

mitmproxy's own forwarding cannot do what a key-sharing proxy needs: it cannot give a client an error in the
API's format when the upstream is unreachable or stalls (it sends an HTML 502, or nothing), it cannot try a
request again on another key, and it cannot send anything to a client before the upstream answers. So the
dispatcher makes the upstream call itself, from the `request` hook, with one pooled aiohttp session:

- a buffered answer (JSON) becomes `flow.response`, and mitmproxy never opens an upstream connection;
- a streamed answer (SSE) is handed to the *pipe*, a loopback HTTP server in the same event loop, which is the
  reverse-mode target of the listener: the flow is pointed at `/pipe/<token>` and mitmproxy streams the pipe's
  response to the client chunk by chunk, as it would stream any upstream.

The key is added to the outgoing aiohttp request only, as its very last header, after every check passed. It
is never on the flow, so nothing that shows or saves flows (mitmweb, `-w`, `flow_detail`) can reveal it.
"""

import asyncio
import logging
import secrets
import socket
import time

import aiohttp
from aiohttp import web
from mitmproxy import ctx, exceptions, http
from mitmproxy.net import encoding
from yarl import URL

from addons import headers, scrub
from addons.apierrors import (
    ANTHROPIC,
    OPENAI,
    SERVICE_NAMES,
    api_of_path,
    error_body,
    error_response,
    fail_closed,
    sse_error_event,
)
from addons.routes import FORWARD, ROUTES_BY_NAME

logger = logging.getLogger(__name__)

PIPE_PREFIX = "/pipe/"
MAX_BUFFERED_RESPONSE = 64 * 1024 * 1024  # a JSON answer larger than this is not an LLM answer


def bind_pipe_socket() -> socket.socket:
    """The loopback socket the pipe will serve on; bound early because the listener's mode names its port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class PipedStream:
    """An upstream SSE response waiting for mitmproxy to connect to the pipe and collect it."""

    def __init__(self, api: str, status: int, response_headers: list[tuple[bytes, bytes]], upstream):
        self.api = api
        self.status = status
        self.headers = response_headers
        self.upstream: aiohttp.ClientResponse = upstream


class Dispatcher:
    """Calls the upstream API with a key from the pool; streams SSE through the loopback pipe."""

    def __init__(self, pipe_socket: socket.socket | None = None):
        self.pipe_socket = pipe_socket
        self.session: aiohttp.ClientSession | None = None
        self.ready = asyncio.Event()
        self.piped: dict[str, PipedStream] = {}
        self.served = {OPENAI: 0, ANTHROPIC: 0}
        self.upstreams: dict[str, URL] = {}
        self._runner: web.AppRunner | None = None

    def load(self, loader):
        loader.add_option(
            "openai_upstream_url", str, "https://api.openai.com", "Base URL of the OpenAI API (no /v1)."
        )
        loader.add_option(
            "anthropic_upstream_url", str, "https://api.anthropic.com", "Base URL of the Anthropic API (no /v1)."
        )
        loader.add_option(
            "upstream_connect_timeout", int, 10, "Seconds to wait for a connection to the upstream API."
        )
        loader.add_option(
            "upstream_timeout",
            int,
            600,
            """
            Seconds to wait for the upstream's response headers. A non-streamed answer sends none until the
            whole generation is done, so this bounds the longest generation.
            """,
        )
        loader.add_option(
            "upstream_idle_timeout", int, 120, "Seconds of upstream silence tolerated in the middle of a body."
        )

    def configure(self, updated):
        for api in (OPENAI, ANTHROPIC):
            name = f"{api}_upstream_url"
            if name in updated:
                url = URL(getattr(ctx.options, name))
                if url.scheme not in ("http", "https") or not url.host:
                    raise exceptions.OptionsError(f"{name.upper()} must be an http:// or https:// URL.")
                self.upstreams[api] = url
        for name in ("upstream_connect_timeout", "upstream_timeout", "upstream_idle_timeout"):
            if name in updated and getattr(ctx.options, name) <= 0:
                raise exceptions.OptionsError(f"{name.upper()} must be a positive number of seconds.")

    async def running(self):
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None, connect=ctx.options.upstream_connect_timeout),
        )
        if self.pipe_socket is not None:
            app = web.Application()
            app.router.add_route("*", PIPE_PREFIX + "{token}", self._serve_pipe)
            app.router.add_route("*", "/{tail:.*}", self._serve_unrouted)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await web.SockSite(self._runner, self.pipe_socket).start()
        self.ready.set()

    async def done(self):
        if self._runner:
            await self._runner.cleanup()
        if self.session:
            await self.session.close()

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live:
            return
        meta = flow.metadata.get("llmproxy", {})
        route = ROUTES_BY_NAME.get(meta.get("route"))
        if route is None or route.kind != FORWARD:
            return  # the pipe answers unrouted flows with a 500: nothing unchecked goes anywhere
        api = route.api
        key = ctx.master.addons.get("keypool").choose(api)
        if key is None:
            meta["decision"] = "no_key"
            flow.response = error_response(
                api, 503, f"This proxy has no working {SERVICE_NAMES[api]} key at the moment.", "no_keys_available"
            )
            return
        meta["key"] = key.id
        url = self.upstreams[api].join(URL(route.upstream_path))
        await asyncio.wait_for(self.ready.wait(), 10)
        started = time.monotonic()
        try:
            async with asyncio.timeout(ctx.options.upstream_timeout):
                upstream = await self.session.request(
                    flow.request.method,
                    url,
                    data=flow.request.raw_content or b"",
                    headers=[*flow.request.headers.items(multi=True), key.auth_header()],
                    allow_redirects=False,
                )
        except TimeoutError:
            meta["decision"] = "upstream_timeout"
            flow.response = error_response(
                api, 504, f"The upstream API did not answer within {ctx.options.upstream_timeout} s.", "upstream_timeout"
            )
            return
        except aiohttp.ClientError as error:
            meta["decision"] = "upstream_unreachable"
            logger.warning("upstream %s unreachable with key %s: %s", api, key.id, type(error).__name__)
            flow.response = error_response(
                api, 502, "The proxy could not reach the upstream API; try again shortly.", "upstream_unreachable"
            )
            return
        meta["upstream_status"] = upstream.status
        meta["upstream_ms"] = round((time.monotonic() - started) * 1000)
        meta["upstream_url"] = str(url)
        if upstream.ok and upstream.content_type == "text/event-stream":
            self._hand_to_pipe(flow, api, upstream)
        else:
            await self._respond_buffered(flow, api, upstream)
            flow.request.url = str(url)  # only shown: with a response set, mitmproxy connects nowhere

    @fail_closed
    async def responseheaders(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata.get("llmproxy", {})
        if meta.get("piped"):
            flow.response.stream = True
            flow.request.url = meta["upstream_url"]  # the request has gone to the pipe; show the real target

    async def error(self, flow: http.HTTPFlow) -> None:
        """A client that left before mitmproxy collected its stream: close the upstream so generation stops."""
        token = flow.metadata.get("llmproxy", {}).get("pipe_token")
        if token and (waiting := self.piped.pop(token, None)):
            waiting.upstream.close()

    def _hand_to_pipe(self, flow: http.HTTPFlow, api: str, upstream: aiohttp.ClientResponse) -> None:
        token = secrets.token_urlsafe(24)
        self.piped[token] = PipedStream(api, upstream.status, headers.client_response_headers(upstream.headers), upstream)
        meta = flow.metadata["llmproxy"]
        meta.update(piped=True, pipe_token=token, decision="served")
        self.served[api] += 1
        # The listener's reverse target is the pipe; the hop needs the framing headers the allowlist removed.
        flow.request.headers["host"] = f"{flow.request.host}:{flow.request.port}"
        flow.request.headers["content-length"] = str(len(flow.request.raw_content or b""))
        flow.request.path = PIPE_PREFIX + token

    async def _respond_buffered(self, flow: http.HTTPFlow, api: str, upstream: aiohttp.ClientResponse) -> None:
        meta = flow.metadata["llmproxy"]
        async with upstream:
            try:
                async with asyncio.timeout(ctx.options.upstream_idle_timeout):
                    body = await upstream.content.read(MAX_BUFFERED_RESPONSE + 1)
            except (TimeoutError, aiohttp.ClientError) as error:
                meta["decision"] = "upstream_broken"
                logger.warning("upstream %s body failed with key %s: %s", api, meta["key"], type(error).__name__)
                flow.response = error_response(
                    api, 502, "The upstream API broke off its answer; try again.", "upstream_broken"
                )
                return
        if len(body) > MAX_BUFFERED_RESPONSE:
            meta["decision"] = "upstream_too_large"
            flow.response = error_response(api, 502, "The upstream answer was too large to pass on.", "upstream_too_large")
            return
        content_encoding = upstream.headers.get("content-encoding", "identity")
        if content_encoding != "identity":
            body = encoding.decode(body, content_encoding)
        if upstream.ok:
            meta["decision"] = "served"
            self.served[api] += 1
        else:
            meta["decision"] = "upstream_error"
            body = scrub.body(body)
            logger.info("upstream %s answered %d with key %s", api, upstream.status, meta["key"])
        flow.response = http.Response.make(upstream.status, body, headers.client_response_headers(upstream.headers))

    async def _serve_pipe(self, request: web.Request) -> web.StreamResponse:
        """Streams one upstream SSE response to mitmproxy, which streams it on to the client."""
        waiting = self.piped.pop(request.match_info["token"], None)
        if waiting is None:
            return await self._serve_unrouted(request)
        upstream = waiting.upstream
        response = web.StreamResponse(status=waiting.status, headers=[(k.decode(), v.decode()) for k, v in waiting.headers])
        complete = False
        try:
            await response.prepare(request)
            while True:
                try:
                    async with asyncio.timeout(ctx.options.upstream_idle_timeout):
                        chunk = await upstream.content.readany()
                except (TimeoutError, aiohttp.ClientError) as error:
                    logger.warning("upstream %s stream broke off: %s", waiting.api, type(error).__name__)
                    await response.write(
                        sse_error_event(waiting.api, 502, "The upstream API broke off the stream.", "upstream_broken")
                    )
                    break
                if not chunk:
                    complete = True
                    break
                await response.write(chunk)
        except ConnectionError:
            pass  # the client left; closing the upstream connection below stops the generation
        finally:
            upstream.release() if complete else upstream.close()
        return response

    async def _serve_unrouted(self, request: web.Request) -> web.Response:
        """Whatever reaches the pipe without a token got past the pipeline unchecked: refuse it."""
        logger.error("a request reached the pipe without passing the pipeline: %s", request.method)
        api = api_of_path(request.raw_path.encode("utf-8", "surrogateescape"))
        message = "The proxy refused a request it had not checked."
        return web.json_response(error_body(api, 500, message, "proxy_internal_error"), status=500)
