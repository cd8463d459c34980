"""The block node server (`hafs node`): one backing directory served over HTTP/1.1.

With ``--tls-cert FILE --tls-key FILE`` the node serves HTTPS instead (every
endpoint, /metrics and /ping too, on the one port): each connection is a
trio.SSLStream over the accepted socket, h11 on top as without TLS. The
handshake is part of the connection's first read, so it is bounded like a
request head (HEAD_TIMEOUT_S) and counts as unauthenticated. A client that
speaks plain HTTP to it gets a plain 400 saying to use https://; a failed
handshake (a client that does not trust the certificate) is logged at debug
level and closed. SIGHUP loads the certificate and key again (renewal; a pair
that cannot be used keeps the old one, TLS-KEPT), for connections from then on.

A node serves the `DirStore` of one backing directory to the `RemoteStore`
clients of a filesystem (hafs.remote). It never trusts a request: ids are
checked before any path is made, bodies must hash to their id, sizes are
bounded, and with a token every request must carry it.

Endpoints (every answer to an authorised request carries ``Hafs-Node-Id`` and
``Hafs-Fs-Uuid``, both empty while the node is unclaimed; error bodies are JSON
``{"error": "..."}``):

    PUT    /blocks/<id>   store the body as block <id>: 204 stored (durable: DirStore.put);
                          422 the body does not hash to <id>, nothing stored;
                          413 larger than MAX_SIZE: refused from Content-Length before
                          the body is read, or as soon as a streamed body exceeds it;
                          507 the disk is full; 500 another disk error
    GET    /blocks/<id>   200 the block's verified bytes; 404 not here; 410 it failed its
                          hash (moved aside to corrupt/, logged BLOCK-CORRUPT, never served)
    HEAD   /blocks/<id>   200 with Content-Length, Hafs-Size and Hafs-Mtime-Ns; 404 not here
    DELETE /blocks/<id>   204 deleted (durable); 404 was not here; 403 the node records an
                          owner (a metadata store: hafs.store.owner) and the request's
                          ``Hafs-Owner`` header is not it (or missing): {"error", "owner"}
    GET    /blocks?after=<hex>&limit=<n>
                          200 {"ids": [...]}: up to n (1..10000, default 1000) ids in order,
                          each > after ("" or a lower-case hex prefix); 400 bad arguments
    GET    /status        200 {"node_id", "fs_uuid", "version", "total_bytes" (capacity),
                          "free_bytes", "block_count", "block_bytes", "max_block_size",
                          "started_ns"}; the block figures are at most 1 s old
    GET    /ping          200 {"node_id", "fs_uuid", "owner", "owner_where"}: a cheap
                          liveness check for health probes (owner: the token of the metadata
                          store that owns the node, null while none has taken it; /status
                          and /claim report the same four)
    POST   /claim         body {"node_id", "fs_uuid"} (at most CLAIM_MAX bytes; the node id as
                          for --init, the uuid in canonical form): an unclaimed node makes DIR
                          that node's backing directory (DirStore.create: durable), serves it
                          from then on, logs NODE-CLAIMED and answers 200 {"node_id",
                          "fs_uuid"}; 200 as well if it already is that node (a retried mkfs);
                          409 it is another node or filesystem (the message names it); 400 a
                          malformed body; 413 a larger one
    POST   /owner         body {"owner": TOKEN, "where": TEXT, "expect": [TOKEN or null, ...]}
                          ("expect" optional): record that metadata store as the node's owner
                          (in the identity file, durably: DirStore.set_owner), only if the
                          owner recorded now is one of "expect" when given; 200 the identity;
                          409 {"error", "owner"} it is another; 400 malformed; 503 unclaimed
    GET    /metrics       200 Prometheus text: hafs_node_requests_total{method,status},
                          hafs_node_received_bytes_total, hafs_node_sent_bytes_total,
                          hafs_node_blocks_stored_total, hafs_node_blocks_rejected_total{reason},
                          hafs_node_blocks_corrupt_total, hafs_node_blocks, hafs_node_block_bytes,
                          hafs_node_capacity_bytes, hafs_node_free_bytes, hafs_node_info

An unclaimed node answers /ping and /status with node_id and fs_uuid null,
every /blocks request with 503, and takes the first valid POST /claim.

Every request: an id that is not 64 lower-case hex digits is 400, checked on the
raw request target (``..%2F`` or ``../`` never reaches the filesystem); an
unknown path is 404, a wrong method 405. With ``--token-file``, a request
without ``Authorization: Bearer <token>`` (compared with hmac.compare_digest) is
401, checked before anything else. A request whose ``Hafs-Fs-Uuid`` or
``Hafs-Node-Id`` header names another filesystem or node is 409 (not checked
while unclaimed): a client whose ring names this address for another node never
reads or deletes here.
Malformed HTTP is answered 400 (431: head over 16 KiB) and the connection closed;
the node stays up.

Identity contract (DESIGN: a directory attached to the wrong filesystem is refused):

- ``--init NODE_ID --fs-uuid UUID`` makes DIR the backing directory of node NODE_ID
  of filesystem UUID (DirStore.create: idempotent for the same identity; an empty or
  new directory only) and serves it.
- Without ``--init``, a DIR holding an identity file: the node serves the identity
  written there. ``--fs-uuid UUID`` without ``--init`` is a check: a directory of
  another filesystem is refused.
- Without ``--init`` or ``--fs-uuid``, an empty DIR or a missing one (created; its
  parent must exist): the node starts unclaimed and waits for ``hafs mkfs --node
  http://...`` (or ``hafs node add``) to POST /claim, which writes the identity as
  ``--init`` would; the node serves it at once, and after a restart like any node
  directory. A node is claimed once: the same identity again is a no-op, another
  one is refused (409).
- A directory of another identity, a non-empty directory without identity, an
  empty one with ``--fs-uuid`` but no ``--init``: refused with a message, exit 2,
  nothing modified.
- Once a metadata store has taken the node (POST /owner, hafs.store.owner), its
  identity file records that store's owner token, and a DELETE must name it; a
  directory without one (made by ``--init``, a claim, or an older hafs) is taken
  by the first store that asks.

Why h11 directly (and not hypercorn + ASGI): refusing a body before reading it
needs the server to answer and then close the connection. ASGI has no way to
say "close", and hypercorn 0.18 deadlocks a connection whose app answers before
draining a large body (the app's last send waits on a full body queue forever;
found while testing this module). With h11 (the maintained sans-I/O HTTP/1.1
parser under hypercorn and httpx) the node owns each connection: it parses with
h11's limits, answers, and closes after a bounded "lingering close". The rest
is a small loop: keep-alive, timeouts, a connection cap, graceful shutdown.

HTTP behaviour: keep-alive and pipelining (one request at a time per
connection); a connection idle for KEEP_ALIVE_S, or silent for READ_TIMEOUT_S
inside a request body, or not reading our answer for WRITE_TIMEOUT_S is closed.
A request head must arrive whole within HEAD_TIMEOUT_S: counted from its first
byte on an authenticated connection, from the connection's start (or the end
of the previous answer) on one that is not, so a client trickling bytes holds
a connection for HEAD_TIMEOUT_S at most.

Connection limits (slow-client starvation): a connection is *unauthenticated*
until it has sent a request with the right token (any complete request head
when the node has no token). At most ``max_unauthenticated`` connections are
unauthenticated at once, ``max_unauthenticated_per_peer`` of them from one peer
address, and at most ``max_connections`` are open. A connection over one of
these bounds does not wait: the oldest unauthenticated connection (of that
peer, for the per-peer bound) is closed to make room, and at the total bound
the oldest idle authenticated (keep-alive) one if no unauthenticated one is
left. Only when every open connection is authenticated and inside a request
do new ones wait in the listen backlog. Sheds are counted in
hafs_node_connections_shed_total{reason}. A client whose keep-alive
connection is shed sees it closed, as after KEEP_ALIVE_S (RemoteStore retries
on a fresh one). An
answer sent before the body was read (401, 400, 409, 413, 503) is followed by reading
and discarding that body when it announced at most MAX_SIZE bytes (so the
connection stays usable); otherwise it says ``Connection: close`` and the node
closes after discarding at most LINGER_BYTES for at most LINGER_S, so that the
client reads the answer instead of a reset.

Concurrency: everything except DirStore calls runs on the trio thread: one task
per connection (bounded as above), each serving its requests one after another;
the connection registry of HttpServer (and each connection's authenticated and
idle flags) is only changed on the trio thread, with no await between a check
and the change it decides. Every DirStore call (and hashing) runs
in a worker thread bounded by one CapacityLimiter (``--threads``); DirStore
allows any number of concurrent callers. Request bodies are held in memory by at
most 2 x threads requests at once. Metrics and the usage cache are only touched
on the trio thread. A claim holds a trio lock from its check to the switch of
identity, so of two concurrent claims exactly one wins; the store and the
identity headers change only there, once, on the trio thread (a request routed
before the switch is answered as unclaimed). SIGINT or SIGTERM stops accepting,
closes idle connections, lets running requests finish (GRACEFUL_S at most) and
exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import email.utils
import errno
import hmac
import http
import ipaddress
import json
import logging
import os
import re
import resource
import signal
import socket
import ssl
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import parse_qsl

import h11
import prometheus_client as prom
import trio

from .. import __version__, logs, systemd
from ..errors import BlockCorrupt, BlockMissing, NodeIdentityError, NotOwner, UserError
from ..store.chunker import MAX_SIZE
from ..store.dirstore import DirStore, StoreUsage, _fsync_dir, block_id, disk_id, read_identity
from ..store.owner import TOKEN_RE, WHERE_MAX, OwnerClaim, foreign

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:7470"
DEFAULT_THREADS = 16
LIST_LIMIT_DEFAULT = 1000
LIST_LIMIT_MAX = 10000
USAGE_TTL_S = 1.0  # /status and /metrics reuse a block count this young
MAX_CONNECTIONS = 1024  # open connections (--max-connections)
MAX_UNAUTHENTICATED = 256  # of those, not yet authenticated (--max-unauthenticated)
MAX_UNAUTHENTICATED_PER_PEER = 64  # ... from one peer address (--max-unauthenticated-per-peer)
HEAD_TIMEOUT_S = 10.0  # a whole request head (see _Connection._next_event)
MAX_HEAD = 16 * 1024  # request line + headers
RECV_SIZE = 256 * 1024
KEEP_ALIVE_S = 60.0  # an idle connection is closed after this (RemoteStore closes its own at 20)
READ_TIMEOUT_S = 30.0  # inside a request, the longest silence from the client
WRITE_TIMEOUT_S = 30.0  # the longest a client may take to accept our bytes
LINGER_S = 1.0  # before closing with an unread body: wait this long for the client...
LINGER_BYTES = MAX_SIZE  # ...discarding at most this much of its body
GRACEFUL_S = 5.0  # on SIGTERM, running requests get this long to finish
CLAIM_MAX = 4096  # the largest POST /claim body

ID_PATH_PREFIX = b"/blocks/"
_ID_RE = re.compile(rb"[0-9a-f]{64}")
_PREFIX_RE = re.compile(r"[0-9a-f]{0,64}")
_NODE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_TOKEN_RE = re.compile(rb"[\x21-\x7e]+")  # what an HTTP header can carry verbatim
_METHODS = ("GET", "HEAD", "PUT", "DELETE", "POST")  # metric labels; anything else is "other"
_SHED_REASONS = ("peer", "unauthenticated", "full")
_JSON = b"application/json"
_OCTETS = b"application/octet-stream"
UNCLAIMED = (
    "this node is not claimed by a filesystem yet: create one with 'hafs mkfs --node http://...'"
)
NO_TOKEN = (
    "this node wants a bearer token (Authorization: Bearer TOKEN) and the request has none:"
    " give the client a token of the node's --token-file"
)
WRONG_TOKEN = (
    "wrong bearer token: the request's token is not one of the node's --token-file (check the"
    " token the client was given, or add it to that file and send the node SIGHUP)"
)
PLAIN_TO_TLS = (
    b'{"error": "this node serves HTTPS (--tls-cert): address it as https://HOST:PORT"}'
)


class _Gone(Exception):
    """The client went away, or was too slow: close the connection without an answer."""


# ------------------------------------------------------------------- metrics


class Metrics:
    """The figures of one node process, in a prometheus_client registry of its own.

    Counters are counted where things happen (the trio thread); the store's gauges
    are set from its usage when /metrics is asked, then the registry is rendered.
    """

    def __init__(self) -> None:
        r = self.registry = prom.CollectorRegistry()
        self.info = prom.Gauge(
            "hafs_node_info",
            "Identity and version of this node.",
            ["node_id", "fs_uuid", "version"],
            registry=r,
        )
        self.requests = prom.Counter(
            "hafs_node_requests",
            "HTTP requests answered, by method and status.",
            ["method", "status"],
            registry=r,
        )
        self.received_bytes = prom.Counter(
            "hafs_node_received_bytes", "Request body bytes received.", registry=r
        )
        self.sent_bytes = prom.Counter(
            "hafs_node_sent_bytes", "Response body bytes sent.", registry=r
        )
        self.stored = prom.Counter(
            "hafs_node_blocks_stored",
            "Blocks stored by PUT (including ones already present).",
            registry=r,
        )
        self.rejected = prom.Counter(
            "hafs_node_blocks_rejected",
            "PUTs refused: body not hashing to the id (hash) or too large (size).",
            ["reason"],
            registry=r,
        )
        self.corrupt = prom.Counter(
            "hafs_node_blocks_corrupt",
            "Blocks that failed their hash on GET and were moved aside.",
            registry=r,
        )
        self.shed = prom.Counter(
            "hafs_node_connections_shed",
            "Connections closed to make room: unauthenticated over the per-peer, the"
            " unauthenticated or the total bound, or idle at the total bound.",
            ["reason"],
            registry=r,
        )
        for reason in ("hash", "size"):
            self.rejected.labels(reason)
        for reason in _SHED_REASONS:
            self.shed.labels(reason)
        self.blocks = prom.Gauge("hafs_node_blocks", "Blocks stored.", registry=r)
        self.block_bytes = prom.Gauge(
            "hafs_node_block_bytes", "Bytes of stored blocks.", registry=r
        )
        self.capacity = prom.Gauge(
            "hafs_node_capacity_bytes",
            "Size of the filesystem holding the backing directory.",
            registry=r,
        )
        self.free = prom.Gauge(
            "hafs_node_free_bytes", "Bytes available on that filesystem.", registry=r
        )
        started = prom.Gauge(
            "hafs_node_start_time_seconds",
            "When this node process started (Unix time).",
            registry=r,
        )
        started.set(round(time.time(), 3))

    def request(self, method: str, status: int) -> None:
        self.requests.labels(method, str(status)).inc()

    def render(self, usage: StoreUsage, node_id: str, fs_uuid: str) -> bytes:
        """The Prometheus text of every figure, with the store's `usage` and identity."""
        self.info.clear()
        self.info.labels(node_id, fs_uuid, __version__).set(1)
        self.blocks.set(usage.block_count)
        self.block_bytes.set(usage.block_bytes)
        self.capacity.set(usage.total_bytes)
        self.free.set(usage.free_bytes)
        return prom.generate_latest(self.registry)


