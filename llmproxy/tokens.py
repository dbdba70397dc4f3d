"""Prompt token counts, offline.

tiktoken downloads its encodings on first use, which these machines (like many deployments) cannot do. The
`quicktok-v1` package ships the cl100k_base and o200k_base vocabularies in a binary form; this module writes
them in tiktoken's own file format into tiktoken's cache, under the names tiktoken would download them to, and
lets tiktoken load them: tiktoken checks each file against the SHA-256 it expects for the official file, so a
vocabulary that differs by one byte is refused rather than used.
"""

import base64
import hashlib
import logging
import os
import re
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import tiktoken

logger = logging.getLogger(__name__)

_OFFICIAL_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
_VOCABULARIES = {"cl100k_base": "cl100k.vocab", "o200k_base": "o200k.vocab"}
# Chat formatting overhead of the OpenAI chat format: tokens per message (plus one for its role, a value the
# walk leaves out), and the reply's priming tokens.
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
    directory = Path(
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(Path(tempfile.gettempdir()) / "llmproxy-tiktoken"))
    )
    directory.mkdir(parents=True, exist_ok=True)
    return directory


_loaded: dict[str, tiktoken.Encoding] = {}


def encoding(name: str) -> tiktoken.Encoding:
    """A tiktoken encoding, loaded on first use (about a second, and 43 MB for o200k_base, 21 MB for cl100k_base);
    raises TokenizerUnavailable."""
    if (found := _loaded.get(name)) is None:
        found = _loaded[name] = _load(name)
        logger.info("loaded the %s vocabulary to count prompts", name)
    return found


def is_loaded(name: str) -> bool:
    return name in _loaded


def missing_vocabularies() -> list[str]:
    """The vocabularies that are neither installed nor in tiktoken's cache."""
    return [
        name
        for name, resource in _VOCABULARIES.items()
        if not files("quicktok").joinpath("data", resource).is_file() and not _cached_file(name).exists()
    ]


def _cached_file(name: str) -> Path:
    """Where tiktoken looks for a vocabulary it would download."""
    return _cache_dir() / hashlib.sha1(_OFFICIAL_URL.format(name=name).encode()).hexdigest()


def _load(name: str) -> tiktoken.Encoding:
    cached = _cached_file(name)
    try:
        if not cached.exists():
            vocabulary = files("quicktok").joinpath("data", _VOCABULARIES[name]).read_bytes()
            partial = cached.with_suffix(".partial")
            partial.write_bytes(_tiktoken_file(vocabulary))
            partial.replace(cached)
        loaded = tiktoken.get_encoding(name)
    except Exception as error:  # tiktoken falls back to downloading, which fails here with a network error
        raise TokenizerUnavailable(
            f"The {name} tokenizer could not be loaded offline ({type(error).__name__}); "
            "reinstall the pinned requirements."
        ) from None
    # tiktoken keeps the vocabulary twice: in its Rust encoder, which counts, and as a Python dict (28 MB for
    # o200k_base) that only pickling reads.
    loaded._mergeable_ranks = {}
    return loaded


def encoding_for(api: str, model: str) -> str:
    """o200k_base for the gpt-4o generation and later, cl100k_base for older OpenAI models and for Claude."""
    if api != "openai":
        return "cl100k_base"
    older = model.startswith(("gpt-4-", "gpt-3.5", "text-embedding", "davinci", "babbage")) or model == "gpt-4"
    return "cl100k_base" if older else "o200k_base"


# Values of these keys (and all within them) are identifiers or settings: no model reads them as text.
NOT_TEXT_KEYS = frozenset(
    {
        "id",
        "call_id",
        "tool_use_id",
        "tool_call_id",
        "previous_response_id",
        "prompt_cache_key",
        "model",
        "type",
        "role",
        "status",
        "media_type",
        "cache_control",
        "metadata",
        "client_metadata",
        "user",
        "safety_identifier",
        "service_tier",
        "include",
        "detail",
        "mime_type",
    }
)
# Opaque blobs a model does read, encoded (encrypted reasoning, redacted thinking, compaction, audio).
BLOB_KEYS = frozenset({"encrypted_content", "data", "file_data"})
SIGNATURE_KEYS = frozenset({"signature"})  # verifies a thinking block; not read by the model
IMAGE_TYPES = frozenset({"image", "image_url", "input_image"})
DOCUMENT_TYPES = frozenset({"document", "input_file", "file"})


@dataclass
class ModelInput:
    """What a request gives the model to read, sorted by how it is counted."""

    texts: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # object keys: searched by the filter, not counted
    images: list[dict] = field(default_factory=list)
    documents: list[dict] = field(default_factory=list)
    blobs: list[str] = field(default_factory=list)
    messages: int = 0


