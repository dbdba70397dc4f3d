"""What mitmweb shows of each flow: the proxy's decision and why, as a comment and a marker; and a bounded view.

The comment reads at a glance in the flow list: who (a hash, or the user's nickname), the model family, the keys
tried (hashes), the time queued, the tokens, and the decision. mitmweb keeps every flow in memory; this keeps the
newest `web_keep_flows` finished ones, so a long-running proxy under mitmweb does not grow without end.
"""

import collections

from mitmproxy import ctx, http

from addons.gatekeeper import identity_digest

MARKERS = {"served": ":white_check_mark:", "local": ":information_source:", "preflight": ":information_source:"}
REFUSED = ":no_entry:"
FAILED = ":warning:"  # the upstream failed, or the client left


class FlowNotes:
    """Annotates every finished flow, and trims mitmweb's flow list."""

    def __init__(self):
        self.finished: collections.deque = collections.deque()

    def load(self, loader):
        loader.add_option("web_keep_flows", int, 1000, "Finished flows mitmweb keeps in memory (oldest dropped).")

    async def response(self, flow: http.HTTPFlow) -> None:
        self._annotate(flow, flow.response.status_code)
        self._trim(flow)

    async def error(self, flow: http.HTTPFlow) -> None:
        self._annotate(flow, None)
        self._trim(flow)

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
