"""The owner's web pages under /admin: log in with ADMIN_KEY, then users, keys and usage.

A session is a signed cookie (llmproxy/web/signing.py) holding a random session id; every form carries a CSRF
token signed for that id, and the login form one signed for a cookie of its own. Failed logins count against
the same per-address record as the admin API's.
"""

import json
import re
import secrets
import time
from urllib.parse import parse_qs, urlencode

from mitmproxy import ctx, exceptions, http

from addons.apierrors import fail_closed, refuses_config_errors
from addons.flowstate import flow_state
from addons.gatekeeper import client_ip
from addons.headerhygiene import client_cookies
from addons.quotakeeper import QuotaKeeper
from addons.webpages import (
    cookie,
    form_fields,
    form_with_secret,
    html_response,
    redirect,
    script_nonce,
    served_over_tls,
)
from llmproxy.admin import USER_ID, FailedLogins, key_view, public_user, sorted_users, users_cost_nanousd
from llmproxy.api.routes import request_path
from llmproxy.config import ConfigError
from llmproxy.families import parse_family_numbers
from llmproxy.identity import secret_matches
from llmproxy.pool.checker import KeyChecker
from llmproxy.pool.keys import KeyPool
from llmproxy.pricing import format_usd, usd
from llmproxy.store import USER_TYPES, UserError
from llmproxy.store.storage import Storage
from llmproxy.usage_days import last_days, utc_today
from llmproxy.web import pages
from llmproxy.web.chart import NANOUSD, TOKENS, stacked_bars_svg, usage_by_day
from llmproxy.web.signing import Signer

SESSION_COOKIE = "llmproxy_admin"
LOGIN_COOKIE = "llmproxy_login"
LOGIN_FORM_SECONDS = 3600
USAGE_DAYS = 30
# Sessions ended by logging out, until they would have expired: a copy of the cookie is no use afterwards.
LOGGED_OUT = "admin sessions logged out"
_USER_PATH = re.compile(rf"/admin/manage/users/{USER_ID}(?:/(?P<action>disable|enable|delete|reset-usage))?")
_SORTABLE = ("nickname", "type", "prompt_count", "last_used_at")
# What a finished action says on the page it leads to: fixed sentences, so a link cannot put words on the page.
_DONE = {
    "created": "User created.",
    "saved": "Saved.",
    "disabled": "User disabled.",
    "enabled": "User enabled again.",
    "reset": "Usage reset: a new quota period for this user.",
    "deleted": "User deleted.",
    "imported": "Users imported.",
    "rechecking": "Every key is being checked again; reload in a few seconds.",
}


