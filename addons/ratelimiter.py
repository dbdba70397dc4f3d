"""Requests per minute, and requests in flight, per identity (user, else client address)."""

import math
import time
import weakref

from mitmproxy import ctx, exceptions, http

from addons.apierrors import error_response, fail_closed
from addons.flowstate import flow_state, forward_route
from llmproxy.flowstate import FlowState
from llmproxy.store.storage import Storage

WINDOW = 60.0


class RateLimiter:
    """A sliding one-minute window per identity; `special` users are exempt. Counts only requests that passed
    every check before it, so a malformed or unauthorised request costs its sender nothing, and gives the count
    back when the request never got an upstream answer (no key, over quota, queue refusal or timeout, upstream
    unreachable, client gone): a frontend that retries such refusals must not lock itself out. Token counts have
    a window of their own: they generate nothing, and Claude Code sends them between prompts."""

    def __init__(self, storage: Storage):
        self.storage = storage
        # Each counted request's hit in its window, for the refund; beside the flow, not in its metadata.
        self._hits: weakref.WeakKeyDictionary[http.HTTPFlow, tuple[str, str, str]] = weakref.WeakKeyDictionary()

    def load(self, loader):
        loader.add_option("model_rate_limit", int, 4, "Generation requests per minute per identity; 0 turns it off.")
        loader.add_option(
            "count_tokens_rate_limit",
            int,
            60,
            "Token-count requests per minute per identity (their own window); 0 turns it off.",
        )
        loader.add_option(
            "max_concurrent_per_identity", int, 0, "Generation requests one identity may have in flight; 0: any."
        )

    def configure(self, updated):
        for name in ("model_rate_limit", "count_tokens_rate_limit", "max_concurrent_per_identity"):
            if name in updated and getattr(ctx.options, name) < 0:
                raise exceptions.OptionsError(f"{name.upper()} must not be negative.")

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if (route := forward_route(flow)) is None:
            return
        state = flow_state(flow)
        if state.user_type == "special":
            return
        store = self.storage.store
        identity = state.identity
        bucket, limit = (
            ("count_tokens", ctx.options.count_tokens_rate_limit)
            if route.counts_tokens
            else ("", self._limit_for(state))
        )
        if limit:
            allowed, remaining, reset_at, hit = store.hit_rate_window(identity, limit, WINDOW, bucket)
            state.rate_limit = (limit, remaining, math.ceil(reset_at))
            if not allowed:
                state.decision = "rate_limited"
                wait = max(1, math.ceil(reset_at - time.time()))
                kind = "token-count requests" if route.counts_tokens else "requests"
                flow.response = error_response(
                    route.dialect,
                    429,
                    f"This proxy allows {limit} {kind} per minute; try again in {wait} s.",
                    "rate_limited",
                    {"retry-after": str(wait)},
                )
                return
            self._hits[flow] = (identity, hit, bucket)
        if not (in_flight_limit := ctx.options.max_concurrent_per_identity):
            return  # no limit, no count (two round trips to a shared store); a limit set later counts from then on
        if not store.enter(identity, in_flight_limit):
            state.decision = "too_many_in_flight"
            flow.response = error_response(
                route.dialect,
                429,
                "You have as many requests in flight as this proxy allows; wait for one to end.",
                "too_many_in_flight",
                {"retry-after": "1"},
            )
            return
        state.in_flight = True

    @staticmethod
    def _limit_for(state: FlowState) -> int:
        """The user's own limit, as the gatekeeper read it (a store read here was a round trip), else the proxy's."""
        if state.user_record and state.user_record["rate_limit"] is not None:
            return state.user_record["rate_limit"]
        return ctx.options.model_rate_limit

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if rate_limit := flow_state(flow).rate_limit:
            limit, remaining, reset_at = rate_limit
            flow.response.headers["x-ratelimit-limit"] = str(limit)
            flow.response.headers["x-ratelimit-remaining"] = str(remaining)
            flow.response.headers["x-ratelimit-reset"] = str(reset_at)

    def response(self, flow: http.HTTPFlow) -> None:
        self._leave(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._leave(flow)

    def _leave(self, flow: http.HTTPFlow) -> None:
        state, store = flow_state(flow), self.storage.store
        if state.in_flight:
            state.in_flight = False
            store.leave(state.identity)
        hit = self._hits.pop(flow, None)
        if hit and state.upstream_status is None:  # refused by the proxy itself, or the client left first
            store.refund_rate_window(*hit)
