"""Prompt token counts, offline.

tiktoken downloads its encodings on first use, which these machines (like many deployments) cannot do. The
`quicktok-v1` package ships the cl100k_base and o200k_base vocabularies in a binary form; this module writes
them in tiktoken's own file format into tiktoken's cache, under the names tiktoken would download them to, and
lets tiktoken load them: tiktoken checks each file against the SHA-256 it expects for the official file, so a
vocabulary that differs by one byte is refused rather than used.
"""

import base64
import hashlib
import os
import struct
import tempfile
from functools import cache
from importlib.resources import files
from pathlib import Path

import tiktoken

_OFFICIAL_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
_VOCABULARIES = {"cl100k_base": "cl100k.vocab", "o200k_base": "o200k.vocab"}
# Chat formatting overhead of the OpenAI chat format: tokens per message, and the reply's priming tokens.
TOKENS_PER_MESSAGE = 3
REPLY_PRIMING = 3
# Anthropic publishes no offline tokenizer. Its tokenizer splits English and code a little finer than cl100k;
# counts are scaled up so the estimate errs towards more tokens (see the README for how close it is).
CLAUDE_FACTOR = 1.15


class TokenizerUnavailable(RuntimeError):
    """The encodings could not be loaded; the message says what to install."""


def _tiktoken_file(vocabulary: bytes) -> bytes:
    """quicktok's vocabulary (count, then length-prefixed token bytes and rank) as tiktoken's text format."""
    (count,) = struct.unpack_from("<I", vocabulary, 0)
    offset, lines = 4, []
    for _ in range(count):
        (length,) = struct.unpack_from("<H", vocabulary, offset)
        token = vocabulary[offset + 2 : offset + 2 + length]
        (rank,) = struct.unpack_from("<I", vocabulary, offset + 2 + length)
        offset += 6 + length
        lines.append(b"%s %d\n" % (base64.b64encode(token), rank))
    return b"".join(lines)


def _cache_dir() -> Path:
    directory = Path(os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(Path(tempfile.gettempdir()) / "llmproxy-tiktoken")))
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@cache
def encoding(name: str) -> tiktoken.Encoding:
    """A tiktoken encoding, from the installed vocabulary; raises TokenizerUnavailable."""
    cached = _cache_dir() / hashlib.sha1(_OFFICIAL_URL.format(name=name).encode()).hexdigest()
    try:
        if not cached.exists():
            vocabulary = files("quicktok").joinpath("data", _VOCABULARIES[name]).read_bytes()
            partial = cached.with_suffix(".partial")
            partial.write_bytes(_tiktoken_file(vocabulary))
            partial.replace(cached)
        return tiktoken.get_encoding(name)
    except Exception as error:  # tiktoken falls back to downloading, which fails here with a network error
        raise TokenizerUnavailable(f"The {name} tokenizer could not be loaded offline ({type(error).__name__}); "
                                   "reinstall the pinned requirements.") from None  # fmt: skip


def encoding_for(model: str) -> str:
    """o200k_base for the gpt-4o generation and later, cl100k_base for older OpenAI models."""
    older = model.startswith(("gpt-4-", "gpt-3.5", "text-embedding", "davinci", "babbage")) or model == "gpt-4"
    return "cl100k_base" if older else "o200k_base"


def texts_of(value) -> list[str]:
    """Every string a model reads in a message's content (text parts, tool arguments and results)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [text for item in value for text in texts_of(item)]
    if isinstance(value, dict):
        if value.get("type") in ("image_url", "image", "input_image"):
            return []
        return [text for key, item in value.items() if key not in ("type", "cache_control")
                for text in texts_of(item)]  # fmt: skip
    return []


def count_prompt(api: str, model: str, body: dict) -> int:
    """The prompt's tokens: exact for OpenAI text (images not counted), an upper estimate for Claude."""
    enc = encoding(encoding_for(model) if api == "openai" else "cl100k_base")
    messages = body.get("messages") if isinstance(body.get("messages"), list) else []
    loose = [body.get(field) for field in ("system", "prompt", "input", "instructions", "tools")]
    tokens = sum(len(enc.encode_ordinary(text)) for text in texts_of(loose))
    for message in messages:
        tokens += TOKENS_PER_MESSAGE + sum(len(enc.encode_ordinary(text)) for text in texts_of(message))
    tokens += REPLY_PRIMING if messages else 0
    return tokens if api == "openai" else int(tokens * CLAUDE_FACTOR) + 1
