"""What mitmweb and flow files show of each flow: the proxy's decision and why, as a comment, a marker and a
summary in the metadata; and a bounded view.

The comment reads at a glance in the flow list: who (a hash, or the user's nickname), the model family, the keys
tried (hashes), the time queued, the tokens, and the decision. The summary (`flow.metadata["llmproxy"]`) holds the
same facts as JSON, for flow files and mitmweb's detail view. mitmweb keeps every flow in memory; this keeps the
newest `web_keep_flows` finished ones, so a long-running proxy under mitmweb does not grow without end.
"""

import collections
from dataclasses import asdict

from mitmproxy import connection, ctx, http

from addons.apierrors import refuses_config_errors
from addons.flowstate import flow_state, upstream_target
from llmproxy.config import size_setting
from llmproxy.flowstate import FlowState
from llmproxy.identity import identity_digest

MARKERS = {"served": ":white_check_mark:", "local": ":information_source:", "preflight": ":information_source:"}
REFUSED = ":no_entry:"
FAILED = ":warning:"  # the upstream failed, or the client left


def summary(state: FlowState, decision: str) -> dict:
    """What a finished flow keeps in its metadata, as JSON: the decision and the figures, keys by their ids; never a
    key, a token or the client's address."""
    return {
        "decision": decision,
        "route": state.route_name,
        "family": state.family,
        "model": state.model,
        "user": state.user,
        "keys": list(state.keys),
        "queued": state.queued,
        "queue_ms": state.queue_ms,
        "upstream_status": state.upstream_status,
        "upstream_ms": state.upstream_ms,
        "first_byte_ms": state.first_byte_ms,
        "usage": asdict(state.usage) if state.usage else None,
    }


def _show_upstream(flow: http.HTTPFlow, state: FlowState) -> None:
    """The flow's server connection, as mitmweb's Connection tab and flow files show it: the upstream API the
    dispatcher called, or none for a request answered here; never the loopback pipe or the listener's stand-in
    target that mitmproxy's own connection names. The live connection is the layer's, so this changes no I/O."""
    if state.passthrough:
        return  # a connection of mitmproxy's own, to the host the client named
    if state.shown_server is not None and flow.server_conn is state.shown_server:
        return  # set when the response's headers came; the upstream did not change since
    if state.upstream_url and state.keys:
        scheme, host, port, _ = upstream_target(state.upstream_url)
        tls, name = scheme == b"https", host.decode()
        shown = connection.Server(address=(name, port), sni=name if tls else None)
        shown.tls = tls
        shown.timestamp_start = flow.request.timestamp_start
    else:
        shown = connection.Server(address=None)
    flow.server_conn = state.shown_server = shown


class FlowNotes:
    """Annotates every finished flow, keeps the start of streamed answers, and trims mitmweb's flow list."""

    def __init__(self):
        self.finished: collections.deque = collections.deque()
        self.stream_record_limit = 0

    def load(self, loader):
        loader.add_option("web_keep_flows", int, 1000, "Finished flows mitmweb keeps in memory (oldest dropped).")
        loader.add_option(
            "stream_record_limit",
            str,
            "256k",
            "How much of a streamed answer a flow keeps, for mitmweb's detail view and flow files (0: none).",
        )

    @refuses_config_errors
    def configure(self, updated):
        if "stream_record_limit" in updated:
            self.stream_record_limit = size_setting("stream_record_limit", ctx.options.stream_record_limit, "256k")

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """A streamed answer passes chunk by chunk and mitmproxy keeps none of it ("Content is missing" in
        mitmweb); the first `stream_record_limit` bytes of what the client received are kept for the flow."""
        _show_upstream(flow, flow_state(flow))
        if flow.response.stream is True and self.stream_record_limit:
            flow_state(flow).stream_record = record = bytearray()
            limit = self.stream_record_limit

            def passed_on(chunk: bytes) -> bytes:
                record.extend(chunk[: limit - len(record)])
                return chunk

            flow.response.stream = passed_on

    def response(self, flow: http.HTTPFlow) -> None:
        self._finished(flow, flow.response.status_code)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finished(flow, None)

    def _finished(self, flow: http.HTTPFlow, status: int | None) -> None:
        state = flow_state(flow)
        _show_upstream(flow, state)
        self._keep_stream_record(flow, state)
        decision = state.decision or ("upstream_error" if status and status >= 400 else "served")
        if status is None:
            decision = "client_left"
        self._annotate(flow, state, decision, status)
        flow.metadata["llmproxy"] = summary(state, decision)
        self._trim(flow)

    def _keep_stream_record(self, flow: http.HTTPFlow, state: FlowState) -> None:
        """The recorded stream becomes the response's content: the wire has it already, nothing is sent again."""
        record, state.stream_record = state.stream_record, None
        if record is not None and flow.response is not None:
            flow.response.content = bytes(record)
            if len(record) >= self.stream_record_limit:
                state.stream_record_cut = True

    @staticmethod
    def _annotate(flow: http.HTTPFlow, state: FlowState, decision: str, status: int | None) -> None:
        parts = [decision.replace("_", " ")]
        if flow.is_replay == "request":  # mitmweb's replay: a new request, and these are its own figures
            parts.insert(0, "replay")
        if state.user:
            parts.append(f"user {state.nickname or state.user}")
        elif state.identity:
            parts.append(f"client {identity_digest(state.identity)}")
        parts.extend(part for part in (state.family, state.model) if part)
        if keys := state.keys:
            parts.append("keys " + " → ".join(keys) + (f" ({len(keys) - 1} retries)" if len(keys) > 1 else ""))
        if state.queued:
            parts.append(f"queued {(state.queue_ms or 0) / 1000:.1f} s")
        if usage := state.usage:
            parts.append(f"{usage.input} in / {usage.output} out tokens" + (" (est.)" if usage.estimated else ""))
        if state.upstream_ms is not None:
            parts.append(f"upstream {state.upstream_status} in {state.upstream_ms} ms")
        if state.stream_record_cut:
            parts.append(f"stream shown up to {ctx.options.stream_record_limit}")
        flow.comment = " · ".join(parts)
        if status is None or decision in (
            "upstream_error",
            "upstream_timeout",
            "upstream_unreachable",
            "upstream_broken",
            "internal_error",
            "store_unavailable",
        ):
            flow.marked = FAILED
        else:
            flow.marked = MARKERS.get(decision, REFUSED)

    def _trim(self, flow: http.HTTPFlow) -> None:
        # mitmweb's flow list, mitmproxy's own View addon: looked up by name because only mitmweb has one.
        view = ctx.master.addons.get("view")
        if view is None:  # mitmdump keeps no flows
            return
        if flow.is_replay != "request":  # a replayed flow is in the list already
            self.finished.append(flow)
        while len(self.finished) > ctx.options.web_keep_flows:
            oldest = self.finished.popleft()
            if not oldest.live:  # removing a live flow would kill it
                view.remove([oldest])
