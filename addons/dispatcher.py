"""Sends an allowed request upstream with a pool key, and brings the answer back.

mitmproxy's own forwarding cannot give a client an error in the API's format when the upstream is unreachable or
stalls (it sends an HTML 502, or nothing), cannot try a request again on another key, and cannot send anything to
a client before the upstream answers. So the dispatcher makes the upstream call itself, from the `request` hook
(llmproxy/upstream): a buffered answer becomes `flow.response`, and mitmproxy connects nowhere; a streamed answer,
or a streaming request that has to wait for a key, is served by the loopback *pipe*, at which the flow is pointed.

The key is added to the outgoing aiohttp request only, as its last headers, after every check passed. It is never
on the flow, so nothing that shows or saves flows (mitmweb, `-w`, `flow_detail`) can reveal it.
"""

import asyncio
import functools
import socket
from collections.abc import Callable, Sequence

from mitmproxy import ctx, exceptions, http
from mitmproxy.net import encoding
from yarl import URL

from addons.affinity import Affinity
from addons.apierrors import fail_closed
from addons.flowstate import flow_state, forward_route, upstream_target
from addons.quotakeeper import QuotaKeeper
from addons.settlement import RequestSettledHook
from llmproxy.api import usage
from llmproxy.api.routes import Route
from llmproxy.pool.keys import KeyPool
from llmproxy.pool.queue import QueueRefusal, WaitQueue
from llmproxy.services import read_answer
from llmproxy.services.base import Service, under
from llmproxy.upstream.client import Answer, UpstreamClient, UpstreamRequest
from llmproxy.upstream.pipe import PIPE_PREFIX, Pipe, PipedRequest
from llmproxy.upstream.retry import PooledCaller