# ----------------------------------------------------------- HTTP/1.1 (h11)


class Request:
    """One request as the app sees it: its head, its body on demand, one answer."""

    def __init__(self, conn: _Connection, event: h11.Request) -> None:
        self._conn = conn
        self.method = event.method.decode("ascii", "replace").upper()
        self.path, _, self.query = bytes(event.target).partition(b"?")
        self.headers: list[tuple[bytes, bytes]] = list(event.headers)  # names in lower case
        self.client = conn.peer
        self.status = 0  # of the answer, once sent

    def header(self, name: bytes) -> bytes | None:
        """The value of header `name` (lower case); None if absent or repeated."""
        values = [v for k, v in self.headers if k == name]
        return values[0] if len(values) == 1 else None

    async def read_body(self, limit: int) -> bytearray | None:
        """The whole body, or None as soon as it exceeds `limit` bytes (the rest unread)."""
        return await self._conn.read_body(limit)

    async def respond(
        self,
        status: int,
        body: bytes | bytearray = b"",
        *,
        content_type: bytes = _JSON,
        headers: list[tuple[bytes, bytes]] | None = None,
        content_length: int | None = None,
    ) -> None:
        """Send the answer (once). `content_length` announces a HEAD answer's size."""
        if self.status:
            raise RuntimeError(f"answered twice ({self.status}, {status})")
        self.status = status
        hdrs = list(headers or [])
        if status != 204:
            length = len(body) if content_length is None else content_length
            hdrs.append((b"content-length", str(length).encode()))
        if body or status == 200:
            hdrs.append((b"content-type", content_type))
        await self._conn.send_response(self, status, hdrs, body)


