"""The users' web pages under /user: their own usage by token, and temporary tokens by proof of work."""

from mitmproxy import http

from addons.apierrors import fail_closed
from addons.flowstate import flow_state
from addons.quotakeeper import QuotaKeeper
from llmproxy.store.storage import Storage


class UserPages:
    """Serves /user, /user/lookup and /user/captcha/..."""

    def __init__(self, secrets: dict, storage: Storage, quotas: QuotaKeeper):
        self.admin_key = secrets.get("admin_key", "")
        self.storage = storage
        self.quotas = quotas

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live or flow_state(flow).route_name != "user_pages":
            return
