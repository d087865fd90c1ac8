"""`prime buyer task|tasks|logs|files|nodes|watch` as real processes against a real HTTP server
that speaks the master's owner API with real signature and owner checks."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import pytest_asyncio
from eth_account import Account

from prime.protocol.nodes import NodeState
from tests.fixtures.processes import free_port
from tests.roles.buyer.conftest import KEY_PASSWORD, arun_prime, assert_one_sentence_error
from tests.roles.buyer.fake_master import FakeMaster, sample_node

OWNER = Account.create()
NODE = Account.create().address


@pytest_asyncio.fixture(loop_scope="session")
async def master():
    server = await FakeMaster(owner=OWNER.address).start()
    yield server
    await server.stop()


@pytest.fixture
def env(master, key_file_for):
    return {"PRIME_MASTER_URL": master.url, "PRIME_KEY_FILE": str(key_file_for(OWNER)), "PRIME_KEY_PASSWORD": KEY_PASSWORD}


async def test_task_create_sends_the_spec_signed_by_the_owner(master, env):
    result = await arun_prime(
        "buyer", "task", "create", "--image", "ghcr.io/org/trainer:1.2", "--env", "LR=0.1", "--env", "NAME=a=b",
        "--gpus", "2", "--replicas", "3", "--persistent", "--cpu-limit", "2.5", "--memory-limit-mib", "4096",
        "--json", "--", "python", "train.py", "--epochs", "3", env=env,
    )
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    task = master.tasks[created["id"]]
    assert task.spec.image == "ghcr.io/org/trainer:1.2"
    assert task.spec.command == ("python", "train.py", "--epochs", "3")
    assert dict(task.spec.env) == {"LR": "0.1", "NAME": "a=b"}
    assert (task.spec.gpus, task.spec.replicas, task.spec.persistent) == (2, 3, True)
    assert (task.spec.cpu_limit, task.spec.memory_limit_mib) == (2.5, 4096)
    assert ("POST", "/tasks", OWNER.address) in master.signers


async def test_task_create_plain_output_is_the_id_and_cmd_is_split_like_a_shell(master, env):
    result = await arun_prime("buyer", "task", "create", "--image", "busybox", "--cmd", "sh -c 'echo hi > /data/x'", "--gpus", "all", env=env)
    assert result.returncode == 0, result.stderr
    task_id = result.stdout.strip()
    assert master.tasks[task_id].spec.command == ("sh", "-c", "echo hi > /data/x")
    assert master.tasks[task_id].spec.gpus == "all"
    assert f"prime buyer logs {task_id} -f" in result.stderr


async def test_a_spec_the_master_refuses_is_one_sentence_with_its_detail(master, env):
    # Checked before sending: the master's own validation runs locally first.
    local = await arun_prime("buyer", "task", "create", "--image", "busybox", "--replicas", "0", env=env)
    assert "--replicas" in local.stderr and local.returncode != 0
    bad_image = await arun_prime("buyer", "task", "create", "--image", "Not An Image", env=env)
    assert_one_sentence_error(bad_image, "--image")
    bad_env = await arun_prime("buyer", "task", "create", "--image", "busybox", "--env", "NOEQUALS", env=env)
    assert_one_sentence_error(bad_env, "NAME=VALUE")
    assert not [s for s in master.signers if s[0] == "POST"]  # nothing reached the master


async def test_master_400_detail_reaches_the_user(master, env):
    result = await arun_prime("buyer", "task", "create", "--image", "busybox", "--gpus", "9", env=env)
    assert_one_sentence_error(result, "The master refused to create the task: gpus: No node has 9 GPUs")
    assert not master.tasks


async def test_not_the_owner_is_refused_with_one_sentence(master, key_file_for):
    stranger = Account.create()
    env = {"PRIME_MASTER_URL": master.url, "PRIME_KEY_FILE": str(key_file_for(stranger)), "PRIME_KEY_PASSWORD": KEY_PASSWORD}
    result = await arun_prime("buyer", "tasks", env=env)
    assert_one_sentence_error(result, stranger.address, "is not the owner", "--key-file")


async def test_unreachable_master_is_one_sentence(key_file_for):
    env = {"PRIME_KEY_FILE": str(key_file_for(OWNER)), "PRIME_KEY_PASSWORD": KEY_PASSWORD}
    url = f"http://127.0.0.1:{free_port()}"
    result = await arun_prime("buyer", "nodes", "--master-url", url, env=env)
    assert_one_sentence_error(result, "Cannot reach the master", url, "--master-url")
    missing = await arun_prime("buyer", "tasks", env=env)
    assert_one_sentence_error(missing, "PRIME_MASTER_URL")


async def test_tasks_show_and_stop(master, env):
    task = master.add_task({"image": "busybox", "command": ["sleep", "60"], "replicas": 2}, replica_states=["Running", "Pending"], node=NODE)
    listed = await arun_prime("buyer", "tasks", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    ids = {t["id"]: t for t in json.loads(listed.stdout)["tasks"]}
    assert ids[task.id]["state"] == "Running"

    table = await arun_prime("buyer", "tasks", env=env)
    assert task.id in table.stdout and "1 Running, 1 Pending" in table.stdout

    shown = await arun_prime("buyer", "task", "show", task.id, "--json", env=env)
    assert json.loads(shown.stdout)["replicas"][0]["node"] == NODE
    detail = await arun_prime("buyer", "task", "show", task.id, env=env)
    assert "sleep 60" in detail.stdout and NODE in detail.stdout

    stopped = await arun_prime("buyer", "task", "stop", task.id, env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert master.tasks[task.id].stop_requested
    assert ("DELETE", f"/tasks/{task.id}", OWNER.address) in master.signers

    unknown = await arun_prime("buyer", "task", "show", "deadbeef0000", env=env)
    assert_one_sentence_error(unknown, "no task deadbeef0000")
    not_an_id = await arun_prime("buyer", "task", "show", "../etc", env=env)
    assert_one_sentence_error(not_an_id, "is not a task id")


async def test_logs_are_prefixed_by_replica_and_follow_gets_late_lines(master, env):
    task = master.add_task({"image": "busybox", "replicas": 2})
    master.logs[task.id] = [
        {"replica": 0, "node": NODE, "stream": "stdout", "line": "r0 first", "ts": 1.0},
        {"replica": 1, "node": NODE, "stream": "stderr", "line": "r1 warn", "ts": 2.0},
        {"replica": 0, "node": NODE, "stream": "stdout", "line": "r0 second", "ts": 3.0},
    ]
    master.late_logs[task.id] = [{"replica": 1, "node": NODE, "stream": "stdout", "line": "r1 late", "ts": 4.0}]

    plain = await arun_prime("buyer", "logs", task.id, env=env)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.splitlines() == ["[r0] r0 first", "[r1 err] r1 warn", "[r0] r0 second"]

    tail = await arun_prime("buyer", "logs", task.id, "--tail", "1", env=env)
    assert tail.stdout.splitlines() == ["[r0] r0 second"]

    followed = await arun_prime("buyer", "logs", task.id, "-f", env=env)
    assert followed.stdout.splitlines()[-1] == "[r1] r1 late"

    as_json = await arun_prime("buyer", "logs", task.id, "--json", env=env)
    assert [json.loads(line)["line"] for line in as_json.stdout.splitlines()] == ["r0 first", "r1 warn", "r0 second"]


async def test_files_list_and_download_verify_sha256(master, env, tmp_path):
    task = master.add_task({"image": "busybox", "persistent": True})
    content = {"result.txt": b"the answer is 42\n", "ckpt/step 1.bin": bytes(range(256)) * 1000}
    for path, data in content.items():
        master.add_file(task.id, path, data)

    listed = await arun_prime("buyer", "files", task.id, "--json", env=env)
    entries = json.loads(listed.stdout)["files"]
    assert {e["path"]: e["sha256"] for e in entries} == {p: hashlib.sha256(d).hexdigest() for p, d in content.items()}

    out = tmp_path / "out"
    downloaded = await arun_prime("buyer", "files", task.id, "--download", str(out), env=env)
    assert downloaded.returncode == 0, downloaded.stderr
    for path, data in content.items():
        assert (out / path).read_bytes() == data
    assert "Downloaded 2 file(s)" in downloaded.stdout

    again = await arun_prime("buyer", "files", task.id, "--download", str(out), "--json", env=env)
    assert [f["downloaded"] for f in json.loads(again.stdout)["files"]] == [False, False]  # already there, same sha256


async def test_a_download_with_the_wrong_content_is_refused_and_not_saved(master, env, tmp_path):
    task = master.add_task({"image": "busybox", "persistent": True})
    master.add_file(task.id, "model.bin", b"\x01" * 5000)
    master.corrupt.add("model.bin")
    out = tmp_path / "out"
    result = await arun_prime("buyer", "files", task.id, "--download", str(out), env=env)
    assert_one_sentence_error(result, "model.bin", "sha256")
    assert not (out / "model.bin").exists()
    assert not [p for p in out.rglob("*") if p.is_file()]  # no partial file left behind


async def test_files_of_several_replicas_go_to_one_dir_each(master, env, tmp_path):
    task = master.add_task({"image": "busybox", "persistent": True, "replicas": 2})
    master.add_file(task.id, "out.txt", b"zero", replica=0)
    master.add_file(task.id, "out.txt", b"one", replica=1)
    result = await arun_prime("buyer", "files", task.id, "--download", str(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "replica-0" / "out.txt").read_bytes() == b"zero"
    assert (tmp_path / "replica-1" / "out.txt").read_bytes() == b"one"


async def test_nodes_and_watch_once(master, env):
    master.nodes = [sample_node(NODE), sample_node(Account.create().address, state=NodeState.UNHEALTHY)]
    master.add_task({"image": "busybox"}, replica_states=["Running"], node=NODE)
    listed = await arun_prime("buyer", "nodes", "--json", env=env)
    nodes = json.loads(listed.stdout)["nodes"]
    assert [n["state"] for n in nodes] == ["Healthy", "Unhealthy"]

    table = await arun_prime("buyer", "nodes", env=env)
    assert NODE in table.stdout and "2× NVIDIA H100" in table.stdout
    assert re.search(r"\b\d+s ago", table.stdout)  # the last heartbeat, as an age

    frame = await arun_prime("buyer", "watch", "--once", env=env)
    assert frame.returncode == 0, frame.stderr
    assert "Nodes (2)" in frame.stdout and "Tasks (" in frame.stdout and "Unhealthy" in frame.stdout


def test_key_file_path_errors_are_one_sentence(tmp_path: Path):
    from tests.roles.buyer.conftest import run_prime

    result = run_prime("buyer", "tasks", "--master-url", "http://127.0.0.1:1", "--key-file", str(tmp_path / "missing.json"))
    assert_one_sentence_error(result, "does not exist")
