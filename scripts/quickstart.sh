#!/usr/bin/env bash
# The two quick-start commands:
#   scripts/quickstart.sh serve [server options]   set up, then run the collaborative server
#   scripts/quickstart.sh test  [pytest options]   set up (Debian's Chromium, python3-doc and
#                                                  openssh-server included, as root), then run
#                                                  the tests
# and for maintainers:
#   scripts/quickstart.sh check                    lint, type check and docs build (via nox)
#   scripts/quickstart.sh bench [--quick]          every benchmark
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${NURSERY_PROCS_VENV:-.venv}
PYTHON=${PYTHON:-python3}

need_python() {
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
        echo "nursery_procs needs Python 3.11 or newer ($PYTHON is $("$PYTHON" -V))" >&2
        exit 1
    }
}

setup() {  # $1: the extras to install
    need_python
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e ".[$1]"
}

install_debian_packages() {
    # Debian's Chromium for the browser tests (Playwright drives it; no browser is
    # downloaded), python3-doc, whose objects.inv the docs build and the docs test
    # read for links to Python's documentation (offline), and openssh-server, whose
    # sshd the tests of contexts on other hosts start on 127.0.0.1.
    local missing=()
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
    [ -f /usr/share/doc/python3/html/objects.inv ] || missing+=(python3-doc)
    [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
    if [ ${#missing[@]} -eq 0 ]; then
        return
    fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "note: install the Debian packages ${missing[*]}: the browser tests skip" \
            "without chromium, the remote tests without openssh-server, and the docs" \
            "need python3-doc" >&2
    fi
}

command=${1:-}
shift || true
case "$command" in
    serve)
        setup collab
        exec "$VENV/bin/python" -m examples.collab "$@"
        ;;
    test)
        install_debian_packages
        setup dev
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    check)
        install_debian_packages
        setup dev
        exec "$VENV/bin/nox" --no-error-on-missing-interpreters -s lint typecheck docs wheel
        ;;
    bench)
        setup dev
        for bench in benchmarks/bench_*.py; do
            echo "== $bench"
            "$VENV/bin/python" "$bench" "$@"
        done
        ;;
    *)
        echo "usage: $0 serve|test|check|bench [options]" >&2
        exit 2
        ;;
esac
