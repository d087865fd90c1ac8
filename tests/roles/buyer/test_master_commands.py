"""`prime buyer task|tasks|logs|files|nodes|watch` as real processes against a real master process
(tests/roles/buyer/real_master.py): real signatures, the owner check on chain, the master's own
validation, placement, merged logs and synced files."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from pathlib import Path

import pytest
import pytest_asyncio
from eth_account import Account

from tests.fixtures.processes import RoleProcesses, free_port
from tests.roles.buyer.conftest import (
    KEY_PASSWORD,
    arun_prime,
    assert_one_sentence_error,
)
from tests.roles.buyer.real_master import RealMaster, start_real_master
from tests.roles.master.fake_miner import eventually


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def master(anvil, deployment, module_role_processes: RoleProcesses, tmp_path_factory):
    world = await start_real_master(anvil, deployment, module_role_processes, tmp_path_factory.mktemp("buyer-master"))
    yield world
    await world.close()


@pytest_asyncio.fixture(loop_scope="session", autouse=True)
async def _fresh(master: RealMaster):
    yield
    await master.stop_everything()


@pytest.fixture
def env(master: RealMaster, key_file_for):
    return {"PRIME_MASTER_URL": master.url, "PRIME_KEY_FILE": str(key_file_for(master.owner)), "PRIME_KEY_PASSWORD": KEY_PASSWORD}


async def test_task_create_sends_the_spec_signed_by_the_owner(master, env):
    result = await arun_prime(
        "buyer", "task", "create", "--image", "ghcr.io/org/trainer:1.2", "--env", "LR=0.1", "--env", "NAME=a=b",
        "--gpus", "2", "--replicas", "3", "--persistent", "--cpu-limit", "2.5", "--memory-limit-mib", "4096",
        "--json", "--", "python", "train.py", "--epochs", "3", env=env,
    )
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    spec = (await master.task(created["id"]))["spec"]  # the master took it: the owner's signature passed
    assert spec["image"] == "ghcr.io/org/trainer:1.2"
    assert spec["command"] == ["python", "train.py", "--epochs", "3"]
    assert spec["env"] == {"LR": "0.1", "NAME": "a=b"}
    assert (spec["gpus"], spec["replicas"], spec["persistent"]) == (2, 3, True)
    assert (spec["cpu_limit"], spec["memory_limit_mib"]) == (2.5, 4096)


async def test_task_create_plain_output_is_the_id_and_cmd_is_split_like_a_shell(master, env):
    result = await arun_prime("buyer", "task", "create", "--image", "busybox", "--cmd", "sh -c 'echo hi > /data/x'", "--gpus", "all", env=env)
    assert result.returncode == 0, result.stderr
    task_id = result.stdout.strip()
    spec = (await master.task(task_id))["spec"]
    assert spec["command"] == ["sh", "-c", "echo hi > /data/x"]
    assert spec["gpus"] == "all"
    assert f"prime buyer logs {task_id} -f" in result.stderr


async def test_a_spec_the_master_refuses_is_one_sentence_with_its_detail(master, env):
    # Checked before sending: the master's own validation runs locally first.
    before = len((await master.call("GET", "/tasks"))[1]["tasks"])
    local = await arun_prime("buyer", "task", "create", "--image", "busybox", "--replicas", "0", env=env)
    assert "--replicas" in local.stderr and local.returncode != 0
    bad_image = await arun_prime("buyer", "task", "create", "--image", "Not An Image", env=env)
    assert_one_sentence_error(bad_image, "--image")
    bad_env = await arun_prime("buyer", "task", "create", "--image", "busybox", "--env", "NOEQUALS", env=env)
    assert_one_sentence_error(bad_env, "NAME=VALUE")
    assert len((await master.call("GET", "/tasks"))[1]["tasks"]) == before  # nothing reached the master


async def test_master_400_detail_reaches_the_user(master, env):
    before = len((await master.call("GET", "/tasks"))[1]["tasks"])
    result = await arun_prime("buyer", "task", "create", "--image", "busybox", "--gpus", "9", env=env)
    # The master's placement check, against its nodes' real hardware (the largest has 2 GPUs).
    assert_one_sentence_error(result, "The master refused to create the task: gpus: No node in this run has 9 GPUs; the largest has 2")
    assert len((await master.call("GET", "/tasks"))[1]["tasks"]) == before


async def test_not_the_owner_is_refused_with_one_sentence(master, key_file_for):
    stranger = Account.create()
    env = {"PRIME_MASTER_URL": master.url, "PRIME_KEY_FILE": str(key_file_for(stranger)), "PRIME_KEY_PASSWORD": KEY_PASSWORD}
    result = await arun_prime("buyer", "tasks", env=env)
    assert_one_sentence_error(result, stranger.address, "is not the owner", "--key-file")


async def test_unreachable_master_is_one_sentence(master, key_file_for):
    env = {"PRIME_KEY_FILE": str(key_file_for(master.owner)), "PRIME_KEY_PASSWORD": KEY_PASSWORD}
    url = f"http://127.0.0.1:{free_port()}"
    result = await arun_prime("buyer", "nodes", "--master-url", url, env=env)
    assert_one_sentence_error(result, "Cannot reach the master", url, "--master-url")
    missing = await arun_prime("buyer", "tasks", env=env)
    assert_one_sentence_error(missing, "PRIME_MASTER_URL")


async def test_tasks_show_and_stop(master, env):
    node = master.node
    # Two replicas of 2 GPUs on a node with 2: one is placed, the other waits.
    task = await master.create({"image": "busybox", "command": ["sleep", "60"], "replicas": 2, "gpus": 2})
    await master.wait_states(task["id"], ["Assigned", "Pending"])
    node.report(task["id"], 0, "Running")
    await master.wait_states(task["id"], ["Running", "Pending"])

    listed = await arun_prime("buyer", "tasks", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    ids = {t["id"]: t for t in json.loads(listed.stdout)["tasks"]}
    assert ids[task["id"]]["state"] == "Running"

    table = await arun_prime("buyer", "tasks", env=env)
    assert task["id"] in table.stdout and "1 Running, 1 Pending" in table.stdout

    shown = await arun_prime("buyer", "task", "show", task["id"], "--json", env=env)
    assert json.loads(shown.stdout)["replicas"][0]["node"] == node.address
    detail = await arun_prime("buyer", "task", "show", task["id"], env=env)
    assert "sleep 60" in detail.stdout and node.address in detail.stdout

    stopped = await arun_prime("buyer", "task", "stop", task["id"], env=env)
    assert stopped.returncode == 0, stopped.stderr
    after = await master.task(task["id"])
    assert after["stop_requested"] and after["replicas"][1]["state"] == "Stopped"  # the unplaced one at once
    await eventually(lambda: _async(task["id"] in node.received.stops), what="the stop pushed to the node")

    unknown = await arun_prime("buyer", "task", "show", "deadbeef0000", env=env)
    assert_one_sentence_error(unknown, "no task deadbeef0000")
    not_an_id = await arun_prime("buyer", "task", "show", "../etc", env=env)
    assert_one_sentence_error(not_an_id, "is not a task id")


async def _async(value):
    return value


async def _running(master: RealMaster, spec: dict) -> str:
    """A task whose replicas all run on the healthy node."""
    task = await master.create(spec)
    replicas = spec.get("replicas", 1)
    await master.wait_states(task["id"], ["Assigned"] * replicas)
    for index in range(replicas):
        master.node.report(task["id"], index, "Running")
    await master.wait_states(task["id"], ["Running"] * replicas)
    return task["id"]


async def test_logs_are_prefixed_by_replica_and_follow_gets_late_lines(master, env):
    node = master.node
    task_id = await _running(master, {"image": "busybox", "replicas": 2})
    node.logs[(task_id, 0)] = [
        {"stream": "stdout", "line": "r0 first", "ts": 1.0},
        {"stream": "stdout", "line": "r0 second", "ts": 3.0},
    ]
    node.logs[(task_id, 1)] = [{"stream": "stderr", "line": "r1 warn", "ts": 2.0}]

    plain = await arun_prime("buyer", "logs", task_id, env=env)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.splitlines() == ["[r0] r0 first", "[r1 err] r1 warn", "[r0] r0 second"]

    tail = await arun_prime("buyer", "logs", task_id, "--tail", "1", env=env)
    assert tail.stdout.splitlines() == ["[r0] r0 second"]

    as_json = await arun_prime("buyer", "logs", task_id, "--json", env=env)
    assert [json.loads(line)["line"] for line in as_json.stdout.splitlines()] == ["r0 first", "r1 warn", "r0 second"]

    following = asyncio.ensure_future(arun_prime("buyer", "logs", task_id, "-f", env=env))
    await eventually(lambda: _async(sum(r.get("follow") == "1" for r in node.received.log_requests) >= 2),
                     what="the master following both replicas")
    node.logs[(task_id, 1)].append({"stream": "stdout", "line": "r1 late", "ts": 4.0})
    await asyncio.sleep(0.5)
    for index in (0, 1):  # the containers end: the master ends the stream, and the command with it
        node.report(task_id, index, "Completed", 0)
    await master.wait_states(task_id, ["Completed", "Completed"])
    for key in ((task_id, 0), (task_id, 1)):
        node.follow_open.setdefault(key, asyncio.Event()).set()
    followed = await asyncio.wait_for(following, 60)
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout.splitlines()[-1] == "[r1] r1 late"


async def _synced(master: RealMaster, content: dict[tuple[int, str], bytes], *, replicas: int = 1) -> str:
    """A persistent task whose files the master has synced from the node."""
    task_id = await _running(master, {"image": "busybox", "persistent": True, "replicas": replicas})
    for (replica, path), data in content.items():
        master.node.files.setdefault((task_id, replica), {})[path] = data

    async def listed() -> bool:
        status, body = await master.call("GET", f"/tasks/{task_id}/files")
        return status == 200 and len(body["files"]) == len(content)

    await eventually(listed, what="the files synced to the master")
    return task_id


async def test_files_list_and_download_verify_sha256(master, env, tmp_path):
    content = {"result.txt": b"the answer is 42\n", "ckpt/step 1.bin": bytes(range(256)) * 1000}
    task_id = await _synced(master, {(0, path): data for path, data in content.items()})

    listed = await arun_prime("buyer", "files", task_id, "--json", env=env)
    entries = json.loads(listed.stdout)["files"]
    assert {e["path"]: e["sha256"] for e in entries} == {p: hashlib.sha256(d).hexdigest() for p, d in content.items()}

    out = tmp_path / "out"
    downloaded = await arun_prime("buyer", "files", task_id, "--download", str(out), env=env)
    assert downloaded.returncode == 0, downloaded.stderr
    for path, data in content.items():
        assert (out / path).read_bytes() == data
    assert "Downloaded 2 file(s)" in downloaded.stdout
    assert downloaded.stderr == ""  # not a terminal: no progress bar in the pipe

    again = await arun_prime("buyer", "files", task_id, "--download", str(out), "--json", env=env)
    assert [f["downloaded"] for f in json.loads(again.stdout)["files"]] == [False, False]  # already there, same sha256


async def test_a_download_with_the_wrong_content_is_refused_and_not_saved(master, env, tmp_path):
    data = b"\x01" * 5000
    task_id = await _synced(master, {(0, "model.bin"): data})
    # The master's blob on disk goes bad (same size, other bytes): the master serves what it has.
    digest = hashlib.sha256(data).hexdigest()
    blob = master.data_dir / "blobs" / digest[:2] / digest[2:]
    assert blob.is_file()
    blob.chmod(0o644)
    blob.write_bytes(b"\x02" * 5000)
    out = tmp_path / "out"
    result = await arun_prime("buyer", "files", task_id, "--download", str(out), env=env)
    assert_one_sentence_error(result, "model.bin", "sha256")
    assert not (out / "model.bin").exists()
    assert not [p for p in out.rglob("*") if p.is_file()]  # no partial file left behind


async def test_files_of_several_replicas_go_to_one_dir_each(master, env, tmp_path):
    task_id = await _synced(master, {(0, "out.txt"): b"zero", (1, "out.txt"): b"one"}, replicas=2)
    result = await arun_prime("buyer", "files", task_id, "--download", str(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "replica-0" / "out.txt").read_bytes() == b"zero"
    assert (tmp_path / "replica-1" / "out.txt").read_bytes() == b"one"


async def test_nodes_and_watch_once(master, env):
    await _running(master, {"image": "busybox"})
    listed = await arun_prime("buyer", "nodes", "--json", env=env)
    nodes = {n["address"]: n["state"] for n in json.loads(listed.stdout)["nodes"]}
    assert nodes == {master.node.address: "Healthy", master.quiet.address: "Unhealthy"}

    table = await arun_prime("buyer", "nodes", env=env)
    assert master.node.address in table.stdout and "2× NVIDIA H100" in table.stdout
    assert re.search(r"\b\d+s ago", table.stdout)  # the last heartbeat, as an age

    frame = await arun_prime("buyer", "watch", "--once", env=env)
    assert frame.returncode == 0, frame.stderr
    assert "Nodes (2)" in frame.stdout and "Tasks (" in frame.stdout and "Unhealthy" in frame.stdout


def test_key_file_path_errors_are_one_sentence(tmp_path: Path):
    from tests.roles.buyer.conftest import run_prime

    result = run_prime("buyer", "tasks", "--master-url", "http://127.0.0.1:1", "--key-file", str(tmp_path / "missing.json"))
    assert_one_sentence_error(result, "does not exist")
