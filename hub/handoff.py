"""``--workers N``: each project served by one worker of the machine, by socket hand-off.

Every worker accepts connections on the shared port (``SO_REUSEPORT``: the
kernel picks one). A project is *owned* by worker ``crc32(projectKey) % N``
(``owner``), stable across restarts: a restarted worker keeps its index.
A worker that parses a request head naming a project it does not own
(``project_of``: ``/public/{projectKey}/…`` HTTP routes, ``/ws/agent/{projectKey}``,
OpenReplay's assist HTTP paths ``/assist/{key}/sockets-live|sockets-list/{project}…``
and OpenReplay Socket.IO handshakes of an agent, whose project is the first
part of ``peerId`` in the handshake's query) passes the accepted socket and
every byte read from it so far (pipelined requests included) to the owner,
and forgets the connection without closing it. Trackers (native or
Socket.IO tabs) are never handed off: each worker publishes its own.

The transport is a ``SOCK_SEQPACKET`` Unix socket per worker, in a private
directory (mode 0700) the parent created: one message per connection, the
TCP socket's descriptor passed with ``SCM_RIGHTS`` (``socket.send_fds``), the
bytes inline (up to ``INLINE_MAX``) or in a ``memfd`` passed beside it. A
sender keeps one connection per owner, reconnecting after a failure. The
owner adopts the socket with ``loop.connect_accepted_socket`` and the same
``HttpConnection`` protocol, fed the bytes before anything else it reads.

Rules:

- A connection is handed off at most once: the owner serves whatever it
  adopted (a later request for a third worker's project is answered from
  its mirror), so nothing ever ping-pongs.
- Only a request whose bytes are all unanswered can move: the first of a
  connection, or of a read after the earlier requests were answered (the
  usual keep-alive client). One pipelined behind a request answered here
  is answered here too (``kept``): the bytes before it are spoken for.
- Per-IP admission: the accepting worker admits the connection while it
  reads the head and releases it when it hands it off; the owner admits it
  again, so it counts once, on the worker that serves it (``--max-conns-per-ip``
  is per worker, as before). Responses, limits and connection counts are
  counted by the worker that serves.
- An owner that cannot be reached (restarting, its queue full) costs nothing
  but the mirror: the accepting worker serves the request itself (``failed``).
  An owner listens for hand-offs only once it is ready (bootstrapped).

``hub_handoff_total{result}`` counts ``sent``, ``received``, ``failed`` and
``kept``; ``hub_worker_index`` names the worker a scrape reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import zlib
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

from .http_api import Request, query_params
from .openreplay import split_peer_id

log = logging.getLogger("hub.handoff")

# Bytes sent inline with the descriptor; more go in a memfd passed beside it.
INLINE_MAX: Final = 32 << 10
# Kinds of message: the first byte.
_INLINE: Final = b"I"
_MEMFD: Final = b"M"
# A sender's socket buffer: hand-offs queued for an owner busy elsewhere, ~1 KiB each.
SEND_BUFFER: Final = 1 << 20
# Hand-off connections an owner keeps waiting to be accepted.
BACKLOG: Final = 64
RESULTS: Final = ("sent", "received", "failed", "kept")


@dataclass(frozen=True)
class Workers:
    """This worker's place on the machine: its index and every worker's socket path, by index."""

    index: int
    paths: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.paths)


def owner(project_key: str, count: int) -> int:
    """The index of the worker that serves ``project_key`` among ``count`` workers."""
    return zlib.crc32(project_key.encode("utf-8", "surrogatepass")) % count


def project_of(
    request: Request, socketio_paths: Collection[str], projects: Mapping[str, int] | None
) -> str | None:
    """The project a request's head names, for hand-off; None when it names none (trackers too)."""
    path = request.path
    if path.startswith("/public/"):
        parts = path.split("/", 3)
        return unquote(parts[2]) if len(parts) == 4 else None
    if path.startswith("/ws/agent/"):
        key = path[len("/ws/agent/") :]
        return unquote(key) if key and "/" not in key else None
    if path.startswith("/assist/"):
        parts = path.split("/", 5)
        if len(parts) >= 5 and parts[3] in ("sockets-live", "sockets-list"):
            return unquote(parts[4])
        return None
    if path in socketio_paths and "identity=agent" in request.query:
        query = query_params(request.query)
        peer_id = query.get("peerId", "")
        if query.get("identity") != "agent" or not peer_id:
            return None
        return split_peer_id(peer_id, None, projects)[0]
    return None


