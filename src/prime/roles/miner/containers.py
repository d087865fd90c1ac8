"""Docker translation (pure): a placement as container arguments and labels, a container back
as a ``ReplicaStatus``, and Docker's multiplexed log frames as lines.

Docker itself is the record of what runs: every container carries labels (task id, replica,
node, miner instance, spec hash, GPU indices and the whole spec record), so a restarted miner
finds its containers again and reads their restart policy from them. Docker never restarts a
task container on its own (restart policy "no"): restarts are the core's decision.

A miner owns exactly the containers labelled ``prime.instance=<its instance id>``
(``instance_id``: a hash of its data directory, chain, registry and node address). Two miners
with the same node key (two local networks, a test suite beside ``make up``) have different
ids and never see, stop or remove each other's containers; a miner restarted on the same data
directory has the same id and adopts its own. Container names carry the instance, task, replica
and attempt (``container_name``), so a rescheduled attempt never collides with a leftover one.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from docker.types import DeviceRequest, LogConfig, Mount

from prime.protocol.tasks import ReplicaState, RestartPolicy
from prime.roles.miner.core import Key, Placement, ReplicaStatus

LABEL_TASK = "prime.task_id"
LABEL_NODE = "prime.node"
LABEL_REPLICA = "prime.replica"
LABEL_HASH = "prime.spec_hash"
LABEL_SPEC = "prime.spec"
LABEL_GPUS = "prime.gpus"
LABEL_INSTANCE = "prime.instance"

INSTANCE_ID_LENGTH = 16  # hex digits (64 bits)
MAX_NAME_LENGTH = 63  # Docker allows longer names; 63 keeps them usable as DNS labels
_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")


def instance_id(data_dir: Path | str, node_address: str, chain_id: int | None = None, registry_address: str | None = None) -> str:
    """The miner instance that owns a container: a short hash of (absolute data directory, chain id,
    registry address, node address). Stable across restarts on the same data directory; another
    data directory (or chain, or registry) with the same node key is another instance."""
    parts = [
        str(Path(data_dir).expanduser().resolve()),
        "" if chain_id is None else str(int(chain_id)),
        (registry_address or "").lower(),
        node_address.lower(),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:INSTANCE_ID_LENGTH]


def container_name(instance: str, task_id: str, replica: int = 0, attempt: int = 0) -> str:
    """``prime-{instance[:8]}-{task}-r{replica}-a{attempt}``, unique per (node instance, task,
    replica, attempt); a task id too long for 63 characters is cut and given a hash of itself."""
    head, tail = f"prime-{instance[:8]}-", f"-r{replica}-a{attempt}"
    room = MAX_NAME_LENGTH - len(head) - len(tail)
    task = task_id
    if len(task) > room:
        digest = hashlib.sha256(task_id.encode()).hexdigest()[:8]
        task = f"{task_id[: room - len(digest) - 1]}-{digest}"
    name = f"{head}{task}{tail}"
    assert _NAME_RE.match(name) and len(name) <= MAX_NAME_LENGTH, name  # task ids are [A-Za-z0-9_-]
    return name


def gpus_label(gpus: tuple[int, ...] | list[int]) -> str:
    return ",".join(map(str, sorted(gpus)))


def device_requests(gpus: tuple[int, ...] | list[int]) -> list[DeviceRequest]:
    """NVIDIA device requests by index: on hosts with mixed cards the task gets exactly these GPUs."""
    if not gpus:
        return []
    return [DeviceRequest(driver="nvidia", device_ids=[str(i) for i in sorted(gpus)], capabilities=[["gpu"]])]


def labels_for(placement: Placement, node_address: str, instance: str) -> dict[str, str]:
    return {
        LABEL_TASK: placement.task_id,
        LABEL_NODE: node_address,
        LABEL_INSTANCE: instance,
        LABEL_REPLICA: str(placement.replica),
        LABEL_HASH: placement.spec_hash(),
        # The whole record, so that a restarted miner knows what it found (restart policy, ...).
        LABEL_SPEC: json.dumps(placement.record(), sort_keys=True, separators=(",", ":")),
        LABEL_GPUS: gpus_label(placement.gpus),
    }


def build_container_kwargs(
    placement: Placement,
    *,
    node_address: str,
    instance: str,
    data_mount: Path | None,
    network_mode: str,
    shm_size_mib: int | None = 1024,
    pids_limit: int | None = 4096,
) -> dict[str, Any]:
    """Keyword arguments of ``client.containers.create`` for this placement. Its env: the spec's, a
    group member's master variables over them, then the miner's own (PRIME_ATTEMPT, PRIME_TASK_ID,
    PRIME_REPLICA), which no spec or master overrides."""
    spec = placement.spec
    env = placement.environment()
    env["PRIME_TASK_ID"] = placement.task_id
    env["PRIME_REPLICA"] = str(placement.replica)
    if placement.member:
        # A group member shares the node's network, whatever --task-network says: its peers reach it
        # at the node's address on the ports the master gave it (inside --task-ports, core.place),
        # with no port mapping (an engine may run with --bridge=none), and NCCL wants the host's
        # interfaces anyway.
        network_mode = "host"
    kwargs: dict[str, Any] = {
        "image": spec.image,
        "name": container_name(instance, placement.task_id, placement.replica, placement.desired.attempt),
        "labels": labels_for(placement, node_address, instance),
        "environment": env,
        "detach": True,
        "tty": False,
        "network_mode": network_mode,
        "privileged": False,
        "security_opt": ["no-new-privileges"],
        "cap_drop": ["ALL"],
        # Restarts are the core's decision (with backoff), never Docker's.
        "restart_policy": {"Name": "no"},
        # Bounded json-file logs: readable by `logs`, and a chatty task cannot fill the disk.
        "log_config": LogConfig(type=LogConfig.types.JSON, config={"max-size": "50m", "max-file": "3"}),
    }
    if spec.command:
        kwargs["command"] = list(spec.command)
    requests = device_requests(placement.gpus)
    if requests:
        kwargs["device_requests"] = requests
    if data_mount is not None:
        kwargs["mounts"] = [Mount(target="/data", source=str(data_mount), type="bind", read_only=False)]
    if spec.cpu_limit is not None:
        kwargs["nano_cpus"] = int(spec.cpu_limit * 1e9)
    if spec.memory_limit_mib is not None:
        kwargs["mem_limit"] = f"{spec.memory_limit_mib}m"
        kwargs["memswap_limit"] = f"{spec.memory_limit_mib}m"  # no swap beyond the limit
    if shm_size_mib:
        kwargs["shm_size"] = f"{shm_size_mib}m"  # data loaders need more than Docker's 64 MiB
    if pids_limit:
        kwargs["pids_limit"] = pids_limit
    return kwargs


# --- reading containers back -------------------------------------------------------------------


def state_from_inspect(attrs: dict[str, Any]) -> tuple[ReplicaState, int | None, str | None]:
    """(state, exit code, reason) from a container's ``docker inspect`` data."""
    st = attrs.get("State") or {}
    status = st.get("Status", "")
    exit_code = st.get("ExitCode")
    error = st.get("Error") or None
    if status in ("running", "restarting", "paused"):
        return ReplicaState.RUNNING, None, None
    if status == "created":
        if error:
            return ReplicaState.FAILED, exit_code if exit_code else 128, f"the container could not start: {error}"
        return ReplicaState.PULLING, None, None
    if status == "removing":
        return ReplicaState.STOPPED, exit_code, None
    # exited / dead
    if exit_code == 0 and not error:
        return ReplicaState.COMPLETED, 0, None
    if st.get("OOMKilled"):
        return ReplicaState.FAILED, exit_code, "killed for using more memory than its limit"
    if error:
        return ReplicaState.FAILED, exit_code, error
    return ReplicaState.FAILED, exit_code, f"exited with code {exit_code}"


