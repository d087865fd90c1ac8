"""Heartbeat link: the node's request (replica reports, GPU samples, load) and the master's answer."""
from __future__ import annotations

import math
import re
import secrets
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from prime.chain.types import NodeStatus, Specs
from prime.errors import PrimeError

from prime.protocol.errors import *  # noqa
from prime.protocol.errors import _object, _no_unknown, _required, _join, _int, _optional_int, _number, _optional_number, _bool, _text, _optional_text, _list
from prime.protocol.tasks import *  # noqa
# --- heartbeat messages ----------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaReport:
    """What a node says about one replica it runs (``id`` is the task id)."""

    id: str
    replica: int
    state: ReplicaState
    exit_code: int | None = None
    error: str | None = None

    @classmethod
    def from_json(cls, data: Any, prefix: str) -> ReplicaReport:
        data = _object(data, prefix)
        _no_unknown(data, _REPLICA_REPORT_KEYS, prefix)
        task_id = _text(_required(data, "id", prefix), _join(prefix, "id"), max_length=64, allow_empty=False)
        if not is_task_id(task_id):
            raise ValidationError(_join(prefix, "id"), "Is not a valid task id.")
        replica = _int(data.get("replica", 0), _join(prefix, "replica"), minimum=0, maximum=MAX_REPLICAS - 1)
        raw_state = _required(data, "state", prefix)
        try:
            state = ReplicaState(raw_state)
        except ValueError:
            state = None
        if state not in REPORTABLE_REPLICA_STATES:
            allowed = ", ".join(sorted(s.value for s in REPORTABLE_REPLICA_STATES))
            raise ValidationError(_join(prefix, "state"), f"Must be one of {allowed}.")
        exit_code = _optional_int(data.get("exit_code"), _join(prefix, "exit_code"), minimum=-(2**31), maximum=2**31)
        error = _optional_text(data.get("error"), _join(prefix, "error"), max_length=MAX_ERROR_LENGTH)
        return cls(task_id, replica, state, exit_code, error)

    @classmethod
    def _from_plain_json(cls, data: Any) -> ReplicaReport | None:
        """The common, well-formed report without building error names (see HeartbeatRequest)."""
        if type(data) is not dict or not data.keys() <= _REPLICA_REPORT_KEYS:
            return None
        task_id, replica, raw_state = data.get("id"), data.get("replica", 0), data.get("state")
        exit_code, error = data.get("exit_code"), data.get("error")
        state = _REPORTABLE_BY_VALUE.get(raw_state) if type(raw_state) is str else None
        if (type(task_id) is not str or not 0 < len(task_id) <= 64 or not is_task_id(task_id) or state is None
                or type(replica) is not int or not 0 <= replica <= MAX_REPLICAS - 1
                or not (exit_code is None or (type(exit_code) is int and -(2**31) <= exit_code <= 2**31))
                or not (error is None or (type(error) is str and len(error) <= MAX_ERROR_LENGTH and "\x00" not in error))):
            return None
        return cls(task_id, replica, state, exit_code, error)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "replica": self.replica, "state": self.state.value,
                "exit_code": self.exit_code, "error": self.error}


_REPLICA_REPORT_KEYS = frozenset({"id", "replica", "state", "exit_code", "error"})
_REPORTABLE_BY_VALUE = {s.value: s for s in REPORTABLE_REPLICA_STATES}


