"""A tiny local task image for the devnet demo, built without any registry.

``FROM scratch`` around the host's statically linked ``/bin/busybox`` (Debian's
busybox-static), with the usual applets as symlinks: the demo works on a machine with no
internet and no image cache (the same recipe as the test suite's fixture).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

from prime.errors import PrimeError

DEMO_IMAGE = "prime-devnet-busybox:latest"
BUSYBOX_SOURCE = Path("/bin/busybox")
BUSYBOX_APPLETS = (
    "sh", "echo", "sleep", "cat", "ls", "mkdir", "dd", "sha256sum", "seq", "head", "tail", "date",
    "true", "false", "env", "id", "rm", "touch", "wc", "ln", "printf", "test", "hostname", "uname",
)


def busybox_context(source: Path = BUSYBOX_SOURCE) -> io.BytesIO:
    """A docker build context: a Dockerfile, bin/busybox and its applets as relative symlinks."""
    if not source.is_file():
        raise PrimeError(f"{source} is missing, so the demo image cannot be built; install Debian's busybox-static (apt-get install busybox-static).")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        dockerfile = b"FROM scratch\nCOPY bin/ /bin/\nCOPY tmp/ /tmp/\nCMD [\"sh\"]\n"
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        tar.addfile(info, io.BytesIO(dockerfile))
        tar.add(str(source), arcname="bin/busybox")
        for applet in BUSYBOX_APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            tar.addfile(link)
        tmp = tarfile.TarInfo("tmp")
        tmp.type = tarfile.DIRTYPE
        tmp.mode = 0o1777
        tar.addfile(tmp)
    buf.seek(0)
    return buf


def ensure_demo_image(client: Any, tag: str = DEMO_IMAGE) -> tuple[str, bool]:
    """(tag, built): the image, built now only if the engine does not have it yet."""
    import docker.errors

    try:
        client.images.get(tag)
        return tag, False
    except docker.errors.ImageNotFound:
        pass
    try:
        # network "none": the build needs no network, and the engine may have no bridge.
        client.images.build(fileobj=busybox_context(), custom_context=True, tag=tag, rm=True, network_mode="none")
    except docker.errors.DockerException as exc:
        raise PrimeError(f"Building the demo image {tag} failed ({exc}); check the Docker engine.") from None
    return tag, True


def docker_client() -> Any:
    """A client of the local engine, or one sentence on how to start it."""
    import docker

    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except Exception as exc:  # DockerException, connection refused, permission denied
        raise PrimeError(
            f"The Docker engine is not reachable ({type(exc).__name__}); start it (e.g. `sudo systemctl start docker` "
            "or scripts/install-docker.sh) and make sure this user may use it."
        ) from None
    return client


def task_network_mode(client: Any) -> str:
    """'bridge' (the miner's default) when the engine has that network, else 'none'
    (an engine started with --bridge=none cannot give containers the bridge)."""
    try:
        return "bridge" if client.networks.list(names=["bridge"]) else "none"
    except Exception:  # noqa: BLE001 - an old engine API: keep the miner's default
        return "bridge"


def remove_node_containers(client: Any, node_address: str) -> int:
    """Force-remove the containers labelled with this node (prime.node=<address>), and only those."""
    import docker.errors

    removed = 0
    seen: set[str] = set()
    # The label may carry the checksum or the lowercase spelling, depending on who wrote it.
    for spelling in {node_address, node_address.lower()}:
        for container in client.containers.list(all=True, filters={"label": f"prime.node={spelling}"}):
            if container.id in seen:
                continue
            seen.add(container.id)
            try:
                container.remove(force=True)
                removed += 1
            except docker.errors.NotFound:
                pass
    return removed
