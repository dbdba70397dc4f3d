"""`GET /v1/models` for both services, answered by the proxy: the upstream's list would describe the owner's
account, and a client only needs to know what it may ask for here."""

import json
from collections.abc import Sequence

from mitmproxy import ctx, http

from addons.apierrors import fail_closed
from addons.flowstate import flow_state
from addons.modelfamilies import ModelFamilies
from llmproxy.api import ANTHROPIC, OPENAI
from llmproxy.api.modellists import anthropic_model_list, openai_model_list
from llmproxy.pool.keys import KeyPool

DEFAULT_OPENAI_MODELS = [
    "gpt-6-astra",
    "gpt-6-sol",
    "gpt-6-luna",
    "gpt-5.5",
    "gpt-5.4",
    "gpt-5.4-mini",
    "gpt-5.4-nano",
    "gpt-5",
    "gpt-5-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4o",
    "gpt-4o-mini",
    "o4-mini",
    "o3",
    "o3-mini",
    "gpt-3.5-turbo",
    "text-embedding-3-small",
    "text-embedding-3-large",
]
DEFAULT_ANTHROPIC_MODELS = [
    "claude-opus-5",
    "claude-sonnet-5",
    "claude-haiku-5-5",
    "claude-opus-4-8",
    "claude-sonnet-4-6",
    "claude-haiku-4-5",
]


class ModelList:
    """Lists the configured models whose family is allowed and served by a working key."""

    def __init__(self, families: ModelFamilies, pool: KeyPool):
        self.families = families
        self.pool = pool

    def load(self, loader):
        loader.add_option(
            "openai_models", Sequence[str], DEFAULT_OPENAI_MODELS, "Models listed at /proxy/openai/v1/models."
        )
        loader.add_option(
            "anthropic_models", Sequence[str], DEFAULT_ANTHROPIC_MODELS, "Models listed at /proxy/anthropic/v1/models."
        )

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live:
            return
        state = flow_state(flow)
        if state.route not in ("openai.models", "anthropic.models"):
            return
        api = OPENAI if state.route == "openai.models" else ANTHROPIC
        models = [
            model
            for model in getattr(ctx.options, f"{api}_models")
            if (family := self.families.family_of(api, model))
            and self.families.is_allowed(api, family)
            and self.pool.serving(api, family)
        ]
        listing = openai_model_list(models) if api == OPENAI else anthropic_model_list(models)
        state.decision = "local"
        flow.response = http.Response.make(200, json.dumps(listing), {"content-type": "application/json"})