class Handoff:
    """One worker's side of hand-offs: sends connections to their owners, adopts the ones sent to it."""

    def __init__(
        self,
        workers: Workers,
        socketio_paths: Collection[str],
        projects: Mapping[str, int] | None,
    ) -> None:
        self.workers = workers
        self.socketio_paths = frozenset(socketio_paths)
        self.projects = projects
        self.counts: Counter[str] = Counter({result: 0 for result in RESULTS})
        # Owner index -> the connected socket this worker sends its hand-offs on.
        self._peers: dict[int, socket.socket] = {}
        self._listener: socket.socket | None = None
        self._accepted: set[socket.socket] = set()
        self._adopting: set[asyncio.Task[None]] = set()
        # Makes the protocol of an adopted connection, fed the bytes read before the hand-off.
        self.adopt: Callable[[bytes], asyncio.Protocol] | None = None

    # -- sending ----------------------------------------------------------------

    def target(self, request: Request) -> int | None:
        """The worker to hand ``request``'s connection to; None to serve it here."""
        project = project_of(request, self.socketio_paths, self.projects)
        if project is None:
            return None
        target = owner(project, self.workers.count)
        return None if target == self.workers.index else target

    def send(self, target: int, fd: int, data: bytes) -> bool:
        """Pass the connection ``fd`` and the bytes read from it to worker ``target``.

        True: the owner has it (the caller forgets it without closing it);
        False: not sent (the caller serves it), counted ``failed``.
        """
        for attempt in range(2):
            peer = self._peer(target)
            if peer is None:
                break
            try:
                _send(peer, fd, data)
            except BlockingIOError:
                break  # its queue is full: serve here, keep the connection to it
            except OSError as exc:
                # The owner went away (restarted): one more try on a new connection.
                self._drop(target)
                if attempt == 0:
                    log.debug("handoff.reconnect", extra={"fields": {"worker": target, "error": str(exc)}})
                    continue
                break
            self.counts["sent"] += 1
            return True
        self.counts["failed"] += 1
        return False

    def _peer(self, target: int) -> socket.socket | None:
        peer = self._peers.get(target)
        if peer is not None:
            return peer
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            peer.setblocking(False)
            peer.connect(self.workers.paths[target])
        except OSError:
            # Not listening (restarting, or not ready yet).
            peer.close()
            return None
        self._peers[target] = peer
        return peer

    def _drop(self, target: int) -> None:
        peer = self._peers.pop(target, None)
        if peer is not None:
            peer.close()

    # -- receiving --------------------------------------------------------------

    def listen(self) -> None:
        """Take hand-offs from the other workers (once this worker is ready to serve them)."""
        path = self.workers.paths[self.workers.index]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a previous run of this worker's
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(BACKLOG)
        listener.setblocking(False)
        self._listener = listener
        asyncio.get_running_loop().add_reader(listener.fileno(), self._accept)
        log.info("handoff.listening", extra={"fields": {"worker": self.workers.index, "path": path}})

    def close(self) -> None:
        """Take no more hand-offs (a drain): senders serve their connections themselves."""
        loop = asyncio.get_running_loop()
        listener, self._listener = self._listener, None
        if listener is not None:
            loop.remove_reader(listener.fileno())
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.workers.paths[self.workers.index])
        for conn in list(self._accepted):
            # Connections already sent here are adopted (the drain then closes them as its own).
            self._receive(conn)
            if conn in self._accepted:
                loop.remove_reader(conn.fileno())
                conn.close()
        self._accepted.clear()
        for target in list(self._peers):
            self._drop(target)

    def _accept(self) -> None:
        listener = self._listener
        if listener is None:
            return
        while True:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("handoff.accept_failed", extra={"fields": {"error": str(exc)}})
                return
            conn.setblocking(False)
            self._accepted.add(conn)
            asyncio.get_running_loop().add_reader(conn.fileno(), self._receive, conn)

    def _receive(self, conn: socket.socket) -> None:
        while True:
            try:
                msg, fds, flags, _ = socket.recv_fds(conn, INLINE_MAX + 1, 2)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                msg, fds, flags = b"", [], 0
            if not msg and not fds:
                # The sender went away.
                asyncio.get_running_loop().remove_reader(conn.fileno())
                self._accepted.discard(conn)
                conn.close()
                return
            self._message(msg, fds, flags)

    def _message(self, msg: bytes, fds: list[int], flags: int) -> None:
        data: bytes | None = None
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) == 0:
            if msg[:1] == _INLINE and len(fds) == 1:
                data = msg[1:]
            elif msg[:1] == _MEMFD and len(fds) == 2:
                data = _read_memfd(fds.pop())
        if data is None:
            log.warning("handoff.bad_message", extra={"fields": {"bytes": len(msg), "fds": len(fds)}})
            for fd in fds:
                os.close(fd)
            return
        try:
            sock = socket.socket(fileno=fds[0])
        except OSError:
            os.close(fds[0])
            return
        if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
            sock.close()
            return
        sock.setblocking(False)
        self.counts["received"] += 1
        task = asyncio.get_running_loop().create_task(self._adopt(sock, data))
        self._adopting.add(task)
        task.add_done_callback(self._adopting.discard)

    async def _adopt(self, sock: socket.socket, data: bytes) -> None:
        adopt = self.adopt
        assert adopt is not None
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: adopt(data), sock)
        except OSError as exc:
            log.warning("handoff.adopt_failed", extra={"fields": {"error": str(exc)}})
            sock.close()


def _send(peer: socket.socket, fd: int, data: bytes) -> None:
    if len(data) <= INLINE_MAX:
        socket.send_fds(peer, [_INLINE + data], [fd], socket.MSG_NOSIGNAL)
        return
    memfd = os.memfd_create("hub-handoff", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(memfd, view) :]
        socket.send_fds(peer, [_MEMFD], [fd, memfd], socket.MSG_NOSIGNAL)
    finally:
        os.close(memfd)


def _read_memfd(fd: int) -> bytes | None:
    try:
        size = os.fstat(fd).st_size
        return os.pread(fd, size, 0) if size else None
    except OSError:
        return None
    finally:
        os.close(fd)
