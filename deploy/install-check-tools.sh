#!/usr/bin/env bash
# Installs what tests/test_deploy.py and tests/test_webpage.py use beyond the project's own packages (run
# by .ci/run and by `make deploy-check`; about 30 s when nothing is installed yet, a second when everything is):
#
#   promtool, shellcheck      Debian packages prometheus and shellcheck (apt-get, as root only)
#   chromium, chromedriver    Debian packages chromium and chromium-driver (apt-get, as root only): the web
#                             page in a headless browser (tests/test_webpage.py)
#   dockerfile-utils, dclint  npm packages, into $DIFFAD_DEPLOY_TOOLS (default ~/.cache/diffad-deploy-tools)
#
# PyYAML and jsonschema (the compose-file checks) and selenium (drives chromedriver) are installed into the
# project's .venv as part of the dev extra (pyproject.toml).
# Never fails: what cannot be installed is reported loudly, and the tests that need it skip with its name
# (or, for the deployment tools, fail under DIFFAD_DEPLOY_STRICT=1).
set -uo pipefail

TOOLS_DIR=${DIFFAD_DEPLOY_TOOLS:-$HOME/.cache/diffad-deploy-tools}
DOCKERFILE_UTILS_VERSION=0.16.3
DCLINT_VERSION=3.1.0
missing=()

warn() {
    echo "########################################################################################" >&2
    echo "## install-check-tools: WARNING: $*" >&2
    echo "########################################################################################" >&2
}

# --- Debian packages ---------------------------------------------------------------------------
apt_packages=()
command -v promtool >/dev/null || apt_packages+=(prometheus)
command -v shellcheck >/dev/null || apt_packages+=(shellcheck)
command -v chromium >/dev/null || apt_packages+=(chromium)
command -v chromedriver >/dev/null || apt_packages+=(chromium-driver)
if [ "${#apt_packages[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "install-check-tools: apt-get install ${apt_packages[*]}"
        export DEBIAN_FRONTEND=noninteractive
        # policy-rc.d keeps the prometheus package from starting its daemon where an init system runs
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
            remove_policy=1
        fi
        if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null; }
        then
            warn "apt-get could not install ${apt_packages[*]}"
        fi
        [ -n "${remove_policy:-}" ] && rm -f /usr/sbin/policy-rc.d
    else
        warn "not root or no apt-get: cannot install ${apt_packages[*]} (Debian packages)"
    fi
fi
command -v promtool >/dev/null || missing+=("promtool (Debian package prometheus)")
command -v shellcheck >/dev/null || missing+=("shellcheck (Debian package shellcheck)")
command -v chromium >/dev/null || missing+=("chromium (Debian package chromium)")
command -v chromedriver >/dev/null || missing+=("chromedriver (Debian package chromium-driver)")

# --- npm packages ------------------------------------------------------------------------------
if command -v npm >/dev/null; then
    if [ ! -x "$TOOLS_DIR/node_modules/.bin/dockerfile-utils" ] || [ ! -x "$TOOLS_DIR/node_modules/.bin/dclint" ]; then
        echo "install-check-tools: npm install dockerfile-utils@$DOCKERFILE_UTILS_VERSION dclint@$DCLINT_VERSION"
        mkdir -p "$TOOLS_DIR"
        if ! npm install --prefix "$TOOLS_DIR" --no-audit --no-fund --silent \
                "dockerfile-utils@$DOCKERFILE_UTILS_VERSION" "dclint@$DCLINT_VERSION" >/dev/null; then
            warn "npm could not install dockerfile-utils and dclint"
        fi
    fi
else
    warn "no npm: cannot install the Dockerfile and Compose linters (npm packages dockerfile-utils, dclint)"
fi
[ -x "$TOOLS_DIR/node_modules/.bin/dockerfile-utils" ] || missing+=("dockerfile-utils (npm)")
[ -x "$TOOLS_DIR/node_modules/.bin/dclint" ] || missing+=("dclint (npm)")

# The tools now present, comma-separated, for DIFFAD_DEPLOY_REQUIRE (.ci/run): their tests may not skip.
installed=()
for tool in promtool shellcheck; do command -v "$tool" >/dev/null && installed+=("$tool"); done
for tool in dockerfile-utils dclint; do [ -x "$TOOLS_DIR/node_modules/.bin/$tool" ] && installed+=("$tool"); done
mkdir -p "$TOOLS_DIR"
(IFS=,; echo "${installed[*]}") > "$TOOLS_DIR/installed"

if [ "${#missing[@]}" -gt 0 ]; then
    warn "missing: ${missing[*]}; the deployment and web page tests that need them will be SKIPPED"
    exit 0
fi
echo "install-check-tools: promtool, shellcheck, chromium, chromedriver, dockerfile-utils and dclint are installed"
