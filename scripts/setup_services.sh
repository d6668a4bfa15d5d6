#!/usr/bin/env bash
# The real services the tests start on loopback, from Debian's packages: Chromium for the chat page's
# browser test (tests/serve/test_page.py drives it with playwright's client; no browser is
# downloaded) and redis-server for the session store's and the replicas' tests
# (tests/serve/test_backends.py, tests/serve/test_replicas.py). Each is skipped when already there;
# a test skips itself, naming what is missing, when it cannot be installed (no root, no apt).
set -uo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing+=(chromium)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ ${#missing[@]} = 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    (apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null) \
        || echo "setup_services: could not install ${missing[*]}; their tests will be skipped" >&2
    # Debian starts a redis-server service on 6379 when installed; the tests start their own
    command -v systemctl >/dev/null 2>&1 && systemctl disable --now redis-server >/dev/null 2>&1 || true
else
    echo "setup_services: no root or apt-get: install ${missing[*]} to run their tests" >&2
fi
exit 0
