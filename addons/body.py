"""The request body as JSON, parsed once per flow and shared by every addon that reads it."""

import json
import weakref

from mitmproxy import http

_parsed: "weakref.WeakKeyDictionary[http.HTTPFlow, dict]" = weakref.WeakKeyDictionary()


class BodyError(ValueError):
    """The body is not a JSON object; the message says why, for the client."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """Refuses an object that names a field twice: the proxy and the upstream could read different values."""
    body = dict(pairs)
    if len(body) != len(pairs):
        duplicate = next(key for number, (key, _) in enumerate(pairs) if key in dict(pairs[:number]))
        raise BodyError(f"The request body names the field {duplicate!r} twice.")
    return body


def parsed_body(flow: http.HTTPFlow) -> dict:
    """The body of a forwarded request as a dict; raises BodyError when it is not a JSON object."""
    if flow in _parsed:
        return _parsed[flow]
    try:
        body = json.loads(flow.request.raw_content or b"", object_pairs_hook=_unique_keys)
    except BodyError:
        raise
    except RecursionError:
        raise BodyError("The request body is nested too deeply.") from None
    except (ValueError, UnicodeDecodeError):
        raise BodyError("The request body must be JSON.") from None
    if not isinstance(body, dict):
        raise BodyError("The request body must be a JSON object.")
    _parsed[flow] = body
    return body



def replace_body(flow: http.HTTPFlow, body: dict) -> None:
    """Makes `body` what the upstream will receive, and what later addons read."""
    flow.request.content = json.dumps(body).encode()
    _parsed[flow] = body
