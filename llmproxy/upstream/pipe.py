"""The pipe: a loopback HTTP server in the proxy's event loop, through which streamed answers reach mitmproxy.

A flow whose answer streams is pointed at `/pipe/<token>`, and mitmproxy streams the pipe's response to the client
chunk by chunk, as it would stream any upstream. A streaming request that has to wait for a key is piped at once:
the pipe sends the SSE headers and heartbeat comments while it waits, then its stream. Each token serves once;
anything else that reaches the pipe got past the pipeline unchecked and is refused.
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

from llmproxy import scrub
from llmproxy.api import sse
from llmproxy.api.errors import api_of_path, error_body, error_event, sse_error_event
from llmproxy.api.routes import Route
from llmproxy.api.translate import MessagesToChatStream
from llmproxy.api.usage import StreamMeter, Usage
from llmproxy.flowstate import FlowState
from llmproxy.upstream.client import Answer

logger = logging.getLogger(__name__)

PIPE_PREFIX = "/pipe/"
_SSE_HEADERS = {"content-type": sse.MEDIA_TYPE, "cache-control": "no-cache"}


def bind_pipe_socket() -> socket.socket:
    """The loopback socket the pipe will serve on; bound before the addons are built, which are given its address."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def _after_answer(name: str, step: str, work: Callable[[], None]) -> None:
    """Bookkeeping that follows a streamed answer, outside any hook's guard: a failure is logged, and the answer,
    which the client has by then, stays whole."""
    try:
        work()
    except Exception as error:  # whatever it is, the answer must not pay for it
        logger.error(
            "%s failed on %s after the upstream answered: %s: %s",
            step,
            name,
            type(error).__name__,
            scrub.text(str(error)),
        )


@dataclass
class PipedRequest:
    """A request the pipe answers: with an open upstream stream, or once the job that waits for its answer ends.
    The callbacks are the dispatcher's, for the request's flow."""

    name: str  # the flow's id, for log lines
    route: Route
    state: FlowState
    arrived: float  # when the request began to arrive (Unix time): the first streamed byte's delay counts from it
    settle: Callable[[Usage | None, str], None]  # ends the request's accounting, once: (usage or None, completion)
    prompt_estimate: Callable[[], int]  # the prompt's tokens as estimated, for a stream that reports none
    streamed: Callable[[object], None]  # the stream ended having made this response (its id as it came), or None
    answer: Answer | None = None
    job: asyncio.Task | None = None
    position: Callable[[], int] = lambda: 0

    def follow_position(self, position: Callable[[], int]) -> None:
        """Called by the queue when the request joins it: `position()` is its current place."""
        self.position = position

    def discard(self) -> None:
        """Stops the upstream work: the wait for an answer, or the open stream."""
        if self.job:
            self.job.cancel()
        if self.answer and self.answer.stream is not None:
            self.answer.stream.close()


