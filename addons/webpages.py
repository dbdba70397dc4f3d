"""What the web pages' addons (admin pages, user pages) and the admin API share: answers with the headers a page
needs, JSON answers no cache keeps, form fields and cookies."""

import json
import secrets

from mitmproxy import ctx, http

# Scripts run only with the answer's nonce, nothing is framed, forms post only here, nothing is fetched elsewhere.
_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
    "script-src 'nonce-{nonce}'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def script_nonce() -> str:
    """A fresh nonce for the inline scripts of one answer."""
    return secrets.token_urlsafe(16)


def html_response(body: str, nonce: str = "", status: int = 200, headers: dict[str, str] | None = None):
    """A page: never cached (it may show a token or a user's figures), never framed, scripts only with `nonce`."""
    return http.Response.make(
        status,
        body,
        {
            "content-type": "text/html; charset=utf-8",
            "cache-control": "no-store",
            "content-security-policy": _CSP.format(nonce=nonce or "none"),
            "x-frame-options": "DENY",
            "x-content-type-options": "nosniff",
            "referrer-policy": "no-referrer",
            **(headers or {}),
        },
    )


def json_response(status: int, body, headers: dict[str, str] | None = None) -> http.Response:
    """A JSON answer that no cache keeps: it may hold a token or a user's figures."""
    return http.Response.make(
        status, json.dumps(body), {"content-type": "application/json", "cache-control": "no-store", **(headers or {})}
    )


def redirect(location: str, headers: dict[str, str] | None = None) -> http.Response:
    """303 See Other: after a form post, the browser fetches `location` with GET."""
    return http.Response.make(303, b"", {"location": location, "cache-control": "no-store", **(headers or {})})


def form_fields(flow: http.HTTPFlow) -> dict[str, str]:
    """A posted form's fields (urlencoded or multipart; a file field as its text), the last value of each name."""
    request = flow.request
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        return {
            name.decode("utf-8", "replace"): value.decode("utf-8", "replace")
            for name, value in request.multipart_form.items(multi=True)
        }
    if content_type.startswith("application/x-www-form-urlencoded"):
        return dict(request.urlencoded_form.items(multi=True))
    return {}


def form_with_secret(flow: http.HTTPFlow, secret_field: str) -> dict[str, str]:
    """form_fields, after which the field `secret_field` (a key, a token) reads `(removed)` on the flow: it leaves
    the flow before mitmweb lists it or a flow dump prints it, whatever the answer."""
    fields = form_fields(flow)
    flow.request.urlencoded_form = [
        (name, "(removed)" if name == secret_field else value) for name, value in fields.items()
    ]
    return fields


def served_over_tls(flow: http.HTTPFlow) -> bool:
    """Whether the browser reached us over TLS: directly, or through TRUSTED_PROXIES that say so."""
    if flow.request.scheme == "https":
        return True
    return bool(ctx.options.trusted_proxies) and flow.request.headers.get("x-forwarded-proto", "") == "https"


def cookie(name: str, value: str, path: str, max_age: int, secure: bool) -> str:
    """A Set-Cookie value that scripts cannot read and other sites cannot send; max_age 0 removes it."""
    return f"{name}={value}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Strict{'; Secure' if secure else ''}"
