"""Sends an allowed request upstream with a pool key, and brings the answer back.

mitmproxy's own forwarding cannot do what a key-sharing proxy needs: it cannot give a client an error in the
API's format when the upstream is unreachable or stalls (it sends an HTML 502, or nothing), it cannot try a
request again on another key, and it cannot send anything to a client before the upstream answers. So the
dispatcher makes the upstream call itself, from the `request` hook, with one pooled aiohttp session:

- a buffered answer (JSON) becomes `flow.response`, and mitmproxy never opens an upstream connection;
- a streamed answer (SSE) is handed to the *pipe*, a loopback HTTP server in the same event loop, which is the
  reverse-mode target of the listener: the flow is pointed at `/pipe/<token>` and mitmproxy streams the pipe's
  response to the client chunk by chunk, as it would stream any upstream;
- a streaming request that has to wait for a key is handed to the pipe at once, and the pipe sends the SSE
  headers and heartbeat comments while the request waits, then the stream.

A rate-limited, revoked or over-quota key is replaced by another before anything reaches the client. The key
is added to the outgoing aiohttp request only, as its last headers, after every check passed. It is never on
the flow, so nothing that shows or saves flows (mitmweb, `-w`, `flow_detail`) can reveal it.
"""

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from mitmproxy import ctx, exceptions, http
from mitmproxy.net import encoding
from yarl import URL

from addons import headers, scrub, translate, usage
from addons.affinity import Affinity
from addons.apierrors import (
    ANTHROPIC,
    OPENAI,
    api_of_path,
    error_body,
    error_event,
    fail_closed,
    sse_error_event,
)
from addons.flowstate import flow_state
from addons.quota import QuotaKeeper
from addons.routes import ROUTES_BY_NAME, Route, forward_route
from addons.settlement import RequestSettledHook
from addons.usage import Usage
from llmproxy.api import sse
from llmproxy.pool.keys import RETIRING, KeyPool, PoolKey, Verdict
from llmproxy.pool.queue import QueueRefusal, WaitQueue

logger = logging.getLogger(__name__)

PIPE_PREFIX = "/pipe/"
MAX_BUFFERED_RESPONSE = 64 * 1024 * 1024  # a JSON answer larger than this is not an LLM answer
MAX_ATTEMPTS = 8  # upstream calls for one request, rate-limited and retired keys included
_SSE_HEADERS = {"content-type": sse.MEDIA_TYPE, "cache-control": "no-cache"}


def _after_answer(flow: http.HTTPFlow, step: str, work: Callable[[], None]) -> None:
    """Bookkeeping that follows a streamed answer, outside any hook's guard: a failure is logged, and the answer,
    which the client has by then, stays whole."""
    try:
        work()
    except Exception as error:  # whatever it is, the answer must not pay for it
        logger.error(
            "%s failed on %s after the upstream answered: %s: %s",
            step,
            flow.id,
            type(error).__name__,
            scrub.text(str(error)),
        )


