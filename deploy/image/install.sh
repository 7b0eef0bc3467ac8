#!/bin/sh
# Installs routed into an image root that already holds the packages of deploy/image/packages.
# Runs inside that root as root: scripts/build-image runs it in the chroot (a mmdebstrap customize hook),
# deploy/Dockerfile as a RUN step. Network access to Debian's mirror and PyPI is needed.
#
# Input, under $ROUTED_SRC (default /opt/routed/src), removed at the end:
#   pyproject.toml README.md routed/ policy/ cni/ deploy/install-cni.py deploy/image/
#   prebuilt/routed-cni   optional: the static CNI executable built from cni/shim/routed-cni.c
# Result:
#   /opt/routed                       venv of the system python3 with routed and its dependencies from PyPI
#   /opt/routed/bin/routed            the agent and CLI (the image config puts /opt/routed/bin first on PATH)
#   /opt/routed/bin/routed-cni        the static CNI executable, if given (deploy/install-cni.py copies it to
#                                     the host)
#   /opt/routed/deploy/install-cni.py the init container's installer
set -eu

PREFIX=/opt/routed
SRC=${ROUTED_SRC:-$PREFIX/src}
# Needed only here, removed again below with everything they pulled in: python3-venv (ensurepip) makes the
# venv; python-iptables is published as an sdist only, and its small C library (libxtwrapper, libc headers
# only) is compiled with gcc.
BUILD_PACKAGES="python3-venv gcc libc6-dev"

log() { echo "install.sh: $*" >&2; }

export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

[ -f "$SRC/pyproject.toml" ] || { log "no project source at $SRC"; exit 1; }

log "build tools: $BUILD_PACKAGES"
before=$(mktemp)
dpkg-query -W -f '${Package}\n' | sort >"$before"
apt-get update -qq
# shellcheck disable=SC2086  # word splitting intended
apt-get install -y -qq --no-install-recommends $BUILD_PACKAGES >/dev/null

log "venv $PREFIX, project and dependencies from PyPI"
python3 -m venv "$PREFIX"
"$PREFIX/bin/python" -m pip install -q --no-compile --use-pep517 "$SRC"
# Nothing runs pip or setuptools (ensurepip's copies) in the image.
"$PREFIX/bin/python" -m pip uninstall -q -y setuptools pip

if [ -f "$SRC/prebuilt/routed-cni" ]; then
    install -m 0755 "$SRC/prebuilt/routed-cni" "$PREFIX/bin/routed-cni"
    log "static routed-cni installed"
else
    log "no $SRC/prebuilt/routed-cni (cni/shim/routed-cni.c not built): the image has no routed-cni"
fi
install -D -m 0755 "$SRC/deploy/install-cni.py" "$PREFIX/deploy/install-cni.py"

log "removing the build tools"
dpkg-query -W -f '${Package}\n' | sort | comm -13 "$before" - | xargs -r apt-get purge -y -qq >/dev/null
rm -f "$before"

# What pip built or fetched, apt's lists and archives, the source, and the logs of this run.
rm -rf "$SRC" /root/.cache /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb \
    /var/log/apt/* /var/log/dpkg.log /var/log/alternatives.log
"$PREFIX/bin/python" -c "import routed.cli, policy, cni, iptc" \
    || { log "smoke import failed"; exit 1; }
"$PREFIX/bin/routed" --help >/dev/null || { log "routed --help failed"; exit 1; }
# No bytecode in the image (~80 MB, kubernetes' client mostly); the image config sets
# PYTHONDONTWRITEBYTECODE=1 so containers do not write it either.
find "$PREFIX" -depth -name __pycache__ -type d -exec rm -rf {} +
log "done: $PREFIX/bin/routed"
