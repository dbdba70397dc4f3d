#!/usr/bin/env bash
# One entry for everything: installs what is missing, then runs the proxy, the tests or the benchmark.
#   ./run.sh [mitmproxy args]   the proxy: mitmdump -s addons/proxy.py
#   ./run.sh web [args]         the same under mitmweb
#   ./run.sh local [web] [args] a forward proxy for apps whose API URL is hard-coded (--set forward_proxy=true)
#   ./run.sh demo [args]        the proxy against the fake upstream the tests use, with demo keys
#   ./run.sh test [pytest args] ruff (lint, format check), then the whole test suite
#   ./run.sh bench [args]       the benchmark: direct vs bare mitmdump vs this proxy
set -euo pipefail
cd "$(dirname "$0")"
root=$(pwd)
venv="$root/.venv"

find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.13 python3.12 \
        "$HOME"/.pyenv/versions/3.13*/bin/python3 "$HOME"/.pyenv/versions/3.12*/bin/python3 python3; do
        [ -n "$candidate" ] || continue
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" -c 'import sys, venv; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

# Installs a requirements file into .venv, every package at the version constraints.txt pins, unless the same
# file and constraints were installed before.
install_requirements() {
    local file=$1 relative=${1#"$root"/}
    local stamp="$venv/.installed-${relative//\//-}" digest
    digest=$(cat "$file" "$root/constraints.txt" | sha256sum | cut -d' ' -f1)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
        echo "run.sh: installing $file" >&2
        "$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$file" -c "$root/constraints.txt" >&2
        echo "$digest" >"$stamp"
    fi
}

ensure_venv() {
    if [ ! -x "$venv/bin/python" ]; then
        local python
        if ! python=$(find_python); then
            echo "run.sh: this proxy needs Python 3.12 or newer; install it (or set PYTHON=/path/to/python3.12) and run again." >&2
            exit 1
        fi
        echo "run.sh: creating .venv with $python" >&2
        "$python" -m venv "$venv"
    fi
    install_requirements "$root/requirements.txt"
}

# Lint and format check (settings in pyproject.toml) before the tests: a finding stops the run with ruff's output.
check_code() {
    local failed=0
    "$venv/bin/ruff" check --quiet "$root" || failed=1
    "$venv/bin/ruff" format --check --quiet "$root" || failed=1
    if [ "$failed" != 0 ]; then
        echo "run.sh: ruff found the problems above; fix them (ruff check --fix, ruff format) and run the tests again." >&2
        exit 1
    fi
}

# Tests need Debian's Chromium (the browser test of the status page) and redis-server (the shared store,
# several instances); install what is missing. The tests start their own redis-server on a free port.
ensure_test_programs() {
    local missing=()
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "run.sh: the tests need ${missing[*]}; install those Debian packages (or run as root)." >&2
        return 0
    fi
    echo "run.sh: installing ${missing[*]} for the tests" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >&2
}

# The end-to-end tests run the real coding-agent CLIs (tests/clients/package.json) through the proxy; npm installs
# them unless the same lock was installed before. A failure only skips those tests, so it does not stop the suite.
ensure_test_clients() {
    local dir="$root/tests/clients" stamp="$root/tests/clients/node_modules/.installed-lock" digest
    digest=$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ] && return 0
    if ! command -v npm >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "run.sh: installing nodejs and npm for the client tests" >&2
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm) >&2 || true
    fi
    echo "run.sh: installing the test clients in tests/clients" >&2
    if (cd "$dir" && npm ci --no-audit --no-fund) >&2; then
        echo "$digest" >"$stamp"
    else
        echo "run.sh: could not install the test clients (npm ci in tests/clients failed); their tests will skip" >&2
    fi
}

# mitmproxy opens the listener its own options describe (*:8080 by default) before it loads a script; with
# server=false it opens none, and the script opens the proxy's (PORT, BIND_ADDRESS) once it has loaded.
command=${1:-}
case "$command" in
    test)
        shift
        ensure_venv
        install_requirements "$root/tests/requirements.txt"
        check_code
        ensure_test_programs
        ensure_test_clients
        exec "$venv/bin/python" -m pytest -c "$root/tests/pytest.ini" --rootdir "$root" "$@"
        ;;
    bench)
        shift
        ensure_venv
        install_requirements "$root/tests/requirements.txt"
        exec "$venv/bin/python" -m tests.bench.bench "$@"
        ;;
    demo)
        shift
        ensure_venv
        install_requirements "$root/tests/requirements.txt"
        exec "$venv/bin/python" -m tests.demo "$@"
        ;;
    web)
        shift
        ensure_venv
        exec "$venv/bin/mitmweb" -s "$root/addons/proxy.py" --set server=false "$@"
        ;;
    local)
        shift
        ensure_venv
        tool=mitmdump
        if [ "${1:-}" = web ]; then
            tool=mitmweb
            shift
        fi
        exec "$venv/bin/$tool" -s "$root/addons/proxy.py" --set server=false --set forward_proxy=true "$@"
        ;;
    *)
        ensure_venv
        exec "$venv/bin/mitmdump" -s "$root/addons/proxy.py" --set server=false "$@"
        ;;
esac
