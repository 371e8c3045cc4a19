# shellcheck shell=bash
# Shared shell helpers for scripts/run, scripts/test and scripts/bench. Sourced, not run.

# Print a message to stderr and exit non-zero.
die() {
    echo "error: $*" >&2
    exit 1
}

# Run a command as root (directly, or through sudo when available).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        return 1
    fi
}

# Prints, one per line, the package of each "command:package" pair whose command is missing.
missing_packages() {
    local pair
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || echo "${pair#*:}"
    done
}

# Install Debian packages that are missing; $1.. are "command:package" pairs.
ensure_packages() {
    local missing=()
    mapfile -t missing < <(missing_packages "$@")
    [ "${#missing[@]}" -eq 0 ] && return 0
    echo "installing missing packages: ${missing[*]}" >&2
    if ! command -v apt-get >/dev/null 2>&1; then
        die "missing ${missing[*]} and no apt-get to install them; install them by hand"
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null ||
        die "apt-get update failed (need root or sudo to install ${missing[*]})"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null ||
        die "could not install ${missing[*]}; install them by hand (etcd-client needs protoc to build)"
}

# Install Python packages from PyPI that are missing; $1.. are "command:package" pairs. Needs
# python3 with pip (Debian's python3-pip is installed when missing).
ensure_pip_packages() {
    local missing=()
    mapfile -t missing < <(missing_packages "$@")
    [ "${#missing[@]}" -eq 0 ] && return 0
    ensure_packages python3:python3
    python3 -m pip --version >/dev/null 2>&1 || ensure_packages pip3:python3-pip
    echo "installing missing Python packages: ${missing[*]}" >&2
    # Debian's own python3 refuses system-wide installs (PEP 668) unless told.
    python3 -m pip install --quiet "${missing[@]}" 2>/dev/null ||
        python3 -m pip install --quiet --break-system-packages "${missing[@]}" ||
        die "could not install ${missing[*]} with pip; install them by hand"
    hash -r
}

# Everything the build needs: a Rust toolchain and protoc (for etcd-client's protobufs).
ensure_build_deps() {
    command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust from rustup.rs"
    ensure_packages protoc:protobuf-compiler curl:curl
}

# Wait until an etcd client URL answers /health with "true".
wait_for_etcd() {
    local url=$1
    local _
    for _ in $(seq 1 100); do
        if curl -fsS "$url/health" 2>/dev/null | grep -q '"health":"true"'; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}
