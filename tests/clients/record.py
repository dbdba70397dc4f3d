"""Records what the real clients send: `python -m tests.clients.record [SCENARIO ...]` (default: all).

Runs each scenario of `scenarios.py` against the fake upstream directly, without the proxy, and writes every request
the fake received to tests/fixtures/clients/SCENARIO.json, with the key replaced by a placeholder. Re-record after
changing a client's version (tests/clients/package.json, tests/requirements.txt) and commit the fixtures.
"""

import json
import sys
from pathlib import Path

from tests.clients.scenarios import SCENARIOS, Bases, Scenario
from tests.fakeupstream import start_in_thread, stop_in_thread

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "clients"
RECORDING_KEY = "sk-recording-key-0123456789"
PLACEHOLDER = "sk-placeholder"  # what the fixtures carry instead of the key, in authorization and x-api-key


def fixture(scenario: Scenario, requests) -> dict:
    recorded = []
    for request in requests:
        headers = [[name, _without_key(name, value)] for name, value in request.headers]
        recorded.append(
            {
                "method": request.method,
                "path": request.path,
                "headers": headers,
                "body": json.loads(request.body) if request.body else None,
            }
        )
    result = {
        "scenario": scenario.name,
        "client": scenario.client,
        "version": scenario.version(),
        "api": scenario.api,
        "requests": recorded,
    }
    assert RECORDING_KEY not in json.dumps(result), f"{scenario.name}: the key appears outside its headers"
    return result


def _without_key(name: str, value: str) -> str:
    if name.lower() == "authorization":
        return value.replace(RECORDING_KEY, PLACEHOLDER)
    return PLACEHOLDER if name.lower() == "x-api-key" else value


def main(names: list[str]) -> int:
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        print(f"unknown scenarios {sorted(unknown)}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    FIXTURES.mkdir(parents=True, exist_ok=True)
    fake = start_in_thread()
    failed = []
    try:
        for name in names or SCENARIOS:
            scenario = SCENARIOS[name]
            fake.reset()
            try:
                answer = scenario.run(Bases(f"{fake.url}/v1", fake.url), RECORDING_KEY)
            except Exception as err:  # one client's failure should not stop the others' recording
                print(f"{name}: FAILED, no fixture written: {err!r}", file=sys.stderr)
                failed.append(name)
                continue
            path = FIXTURES / f"{name}.json"
            path.write_text(json.dumps(fixture(scenario, fake.requests), indent=2, ensure_ascii=False) + "\n")
            print(f"{name}: {len(fake.requests)} requests -> {path}; answer {answer!r}")
    finally:
        stop_in_thread(fake)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
