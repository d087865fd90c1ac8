"""render.py for group tasks (issue 15): `task show`'s group and members, the task list's size and
phase, the live view's phase and attempt, and a group's merged log lines ("[rank R] …", from the rank the master names)."""

from __future__ import annotations

import copy

from rich.console import Console

from prime.roles.buyer.render import (
    dashboard,
    duration_text,
    format_log_line,
    group_summary,
    log_line_text,
    task_detail,
    task_summary,
    tasks_table,
)
from tests.roles.buyer.fake_master import NODE_A, NODE_B, group_task_json

NOW = 10_000.0


def rendered(renderable) -> str:
    console = Console(width=240, record=True)
    console.print(renderable)
    return console.export_text()


def row_of(text: str, first_cell: str) -> str:
    """The table line whose first cell is ``first_cell``."""
    return next(line for line in text.splitlines() if line.startswith(f"│ {first_cell} "))


def test_task_show_has_the_group_and_its_members():
    text = rendered(task_detail(group_task_json(NOW), now=NOW))
    assert "Nodes" in text and "2:3 (same GPU model)" in text and "GPUs per node" in text
    assert "Start timeout" in text and "10m" in text and "Max restarts" in text
    assert "GPUs per replica" not in text and "Restart " not in text  # a group's own words instead
    assert "first restart at once, then 5s, doubling" in text
    assert "Phase" in text and "Starting" in text and "rank 2 exited with code 1; restarting with 2 nodes" in text
    assert "Members (2)" in text
    rank0, rank1 = row_of(text, "0"), row_of(text, "1")
    assert NODE_A in rank0 and "10.0.0.1" in rank0 and "29500" in rank0 and "29501" in rank0 and "Running" in rank0
    assert NODE_B in rank1 and "10.0.0.2" in rank1 and "30100" in rank1 and "30101" in rank1 and "Pulling" in rank1
    assert "│ 2 " not in text  # the replica left out of this attempt is no member


def test_a_group_before_its_first_attempt_and_a_failed_member():
    task = group_task_json(NOW)
    task["group"] = {"phase": "Pending", "attempt": -1, "restarts": 0, "reason": None, "members": []}
    text = rendered(task_detail(task, now=NOW))
    assert "not started yet" in text and "no members in this attempt" in text and "waiting for 2:3 nodes that fit" in text
    assert group_summary(task) == "group 2:3 · Pending"

    failed = group_task_json(NOW)
    failed["group"]["phase"] = "Failed"
    failed["replicas"][1].update(state="Failed", exit_code=3, error="NCCL timeout")
    rank1 = row_of(rendered(task_detail(failed, now=NOW)), "1")
    assert "Failed" in rank1 and " 3 " in rank1 and "NCCL timeout" in rank1


def test_an_older_master_without_a_group_view_shows_the_replicas():
    task = group_task_json(NOW)
    del task["group"]
    text = rendered(task_detail(task, now=NOW))
    assert "2:3" in text and "Replicas" in text and "Members" not in text


def test_the_task_list_and_the_live_view_show_size_phase_and_attempt():
    group = group_task_json(NOW)
    plain = {"id": "plain1", "state": "Running", "created_at": NOW, "spec": {"image": "busybox", "gpus": 1, "replicas": 1},
             "replicas": [{"index": 0, "state": "Running"}]}
    assert task_summary(group) == "group 2:3 · Starting (attempt 1)" and task_summary(plain) == "1 Running"
    exact = copy.deepcopy(group)
    exact["spec"]["group"] = {"nodes": 4}
    assert group_summary(exact).startswith("group 4 · Starting")

    listed = rendered(tasks_table([group, plain], NOW))
    assert "group 2:3 · Starting (attempt 1)" in row_of(listed, group["id"])
    assert "1 Running" in row_of(listed, "plain1")
    narrow = rendered(tasks_table([group], NOW, width=80))
    assert "group 2:3" in narrow and "Starting" in narrow

    frame = rendered(dashboard([], [group, plain], master_url="http://m", now=NOW))
    assert "group 2:3 · Starting (attempt 1)" in frame


def test_durations_as_the_option_reads_them():
    assert [duration_text(s) for s in (300.0, 5400, 90, 2.5, 3600, 3605, 0)] == ["5m", "1h30m", "1m30s", "2.5s", "1h", "1h5s", "0s"]
    assert duration_text(None) == "-"


def test_a_groups_merged_lines_are_prefixed_with_the_rank_the_master_names():
    line = {"replica": 1, "rank": 1, "attempt": 0, "stream": "stdout", "line": "loss 0.5"}
    assert format_log_line(line) == "[rank 1] loss 0.5"
    assert log_line_text(line).plain == "[rank 1] loss 0.5"
    err = {**line, "stream": "stderr", "attempt": 2}
    assert format_log_line(err) == "[rank 1 err] loss 0.5"
    assert log_line_text(err).plain == "[rank 1 a2 err] loss 0.5"
    # An ordinary task's line (no rank), or text that only looks like a prefix: the replica prefix as before.
    assert format_log_line({"replica": 0, "line": "[rank 1] x"}) == "[r0] [rank 1] x"
    assert log_line_text({"replica": 0, "line": "plain"}).plain == "[r0] plain"
    assert log_line_text({"replica": 0, "rank": True, "line": "plain"}).plain == "[r0] plain"  # a bool is no rank

def test_task_show_lists_every_transition_of_the_group():
    task = group_task_json(NOW)
    task["group"]["history"] = [
        {"at": NOW - 120, "attempt": 0, "phase": "Starting", "reason": "attempt 0: rank 0 on a, rank 1 on b"},
        {"at": NOW - 60, "attempt": 0, "phase": "Restarting", "reason": "attempt 0 ended: the node b of rank 1 is gone"},
        {"at": NOW - 59, "attempt": 1, "phase": "Starting", "reason": "attempt 1: rank 0 on a, rank 1 on c"},
    ]
    text = rendered(task_detail(task, now=NOW))
    assert "History" in text
    rows = [line for line in text.splitlines() if "attempt 0 ended" in line or "attempt 1: rank 0 on a" in line]
    assert len(rows) == 2 and "Restarting" in rows[0] and "Starting" in rows[1]  # oldest first
    assert text.index("attempt 0: rank 0 on a") < text.index("attempt 0 ended") < text.index("attempt 1: rank 0 on a")
