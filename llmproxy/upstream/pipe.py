"""The pipe: a loopback HTTP server in the proxy's event loop, through which streamed answers reach mitmproxy.

A flow whose answer streams is pointed at `/pipe/<token>`, and mitmproxy streams the pipe's response to the client
chunk by chunk, as it would stream any upstream. A streaming request that has to wait for a key is piped at once:
the pipe sends the SSE headers and heartbeat comments while it waits, then its stream. Each token serves once;
anything else that reaches the pipe got past the pipeline unchecked and is refused.

Its only client is mitmproxy in the same process, sending requests it was told to send, so the pipe speaks just
that much HTTP/1.1 itself (a request head, a body of content-length, chunked answers on a kept-alive connection)
rather than through aiohttp's web server: with 500 concurrent streams, that server cost about 0.5 ms more CPU and
12 kB more memory per stream than this (issue 18).
"""

import asyncio
import json
import logging
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

import aiohttp

from llmproxy import scrub
from llmproxy.api import sse
from llmproxy.api.errors import api_of_path, error_body, error_event, sse_error_event
from llmproxy.api.routes import Route
from llmproxy.api.translate import MessagesToChatStream
from llmproxy.api.usage import Usage
from llmproxy.flowstate import FlowState
from llmproxy.services import stream_meter
from llmproxy.upstream.client import Answer

logger = logging.getLogger(__name__)

PIPE_PREFIX = "/pipe/"
_SSE_HEADERS = [(b"content-type", sse.MEDIA_TYPE.encode()), (b"cache-control", b"no-cache")]
_HEAD_LIMIT = 1 << 20  # bytes of a request head: mitmproxy sends the allowlisted headers, far fewer


def bind_pipe_socket() -> socket.socket:
    """The loopback socket the pipe will serve on; bound before the addons are built, which are given its address."""
    # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on accepted sockets whose proto says TCP. Without
    # it, an event written while the previous segment waits for mitmproxy's delayed ACK was held back 40 ms.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
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


