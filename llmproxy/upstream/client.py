"""The upstream HTTP client: one pooled aiohttp session, one call at a time, and a buffered body read within limits.

The key reaches `send` only within the outgoing request its service prepared for one attempt
(llmproxy/services): it is never on a flow, nor on the request the caller keeps.
"""

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import yarl

from llmproxy.api.errors import error_body
from llmproxy.pool.queue import QueueRefusal
from llmproxy.services.base import Outgoing, UpstreamFailure

MAX_BUFFERED_RESPONSE = 64 * 1024 * 1024  # a JSON answer larger than this is not an LLM answer


@dataclass
class Answer:
    """What the client gets: an open upstream stream, or a complete response (upstream's or ours)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    stream: aiohttp.ClientResponse | None = None
    upstream_body: bytes | None = None  # the upstream's own answer, when `body` is its translation: what is billed
    decode: Callable[[bytes], bytes] | None = None  # the stream's bytes as the client's dialect's SSE (Bedrock's)

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


@dataclass(frozen=True)
class UpstreamRequest:
    """A client's request as it goes upstream, taken from its flow once: every attempt sends the same."""

    method: str
    url: str
    body: bytes
    headers: list[tuple[str, str]]  # the allowlisted ones; never a key


class UpstreamClient:
    """The pooled aiohttp session, shared by the dispatcher's calls and the key checker's probes."""

    def __init__(self, decode: Callable[[bytes, str], bytes]):
        self.decode = decode  # `decode(body, content_encoding)`: a buffered body as the client gets it
        self.session: aiohttp.ClientSession | None = None
        self.answer_timeout = 600  # UPSTREAM_TIMEOUT: seconds until the response headers
        self.idle_timeout = 120  # UPSTREAM_IDLE_TIMEOUT: seconds of silence in the middle of a body

    def open(self, connect_timeout: float) -> None:
        # Bodies pass as they come (streams untouched) and no header is added that the client did not send. No
        # cookie jar: a cookie an API sets (Cloudflare's) would otherwise go along with every user's requests.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None, connect=connect_timeout),
        )

    async def close(self) -> None:
        if self.session:
            await self.session.close()

    async def send(self, request: UpstreamRequest, outgoing: Outgoing) -> aiohttp.ClientResponse:
        """Sends the request as its service prepared it for one key; the response as soon as its headers are in."""
        try:
            async with asyncio.timeout(self.answer_timeout):
                return await self.session.request(
                    request.method,
                    # As the service built it: a signature covers the path as sent (Bedrock's `%3A` in a model id),
                    # which aiohttp would otherwise requote.
                    yarl.URL(outgoing.url, encoded=True),
                    data=outgoing.body,
                    headers=outgoing.headers,
                    allow_redirects=False,
                )
        except TimeoutError:
            message = f"The upstream API did not answer within {self.answer_timeout} s."
            raise UpstreamFailure(504, "upstream_timeout", message) from None
        except aiohttp.ClientError:
            message = "The proxy could not reach the upstream API; try again shortly."
            raise UpstreamFailure(502, "upstream_unreachable", message) from None

    async def read_body(self, upstream: aiohttp.ClientResponse) -> bytes:
        """The whole body of an answer that is not streamed, decoded; the connection goes back to the pool."""
        try:
            async with upstream:
                async with asyncio.timeout(self.idle_timeout):
                    body = await upstream.content.read(MAX_BUFFERED_RESPONSE + 1)
            if len(body) > MAX_BUFFERED_RESPONSE:
                raise aiohttp.ClientPayloadError("answer too large")
        except (TimeoutError, aiohttp.ClientError):
            raise UpstreamFailure(502, "upstream_broken", "The upstream API broke off its answer.") from None
        content_encoding = upstream.headers.get("content-encoding", "identity")
        return body if content_encoding == "identity" else self.decode(body, content_encoding)
