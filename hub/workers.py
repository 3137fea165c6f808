"""``--workers N``: N hub processes on one port, each a node of the Redis cluster.

Each worker listens on its own ``SO_REUSEPORT`` socket, so the kernel
spreads new connections over them; each is a cluster node named
``<node-id>-<i>``. A project is served by one worker, ``crc32(key) % N``:
the others hand its searches and agent connections over (``handoff.py``,
through one Unix socket per worker in a private directory the parent
makes). The parent only supervises: it forwards SIGTERM/SIGINT (every
worker drains and exits 0) and restarts a worker that died (it comes back
under its name and index with a new epoch, so peers drop what the dead
process held).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import replace
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from .app import BindError, run
from .cluster import default_node_id
from .config import Settings
from .handoff import Workers

log = logging.getLogger("hub.workers")

# A worker dying sooner than this after its start is not restarted in a loop.
MIN_UPTIME_S = 2.0
# Bytes of a Unix socket path at most (sun_path, with its NUL).
UNIX_PATH_MAX = 107
# prctl(2): the signal a process gets when its parent dies.
PR_SET_PDEATHSIG = 1


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` that other processes may bind too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise BindError(f"cannot listen on {host}:{port}: {reason}") from exc
    return sock


def _die_with(parent: int) -> None:
    """SIGTERM (a drain) when the parent dies, even by SIGKILL: no worker serves the port alone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return  # not Linux
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)  # it died before that


def _worker(settings: Settings, backend: dict[str, Any], workers: Workers, parent: int) -> None:
    # The parent's handlers are not ours: the hub handles its own signals.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _die_with(parent)
    fields = {"worker": workers.index, "pid": os.getpid(), "node": settings.node_id}
    log.info("workers.worker", extra={"fields": fields})
    sock = reuseport_socket(settings.host, settings.port)
    sock.listen(settings.backlog)
    sock.setblocking(False)
    run(settings, sock, workers=workers, **backend)


def handoff_paths(count: int) -> tuple[str, tuple[str, ...]]:
    """A new private directory (mode 0700) and a Unix socket path in it for each worker."""
    directory = tempfile.mkdtemp(prefix="hub-workers-")
    paths = tuple(os.path.join(directory, f"w{i}.sock") for i in range(count))
    if len(os.fsencode(paths[-1])) > UNIX_PATH_MAX:
        shutil.rmtree(directory, ignore_errors=True)
        raise BindError(f"{directory}: too long a path for a Unix socket; set TMPDIR to a shorter one")
    return directory, paths


def run_workers(settings: Settings, backend: dict[str, Any]) -> int:
    """Start and supervise ``settings.workers`` worker processes; 0 after a clean stop."""
    # Bound, never listening: fixes the port (``--port 0`` too) and fails
    # fast when it is taken; connections only go to listening sockets.
    anchor = reuseport_socket(settings.host, settings.port)
    port = anchor.getsockname()[1]
    base = settings.node_id or default_node_id()
    context = multiprocessing.get_context("fork")
    stopping = False
    try:
        directory, paths = handoff_paths(settings.workers)
    except BindError:
        anchor.close()
        raise

    def start(i: int) -> BaseProcess:
        worker_settings = replace(settings, port=port, workers=1, node_id=f"{base}-{i}")
        args = (worker_settings, backend, Workers(i, paths), os.getpid())
        proc = context.Process(target=_worker, args=args, name=f"hub-worker-{i}")
        proc.start()
        return proc

    procs = {i: start(i) for i in range(settings.workers)}
    started = {i: time.monotonic() for i in procs}
    log.info("workers.started", extra={"fields": {"workers": len(procs), "port": port, "node": base}})

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs.values():
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    failed = False
    while procs:
        wait([p.sentinel for p in procs.values()])
        for i, proc in list(procs.items()):
            if proc.is_alive():
                continue
            proc.join()
            del procs[i]
            if stopping:
                failed = failed or proc.exitcode != 0
                continue
            log.error("workers.died", extra={"fields": {"worker": i, "exit_code": proc.exitcode}})
            if time.monotonic() - started[i] < MIN_UPTIME_S:
                failed = True
                stop(signal.SIGTERM, None)
                continue
            procs[i] = start(i)
            started[i] = time.monotonic()
    anchor.close()
    shutil.rmtree(directory, ignore_errors=True)
    return 1 if failed else 0
