#!/usr/bin/env bash
# Debian's Chromium for the dashboard's browser tests (tests/ui/test_ui_browser.py drives /usr/bin/chromium with
# Playwright; nothing downloads a browser). Installs the `chromium` package through apt-get when it is missing and
# this runs as root; otherwise says what to do and exits 0 (the browser tests then skip locally, and fail under CI).
set -euo pipefail

log() { echo "chromium.sh: $*" >&2; }

if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    log "/usr/bin/chromium is missing and cannot be installed here (needs root and apt-get);"
    log "install Debian's 'chromium' package for the browser tests (they are skipped without it)"
    exit 0
fi
log "installing Chromium from Debian's packages..."
start=$SECONDS
export DEBIAN_FRONTEND=noninteractive
logfile=$(mktemp /tmp/chromium-install.XXXXXX.log)
if ! { apt-get update -qq && apt-get install -y -qq chromium fonts-dejavu-core; } >"$logfile" 2>&1; then
    tail -n 20 "$logfile" >&2
    log "apt-get install chromium failed (log: $logfile)"
    exit 1
fi
log "installed $(/usr/bin/chromium --version 2>/dev/null) in $((SECONDS - start)) s"