class AdminPages:
    """Serves /admin, /admin/login, /admin/logout and /admin/manage/..."""

    def __init__(
        self,
        secrets: dict,
        storage: Storage,
        pool: KeyPool,
        checker: KeyChecker,
        quotas: QuotaKeeper,
        failed_logins: FailedLogins,
    ):
        self.admin_key = secrets.get("admin_key", "")
        self.storage = storage
        self.pool = pool
        self.checker = checker
        self.quotas = quotas
        self.failed_logins = failed_logins
        self.sessions = Signer(self.admin_key, "admin session")
        self.csrf = Signer(self.admin_key, "admin csrf")
        self.login_csrf = Signer(self.admin_key, "admin login csrf")

    def load(self, loader):
        loader.add_option("admin_session_hours", int, 8, "How long a login to the /admin pages lasts, in hours.")

    @refuses_config_errors
    def configure(self, updated):
        if "admin_session_hours" in updated and ctx.options.admin_session_hours < 1:
            raise exceptions.OptionsError("ADMIN_SESSION_HOURS must be a whole number of hours, at least 1.")

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live:
            return
        state = flow_state(flow)
        if state.route_name != "admin_pages":
            return
        state.decision = "local"
        flow.response = self._answer(flow, request_path(flow.request.data.path).decode())

    def _answer(self, flow: http.HTTPFlow, path: str) -> http.Response:
        if not self.admin_key:
            return self._message(404, "No admin pages", "This proxy has no ADMIN_KEY; set one to use these pages.")
        if path == "/admin/login":
            return self._login(flow)
        lifetime = ctx.options.admin_session_hours * 3600
        session = self.sessions.verify(client_cookies(flow).get(SESSION_COOKIE, ""))
        if session is None or self.storage.store.affinity(LOGGED_OUT, session, lifetime) is not None:
            return redirect("/admin/login")
        if path == "/admin" or path == "/admin/manage":
            return redirect("/admin/manage/users")
        post = flow.request.method == "POST"
        fields = form_fields(flow) if post else {}
        if post and self.csrf.verify(fields.get("_csrf", "")) != session:
            return self._message(403, "Form refused", "The form expired or did not come from this site; reload it.")
        page = _Page(self, flow, session)
        if path == "/admin/logout":
            if not post:
                return page.gone()
            self.storage.store.bind_affinity(LOGGED_OUT, session, "yes", None, lifetime, capacity=100_000)
            return redirect("/admin/login", {"set-cookie": self._session_cookie(flow, "", 0)})
        if path == "/admin/manage/users":
            return page.create_user(fields) if post else page.users()
        if match := _USER_PATH.fullmatch(path):
            user_id, action = match["user"], match["action"]
            if action:
                return page.user_action(user_id, action, fields) if post else page.gone()
            return page.update_user(user_id, fields) if post else page.user(user_id)
        if path == "/admin/manage/export" and not post:
            return page.export()
        if path == "/admin/manage/import" and post:
            return page.import_users(fields)
        if path == "/admin/manage/keys" and not post:
            return page.keys()
        if path == "/admin/manage/keys/recheck" and post:
            self.checker.recheck_all()
            return redirect("/admin/manage/keys?done=rechecking")
        if path == "/admin/manage/usage" and not post:
            return page.usage()
        return page.gone()

    def _login(self, flow: http.HTTPFlow) -> http.Response:
        ip, fields = client_ip(flow), {}
        if flow.request.method == "POST":
            fields = form_with_secret(flow, "admin_key")
        if wait := self.failed_logins.wait(ip):
            return self._message(429, "Too many failed logins", f"Try again in {wait} s.", {"retry-after": str(wait)})
        if flow.request.method != "POST":
            return self._login_form(flow, "", 200)
        login_cookie = client_cookies(flow).get(LOGIN_COOKIE, "")
        if not login_cookie or self.login_csrf.verify(fields.get("_csrf", "")) != login_cookie:
            return self._login_form(flow, "The form expired; log in again.", 403)
        if not secret_matches(fields.get("admin_key", ""), self.admin_key):
            self.failed_logins.failed(ip)
            return self._login_form(flow, "Wrong admin key.", 401)
        lifetime = ctx.options.admin_session_hours * 3600
        session = self.sessions.sign(secrets.token_urlsafe(16), lifetime)
        return redirect("/admin/manage/users", {"set-cookie": self._session_cookie(flow, session, lifetime)})

    def _login_form(self, flow: http.HTTPFlow, message: str, status: int) -> http.Response:
        nonce = secrets.token_urlsafe(16)
        body = pages.render(
            "admin_login.html",
            title=ctx.options.server_title,
            message=message,
            csrf=self.login_csrf.sign(nonce, LOGIN_FORM_SECONDS),
        )
        login_cookie = cookie(LOGIN_COOKIE, nonce, "/admin/login", LOGIN_FORM_SECONDS, served_over_tls(flow))
        return html_response(body, status=status, headers={"set-cookie": login_cookie})

    @staticmethod
    def _session_cookie(flow: http.HTTPFlow, value: str, lifetime: int) -> str:
        return cookie(SESSION_COOKIE, value, "/admin", lifetime, served_over_tls(flow))

    @staticmethod
    def _message(status: int, heading: str, message: str, headers: dict | None = None) -> http.Response:
        body = pages.render(
            "admin_message.html", title=ctx.options.server_title, heading=heading, message=message, back="/admin"
        )
        return html_response(body, status=status, headers=headers)


