"""What the proxy learns about one request as it passes the addons: one typed record per flow.

The addons keep it beside the flow (addons/flowstate.py), never in `flow.metadata`, which mitmproxy serialises
into flow files and HAR exports and deep-copies with the flow. A flow file shows only the summary the flow notes
write into the metadata when the flow finishes.
"""

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmproxy.api.routes import Route


@dataclass
class BilledUsage:
    """What a request was billed, as the log line, mitmweb's comment and the flow's summary show it."""

    input: int  # prompt tokens, cached or not
    output: int  # output tokens, reasoning included
    estimated: bool  # the proxy's estimate: the upstream reported no usage
    cost_usd: float  # at the configured prices


@dataclass
class FlowState:
    """One request's state; every field starts empty and is set by the addon named in its comment."""

    # The router
    route: "Route | None" = None  # the route table's entry for the request; None: none
    dialect: str = ""  # the API whose error format the client reads; "": the one its path names
    upstream_path: str = ""  # a parametric route's path (and query) upstream, rebuilt by its service; "": the route's
    path_model: str = ""  # the model a parametric route's path names (Gemini's); "": the body names it
    passthrough: bool = False  # ./run.sh local: a request to another host, not the proxy's to touch
    decision: str = ""  # what became of the request: served, local, rate_limited, over_quota, ... (any addon)
    # Header hygiene
    client_closes: bool = False  # the client asked to close the connection after the answer
    # The first addon that reads the body (addons/flowstate.py's parsed_body), and any that replaces it
    body: dict | None = None  # the request body as JSON; None: not parsed yet
    # The gatekeeper
    identity: str = ""  # whose request it is, for limits, queues and fairness: user:<id> or ip:<address>
    user: str = ""  # the user's id, with GATEKEEPER=user_token
    user_type: str = ""  # the user's type: normal, special or temporary
    nickname: str | None = None  # the user's nickname, for mitmweb's comment
    user_record: dict | None = None  # the user as the gatekeeper read it (no usage), for the limits that follow
    # The model families
    model: str = ""  # the requested model, at most 100 characters
    stream: bool = False  # the client asked for a streamed answer
    family: str = ""  # the model's family: its keys, limits and queue
    # The policy, the translator and the quota keeper
    prompt_tokens: int = 0  # the policy's upper count of the prompt's tokens; 0: not counted
    client_wants_usage: bool = False  # an OpenAI-format Claude client asked for the usage chunk
    usage_chunk_added: bool = False  # the proxy asked for OpenAI's usage chunk, which the client did not
    # Affinity
    client_session: str = ""  # a digest of the client's session header
    session: str = ""  # a digest naming the request's conversation
    affinity_key: str = ""  # the id of the key the conversation lives on
    pinned: str = ""  # why only that key will do: previous_response or encrypted_content; "": any key may
    # The rate limiter
    rate_limit: tuple[int, int, int] | None = None  # (limit, remaining, reset time) for the x-ratelimit headers
    in_flight: bool = False  # counted among its identity's requests in flight until it ends
    # The dispatcher and the wait queue
    upstream_url: str = ""  # where the request goes, as mitmweb shows it (never with a key)
    keys: list[str] = field(default_factory=list)  # the ids of the keys tried, in order
    queued: bool = False  # it waited in the queue for a key
    queue_ms: int | None = None  # milliseconds from the dispatcher to its key
    upstream_status: int | None = None  # the status of the last upstream answer
    upstream_ms: int | None = None  # milliseconds to the last upstream answer's headers
    first_byte_ms: int | None = None  # milliseconds from the request to the first streamed byte
    pipe_token: str = ""  # the pipe path's token of a streamed answer
    settled: bool = False  # its usage was settled (announced to the request_settled listeners)
    usage: BilledUsage | None = None  # what it was billed; None: nothing
    settlement: asyncio.Future | None = None  # the quota keeper: the bill, while the store writes it in the background
    # The flow notes
    stream_record: bytearray | None = None  # the start of a streamed answer, as the client received it
    stream_record_cut: bool = False  # the streamed answer was longer than the record keeps
    shown_server: object | None = None  # the server connection the flow shows, once set

    @property
    def route_name(self) -> str:
        """The route's name ("openai.chat_completions", "status", ...), for logs and figures; "": none."""
        return self.route.name if self.route else ""
