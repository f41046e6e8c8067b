#!/bin/sh
# `make test` runs this before the tests: the dashboard's browser tests drive Debian's chromium and
# chromium-driver (through selenium, with the driver's path given: nothing is downloaded from elsewhere).
# Installs them with apt-get when they are missing and this runs as root on a system with apt-get;
# otherwise says how, and the browser tests skip with the same message. WEFT_NO_BROWSER_INSTALL=1 opts out.
set -u
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
if [ "${WEFT_NO_BROWSER_INSTALL:-0}" = "1" ]; then
    echo "browser tests: chromium/chromium-driver missing and WEFT_NO_BROWSER_INSTALL=1: they will skip"
    exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "browser tests: chromium/chromium-driver missing; install them (apt-get install -y chromium chromium-driver)"
    echo "browser tests: or they will skip"
    exit 0
fi
echo "browser tests: installing Debian's chromium and chromium-driver (apt-get, once)..."
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q chromium chromium-driver >/tmp/weft-browser-install.log 2>&1; then
    apt-get update -q >>/tmp/weft-browser-install.log 2>&1
    apt-get install -y -q chromium chromium-driver >>/tmp/weft-browser-install.log 2>&1 \
        || echo "browser tests: apt-get install failed (see /tmp/weft-browser-install.log): they will skip"
fi
exit 0
