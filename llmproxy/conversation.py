"""What names a request's conversation, and the response its answer stored: read from the request and the answer."""

import hashlib
import json
import re

from llmproxy import tokens

# What the proxy remembers as a response id: printable ASCII, about ten times as long as OpenAI's (`resp_`, 50 digits).
# Anything else the upstream names a response is not kept: a follow-up naming it goes to any key.
RESPONSE_ID = re.compile(r"[!-~]{1,512}")


def response_id(body: bytes) -> object:
    """The id of a buffered Responses API answer, as it came (None when there is none)."""
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return answer.get("id") if isinstance(answer, dict) else None


def _opening(body: dict) -> list[str] | None:
    """The text of the system prompt and of the first user message, which every turn of a conversation repeats
    (cache markers, which clients move from turn to turn, are no text); None when the request has no user message."""
    turns = body.get("messages") or body.get("input")
    if isinstance(turns, str):  # a Responses input given as one text
        turns = [{"role": "user", "content": turns}]
    if not isinstance(turns, list):
        return None
    turns = [turn for turn in turns if isinstance(turn, dict)]
    first_user = next((turn for turn in turns if turn.get("role") == "user"), None)
    if first_user is None:
        return None
    system = next((turn for turn in turns if turn.get("role") in ("system", "developer")), None)
    return tokens.model_input(
        {"system": body.get("system"), "instructions": body.get("instructions"), "messages": [system, first_user]}
    ).texts


def conversation(body: dict, client_session: str | None) -> tuple[str, str] | None:
    """What names the request's conversation, as (source, value); None when nothing does."""
    if isinstance(key := body.get("prompt_cache_key"), str) and key:
        return "prompt_cache_key", key
    metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    if isinstance(user := metadata.get("user_id"), str) and user:
        return "metadata.user_id", user
    if client_session:
        return "header", client_session
    if (opening := _opening(body)) is not None:
        return "opening", json.dumps(opening)
    return None


def carries_encrypted_content(body: dict) -> bool:
    """Whether a Responses request sends back items only the organisation that made them can read."""
    items = body.get("input") if isinstance(body.get("input"), list) else []
    return any(isinstance(item, dict) and isinstance(item.get("encrypted_content"), str) for item in items)


def digest(*parts: str) -> str:
    """A short hash of `parts`: what the store keeps of a session header or a conversation's name."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]
