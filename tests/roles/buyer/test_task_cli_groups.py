"""`prime buyer task create --nodes …`, `task show`, `tasks`, `watch --once` and `logs --rank` on
group tasks, as real processes against an in-process fake master (tests/roles/buyer/fake_master.py:
the master's signed bare app with canned answers): the spec sent, the refusals before any
request, the group and members shown, --json, and --rank sent as the replica query parameter."""

from __future__ import annotations

import json

import pytest_asyncio

from prime.protocol.tasks import TaskSpec
from tests.roles.buyer.conftest import KEY_PASSWORD, arun_prime, assert_one_sentence_error
from tests.roles.buyer.fake_master import GROUP_TASK_ID, NODE_A, NODE_B, FakeMaster, start_fake_master

CREATE = ("buyer", "task", "create", "--image", "registry.example/train:1")


@pytest_asyncio.fixture(loop_scope="session")
async def fake():
    master = await start_fake_master()
    yield master
    await master.close()


def env_for(fake: FakeMaster, key_file_for, random_account) -> dict[str, str]:
    return {"PRIME_MASTER_URL": fake.url, "PRIME_KEY_FILE": str(key_file_for(random_account)), "PRIME_KEY_PASSWORD": KEY_PASSWORD}


async def test_create_sends_the_group_spec(fake, key_file_for, random_account):
    env = env_for(fake, key_file_for, random_account)
    result = await arun_prime(
        *CREATE, "--nodes", "2:3", "--gpus-per-node", "8", "--same-gpu-model", "--start-timeout", "1h30m", "--max-restarts", "5",
        "--persistent", "--json", "--", "torchrun", "train.py", env=env,
    )
    assert result.returncode == 0, result.stderr
    [body] = fake.created
    spec = TaskSpec.from_json(body)  # what went on the wire is a spec the master parses
    assert spec.group is not None and body["group"]["nodes"] == 2
    assert (spec.group.nodes, spec.group.max_nodes, spec.group.same_gpu_model, spec.group.start_timeout_s, spec.group.max_restarts) == (
        2, 3, True, 5400.0, 5)
    assert (spec.gpus, spec.replicas, spec.persistent, spec.command) == (8, 1, True, ("torchrun", "train.py"))
    created = json.loads(result.stdout)
    assert created["group"]["phase"] == "Pending" and created["spec"]["group"]["max_nodes"] == 3

    plain = await arun_prime(*CREATE, "--nodes", "2", "--gpus-per-node", "1", "--", "torchrun", "train.py", env=env)
    assert plain.returncode == 0, plain.stderr
    assert "group 2 · Pending" in plain.stderr  # the creation line says what was asked for
    assert fake.created[-1]["group"] == {"nodes": 2} and fake.created[-1]["gpus"] == 1  # defaults left out, as TaskSpec encodes them


async def test_group_option_errors_are_one_sentence_before_any_request(fake, key_file_for, random_account):
    env = env_for(fake, key_file_for, random_account)
    cases = [
        (("--same-gpu-model",), "--same-gpu-model only applies to a group task; add --nodes N (or N:M)"),
        (("--start-timeout", "5m", "--gpus-per-node", "8"), "--gpus-per-node and --start-timeout only apply to a group task"),
        (("--max-restarts", "2"), "--max-restarts only applies to a group task"),
        (("--nodes", "2", "--replicas", "2"), "so it takes no --replicas 2; leave --replicas out."),
        (("--nodes", "2", "--restart", "on-failure"), "so it takes no --restart on-failure; leave --restart out."),
        (("--nodes", "2", "--gpus", "4", "--gpus-per-node", "8"), "--gpus 4 and --gpus-per-node 8 disagree"),
        (("--nodes", "2", "--start-timeout", "5 minutes"), "--start-timeout '5 minutes' is not a duration; write it like 90s, 5m, 1h30m"),
        (("--nodes", "3:2"), "--nodes 3:2: the most nodes (2) cannot be fewer than the least (3)"),
        (("--nodes", "two"), "--nodes 'two' is not N or N:M"),
        (("--nodes", "2", "--max-restarts", "1001"), "The task is not valid: --max-restarts must be at most 1000."),
    ]
    for options, fragment in cases:
        result = await arun_prime(*CREATE, *options, env=env)
        assert_one_sentence_error(result, fragment)
        assert result.returncode == 2, (options, result.returncode)
    assert fake.created == []  # refused in the CLI: nothing reached the master


async def test_show_renders_the_group_and_json_includes_it(fake, key_file_for, random_account):
    env = env_for(fake, key_file_for, random_account)
    shown = await arun_prime("buyer", "task", "show", GROUP_TASK_ID, env=env)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert "2:3 (same GPU model)" in text and "GPUs per node" in text and "10m" in text
    assert "Starting" in text and "rank 2 exited with code 1; restarting with 2 nodes" in text and "Members (2)" in text
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.startswith("│ ") and (NODE_A in line or NODE_B in line)}
    assert "10.0.0.1" in rows["0"] and "29500" in rows["0"] and "29501" in rows["0"] and "Running" in rows["0"]
    assert "10.0.0.2" in rows["1"] and "30100" in rows["1"] and "30101" in rows["1"] and "Pulling" in rows["1"]

    as_json = await arun_prime("buyer", "task", "show", GROUP_TASK_ID, "--json", env=env)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == fake.tasks[GROUP_TASK_ID]  # the TaskView as served, "group" included
    assert json.loads(as_json.stdout)["group"]["members"][1]["peer_port"] == 30101


async def test_the_task_list_and_watch_show_the_group(fake, key_file_for, random_account):
    env = env_for(fake, key_file_for, random_account)
    listed = await arun_prime("buyer", "tasks", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "group 2:3 · Starting (attempt 1)" in listed.stdout
    frame = await arun_prime("buyer", "watch", "--once", env=env)
    assert frame.returncode == 0, frame.stderr
    assert "group 2:3 · Starting (attempt 1)" in frame.stdout


async def test_logs_rank_is_the_replica_query_parameter(fake, key_file_for, random_account):
    env = env_for(fake, key_file_for, random_account)
    fake.log_lines[:] = [
        {"replica": 0, "rank": 0, "attempt": 1, "stream": "stdout", "line": "step 1", "ts": 1.0, "seq": 1},
        {"replica": 1, "rank": 1, "attempt": 1, "stream": "stdout", "line": "step 1", "ts": 2.0, "seq": 2},
    ]
    merged = await arun_prime("buyer", "logs", GROUP_TASK_ID, env=env)
    assert merged.returncode == 0, merged.stderr
    assert merged.stdout.splitlines() == ["[rank 0 a1] step 1", "[rank 1 a1] step 1"]
    assert "replica" not in fake.log_queries[-1]

    one = await arun_prime("buyer", "logs", GROUP_TASK_ID, "--rank", "1", env=env)
    assert one.returncode == 0, one.stderr
    assert fake.log_queries[-1]["replica"] == "1" and one.stdout.splitlines() == ["[rank 1 a1] step 1"]
    same = await arun_prime("buyer", "logs", GROUP_TASK_ID, "--replica", "1", "--rank", "1", env=env)
    assert same.returncode == 0 and fake.log_queries[-1]["replica"] == "1"

    before = len(fake.log_queries)
    both = await arun_prime("buyer", "logs", GROUP_TASK_ID, "--replica", "0", "--rank", "1", env=env)
    assert_one_sentence_error(both, "--replica 0 and --rank 1 name different members")
    assert both.returncode == 2 and len(fake.log_queries) == before