def model_input(body: dict) -> ModelInput:
    """Walks the whole request body, whatever its shape: every string is text the model reads, except what lies
    under NOT_TEXT_KEYS; image and document parts, opaque blobs and data URLs are set apart. Object keys are kept
    too (a tool schema's property names are read by the model), for the filter."""
    found = ModelInput()
    for field_name in ("messages", "input"):
        if isinstance(items := body.get(field_name), list):
            found.messages += len(items)
    stack: list[tuple[object, str, bool]] = [(body, "", False)]  # (value, its key, inside a plain-text source)
    while stack:  # a loop, not recursion: a deeply nested body must not exhaust Python's stack
        value, key, plain = stack.pop()
        if isinstance(value, str):
            if (key in BLOB_KEYS and not plain) or value.startswith("data:"):
                found.blobs.append(value)
            elif key not in SIGNATURE_KEYS:
                found.texts.append(value)
        elif isinstance(value, list):
            stack.extend((item, key, False) for item in reversed(value))
        elif isinstance(value, dict):
            kind = value.get("type")
            if kind in IMAGE_TYPES:
                found.images.append(value)
            elif kind in DOCUMENT_TYPES and _is_binary_document(value):
                found.documents.append(value)
            else:
                plain = kind == "text" or str(value.get("media_type", "")).startswith("text/")
                for name, item in reversed(value.items()):
                    if name not in NOT_TEXT_KEYS:
                        found.names.append(name)
                        stack.append((item, name, plain))
    return found


def _is_binary_document(part: dict) -> bool:
    """A PDF or file reference; a document of plain text (or of content blocks) is read as text instead."""
    source = part.get("source")
    return not (isinstance(source, dict) and source.get("type") in ("text", "content"))


# -- non-text content -----------------------------------------------------------------------------------------
# Anthropic: images are scaled to at most 1568 px on the long edge and cost width * height / 750 tokens, at most
# about 1600. OpenAI (detail high or auto): fit into 2048 x 2048, shortest side to 768, then 170 per 512 px tile
# plus 85 (85 for detail low); the patch-based models cost up to 1536 patches x 1.72. PDFs: Anthropic documents
# 1,500-3,000 tokens a page (text plus the page image); 3,000 is counted.
ANTHROPIC_IMAGE_MAX = 1600
OPENAI_IMAGE_MAX = 2642  # 1536 patches x 1.72, more than the largest tiled image (8 tiles: 1445)
PDF_PAGE_TOKENS = 3000
PDF_MAX_PAGES = 100  # Anthropic's per-request maximum: the bound for a PDF whose pages cannot be counted
BLOB_BYTES_PER_TOKEN = 4  # encrypted reasoning and the like: the decoded bytes at about 4 bytes a token
_PAGE_COUNT = re.compile(rb"/Type\s*/Pages\b[^>]*?/Count\s+(\d+)|/Count\s+(\d+)[^>]*?/Type\s*/Pages\b", re.DOTALL)
_PAGE = re.compile(rb"/Type\s*/Page\b")
_STREAM = re.compile(rb"stream\r?\n")
_DATA_URL = re.compile(r"data:[^;,]*;base64,", re.IGNORECASE)


@dataclass
class Estimate:
    """A prompt's size in tokens: `low` never above the upstream's count where the text tokenizer is exact (used
    for refusals), `high` never below it by more than the stated bounds (used for reservations)."""

    low: int
    high: int


