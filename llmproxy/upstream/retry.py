"""Obtaining the answer to a request: a key from the pool (waiting in the queue while every key rests), the call,
and what the answer says about the key. A rate-limited, revoked or over-quota key is replaced by another before
anything reaches the client; a server error is tried once more on another key."""

import logging
import time
from collections.abc import Callable

import aiohttp
from yarl import URL

from llmproxy import scrub
from llmproxy.api import sse
from llmproxy.api.headers import client_response_headers
from llmproxy.api.routes import Route
from llmproxy.api.translate import message_to_chat
from llmproxy.flowstate import FlowState
from llmproxy.pool.keys import RETIRING, KeyAffinity, KeyPool, PoolKey, Verdict
from llmproxy.pool.queue import QueueRefusal, WaitQueue
from llmproxy.services.base import Service, UpstreamFailure
from llmproxy.upstream.client import Answer, UpstreamClient, UpstreamRequest

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 8  # upstream calls for one request, rate-limited and retired keys included


class PooledCaller:
    """Calls the upstream with keys from the pool until one answers; counts the requests served per service."""

    def __init__(
        self,
        services: dict[str, Service],
        upstreams: dict[str, URL],
        pool: KeyPool,
        queue: WaitQueue,
        client: UpstreamClient,
    ):
        self.services = services
        self.upstreams = upstreams  # each service's configured base URL (the dispatcher's, kept up to date)
        self.pool = pool
        self.queue = queue
        self.client = client
        self.served = dict.fromkeys(services, 0)

    async def obtain(
        self,
        request: UpstreamRequest,
        route: Route,
        state: FlowState,
        *,
        identity: str,
        affinity: Callable[[], KeyAffinity | None],
        keep: Callable[[PoolKey], None],
        on_queued: Callable[[Callable[[], int]], None] | None = None,
    ) -> Answer:
        """The answer to the request: retried on other keys until one answers, or an error for the client.
        `identity` is whose request it is (the queue's fairness); `affinity()` names the key the request's
        conversation lives on, and `keep(key)` moves the conversation to the key it got."""
        service, family = route.service, state.family
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
                    key = await self.queue.acquire(identity, service, family, arrived, affinity(), queued)
                except QueueRefusal as refusal:
                    if suspected and refusal.code == "no_keys_available":
                        break  # the only key is suspect: the upstream's own answer says more than ours
                    state.decision = refusal.code
                    return Answer.refusal(route.dialect, refusal)
                keep(key)
            elif state.pinned or (key := self.pool.choose(service, family, exclude=[failed_key])) is None:
                return answer  # a pinned request's conversation lives on its one key
            state.queue_ms = round((time.time() - arrived) * 1000)
            state.keys.append(key.id)
            answer, verdict = await self._attempt(request, route, state, key, may_suspect=not suspected)
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
            self.served[service] += 1
        return answer

    async def _attempt(
        self, request: UpstreamRequest, route: Route, state: FlowState, key: PoolKey, may_suspect: bool
    ) -> tuple[Answer, Verdict]:
        """One upstream call with one key, and what its answer means. The key is always given back."""
        pool, family = self.pool, state.family
        try:
            upstream, body = await self._call(request, route, state, key)
        except UpstreamFailure as failure:
            state.decision = failure.code
            logger.warning("upstream %s: %s with key %s", route.service, failure.code, key.id)
            answer = Answer.error(route.dialect, failure.status, str(failure), failure.code)
            if failure.verdict is None:
                pool.abandon(key, family)
                return answer, Verdict.SERVER_ERROR
            # What the service learned about the key (a refused credential) counts as an answer would.
            return answer, pool.release(key, family, failure.status, {}, b"", state.model, may_suspect, failure.verdict)
        except BaseException:
            pool.abandon(key, family)
            raise
        service, status = self.services[route.service], upstream.status
        client_headers = client_response_headers(upstream.headers)
        verdict = service.verdict(status, upstream.headers, body or b"")
        verdict = pool.release(key, family, status, upstream.headers, b"", state.model, may_suspect, verdict)
        if body is None:
            if decode := service.stream_decoder():  # the client gets the dialect's SSE
                client_headers = [(n, v) for n, v in client_headers if n != b"content-type"]
                client_headers.append((b"content-type", sse.MEDIA_TYPE.encode()))
            return Answer(status, client_headers, stream=upstream, decode=decode), verdict
        if not upstream.ok:
            logger.info("upstream %s answered %d with key %s", route.service, status, key.id)
            status, body = service.client_error(status, upstream.headers, body)
            body = scrub.body(body)
        if route.client_format and verdict is not Verdict.RATE_LIMITED:  # an answer the client may get
            return Answer(status, client_headers, message_to_chat(body), upstream_body=body), verdict
        return Answer(status, client_headers, body), verdict

    async def _call(
        self, request: UpstreamRequest, route: Route, state: FlowState, key: PoolKey
    ) -> tuple[aiohttp.ClientResponse, bytes | None]:
        """Sends the request with the key, as its service wants it; returns the response and its body, or None for
        a stream still to be read."""
        started = time.monotonic()
        service = route.service
        outgoing = await self.services[service].prepare(request, route, key, self.upstreams[service])
        upstream = await self.client.send(request, outgoing)
        state.upstream_status = upstream.status
        state.upstream_ms = round((time.monotonic() - started) * 1000)
        if upstream.ok and upstream.content_type == self.services[route.service].stream_media_type:
            return upstream, None
        return upstream, await self.client.read_body(upstream)