class PipeResponse:
    """One answer on a pipe connection, framed in chunks so that the connection serves the next one."""

    def __init__(self, writer: asyncio.StreamWriter, status: int, headers: list[tuple[bytes, bytes]]):
        self.writer, self.status, self.headers = writer, status, headers
        self.prepared = False

    async def prepare(self) -> None:
        """Sends the status line and headers."""
        head = [b"HTTP/1.1 %d %s\r\n" % (self.status, _reason(self.status))]
        head += [name + b": " + value + b"\r\n" for name, value in self.headers]
        self.writer.write(b"".join(head) + b"transfer-encoding: chunked\r\n\r\n")
        self.prepared = True
        await self.writer.drain()

    async def write(self, data: bytes) -> None:
        """Sends a chunk (nothing for b""); raises ConnectionError once mitmproxy has gone."""
        if not self.prepared:
            await self.prepare()
        if data:
            self.writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await self.writer.drain()

    async def finish(self) -> None:
        if not self.prepared:
            await self.prepare()
        self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()

    @classmethod
    async def json(cls, writer: asyncio.StreamWriter, status: int, body: dict) -> None:
        response = cls(writer, status, [(b"content-type", b"application/json")])
        await response.write(json.dumps(body).encode())
        await response.finish()


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
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        """Starts serving on the socket; `ready` once it does."""
        if self.socket is None:
            self.ready.set()
            return
        try:
            self._server = await asyncio.start_server(self._connection, sock=self.socket, limit=_HEAD_LIMIT)
        except OSError as error:
            logger.error("the pipe cannot listen, so no request can be answered: %s", error)
            return
        logger.debug("the pipe (streamed answers, loopback only) listens on 127.0.0.1:%d", self.port)
        self.ready.set()

    async def close(self) -> None:
        if self._server:
            self._server.close()
            for writer in self._connections:  # streams in progress end with the proxy
                writer.transport.abort()
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serves mitmproxy's requests on one connection, one after the other, until it closes it."""
        self._connections.add(writer)
        try:
            while True:
                target, closes = await _read_request(reader)
                if target.startswith(PIPE_PREFIX.encode()):
                    await self._serve(target[len(PIPE_PREFIX) :].decode("ascii", "replace"), target, writer)
                else:
                    await self._refuse(target, writer)
                if closes:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass  # mitmproxy closed the connection, or sent what it never sends
        finally:
            self._connections.discard(writer)
            writer.close()

    def admit(self, piped: PipedRequest) -> str:
        """The token under which the pipe serves `piped`, once."""
        token = secrets.token_urlsafe(24)
        self.piped[token] = piped
        return token

    def withdraw(self, token: str) -> PipedRequest | None:
        """The request of a token the pipe has not served yet, no longer served."""
        return self.piped.pop(token, None)

    async def _serve(self, token: str, target: bytes, writer: asyncio.StreamWriter) -> None:
        """Streams one answer to mitmproxy, which streams it on to the client."""
        piped = self.piped.pop(token, None)
        if piped is None:
            return await self._refuse(target, writer)
        try:
            if piped.job is None:
                return await self._stream(writer, piped, piped.answer)
            return await self._stream_after_wait(writer, piped)
        finally:
            piped.discard()
            _after_answer(piped.name, "settling", lambda: piped.settle(None, ""))  # no-op once billed

    async def _stream_after_wait(self, writer: asyncio.StreamWriter, piped: PipedRequest) -> None:
        """SSE headers and heartbeats while the request waits for a key, then the answer as SSE."""
        response = PipeResponse(writer, 200, _SSE_HEADERS)
        waited = time.monotonic()
        try:
            await response.prepare()
            while True:
                heartbeat = f"queued, position {piped.position()}, waited {time.monotonic() - waited:.0f}s"
                await response.write(sse.comment(heartbeat))
                done, _ = await asyncio.wait({piped.job}, timeout=self.heartbeat)
                if done:
                    break
        except ConnectionError:
            raise  # the client left while waiting; discard() cancels the wait
        if piped.job.cancelled():
            raise ConnectionError("the request's client left")  # and so did mitmproxy's connection to the pipe
        if piped.job.exception():
            logger.error("a queued request failed: %r", scrub.text(repr(piped.job.exception())))
            message = "The proxy hit an internal error."
            await response.write(sse_error_event(piped.route.dialect, 500, message, "proxy_internal_error"))
            return await response.finish()
        answer = piped.job.result()
        if answer.stream is not None:
            return await self._stream(writer, piped, answer, response)
        await response.write(_error_event(piped.route.dialect, answer))
        await response.finish()

    async def _stream(
        self, writer: asyncio.StreamWriter, piped: PipedRequest, answer: Answer, response: PipeResponse | None = None
    ) -> None:
        """Passes the upstream's events on as they come, reading their usage; bills what was streamed."""
        service, upstream, state = piped.route.service, answer.stream, piped.state
        meter = stream_meter(piped.route.wire, drop_usage_chunk=state.usage_chunk_added, keep_text=self.keep_text)
        translator = MessagesToChatStream(state.client_wants_usage) if piped.route.client_format else None
        complete = False
        try:
            if response is None:
                response = PipeResponse(writer, answer.status, answer.headers)
                await response.prepare()
            while True:
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        received = await upstream.content.readany()
                    chunk = answer.decode(received) if answer.decode and received else received
                except (TimeoutError, aiohttp.ClientError) as error:
                    logger.warning("upstream %s stream broke off: %s", service, type(error).__name__)
                    message = "The upstream API broke off the stream."
                    await response.write(sse_error_event(piped.route.dialect, 502, message, "upstream_broken"))
                    break
                passed = meter.feed(chunk)
                if state.first_byte_ms is None:
                    state.first_byte_ms = round((time.time() - piped.arrived) * 1000)
                await response.write(translator.feed(passed) if translator else passed)
                if not received:
                    complete = True
                    break
            await response.finish()
        except ConnectionError:
            raise  # the client left; closing the upstream connection below stops the generation
        except Exception as error:  # the proxy's own fault: told in the API's format, never a cut
            logger.error(
                "passing on a %s stream failed on %s: %s: %s",
                service,
                piped.name,
                type(error).__name__,
                scrub.text(str(error)),
            )
            message, dialect = "The proxy could not pass on the rest of the upstream's answer.", piped.route.dialect
            if response is None or not response.prepared:
                await PipeResponse.json(writer, 500, error_body(dialect, 500, message, "proxy_internal_error"))
            else:
                await response.write(sse_error_event(dialect, 500, message, "proxy_internal_error"))
                await response.finish()
        finally:
            if complete:
                upstream.release()
            else:
                upstream.close()
            text = "".join(meter.text_parts)
            _after_answer(piped.name, "settling", lambda: piped.settle(meter.finish(piped.prompt_estimate()), text))
            _after_answer(piped.name, "affinity", lambda: piped.streamed(meter.response_id))

    @staticmethod
    async def _refuse(target: bytes, writer: asyncio.StreamWriter) -> None:
        """Whatever reaches the pipe without a token got past the pipeline unchecked: refuse it."""
        logger.error("a request reached the pipe without passing the pipeline")
        message = "The proxy refused a request it had not checked."
        await PipeResponse.json(writer, 500, error_body(api_of_path(target), 500, message, "proxy_internal_error"))


def _reason(status: int) -> bytes:
    """The reason phrase; none for a status the standard does not name (Anthropic's 529, say)."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """Reads one request (its body is the client's, which mitmproxy shows; the pipe has it already): its target,
    and whether the connection closes after the answer."""
    head = await reader.readuntil(b"\r\n\r\n")
    request_line, *header_lines = head[:-4].split(b"\r\n")
    _, target, version = request_line.split(b" ", 2)
    length, closes = 0, version == b"HTTP/1.0"
    for line in header_lines:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            raise ValueError("a chunked request")  # mitmproxy sends the pipe's requests with a content-length
        elif name == b"connection":
            closes = b"close" in value.lower()
    if length:
        await reader.readexactly(length)
    return target, closes


def _error_event(api: str, answer: Answer) -> bytes:
    """An error answer as an SSE event, for a client whose stream already began."""
    try:
        body = json.loads(answer.body)
    except ValueError:
        body = None
    if not isinstance(body, dict) or "error" not in body:
        return sse_error_event(api, answer.status, "The upstream API refused the request.", "upstream_error")
    return error_event(api, body)
