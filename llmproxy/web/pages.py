"""The proxy's HTML: the status page (the default page from Jinja2 templates, or the owner's PAGE_BODY, base64 in
the setting, with its {tags} filled) and the web pages for the owner and the users, which extend base.html."""

import base64
import html
import re
from collections.abc import Callable, Mapping
from datetime import datetime

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from llmproxy.config import ConfigError

# Autoescaping escapes every value a template shows; StrictUndefined makes a misspelt name fail, not vanish.
_ENV = Environment(
    loader=PackageLoader("llmproxy.web"),
    autoescape=select_autoescape(("html",)),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def format_time(when: float | None) -> str:
    """A time.time() as the pages show it: the proxy's local time with its zone (which quota refreshes follow), or
    `never`."""
    return "never" if when is None else f"{datetime.fromtimestamp(when).astimezone():%Y-%m-%d %H:%M %Z}"


_ENV.filters["time"] = format_time
_TAG = re.compile(r"\{([A-Za-z][A-Za-z0-9_.\-]*(?::[A-Za-z][A-Za-z0-9_.\-]*)?)\}")


def header_html(facts: dict, services: Mapping[str, Mapping[str, str]]) -> str:
    """Title, notices and the endpoints table: the top of the default page, and PAGE_BODY's {headerHtml}.

    `services`: per service of `facts`, its `name` and the `key_setting` that adds its keys.
    """
    return _ENV.get_template("header.html").render(facts=facts, services=services)


def status_page(facts: dict, services: Mapping[str, Mapping[str, str]], usd: Callable[[float], str]) -> str:
    """The default page: readable on a phone, no JavaScript; `usd` formats an amount of dollars."""
    return _ENV.get_template("status.html").render(facts=facts, services=services, usd=usd)


def render(template: str, **context) -> str:
    """A web page from its template (which extends base.html); every value it shows is escaped."""
    return _ENV.get_template(template).render(**context)


def page_body(template: str, values: Mapping[str, str], header: str) -> str:
    """The owner's PAGE_BODY with each known {tag} replaced by its value, HTML-escaped; unknown tags stay.

    The template is the owner's own HTML, so it is not escaped, and it is not a Jinja2 template: an owner's `{{`
    or `{%` is text. `header` is {headerHtml}, markup from `header_html`, whose values are escaped already.
    """
    escaped = {tag: html.escape(value) for tag, value in values.items()}
    escaped["headerHtml"] = header
    return _TAG.sub(lambda match: escaped.get(match.group(1), match.group(0)), template)


def decode_page_body(encoded: str) -> str:
    """PAGE_BODY: base64 of UTF-8 HTML (the original's atob() mangled anything beyond Latin-1; this does not)."""
    try:
        return base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise ConfigError("PAGE_BODY must be base64-encoded UTF-8 HTML.") from None


def format_wait(seconds: float) -> str:
    """`no wait` up to 2 s, else `Nsec` or `Nmin, Nsec` (whole seconds, floored minutes)."""
    if seconds <= 2:
        return "no wait"
    total = round(seconds)
    return f"{total}sec" if total < 60 else f"{total // 60}min, {total % 60}sec"
