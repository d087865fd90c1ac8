"""Plain data of the registry contract: requirements, specs, runs, nodes.

These mirror the Solidity structs of ``contracts/src/PrimeRegistry.sol`` field by field
(same order), so converting to and from ABI tuples is positional. Pure logic only: the
requirement check here is the same rule the contract applies in ``joinRun``.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, field
from enum import IntEnum

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1


class NodeStatus(IntEnum):
    """Where a node is in its lifecycle (the contract's ``NodeStatus`` enum)."""

    NONE = 0
    REGISTERED = 1
    APPROVED = 2
    REJECTED = 3
    ACTIVE = 4
    LEFT = 5
    EJECTED = 6
    # The node's run ended while it was registered, approved or active: read, never stored
    # (endRun releases every node of the run at once, lazily).
    RELEASED = 7

    @property
    def label(self) -> str:
        return self.name.lower()

    @property
    def stake_withdrawable(self) -> bool:
        """Whether the contract lets the provider take the stake back in this status."""
        return self in (NodeStatus.LEFT, NodeStatus.EJECTED, NodeStatus.REJECTED, NodeStatus.RELEASED)


def model_matches(node_model: str, wanted: str) -> bool:
    """The contract's GPU model rule: ``wanted`` is an ASCII case-insensitive substring ("" = any)."""
    return _ascii_lower(wanted) in _ascii_lower(node_model)


def _ascii_lower(text: str) -> str:
    # The contract lowercases A-Z only; str.lower() would also fold non-ASCII letters.
    return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in text)


def _check_uint(name: str, value: int, maximum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        raise ValueError(f"{name} must be a whole number from 0 to {maximum}, got {value!r}.")


@dataclass(frozen=True)
class Specs:
    """What a node has. ``gpu_memory_mib`` is the memory of its smallest GPU."""

    gpu_count: int
    gpu_model: str
    gpu_memory_mib: int
    cpu_cores: int
    ram_mib: int
    disk_gib: int

    def __post_init__(self) -> None:
        _check_uint("gpu_count", self.gpu_count, UINT32_MAX)
        _check_uint("gpu_memory_mib", self.gpu_memory_mib, UINT64_MAX)
        _check_uint("cpu_cores", self.cpu_cores, UINT32_MAX)
        _check_uint("ram_mib", self.ram_mib, UINT64_MAX)
        _check_uint("disk_gib", self.disk_gib, UINT64_MAX)

    def as_tuple(self) -> tuple:
        return astuple(self)

    @classmethod
    def from_tuple(cls, values: tuple | list) -> Specs:
        return cls(*values)


# Requirement index of the contract's RequirementsNotMet error -> (Requirements field, what it is).
REQUIREMENT_NAMES: tuple[str, ...] = ("GPU count", "GPU model", "GPU memory", "CPU cores", "RAM", "disk")


@dataclass(frozen=True)
class Requirements:
    """What the buyer needs per node; numbers are minimums, ``gpu_memory_mib`` is per GPU,
    ``gpu_model`` "" means any model, ``max_nodes`` 0 means unlimited."""

    min_gpus: int = 0
    gpu_model: str = ""
    min_gpu_memory_mib: int = 0
    min_cpu_cores: int = 0
    min_ram_mib: int = 0
    min_disk_gib: int = 0
    max_nodes: int = 0

    def __post_init__(self) -> None:
        _check_uint("min_gpus", self.min_gpus, UINT32_MAX)
        _check_uint("min_gpu_memory_mib", self.min_gpu_memory_mib, UINT64_MAX)
        _check_uint("min_cpu_cores", self.min_cpu_cores, UINT32_MAX)
        _check_uint("min_ram_mib", self.min_ram_mib, UINT64_MAX)
        _check_uint("min_disk_gib", self.min_disk_gib, UINT64_MAX)
        _check_uint("max_nodes", self.max_nodes, UINT32_MAX)

    def as_tuple(self) -> tuple:
        return astuple(self)

    @classmethod
    def from_tuple(cls, values: tuple | list) -> Requirements:
        return cls(*values)

    def unmet_index(self, specs: Specs) -> int | None:
        """Index (into REQUIREMENT_NAMES) of the first requirement ``specs`` fail, in the contract's order."""
        checks = (
            specs.gpu_count >= self.min_gpus,
            model_matches(specs.gpu_model, self.gpu_model),
            specs.gpu_memory_mib >= self.min_gpu_memory_mib,
            specs.cpu_cores >= self.min_cpu_cores,
            specs.ram_mib >= self.min_ram_mib,
            specs.disk_gib >= self.min_disk_gib,
        )
        for index, ok in enumerate(checks):
            if not ok:
                return index
        return None

    def unmet_by(self, specs: Specs) -> str | None:
        """One sentence naming the first requirement ``specs`` fail, or None when all are met."""
        index = self.unmet_index(specs)
        if index is None:
            return None
        return requirement_sentence(index, self, specs)


def requirement_name(index: int) -> str:
    return REQUIREMENT_NAMES[index] if 0 <= index < len(REQUIREMENT_NAMES) else f"#{index}"


def requirement_sentence(index: int, req: Requirements, specs: Specs) -> str:
    """The sentence for a failed requirement, with the values."""
    if index == 0:
        return f"The node has {specs.gpu_count} GPU(s) but the run needs at least {req.min_gpus}."
    if index == 1:
        return f"The node's GPU model {specs.gpu_model!r} does not match the run's required model {req.gpu_model!r}."
    if index == 2:
        return (
            f"The node's GPUs have {specs.gpu_memory_mib} MiB of memory but the run needs at least "
            f"{req.min_gpu_memory_mib} MiB per GPU."
        )
    if index == 3:
        return f"The node has {specs.cpu_cores} CPU cores but the run needs at least {req.min_cpu_cores}."
    if index == 4:
        return f"The node has {specs.ram_mib} MiB of RAM but the run needs at least {req.min_ram_mib} MiB."
    return f"The node has {specs.disk_gib} GiB of disk but the run needs at least {req.min_disk_gib} GiB."


@dataclass(frozen=True)
class RunInfo:
    """A run as the contract stores it (``getRun``)."""

    run_id: int
    owner: str
    requirements: Requirements
    discovery_uri: str
    masters: list[str] = field(default_factory=list)
    ended: bool = False
    node_count: int = 0


@dataclass(frozen=True)
class NodeInfo:
    """A node record (``getNode``); ``status`` NONE and ``run_id`` 0 for an unknown node."""

    node: str
    provider: str
    run_id: int
    specs: Specs
    stake: int
    status: NodeStatus
    report_hash: bytes

    @property
    def registered(self) -> bool:
        return self.status != NodeStatus.NONE


@dataclass(frozen=True)
class ChainEvent:
    """One decoded registry event: its name, its arguments (addresses checksummed, bytes as bytes)
    and where it is on chain; (block, log_index) orders events totally."""

    name: str
    args: dict
    block: int
    tx_hash: str
    log_index: int

    @property
    def position(self) -> tuple[int, int]:
        return (self.block, self.log_index)
