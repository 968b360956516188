#!/usr/bin/env bash
# Make sure headless Chromium and its matching driver are present for tests/test_browser.py.
#
# Installs Debian's `chromium` and `chromium-driver` packages (one browser and one driver of the
# same version, no downloads by Selenium) when they are missing, and only when this shell can:
# running as root with apt-get available. Otherwise it says so and exits 0: the browser test
# then skips itself with a clear reason, and the rest of `make test` still runs.
set -u

BROWSER=/usr/bin/chromium
DRIVER=/usr/bin/chromedriver

if [ -x "$BROWSER" ] && [ -x "$DRIVER" ]; then
    echo "ensure_chromium: $BROWSER and $DRIVER are present"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "ensure_chromium: chromium/chromedriver missing and not root; the browser test will skip." \
        "Install them with: sudo apt-get install chromium chromium-driver"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_chromium: chromium/chromedriver missing and apt-get unavailable;" \
        "the browser test will skip"
    exit 0
fi

echo "ensure_chromium: installing chromium and chromium-driver with apt-get"
if apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; then
    echo "ensure_chromium: installed $("$BROWSER" --version 2>/dev/null || echo chromium)"
else
    echo "ensure_chromium: apt-get failed; the browser test will skip"
fi
exit 0