def _decoded(encoded: str, limit: int | None = None) -> bytes:
    """The bytes of a base64 string or data URL (the first `limit` bytes when given); b"" when it is not base64."""
    encoded = _DATA_URL.sub("", encoded, count=1).strip()
    if limit is not None:
        encoded = encoded[: limit * 4 // 3 + 4]
        encoded = encoded[: len(encoded) - len(encoded) % 4]
    try:
        return base64.b64decode(encoded, validate=False)
    except ValueError:
        return b""


def image_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG, GIF, WebP or JPEG header; None when the format or header is unknown."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8 ":
            width, height = struct.unpack("<HH", data[26:30])
            return width & 0x3FFF, height & 0x3FFF
        if chunk == b"VP8L":
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8X":
            return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if data[:2] == b"\xff\xd8":
        offset = 2
        while offset + 9 < len(data) and data[offset] == 0xFF:
            marker, length = data[offset + 1], int.from_bytes(data[offset + 2 : offset + 4], "big")
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
                height, width = struct.unpack(">HH", data[offset + 5 : offset + 9])
                return width, height
            offset += 2 + length
    return None


def _image_source(part: dict) -> tuple[str, str]:
    """(base64 data or URL, detail) of an image part in any of the APIs' shapes."""
    source, url = part.get("source"), part.get("image_url")
    if isinstance(source, dict):
        return str(source.get("data") or source.get("url") or ""), ""
    if isinstance(url, dict):
        return str(url.get("url") or ""), str(url.get("detail") or "")
    return str(url or part.get("file_data") or ""), str(part.get("detail") or "")


def image_tokens(api: str, part: dict) -> Estimate:
    """An image part by the provider's formula when its size can be read, else by the stated bound."""
    data, detail = _image_source(part)
    size = None
    if data and not data.startswith(("http://", "https://")):
        size = image_size(_decoded(data, limit=256 * 1024))  # a JPEG's frame header may follow a large EXIF block
    if api == "anthropic":
        if size is None:
            return Estimate(0, ANTHROPIC_IMAGE_MAX)
        width, height = size
        scale = min(1.0, 1568 / max(width, height, 1))
        tokens = min(ANTHROPIC_IMAGE_MAX, -(-int(width * scale) * int(height * scale) // 750))
        return Estimate(tokens, tokens)
    if detail == "low":
        return Estimate(85, 85)
    if size is None:
        return Estimate(85, OPENAI_IMAGE_MAX)
    width, height = size
    scale = min(1.0, 2048 / max(width, height, 1))
    width, height = width * scale, height * scale
    scale = min(1.0, 768 / max(min(width, height), 1))
    tiles = -(-int(width * scale) // 512) * -(-int(height * scale) // 512)
    patches = min(1536, -(-int(size[0]) // 32) * -(-int(size[1]) // 32))
    tiled = 85 + 170 * tiles
    return Estimate(min(tiled, patches), max(tiled, int(patches * 1.72)))


def pdf_pages(data: bytes) -> int | None:
    """Pages of a PDF: its page tree's count, also inside compressed object streams; None when not found."""
    chunks = [data]
    for match in _STREAM.finditer(data):
        if len(chunks) > 200:
            break
        try:  # at most 1 MB out of each stream: a compressed stream cannot blow up memory
            chunks.append(zlib.decompressobj().decompress(data[match.end() : match.end() + 4_000_000], 1_000_000))
        except zlib.error:
            continue
    counts = [int(a or b) for chunk in chunks for a, b in _PAGE_COUNT.findall(chunk)]
    if counts:
        return max(counts)
    pages = sum(len(_PAGE.findall(chunk)) for chunk in chunks)
    return pages or None


def document_tokens(part: dict) -> Estimate:
    """A PDF (or file) part at PDF_PAGE_TOKENS a page; a file the proxy cannot read at the page bound."""
    source = part.get("source") if isinstance(part.get("source"), dict) else {}
    data = str(source.get("data") or part.get("file_data") or "")
    pages = pdf_pages(_decoded(data)) if data else None
    return Estimate(0, PDF_PAGE_TOKENS * min(pages or PDF_MAX_PAGES, PDF_MAX_PAGES))


def blob_tokens(blob: str) -> int:
    """An opaque blob (base64 text): its decoded bytes at BLOB_BYTES_PER_TOKEN."""
    return -(-(len(blob) * 3 // 4) // BLOB_BYTES_PER_TOKEN)


def count_prompt(api: str, model: str, found: ModelInput) -> Estimate:
    """The prompt's tokens. Text is counted with tiktoken: exact for OpenAI models (plus the chat format's
    overhead); for Claude, cl100k as the low figure and that x CLAUDE_FACTOR as the high one. Images, documents
    and opaque blobs by the figures above."""
    enc = encoding(encoding_for(api, model))
    text = sum(len(enc.encode_ordinary(piece)) for piece in found.texts)
    framing = _framing(found)
    high = text + framing if api == "openai" else int((text + framing) * CLAUDE_FACTOR) + 1
    return _with_parts(api, found, Estimate(text, high))


def bound_prompt(api: str, found: ModelInput) -> Estimate:
    """The prompt's tokens without a vocabulary: no token of either API is shorter than a byte, so the text's UTF-8
    bytes bound its count from above; nothing bounds it from below."""
    text = sum(len(piece) if piece.isascii() else len(piece.encode("utf-8", "surrogatepass")) for piece in found.texts)
    return _with_parts(api, found, Estimate(0, text + _framing(found)))


def _framing(found: ModelInput) -> int:
    return (TOKENS_PER_MESSAGE + 1) * found.messages + (REPLY_PRIMING if found.messages else 0)


def _with_parts(api: str, found: ModelInput, text: Estimate) -> Estimate:
    """`text` plus the prompt's images, documents and opaque blobs."""
    low, high = text.low, text.high
    for part in found.images:
        image = image_tokens(api, part)
        low, high = low + image.low, high + image.high
    for part in found.documents:
        high += document_tokens(part).high
    high += sum(blob_tokens(blob) for blob in found.blobs)
    return Estimate(low, high)