@dataclass(frozen=True)
class GpuSample:
    index: int
    util: float | None = None          # percent
    mem_used_mib: float | None = None
    temp_c: float | None = None

    @classmethod
    def from_json(cls, data: Any, prefix: str) -> GpuSample:
        fast = cls._from_plain_json(data)
        return fast if fast is not None else cls._from_json_checked(data, prefix)

    @classmethod
    def _from_json_checked(cls, data: Any, prefix: str) -> GpuSample:
        """Field by field, naming the first one that is wrong."""
        data = _object(data, prefix)
        _no_unknown(data, _GPU_SAMPLE_KEYS, prefix)
        return cls(
            _int(_required(data, "index", prefix), _join(prefix, "index"), minimum=0, maximum=MAX_REPORTED_GPUS),
            _optional_number(data.get("util"), _join(prefix, "util"), minimum=0, maximum=100),
            _optional_number(data.get("mem_used_mib"), _join(prefix, "mem_used_mib"), minimum=0),
            _optional_number(data.get("temp_c"), _join(prefix, "temp_c"), minimum=-100, maximum=300),
        )

    @classmethod
    def _from_plain_json(cls, data: Any) -> GpuSample | None:
        """The common, well-formed sample without building error names (every heartbeat has several)."""
        if type(data) is not dict or not data.keys() <= _GPU_SAMPLE_KEYS:
            return None
        index = data.get("index")
        util, mem, temp = data.get("util"), data.get("mem_used_mib"), data.get("temp_c")
        if (type(index) is int and 0 <= index <= MAX_REPORTED_GPUS and _plain_number(util, 0, 100)
                and _plain_number(mem, 0, sys.float_info.max) and _plain_number(temp, -100, 300)):
            return cls(index, None if util is None else float(util), None if mem is None else float(mem),
                       None if temp is None else float(temp))
        return None

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "util": self.util, "mem_used_mib": self.mem_used_mib, "temp_c": self.temp_c}


_GPU_SAMPLE_KEYS = frozenset({"index", "util", "mem_used_mib", "temp_c"})


def _plain_number(value: Any, low: float, high: float) -> bool:
    """None, or an int/float (not bool) that is finite and within [low, high]."""
    return value is None or ((type(value) is int or type(value) is float) and low <= value <= high)


def _parse_load(value: Any, field: str) -> dict[str, float]:
    if value is None:
        return {}
    load = _object(value, field)
    if len(load) > MAX_LOAD_KEYS:
        raise ValidationError(field, f"Must have at most {MAX_LOAD_KEYS} entries.")
    out = {}
    for key, val in load.items():
        if len(key) > 64:
            raise ValidationError(field, "Entry names must be at most 64 characters long.")
        out[key] = _number(val, f"{field}.{key}")
    return out


@dataclass(frozen=True)
class HeartbeatRequest:
    """``POST /heartbeat`` body: the node's replicas, GPU samples and load (cpu_pct, mem_used_mib, ...)."""

    tasks: tuple[ReplicaReport, ...] = ()
    gpus: tuple[GpuSample, ...] = ()
    load: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any) -> HeartbeatRequest:
        fast = cls._from_plain_json(data)
        return fast if fast is not None else cls._from_json_checked(data)

    @classmethod
    def _from_json_checked(cls, data: Any) -> HeartbeatRequest:
        """Field by field, naming the first one that is wrong."""
        data = _object(data, "body")
        _no_unknown(data, _HEARTBEAT_KEYS, "")
        tasks = tuple(
            ReplicaReport.from_json(item, f"tasks[{i}]")
            for i, item in enumerate(_list(data.get("tasks", []), "tasks", max_items=MAX_REPORTED_TASKS))
        )
        gpus = tuple(
            GpuSample._from_json_checked(item, f"gpus[{i}]")
            for i, item in enumerate(_list(data.get("gpus", []), "gpus", max_items=MAX_REPORTED_GPUS))
        )
        return cls(tasks, gpus, _parse_load(data.get("load"), "load"))

    @classmethod
    def _from_plain_json(cls, data: Any) -> HeartbeatRequest | None:
        """A well-formed heartbeat, checked without building error names; None sends it down the
        slow path (which accepts exactly the same bodies, and says what is wrong with the others).
        A master takes thousands of heartbeats a second: this is most of its own work on each."""
        if type(data) is not dict or not data.keys() <= _HEARTBEAT_KEYS:
            return None
        raw_tasks, raw_gpus, raw_load = data.get("tasks", []), data.get("gpus", []), data.get("load")
        if type(raw_tasks) is not list or len(raw_tasks) > MAX_REPORTED_TASKS \
                or type(raw_gpus) is not list or len(raw_gpus) > MAX_REPORTED_GPUS:
            return None
        tasks = _all_plain(raw_tasks, ReplicaReport._from_plain_json)
        gpus = _all_plain(raw_gpus, GpuSample._from_plain_json)
        if tasks is None or gpus is None:
            return None
        load: dict[str, float] = {}
        if raw_load is not None:
            if type(raw_load) is not dict or len(raw_load) > MAX_LOAD_KEYS:
                return None
            for key, value in raw_load.items():
                if len(key) > 64 or value is None or not _plain_number(value, -sys.float_info.max, sys.float_info.max):
                    return None
                load[key] = float(value)
        return cls(tasks, gpus, load)

    def to_json(self) -> dict[str, Any]:
        return {"tasks": [t.to_json() for t in self.tasks], "gpus": [g.to_json() for g in self.gpus],
                "load": dict(self.load)}


