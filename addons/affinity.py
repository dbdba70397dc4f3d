"""Affinity: a conversation stays on the key that served it.

Prompt caches belong to an organisation (OpenAI routes by prefix and `prompt_cache_key`, Anthropic caches per
organisation), so a conversation that moves between keys pays the cache write again on every key. Responses API
state belongs to the organisation that made it: a `previous_response_id` exists only there, and so does the key to
`encrypted_content` (reasoning and compaction items that `store: false` clients such as Codex send back).

- A conversation is named by, in order, `prompt_cache_key`, `metadata.user_id`, the client's session header
  (Claude Code's `x-claude-code-session-id`, Codex's `session-id`), else the system prompt and the first user
  message; always together with the identity and the model family. It keeps its key while that key is free and has
  `affinity_min_headroom` percent of its rate limit left (or as much as any key); otherwise it moves to the key
  with the most headroom and stays there. A new conversation goes to the key with the most headroom.
- A stored response's id names the key that made it and the identity that asked. A `previous_response_id`
  follow-up is sent to that key only: it waits while the key rests, and is refused with a clear error when the key
  was retired or the response is someone else's. A request carrying `encrypted_content` waits for its
  conversation's key in the same way.

Both maps live in the store (in Redis, one map for every instance), at most `affinity_max_sessions` names each,
least recently used first out, and forget a name unused for `affinity_ttl` seconds. A binding read is taken as
read for a second (an agent's turns come faster, and each read was a round trip to Redis): a conversation another
instance moved follows it here that much later.
"""

import logging
import time

from mitmproxy import ctx, exceptions, http

from addons.apierrors import error_response, fail_closed
from addons.flowstate import flow_state, forward_route, parsed_body
from llmproxy.api import OPENAI
from llmproxy.conversation import RESPONSE_ID, carries_encrypted_content, conversation, digest, response_id
from llmproxy.identity import identity_digest
from llmproxy.pool.keys import KeyAffinity, PoolKey
from llmproxy.store.storage import Storage

SESSIONS, RESPONSES = "session", "response"  # the store's two affinity spaces
SESSION_HEADERS = ("x-claude-code-session-id", "session-id")  # read here, never forwarded (llmproxy/api/headers.py)
RESPONSE_ROUTE = "openai.responses"  # the one route whose answers a follow-up can name (if stored, the default)
BINDING_READ_TTL = 1.0  # seconds a binding read from the store (or made here) is taken as it was
BINDINGS_KEPT = 10_000  # beyond this many, the expired ones are dropped

logger = logging.getLogger(__name__)


