"""The benchmark still runs end to end (`--quick`); its timings are not checked here."""

import subprocess
import sys

import pytest

from tests.harness import ROOT


@pytest.mark.e2e
def test_quick_benchmark_runs_and_prints_the_table():
    completed = subprocess.run(
        [sys.executable, "-m", "tests.bench.bench", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,  # a guard against a hang only: the quick run takes about 75 s on 2 cores
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    for row in ("latency", "throughput", "first SSE byte", "streams", "RSS", "targets:"):
        assert row in completed.stdout, completed.stdout