_HEARTBEAT_KEYS = frozenset({"tasks", "gpus", "load"})


T = TypeVar("T")


def _all_plain(items: list[Any], parse: Callable[[Any], T | None]) -> tuple[T, ...] | None:
    """Every item through a ``_from_plain_json``; None as soon as one needs the checked path."""
    out = []
    for item in items:
        parsed = parse(item)
        if parsed is None:
            return None
        out.append(parsed)
    return tuple(out)


@dataclass(frozen=True)
class DesiredReplica:
    """One replica a node should run: everything it needs to start one it never saw."""

    id: str                      # task id
    replica: int
    attempt: int
    gpu_indices: tuple[int, ...]
    spec: TaskSpec

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "replica": self.replica, "attempt": self.attempt,
                "gpu_indices": list(self.gpu_indices), "spec": self.spec.to_json()}

    @classmethod
    def from_json(cls, data: Any, prefix: str = "desired") -> DesiredReplica:
        data = _object(data, prefix)
        _no_unknown(data, {"id", "replica", "attempt", "gpu_indices", "spec"}, prefix)
        task_id = _text(_required(data, "id", prefix), _join(prefix, "id"), max_length=64, allow_empty=False)
        if not is_task_id(task_id):
            raise ValidationError(_join(prefix, "id"), "Is not a valid task id.")
        gpu_field = _join(prefix, "gpu_indices")
        gpus = tuple(
            _int(g, f"{gpu_field}[{i}]", minimum=0)
            for i, g in enumerate(_list(data.get("gpu_indices", []), gpu_field, max_items=MAX_REPORTED_GPUS))
        )
        return cls(
            task_id,
            _int(_required(data, "replica", prefix), _join(prefix, "replica"), minimum=0),
            _int(data.get("attempt", 0), _join(prefix, "attempt"), minimum=0),
            gpus,
            TaskSpec.from_json(_required(data, "spec", prefix), _join(prefix, "spec")),
        )


@dataclass(frozen=True)
class HeartbeatResponse:
    """The master's answer: when to heartbeat next and the full list of replicas the node should run
    (anything the node runs that is not listed should be stopped)."""

    interval_s: float
    desired: tuple[DesiredReplica, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"interval_s": self.interval_s, "desired": [d.to_json() for d in self.desired]}

    @classmethod
    def from_json(cls, data: Any) -> HeartbeatResponse:
        data = _object(data, "body")
        _no_unknown(data, {"interval_s", "desired"}, "")
        interval = _number(_required(data, "interval_s", ""), "interval_s", minimum=0.01)
        desired = tuple(
            DesiredReplica.from_json(d, f"desired[{i}]")
            for i, d in enumerate(_list(data.get("desired", []), "desired", max_items=MAX_REPORTED_TASKS))
        )
        return cls(interval, desired)