def finished_at(attrs: dict[str, Any]) -> float | None:
    """``State.FinishedAt`` as unix seconds (None: never finished, or not readable)."""
    text = str((attrs.get("State") or {}).get("FinishedAt") or "")
    if not text or text.startswith("0001-"):
        return None
    head, _, rest = text.partition(".")
    fraction = rest.rstrip("Z").split("+")[0].split("-")[0] if rest else ""
    try:
        whole = datetime.datetime.strptime(head.rstrip("Z")[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.UTC)
    except ValueError:
        return None
    return whole.timestamp() + (float(f"0.{fraction}") if fraction.isdigit() else 0.0)


def key_of(labels: dict[str, str] | None) -> Key | None:
    labels = labels or {}
    try:
        return labels[LABEL_TASK], int(labels.get(LABEL_REPLICA, "0"))
    except (KeyError, ValueError):
        return None


@functools.lru_cache(maxsize=1024)
def restart_policy(spec_label: str | None) -> RestartPolicy | None:
    """The restart policy in a container's ``prime.spec`` label; None when it is not readable."""
    try:
        return RestartPolicy(json.loads(spec_label or "")["restart"])
    except (ValueError, KeyError, TypeError):
        return None


@functools.lru_cache(maxsize=1024)
def attempt_of(spec_label: str | None) -> int | None:
    """The master's attempt in a container's ``prime.spec`` label (its PRIME_ATTEMPT); None when not readable."""
    try:
        attempt = int(json.loads(spec_label or "")["env"]["PRIME_ATTEMPT"])
    except (ValueError, KeyError, TypeError):
        return None
    return attempt if 0 <= attempt <= 2**31 else None


def ports_of(spec_label: str | None) -> tuple[int, ...]:
    """The ports a group member's container listens on (its ``prime.spec`` label); () for any other."""
    try:
        ports = json.loads(spec_label or "").get("ports") or ()
        return tuple(int(p) for p in ports if isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536)
    except (ValueError, TypeError, AttributeError):
        return ()


def status_of(container: Any) -> ReplicaStatus:
    """A labelled container as the core sees it."""
    labels = container.labels or {}
    task_id, replica = key_of(labels) or ("?", 0)
    state, exit_code, reason = state_from_inspect(container.attrs)
    return ReplicaStatus(
        task_id=task_id,
        replica=replica,
        state=state,
        exit_code=exit_code,
        reason=reason,
        container_id=container.id,
        spec_hash=labels.get(LABEL_HASH),
        gpus=labels.get(LABEL_GPUS),
        restart=restart_policy(labels.get(LABEL_SPEC)),
        attempt=attempt_of(labels.get(LABEL_SPEC)),
        finished_at=finished_at(container.attrs) if state not in (ReplicaState.RUNNING, ReplicaState.PULLING) else None,
    )


# --- log frames --------------------------------------------------------------------------------


def parse_log_frame(payload: bytes) -> tuple[str | None, str]:
    """Split Docker's "<RFC3339 timestamp> <text>" (timestamps=1) into its parts."""
    text = payload.decode("utf-8", errors="replace")
    head, sep, rest = text.partition(" ")
    if sep and len(head) >= 20 and head[4:5] == "-" and head[10:11] == "T":
        return head, rest
    return None, text


def read_frames(response: Any) -> Iterator[tuple[int, bytes]]:
    """Docker's multiplexed stream: 8-byte header (stream type, length), then the payload."""
    while True:
        header = _read_exact(response, 8)
        if len(header) < 8:
            return
        stream_type, length = struct.unpack(">BxxxL", header)
        if length == 0:
            continue
        payload = _read_exact(response, length)
        if not payload:
            return
        yield stream_type, payload


def _read_exact(response: Any, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = response.raw.read(size - len(data))
        if not chunk:
            break
        data += chunk
    return data
