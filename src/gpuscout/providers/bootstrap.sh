#!/bin/bash
# GPU Scout instance bootstrap: the one script every instance runs at boot.
#
# The same text is the EC2 user-data of the AWS provider and the boot script
# of the local provider, so it assumes nothing about the machine beyond bash
# and coreutils: it may run as root under cloud-init (no HOME, cwd /) or as
# an ordinary user in a folder of its own.
#
# Contract: gpuscout.providers.bootstrap.render_bootstrap puts the exports
# of the agent's environment (gpuscout/agent/protocol.py) where the marker
# line below is, every value shell-quoted. The script then
#   1. makes the instance folder (GPUSCOUT_INSTANCE_DIR) and the job's working
#      folder (GPUSCOUT_WORKDIR, default: work/ in the instance folder, where
#      the agent unpacks the job's project folder), and sends all
#      further output to $GPUSCOUT_INSTANCE_DIR/agent.log;
#   2. finds a Python that can import gpuscout.agent: GPUSCOUT_PYTHON if set
#      and usable, else python3; failing both, it pip-installs
#      GPUSCOUT_PACKAGE_SPEC (a name, or a URL of a wheel, possibly presigned
#      and ending in #sha256=HEX, which pip checks) into a venv in the
#      instance folder that also sees the image's packages (a Deep Learning
#      AMI's frameworks), and puts that venv first on PATH, so the job's
#      `python` imports gpuscout too;
#   3. execs `python -m gpuscout.agent` in the working folder, so the agent
#      takes this shell's pid (and its process group).
# Any failure before the exec exits non-zero with a line saying why.

# @GPUSCOUT_ENV@

set -euo pipefail

log() { printf '%s gpuscout-bootstrap: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }
die() { log "error: $*"; exit 1; }

# 1. Folders and log. Under cloud-init HOME may be unset; root can use
# /var/lib, anyone else falls back to a folder in their home.
if [ -z "${GPUSCOUT_INSTANCE_DIR:-}" ]; then
    if [ "$(id -u)" = 0 ]; then
        GPUSCOUT_INSTANCE_DIR=/var/lib/gpuscout
    else
        GPUSCOUT_INSTANCE_DIR="${HOME:-/tmp}/.gpuscout/instance"
    fi
fi
mkdir -p "$GPUSCOUT_INSTANCE_DIR" || die "cannot create $GPUSCOUT_INSTANCE_DIR"
export GPUSCOUT_INSTANCE_DIR
: "${GPUSCOUT_WORKDIR:=$GPUSCOUT_INSTANCE_DIR/work}"
mkdir -p "$GPUSCOUT_WORKDIR" || die "cannot create $GPUSCOUT_WORKDIR"
export GPUSCOUT_WORKDIR

GPUSCOUT_LOG="$GPUSCOUT_INSTANCE_DIR/agent.log"
exec >>"$GPUSCOUT_LOG" 2>&1
log "instance ${GPUSCOUT_INSTANCE_ID:-?} job ${GPUSCOUT_JOB_ID:-?} booting as uid $(id -u)"

# 2. A Python with gpuscout.
has_gpuscout() { [ -n "$1" ] && "$1" -c 'import gpuscout.agent' >/dev/null 2>&1; }

PY=""
if [ -n "${GPUSCOUT_PYTHON:-}" ]; then
    if has_gpuscout "$GPUSCOUT_PYTHON"; then
        PY="$GPUSCOUT_PYTHON"
    else
        log "GPUSCOUT_PYTHON=$GPUSCOUT_PYTHON cannot import gpuscout; trying python3"
    fi
fi
if [ -z "$PY" ]; then
    SYS_PY="$(command -v python3 || true)"
    if has_gpuscout "$SYS_PY"; then
        PY="$SYS_PY"
    fi
fi

if [ -z "$PY" ]; then
    [ -n "${GPUSCOUT_PACKAGE_SPEC:-}" ] \
        || die "no Python can import gpuscout and GPUSCOUT_PACKAGE_SPEC is empty"
    if [ -z "${SYS_PY:-}" ]; then
        # Bare images: one attempt with the system package manager.
        if command -v dnf >/dev/null 2>&1; then dnf install -y python3 python3-pip || true
        elif command -v yum >/dev/null 2>&1; then yum install -y python3 python3-pip || true
        elif command -v apt-get >/dev/null 2>&1; then
            apt-get update -q && apt-get install -y -q python3 python3-venv || true
        fi
        SYS_PY="$(command -v python3 || true)"
        [ -n "$SYS_PY" ] || die "python3 not found and could not be installed"
    fi
    VENV="$GPUSCOUT_INSTANCE_DIR/venv"
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating $VENV with $SYS_PY"
        if ! "$SYS_PY" -m venv "$VENV" --system-site-packages; then
            # Debian/Ubuntu ship venv without ensurepip unless python3-venv is in.
            command -v apt-get >/dev/null 2>&1 \
                && { apt-get update -q && apt-get install -y -q python3-venv || true; }
            rm -rf "$VENV"
            "$SYS_PY" -m venv "$VENV" --system-site-packages \
                || die "cannot create a venv with $SYS_PY"
        fi
    fi
    # The spec may be a presigned URL: log where it points, not its signature.
    log "installing ${GPUSCOUT_PACKAGE_SPEC%%\?*}"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip \
        || log "pip upgrade failed; going on with the bundled pip"
    "$VENV/bin/python" -m pip install --quiet "$GPUSCOUT_PACKAGE_SPEC" \
        || die "pip install ${GPUSCOUT_PACKAGE_SPEC%%\?*} failed"
    PY="$VENV/bin/python"
    has_gpuscout "$PY" || die "gpuscout installed but not importable with $PY"
    export PATH="$VENV/bin:$PATH"
fi

# 3. The agent takes over this process.
cd "$GPUSCOUT_WORKDIR"
log "starting the agent on ${GPUSCOUT_AGENT_HOST:-?}:${GPUSCOUT_AGENT_PORT:-?} with $PY"
exec "$PY" -m gpuscout.agent
