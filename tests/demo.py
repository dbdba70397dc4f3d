"""`./run.sh demo`: the real proxy against the fake upstream the tests use, with demo keys.

Lets a newcomer try every endpoint (curl, the SDKs, mitmweb with `./run.sh demo web`) before owning a key.
Prompt directives such as `#fake:error=rate_limit` or `#fake:events=20 #fake:interval_ms=200` make the fake
upstream misbehave on purpose; see tests/fakeupstream.py.
"""

import os
import subprocess
import sys

from tests.fakeupstream import start_in_thread
from tests.harness import ENTRY_SCRIPT, mitmproxy_command

DEMO_KEYS = {"OPENAI_KEY": "sk-demo-openai-1,sk-demo-openai-2", "ANTHROPIC_KEY": "sk-ant-demo-1"}


def main(argv: list[str]) -> None:
    fake = start_in_thread()
    os.environ.update(DEMO_KEYS, OPENAI_UPSTREAM_URL=fake.url, ANTHROPIC_UPSTREAM_URL=fake.url)
    port = os.environ.get("PORT", "7860")
    print(
        f"demo: fake upstream at {fake.url}; the proxy uses demo keys against it. Try:\n"
        f"  curl http://127.0.0.1:{port}/proxy/openai/v1/chat/completions -H 'content-type: application/json' \\\n"
        f'    -d \'{{"model": "gpt-4o", "messages": [{{"role": "user", "content": "Hello"}}]}}\'',
        flush=True,
    )
    ui, args = ("web", argv[1:]) if argv[:1] == ["web"] else ("dump", argv)
    command = [*mitmproxy_command(ui), "-s", str(ENTRY_SCRIPT), "--set", "server=false", *args]
    try:
        sys.exit(subprocess.call(command))
    except KeyboardInterrupt:  # the proxy got it too, and stopped
        sys.exit(130)


if __name__ == "__main__":
    main(sys.argv[1:])