class _Page:
    """One request's page of a logged-in owner: renders with the session's CSRF token; actions end in a redirect."""

    def __init__(self, site: AdminPages, flow: http.HTTPFlow, session: str):
        self.site = site
        self.store = site.storage.store
        self.query = parse_qs(flow.request.path.partition("?")[2])
        self.csrf = site.csrf.sign(session, ctx.options.admin_session_hours * 3600)

    def render(self, template: str, heading: str, status: int = 200, message: str = "", **context) -> http.Response:
        done = _DONE.get(self.query.get("done", [""])[0], "")
        nonce = script_nonce()
        body = pages.render(
            template,
            title=ctx.options.server_title,
            heading=heading,
            csrf=self.csrf,
            nonce=nonce,
            message=message or done,
            message_kind="error" if message else "ok",
            usd=format_usd,
            user_types=USER_TYPES,
            **context,
        )
        return html_response(body, nonce, status)

    def gone(self) -> http.Response:
        return self.render("admin_base.html", "Not found", 404, "There is no such page.")

    def users(self, status: int = 200, message: str = "") -> http.Response:
        stored = self.store.list_users()
        every = [public_user(user) for user in stored]
        query = self.query.get("q", [""])[0].strip()
        sort = self.query.get("sort", ["prompt_count"])[0]
        sort = sort if sort in _SORTABLE else "prompt_count"
        descending = self.query.get("dir", ["desc"])[0] != "asc"
        needle = query.casefold()
        shown = [
            user
            for user in every
            if not needle
            or any(needle in (user[field] or "").casefold() for field in ("nickname", "id", "type", "admin_note"))
        ]
        return self.render(
            "admin_users.html",
            "Users",
            status,
            message,
            users=sorted_users(shown, [sort], descending),
            total=len(every),
            query=query,
            sort=sort,
            descending=descending,
            cost=format_usd(usd(users_cost_nanousd(stored))),
            user=None,
            limits_text="",
        )

    def user(self, user_id: str, status: int = 200, message: str = "") -> http.Response:
        stored = self.store.get_user(user_id)
        if stored is None:
            return self.gone()
        user, quotas = public_user(stored), self.site.quotas
        usage = {
            family: {**figures, "limit": quotas.limit_for(stored, family)}
            for family, figures in sorted(user["usage"].items())
        }
        limits = ", ".join(f"{family}={tokens}" for family, tokens in sorted(user["token_limits"].items()))
        heading = user["nickname"] or f"User {user_id}"
        return self.render("admin_user.html", heading, status, message, user=user, usage=usage, limits_text=limits)

    def create_user(self, fields: dict) -> http.Response:
        try:
            token, user = self.store.create_user(_user_fields(fields, creating=True))
        except UserError as error:
            return self.users(400, str(error))
        return self.render("admin_created.html", "User created", token=token, user=public_user(user))

    def update_user(self, user_id: str, fields: dict) -> http.Response:
        try:
            updated = self.store.update_user(user_id, _user_fields(fields, creating=False))
        except UserError as error:
            return self.user(user_id, 400, str(error))
        return self._done(f"/admin/manage/users/{user_id}", "saved") if updated else self.gone()

    def user_action(self, user_id: str, action: str, fields: dict) -> http.Response:
        store = self.store
        if action == "disable":
            reason = fields.get("reason", "").strip()[:200] or "Disabled by the administrator."
            found = store.set_disabled(user_id, reason) is not None
        elif action == "enable":
            found = store.set_disabled(user_id, None) is not None
        elif action == "reset-usage":
            found = store.get_user(user_id) is not None
            store.reset_usage(user_id)
        else:  # delete, once confirmed
            if fields.get("confirm") != "yes":
                return self.user(user_id, 400, "Tick the box to confirm the deletion.")
            return self._done("/admin/manage/users", "deleted") if store.delete_user(user_id) else self.gone()
        done = {"disable": "disabled", "enable": "enabled", "reset-usage": "reset"}[action]
        return self._done(f"/admin/manage/users/{user_id}", done) if found else self.gone()

    def export(self) -> http.Response:
        return http.Response.make(
            200,
            json.dumps({"users": self.store.export_users()}, indent=1),
            {
                "content-type": "application/json",
                "content-disposition": 'attachment; filename="users.json"',
                "cache-control": "no-store",
            },
        )

    def import_users(self, fields: dict) -> http.Response:
        try:
            exported = json.loads(fields.get("users", ""))
        except ValueError:
            return self.users(400, "The file is not JSON; import a file written by Export.")
        users = exported.get("users") if isinstance(exported, dict) else None
        if not isinstance(users, list):
            return self.users(400, 'Import a JSON object {"users": [...]} as written by Export.')
        try:
            self.store.import_users(users)
        except UserError as error:
            return self.users(400, str(error))
        return self._done("/admin/manage/users", "imported")

    def keys(self) -> http.Response:
        site = self.site
        keys = key_view(site.pool.all_keys(), self.store.key_health(), site.checker.checked_at)
        return self.render("admin_keys.html", "Keys", keys=keys, checker_status=site.checker.status)

    def usage(self) -> http.Response:
        days = last_days(utc_today(), USAGE_DAYS)
        usage = usage_by_day(self.store.daily_counters(days[0]), days)
        return self.render(
            "admin_usage.html",
            "Usage",
            usage=usage,
            tokens_chart=stacked_bars_svg(days, usage.series("tokens"), TOKENS),
            cost_chart=stacked_bars_svg(days, usage.series("cost_nanousd"), NANOUSD),
            nanousd=lambda nanodollars: format_usd(usd(nanodollars)),
        )

    @staticmethod
    def _done(location: str, done: str) -> http.Response:
        return redirect(f"{location}?{urlencode({'done': done})}")


def _user_fields(fields: dict, creating: bool) -> dict:
    """The editable fields of a user as the form sent them; UserError for what cannot be one."""
    user = {
        "nickname": fields.get("nickname", "").strip() or None,
        "type": fields.get("type", "normal"),
        "admin_note": fields.get("admin_note", "").strip() or None,
    }
    try:
        entries = [entry for entry in fields.get("token_limits", "").split(",") if entry.strip()]
        user["token_limits"] = parse_family_numbers("token limits", entries)
    except ConfigError as error:
        raise UserError(str(error)) from None
    for name in ("max_ips", "rate_limit"):
        value = fields.get(name, "").strip()
        if value and not value.isdigit():
            raise UserError(f"{name.replace('_', ' ').capitalize()} must be a whole number.")
        user[name] = int(value) if value else None
    hours = fields.get("expires_in_hours", "").strip()
    if hours:
        try:
            seconds = float(hours) * 3600
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds < 100 * 365 * 86400:  # also refuses nan and inf
            raise UserError("Expires in hours must be a number of hours from now.")
        user["expires_at"] = time.time() + seconds
    elif creating:
        user["expires_at"] = None
    return user
