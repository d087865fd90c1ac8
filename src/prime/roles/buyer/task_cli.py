"""`prime buyer task create|show|stop`: one task through the run's master (signed by the owner key).

``create`` builds the TaskSpec from its options (spec.py) and sends it; with ``--nodes N[:M]``
it is a group task (issue 15): one member on each of N..M nodes, started together, each with
``--gpus-per-node`` GPUs and the environment torchrun reads (see the README, "Distributed
training"). Every refusal is one sentence, before anything is sent.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console

from prime.config import DEFAULT_PASSWORD_ENV, KeyFile, PasswordEnv
from prime.roles.buyer.common import JsonOutput, MasterUrl, TaskId, console, echo_json, with_master

task_app = typer.Typer(no_args_is_help=True, help="Create, show and stop tasks through the run's master.")


@task_app.command("create")
def task_create(
    image: Annotated[str, typer.Option("--image", help="Container image, e.g. ghcr.io/org/trainer:1.2.")],
    args: Annotated[Optional[list[str]], typer.Argument(help="The command, after -- (or use --cmd).", show_default=False)] = None,
    cmd: Annotated[Optional[str], typer.Option("--cmd", help='The command as one string, split like a shell: --cmd "python train.py --lr 0.1".')] = None,
    env: Annotated[Optional[list[str]], typer.Option("--env", help="Environment variable NAME=VALUE (repeatable).")] = None,
    gpus: Annotated[Optional[str], typer.Option("--gpus", help="GPUs per replica: a number, or 'all' (every GPU of one node); default 0.", show_default=False)] = None,
    replicas: Annotated[int, typer.Option("--replicas", min=1, help="How many copies to run (each on its own GPUs).")] = 1,
    persistent: Annotated[bool, typer.Option("--persistent/--no-persistent", help="Keep /data and let the master sync it (see `prime buyer files`).")] = False,
    cpu_limit: Annotated[Optional[float], typer.Option("--cpu-limit", help="CPUs per replica (e.g. 2.5); default no limit.")] = None,
    memory_limit_mib: Annotated[Optional[int], typer.Option("--memory-limit-mib", help="Memory per replica in MiB; default no limit.")] = None,
    restart: Annotated[str, typer.Option("--restart", help="never | on-failure (restarted with backoff).")] = "never",
    nodes: Annotated[Optional[str], typer.Option("--nodes", help="A group task: one member on each of N nodes (N), or of N to M nodes (N:M), started together.", show_default=False)] = None,
    gpus_per_node: Annotated[Optional[int], typer.Option("--gpus-per-node", min=0, help="A group task's GPUs on each node (its --gpus).", show_default=False)] = None,
    same_gpu_model: Annotated[bool, typer.Option("--same-gpu-model", help="A group task: every member on the same GPU model.")] = False,
    start_timeout: Annotated[Optional[str], typer.Option("--start-timeout", help="A group task: how long to wait for enough nodes (90s, 5m, 1h30m; default 5m).", show_default=False)] = None,
    max_restarts: Annotated[Optional[int], typer.Option("--max-restarts", min=0, help="A group task: how often the whole group is started again after a failure (default 3).", show_default=False)] = None,
    restart_backoff: Annotated[Optional[str], typer.Option("--restart-backoff", help="A group task: the wait before a second restart, doubling for each later one (the first is at once; default 5s).", show_default=False)] = None,
    master_url: MasterUrl = None,
    key_file: KeyFile = None,
    password_env: PasswordEnv = DEFAULT_PASSWORD_ENV,
    json_output: JsonOutput = False,
) -> None:
    """Create a task: e.g. `prime buyer task create --image busybox --persistent -- sh -c 'echo hi > /data/out'`;
    a group task for torchrun: `prime buyer task create --nodes 2 --gpus-per-node 8 --image IMAGE -- torchrun train.py`."""
    from prime.roles.buyer.render import task_summary
    from prime.roles.buyer.spec import build_task_spec, group_options, parse_command, parse_env

    spec_gpus, group = group_options(
        nodes=nodes, gpus=gpus, gpus_per_node=gpus_per_node, same_gpu_model=same_gpu_model,
        start_timeout=start_timeout, max_restarts=max_restarts, restart_backoff=restart_backoff, replicas=replicas,
        restart=restart,
    )
    spec = build_task_spec(
        image=image,
        command=parse_command(cmd, args),
        env=parse_env(env or []),
        gpus=spec_gpus,
        replicas=replicas,
        persistent=persistent,
        cpu_limit=cpu_limit,
        memory_limit_mib=memory_limit_mib,
        restart=restart,
        group=group,
    )
    task = with_master(master_url, key_file, password_env, lambda master: master.create_task(spec))
    if json_output:
        echo_json(task)
        return
    typer.echo(task["id"])
    Console(stderr=True, soft_wrap=True).print(
        f"Task {task['id']} created ({task.get('state', '?')}: {task_summary(task)}); "
        f"follow it with `prime buyer logs {task['id']} -f`.",
        highlight=False,
    )


@task_app.command("show")
def task_show(
    task_id: TaskId,
    master_url: MasterUrl = None,
    key_file: KeyFile = None,
    password_env: PasswordEnv = DEFAULT_PASSWORD_ENV,
    json_output: JsonOutput = False,
) -> None:
    """Show one task: its spec and each replica's node, state and exit code (a group task: its phase,
    attempt and members)."""
    from prime.roles.buyer.render import task_detail

    task = with_master(master_url, key_file, password_env, lambda master: master.get_task(task_id))
    if json_output:
        echo_json(task)
    else:
        console().print(task_detail(task))


@task_app.command("stop")
def task_stop(
    task_id: TaskId,
    master_url: MasterUrl = None,
    key_file: KeyFile = None,
    password_env: PasswordEnv = DEFAULT_PASSWORD_ENV,
    json_output: JsonOutput = False,
) -> None:
    """Stop every replica of a task (its synced files stay readable)."""
    answer = with_master(master_url, key_file, password_env, lambda master: master.stop_task(task_id))
    if json_output:
        echo_json(answer if answer is not None else {"id": task_id, "stop_requested": True})
        return
    typer.echo(f"Stop requested for task {task_id}; its replicas stop at their nodes' next heartbeat.")