class Dispatcher:
    """Calls the upstream API with a key from the pool; streams SSE through the loopback pipe. Each request it
    takes on ends with one `request_settled` event."""

    def __init__(
        self,
        services: Sequence[Service],
        pipe_socket: socket.socket | None,
        pool: KeyPool,
        queue: WaitQueue,
        affinity: Affinity,
        quota: QuotaKeeper,
    ):
        self.services = services
        self.queue = queue
        self.affinity = affinity
        self.quota = quota
        self.client = UpstreamClient(encoding.decode)
        self.upstreams: dict[str, URL] = {}  # each service's base URL, as configured
        by_name = {service.name: service for service in services}
        self.caller = PooledCaller(by_name, self.upstreams, pool, queue, self.client)
        self.pipe = Pipe(pipe_socket)
        self.ready = self.pipe.ready  # requests and the key checker wait for the pipe
        self.served = self.caller.served  # requests answered per service, for the status page
        self.jobs: dict[str, set[asyncio.Task]] = {}  # client connection id -> its requests' upstream work
        self._upstream_urls: dict[str, str] = {}  # route name -> its upstream URL, joined once
        self._opening: asyncio.Task | None = None

    @property
    def session(self):
        """The upstream session, which the key checker's probes share."""
        return self.client.session

    def load(self, loader):
        for service in self.services:
            loader.add_option(
                f"{service.option_prefix}_upstream_url",
                str,
                service.default_url,
                f"Base URL of the {service.title} API (no /v1).",
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
        for service in self.services:
            name = f"{service.option_prefix}_upstream_url"
            if name in updated:
                url = URL(getattr(ctx.options, name))
                if url.scheme not in ("http", "https") or not url.host:
                    raise exceptions.OptionsError(f"{name.upper()} must be an http:// or https:// URL.")
                self.upstreams[service.name] = url
                self._upstream_urls.clear()
        for name in ("upstream_connect_timeout", "upstream_timeout", "upstream_idle_timeout"):
            if name in updated and getattr(ctx.options, name) <= 0:
                raise exceptions.OptionsError(f"{name.upper()} must be a positive number of seconds.")
        # The client and the pipe keep their settings as attributes: set here on every change, read on every chunk.
        if "upstream_timeout" in updated:
            self.client.answer_timeout = ctx.options.upstream_timeout
        if "upstream_idle_timeout" in updated:
            self.client.idle_timeout = self.pipe.idle_timeout = ctx.options.upstream_idle_timeout
        if "queue_heartbeat" in updated:
            self.pipe.heartbeat = ctx.options.queue_heartbeat
        if "prompt_logging" in updated:
            self.pipe.keep_text = ctx.options.prompt_logging

    def running(self):
        """Opens the upstream session, and the pipe in the background; requests and the key checker wait for
        `ready`."""
        self.client.open(ctx.options.upstream_connect_timeout)
        self._opening = asyncio.create_task(self.pipe.open())

    def done(self) -> asyncio.Task:
        """Closes the pipe and the session in the background. The task is returned because mitmproxy's shutdown
        awaits what a hook returns (and then nothing is left open), while a script reload goes on at once."""
        if self._opening:
            self._opening.cancel()
        return asyncio.create_task(self._close())

    async def _close(self) -> None:
        await self.pipe.close()
        await self.client.close()

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        if (route := forward_route(flow)) is None:
            return  # the pipe answers unrouted flows with a 500: nothing unchecked goes anywhere
        state = flow_state(flow)
        await asyncio.wait_for(self.ready.wait(), 10)
        state.upstream_url = self._upstream_url(route, state.upstream_path)
        identity = state.identity or f"ip:{flow.client_conn.peername[0]}"  # whose request, for the queue's fairness
        try:
            waits = self.queue.would_wait(identity, route.service, state.family, self.affinity.of(flow))
        except QueueRefusal as refusal:  # decided before anything was sent: a real status, streaming or not
            state.decision = refusal.code
            self._respond(flow, Answer.refusal(route.dialect, refusal))
            return
        if state.stream and waits:
            # A streaming client hears from us at once (headers, heartbeats) while its request waits for a key.
            piped = self._piped(flow, route)
            piped.job = self._start_job(flow, route, identity, piped.follow_position)
            self._point_at_pipe(flow, piped)
            return
        job = self._start_job(flow, route, identity)
        await asyncio.wait({job})
        if job.cancelled():
            return  # the client left; mitmproxy ends the flow with an error
        answer = job.result()
        if answer.stream is not None:
            self._point_at_pipe(flow, self._piped(flow, route, answer))
        else:
            self._respond(flow, answer)
            await _written(state.settlement)

    def _upstream_url(self, route: Route, upstream_path: str) -> str:
        if upstream_path:  # a parametric route's, rebuilt by its service from checked parts
            return str(self.upstreams[route.service]).rstrip("/") + upstream_path
        if (joined := self._upstream_urls.get(route.name)) is None:
            joined = self._upstream_urls[route.name] = str(under(self.upstreams[route.service], route.upstream_path))
        return joined

    def _piped(self, flow: http.HTTPFlow, route: Route, answer: Answer | None = None) -> PipedRequest:
        return PipedRequest(
            flow.id,
            route,
            flow_state(flow),
            flow.request.timestamp_start,
            settle=functools.partial(self._settle, flow),
            prompt_estimate=functools.partial(self.quota.prompt_estimate_of, flow),
            streamed=functools.partial(self.affinity.streamed, flow),
            answer=answer,
        )

    def _point_at_pipe(self, flow: http.HTTPFlow, piped: PipedRequest) -> None:
        token = self.pipe.admit(piped)
        flow_state(flow).pipe_token = token
        flow.request.scheme, flow.request.host, flow.request.port = "http", "127.0.0.1", self.pipe.port
        # The hop needs the framing headers the allowlist removed.
        flow.request.headers["host"] = f"{flow.request.host}:{flow.request.port}"
        flow.request.headers["content-length"] = str(len(flow.request.raw_content or b""))
        flow.request.path = PIPE_PREFIX + token

    def _respond(self, flow: http.HTTPFlow, answer: Answer) -> None:
        """A complete answer becomes the flow's response, and its usage is billed: nothing for an error, the proxy's
        estimate for a successful answer that reports none (as for a stream). Set first, the response stays
        whatever fails after it (fail_closed)."""
        state = flow_state(flow)
        flow.response = http.Response.make(answer.status, answer.body, answer.headers)
        _show_target(flow, state.upstream_url)  # only shown: mitmproxy connects nowhere
        upstream_body = answer.body if answer.upstream_body is None else answer.upstream_body
        billed, text = read_answer(state.route.wire, upstream_body) if answer.status < 400 else (None, "")
        if billed is None and answer.status < 300 and not state.route.counts_tokens:
            billed = usage.estimate(self.quota.prompt_estimate_of(flow), len(text))
        self._settle(flow, billed, text)
        if answer.status < 400:
            self.affinity.answered(flow, answer.body)

    def _settle(self, flow: http.HTTPFlow, billed: usage.Usage | None, completion: str = "") -> None:
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
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = flow_state(flow)
        if state.pipe_token:
            flow.response.stream = True
            _show_target(flow, state.upstream_url)  # the request has gone to the pipe; show the real target

    def error(self, flow: http.HTTPFlow) -> None:
        """The client left before mitmproxy collected its stream: stop the upstream work."""
        token = flow_state(flow).pipe_token
        if token and (piped := self.pipe.withdraw(token)):
            piped.discard()
            self._settle(flow, None)

    def client_disconnected(self, client) -> None:
        """A client that leaves takes its waiting or running upstream requests with it."""
        for job in self.jobs.pop(client.id, set()):
            job.cancel()

    def _start_job(
        self, flow: http.HTTPFlow, route: Route, identity: str, on_queued: Callable | None = None
    ) -> asyncio.Task:
        """Obtains the answer in a task of the client's connection. The request is read from the flow here, before
        the flow is pointed at the pipe: every attempt sends it as the client sent it."""
        request = UpstreamRequest(
            flow.request.method,
            flow_state(flow).upstream_url,
            flow.request.raw_content or b"",
            list(flow.request.headers.items(multi=True)),
        )
        affinity, keep = functools.partial(self.affinity.of, flow), functools.partial(self.affinity.keep, flow)
        work = self.caller.obtain(
            request, route, flow_state(flow), identity=identity, affinity=affinity, keep=keep, on_queued=on_queued
        )
        job = asyncio.create_task(work)
        jobs = self.jobs.setdefault(flow.client_conn.id, set())
        jobs.add(job)

        def finished(done: asyncio.Task) -> None:
            jobs.discard(done)
            if done.cancelled() or done.exception():
                self._settle(flow, None)  # nothing was produced: nothing is billed

        job.add_done_callback(finished)
        return job


async def _written(settlement: asyncio.Future | None) -> None:
    """Waits, without holding up other requests, until a bill the store writes in the background is written: an
    answer goes to its client only once its usage would survive a kill. A bill that could not be written is logged
    by the store; the answer goes out all the same."""
    if settlement is not None:
        await settlement


def _show_target(flow: http.HTTPFlow, upstream_url: str) -> None:
    """The flow's request shows the upstream URL, as `flow.request.url = upstream_url` would."""
    flow.request.scheme, flow.request.host, flow.request.port, flow.request.path = upstream_target(upstream_url)