class _Connection:
    """One client connection: h11's state machine over a trio stream (module docstring)."""

    def __init__(
        self, server: HttpServer, stream: trio.SocketStream, tls: ssl.SSLContext | None = None
    ) -> None:
        self.server = server
        self.transport = stream
        # Wrapping does no I/O: the handshake happens in the first receive (bounded as a head).
        self.stream: trio.abc.Stream = (
            stream
            if tls is None
            else trio.SSLStream(stream, tls, server_side=True, https_compatible=True)
        )
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            host, port = stream.socket.getpeername()[:2]
            self.host, self.peer = host, f"{host}:{port}"
        except OSError:
            self.host = self.peer = "?"
        self.authenticated = False  # has sent an authorised request (module docstring)
        self.idle = False  # authenticated and waiting for the first byte of a request
        self.scope = trio.CancelScope()  # cancelled when the server sheds this connection
        self._head_deadline = trio.current_time() + HEAD_TIMEOUT_S  # for the request head
        self._drain = False  # after the answer: read and discard the rest of the body
        self._pending = None  # an event taken from h11 that _next_event returns first

    async def run(self) -> None:
        with self.scope:
            await self._serve_requests()

    async def _serve_requests(self) -> None:
        try:
            while True:
                event = await self._next_event(idle=True)
                if not isinstance(event, h11.Request):
                    return  # closed by the client, idle too long, or shutting down
                req = Request(self, event)
                if not self.authenticated and self.server.authorised(req):
                    self.server.authenticate(self)
                # An empty body ends right away: take its EndOfMessage now (no I/O), so the
                # answer need not close the connection. Anything else waits for read_body.
                first = self.h11.next_event()
                if first is not h11.NEED_DATA and not isinstance(first, h11.EndOfMessage):
                    self._pending = first
                await self.server.handler(req)
                if not req.status:
                    raise RuntimeError(f"no answer to {req.method} {req.path!r}")
                if not await self._end_cycle():
                    return
        except h11.RemoteProtocolError as e:
            await self._refuse_garbage(e)
        except trio.BrokenResourceError as e:
            if isinstance(e.__cause__, ssl.SSLError):
                await self._refuse_handshake(e.__cause__)
        except (_Gone, trio.ClosedResourceError):
            pass

    async def _refuse_handshake(self, e: ssl.SSLError) -> None:
        """A TLS handshake failed: answer a plain HTTP request in plain HTTP, then close."""
        log.debug("TLS handshake with %s failed: %s", self.peer, e)
        if e.reason != "HTTP_REQUEST":
            return
        head = (
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(PLAIN_TO_TLS)
        )
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            with trio.move_on_after(WRITE_TIMEOUT_S):
                await self.transport.send_all(head + PLAIN_TO_TLS)
        self.server.metrics.request("other", 400)

    async def _end_cycle(self) -> bool:
        """After an answer: True if the connection can take another request."""
        if self.h11.their_state is h11.SEND_BODY:  # answered before reading the body
            if not self._drain or self.h11.our_state is h11.MUST_CLOSE:
                await self._linger()
                return False
            while True:  # discard the body (at most MAX_SIZE, announced by Content-Length)
                event = await self._next_event()
                if isinstance(event, h11.EndOfMessage):
                    break
                if not isinstance(event, h11.Data):
                    return False
        if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
            return False  # MUST_CLOSE: one of us said "Connection: close"
        if self.server.stopping:
            return False
        self.h11.start_next_cycle()
        # The next head is due HEAD_TIMEOUT_S from now (from its first byte, once authenticated).
        self._head_deadline = trio.current_time() + HEAD_TIMEOUT_S
        return True

    async def _next_event(self, idle: bool = False):
        """The next h11 event, reading as needed; None if the connection should just close.

        While an authenticated connection waits for the first byte of a new
        request (`idle`), the wait ends after KEEP_ALIVE_S or when the server
        stops; the head must then be whole by `_head_deadline` (HEAD_TIMEOUT_S
        after its first byte, or after the start of the cycle while the
        connection is unauthenticated); inside a body, a client silent for
        READ_TIMEOUT_S is gone.
        """
        if self._pending is not None:
            event, self._pending = self._pending, None
            return event
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            in_head = self.h11.their_state is h11.IDLE
            waiting = idle and in_head and not self.h11.trailing_data[0]
            if waiting and self.server.stopping:
                return None
            now = trio.current_time()
            if waiting and self.authenticated:
                deadline = now + KEEP_ALIVE_S
            elif in_head:
                deadline = self._head_deadline
            else:
                deadline = now + READ_TIMEOUT_S
            with trio.CancelScope(deadline=deadline) as scope:
                if waiting:
                    self.server.idle_scopes.add(scope)
                    self.server.set_idle(self, self.authenticated)
                try:
                    # A head arrives in small reads, so h11 sees one over MAX_HEAD (431).
                    data = await self.stream.receive_some(MAX_HEAD if in_head else RECV_SIZE)
                finally:
                    self.server.idle_scopes.discard(scope)
                    self.server.set_idle(self, False)
            if scope.cancelled_caught:
                if waiting:
                    return None
                raise _Gone
            if waiting and self.authenticated and data:  # the first byte of a head
                self._head_deadline = trio.current_time() + HEAD_TIMEOUT_S
            self.h11.receive_data(data)  # b"" is the end of the stream

    async def read_body(self, limit: int) -> bytearray | None:
        if self.h11.their_state is not h11.SEND_BODY:  # an empty body, already ended
            return bytearray()
        if self.h11.they_are_waiting_for_100_continue:
            await self._send(self.h11.send(h11.InformationalResponse(status_code=100, headers=[])))
        body = bytearray()
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                self.server.metrics.received_bytes.inc(len(event.data))
                if len(body) + len(event.data) > limit:
                    return None
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return body
            else:  # ConnectionClosed: h11 raises first if the body was cut short
                raise _Gone

    async def send_response(
        self, req: Request, status: int, headers: list[tuple[bytes, bytes]], body
    ) -> None:
        if self.h11.their_state is h11.SEND_BODY:  # answering before the body was read
            declared = req.header(b"content-length")
            self._drain = (
                declared is not None
                and int(declared) <= MAX_SIZE
                and not self.h11.they_are_waiting_for_100_continue
                and status != 413
            )
            if not self._drain:
                headers.append((b"connection", b"close"))
        elif self.server.stopping:
            headers.append((b"connection", b"close"))
        headers.append((b"date", email.utils.formatdate(usegmt=True).encode()))
        reason = http.HTTPStatus(status).phrase.encode() if status in _STATUSES else b""
        head = self.h11.send(h11.Response(status_code=status, headers=headers, reason=reason))
        if body and req.method != "HEAD":
            await self._send(head)
            for piece in self.h11.send_with_data_passthrough(h11.Data(data=body)) or ():
                await self._send(piece)
            self.server.metrics.sent_bytes.inc(len(body))
            await self._send(self.h11.send(h11.EndOfMessage()))
        else:
            await self._send(head + self.h11.send(h11.EndOfMessage()))
        method = req.method if req.method in _METHODS else "other"
        self.server.metrics.request(method, status)

    async def _send(self, data: bytes | bytearray | memoryview | None) -> None:
        if not data:
            return
        with trio.move_on_after(WRITE_TIMEOUT_S) as scope:
            await self.stream.send_all(data)
        if scope.cancelled_caught:
            raise _Gone

    async def _refuse_garbage(self, e: h11.RemoteProtocolError) -> None:
        """Answer a protocol violation (if we still can), then close."""
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        status = e.error_status_hint
        body = json.dumps({"error": f"bad HTTP request: {e}"}).encode()
        try:
            data = self.h11.send(
                h11.Response(
                    status_code=status,
                    headers=[
                        (b"content-length", str(len(body)).encode()),
                        (b"content-type", _JSON),
                        (b"connection", b"close"),
                    ],
                )
            )
            data += self.h11.send(h11.Data(data=body)) + self.h11.send(h11.EndOfMessage())
            await self._send(data)
        except (h11.LocalProtocolError, _Gone, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        self.server.metrics.request("other", status)
        await self._linger()

    async def _linger(self) -> None:
        """Close gracefully when the client may still be sending: FIN, discard, close."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            # TLS has no half-close: the FIN goes on the socket, after the answer's records.
            await self.transport.send_eof()
            discarded = 0
            with trio.move_on_after(LINGER_S):
                while discarded < LINGER_BYTES:
                    data = await self.stream.receive_some(RECV_SIZE)
                    if not data:
                        break
                    discarded += len(data)


_STATUSES = {s.value for s in http.HTTPStatus}


@dataclasses.dataclass(frozen=True)
class Limits:
    """The connection bounds of a node (module docstring, "Connection limits")."""

    max_connections: int = MAX_CONNECTIONS
    max_unauthenticated: int = MAX_UNAUTHENTICATED
    max_unauthenticated_per_peer: int = MAX_UNAUTHENTICATED_PER_PEER


class HttpServer:
    """Accepts connections and runs `handler` for each request (see the module docstring).

    `authorised(request)` says whether a request authenticates its connection.
    The registry (`_open`, `_unauthenticated`, `_per_peer`) is in connection order,
    oldest first; it is changed on the trio thread only, without awaits.
    """

    def __init__(
        self,
        handler: Callable[[Request], Awaitable[None]],
        metrics: Metrics,
        *,
        authorised: Callable[[Request], bool] = lambda req: True,
        limits: Limits = Limits(),  # noqa: B008 (frozen)
        tls: Tls | None = None,
    ) -> None:
        self.handler = handler
        self.metrics = metrics
        self.authorised = authorised
        self.limits = limits
        self.tls = tls  # HTTPS: each new connection uses its context of the moment
        self.stopping = False
        self.idle_scopes: set[trio.CancelScope] = set()  # connections waiting for a request
        self._open: dict[_Connection, None] = {}
        self._unauthenticated: dict[_Connection, None] = {}
        self._idle: dict[_Connection, None] = {}  # authenticated, between requests
        self._per_peer: Counter[str] = Counter()  # unauthenticated connections by peer host
        self._room = trio.Event()  # set when a connection closes or becomes idle

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        stop: Callable[[], Awaitable[None]],
    ) -> None:
        """Serve until `stop()` returns, then shut down gracefully."""
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as acceptors:
                for listener in listeners:
                    acceptors.start_soon(self._accept, listener, connections)
                await stop()
                acceptors.cancel_scope.cancel()
            self.stopping = True
            for scope in list(self.idle_scopes):
                scope.cancel()
            connections.cancel_scope.deadline = trio.current_time() + GRACEFUL_S
        for listener in listeners:
            await listener.aclose()

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            # Full, and every connection authenticated and busy: wait in the backlog.
            while len(self._open) >= self.limits.max_connections and not (
                self._unauthenticated or self._idle
            ):
                self._room = trio.Event()
                await self._room.wait()
            try:
                stream = await listener.accept()
            except OSError as e:  # EMFILE, ENFILE, ENOBUFS: wait for descriptors to free up
                log.error("cannot accept a connection: %s", e)
                await trio.sleep(0.1)
                continue
            conn = _Connection(self, stream, self.tls.context if self.tls else None)
            self._add(conn)
            nursery.start_soon(self._connection, conn)

    async def _connection(self, conn: _Connection) -> None:
        try:
            await conn.run()
        except Exception:
            log.exception("unexpected error on a connection; closing it")
        finally:
            self._remove(conn)
            await trio.aclose_forcefully(conn.stream)

    # ------------------------------------------------ the connection registry

    def _add(self, conn: _Connection) -> None:
        """Register a new (unauthenticated) connection, shedding others over the bounds."""
        self._open[conn] = None
        self._unauthenticated[conn] = None
        self._per_peer[conn.host] += 1
        if self._per_peer[conn.host] > self.limits.max_unauthenticated_per_peer:
            self._shed(next(c for c in self._unauthenticated if c.host == conn.host), "peer")
        if len(self._unauthenticated) > self.limits.max_unauthenticated:
            self._shed(next(iter(self._unauthenticated)), "unauthenticated")
        if len(self._open) > self.limits.max_connections:
            others = (c for c in self._unauthenticated if c is not conn)
            oldest = next(others, None) or next(iter(self._idle), None)
            if oldest is not None:
                self._shed(oldest, "full")

    def authenticate(self, conn: _Connection) -> None:
        """`conn` sent an authorised request: it no longer counts as unauthenticated."""
        conn.authenticated = True
        self._drop_unauthenticated(conn)

    def _drop_unauthenticated(self, conn: _Connection) -> None:
        if self._unauthenticated.pop(conn, False) is None:
            self._per_peer[conn.host] -= 1
            if not self._per_peer[conn.host]:
                del self._per_peer[conn.host]

    def set_idle(self, conn: _Connection, idle: bool) -> None:
        """Mark `conn` as waiting between requests (sheddable at the total bound) or not."""
        conn.idle = idle
        if idle and conn in self._open:
            self._idle[conn] = None
            self._room.set()
        else:
            self._idle.pop(conn, None)

    def _remove(self, conn: _Connection) -> None:
        if self._open.pop(conn, False) is None:
            self._drop_unauthenticated(conn)
            self._idle.pop(conn, None)
            self._room.set()

    def _shed(self, conn: _Connection, reason: str) -> None:
        """Close `conn` to make room (its task ends at its next checkpoint)."""
        log.debug("CONNECTION-SHED %s (%s)", conn.peer, reason)
        self.metrics.shed.labels(reason).inc()
        self._remove(conn)
        conn.scope.cancel()


# ----------------------------------------------------------------------- app


def _verified_put(store: DirStore, bid: str, data: bytearray) -> bool:
    """Store `data` as `bid` if it hashes to it (worker thread); False if it does not."""
    if block_id(data) != bid:
        return False
    store.put(bid, data)
    return True


def _stat(store: DirStore, bid: str) -> tuple[int, int] | None:
    size = store.size(bid)
    mtime = store.mtime_ns(bid)
    return None if size is None or mtime is None else (size, mtime)


def _unclaimed_usage(path: Path) -> StoreUsage:
    """The usage of an unclaimed (empty) directory: its disk's figures, no blocks."""
    vfs = os.statvfs(path)
    return StoreUsage(vfs.f_blocks * vfs.f_frsize, vfs.f_bavail * vfs.f_frsize, 0, 0)


class NodeApp:
    """What a node answers: routing, checks, and DirStore calls in worker threads.

    `store` is None while the node is unclaimed (`path` is then an empty directory).
    """

    def __init__(
        self,
        path: Path,
        store: DirStore | None,
        *,
        token: bytes | list[bytes] | None = None,
        threads: int = DEFAULT_THREADS,
    ) -> None:
        """token: the bearer token every request must carry, or several (any is accepted:
        a token rotation adds the new one, then removes the old)."""
        self.path = path
        self.store: DirStore | None = None
        self._ident = [(b"hafs-node-id", b""), (b"hafs-fs-uuid", b"")]
        self.owner: tuple[str | None, str | None] = (None, None)  # token, where (store.owner)
        if store is not None:
            self._serve(store)
            self.owner = store.owner_of()
        self.tokens = [token] if isinstance(token, bytes) else list(token or [])
        self.token = self.tokens[0] if self.tokens else None
        self.token_file: Path | None = None  # re-read on SIGHUP (reload_tokens)
        self.limiter = trio.CapacityLimiter(threads)
        self.bodies = trio.CapacityLimiter(2 * threads)  # PUT bodies held in memory
        self.metrics = Metrics()
        self.started_ns = time.time_ns()
        self.disk_id = disk_id(path)
        self._usage: StoreUsage | None = None
        self._usage_at = -float("inf")
        self._usage_lock = trio.Lock()
        self._claim_lock = trio.Lock()

    def _serve(self, store: DirStore) -> None:
        """Serve `store`'s identity from now on (at start, or once claimed)."""
        self.store = store
        self._ident = [
            (b"hafs-node-id", store.node_id.encode()),
            (b"hafs-fs-uuid", store.fs_uuid.encode()),
        ]

    def describe(self) -> str:
        if self.store is None:
            return "unclaimed node"
        return f"node {self.store.node_id} of filesystem {self.store.fs_uuid}"

    def _run(self, fn: Callable, *args):
        return trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def usage(self) -> StoreUsage:
        async with self._usage_lock:
            if self._usage is None or trio.current_time() - self._usage_at > USAGE_TTL_S:
                if self.store is None:
                    self._usage = await self._run(_unclaimed_usage, self.path)
                else:
                    self._usage = await self._run(self.store.usage)
                self._usage_at = trio.current_time()
            return self._usage

    async def _answer(
        self,
        req: Request,
        status: int,
        body: bytes = b"",
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        **kw,
    ) -> None:
        await req.respond(status, body, headers=self._ident + (headers or []), **kw)

    async def _json(self, req: Request, value: dict, status: int = 200) -> None:
        await self._answer(req, status, json.dumps(value).encode())

    async def _error(self, req: Request, status: int, message: str, **kw) -> None:
        await self._answer(req, status, json.dumps({"error": message}).encode(), **kw)

    # --------------------------------------------------------------- routing

    async def __call__(self, req: Request) -> None:
        """Answer `req`; an unexpected error is logged and answered 500."""
        try:
            await self._route(req)
        except (_Gone, h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            raise  # the connection's business: the client broke the protocol or went away
        except Exception:
            log.exception("unexpected error in %s %r", req.method, req.path[:200])
            if req.status:
                raise _Gone from None  # half-answered: the connection cannot go on
            await self._error(req, 500, "internal error (see the node's log)")

    async def _route(self, req: Request) -> None:
        if not self.authorised(req):
            message = NO_TOKEN if req.header(b"authorization") is None else WRONG_TOKEN
            await req.respond(
                401,
                json.dumps({"error": message}).encode(),
                headers=[(b"www-authenticate", b'Bearer realm="hafs"')],
            )
            return
        mismatch = self._identity_mismatch(req)
        if mismatch:
            await self._error(req, 409, mismatch)
            return
        if self.store is None and (req.path == b"/blocks" or req.path.startswith(ID_PATH_PREFIX)):
            await self._error(req, 503, UNCLAIMED)
            return
        if req.path.startswith(ID_PATH_PREFIX):
            raw_id = req.path[len(ID_PATH_PREFIX) :]
            if _ID_RE.fullmatch(raw_id) is None:
                shown = raw_id[:80].decode("ascii", "replace")
                await self._error(
                    req, 400, f"invalid block id {shown!r}: expected 64 lower-case hex digits"
                )
                return
            handler = {
                "PUT": self._put,
                "GET": self._get,
                "HEAD": self._head,
                "DELETE": self._delete,
            }.get(req.method)
            if handler is None:
                await self._not_allowed(req, b"PUT, GET, HEAD, DELETE")
            else:
                await handler(req, raw_id.decode())
            return
        method, handler = {
            b"/blocks": ("GET", self._list),
            b"/status": ("GET", self._status),
            b"/ping": ("GET", self._ping),
            b"/metrics": ("GET", self._metrics),
            b"/claim": ("POST", self._claim),
            b"/owner": ("POST", self._set_owner),
        }.get(req.path, ("", None))
        if handler is None:
            await self._error(req, 404, "no such endpoint")
        elif req.method != method:
            await self._not_allowed(req, method.encode())
        else:
            await handler(req)

    def reload_tokens(self) -> None:
        """Read `token_file` again (SIGHUP): a token rotation adds or removes a line there.
        A file that cannot be used leaves the tokens as they were (logged)."""
        if self.token_file is None:
            return
        try:
            tokens = read_tokens(self.token_file)
        except UserError as e:
            log.error("TOKENS-KEPT: %s; the node keeps its %d token(s)", e, len(self.tokens))
            return
        self.tokens, self.token = tokens, tokens[0]
        log.info("TOKENS-RELOADED from %s: %d token(s) accepted", self.token_file, len(tokens))

    def authorised(self, req: Request) -> bool:
        """True if `req` carries the node's token (any request when it has none)."""
        if not self.tokens:
            return True
        value = req.header(b"authorization")
        if value is None:
            return False
        scheme, _, credential = value.strip().partition(b" ")
        matches = [hmac.compare_digest(credential.strip(), t) for t in self.tokens]  # each one
        return scheme.lower() == b"bearer" and any(matches)

    def _identity_mismatch(self, req: Request) -> str:
        if self.store is None:
            return ""  # unclaimed: no identity to protect, and /claim must get through
        for name, mine in self._ident:
            theirs = req.header(name)
            if theirs is not None and theirs != mine:
                return (
                    f"this is node {self.store.node_id} of filesystem {self.store.fs_uuid}; the"
                    f" request is for {name.decode()} {theirs.decode('latin-1')[:80]!r}: check"
                    " the node's address in the filesystem's ring"
                )
        return ""

    async def _not_allowed(self, req: Request, allow: bytes) -> None:
        await self._error(req, 405, "method not allowed", headers=[(b"allow", allow)])

    # ---------------------------------------------------------------- blocks

    async def _put(self, req: Request, bid: str) -> None:
        declared = req.header(b"content-length")  # h11 checked that it is digits
        if declared is not None and int(declared) > MAX_SIZE:
            self.metrics.rejected.labels("size").inc()
            await self._error(req, 413, f"a block is at most {MAX_SIZE} bytes")
            return
        async with self.bodies:
            data = await req.read_body(MAX_SIZE)
            if data is None:
                self.metrics.rejected.labels("size").inc()
                await self._error(req, 413, f"a block is at most {MAX_SIZE} bytes")
                return
            try:
                stored = await self._run(_verified_put, self.store, bid, data)
            except OSError as e:
                await self._disk_error(req, "store", bid, e)
                return
        if not stored:
            self.metrics.rejected.labels("hash").inc()
            log.warning(
                "PUT-REJECTED %s from %s: %d bytes do not hash to the id",
                bid,
                req.client,
                len(data),
            )
            await self._error(req, 422, "the body does not hash to the block id; nothing stored")
            return
        self.metrics.stored.inc()
        await self._answer(req, 204)

    async def _get(self, req: Request, bid: str) -> None:
        try:
            data = await self._run(self.store.get, bid)
        except BlockMissing:
            await self._error(req, 404, f"block {bid} is not on this node")
            return
        except BlockCorrupt:  # DirStore.get logged BLOCK-CORRUPT and moved it aside
            self.metrics.corrupt.inc()
            await self._error(req, 410, f"block {bid} failed its hash here and was moved aside")
            return
        except OSError as e:
            await self._disk_error(req, "read", bid, e)
            return
        await self._answer(req, 200, data, content_type=_OCTETS)

    async def _head(self, req: Request, bid: str) -> None:
        try:
            st = await self._run(_stat, self.store, bid)
        except OSError as e:
            await self._disk_error(req, "stat", bid, e)
            return
        if st is None:
            await self._answer(req, 404)
            return
        size, mtime_ns = st
        await self._answer(
            req,
            200,
            content_length=size,
            content_type=_OCTETS,
            headers=[
                (b"hafs-size", str(size).encode()),
                (b"hafs-mtime-ns", str(mtime_ns).encode()),
            ],
        )

    async def _delete(self, req: Request, bid: str) -> None:
        owner, where = self.owner
        if owner is not None and req.header(b"hafs-owner") != owner.encode():
            what = f"node {self.store.node_id}"
            refusal = {"error": foreign(what, where) + "; the delete is refused", "owner": owner}
            await self._json(req, refusal, 403)
            return
        try:
            existed = await self._run(self.store.delete, bid)
        except OSError as e:
            await self._disk_error(req, "delete", bid, e)
            return
        await self._answer(req, 204 if existed else 404)

    async def _disk_error(self, req: Request, what: str, bid: str, e: OSError) -> None:
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        log.error("DISK-ERROR cannot %s block %s in %s: %s", what, bid, self.store.path, e)
        await self._error(
            req, 507 if full else 500, f"cannot {what} block {bid}: {e.strerror or e}"
        )

    # ------------------------------------------------------------ the others

    async def _list(self, req: Request) -> None:
        try:
            query = dict(
                parse_qsl(req.query.decode("ascii"), keep_blank_values=True, max_num_fields=4)
            )
            unknown = set(query) - {"after", "limit"}
            if unknown:
                raise ValueError(f"unknown parameter {sorted(unknown)[0]!r}")
            after = query.get("after", "")
            if _PREFIX_RE.fullmatch(after) is None:
                raise ValueError("after must be lower-case hex, at most 64 digits")
            limit = query.get("limit", str(LIST_LIMIT_DEFAULT))
            if not limit.isdigit() or not 1 <= int(limit) <= LIST_LIMIT_MAX:
                raise ValueError(f"limit must be an integer from 1 to {LIST_LIMIT_MAX}")
        except ValueError as e:  # UnicodeDecodeError too
            await self._error(req, 400, f"bad query: {e}")
            return
        ids = await self._run(self.store.iter_ids, after, int(limit))
        await self._json(req, {"ids": ids})

    def _identity(self) -> dict:
        """{"node_id", "fs_uuid"} as /ping, /status and /claim report them (null: unclaimed)."""
        store = self.store
        return {
            "node_id": store.node_id if store else None,
            "fs_uuid": store.fs_uuid if store else None,
            "owner": self.owner[0],
            "owner_where": self.owner[1],
        }

    async def _status(self, req: Request) -> None:
        usage = await self.usage()
        await self._json(
            req,
            {
                **self._identity(),
                "version": __version__,
                "total_bytes": usage.total_bytes,
                "free_bytes": usage.free_bytes,
                "block_count": usage.block_count,
                "block_bytes": usage.block_bytes,
                "max_block_size": MAX_SIZE,
                "started_ns": self.started_ns,
                "disk_id": self.disk_id,
            },
        )

    async def _ping(self, req: Request) -> None:
        await self._json(req, self._identity())

    async def _metrics(self, req: Request) -> None:
        usage = await self.usage()
        node_id, fs_uuid = (v.decode() for _, v in self._ident)
        body = self.metrics.render(usage, node_id, fs_uuid)
        await self._answer(req, 200, body, content_type=b"text/plain; version=0.0.4; charset=utf-8")

    async def _claim(self, req: Request) -> None:
        body = await req.read_body(CLAIM_MAX)
        if body is None:
            await self._error(req, 413, f"a claim is at most {CLAIM_MAX} bytes")
            return
        try:
            claim = json.loads(body)
            if not isinstance(claim, dict) or set(claim) != {"node_id", "fs_uuid"}:
                raise ValueError('expected a JSON object {"node_id": ..., "fs_uuid": ...}')
            node_id = check_node_id(claim["node_id"])
            fs_uuid = canonical_uuid(claim["fs_uuid"], "fs_uuid")
            if fs_uuid != claim["fs_uuid"]:
                raise ValueError(f"fs_uuid {claim['fs_uuid']!r} is not in canonical form")
        except (ValueError, UserError) as e:  # UnicodeDecodeError too
            await self._error(req, 400, f"bad claim: {e}")
            return
        async with self._claim_lock:
            if self.store is None:
                try:
                    store = await self._run(DirStore.create, self.path, node_id, fs_uuid)
                except UserError as e:  # the directory changed since the start, or a disk error
                    log.error("CLAIM-FAILED node %s of filesystem %s: %s", node_id, fs_uuid, e)
                    await self._error(req, 409 if isinstance(e, NodeIdentityError) else 500, str(e))
                    return
                self._serve(store)
                log.info(
                    "NODE-CLAIMED node %s of filesystem %s (by %s)", node_id, fs_uuid, req.client
                )
            elif (self.store.node_id, self.store.fs_uuid) != (node_id, fs_uuid):
                await self._error(
                    req,
                    409,
                    f"this node is already {self.describe()}; refusing to make it node"
                    f" {node_id} of filesystem {fs_uuid}",
                )
                return
        await self._json(req, self._identity())

    async def _set_owner(self, req: Request) -> None:
        body = await req.read_body(CLAIM_MAX)
        if body is None:
            await self._error(req, 413, f"an owner is at most {CLAIM_MAX} bytes")
            return
        try:
            claim = json.loads(body)
            keys = set(claim) if isinstance(claim, dict) else set()
            if not {"owner", "where"} <= keys <= {"owner", "where", "expect"}:
                raise ValueError('expected {"owner": TOKEN, "where": TEXT, "expect": [...]}')
            token, where, expect = claim["owner"], claim["where"], claim.get("expect")
            if not isinstance(token, str) or not TOKEN_RE.fullmatch(token):
                raise ValueError("the owner token must be 1-64 letters, digits, '_' or '-'")
            if not isinstance(where, str) or len(where) > WHERE_MAX or not where.isprintable():
                raise ValueError(f"where must be printable text of at most {WHERE_MAX} characters")
            if expect is not None and not (
                isinstance(expect, list) and all(e is None or isinstance(e, str) for e in expect)
            ):
                raise ValueError("expect must be a list of owner tokens (or null)")
        except ValueError as e:  # UnicodeDecodeError too
            await self._error(req, 400, f"bad owner: {e}")
            return
        if self.store is None:
            await self._error(req, 503, UNCLAIMED)
            return
        async with self._claim_lock:
            try:
                await self._run(
                    self.store.set_owner,
                    OwnerClaim(token, where),
                    None if expect is None else tuple(expect),
                )
            except NotOwner as e:
                self.owner = await self._run(self.store.owner_of)
                await self._json(req, {"error": str(e), "owner": self.owner[0]}, 409)
                return
            except (UserError, OSError) as e:  # the directory changed under us, a disk error
                log.error("OWNER-FAILED %s: %s", self.describe(), e)
                await self._error(req, 500, f"cannot record the owner: {e}")
                return
            self.owner = (token, where)
        await self._json(req, self._identity())


# ------------------------------------------------------------------- set-up


def check_node_id(value: object) -> str:
    """`value` if it is a valid node id, else UserError."""
    if not isinstance(value, str) or _NODE_ID_RE.fullmatch(value) is None:
        raise UserError(
            f"node id {str(value)[:80]!r}: use 1-64 letters, digits, '.', '_' or '-'"
            " (starting with a letter or digit)"
        )
    return value


def canonical_uuid(value: object, what: str) -> str:
    """`value` (the `what` of a message) as a canonical UUID string, else UserError."""
    try:
        return str(uuid.UUID(value))
    except (TypeError, ValueError, AttributeError):
        raise UserError(f"{what} {str(value)[:80]!r} is not a UUID") from None


def open_node_store(
    data: str | Path, init_node_id: str | None = None, fs_uuid: str | None = None
) -> DirStore | None:
    """Open (or with `init_node_id`, first create) the backing directory a node serves.

    None: the directory is empty or was missing (then created), and the node
    serves it unclaimed. See "Identity contract" in the module docstring. Raises
    UserError (or its subclass NodeIdentityError) with a message saying what to do.
    """
    path = Path(data).expanduser().absolute()
    if fs_uuid is not None:
        fs_uuid = canonical_uuid(fs_uuid, "--fs-uuid")
    if init_node_id is not None:
        check_node_id(init_node_id)
        if fs_uuid is None:
            raise UserError("--init NODE_ID needs --fs-uuid UUID (the filesystem's uuid)")
        return DirStore.create(path, init_node_id, fs_uuid)
    if fs_uuid is None and not path.exists() and not path.is_symlink():
        try:
            path.mkdir()
            _fsync_dir(str(path.parent))
        except OSError as e:
            raise UserError(
                f"cannot create backing directory {path}: {e.strerror}: its parent must be"
                " an existing, writable directory"
            ) from None
        return None
    if not path.is_dir():
        raise UserError(
            f"backing directory {path} {'is not a directory' if path.exists() else 'is missing'}:"
            " give an existing node directory, or initialise a new one with"
            " --init NODE_ID --fs-uuid UUID"
        )
    ident = read_identity(path)
    if ident is None:
        if any(path.iterdir()):
            raise NodeIdentityError(
                f"{path} is not a hafs node directory (no identity file) and is not empty:"
                " give an empty or new directory (to be claimed by 'hafs mkfs --node'), or"
                " empty this one"
            )
        if fs_uuid is not None:
            raise NodeIdentityError(
                f"{path} is empty (no identity file), so it cannot belong to filesystem"
                f" {fs_uuid}: give the node's directory, or drop --fs-uuid to serve it"
                " unclaimed, or initialise it with --init NODE_ID"
            )
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"backing directory {path} is not writable: fix its permissions")
        return None
    if fs_uuid is not None and ident["fs_uuid"] != fs_uuid:
        raise NodeIdentityError(
            f"backing directory {path} belongs to filesystem {ident['fs_uuid']} (node"
            f" {ident['node_id']}), not {fs_uuid}: refusing to serve it; give the right --data"
        )
    return DirStore.open(path, ident["node_id"], ident["fs_uuid"])


def read_tokens(file: str | Path) -> list[bytes]:
    """The bearer tokens in `file`, one per line (blank lines ignored; a node accepts each:
    during a rotation it holds the old and the new one); UserError if unusable."""
    try:
        raw = Path(file).read_bytes()
        mode = os.stat(file).st_mode
    except OSError as e:
        raise UserError(f"cannot read token file {file}: {e.strerror}") from None
    tokens = [line.strip() for line in raw.splitlines() if line.strip()]
    if not tokens or any(_TOKEN_RE.fullmatch(t) is None for t in tokens):
        raise UserError(
            f"token file {file} must hold tokens of printable ASCII without spaces, one per"
            " line (e.g. the output of 'openssl rand -hex 32')"
        )
    if mode & 0o077:
        log.warning("token file %s is readable by others: chmod 600 it", file)
    return tokens


def _encrypted_key() -> bytes:
    raise UserError("is encrypted: give the node a key without a passphrase")


def load_tls(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context with the certificate (PEM, its chain after it) and key; UserError."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    what = f"--tls-cert {cert} with --tls-key {key}"
    try:
        context.load_cert_chain(cert, key, password=_encrypted_key)
    except UserError as e:
        raise UserError(f"--tls-key {key} {e}") from None
    except ssl.SSLError as e:
        raise UserError(
            f"cannot use {what} ({e.reason or e}): give the node's certificate (PEM, with its"
            " chain after it) and the private key it was made for"
        ) from None
    except OSError as e:
        raise UserError(f"cannot read {what}: {e.strerror or e}") from None
    if os.stat(key).st_mode & 0o077:
        log.warning("TLS key %s is readable by others: chmod 600 it", key)
    return context


class Tls:
    """The node's certificate and key as a server context; `reload` reads them again
    (SIGHUP: a renewed certificate serves the connections made from then on)."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key
        self.context = load_tls(cert, key)

    def reload(self) -> None:
        try:
            self.context = load_tls(self.cert, self.key)
        except UserError as e:
            log.error("TLS-KEPT: %s; the node keeps the certificate it had", e)
            return
        log.info("TLS-RELOADED %s", self.cert)


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT or [IPV6]:PORT -> (host, port); UserError if malformed.

    Port 0 asks the system for any free port.
    """
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^\s:\[\]/]+):(\d+)", value)
    if m is None:
        raise UserError(f"--listen {value!r}: expected HOST:PORT, e.g. 0.0.0.0:7470 or [::]:7470")
    port = int(m.group(2) or m.group(4))
    if port > 65535:
        raise UserError(f"--listen {value!r}: port {port} is out of range 1-65535")
    return (m.group(1) or m.group(3)), port


