#!/usr/bin/env bash
# Chromium for the headless canvas tests (tests/test_browser.py). Playwright's own browser download needs
# hosts we cannot reach, so the tests drive Debian's chromium through playwright's executable_path.
# Idempotent: does nothing when chromium and the font are there. Never fails the caller: without apt (or root)
# it prints why and exits 0, and the browser tests then skip naming this script.
set -uo pipefail
CHROMIUM=/usr/bin/chromium
# A CJK font too: the bundled workflow's prompts are Chinese and the screenshots should show them, not boxes.
PACKAGES="chromium fonts-wqy-zenhei"
if [ -x "$CHROMIUM" ] && [ -d /usr/share/fonts/truetype/wqy ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_browser: apt-get not available; install chromium at $CHROMIUM by hand to run the browser tests"
    exit 0
fi
SUDO=
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "setup_browser: not root and no password-less sudo; install chromium at $CHROMIUM by hand"
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
# Refresh the package lists only when they do not know chromium yet (a fresh container has none).
if ! apt-cache show chromium >/dev/null 2>&1; then
    $SUDO apt-get update -qq || { echo "setup_browser: apt-get update failed; browser tests will skip"; exit 0; }
fi
if ! $SUDO apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null; then
    echo "setup_browser: apt-get install $PACKAGES failed; browser tests will skip"
    exit 0
fi
[ -x "$CHROMIUM" ] && echo "setup_browser: installed $("$CHROMIUM" --version 2>/dev/null)"
exit 0