class Affinity:
    """Names each request's conversation and the key it lives on; remembers the keys of new responses."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self._read: dict[tuple[str, str], tuple[float, str]] = {}  # (space, name) -> (until, bound value)

    def load(self, loader):
        loader.add_option(
            "affinity",
            bool,
            True,
            "Keep a conversation on the key that served it (prompt caches, Responses API state).",
        )
        loader.add_option(
            "affinity_min_headroom",
            int,
            10,
            "Percent of its rate limit a conversation's key must have left to keep the conversation.",
        )
        loader.add_option(
            "affinity_max_sessions",
            int,
            100_000,
            "Conversations remembered (and as many response ids); the least recently used go first.",
        )
        loader.add_option("affinity_ttl", int, 86_400, "Seconds a conversation or response id is remembered unused.")

    def configure(self, updated):
        if "affinity_min_headroom" in updated and not 0 <= ctx.options.affinity_min_headroom <= 100:
            raise exceptions.OptionsError("AFFINITY_MIN_HEADROOM must be a percentage from 0 to 100.")
        for name in ("affinity_max_sessions", "affinity_ttl"):
            if name in updated and getattr(ctx.options, name) < 1:
                raise exceptions.OptionsError(f"{name.upper()} must be at least 1.")

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """The client's session header is read before the header allowlist removes it; only its digest is kept."""
        if not ctx.options.affinity or forward_route(flow) is None:
            return
        if value := next((v for name in SESSION_HEADERS if (v := flow.request.headers.get(name, "").strip())), ""):
            flow_state(flow).client_session = digest(value)

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if not ctx.options.affinity or (route := forward_route(flow)) is None:
            return
        state, body = flow_state(flow), parsed_body(flow)
        previous = body.get("previous_response_id") if route.wire == OPENAI else None
        if isinstance(previous, str):
            if bound := self._binding(RESPONSES, previous):
                key_id, _, owner = bound.partition(" ")
                if owner != identity_digest(state.identity):
                    state.decision = "previous_response_not_found"
                    flow.response = error_response(
                        route.dialect,
                        400,
                        f"Previous response with id '{previous}' not found.",
                        "previous_response_not_found",
                    )
                    return
                state.affinity_key, state.pinned = key_id, "previous_response"
            return  # the rest of the conversation is upstream, not in the request: it names no conversation
        if route.counts_tokens or not (named := conversation(body, state.client_session)):
            return  # a token count uses no cache and must not move a conversation
        state.session = digest(state.identity, state.family, *named)
        if key_id := self._binding(SESSIONS, state.session):
            state.affinity_key = key_id
            if carries_encrypted_content(body):
                state.pinned = "encrypted_content"

    def of(self, flow: http.HTTPFlow) -> KeyAffinity | None:
        """The key the request's conversation lives on, for the pool's choice; None for a new conversation."""
        state = flow_state(flow)
        if not state.affinity_key:
            return None
        unavailable = self._unavailable(flow) if state.pinned else ("", "")
        return KeyAffinity(state.affinity_key, bool(state.pinned), ctx.options.affinity_min_headroom / 100, unavailable)

    def keep(self, flow: http.HTTPFlow, key: PoolKey) -> None:
        """The request's conversation now lives on `key`: it was new, or its key could not serve it."""
        state = flow_state(flow)
        if not state.session or key.id == state.affinity_key:
            return
        state.affinity_key = self._bind(SESSIONS, state.session, key.id, state.affinity_key or None)

    def answered(self, flow: http.HTTPFlow, body: bytes) -> None:
        """A buffered answer was passed on: remembers the key of the response it stored."""
        if self._stores_response(flow):
            self._remember_response(flow, response_id(body))

    def streamed(self, flow: http.HTTPFlow, made: object) -> None:
        """A streamed answer ended: remembers the key of the response `made`, named in its events."""
        if self._stores_response(flow):
            self._remember_response(flow, made)

    @staticmethod
    def _stores_response(flow: http.HTTPFlow) -> bool:
        """Whether the request's answer is a response the upstream stored, which a follow-up may name."""
        route = flow_state(flow).route
        if not ctx.options.affinity or route is None or route.form != RESPONSE_ROUTE:
            return False
        return parsed_body(flow).get("store") is not False

    def _remember_response(self, flow: http.HTTPFlow, made: object) -> None:
        """Notes the key that made a response (the last one tried) and whom it was made for; `made` is the id as the
        upstream gave it."""
        state = flow_state(flow)
        if made is not None and not (isinstance(made, str) and RESPONSE_ID.fullmatch(made)):
            shown = f"{len(made)} characters" if isinstance(made, str) else type(made).__name__
            logger.warning("%s: the upstream's response id is no id (%s); not remembered", flow.id, shown)
            return
        if made and state.keys:
            self._bind(RESPONSES, made, f"{state.keys[-1]} {identity_digest(state.identity)}", None)

    def _binding(self, space: str, name: str) -> str | None:
        """What `name` is bound to: as read (or bound) here less than BINDING_READ_TTL ago, else from the store."""
        now = time.monotonic()
        if (kept := self._read.get((space, name))) and kept[0] > now:
            return kept[1]
        if (value := self.storage.store.affinity(space, name, ctx.options.affinity_ttl)) is not None:
            self._keep(space, name, value, now)
        return value

    def _bind(self, space: str, name: str, value: str, expected: str | None) -> str:
        options = ctx.options
        bound = self.storage.store.bind_affinity(
            space, name, value, expected, options.affinity_ttl, options.affinity_max_sessions
        )
        self._keep(space, name, bound, time.monotonic())
        return bound

    def _keep(self, space: str, name: str, value: str, now: float) -> None:
        if len(self._read) >= BINDINGS_KEPT:
            self._read = {kept: entry for kept, entry in self._read.items() if entry[0] > now}
        self._read[(space, name)] = (now + BINDING_READ_TTL, value)

    @staticmethod
    def _unavailable(flow: http.HTTPFlow) -> tuple[str, str]:
        """(code, message) for a request whose conversation's state is held by a key that no longer serves."""
        if flow_state(flow).pinned == "previous_response":
            previous = parsed_body(flow)["previous_response_id"]
            return "previous_response_not_found", (
                f"The response {previous} was made with a key this proxy no longer uses, and only that key's "
                "organisation holds it. Send the conversation again without previous_response_id."
            )
        return "conversation_key_retired", (
            "This conversation sends back encrypted content that only the key it was made with can read, and this "
            "proxy no longer uses that key. Start the conversation anew."
        )
