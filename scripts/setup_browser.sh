#!/usr/bin/env bash
# Chromium from Debian's packages, for the chat page's browser test (tests/serve/test_page.py drives
# it with playwright's client; no browser is downloaded). Skipped when chromium is already there;
# the test skips itself when it cannot be installed (no root, no apt).
set -uo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
        || echo "setup_browser: could not install chromium; the browser test will be skipped" >&2
else
    echo "setup_browser: no root or apt-get: install chromium to run the browser test" >&2
fi
exit 0
