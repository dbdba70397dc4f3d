"""A request body as JSON, parsed the way the upstream will read it.

Only bodies every JSON parser reads alike are accepted, because the upstream parses the bytes the proxy forwards,
not the dict the proxy checked: UTF-8 without a byte-order mark, no field named twice, no lone surrogate, no NaN or
Infinity, no number a 64-bit integer or a double cannot hold, and no nesting beyond MAX_NESTING.
"""

import json
import math
import re
from itertools import accumulate

# Containers within containers, the body itself counting as one. Codex CLI's tool schemas reach 16 and Claude
# Code's 10 (tests/fixtures/clients); 64 leaves room for deep JSON schemas and stays far below the point where
# any parser (Python's recursion limit near 20,000 here, serde_json's 128) would refuse or differ.
MAX_NESTING = 64
_INT64 = range(-(2**63), 2**63)
_BYTE_ORDER_MARK = b"\xef\xbb\xbf"
# A `\u` escape of a surrogate half: only then can a decoded string hold a lone one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# Strings (whose brackets are text) and the brackets outside them.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(byte for byte in range(256) if byte not in b"[]{}")
_NESTING_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


class BodyError(ValueError):
    """The body is not a JSON object; the message says why, for the client."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """Refuses an object that names a field twice: the proxy and the upstream could read different values."""
    body = dict(pairs)
    if len(body) != len(pairs):
        duplicate = next(key for number, (key, _) in enumerate(pairs) if key in dict(pairs[:number]))
        raise BodyError(f"The request body names the field {duplicate!r} twice.")
    return body


def _out_of_range(text: str) -> BodyError:
    shown = text if len(text) <= 24 else f"{text[:20]}… ({len(text)} characters)"
    return BodyError(
        f"The request body holds a number out of range ({shown}): integers must fit in 64 bits, other numbers in a "
        "double."
    )


def _integer(text: str) -> int:
    if len(text) > 20 or (value := int(text)) not in _INT64:  # 20 characters hold every 64-bit integer
        raise _out_of_range(text)
    return value


def _number(text: str) -> float:
    if not math.isfinite(value := float(text)):
        raise _out_of_range(text)
    return value


def _constant(name: str) -> None:
    raise BodyError(f"The request body holds {name}, which JSON does not allow.")


def _nesting(raw: bytes) -> int:
    """How deep containers nest in valid JSON `raw`, counted in C-speed passes (bodies reach megabytes)."""
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_NESTING_STEP.__getitem__, brackets)), default=0)


def _decode(raw: bytes) -> str:
    """The body's text; only UTF-8 without a byte-order mark (json.loads would guess others, the upstream not)."""
    if raw.startswith(_BYTE_ORDER_MARK):
        raise BodyError("The request body starts with a byte-order mark; send UTF-8 JSON without one.")
    try:
        if b"\x00" not in raw:  # JSON never holds a raw NUL; UTF-16 and UTF-32 text always does
            return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    raise BodyError("The request body is not UTF-8; send JSON encoded as UTF-8.")


def _check_surrogates(raw: bytes, body: dict) -> None:
    """Refuses a `\\u` escape of a surrogate without its pair, which parsers replace, refuse or keep."""
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BodyError(
                "The request body holds a lone surrogate (a \\ud800-\\udfff escape without its pair) in a string."
            ) from None


def parse_body(raw: bytes) -> dict:
    """A request body as a dict; raises BodyError when it is not a JSON object every parser reads alike."""
    try:
        body = json.loads(
            _decode(raw),
            object_pairs_hook=_unique_keys,
            parse_int=_integer,
            parse_float=_number,
            parse_constant=_constant,
        )
    except BodyError:
        raise
    except RecursionError:
        raise BodyError(f"The request body is nested deeper than {MAX_NESTING} levels.") from None
    except ValueError:
        raise BodyError("The request body must be JSON.") from None
    if not isinstance(body, dict):
        raise BodyError("The request body must be a JSON object.")
    if _nesting(raw) > MAX_NESTING:
        raise BodyError(f"The request body is nested deeper than {MAX_NESTING} levels.")
    _check_surrogates(raw, body)
    return body
