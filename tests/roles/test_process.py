"""prime.roles.process, in process: the data dir lock and marker, logging, serving until stopped.

(The same in real processes: tests/roles/discovery/test_data_dir.py.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from prime.errors import PrimeError
from prime.roles.process import (
    configure_logging,
    open_data_dir,
    serve_until_stopped,
    serving,
)
from tests.fixtures.processes import free_port


def test_the_lock_is_exclusive_across_processes_and_freed_on_close(tmp_path: Path):
    with open_data_dir(tmp_path / "d", "miner") as data:
        assert data.locked and data.saved == {"role": "miner"}
        holder = (
            "from prime.roles.process import open_data_dir\n"
            "from prime.errors import PrimeError\n"
            "try:\n"
            f"    open_data_dir({str(tmp_path / 'd')!r}, 'miner')\n"
            "except PrimeError as e:\n"
            "    print(e)\n"
        )
        refused = subprocess.run([sys.executable, "-c", holder], check=False, capture_output=True, text=True, timeout=30)
        assert refused.stdout.strip() == (f"Another miner (pid {os.getpid()}) is already running with data directory "
                                          f"{tmp_path / 'd'}; stop it or pass another --data-dir.")
    assert not data.locked
    open_data_dir(tmp_path / "d", "miner").close()  # free again


def test_the_marker_keeps_role_and_identity(tmp_path: Path):
    identity = {"chain_id": 31337, "registry": "0xabc", "run_id": 1}
    open_data_dir(tmp_path, "master", identity=identity).close()
    assert json.loads((tmp_path / "role.json").read_text()) == {"role": "master", **identity}
    open_data_dir(tmp_path, "master", identity=identity).close()  # the same identity: fine
    with pytest.raises(PrimeError) as other_run:
        open_data_dir(tmp_path, "master", identity={**identity, "run_id": 2})
    assert other_run.value.message == (f"The data directory {tmp_path} holds the state of chain_id 31337, registry 0xabc, "
                                       "run_id 1, not run_id 2; pass another --data-dir for this one.")
    with pytest.raises(PrimeError, match="belongs to a master, not a miner"):
        open_data_dir(tmp_path, "miner")
    # a failed open does not keep the lock
    open_data_dir(tmp_path, "master", identity=identity).close()


def test_an_older_marker_without_role_is_adopted(tmp_path: Path):
    (tmp_path / "run.json").write_text(json.dumps({"chain_id": 1, "registry": "0xr", "run_id": 3}))
    with open_data_dir(tmp_path, "master", identity={"chain_id": 1, "registry": "0xr", "run_id": 3}, marker="run.json") as data:
        assert data.saved["role"] == "master"
    (tmp_path / "role.json").write_text("{not json")
    with pytest.raises(PrimeError, match="role.json is not valid JSON"):
        open_data_dir(tmp_path, "master")


def test_configure_logging_quiets_chatty_loggers(monkeypatch):
    monkeypatch.delenv("PRIME_DEBUG", raising=False)
    logging.getLogger("aiohttp.access").setLevel(logging.NOTSET)
    configure_logging()
    assert logging.getLogger("aiohttp.access").level == logging.WARNING


async def test_serve_until_stopped_serves_then_cleans_up():
    cleaned = []
    app = web.Application()
    app.router.add_get("/ping", _pong)
    app.on_cleanup.append(lambda app: _note(cleaned))
    stop = asyncio.Event()
    ports: list[int] = []
    task = asyncio.create_task(serve_until_stopped(app, host="127.0.0.1", port=0, on_listening=ports.append, stop=stop))
    while not ports:
        await asyncio.sleep(0.01)
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{ports[0]}/ping") as answer:
        assert await answer.json() == {"pong": True}
    stop.set()
    await asyncio.wait_for(task, 10)
    assert cleaned == [True]


async def _pong(request: web.Request) -> web.Response:
    return web.json_response({"pong": True})


async def _note(cleaned: list[bool]) -> None:
    cleaned.append(True)


async def test_a_busy_port_is_one_sentence():
    port = free_port()
    async with serving(web.Application(), host="127.0.0.1", port=port):
        with pytest.raises(PrimeError, match=f"Port {port} on 127.0.0.1 is already in use"):
            async with serving(web.Application(), host="127.0.0.1", port=port):
                pass


def test_every_role_defaults_to_its_own_port_from_config():
    from prime.config import DEFAULT_PORTS
    from prime.devnet import up as devnet
    from prime.roles.discovery import cli as discovery
    from prime.roles.master import cli as master
    from prime.roles.miner import cli as miner
    from prime.roles.miner import node
    from prime.roles.validator import cli as validator

    defaults = {"discovery": discovery.DEFAULT_PORT, "validator": validator.DEFAULT_PORT,
                "master": master.DEFAULT_PORT, "miner": miner.DEFAULT_PORT}
    assert defaults == DEFAULT_PORTS and node.DEFAULT_PORT == miner.DEFAULT_PORT
    assert len(set(defaults.values())) == len(defaults)  # every role on one machine without --port
    assert master.DEFAULT_MASTER_URL == f"http://127.0.0.1:{DEFAULT_PORTS['master']}"
    assert {k: v for k, v in devnet.DEFAULT_PORTS.items() if k != "anvil"} == DEFAULT_PORTS  # the devnet's are the same
