"""`GET /metrics` in Prometheus' text format, and one structured log line per request.

Counted per request when it ends: requests by route, family and status; upstream latency and time to the first
streamed byte; time spent queued; retries. Tokens and costs are counted when a request is settled. Queue lengths,
waits and key states are read at scrape time. No label ever holds a key, a token, an address or prompt text.
"""

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict

from mitmproxy import ctx, http
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from addons.apierrors import fail_closed
from addons.flowstate import flow_state
from addons.headerhygiene import client_token
from addons.settlement import settlement_listener
from llmproxy.api.usage import Usage
from llmproxy.identity import identity_digest, secret_matches
from llmproxy.pool.keys import KeyPool
from llmproxy.pool.queue import WaitQueue
from llmproxy.pricing import usd
from llmproxy.services.base import Service

logger = logging.getLogger("llmproxy.requests")
_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _LiveFigures:
    """Queue lengths, estimated waits and key states, read when Prometheus scrapes."""

    def __init__(self, services: Sequence[Service], pool: KeyPool, queue: WaitQueue):
        self.services = services
        self.pool = pool
        self.queue = queue

    def collect(self):
        queue, pool = self.queue, self.pool
        waiting = GaugeMetricFamily("llmproxy_queue_length", "Requests waiting for a key", labels=["family"])
        wait = GaugeMetricFamily("llmproxy_queue_estimated_wait_seconds", "Estimated wait", labels=["family"])
        for (service, family), family_queue in queue.queues.items():
            waiting.add_metric([family], len(family_queue))
            wait.add_metric([family], queue.estimated_wait(service, family))
        keys = GaugeMetricFamily("llmproxy_keys", "Keys by service and state", labels=["service", "state"])
        for service in self.services:
            counts = pool.counts(service.name)
            for state in ("active", "revoked", "overQuota"):
                keys.add_metric([service.name, state], counts[state])
        yield from (waiting, wait, keys)


class Metrics:
    """Prometheus figures and the per-request log line. `/metrics` asks for the admin key when the owner says so."""

    def __init__(self, services: Sequence[Service], pool: KeyPool, queue: WaitQueue, admin_key: str):
        self.admin_key = admin_key
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "llmproxy_requests",
            "Requests by route, family and status",
            ["route", "family", "status"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "llmproxy_tokens", "Tokens by family and direction", ["family", "direction"], registry=self.registry
        )
        self.tokens_by_kind = Counter(
            "llmproxy_tokens_by_kind",
            "Tokens by family and the price they are billed at: input (uncached), "
            "cache_read, cache_write_5m, cache_write_1h, output (reasoning included)",
            ["family", "kind"],
            registry=self.registry,
        )
        self.reasoning = Counter(
            "llmproxy_reasoning_tokens", "Output tokens spent reasoning", ["family"], registry=self.registry
        )
        self.web_searches = Counter(
            "llmproxy_web_searches", "Web searches the provider bills per call", ["family"], registry=self.registry
        )
        self.cost = Counter(
            "llmproxy_cost_usd", "Cost in USD at the configured prices", ["family"], registry=self.registry
        )
        self.retries = Counter(
            "llmproxy_retries", "Upstream attempts beyond the first", ["family"], registry=self.registry
        )
        self.upstream = Histogram(
            "llmproxy_upstream_seconds",
            "Time to the upstream's response headers",
            ["route"],
            buckets=_SECONDS,
            registry=self.registry,
        )
        self.first_byte = Histogram(
            "llmproxy_time_to_first_token_seconds",
            "Request start to first streamed byte",
            ["route"],
            buckets=_SECONDS,
            registry=self.registry,
        )
        self.queued = Histogram(
            "llmproxy_queue_wait_seconds",
            "Time requests waited for a key",
            ["family"],
            buckets=_SECONDS,
            registry=self.registry,
        )
        self.registry.register(_LiveFigures(services, pool, queue))

    def load(self, loader):
        loader.add_option("metrics_need_admin_key", bool, False, "Serve /metrics only with the ADMIN_KEY.")

    @settlement_listener
    def request_settled(self, flow: http.HTTPFlow, usage: Usage | None, cost: int, completion: str) -> None:
        """A settled request's tokens, searches and cost (nano-dollars)."""
        if usage is None:
            return
        family = flow_state(flow).family
        self.tokens.labels(family, "in").inc(usage.prompt)
        self.tokens.labels(family, "out").inc(usage.output)
        for kind in ("input", "cache_read", "cache_write_5m", "cache_write_1h", "output"):
            self.tokens_by_kind.labels(family, kind).inc(getattr(usage, kind))
        self.reasoning.labels(family).inc(usage.reasoning)
        self.web_searches.labels(family).inc(usage.web_searches)
        self.cost.labels(family).inc(usd(cost))

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        state = flow_state(flow)
        if flow.response or not flow.live or state.route_name != "metrics":
            return
        state.decision = "local"
        if ctx.options.metrics_need_admin_key and not secret_matches(client_token(flow), self.admin_key):
            flow.response = http.Response.make(401, b"The metrics need Authorization: Bearer <ADMIN_KEY>.\n")
            return
        flow.response = http.Response.make(200, generate_latest(self.registry), {"content-type": CONTENT_TYPE_LATEST})

    def response(self, flow: http.HTTPFlow) -> None:
        self._finished(flow, flow.response.status_code)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finished(flow, 499)  # the client went away (nginx's number for it)

    def _finished(self, flow: http.HTTPFlow, status: int) -> None:
        state = flow_state(flow)
        route, family = state.route_name or "none", state.family
        self.requests.labels(route, family, str(status)).inc()
        if len(state.keys) > 1:
            self.retries.labels(family).inc(len(state.keys) - 1)
        if state.upstream_ms is not None:
            self.upstream.labels(route).observe(state.upstream_ms / 1000)
        if state.first_byte_ms is not None:
            self.first_byte.labels(route).observe(state.first_byte_ms / 1000)
        if state.queued:
            self.queued.labels(family).observe((state.queue_ms or 0) / 1000)
        if route in ("health", "metrics"):
            return
        logger.info(
            json.dumps(
                {
                    "route": route,
                    "status": status,
                    "decision": state.decision or None,
                    "identity": identity_digest(state.identity) if state.identity else None,
                    "family": family or None,
                    "model": state.model or None,
                    "keys": state.keys,
                    "usage": asdict(state.usage) if state.usage else None,
                    "queueMs": state.queue_ms,
                    "upstreamMs": state.upstream_ms,
                }
            )
        )