class Pipe:
    """Serves each piped request once, under its token, on the loopback socket (without one, only the tokens)."""

    def __init__(self, sock: socket.socket | None):
        self.socket = sock
        self.port = sock.getsockname()[1] if sock else 0
        self.idle_timeout = 120  # UPSTREAM_IDLE_TIMEOUT: seconds of upstream silence tolerated within a stream
        self.heartbeat = 10  # QUEUE_HEARTBEAT: seconds between two comments to a waiting stream
        self.keep_text = False  # PROMPT_LOGGING: the streamed text is kept for the prompt log
        self.piped: dict[str, PipedRequest] = {}
        self.ready = asyncio.Event()  # set once it serves; never if it cannot (requests then fail closed)
        self._runner: web.AppRunner | None = None

    async def open(self) -> None:
        """Starts serving on the socket; `ready` once it does."""
        if self.socket is None:
            self.ready.set()
            return
        app = web.Application()
        app.router.add_route("*", PIPE_PREFIX + "{token}", self._serve)
        app.router.add_route("*", "/{tail:.*}", self._refuse)
        self._runner = web.AppRunner(app, access_log=None)
        try:
            await self._runner.setup()
            await web.SockSite(self._runner, self.socket).start()
        except OSError as error:
            logger.error("the pipe cannot listen, so no request can be answered: %s", error)
            return
        logger.debug("the pipe (streamed answers, loopback only) listens on 127.0.0.1:%d", self.port)
        self.ready.set()

    async def close(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    def admit(self, piped: PipedRequest) -> str:
        """The token under which the pipe serves `piped`, once."""
        token = secrets.token_urlsafe(24)
        self.piped[token] = piped
        return token

    def withdraw(self, token: str) -> PipedRequest | None:
        """The request of a token the pipe has not served yet, no longer served."""
        return self.piped.pop(token, None)

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        """Streams one answer to mitmproxy, which streams it on to the client."""
        piped = self.piped.pop(request.match_info["token"], None)
        if piped is None:
            return await self._refuse(request)
        try:
            if piped.job is None:
                return await self._stream(request, piped, piped.answer)
            return await self._stream_after_wait(request, piped)
        finally:
            piped.discard()
            _after_answer(piped.name, "settling", lambda: piped.settle(None, ""))  # no-op once billed

    async def _stream_after_wait(self, request: web.Request, piped: PipedRequest) -> web.StreamResponse:
        """SSE headers and heartbeats while the request waits for a key, then the answer as SSE."""
        response = web.StreamResponse(status=200, headers=_SSE_HEADERS)
        waited = time.monotonic()
        try:
            await response.prepare(request)
            while True:
                heartbeat = f"queued, position {piped.position()}, waited {time.monotonic() - waited:.0f}s"
                await response.write(sse.comment(heartbeat))
                done, _ = await asyncio.wait({piped.job}, timeout=self.heartbeat)
                if done:
                    break
        except ConnectionError:
            return response  # the client left while waiting; discard() cancels the wait
        if piped.job.cancelled():
            return response
        if piped.job.exception():
            logger.error("a queued request failed: %r", scrub.text(repr(piped.job.exception())))
            message = "The proxy hit an internal error."
            await response.write(sse_error_event(piped.route.dialect, 500, message, "proxy_internal_error"))
            return response
        answer = piped.job.result()
        if answer.stream is not None:
            return await self._stream(request, piped, answer, response)
        await response.write(_error_event(piped.route.dialect, answer))
        return response

    async def _stream(
        self, request: web.Request, piped: PipedRequest, answer: Answer, response: web.StreamResponse | None = None
    ) -> web.StreamResponse:
        """Passes the upstream's events on as they come, reading their usage; bills what was streamed."""
        api, upstream, state = piped.route.api, answer.stream, piped.state
        meter = StreamMeter(api, drop_usage_chunk=state.usage_chunk_added, keep_text=self.keep_text)
        translator = MessagesToChatStream(state.client_wants_usage) if piped.route.client_format else None
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
                    async with asyncio.timeout(self.idle_timeout):
                        chunk = await upstream.content.readany()
                except (TimeoutError, aiohttp.ClientError) as error:
                    logger.warning("upstream %s stream broke off: %s", api, type(error).__name__)
                    message = "The upstream API broke off the stream."
                    await response.write(sse_error_event(piped.route.dialect, 502, message, "upstream_broken"))
                    break
                passed = meter.feed(chunk)
                if state.first_byte_ms is None:
                    state.first_byte_ms = round((time.time() - piped.arrived) * 1000)
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
                piped.name,
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
            text = "".join(meter.text_parts)
            _after_answer(piped.name, "settling", lambda: piped.settle(meter.finish(piped.prompt_estimate()), text))
            _after_answer(piped.name, "affinity", lambda: piped.streamed(meter.response_id))
        return response

    async def _refuse(self, request: web.Request) -> web.Response:
        """Whatever reaches the pipe without a token got past the pipeline unchecked: refuse it."""
        logger.error("a request reached the pipe without passing the pipeline: %s", request.method)
        api = api_of_path(request.raw_path.encode("utf-8", "surrogateescape"))
        message = "The proxy refused a request it had not checked."
        return web.json_response(error_body(api, 500, message, "proxy_internal_error"), status=500)


def _error_event(api: str, answer: Answer) -> bytes:
    """An error answer as an SSE event, for a client whose stream already began."""
    try:
        body = json.loads(answer.body)
    except ValueError:
        body = None
    if not isinstance(body, dict) or "error" not in body:
        return sse_error_event(api, answer.status, "The upstream API refused the request.", "upstream_error")
    return error_event(api, body)
