"""Starts the real proxy (mitmdump or mitmweb with `-s addons/proxy.py`, as ./run.sh does) as a subprocess for
end-to-end tests."""

import atexit
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENTRY_SCRIPT = ROOT / "addons" / "proxy.py"
# The proxy's own listener (mitmproxy may have opened and closed its default one before the script loaded).
_LISTENING = re.compile(r"llm-proxy [^\n]* listening at (?:\[[^\]]+\]|[\d.]+|\*):(\d+)")


def mitmproxy_command(ui: str = "dump") -> list[str]:
    """mitmdump or mitmweb of this virtual environment."""
    return [str(Path(sys.executable).parent / ("mitmweb" if ui.endswith("web") else "mitmdump"))]


def wait_until(condition, timeout: float = 10.0, interval: float = 0.05):
    """The first truthy value of `condition()`, polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


class ProxyProcess:
    """One proxy process with its own environment, confdir and log file; `url` once started."""

    def __init__(
        self, env: dict[str, str] | None = None, args: list[str] = (), ui: str = "dump", script: Path = ENTRY_SCRIPT
    ):
        self.workdir = Path(tempfile.mkdtemp(prefix="llmproxy-test-"))
        # Kept until the test run ends (tests read the log after the proxy stopped), then removed.
        atexit.register(shutil.rmtree, self.workdir, ignore_errors=True)
        self.log_path = self.workdir / "proxy.log"
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "PORT": "0",
            "BUILD_INFO": "test",
            **(env or {}),
        }
        # As ./run.sh runs it: ui is dump, web, local or "local web".
        self.command = [
            *mitmproxy_command(ui),
            "-s",
            str(script),
            "--set",
            "server=false",
            *(["--set", "forward_proxy=true"] if ui.startswith("local") else []),
            "--set",
            f"confdir={self.workdir / 'confdir'}",
            *args,
        ]
        self.process: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15) -> "ProxyProcess":
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=self.workdir,  # no stray .env from the developer's checkout
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if match := _LISTENING.search(self.log()):
                self.port = int(match.group(1))
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.process.returncode}:\n{self.log()}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"proxy did not start within {timeout} s:\n{self.log()}")

    def run_to_exit(self, timeout: float = 15) -> int:
        """For start-up failures: runs the process until it exits and returns its exit code."""
        with open(self.log_path, "wb") as log:
            completed = subprocess.run(
                self.command,
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=timeout,
            )
        return completed.returncode

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, pattern: str, timeout: float = 10) -> re.Match:
        """The first match of `pattern` in the log, waiting for the process to print it."""
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern, self.log())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pattern!r} did not appear in the proxy's log:\n{self.log()}")
            time.sleep(0.05)
        return match

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "ProxyProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class RedisServer:
    """A throw-away redis-server on a free loopback port, without persistence."""

    def __init__(self):
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start; ./run.sh test installs it")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(5)


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range: a port the kernel hands out for port 0 (the proxy's
    own pipe binds one) could be handed out again before the test's process binds it."""
    ranges = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ranges.read_text().split()[0]) if ranges.exists() else 0
    while True:
        port = random.randrange(max(1024, low - 12_000), low) if low > 2048 else 0  # else: the kernel's choice
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]


def send_raw(port: int, data: bytes) -> tuple[int, bytes, bytes]:
    """Sends bytes exactly as given to 127.0.0.1:`port`; returns (status, head, content) of the answer, read until
    the peer closes or the answer is whole by its content-length. Status 0: no HTTP answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while not is_whole(received) and (chunk := sock.recv(65536)):
            received += chunk
    head, _, content = received.partition(b"\r\n\r\n")
    return (int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0), head, content


def is_whole(message: bytes) -> bool:
    """Whether an HTTP message with a content-length has arrived whole."""
    head, separator, content = message.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:] if separator else ():
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(content) >= int(value)
    return False
