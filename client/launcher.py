"""The warm ClientApp launcher beside a SuperNode in ``process`` isolation.

How Flower 1.42 runs a ClientApp: the SuperNode keeps each message it pulls as a *task* on
its Runtime API; an executor acquires the task (``AcquireTask``) and gets a token for it;
``flwr-clientapp --token`` pulls that one task's message, runs the ClientApp, pushes the
reply and exits. One token is one message: no ``flwr-clientapp`` serves a second one. In
the default ``subprocess`` isolation the SuperNode starts ``flower-superexec`` itself, which
polls every second and launches a fresh ``flwr-clientapp`` per task, and each of those
imports Flower, torch, Opacus and cmdfed again before it trains (about 7 s of CPU here).

With ``--isolation process`` the SuperNode starts no executor, and this launcher is it: it
imports all of that once, then polls the Runtime API as ``flower-superexec`` does and, for
each ClientApp task, forks a child that runs Flower's own ClientApp runtime
(``run_clientapp``, what ``flwr-clientapp`` runs) with the task's token. Every message
still runs in a process of its own that exits after replying, so memory, CUDA state and
crashes stay per message; only the imports are shared. The launcher never runs a tensor
operation or touches CUDA, which is what makes forking it safe, and it starts no thread.

A child forgets the ``client`` package first, so the ClientApp is imported from the app the
server submitted (Flower puts the installed FAB first on ``sys.path``, as for
``flwr-clientapp``), not from this installation; cmdfed and the libraries come preloaded.

    python -m client.launcher --runtime-api-address 127.0.0.1:PORT --supernode-pid PID --ready-file PATH

``client.supernode.SuperNode(isolation="process")`` starts it, waits for ``--ready-file``,
and stops it with the SuperNode; it exits by itself once the SuperNode's process is gone.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

POLL_SECONDS = 0.25  # flower-superexec's default is 1 s


def preload() -> None:
    """Import what each ClientApp process would import (torch, Opacus, cmdfed, Flower)."""
    import flwr.supernode.runtime.run_clientapp  # noqa: F401
    import torch
    import torch._dynamo  # torch.optim imports it on the first optimiser: seconds

    import client.client_app  # noqa: F401

    if torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised while preloading; a forked ClientApp could not use it")


def serve(runtime_api_address: str, supernode_pid: int, poll_seconds: float = POLL_SECONDS) -> None:
    """Acquire ClientApp tasks from the SuperNode's Runtime API and fork one child per task,
    until the SuperNode's process is gone."""
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    runtime = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
    )
    children: dict[int, int] = {}  # pid -> task id
    try:
        while _alive(supernode_pid):
            _reap(children)
            try:
                reply = runtime.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            except httpx.TransportError:  # the SuperNode is stopping (or busy): ask again while it lives
                time.sleep(1.0)
                continue
            if reply.HasField("task") and reply.token:
                sys.stdout.flush()
                pid = os.fork()
                if pid == 0:
                    _run_task(runtime_api_address, reply.token)
                children[pid] = reply.task.task_id
                print(f"cmdfed launcher: task {reply.task.task_id} runs in process {pid}", flush=True)
            time.sleep(poll_seconds)
    finally:
        runtime.close()


def _run_task(runtime_api_address: str, token: str) -> None:
    """In the forked child: Flower's ClientApp runtime for one task, then exit (never returns)."""
    code = 1
    try:
        for name in [m for m in sys.modules if m == "client" or m.startswith("client.")]:
            del sys.modules[name]
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        run_clientapp(
            runtime_api_address=runtime_api_address,
            token=token,
            insecure=True,
            certificates=None,
            runtime_dependency_install=False,
        )
        code = 0
    except SystemExit as exc:  # Flower ends the runtime with sys.exit(0 or 1)
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - the forked child reports anything, then always leaves through os._exit
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _reap(children: dict[int, int]) -> None:
    for pid in list(children):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            task = children.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                print(f"cmdfed launcher: task {task} (process {pid}) ended with code {code}; see above", flush=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Warm ClientApp launcher for a SuperNode started with --isolation process."
    )
    parser.add_argument("--runtime-api-address", required=True, help="The SuperNode's Runtime API, host:port.")
    parser.add_argument("--supernode-pid", type=int, required=True, help="Exit once this process is gone.")
    parser.add_argument("--ready-file", type=Path, required=True, help="Created once the imports are done.")
    args = parser.parse_args()
    if not hasattr(os, "fork"):
        sys.exit("cmdfed launcher: process isolation forks a process per message; this system has no fork()")
    preload()
    args.ready_file.touch()
    print(f"cmdfed launcher: ready for ClientApp tasks from {args.runtime_api_address}", flush=True)
    serve(args.runtime_api_address, args.supernode_pid)


if __name__ == "__main__":
    main()
