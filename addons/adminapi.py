"""The admin API under `/admin` (Bearer ADMIN_KEY) and the users' own usage page at `/user/usage`.

Users are addressed by their id (the first 16 hex digits of their token's SHA-256); a token is shown once, when
the user is created, and never again. Failed admin logins are limited per address, for a while, not forever.
"""

import json
import re
from urllib.parse import parse_qs

from mitmproxy import http

from addons.apierrors import error_response, fail_closed
from addons.flowstate import flow_state
from addons.gatekeeper import client_ip
from addons.headerhygiene import client_token
from addons.quotakeeper import QuotaKeeper
from addons.webpages import json_response
from llmproxy.admin import (
    ROUTES,
    FailedLogins,
    key_view,
    openapi_description,
    own_usage,
    public_user,
    sorted_users,
    users_cost_nanousd,
)
from llmproxy.api import OPENAI
from llmproxy.identity import secret_matches, user_of_token
from llmproxy.pool.checker import KeyChecker
from llmproxy.pool.keys import KeyPool
from llmproxy.pricing import usd
from llmproxy.store import UserError
from llmproxy.store.storage import Storage

_COMPILED = [(method, re.compile(pattern), handler) for method, pattern, handler in ROUTES]


class AdminApi:
    """Answers `/admin/...` for the holder of ADMIN_KEY, and `/user/usage` for a user's own token."""

    def __init__(
        self,
        secrets: dict,
        storage: Storage,
        pool: KeyPool,
        checker: KeyChecker,
        quota: QuotaKeeper,
        failed_logins: FailedLogins,
    ):
        self.admin_key = secrets.get("admin_key", "")
        self.storage = storage
        self.pool = pool
        self.checker = checker
        self.quota = quota
        self.failed_logins = failed_logins

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live:
            return
        state = flow_state(flow)
        if state.route_name == "user_usage":
            flow.response = self._own_usage(flow)
        elif state.route_name == "admin":
            flow.response = self._admin(flow)
        else:
            return
        state.decision = "local"

    def _own_usage(self, flow: http.HTTPFlow) -> http.Response:
        user = user_of_token(self.storage.store, client_token(flow))
        if user is None:
            return error_response(
                OPENAI, 401, "Send your user token as `Authorization: Bearer <token>`.", "invalid_user_token"
            )
        return json_response(200, own_usage(user, self.quota))

    def _admin(self, flow: http.HTTPFlow) -> http.Response:
        ip = client_ip(flow)
        if wait := self.failed_logins.wait(ip):
            return error_response(
                OPENAI,
                429,
                f"Too many failed logins; try again in {wait} s.",
                "too_many_attempts",
                {"retry-after": str(wait)},
            )
        if not secret_matches(client_token(flow), self.admin_key):
            self.failed_logins.failed(ip)
            return error_response(
                OPENAI, 401, "The admin API needs `Authorization: Bearer <ADMIN_KEY>`.", "unauthorized"
            )
        path, _, query = flow.request.path.partition("?")
        allowed = []
        for method, pattern, handler in _COMPILED:
            if match := pattern.fullmatch(path):
                if method == flow.request.method:
                    try:
                        return getattr(self, handler)(flow, parse_qs(query), **match.groupdict())
                    except UserError as error:
                        return error_response(OPENAI, 400, str(error), "invalid_user")
                allowed.append(method)
        if allowed:
            return error_response(
                OPENAI,
                405,
                f"This endpoint accepts {', '.join(allowed)} only.",
                "method_not_allowed",
                {"allow": ", ".join(allowed)},
            )
        return error_response(OPENAI, 404, "No such admin endpoint; see /admin/openapi.json.", "not_found")

    @staticmethod
    def _body(flow: http.HTTPFlow) -> dict:
        try:
            body = json.loads(flow.request.raw_content or b"{}")
        except ValueError:
            raise UserError("The request body must be JSON.") from None
        if not isinstance(body, dict):
            raise UserError("The request body must be a JSON object.")
        return body

    def _store(self):
        return self.storage.store

    def _user_or_404(self, user: dict | None) -> http.Response:
        if user is None:
            return error_response(OPENAI, 404, "No user with that id.", "user_not_found")
        return json_response(200, public_user(user))

    def list_users(self, flow, query) -> http.Response:
        stored = self._store().list_users()
        users = [public_user(user) for user in stored]
        users = sorted_users(users, query.get("sort", ["prompt_count,last_used_at"])[0].split(","))
        return json_response(200, {"users": users, "count": len(users), "cost_usd": usd(users_cost_nanousd(stored))})

    def create_user(self, flow, query) -> http.Response:
        token, user = self._store().create_user(self._body(flow))
        return json_response(201, {"token": token, "user": public_user(user)})

    def export_users(self, flow, query) -> http.Response:
        return json_response(200, {"users": self._store().export_users()})

    def import_users(self, flow, query) -> http.Response:
        users = self._body(flow).get("users")
        if not isinstance(users, list):
            raise UserError('Import a JSON object {"users": [...]} as written by /admin/users/export.')
        return json_response(200, {"imported": self._store().import_users(users)})

    def get_user(self, flow, query, user) -> http.Response:
        return self._user_or_404(self._store().get_user(user))

    def update_user(self, flow, query, user) -> http.Response:
        return self._user_or_404(self._store().update_user(user, self._body(flow)))

    def delete_user(self, flow, query, user) -> http.Response:
        if not self._store().delete_user(user):
            return self._user_or_404(None)
        return http.Response.make(204)

    def disable_user(self, flow, query, user) -> http.Response:
        reason = self._body(flow).get("reason") or "Disabled by the administrator."
        if not isinstance(reason, str):
            raise UserError("'reason' must be a string.")
        return self._user_or_404(self._store().set_disabled(user, reason[:200]))

    def enable_user(self, flow, query, user) -> http.Response:
        return self._user_or_404(self._store().set_disabled(user, None))

    def reset_user_usage(self, flow, query, user) -> http.Response:
        self._store().reset_usage(user)
        return self._user_or_404(self._store().get_user(user))

    def reset_all_usage(self, flow, query) -> http.Response:
        self._store().reset_usage()
        return json_response(200, {"reset": True})

    def list_keys(self, flow, query) -> http.Response:
        keys = key_view(self.pool.all_keys(), self._store().key_health(), self.checker.checked_at)
        return json_response(200, {"keys": keys, "status": self.checker.status})

    def recheck_keys(self, flow, query) -> http.Response:
        self.checker.recheck_all()
        return json_response(202, {"rechecking": True})

    def openapi(self, flow, query) -> http.Response:
        return json_response(200, openapi_description())
