"""The OpenAI chat format for Claude (`POST /proxy/anthropic/v1/chat/completions`, and the same route of every service
that serves Claude): the request becomes a Messages API request here, once the policy checked it; the dispatcher
translates the answer back (both with llmproxy/api/translate.py)."""

from mitmproxy import http

from addons.apierrors import fail_closed
from addons.flowstate import flow_state, parsed_body, replace_body
from llmproxy.api import ANTHROPIC, OPENAI
from llmproxy.api.translate import chat_to_messages


class ClaudeChatTranslator:
    """Turns requests to the OpenAI-format Claude endpoint into Messages API requests."""

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live:
            return
        state = flow_state(flow)
        if state.route is None or (state.route.client_format, state.route.wire) != (OPENAI, ANTHROPIC):
            return
        body = parsed_body(flow)
        state.client_wants_usage = (body.get("stream_options") or {}).get("include_usage") is True
        replace_body(flow, chat_to_messages(body))