def bind_pipe_socket() -> socket.socket:
    """The loopback socket the pipe will serve on; bound early because the listener's mode names its port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@dataclass
class Answer:
    """What the client gets: an open upstream stream, or a complete response (upstream's or ours)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    stream: aiohttp.ClientResponse | None = None
    upstream_body: bytes | None = None  # the upstream's own answer, when `body` is its translation: what is billed

    @classmethod
    def refusal(cls, api: str, refusal: QueueRefusal) -> "Answer":
        return cls.error(api, refusal.status, str(refusal), refusal.code, refusal.retry_after)

    @classmethod
    def error(cls, api: str, status: int, message: str, code: str, retry_after: float | None = None) -> "Answer":
        extra = [(b"retry-after", str(max(1, round(retry_after))).encode())] if retry_after else []
        return cls(
            status,
            [(b"content-type", b"application/json"), (b"x-proxy-error", code.encode()), *extra],
            json.dumps(error_body(api, status, message, code)).encode(),
        )


class UpstreamFailure(Exception):
    """No usable answer from the upstream (unreachable, too slow, cut off); the message is for the client."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass
class PipedRequest:
    """A flow pointed at the pipe: either an open upstream stream, or a request still waiting for its answer."""

    flow: http.HTTPFlow
    route: Route
    answer: Answer | None = None
    job: asyncio.Task | None = None
    position: Callable[[], int] = lambda: 0

    def follow_position(self, position: Callable[[], int]) -> None:
        """Called by the queue when the request joins it: `position()` is its current place."""
        self.position = position


def _identity(flow: http.HTTPFlow) -> str:
    """Whose request this is, for the queue's fairness: the gatekeeper's identity, else the client's address."""
    return flow_state(flow).identity or f"ip:{flow.client_conn.peername[0]}"


class Dispatcher:
    """Calls the upstream API with a key from the pool; streams SSE through the loopback pipe. Each request it
    takes on ends with one `request_settled` event."""

    def __init__(
        self,
        pipe_socket: socket.socket | None,
        pool: KeyPool,
        queue: WaitQueue,
        affinity: Affinity,
        quota: QuotaKeeper,
    ):
        self.pool = pool
        self.queue = queue
        self.affinity = affinity
        self.quota = quota
        self.pipe_socket = pipe_socket
        self.pipe_port = pipe_socket.getsockname()[1] if pipe_socket else 0
        self.session: aiohttp.ClientSession | None = None
        self.ready = asyncio.Event()
        self.piped: dict[str, PipedRequest] = {}
        self.jobs: dict[str, set[asyncio.Task]] = {}  # client connection id -> its requests' upstream work
        self.served = {OPENAI: 0, ANTHROPIC: 0}
        self.upstreams: dict[str, URL] = {}
        self._runner: web.AppRunner | None = None
        self._opening: asyncio.Task | None = None

    def load(self, loader):
        loader.add_option("openai_upstream_url", str, "https://api.openai.com", "Base URL of the OpenAI API (no /v1).")
        loader.add_option(
            "anthropic_upstream_url", str, "https://api.anthropic.com", "Base URL of the Anthropic API (no /v1)."
        )
        loader.add_option("upstream_connect_timeout", int, 10, "Seconds to wait for a connection to the upstream API.")
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

    def running(self):
        """Opens the upstream session, and the pipe in the background; requests and the key checker wait for
        `ready`."""
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None, connect=ctx.options.upstream_connect_timeout),
        )
        self._opening = asyncio.create_task(self._open_pipe())

    async def _open_pipe(self) -> None:
        """Serves the pipe; `ready` once it does (never, if it cannot: requests then fail closed)."""
        if self.pipe_socket is not None:
            app = web.Application()
            app.router.add_route("*", PIPE_PREFIX + "{token}", self._serve_pipe)
            app.router.add_route("*", "/{tail:.*}", self._serve_unrouted)
            self._runner = web.AppRunner(app, access_log=None)
            try:
                await self._runner.setup()
                await web.SockSite(self._runner, self.pipe_socket).start()
            except OSError as error:
                logger.error("the pipe cannot listen, so no request can be answered: %s", error)
                return
            logger.debug("the pipe (streamed answers, loopback only) listens on 127.0.0.1:%d", self.pipe_port)
        self.ready.set()

    def done(self) -> asyncio.Task:
        """Closes the pipe and the session in the background. The task is returned because mitmproxy's shutdown
        awaits what a hook returns (and then nothing is left open), while a script reload goes on at once."""
        if self._opening:
            self._opening.cancel()
        return asyncio.create_task(self._close())

    async def _close(self) -> None:
        if self._runner:
            await self._runner.cleanup()
        if self.session:
            await self.session.close()

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        if (route := forward_route(flow)) is None:
            return  # the pipe answers unrouted flows with a 500: nothing unchecked goes anywhere
        state = flow_state(flow)
        await asyncio.wait_for(self.ready.wait(), 10)
        state.upstream_url = str(self.upstreams[route.api].join(URL(route.upstream_path)))
        try:
            waits = self.queue.would_wait(_identity(flow), route.api, state.family, self.affinity.of(flow))
        except QueueRefusal as refusal:  # decided before anything was sent: a real status, streaming or not
            state.decision = refusal.code
            self._respond(flow, Answer.refusal(route.dialect, refusal))
            return
        if state.stream and waits:
            # A streaming client hears from us at once (headers, heartbeats) while its request waits for a key.
            piped = PipedRequest(flow, route)
            piped.job = self._start_job(flow, self._obtain(flow, route, on_queued=piped.follow_position))
            self._point_at_pipe(flow, piped)
            return
        job = self._start_job(flow, self._obtain(flow, route))
        await asyncio.wait({job})
        if job.cancelled():
            return  # the client left; mitmproxy ends the flow with an error
        answer = job.result()
        if answer.stream is not None:
            self._point_at_pipe(flow, PipedRequest(flow, route, answer))
        else:
            self._respond(flow, answer)

    def _respond(self, flow: http.HTTPFlow, answer: Answer) -> None:
        """A complete answer becomes the flow's response, and its usage is billed: nothing for an error, the proxy's
        estimate for a successful answer that reports none (as for a stream). Set first, the response stays
        whatever fails after it (fail_closed)."""
        state = flow_state(flow)
        flow.response = http.Response.make(answer.status, answer.body, answer.headers)
        flow.request.url = state.upstream_url  # only shown: mitmproxy connects nowhere
        upstream_body = answer.body if answer.upstream_body is None else answer.upstream_body
        billed, text = usage.read_answer(upstream_body) if answer.status < 400 else (None, "")
        if billed is None and answer.status < 300 and not ROUTES_BY_NAME[state.route].counts_tokens:
            billed = usage.estimate(self.quota.prompt_estimate_of(flow), len(text))
        self._settle(flow, billed, text)
        if answer.status < 400:
            self.affinity.answered(flow, answer.body)

    def _settle(self, flow: http.HTTPFlow, billed: Usage | None, completion: str = "") -> None:
        """Ends the request's accounting, once: its final usage (None: nothing was produced, nothing is billed) goes
        to the `request_settled` listeners, which bill, count and log it."""
        state = flow_state(flow)
        if state.settled:
            return
        state.settled = True
        billed, cost = self.quota.final_usage(flow, billed)
        # The synchronous trigger: requests settle in callbacks and `finally` blocks that cannot wait.
        ctx.master.addons.trigger(RequestSettledHook(flow, billed, cost, completion))

    @fail_closed
    async def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = flow_state(flow)
        if state.pipe_token:
            flow.response.stream = True
            flow.request.url = state.upstream_url  # the request has gone to the pipe; show the real target

    async def error(self, flow: http.HTTPFlow) -> None:
        """The client left before mitmproxy collected its stream: stop the upstream work."""
        token = flow_state(flow).pipe_token
        if token and (piped := self.piped.pop(token, None)):
            self._discard(piped)
            self._settle(flow, None)

    def client_disconnected(self, client) -> None:
        """A client that leaves takes its waiting or running upstream requests with it."""
        for job in self.jobs.pop(client.id, set()):
            job.cancel()

    def _start_job(self, flow: http.HTTPFlow, work) -> asyncio.Task:
        job = asyncio.create_task(work)
        jobs = self.jobs.setdefault(flow.client_conn.id, set())
        jobs.add(job)

        def finished(done: asyncio.Task) -> None:
            jobs.discard(done)
            if done.cancelled() or done.exception():
                self._settle(flow, None)  # nothing was produced: nothing is billed

        job.add_done_callback(finished)
        return job

    @staticmethod
    def _discard(piped: PipedRequest) -> None:
        if piped.job:
            piped.job.cancel()
        if piped.answer and piped.answer.stream is not None:
            piped.answer.stream.close()

    async def _obtain(self, flow: http.HTTPFlow, route: Route, on_queued=None) -> Answer:
        """The answer to the request: retried on other keys until one answers, or an error for the client."""
        state = flow_state(flow)
        api, family = route.api, state.family
        arrived = time.time()

        def queued(position: Callable[[], int]) -> None:
            state.queued = True
            if on_queued:
                on_queued(position)

        answer: Answer | None = None
        failed_key: PoolKey | None = None  # the key of a server error, retried once on another key
        suspected = False  # a request may make one key suspect; a second such answer is the request's own fault
        for _ in range(MAX_ATTEMPTS):
            if failed_key is None:
                try:
                    affinity = self.affinity.of(flow)
                    key = await self.queue.acquire(_identity(flow), api, family, arrived, affinity, queued)
                except QueueRefusal as refusal:
                    if suspected and refusal.code == "no_keys_available":
                        break  # the only key is suspect: the upstream's own answer says more than ours
                    state.decision = refusal.code
                    return Answer.refusal(route.dialect, refusal)
                self.affinity.keep(flow, key)
            elif state.pinned or (key := self.pool.choose(api, family, exclude=[failed_key])) is None:
                return answer  # a pinned request's conversation lives on its one key
            state.queue_ms = round((time.time() - arrived) * 1000)
            state.keys.append(key.id)
            answer, verdict = await self._attempt(flow, route, key, may_suspect=not suspected)
            if verdict is Verdict.RATE_LIMITED:
                continue
            if verdict in RETIRING and not suspected:
                suspected = True
                continue
            if verdict is Verdict.SERVER_ERROR and failed_key is None:
                failed_key = key
                continue
            break
        state.decision = "served" if answer.status < 400 else state.decision or "upstream_error"
        if answer.status < 400:
            self.served[api] += 1
        return answer

    async def _attempt(
        self, flow: http.HTTPFlow, route: Route, key: PoolKey, may_suspect: bool
    ) -> tuple[Answer, Verdict]:
        """One upstream call with one key, and what its answer means. The key is always given back."""
        state = flow_state(flow)
        pool, family = self.pool, state.family
        try:
            upstream, body = await self._call(flow, key)
        except UpstreamFailure as failure:
            pool.abandon(key, family)
            state.decision = failure.code
            logger.warning("upstream %s: %s with key %s", route.api, failure.code, key.id)
            return Answer.error(route.dialect, failure.status, str(failure), failure.code), Verdict.SERVER_ERROR
        except BaseException:
            pool.abandon(key, family)
            raise
        client_headers = headers.client_response_headers(upstream.headers)
        verdict = pool.release(key, family, upstream.status, upstream.headers, body or b"", state.model, may_suspect)
        if body is None:
            return Answer(upstream.status, client_headers, stream=upstream), verdict
        if not upstream.ok:
            logger.info("upstream %s answered %d with key %s", route.api, upstream.status, key.id)
            body = scrub.body(body)
        if route.client_format and verdict is not Verdict.RATE_LIMITED:  # an answer the client may get
            return Answer(upstream.status, client_headers, translate.message_to_chat(body), upstream_body=body), verdict
        return Answer(upstream.status, client_headers, body), verdict

    async def _call(self, flow: http.HTTPFlow, key: PoolKey) -> tuple[aiohttp.ClientResponse, bytes | None]:
        """Sends the request; returns the response and its body, or None for a stream still to be read."""
        state = flow_state(flow)
        started = time.monotonic()
        try:
            async with asyncio.timeout(ctx.options.upstream_timeout):
                upstream = await self.session.request(
                    flow.request.method,
                    state.upstream_url,
                    data=flow.request.raw_content or b"",
                    headers=[*flow.request.headers.items(multi=True), *key.auth_headers()],
                    allow_redirects=False,
                )
        except TimeoutError:
            message = f"The upstream API did not answer within {ctx.options.upstream_timeout} s."
            raise UpstreamFailure(504, "upstream_timeout", message) from None
        except aiohttp.ClientError:
            message = "The proxy could not reach the upstream API; try again shortly."
            raise UpstreamFailure(502, "upstream_unreachable", message) from None
        state.upstream_status = upstream.status
        state.upstream_ms = round((time.monotonic() - started) * 1000)
        if upstream.ok and upstream.content_type == sse.MEDIA_TYPE:
            return upstream, None
        try:
            return upstream, await self._read_body(upstream)
        except (TimeoutError, aiohttp.ClientError):
            raise UpstreamFailure(502, "upstream_broken", "The upstream API broke off its answer.") from None

    @staticmethod
    async def _read_body(upstream: aiohttp.ClientResponse) -> bytes:
        async with upstream:
            async with asyncio.timeout(ctx.options.upstream_idle_timeout):
                body = await upstream.content.read(MAX_BUFFERED_RESPONSE + 1)
        if len(body) > MAX_BUFFERED_RESPONSE:
            raise aiohttp.ClientPayloadError("answer too large")
        content_encoding = upstream.headers.get("content-encoding", "identity")
        return body if content_encoding == "identity" else encoding.decode(body, content_encoding)

    def _point_at_pipe(self, flow: http.HTTPFlow, piped: PipedRequest) -> None:
        token = secrets.token_urlsafe(24)
        self.piped[token] = piped
        flow_state(flow).pipe_token = token
        # The pipe is the listener's reverse target already; in local (regular) mode the flow is pointed at it.
        flow.request.scheme, flow.request.host, flow.request.port = "http", "127.0.0.1", self.pipe_port
        # The hop needs the framing headers the allowlist removed.
        flow.request.headers["host"] = f"{flow.request.host}:{flow.request.port}"
        flow.request.headers["content-length"] = str(len(flow.request.raw_content or b""))
        flow.request.path = PIPE_PREFIX + token

    async def _serve_pipe(self, request: web.Request) -> web.StreamResponse:
        """Streams one answer to mitmproxy, which streams it on to the client."""
        piped = self.piped.pop(request.match_info["token"], None)
        if piped is None:
            return await self._serve_unrouted(request)
        try:
            if piped.job is None:
                return await self._pipe_stream(request, piped, piped.answer)
            return await self._pipe_after_wait(request, piped)
        finally:
            self._discard(piped)
            _after_answer(piped.flow, "settling", lambda: self._settle(piped.flow, None))  # no-op once billed

    async def _pipe_after_wait(self, request: web.Request, piped: PipedRequest) -> web.StreamResponse:
        """SSE headers and heartbeats while the request waits for a key, then the answer as SSE."""
        response = web.StreamResponse(status=200, headers=_SSE_HEADERS)
        waited = time.monotonic()
        try:
            await response.prepare(request)
            while True:
                heartbeat = f"queued, position {piped.position()}, waited {time.monotonic() - waited:.0f}s"
                await response.write(sse.comment(heartbeat))
                done, _ = await asyncio.wait({piped.job}, timeout=ctx.options.queue_heartbeat)
                if done:
                    break
        except ConnectionError:
            return response  # the client left while waiting; _discard cancels the wait
        if piped.job.cancelled():
            return response
        if piped.job.exception():
            logger.error("a queued request failed: %r", scrub.text(repr(piped.job.exception())))
            message = "The proxy hit an internal error."
            await response.write(sse_error_event(piped.route.dialect, 500, message, "proxy_internal_error"))
            return response
        answer = piped.job.result()
        if answer.stream is not None:
            return await self._pipe_stream(request, piped, answer, response)
        await response.write(self._error_event(piped.route.dialect, answer))
        return response

    @staticmethod
    def _error_event(api: str, answer: Answer) -> bytes:
        """An error answer as an SSE event, for a client whose stream already began."""
        try:
            body = json.loads(answer.body)
        except ValueError:
            body = None
        if not isinstance(body, dict) or "error" not in body:
            return sse_error_event(api, answer.status, "The upstream API refused the request.", "upstream_error")
        return error_event(api, body)

    async def _pipe_stream(
        self, request: web.Request, piped: PipedRequest, answer: Answer, response: web.StreamResponse | None = None
    ) -> web.StreamResponse:
        """Passes the upstream's events on as they come, reading their usage; bills what was streamed."""
        api, upstream, state = piped.route.api, answer.stream, flow_state(piped.flow)
        meter = usage.StreamMeter(api, drop_usage_chunk=state.usage_chunk_added, keep_text=ctx.options.prompt_logging)
        translator = translate.MessagesToChatStream(state.client_wants_usage) if piped.route.client_format else None
        complete = False
        try:
            if response is None:
                response = web.StreamResponse(
                    # aiohttp sends text headers; a byte that is not UTF-8 (the upstream's mistake) becomes U+FFFD.
                    status=answer.status,
                    headers=[(k.decode(), v.decode(errors="replace")) for k, v in answer.headers],
                )
                await response.prepare(request)
            while True:
                try:
                    async with asyncio.timeout(ctx.options.upstream_idle_timeout):
                        chunk = await upstream.content.readany()
                except (TimeoutError, aiohttp.ClientError) as error:
                    logger.warning("upstream %s stream broke off: %s", api, type(error).__name__)
                    message = "The upstream API broke off the stream."
                    await response.write(sse_error_event(piped.route.dialect, 502, message, "upstream_broken"))
                    break
                passed = meter.feed(chunk)
                if state.first_byte_ms is None:
                    state.first_byte_ms = round((time.time() - piped.flow.request.timestamp_start) * 1000)
                await response.write(translator.feed(passed) if translator else passed)
                if not chunk:
                    complete = True
                    break
        except ConnectionError:
            pass  # the client left; closing the upstream connection below stops the generation
        except Exception as error:  # the proxy's own fault: told in the API's format, never a cut
            logger.error(
                "passing on a %s stream failed on %s: %s: %s",
                api,
                piped.flow.id,
                type(error).__name__,
                scrub.text(str(error)),
            )
            message, dialect = "The proxy could not pass on the rest of the upstream's answer.", piped.route.dialect
            if response is None or not response.prepared:
                return web.json_response(error_body(dialect, 500, message, "proxy_internal_error"), status=500)
            with contextlib.suppress(ConnectionError):
                await response.write(sse_error_event(dialect, 500, message, "proxy_internal_error"))
        finally:
            if complete:
                upstream.release()
            else:
                upstream.close()
            flow, text = piped.flow, "".join(meter.text_parts)
            _after_answer(
                flow, "settling", lambda: self._settle(flow, meter.finish(self.quota.prompt_estimate_of(flow)), text)
            )
            _after_answer(flow, "affinity", lambda: self.affinity.streamed(flow, meter.response_id))
        return response

    async def _serve_unrouted(self, request: web.Request) -> web.Response:
        """Whatever reaches the pipe without a token got past the pipeline unchecked: refuse it."""
        logger.error("a request reached the pipe without passing the pipeline: %s", request.method)
        api = api_of_path(request.raw_path.encode("utf-8", "surrogateescape"))
        message = "The proxy refused a request it had not checked."
        return web.json_response(error_body(api, 500, message, "proxy_internal_error"), status=500)
