"""Prompt logging, off by default: what was asked and answered, for an owner who says so on the status page.

Each completed generation becomes one record: time, endpoint, model, family, the user as a hash, the prompt, the
completion (a stream's text put back together), and the tokens. Never a key or a user token. Backends: `file`
(JSON lines, rotated by size) or `sqlite`.
"""

import json
import sqlite3
import time
from pathlib import Path

from mitmproxy import ctx, exceptions, http

from addons.apierrors import refuses_config_errors
from addons.flowstate import flow_state, parsed_body
from addons.settlement import settlement_listener
from llmproxy.api.usage import Usage
from llmproxy.config import size_setting
from llmproxy.identity import identity_digest

BACKENDS = ("file", "sqlite")
ROTATED_FILES_KEPT = 5


class PromptLog:
    """Writes one record per completed generation when PROMPT_LOGGING is on."""

    def __init__(self):
        self.max_bytes = 0
        self._db: sqlite3.Connection | None = None

    def load(self, loader):
        loader.add_option("prompt_logging", bool, False, "Log prompts and completions (the status page says so).")
        loader.add_option("prompt_logging_backend", str, "file", "file (JSON lines) or sqlite.")
        loader.add_option("prompt_log_max_bytes", str, "100m", "Size at which the log file is rotated.")

    @refuses_config_errors
    def configure(self, updated):
        if "prompt_logging_backend" in updated and ctx.options.prompt_logging_backend not in BACKENDS:
            raise exceptions.OptionsError(f"PROMPT_LOGGING_BACKEND must be one of {', '.join(BACKENDS)}.")
        if "prompt_log_max_bytes" in updated:
            self.max_bytes = size_setting("prompt_log_max_bytes", ctx.options.prompt_log_max_bytes, "100m")

    def done(self):
        if self._db:
            self._db.close()

    @settlement_listener
    def request_settled(self, flow: http.HTTPFlow, usage: Usage | None, cost: int, completion: str) -> None:
        if not ctx.options.prompt_logging or usage is None:
            return
        state = flow_state(flow)
        body = parsed_body(flow)
        prompt = {
            field: body[field] for field in ("system", "messages", "prompt", "input", "instructions") if field in body
        }
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "endpoint": state.route_name,
            "model": state.model,
            "family": state.family,
            "user": identity_digest(state.identity),
            "prompt": prompt,
            "completion": completion,
            "inputTokens": usage.prompt,
            "outputTokens": usage.output,
        }
        directory = Path(ctx.options.data_dir)
        if ctx.options.prompt_logging_backend == "sqlite":
            self._write_sqlite(directory / "prompt-log.sqlite3", entry)
        else:
            self._write_file(directory / "prompt-log.jsonl", entry)

    def _write_file(self, path: Path, entry: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.max_bytes and path.exists() and path.stat().st_size >= self.max_bytes:
            for number in range(ROTATED_FILES_KEPT - 1, 0, -1):
                older = path.with_name(f"{path.name}.{number}")
                if older.exists():
                    older.replace(path.with_name(f"{path.name}.{number + 1}"))
            path.replace(path.with_name(f"{path.name}.1"))
        with path.open("a", encoding="utf-8") as log:
            log.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def _write_sqlite(self, path: Path, entry: dict) -> None:
        if self._db is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS prompt_log (time TEXT, endpoint TEXT, model TEXT, family TEXT, user TEXT,"
                " prompt TEXT, completion TEXT, input_tokens INTEGER, output_tokens INTEGER)"
            )
        self._db.execute(
            "INSERT INTO prompt_log VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                entry["time"],
                entry["endpoint"],
                entry["model"],
                entry["family"],
                entry["user"],
                json.dumps(entry["prompt"], ensure_ascii=False),
                entry["completion"],
                entry["inputTokens"],
                entry["outputTokens"],
            ),
        )