def bind_listen(listen: str) -> list[socket.socket]:
    """Listening sockets for `listen` (every address HOST resolves to); UserError if not.

    Called before anything is created on disk, so a port in use changes nothing.
    """
    host, port = parse_listen(listen)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"cannot listen on {listen}: {e.strerror}") from None
    socks: list[socket.socket] = []
    try:
        for family, type_, proto, _, addr in dict.fromkeys(
            (i[0], i[1], i[2], "", i[4]) for i in infos
        ):
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(256)
    except OSError as e:
        for sock in socks:
            sock.close()
        raise UserError(
            f"cannot listen on {listen}: {e.strerror or e}: choose another --listen port, or stop"
            " what is using it"
        ) from None
    return socks


def fit_descriptors(limits: Limits, threads: int) -> Limits:
    """`limits`, with the descriptor limit raised to fit them (or them lowered, with a warning)."""
    need = limits.max_connections + threads + 64  # listeners, logs, the store's own files
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        soft = need if hard == resource.RLIM_INFINITY else min(hard, need)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < need:
        fitted = max(1, soft - threads - 64)
        log.warning(
            "the descriptor limit (ulimit -n %d) allows %d connections, not %d: serving at most %d",
            soft,
            fitted,
            limits.max_connections,
            fitted,
        )
        return dataclasses.replace(limits, max_connections=fitted)
    return limits


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _url(sockname: tuple, scheme: str = "http") -> str:
    host, port = sockname[:2]
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


