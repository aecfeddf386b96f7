#!/usr/bin/env bash
# System packages the test suite needs beyond PyPI: Debian's Chromium for the browser e2e test
# (tests/e2e/test_browser.py drives it with Playwright's executable_path; Playwright never
# downloads a browser of its own here), and espeak-ng, whose voices speak the second languages of
# the multilingual speech-to-text tests (Piper's bundled voice is English only); redis-server and
# HAProxy for the multi-node test (tests/e2e/test_multinode.py: two nodes sharing state in Redis
# behind the repo's deploy/haproxy.cfg). Their system services are stopped again: the tests start
# their own instances on free loopback ports.
#
# Idempotent and non-interactive: does nothing when all of them are already there.
# Without root and without passwordless sudo it prints why and exits 0; the browser test then
# skips with that reason locally, and fails in CI (CI=true), where it must run.
set -euo pipefail

CHROMIUM=/usr/bin/chromium
PACKAGES=(chromium espeak-ng redis-server haproxy)

if [ -x "$CHROMIUM" ] && command -v espeak-ng >/dev/null 2>&1 && command -v redis-server >/dev/null 2>&1 \
        && { command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ]; }; then
    echo "install-system-deps: $CHROMIUM, espeak-ng, redis-server and haproxy present, nothing to do"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-system-deps: no apt-get on this system; install Chromium at $CHROMIUM yourself" \
         "to run the browser test (it is skipped without it)" >&2
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "install-system-deps: not root and no passwordless sudo; run as root:" \
             "apt-get update && apt-get install -y ${PACKAGES[*]}" \
             "(the browser test is skipped without $CHROMIUM)" >&2
        exit 0
    fi
fi

export DEBIAN_FRONTEND=noninteractive
echo "install-system-deps: installing ${PACKAGES[*]}"
"${SUDO[@]}" apt-get update -q </dev/null
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" </dev/null

# Debian starts both services on install; the tests run their own on free ports.
for service in redis-server haproxy; do
    "${SUDO[@]}" service "$service" stop >/dev/null 2>&1 || true
done

if [ ! -x "$CHROMIUM" ]; then
    echo "install-system-deps: apt-get finished but $CHROMIUM is missing" >&2
    exit 1
fi
"$CHROMIUM" --version 2>/dev/null || true
