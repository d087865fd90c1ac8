"""spec.py for group tasks (issue 15): `task create --nodes N[:M] …` options → the TaskSpec sent,
and each refusal in the CLI's words (an OptionError: exit code 2), before any request."""

from __future__ import annotations

import pytest

from prime.protocol.groups import DEFAULT_MAX_RESTARTS, DEFAULT_START_TIMEOUT_S
from prime.protocol.tasks import TaskSpec
from prime.roles.buyer.spec import (
    OptionError,
    build_task_spec,
    group_options,
    parse_duration,
    parse_nodes,
    replica_of,
)


def group_spec(**options) -> TaskSpec:
    """The spec `task create --image busybox` plus ``options`` sends, as the master parses it."""
    gpus, group = group_options(**options)
    return TaskSpec.from_json(build_task_spec(image="busybox", gpus=gpus, group=group))


def test_nodes_n_and_n_to_m():
    assert parse_nodes("2") == (2, None) and parse_nodes(" 2:3 ") == (2, 3) and parse_nodes("4:4") == (4, 4)
    for bad, fragment in (("", "is not N or N:M"), ("two", "is not N or N:M"), ("2:", "is not N or N:M"), ("-1", "is not N or N:M"),
                          ("1.5", "is not N or N:M"), ("0", "at least 1 node"), ("3:2", "cannot be fewer than the least (3)"),
                          ("2:257", "at most 256 nodes")):
        with pytest.raises(OptionError, match="^--nodes ") as caught:
            parse_nodes(bad)
        assert fragment in caught.value.message and caught.value.exit_code == 2


def test_durations():
    cases = {"90s": 90.0, "5m": 300.0, "1h": 3600.0, "1h30m": 5400.0, "1h0m5s": 3605.0, "2m30s": 150.0, "300": 300.0,
             "2.5": 2.5, "1.5h": 5400.0, " 5M ": 300.0, "168h": 7 * 86400.0}
    for text, seconds in cases.items():
        assert parse_duration(text) == seconds, text
    for bad in ("", "m", "5x", "1m1h", "5 m", "-5", "nan", "inf", "1e3", "1d"):
        with pytest.raises(OptionError, match=r"^--start-timeout .* is not a duration; write it like 90s, 5m, 1h30m or a number of seconds\.$"):
            parse_duration(bad)
    for zero in ("0", "0s", "0h0m"):
        with pytest.raises(OptionError, match="must be longer than 0 seconds"):
            parse_duration(zero)
    with pytest.raises(OptionError, match=r"longer than the most it can be, 168h \(7 days\)"):
        parse_duration("169h")


def test_the_group_spec_built_from_the_flags():
    spec = group_spec(nodes="2:3", gpus_per_node=8, same_gpu_model=True, start_timeout="1h30m", max_restarts=5)
    assert spec.group is not None
    assert (spec.group.nodes, spec.group.max_nodes, spec.group.same_gpu_model) == (2, 3, True)
    assert (spec.group.start_timeout_s, spec.group.max_restarts) == (5400.0, 5)
    assert (spec.gpus, spec.replicas, spec.replica_count) == (8, 1, 3)  # gpus: per member

    exact = group_spec(nodes="2")
    assert exact.group is not None and exact.group.max_nodes is None and exact.group.same_gpu_model is False
    assert (exact.group.start_timeout_s, exact.group.max_restarts, exact.gpus) == (DEFAULT_START_TIMEOUT_S, DEFAULT_MAX_RESTARTS, 0)
    # --gpus alone is the GPUs of each member too; the same number twice is no conflict.
    assert group_spec(nodes="2", gpus="4").gpus == 4
    assert group_spec(nodes="2", gpus="4", gpus_per_node=4).gpus == 4
    assert group_spec(nodes="3", max_restarts=0, start_timeout="90").group.max_restarts == 0  # type: ignore[union-attr]
    assert group_spec(nodes="2", restart_backoff="30s").group.restart_backoff_s == 30.0  # type: ignore[union-attr]
    assert group_spec(nodes="2", restart_backoff="0").group.restart_backoff_s == 0.0  # type: ignore[union-attr]
    assert exact.group.restart_backoff_s == 5.0


