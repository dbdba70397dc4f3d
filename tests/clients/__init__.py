"""The real coding-agent CLIs (Claude Code, Codex CLI) that the end-to-end tests run, each in a throw-away HOME.

`./run.sh test` installs them from package.json here (npm ci); `find_binary` says why when they are absent.
The clients get only PATH, HOME (and TMPDIR inside it) and their own settings: nothing of the developer's.
"""

import json
import os
import subprocess
import tempfile
from functools import cache
from pathlib import Path

CLIENTS_DIR = Path(__file__).resolve().parent
PACKAGES = {"claude": "@anthropic-ai/claude-code", "codex": "@openai/codex"}
TIMEOUT = 120  # a run against a local fake takes seconds; Codex's websocket retries against a 404 take about 7


@cache
def find_binary(name: str) -> tuple[Path | None, str]:
    """The installed binary of `claude` or `codex` and "", or None and why it cannot run."""
    path = CLIENTS_DIR / "node_modules" / ".bin" / name
    if not path.exists():
        return None, f"{name} is not installed: ./run.sh test installs it with npm ci in tests/clients"
    try:
        with tempfile.TemporaryDirectory(prefix=f"{name}-home-") as home:  # codex writes its HOME even here
            _run([path, "--version"], _base_env(Path(home)), Path(home), 30).check_returncode()
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"{name} is installed but does not run ({err}); reinstall with ./run.sh test"
    return path, ""


def version(name: str) -> str:
    """The installed version of a client's npm package."""
    manifest = CLIENTS_DIR / "node_modules" / PACKAGES[name] / "package.json"
    return json.loads(manifest.read_text())["version"]


def _base_env(home: Path) -> dict[str, str]:
    # TMPDIR too: Claude Code keeps session files in $TMPDIR/claude-UID, which would outlive the run in /tmp.
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "TMPDIR": str(home)}


def _run(argv: list, env: dict[str, str], home: Path, timeout: float, stdin: str = ""):
    return subprocess.run(
        [str(part) for part in argv],
        check=False,
        env=env,
        cwd=home,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_claude(base_url: str, key: str, prompt: str, *args: str, timeout: float = TIMEOUT):
    """`claude -p PROMPT [args]` against `base_url` (the Anthropic API's root); the completed process."""
    binary, reason = find_binary("claude")
    assert binary, reason
    with tempfile.TemporaryDirectory(prefix="claude-home-") as home:
        env = _base_env(Path(home)) | {
            "ANTHROPIC_BASE_URL": base_url,
            "ANTHROPIC_API_KEY": key,
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",  # no telemetry, update checks or other hosts
        }
        return _run([binary, "-p", prompt, *args], env, Path(home), timeout)


def run_codex(base_url: str, key: str, prompt: str, *args: str, timeout: float = TIMEOUT):
    """`codex exec PROMPT [args]` against `base_url` (the OpenAI API's root, ending in /v1); the completed process.

    Codex ignores OPENAI_BASE_URL; it takes the key from `codex login` and the URL from its config.
    """
    binary, reason = find_binary("codex")
    assert binary, reason
    with tempfile.TemporaryDirectory(prefix="codex-home-") as home:
        env = _base_env(Path(home))
        _run([binary, "login", "--with-api-key"], env, Path(home), timeout, stdin=key).check_returncode()
        config = ["-c", f"openai_base_url={json.dumps(base_url)}"]
        return _run([binary, "exec", "--skip-git-repo-check", *config, *args, prompt], env, Path(home), timeout)
