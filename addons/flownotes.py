"""What mitmweb shows of each flow: the proxy's decision and why, as a comment and a marker; and a bounded view.

The comment reads at a glance in the flow list: who (a hash, or the user's nickname), the model family, the keys
tried (hashes), the time queued, the tokens, and the decision. mitmweb keeps every flow in memory; this keeps the
newest `web_keep_flows` finished ones, so a long-running proxy under mitmweb does not grow without end.
"""

import collections

from mitmproxy import ctx, http

from addons.config import size_setting
from addons.gatekeeper import identity_digest

MARKERS = {"served": ":white_check_mark:", "local": ":information_source:", "preflight": ":information_source:"}
REFUSED = ":no_entry:"
FAILED = ":warning:"  # the upstream failed, or the client left


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

    def configure(self, updated):
        if "stream_record_limit" in updated:
            self.stream_record_limit = size_setting("stream_record_limit", ctx.options.stream_record_limit, "256k")

    async def responseheaders(self, flow: http.HTTPFlow) -> None:
        """A streamed answer passes chunk by chunk and mitmproxy keeps none of it ("Content is missing" in
        mitmweb); the first `stream_record_limit` bytes of what the client received are kept for the flow."""
        if flow.response.stream is True and self.stream_record_limit:
            flow.metadata.setdefault("llmproxy", {})["stream_record"] = record = bytearray()
            limit = self.stream_record_limit

            def passed_on(chunk: bytes) -> bytes:
                record.extend(chunk[: limit - len(record)])
                return chunk

            flow.response.stream = passed_on

    async def response(self, flow: http.HTTPFlow) -> None:
        self._keep_stream_record(flow)
        self._annotate(flow, flow.response.status_code)
        self._trim(flow)

    async def error(self, flow: http.HTTPFlow) -> None:
        self._keep_stream_record(flow)
        self._annotate(flow, None)
        self._trim(flow)

    def _keep_stream_record(self, flow: http.HTTPFlow) -> None:
        """The recorded stream becomes the response's content: the wire has it already, nothing is sent again."""
        record = flow.metadata.get("llmproxy", {}).pop("stream_record", None)
        if record is not None and flow.response is not None:
            flow.response.content = bytes(record)
            if len(record) >= self.stream_record_limit:
                flow.metadata["llmproxy"]["stream_record_cut"] = True

    @staticmethod
    def _annotate(flow: http.HTTPFlow, status: int | None) -> None:
        meta = flow.metadata.get("llmproxy", {})
        decision = meta.get("decision") or ("upstream_error" if status and status >= 400 else "served")
        if status is None:
            decision = "client_left"
        parts = [decision.replace("_", " ")]
        if meta.get("user"):
            parts.append(f"user {meta.get('nickname') or meta['user']}")
        elif identity := meta.get("identity"):
            parts.append(f"client {identity_digest(identity)}")
        for name in ("family", "model"):
            if meta.get(name):
                parts.append(str(meta[name]))
        if keys := meta.get("keys"):
            parts.append("keys " + " → ".join(keys) + (f" ({len(keys) - 1} retries)" if len(keys) > 1 else ""))
        if meta.get("queued"):
            parts.append(f"queued {meta.get('queue_ms', 0) / 1000:.1f} s")
        if usage := meta.get("usage"):
            parts.append(
                f"{usage['input']} in / {usage['output']} out tokens" + (" (est.)" if usage["estimated"] else "")
            )
        if "upstream_ms" in meta:
            parts.append(f"upstream {meta['upstream_status']} in {meta['upstream_ms']} ms")
        if meta.get("stream_record_cut"):
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
        view = ctx.master.addons.get("view")
        if view is None:  # mitmdump keeps no flows
            return
        self.finished.append(flow)
        while len(self.finished) > ctx.options.web_keep_flows:
            oldest = self.finished.popleft()
            if not oldest.live:  # removing a live flow would kill it
                view.remove([oldest])