def test_a_bad_restart_backoff_is_one_sentence():
    with pytest.raises(OptionError, match=r"^--restart-backoff '2h' is longer than the most it can be, 1h\.$"):
        group_options(nodes="2", restart_backoff="2h")
    with pytest.raises(OptionError, match=r"^--restart-backoff 'soon' is not a duration"):
        group_options(nodes="2", restart_backoff="soon")
    with pytest.raises(OptionError, match=r"^--restart-backoff only applies to a group task"):
        group_options(nodes=None, restart_backoff="5s")


def test_no_group_without_nodes():
    assert group_options(nodes=None) == (0, None)
    assert group_options(nodes=None, gpus="all", replicas=3, restart="on-failure") == ("all", None)
    spec = TaskSpec.from_json(build_task_spec(image="busybox"))
    assert spec.group is None and "group" not in build_task_spec(image="busybox")  # an ordinary spec reads as before


@pytest.mark.parametrize(("options", "sentence"), [
    ({"nodes": None, "same_gpu_model": True},
     "--same-gpu-model only applies to a group task; add --nodes N (or N:M) to run one member on each of N nodes."),
    ({"nodes": None, "start_timeout": "5m"}, "--start-timeout only applies to a group task; add --nodes N (or N:M)"),
    ({"nodes": None, "max_restarts": 2}, "--max-restarts only applies to a group task"),
    ({"nodes": None, "gpus_per_node": 8}, "--gpus-per-node only applies to a group task"),
    ({"nodes": None, "gpus_per_node": 8, "start_timeout": "5m", "max_restarts": 1},
     "--gpus-per-node, --start-timeout and --max-restarts only apply to a group task"),
    ({"nodes": "2", "replicas": 3},
     "A group task runs one member on each of its --nodes, so it takes no --replicas 3; leave --replicas out."),
    ({"nodes": "2", "restart": "on-failure"},
     "A group task is restarted as a whole (--max-restarts K), so it takes no --restart on-failure; leave --restart out."),
    ({"nodes": "2", "gpus": "2", "gpus_per_node": 8},
     "--gpus 2 and --gpus-per-node 8 disagree; for a group task give only --gpus-per-node 8."),
    ({"nodes": "2", "gpus": "all"}, "A group member needs a number of GPUs, not --gpus all; give the GPUs of each node with --gpus-per-node G."),
    ({"nodes": "2", "start_timeout": "soon"}, "--start-timeout 'soon' is not a duration"),
    ({"nodes": "2:x"}, "--nodes '2:x' is not N or N:M"),
])
def test_each_refusal_is_one_sentence(options, sentence):
    with pytest.raises(OptionError) as caught:
        group_options(**options)
    assert caught.value.message.startswith(sentence), caught.value.message
    assert caught.value.exit_code == 2 and "\n" not in caught.value.message


def test_what_only_the_protocol_bounds_names_the_option():
    with pytest.raises(OptionError, match=r"^The task is not valid: --max-restarts must be at most 1000\.$"):
        group_spec(nodes="2", max_restarts=1001)
    with pytest.raises(OptionError, match=r"^The task is not valid: --gpus-per-node must be at most 256\.$"):
        group_spec(nodes="2", gpus_per_node=257)
    # Ordinary tasks name their own options as before.
    with pytest.raises(OptionError, match="^The task is not valid: --gpus "):
        build_task_spec(image="busybox", gpus=257)


def test_rank_is_the_replica():
    assert replica_of(None, None) is None and replica_of(1, None) == 1 and replica_of(None, 2) == 2 and replica_of(3, 3) == 3
    with pytest.raises(OptionError, match=r"^--replica 1 and --rank 2 name different members"):
        replica_of(1, 2)
