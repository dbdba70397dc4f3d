"""`GET /v1/models` of every service, answered by the proxy: the upstream's list would describe the owner's
account, and a client only needs to know what it may ask for here."""

import json
from collections.abc import Sequence

from mitmproxy import ctx, http

from addons.apierrors import fail_closed
from addons.flowstate import flow_state
from addons.modelfamilies import ModelFamilies
from llmproxy.api import ANTHROPIC, GEMINI
from llmproxy.api.modellists import anthropic_model_list, gemini_model_list, openai_model_list
from llmproxy.api.routes import LOCAL
from llmproxy.pool.keys import KeyPool
from llmproxy.services.base import Service

_LISTS = {ANTHROPIC: anthropic_model_list, GEMINI: gemini_model_list}  # by dialect; OpenAI's for the others


class ModelList:
    """Lists the configured models whose family is allowed and served by a working key."""

    def __init__(self, services: Sequence[Service], families: ModelFamilies, pool: KeyPool):
        self.services = services
        self.families = families
        self.pool = pool

    def load(self, loader):
        for service in self.services:
            loader.add_option(
                f"{service.option_prefix}_models",
                Sequence[str],
                list(service.models),
                f"Models listed at /proxy/{service.name}/v1/models.",
            )

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live:
            return
        state = flow_state(flow)
        route = state.route
        if route is None or route.kind != LOCAL or not route.service:  # a service's local route: its model list
            return
        service = next(s for s in self.services if s.name == route.service)
        models = [
            model
            for model in getattr(ctx.options, f"{service.option_prefix}_models")
            if (family := self.families.family_of(service.name, model))
            and self.families.is_allowed(service.name, family)
            and self.pool.serving(service.name, family)
        ]
        listing = _LISTS.get(route.dialect, openai_model_list)(models)
        state.decision = "local"
        flow.response = http.Response.make(200, json.dumps(listing), {"content-type": "application/json"})
