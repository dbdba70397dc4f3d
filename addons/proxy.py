"""llm-proxy as a mitmproxy addon script.

    mitmdump -s addons/proxy.py [mitmproxy options]
    mitmweb -s addons/proxy.py [mitmproxy options]
    ./run.sh [mitmproxy options]        (the same, once it has installed what is missing)

Settings come from config.yaml, .env and the environment, under `--set`; `-p` and `--listen-host` choose the
listener's address. mitmproxy reloads this file when it changes; until a reload succeeds, every request is
refused (FailClosed), never forwarded.
"""

import logging
import sys
from pathlib import Path

# mitmproxy puts only this file's folder on sys.path, and only while it loads; the packages are one level up.
_root = Path(__file__).resolve().parent.parent
if (_root / "llmproxy").is_dir() and str(_root) not in sys.path:
    sys.path.insert(0, str(_root))

from mitmproxy import ctx  # noqa: E402

from addons import launcher, wiring  # noqa: E402
from llmproxy import config  # noqa: E402

fail_closed = launcher.install_fail_closed(ctx.master)  # first: whatever fails below, it refuses every request
try:
    addons = wiring.build_addons(launcher.read_settings(), fail_closed)
except config.ConfigError as error:
    logging.getLogger("llm-proxy").error(str(error))  # at start-up mitmproxy exits on it
    addons = []
