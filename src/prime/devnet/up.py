"""`prime devnet up` and `down`: a whole local network from one command, and back to nothing.

up: anvil → registry deployed (admin), VALIDATOR_ROLE granted, a run created by the owner with
requirements this machine meets and the devnet's discovery as its discovery URI → discovery,
validator and master as background processes (pid files, logs) → each /health answered →
devnet.json and an env file. A devnet that is already up is left exactly as it is.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from prime.chain.anvil import DEFAULT_CHAIN_ID, DEV_MNEMONIC, NO_DISK_STATES, find_anvil, port_is_free
from prime.chain.types import Requirements
from prime.clients.discovery import discovery_uri
from prime.config import DEFAULT_PORTS as ROLE_PORTS
from prime.devnet.keys import DevKey, ensure_dev_keys
from prime.devnet.processes import (
    ProcessRecord,
    child_env,
    is_alive,
    prime_command,
    start_process,
    stop_process,
    wait_for_rpc,
    wait_until_healthy,
)
from prime.devnet.state import (
    PASSWORD,
    PROCESSES,
    SERVICES,
    DevnetInfo,
    DevnetPaths,
    Service,
    env_file_text,
    write_atomic,
)
from prime.errors import PrimeError

HOST = "127.0.0.1"
ANVIL_PORT = 8545  # the port of prime.config.DEFAULT_RPC_URL
# The roles' own default ports (prime.config), so a devnet role listens where `prime <role> start` would.
DEFAULT_PORTS = {"anvil": ANVIL_PORT, **ROLE_PORTS}
SKIPPABLE = ("discovery", "validator", "master")
DEFAULT_MIN_STAKE_WEI = 10**16  # 0.01 ETH; the provider has 10 000 dev ETH
# What every machine that can run the devnet has: the run must accept the local miner.
DEVNET_REQUIREMENTS = Requirements(min_gpus=0, gpu_model="", min_gpu_memory_mib=0, min_cpu_cores=1, min_ram_mib=256, min_disk_gib=0, max_nodes=0)
ROLE_ENV = {"PRIME_KEY_PASSWORD": PASSWORD, "PRIME_PROVIDER_KEY_PASSWORD": PASSWORD}


@dataclass
class UpOptions:
    ports: dict[str, int | None] = field(default_factory=dict)  # None: the default port, or a free one if it is taken
    skip: set[str] = field(default_factory=set)
    min_stake_wei: int = DEFAULT_MIN_STAKE_WEI
    heartbeat_interval_s: float = 5.0
    health_timeout_s: float = 120.0


@dataclass
class UpResult:
    info: DevnetInfo
    already_up: bool
    moved_ports: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (default, chosen)


# --- state of an existing devnet ----------------------------------------------------------------


def process_states(paths: DevnetPaths, names: Iterable[str] = PROCESSES) -> dict[str, tuple[ProcessRecord | None, bool]]:
    """name -> (its pid file record, alive and still that process)."""
    states = {}
    for name in names:
        record = ProcessRecord.load(paths, name)
        states[name] = (record, is_alive(record))
    return states


def expected_services(info: DevnetInfo) -> list[str]:
    return [name for name in SERVICES if name in info.services and not info.services[name].skipped]


# --- ports --------------------------------------------------------------------------------------


def choose_ports(requested: dict[str, int | None], names: Iterable[str]) -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
    """A port per service: the one asked for (must be free), else the default, else a free one."""
    from prime.chain.anvil import free_port

    chosen: dict[str, int] = {}
    moved: dict[str, tuple[int, int]] = {}
    for name in names:
        asked = requested.get(name)
        if asked is not None:
            if not port_is_free(HOST, asked) or asked in chosen.values():
                raise PrimeError(f"Port {asked} for the devnet's {name} is in use; stop what uses it or pick another --{name}-port.")
            chosen[name] = asked
            continue
        default = DEFAULT_PORTS[name]
        if port_is_free(HOST, default) and default not in chosen.values():
            chosen[name] = default
            continue
        port = free_port(HOST)
        while port in chosen.values():
            port = free_port(HOST)
        chosen[name] = port
        moved[name] = (default, port)
    return chosen, moved


def url(port: int) -> str:
    return f"http://{HOST}:{port}"


# --- commands of the services -------------------------------------------------------------------


def anvil_command(paths: DevnetPaths, port: int) -> list[str]:
    return [
        str(find_anvil()), "--host", HOST, "--port", str(port), "--chain-id", str(DEFAULT_CHAIN_ID),
        "--accounts", "10", "--balance", "10000", "--mnemonic", DEV_MNEMONIC, *NO_DISK_STATES,
        # Also names the state dir in anvil's command line, so a scan for it finds anvil too.
        "--config-out", str(paths.root / "anvil.json"),
    ]


def service_command(name: str, info: DevnetInfo, paths: DevnetPaths, *, heartbeat_interval_s: float = 5.0) -> list[str]:
    """`prime <role> start …` with every option explicit (see wave-2 CLI options)."""
    port = str(info.services[name].port)
    common = ["--rpc-url", info.rpc_url, "--deployment", info.deployment, "--data-dir", str(paths.data(name))]
    if name == "discovery":
        return prime_command("discovery", "start", "--host", HOST, "--port", port, "--key-file", info.key_file("discovery"), *common)
    if name == "validator":
        return prime_command(
            "validator", "start", "--host", HOST, "--port", port, "--key-file", info.key_file("validator"),
            "--poll-interval", "1", *common,
        )
    if name == "master":
        return prime_command(
            "master", "start", "--run-id", str(info.run_id), "--host", HOST, "--port", port,
            "--public-url", info.url("master"), "--key-file", info.key_file("master"),
            "--heartbeat-interval", f"{heartbeat_interval_s:g}", "--poll-interval", "1", "--sync-interval", "5", *common,
        )
    raise ValueError(name)


def miner_command(info: DevnetInfo, paths: DevnetPaths, *, gpu: str = "none", task_network: str | None = None,
                  task_ports: str | None = None) -> list[str]:
    command = prime_command(
        "miner", "start", "--run-id", str(info.run_id), "--gpu", gpu, "--host", HOST,
        "--port", str(info.services["miner"].port), "--public-ip", HOST,
        "--key-file", info.key_file("node"), "--provider-key-file", info.key_file("provider"),
        "--rpc-url", info.rpc_url, "--deployment", info.deployment, "--data-dir", str(paths.data("miner")),
        "--chain-poll-interval", "1",
    )
    if task_network:
        command += ["--task-network", task_network]
    if task_ports:  # checked by the miner itself (one sentence when wrong)
        command += ["--task-ports", task_ports]
    return command


# --- up -----------------------------------------------------------------------------------------


def up(paths: DevnetPaths, options: UpOptions, *, log=print) -> UpResult:
    """Bring the devnet up, or leave a running one alone. The caller holds the devnet lock."""
    unknown = options.skip - set(SKIPPABLE)
    if unknown:
        raise PrimeError(f"--skip {sorted(unknown)[0]} is not a devnet service; choose from {', '.join(SKIPPABLE)}.")
    existing = DevnetInfo.load(paths)
    states = process_states(paths)
    alive = [name for name, (_record, ok) in states.items() if ok]
    if existing is not None and alive:
        wanted = expected_services(existing)
        if all(states[name][1] for name in wanted):
            return UpResult(existing, already_up=True)
        dead = [name for name in wanted if not states[name][1]]
        raise PrimeError(
            f"The devnet in {paths.root} is only partly up ({', '.join(dead)} not running); "
            "run `prime devnet down` and then `prime devnet up`."
        )
    if alive:  # pid files without devnet.json: leftovers of an interrupted up
        for name in alive:
            stop_process(paths, name)

    _fresh_state(paths)
    keys = ensure_dev_keys(paths)
    ports, moved = choose_ports(options.ports, [*SERVICES, "miner"])
    started: list[str] = []
    try:
        info = _start_chain(paths, keys, ports, options, log, started)
        for name in SKIPPABLE:
            info.commands[name] = service_command(name, info, paths, heartbeat_interval_s=options.heartbeat_interval_s)
        info.save(paths)
        write_atomic(paths.env_file, env_file_text(info))
        env = child_env(paths, ROLE_ENV)
        records = {}
        for name in SKIPPABLE:
            if name in options.skip:
                continue
            records[name] = start_process(paths, name, info.commands[name], env=env, port=ports[name], url=info.url(name))
            started.append(name)
        for name, record in records.items():
            log(f"waiting for the {name} at {record.url} …")
            wait_until_healthy(record, f"{record.url}/health", timeout_s=options.health_timeout_s, what=name)
    except BaseException:
        for name in reversed(started):
            stop_process(paths, name)
        raise
    return UpResult(info, already_up=False, moved_ports=moved)


def _fresh_state(paths: DevnetPaths) -> None:
    """A new chain means new role state: old data dirs would hold a stale cursor and run id."""
    paths.root.mkdir(parents=True, exist_ok=True)
    for directory in (paths.root / "data", paths.logs, paths.run, paths.home):
        shutil.rmtree(directory, ignore_errors=True)
    for stale in (paths.info, paths.deployment, paths.env_file, paths.root / "anvil.json"):
        stale.unlink(missing_ok=True)
    for directory in (paths.logs, paths.run, paths.home):
        directory.mkdir(parents=True, exist_ok=True)


def _start_chain(paths: DevnetPaths, keys: dict[str, DevKey], ports: dict[str, int], options: UpOptions, log, started: list[str]) -> DevnetInfo:
    rpc_url = url(ports["anvil"])
    anvil = start_process(paths, "anvil", anvil_command(paths, ports["anvil"]), env=child_env(paths), port=ports["anvil"], url=rpc_url)
    started.append("anvil")
    wait_for_rpc(anvil, rpc_url, DEFAULT_CHAIN_ID, timeout_s=30)
    log(f"anvil is up at {rpc_url}; deploying the registry …")
    discovery = discovery_uri(url(ports["discovery"]), keys["discovery"].address)  # its signer named on chain
    deployment, run_id = asyncio.run(_deploy(rpc_url, keys, discovery, options.min_stake_wei))
    saved = deployment.save(paths.deployment)
    services = {name: Service(port, url(port), skipped=name in options.skip) for name, port in ports.items()}
    return DevnetInfo(
        state_dir=str(paths.root),
        rpc_url=rpc_url,
        chain_id=deployment.chain_id,
        registry=deployment.registry,
        deployment=str(saved.path),
        run_id=run_id,
        keys={role: {"address": key.address, "key_file": key.key_file} for role, key in keys.items()},
        services=services,
        node_address=keys["node"].address,
        created_at=time.time(),
    )


async def _deploy(rpc_url: str, keys: dict[str, DevKey], discovery_url: str, min_stake_wei: int):
    from prime.chain.client import RegistryClient
    from prime.chain.deploy import deploy_registry

    deployment = await deploy_registry(rpc_url, keys["admin"].account, min_stake_wei=min_stake_wei)
    async with await RegistryClient.connect(rpc_url, deployment, keys["admin"].account) as admin:
        await admin.grant_validator(keys["validator"].address)
        owner = admin.with_account(keys["owner"].account)
        run_id = await owner.create_run(DEVNET_REQUIREMENTS, discovery_url, [keys["master"].address])
    return deployment, run_id


# --- down ---------------------------------------------------------------------------------------


@dataclass
class DownResult:
    stopped: dict[str, str]  # process -> what happened
    containers_removed: int | None  # None: Docker was not reachable (nothing to remove there)
    container_note: str = ""


def down(paths: DevnetPaths) -> DownResult:
    """Stop every process this devnet started (miner first, chain last) and its node's containers."""
    stopped = {}
    for name in reversed(PROCESSES):
        stopped[name] = stop_process(paths, name)
    info = DevnetInfo.load(paths) if paths.info.exists() else None
    removed: int | None = None
    note = ""
    if info is not None:
        try:
            from prime.devnet.images import docker_client, remove_node_containers

            client = docker_client()
            try:
                removed = remove_node_containers(client, info.node_address)
            finally:
                client.close()
        except PrimeError as exc:
            note = exc.message
    return DownResult(stopped, removed, note)
