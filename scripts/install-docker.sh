#!/usr/bin/env bash
# Make a Docker engine available for the test suite (used by .ci/run); idempotent.
#
# 1. Installs Debian's docker.io and busybox-static when missing (the test image
#    is built FROM scratch around /bin/busybox, so no registry is needed), and
#    docker-registry, a loopback registry the image-pull tests push to and pull from.
# 2. Starts dockerd in the background when no engine answers. CI boxes have no
#    bridge/iptables rights, and task containers use network "none" or "host",
#    so the daemon runs with --bridge=none --iptables=false.
# 3. Waits until `docker info` answers (or fails after DOCKER_WAIT_S seconds).
set -euo pipefail

DOCKER_WAIT_S="${DOCKER_WAIT_S:-60}"
DOCKERD_LOG="${DOCKERD_LOG:-/tmp/dockerd.log}"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

need_packages=()
command -v dockerd >/dev/null 2>&1 || need_packages+=(docker.io)
command -v docker >/dev/null 2>&1 || need_packages+=(docker.io)
command -v docker-registry >/dev/null 2>&1 || need_packages+=(docker-registry)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx sha256sum || need_packages+=(busybox-static)
# busybox may be the dynamically linked build; a FROM-scratch image needs the static one.
if [ -x /bin/busybox ] && command -v file >/dev/null 2>&1 && ! file -L /bin/busybox | grep -q 'statically linked'; then
    need_packages+=(busybox-static)
fi

if [ "${#need_packages[@]}" -gt 0 ]; then
    echo "install-docker: installing ${need_packages[*]}"
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y docker.io busybox-static docker-registry
fi

if docker info >/dev/null 2>&1; then
    echo "install-docker: engine already running"
    exit 0
fi

if ! pgrep -x dockerd >/dev/null 2>&1; then
    echo "install-docker: starting dockerd (log: $DOCKERD_LOG)"
    # setsid + nohup: the daemon outlives this script and the CI step that ran it.
    as_root setsid nohup dockerd --bridge=none --iptables=false >"$DOCKERD_LOG" 2>&1 < /dev/null &
fi

for _ in $(seq 1 "$DOCKER_WAIT_S"); do
    if docker info >/dev/null 2>&1; then
        echo "install-docker: engine is up"
        exit 0
    fi
    sleep 1
done

echo "install-docker: the Docker engine did not answer within ${DOCKER_WAIT_S}s; see $DOCKERD_LOG" >&2
tail -n 20 "$DOCKERD_LOG" >&2 || true
exit 1