async def serve(
    app: NodeApp,
    socks: list[socket.socket],
    limits: Limits = Limits(),  # noqa: B008 (frozen)
    tls: Tls | None = None,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> str:
    """Serve `app` on the listening `socks` (bind_listen) until SIGINT or SIGTERM;
    HTTPS with `tls`.

    Returns the signal's name; `task_status.started` gets the bound URLs.
    READY=1 goes to systemd once listening; SIGHUP reopens the log file and reads
    the token file and the certificate again.
    """
    stopped_by = ""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in socks]

        async def stop() -> None:
            nonlocal stopped_by
            async for signum in signals:
                if signum == signal.SIGHUP:  # logrotate moved the log; a new token or certificate
                    logs.reopen()
                    app.reload_tokens()
                    if tls is not None:
                        tls.reload()
                    continue
                stopped_by = signal.Signals(signum).name
                log.info("NODE-STOP %s: %s, finishing running requests", app.describe(), stopped_by)
                return

        scheme = "https" if tls else "http"
        urls = [_url(listener.socket.getsockname(), scheme) for listener in listeners]
        log.info(
            "NODE-READY %s serving %s at %s (%s)%s",
            app.describe(),
            app.path,
            ", ".join(urls),
            "bearer token required" if app.token else "no token",
            "" if app.store else f": waiting for 'hafs mkfs --node {urls[0]}' to claim it",
        )
        task_status.started(urls)
        server = HttpServer(app, app.metrics, authorised=app.authorised, limits=limits, tls=tls)
        systemd.notify("READY=1")
        await server.serve(listeners, stop)
    log.info("NODE-STOPPED %s", app.describe())
    return stopped_by


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `hafs node` (see `run`)."""
    parser.add_argument(
        "--data",
        type=Path,
        metavar="DIR",
        help="the backing directory to serve (required to serve); an empty or new one is"
        " served unclaimed until 'hafs mkfs --node http://HOST:PORT' claims it",
    )
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help="address to serve on (default: %(default)s; 0.0.0.0:PORT or [::]:PORT for the"
        " network)",
    )
    parser.add_argument(
        "--init",
        metavar="NODE_ID",
        help="initialise DIR as node NODE_ID of the filesystem given by --fs-uuid (an empty or"
        " new directory; harmless when DIR already is that node)",
    )
    parser.add_argument(
        "--fs-uuid",
        metavar="UUID",
        help="the filesystem's uuid: with --init, the one to write; without, DIR must belong to it",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="require 'Authorization: Bearer TOKEN' on every request, TOKEN read from FILE;"
        " several lines: any of those tokens (for a rotation)",
    )
    parser.add_argument(
        "--tls-cert",
        type=Path,
        metavar="FILE",
        help="serve HTTPS with this certificate (PEM, its chain after it; its names must hold"
        " the host clients address the node by), with --tls-key; reloaded on SIGHUP",
    )
    parser.add_argument(
        "--tls-key", type=Path, metavar="FILE", help="the private key (PEM) of --tls-cert"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help="worker threads for disk I/O (default: %(default)s)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=MAX_CONNECTIONS,
        metavar="N",
        help="open connections at most; at the bound, the oldest unauthenticated or idle one"
        " is closed to make room (default: %(default)s)",
    )
    parser.add_argument(
        "--max-unauthenticated",
        type=int,
        default=MAX_UNAUTHENTICATED,
        metavar="N",
        help="connections that have not yet sent a request with the token, at most; more"
        " close the oldest of them (default: %(default)s)",
    )
    parser.add_argument(
        "--max-unauthenticated-per-peer",
        type=int,
        default=MAX_UNAUTHENTICATED_PER_PEER,
        metavar="N",
        help="the same bound for one client address (default: %(default)s)",
    )
    parser.add_argument(
        "--log",
        default="-",
        metavar="FILE|syslog|-",
        help="where the log goes: a file (reopened on SIGHUP, for logrotate), syslog, or -"
        " for stderr, the journal under systemd (default: -)",
    )
    parser.add_argument("--debug", action="store_true", help="log debug messages")


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; 0 after a clean stop. Bad input raises UserError."""
    logs.setup(args.log, args.debug)
    if args.data is None:
        raise UserError("hafs node needs --data DIR: the backing directory to serve")
    host, _ = parse_listen(args.listen)
    bounds = ("threads", "max_connections", "max_unauthenticated", "max_unauthenticated_per_peer")
    for name in bounds:
        if getattr(args, name) < 1:
            option = "--" + name.replace("_", "-")
            raise UserError(f"{option} must be at least 1, got {getattr(args, name)}")
    limits = fit_descriptors(
        Limits(args.max_connections, args.max_unauthenticated, args.max_unauthenticated_per_peer),
        args.threads,
    )
    token = read_tokens(args.token_file) if args.token_file is not None else None
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UserError("give --tls-cert FILE and --tls-key FILE together (or neither: HTTP)")
    tls = Tls(args.tls_cert, args.tls_key) if args.tls_cert is not None else None
    path = Path(args.data).expanduser().absolute()
    socks = bind_listen(args.listen)  # before anything is created: a port in use changes nothing
    try:
        store = open_node_store(path, args.init, args.fs_uuid)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    if token is None and not _is_loopback(host):
        log.warning(
            "serving %s on %s without --token-file: anyone who can reach it can read and"
            " delete blocks%s",
            path,
            args.listen,
            "" if store else ", or claim it",
        )
    if store is not None:
        store.cleanup_tmp()
    app = NodeApp(path, store, token=token, threads=args.threads)
    app.token_file = args.token_file
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a peer's reset is an error, not our death
    trio.run(serve, app, socks, limits, tls)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hafs.node",
        description="Serve one hafs backing directory to the network (a block node).",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"hafs node: {e}", file=sys.stderr)
        return 2
