#!/usr/bin/env python3
"""Decoding cost of the wire messages (prime.protocol, msgspec), against bare JSON parsing.

    python bench/messages.py

For a heartbeat of 8 replicas and 8 GPU samples, a full task spec and a master's heartbeat
answer listing 8 replicas, prints microseconds per decode from raw bytes with validation, and
the ratio against the floor measured in the same run: ``json.loads`` of the same bytes, which
validates nothing. A ratio near 1 means validation is almost free on top of parsing.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from prime.protocol.heartbeat import HeartbeatRequest, HeartbeatResponse  # noqa: E402
from prime.protocol.tasks import TaskSpec  # noqa: E402

SPEC = {"image": "nvcr.io/nvidia/pytorch:24.01-py3", "command": ["torchrun", "--nproc-per-node", "8", "train.py"],
        "env": {f"VAR_{i}": "x" * 32 for i in range(16)}, "gpus": 8, "replicas": 4, "persistent": True,
        "cpu_limit": 32.0, "memory_limit_mib": 262_144, "restart": "on-failure"}
HEARTBEAT = {
    "tasks": [{"id": f"task-{i}", "replica": i % 4, "state": "Running", "exit_code": None, "error": None} for i in range(8)],
    "gpus": [{"index": i, "util": 93.5, "mem_used_mib": 40_000.5, "temp_c": 71} for i in range(8)],
    "load": {"cpu_pct": 12.5, "mem_used_mib": 8123},
}
ANSWER = {"interval_s": 30.0,
          "desired": [{"id": f"task-{i}", "replica": 0, "attempt": 0, "gpu_indices": [i], "spec": SPEC} for i in range(8)]}


def per_call_us(fn: Callable[[], Any], seconds: float = 0.5) -> float:
    """Best of three timed batches, in microseconds per call."""
    best = float("inf")
    for _ in range(3):
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 3:
            for _ in range(100):
                fn()
            n += 100
        best = min(best, (time.perf_counter() - started) / n * 1e6)
    return best


def main() -> None:
    print(f"{'message':<22}{'bytes':>8}{'decode µs':>12}{'json.loads µs':>15}{'ratio':>8}")
    for name, body, cls in (("heartbeat (8+8)", HEARTBEAT, HeartbeatRequest), ("task spec", SPEC, TaskSpec),
                            ("heartbeat answer (8)", ANSWER, HeartbeatResponse)):
        raw = json.dumps(body).encode()
        cls.from_json(raw)  # warm the cached decoder
        decode = per_call_us(lambda raw=raw, cls=cls: cls.from_json(raw))
        floor = per_call_us(lambda raw=raw: json.loads(raw))
        print(f"{name:<22}{len(raw):>8}{decode:>12.1f}{floor:>15.1f}{decode / floor:>8.2f}")


if __name__ == "__main__":
    main()
