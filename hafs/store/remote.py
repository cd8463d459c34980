"""RemoteStore: the client of a block node (hafs.node), with DirStore's interface.

`RemoteStore` has the synchronous methods of `DirStore` with the same meaning
(put, get, has, size, mtime_ns, delete, iter_ids, usage, node_id, fs_uuid), so
Placement runs it the same way: from worker threads. One instance is shared by
all threads and speaks HTTP/1.1 itself: h11 (the parser the node uses) over plain
sockets, `ssl` for https:// addresses.

Credentials (`NodeAuth`): the bearer token sent with every request and the CA
an https:// node's certificate must be signed by (the filesystem's `ca_pem`;
none: the system's CAs), its hostname or IP checked against the address. One
NodeAuth per filesystem configuration is shared by all its stores, with one
`ssl.SSLContext` built once. A store refused with 401, or by a certificate its
CA does not sign, asks the NodeAuth to re-read the configuration (`reload`,
once per change however many threads were refused) and, if the token or the CA
changed there, repeats the request once: a running mount follows `hafs node
token` and `hafs node ca` without failing a call (the rotation in the README).

Transport. The mount is CPU-bound (one GIL) when it reads from remote nodes, so
the client keeps the cost per byte low: an answer's head goes through h11, its
body (Content-Length) is read with recv_into straight into one buffer of that
size, and `get` returns a read-only memoryview of that buffer (a bytes-like
object: len, slicing without copies, ==, the buffer protocol; bytes(...) for the
rest); a PUT body is sent from the caller's buffer as it is. An answer without
Content-Length (chunked, or ended by closing) is decoded by h11.

Connections and threads: `_Pool` keeps up to `max_connections` keep-alive
connections; a thread holds one connection for the whole of a request, so any
number of threads may call one RemoteStore at once; the pool's lock guards only
its list of idle connections. A connection goes back to the pool only after its
answer was read in full and the node did not say ``Connection: close``; one idle
for KEEPALIVE_EXPIRY_S is closed instead of reused.

Never trust the network: `get` hashes what it received and returns only bytes
that match the id (else BlockCorrupt); every answer must carry the node's id
(``Hafs-Node-Id``), and every request carries the node id and filesystem uuid
this client expects, so a node of another filesystem or another ring slot
refuses with 409 instead of serving or deleting the wrong blocks. Answers are
read with a bound on their size (refused from Content-Length before their body is
read, or as soon as a body without one passes it), so a node sending garbage can
neither produce wrong bytes nor exhaust memory.

Errors. A failure of the node (not of the caller) raises a `NodeError`, which is
both a `StorageError` (EIO at the FUSE boundary) and an `OSError` (so Placement
treats it as a failed replica, like a disk error of a DirStore):

    NodeError                   base; .address, .node_id, .status (HTTP status or None)
      NodeUnavailable           no answer: connection refused/reset, closed without an
                                answer (ECONNRESET), unreachable (errno set)
        NodeTimeout             no answer within the timeout (ETIMEDOUT)
      NodeProtocolError         an answer that is not a hafs node's (bad status, headers,
                                JSON; malformed, cut short or too large)
      NodeCertificateError      an https:// node whose certificate the CA does not sign, or
                                that is not valid for the address's host (EACCES)
      NodeRefused               a hafs node's refusal: 5xx disk error (EIO), 507 full (ENOSPC),
                                422 body not hashing to the id, 413 too large
        NodeAuthError           401: missing or wrong token (EACCES)
        NodeIdentityMismatch    409: the node is another node or serves another filesystem

and `NotOwner` (hafs.errors; an OSError too): the node refused a delete (403)
because it belongs to another metadata store (hafs.store.owner).

Health (for Placement): NodeUnavailable other than NodeTimeout means "down now";
NodeTimeout is a strike; the others mean the node is up but failed this request
(NodeAuthError, NodeIdentityMismatch and NodeCertificateError are configuration
errors: down now, with a loud log).
`BlockMissing` and `BlockCorrupt` keep DirStore's meaning; a body that fails the
hash on arrival is logged BLOCK-CORRUPT and raised as BlockCorrupt.

Timeouts: `timeout` bounds each attempt as a whole: the wait for a free pooled
connection (NodeTimeout "no free connection"), connecting (at most
`connect_timeout`), sending the request and receiving the whole answer. Every
send and receive waits at most for what is left of it, so a node that stops
answering (SIGSTOP, a dead host) fails the call within about `timeout`, and one
that trickles bytes is cut off at the deadline. A request that failed at once on
a reused connection the node had closed (a reset, or the end of the stream before
any byte of an answer) is retried once on a new connection: every request is
idempotent (a repeated DELETE reports False). Other retries, with backoff, are
the caller's.

Beyond DirStore's methods: `status()` (the node's /status), `ping()` (a cheap
health probe), `check_identity()` (NodeIdentityError if the address serves
another node or filesystem: for mount time), `RemoteStore.probe(address)` (the
identity a node serves, None while unclaimed) and `RemoteStore.claim(address,
node_id, fs_uuid)` (make an unclaimed node that node: for mkfs and node add),
`set_owner` (POST /owner), and `close()`.

Ownership (hafs.store.owner): a store made with an `OwnerClaim` sends its token
(``Hafs-Owner``) with every request; `check_identity` then takes the node for
that metadata store (switches a node that records no owner or a previous token
of the store, refuses one of another store: NodeOwnedElsewhere), and a delete
the node refuses (403) because it records a previous token is retried once
after switching it (a node that was down when the store was adopted).  A node
of an older hafs, which records no owners (its /ping has no "owner"), is used
as before. `mtime_ns` is the node's clock: a grace period compared with it
assumes clocks roughly in sync.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

import h11
from blake3 import blake3

from ..errors import (
    BlockCorrupt,
    BlockMissing,
    NodeIdentityError,
    NodeOwnedElsewhere,
    NotOwner,
    StorageError,
    UserError,
)
from .chunker import MAX_SIZE
from .dirstore import BLOCK_ID_RE, StoreUsage, check_block_id
from .owner import OwnerClaim, foreign

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_CONNECTIONS = 32
KEEPALIVE_EXPIRY_S = 20.0  # below the node's keep-alive (60 s): the client closes idle ones first
PAGE_MAX = 10000  # ids per GET /blocks (the node's limit)
JSON_MAX = 4 * 1024 * 1024  # the largest JSON answer accepted (a full page is ~0.7 MB)
ERROR_MAX = 64 * 1024  # the largest error answer read
HEAD_RECV = 16 * 1024  # bytes asked for while reading an answer's head (h11's limit for a head)
CHUNK_RECV = 64 * 1024  # bytes asked for at once from an answer without Content-Length
_PREFIX_RE = re.compile(r"[0-9a-f]{0,64}")
_INT_RE = re.compile(r"[0-9]{1,20}")


_REASONS = {
    401: "(missing or wrong bearer token)",
    403: "(another metadata store owns the node)",
    404: "(not found)",
    409: "(another node or another filesystem)",
    410: "(corrupt)",
    413: "(too large)",
    422: "(the body does not hash to the id)",
    507: "(disk full)",
}


class NodeError(StorageError, OSError):
    """A block node did not do what was asked; treat this replica as failed."""

    def __init__(
        self,
        address: str,
        node_id: str,
        message: str,
        err: int = errno.EIO,
        status: int | None = None,
    ) -> None:
        super().__init__(err, f"node {node_id} ({address}): {message}")
        self.message = message  # without the node's name and address
        self.address = address
        self.node_id = node_id
        self.status = status

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):
        return (
            type(self),
            (self.address, self.node_id, self.message, self.errno, self.status),
        )


class NodeUnavailable(NodeError):
    """The node could not be reached: connection refused or reset, host unreachable."""


class NodeTimeout(NodeUnavailable):
    """The node did not answer within the timeout."""


class NodeProtocolError(NodeError):
    """The node answered something a hafs node never sends."""


class NodeRefused(NodeError):
    """The node answered, and refused (disk error, full, bad body)."""


class NodeAuthError(NodeRefused):
    """The node wants a bearer token and ours is missing or wrong (401)."""


class NodeIdentityMismatch(NodeRefused):
    """The node is another node of the ring, or belongs to another filesystem (409)."""


class NodeCertificateError(NodeError):
    """An https:// node's certificate is not signed by the CA, or not for its host."""


# ---------------------------------------------------------------- credentials

AUTH_HINT = (
    "the filesystem's token (mkfs or node add --token-file, changed with 'hafs node token')"
    " must be a line of the node's --token-file"
)
X509_HOSTNAME_MISMATCH = 62  # OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH
X509_IP_ADDRESS_MISMATCH = 64  # X509_V_ERR_IP_ADDRESS_MISMATCH


def check_token(token: str | None) -> str | None:
    """The token as sent (stripped); UserError if an HTTP header cannot carry it."""
    if token is None:
        return None
    token = token.strip()
    if not token or not token.isascii() or not token.isprintable() or " " in token:
        raise UserError("a node token must be printable ASCII without spaces")
    return token


def tls_context(ca_pem: str | None) -> ssl.SSLContext:
    """A client context that checks a node's certificate against `ca_pem` (one or several
    PEM certificates: a bundle serves a change of CA), or the system's CAs if None, and
    its host name; UserError if `ca_pem` holds no usable certificate."""
    try:
        return ssl.create_default_context(cadata=ca_pem)
    except (ssl.SSLError, ValueError) as e:
        raise UserError(f"the CA is not a PEM certificate ({e}): give the CA's .pem file") from None


@dataclass(frozen=True)
class Credentials:
    """What a request presents: the bearer token (None: none) and the CA (None: system)."""

    token: str | None = None
    ca_pem: str | None = None


class NodeAuth:
    """The credentials of one filesystem's nodes, shared by its stores and their threads.

    `reload()` returns the (token, ca_pem) the configuration holds now (it may block:
    it is called from the worker thread of a refused request); None: never re-read.
    The lock guards the credentials and the context; `renew` holds it while it reads
    the configuration, so threads refused at once re-read it once.
    """

    def __init__(
        self,
        token: str | None = None,
        ca_pem: str | None = None,
        reload: Callable[[], tuple[str | None, str | None]] | None = None,
    ) -> None:
        self._creds = Credentials(check_token(token), ca_pem)
        self._reload = reload
        self._context: ssl.SSLContext | None = None
        self._lock = threading.Lock()

    @property
    def current(self) -> Credentials:
        return self._creds

    def tls(self) -> ssl.SSLContext:
        """The client TLS context of the current CA, built once (UserError: not a CA)."""
        with self._lock:
            if self._context is None:
                self._context = tls_context(self._creds.ca_pem)
            return self._context

    def describe_ca(self) -> str:
        return "the filesystem's CA" if self._creds.ca_pem else "the system's CAs"

    def renew(self, seen: Credentials) -> bool:
        """After a refusal with `seen`: True if the credentials are other now (another
        thread renewed them, or the configuration holds new ones), so a retry may pass."""
        with self._lock:
            if self._creds != seen:
                return True
            if self._reload is None:
                return False
            try:
                token, ca_pem = self._reload()
                new = Credentials(check_token(token), ca_pem)
            except Exception as e:  # the metadata is unreachable, or closed: no retry
                log.warning("NODE-CREDENTIALS cannot re-read the configuration: %s", e)
                return False
            if new == seen:
                return False
            self._creds = new
            if new.ca_pem != seen.ca_pem:
                self._context = None
        what = "token and CA" if new.token != seen.token else "CA"
        if new.ca_pem == seen.ca_pem:
            what = "token"
        log.info("NODE-CREDENTIALS the filesystem's node %s changed: using the new one", what)
        return True


class _Stale(Exception):
    """A transport error that a fresh connection may not have."""


class _NoAnswer(Exception):
    """The connection ended (closed or reset) before the first byte of an answer."""


def _normalise_address(address: str) -> str:
    try:
        parts = urlsplit(address)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or port is None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username
        or parts.password
    ):
        raise UserError(
            f"block node address {address!r}: expected http://HOST:PORT (or https://HOST:PORT)"
        )
    return f"{parts.scheme}://{parts.netloc}"


def _detail(body: bytes | bytearray) -> str:
    """The message of an error answer (JSON {"error": ...}, else its first bytes)."""
    try:
        detail = str(json.loads(body)["error"])[:300]
    except (ValueError, KeyError, TypeError):
        detail = body[:100].decode("utf-8", "replace")
    return detail.strip()


def _errno_of(exc: BaseException, default: int) -> int:
    """The errno of the OSError that is or caused `exc`, else `default`.

    ssl and name resolution errors carry codes of their own, not errnos: `default`.
    """
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 10:
        if isinstance(e, OSError) and not isinstance(e, ssl.SSLError | socket.gaierror):
            if e.errno and e.errno > 0:
                return e.errno
        e = e.__cause__ or e.__context__
        seen += 1
    return default


def _wait_at_most(sock: socket.socket, deadline: float) -> None:
    """Let the next send or receive on `sock` wait until `deadline` at most."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    sock.settimeout(left)


class _Pool:
    """Up to `size` keep-alive connections to one address, shared by threads.

    `take` waits for a free slot, then hands out the most recently returned idle
    connection (closing those idle for KEEPALIVE_EXPIRY_S) or connects a new one;
    `give` returns it, to the idle list if it may be reused, and frees the slot.
    The lock guards only the idle list and `closed`: connecting and closing
    sockets happen outside it, except closing expired idle ones (no I/O).
    """

    def __init__(
        self,
        host: str,
        port: int,
        tls: Callable[[], ssl.SSLContext] | None,
        size: int,
        connect_timeout: float,
    ) -> None:
        if size < 1:
            raise ValueError(f"max_connections must be positive, got {size}")
        self.host = host
        self.port = port
        self.tls = tls  # the current TLS context (https), or None (http)
        self.connect_timeout = connect_timeout
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._idle: deque[tuple[socket.socket, float]] = deque()  # (socket, idle since)
        self._closed = False

    def take(self, deadline: float, fresh: bool = False) -> tuple[socket.socket, bool] | None:
        """(connection, reused) or None if no slot was free before `deadline`.

        A new connection unless an idle one can be reused (never with `fresh`).
        Raises OSError (TimeoutError: `connect_timeout`) if connecting fails.
        """
        if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return None
        try:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the connection pool is closed")
                expired = time.monotonic() - KEEPALIVE_EXPIRY_S
                while self._idle and self._idle[0][1] < expired:
                    self._idle.popleft()[0].close()
                if self._idle and not fresh:
                    return self._idle.pop()[0], True
            return self._connect(deadline), False
        except BaseException:
            self._slots.release()
            raise

    def _connect(self, deadline: float) -> socket.socket:
        timeout = min(self.connect_timeout, deadline - time.monotonic())
        if timeout <= 0:
            raise TimeoutError("deadline passed")
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:  # the handshake is bounded by the same timeout
                sock = self.tls().wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        return sock

    def give(self, sock: socket.socket, reusable: bool) -> None:
        """Return a connection from `take`: kept for reuse if `reusable`, else closed."""
        try:
            if reusable:
                with self._lock:
                    if not self._closed:
                        self._idle.append((sock, time.monotonic()))
                        return
            sock.close()
        finally:
            self._slots.release()

    def close(self) -> None:
        """Close the idle connections; those in use are closed when given back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, deque()
        for sock, _ in idle:
            sock.close()


class RemoteStore:
    """The blocks of one node, stored on a block node server (see the module docstring)."""

    def __init__(
        self,
        address: str,
        node_id: str,
        fs_uuid: str,
        *,
        token: str | None = None,
        auth: NodeAuth | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        connect_timeout: float | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        owner: OwnerClaim | None = None,
    ) -> None:
        """No I/O here: the node may be down when the store is made (see `check_identity`).

        `address` is http://HOST:PORT or https://HOST:PORT; `auth` the filesystem's
        credentials (module docstring), or else `token`, the node's bearer token if it
        wants one (the system's CAs check an https node); `timeout` in seconds bounds
        each call (module docstring); `connect_timeout` (default min(timeout, 5)) bounds
        establishing a connection; `owner` the metadata store that changes the blocks
        (module docstring, "Ownership").
        """
        if not node_id or not fs_uuid:
            raise ValueError("node_id and fs_uuid must not be empty")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.address = _normalise_address(address)
        self.node_id = node_id
        self.fs_uuid = fs_uuid
        self.timeout = float(timeout)
        self.owner = owner
        self._anonymous = False  # True in probe(): no identity sent or checked
        parts = urlsplit(self.address)
        headers = [
            (b"host", parts.netloc.encode("idna")),
            (b"hafs-node-id", node_id.encode()),
            (b"hafs-fs-uuid", fs_uuid.encode()),
            (b"user-agent", b"hafs-remote"),
        ]
        self.auth = auth if auth is not None else NodeAuth(token)
        if owner is not None:
            headers.append((b"hafs-owner", owner.token.encode()))
        self._headers = headers  # sent with every request; never changed after _anonymous_store
        self._pool = _Pool(
            parts.hostname or "",
            parts.port or 0,
            self.auth.tls if parts.scheme == "https" else None,
            max_connections,
            min(self.timeout, 5.0) if connect_timeout is None else connect_timeout,
        )

    def __repr__(self) -> str:
        return f"RemoteStore({self.address!r}, node_id={self.node_id!r})"

    def close(self) -> None:
        """Close the pooled connections (calls after this fail)."""
        self._pool.close()

    def __enter__(self) -> RemoteStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ transport

    def _fail(self, cls: type[NodeError], message: str, err: int = errno.EIO, status=None):
        return cls(self.address, self.node_id, message, err, status)

    def _request(
        self,
        method: str,
        path: str,
        *,
        content: bytes | memoryview | None = None,
        params: dict | None = None,
        max_body: int = JSON_MAX,
    ) -> tuple[int, dict[str, str], bytearray]:
        """One request, retried once on a stale connection, and once with renewed
        credentials after a 401 or a certificate refused; (status, headers, body).

        Header names are lower case. Raises NodeError subclasses (module docstring).
        """
        target = f"{path}?{urlencode(params)}" if params else path
        creds = self.auth.current
        try:
            answer = self._request_once(method, path, target, content, max_body, creds)
        except NodeCertificateError:
            if not self.auth.renew(creds):
                raise
        else:
            if answer[0] != 401 or not self.auth.renew(creds):
                return answer
        log.debug("%s %s on node %s: retrying with renewed credentials", method, path, self.node_id)
        return self._request_once(method, path, target, content, max_body, self.auth.current)

    def _request_once(
        self,
        method: str,
        path: str,
        target: str,
        content: bytes | memoryview | None,
        max_body: int,
        creds: Credentials,
    ) -> tuple[int, dict[str, str], bytearray]:
        started = time.monotonic()
        try:
            return self._attempt(method, target, content, max_body, creds, fresh=False)
        except _Stale as e:
            cause = e.__cause__ or e
            if time.monotonic() - started > min(1.0, self.timeout / 2):
                # Not a stale connection (those fail at once): no second wait.
                raise self._fail(
                    NodeUnavailable,
                    f"{method} {path}: {cause}",
                    _errno_of(cause, errno.ECONNRESET),
                ) from None
            log.debug("%s %s on node %s: %s; retrying", method, path, self.node_id, cause)
            return self._attempt(method, target, content, max_body, creds, fresh=True)

    def _attempt(
        self,
        method: str,
        target: str,
        content: bytes | memoryview | None,
        max_body: int,
        creds: Credentials,
        fresh: bool,
    ) -> tuple[int, dict[str, str], bytearray]:
        """One request on one connection (a new one if `fresh`); _Stale if it may retry."""
        what = f"{method} {target.partition('?')[0]}"
        deadline = time.monotonic() + self.timeout
        try:
            taken = self._pool.take(deadline, fresh)
        except TimeoutError:
            raise self._fail(
                NodeTimeout,
                f"{what}: cannot connect within {self._pool.connect_timeout:g} s",
                errno.ETIMEDOUT,
            ) from None
        except ssl.SSLCertVerificationError as e:
            raise self._certificate_error(e) from None
        except ssl.SSLError as e:
            raise self._fail(
                NodeUnavailable,
                f"{what}: the TLS handshake failed ({e.reason or e}): is the node serving"
                " HTTPS (hafs node --tls-cert, --tls-key)? A node without them is addressed"
                " as http://",
                errno.ECONNREFUSED,
            ) from None
        except OSError as e:
            raise self._fail(
                NodeUnavailable,
                f"{what}: cannot connect: {e}",
                _errno_of(e, errno.ECONNREFUSED),
            ) from None
        if taken is None:
            raise self._fail(
                NodeTimeout,
                f"{what}: no free connection within {self.timeout:g} s",
                errno.ETIMEDOUT,
            )
        sock, reused = taken
        reusable = False
        try:
            status, headers, body, reusable = self._exchange(
                sock, method, target, content, max_body, deadline, creds
            )
        except NodeError:
            raise
        except _NoAnswer as e:
            if reused:
                raise _Stale(str(e)) from (e.__cause__ or e)
            raise self._fail(
                NodeUnavailable, f"{what}: {e}", _errno_of(e, errno.ECONNRESET)
            ) from None
        except TimeoutError:
            raise self._fail(
                NodeTimeout, f"{what}: no answer within {self.timeout:g} s", errno.ETIMEDOUT
            ) from None
        except h11.RemoteProtocolError as e:
            raise self._fail(NodeProtocolError, f"{what}: {e}", errno.EPROTO) from None
        except OSError as e:
            raise self._fail(
                NodeUnavailable,
                f"{what}: {str(e) or type(e).__name__}",
                _errno_of(e, errno.EIO),
            ) from None
        finally:
            self._pool.give(sock, reusable)
        if status != 401:
            who = headers.get("hafs-node-id")
            if who is None:
                detail = _detail(body)
                raise self._fail(
                    NodeProtocolError,
                    f"{what}: answer {status} without Hafs-Node-Id: not a hafs node"
                    + (f" ({detail})" if detail else ""),
                    errno.EPROTO,
                    status,
                )
            if who != self.node_id and status != 409 and not self._anonymous:
                desc = (
                    f"answers as node {who[:80]!r}" if who else "is unclaimed (an empty directory)"
                )
                raise self._fail(
                    NodeIdentityMismatch,
                    f"{desc}, expected {self.node_id}",
                    errno.EPROTO,
                    status,
                )
        return status, headers, body

    def _exchange(
        self,
        sock: socket.socket,
        method: str,
        target: str,
        content: bytes | memoryview | None,
        max_body: int,
        deadline: float,
        creds: Credentials,
    ) -> tuple[int, dict[str, str], bytearray, bool]:
        """Send one request on `sock` and read its answer: (status, headers, body, reusable).

        Raises _NoAnswer if the connection ends before the answer's first byte,
        TimeoutError past `deadline`, h11.RemoteProtocolError for a malformed
        answer, NodeProtocolError for one larger than allowed, OSError.
        """
        what = f"{method} {target.partition('?')[0]}"
        conn = h11.Connection(h11.CLIENT)  # one per request: the body bypasses h11 below
        headers = self._headers
        if creds.token is not None:
            headers = headers + [(b"authorization", f"Bearer {creds.token}".encode())]
        if content is not None:
            headers = headers + [
                (b"content-type", b"application/octet-stream"),
                (b"content-length", str(len(content)).encode()),
            ]
        head = conn.send(h11.Request(method=method, target=target, headers=headers))
        sent: OSError | None = None
        # No SIGPIPE on a connection the node reset: the short CLI commands (fsck,
        # rebalance) run with SIGPIPE at SIG_DFL, for pipes; the mount and the node
        # ignore it. (SSLSocket takes no flags: OpenSSL writes itself.)
        flags = 0 if isinstance(sock, ssl.SSLSocket) else socket.MSG_NOSIGNAL
        try:
            _wait_at_most(sock, deadline)
            sock.sendall(head, flags)  # sendall's timeout bounds the whole send
            if content:
                sock.sendall(content, flags)
        except TimeoutError:
            raise
        except OSError as e:  # the node may have answered early (401, 413) and closed: read on
            sent = e

        # The head, through h11.
        received = False
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                break
            if event is h11.NEED_DATA:
                _wait_at_most(sock, deadline)
                try:
                    data = sock.recv(HEAD_RECV)
                except ConnectionError as e:
                    if received:
                        raise
                    raise _NoAnswer(f"connection reset: {e}") from e
                if not data and not received:
                    if sent is not None:
                        raise _NoAnswer(f"connection lost while sending: {sent}") from sent
                    raise _NoAnswer("the node closed the connection without answering")
                received = True
                conn.receive_data(data)
            # else an InformationalResponse (1xx): skipped
        status, version = event.status_code, event.http_version
        answer = {k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers}
        limit = max_body if 200 <= status < 300 else ERROR_MAX
        if method == "HEAD" or status in (204, 304):
            length: int | None = 0
        elif "transfer-encoding" in answer or "content-length" not in answer:
            length = None  # chunked, or up to the end of the stream: h11 decodes
        else:
            length = int(answer["content-length"])  # h11 checked that it is digits
        if length is not None and length > limit:
            raise self._fail(
                NodeProtocolError,
                f"{what}: answer of {length} bytes, more than {limit}",
                errno.EPROTO,
                status,
            )

        # The body: what h11 holds already, then (with a length) straight into the buffer.
        body = bytearray(length or 0)
        got = 0
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Data):
                n = len(event.data)
                if got + n > limit:
                    raise self._fail(
                        NodeProtocolError,
                        f"{what}: answer of more than {limit} bytes",
                        errno.EPROTO,
                        status,
                    )
                body[got : got + n] = event.data
                got += n
            elif event is h11.NEED_DATA and length is None:
                _wait_at_most(sock, deadline)
                conn.receive_data(sock.recv(CHUNK_RECV))
            else:
                break
        if length is not None and got < length:
            with memoryview(body) as view:
                while got < length:
                    _wait_at_most(sock, deadline)
                    n = sock.recv_into(view[got:])
                    if not n:
                        raise h11.RemoteProtocolError(
                            f"the answer ended after {got} of {length} bytes"
                        )
                    got += n
        connection = {t.strip() for t in answer.get("connection", "").lower().split(",")}
        reusable = (
            sent is None
            and length is not None  # no Content-Length: never a hafs node's, not worth keeping
            and not conn.trailing_data[0]  # nothing after the answer
            and version == b"1.1"
            and "close" not in connection
        )
        return status, answer, body, reusable

    def _certificate_error(self, e: ssl.SSLCertVerificationError) -> NodeCertificateError:
        """The refusal of a node's certificate, saying which check failed and what to do."""
        reason = e.verify_message or e.reason or str(e)
        host = urlsplit(self.address).hostname
        if e.verify_code in (X509_HOSTNAME_MISMATCH, X509_IP_ADDRESS_MISMATCH):
            message = (
                f"its certificate is not valid for {host} ({reason}): give the node a"
                f" certificate (--tls-cert) whose names include {host}, or address the node"
                " by a name its certificate holds"
            )
        else:
            message = (
                f"its certificate is not signed by {self.auth.describe_ca()} ({reason});"
                " check --tls-cert on the node, or the --ca-file given to mkfs, node add or"
                " 'hafs node ca'"
            )
        return self._fail(NodeCertificateError, message, errno.EACCES)

    def _unexpected(
        self, method: str, path: str, status: int, body: bytes | bytearray
    ) -> NodeError | NotOwner:
        """The error for an answer that the operation does not expect."""
        detail = _detail(body) or _REASONS.get(status, "")
        what = f"{method} {path}: {status} {detail}".rstrip()
        if status == 401:
            return self._fail(NodeAuthError, f"{what}: {AUTH_HINT}", errno.EACCES, status)
        if status == 403:
            return NotOwner(f"node {self.node_id} ({self.address}): {detail}")
        if status == 409:
            return self._fail(NodeIdentityMismatch, what, errno.EPROTO, status)
        if status == 507:
            return self._fail(NodeRefused, what, errno.ENOSPC, status)
        if status in (413, 422) or 500 <= status < 600:
            return self._fail(NodeRefused, what, errno.EIO, status)
        return self._fail(NodeProtocolError, what, errno.EPROTO, status)

    def _json(
        self, method: str, path: str, params: dict | None = None, content: bytes | None = None
    ) -> dict:
        status, _, body = self._request(method, path, params=params, content=content)
        if status != 200:
            raise self._unexpected(method, path, status, body)
        try:
            value = json.loads(body)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise self._fail(
                NodeProtocolError, f"{method} {path}: answer is not a JSON object", errno.EPROTO
            )
        return value

    # --------------------------------------------------------------- blocks

    def put(self, block_id: str, data: bytes | bytearray | memoryview) -> None:
        """Store `data` under `block_id` on the node, durably (the node fsyncs before 204).

        The node refuses (NodeRefused, 422) bytes that do not hash to the id.
        """
        bid = check_block_id(block_id)
        body = memoryview(data).cast("B")  # sent from the caller's buffer: no copy
        if len(body) > MAX_SIZE:
            raise ValueError(f"block {bid} has {len(body)} bytes; a block is at most {MAX_SIZE}")
        path = f"/blocks/{bid}"
        status, _, answer = self._request("PUT", path, content=body, max_body=ERROR_MAX)
        if status not in (200, 201, 204):
            raise self._unexpected("PUT", path, status, answer)

    def get(self, block_id: str) -> memoryview:
        """The bytes of block `block_id`, verified against the id here: a read-only memoryview.

        Raises BlockMissing if the node lacks it, BlockCorrupt if its copy failed
        the hash there (the node moved it aside) or the bytes received do.
        """
        bid = check_block_id(block_id)
        path = f"/blocks/{bid}"
        status, _, body = self._request("GET", path, max_body=MAX_SIZE)
        if status == 404:
            raise BlockMissing(bid, f"not on node {self.node_id}")
        if status == 410:
            raise BlockCorrupt(bid, where=self.node_id)
        if status != 200:
            raise self._unexpected("GET", path, status, body)
        actual = blake3(body).hexdigest()
        if actual != bid:
            log.warning(
                "BLOCK-CORRUPT %s from node %s (%s): %d bytes received hash to %s",
                bid,
                self.node_id,
                self.address,
                len(body),
                actual,
            )
            raise BlockCorrupt(bid, where=self.node_id)
        return memoryview(body).toreadonly()  # the buffer received into: no copy

    def _head(self, block_id: str) -> tuple[int, int] | None:
        """(size, mtime_ns) of the block on the node, or None if it lacks it."""
        bid = check_block_id(block_id)
        path = f"/blocks/{bid}"
        status, headers, body = self._request("HEAD", path)
        if status == 404:
            return None
        if status != 200:
            raise self._unexpected("HEAD", path, status, body)
        size, mtime = headers.get("hafs-size", ""), headers.get("hafs-mtime-ns", "")
        if not (_INT_RE.fullmatch(size) and _INT_RE.fullmatch(mtime)):
            raise self._fail(
                NodeProtocolError,
                f"HEAD {path}: bad Hafs-Size {size[:30]!r} or Hafs-Mtime-Ns {mtime[:30]!r}",
                errno.EPROTO,
            )
        return int(size), int(mtime)

    def has(self, block_id: str) -> bool:
        """True if the node has a file for `block_id` (not verified)."""
        return self._head(block_id) is not None

    def size(self, block_id: str) -> int | None:
        """The size of block `block_id` in bytes, or None if the node lacks it."""
        st = self._head(block_id)
        return None if st is None else st[0]

    def mtime_ns(self, block_id: str) -> int | None:
        """When the node last stored block `block_id` (its clock), or None if absent."""
        st = self._head(block_id)
        return None if st is None else st[1]

    def delete(self, block_id: str) -> bool:
        """Remove block `block_id` from the node; True if it was there. Durable on return.

        NotOwner if the node belongs to another metadata store (module docstring)."""
        bid = check_block_id(block_id)
        path = f"/blocks/{bid}"
        status, _, body = self._request("DELETE", path)
        if status == 403 and self._retake(body):
            status, _, body = self._request("DELETE", path)
        if status == 204:
            return True
        if status == 404:
            return False
        raise self._unexpected("DELETE", path, status, body)

    def _retake(self, body: bytes | bytearray) -> bool:
        """After a refused delete: switch the node to our owner if it records a token we
        held before (or none); True if it did."""
        try:
            recorded = json.loads(body).get("owner")
        except (ValueError, AttributeError):
            return False
        if self.owner is None or not self.owner.takes(recorded):
            return False
        self.set_owner(self.owner, expect=(recorded,))
        return True

    def iter_ids(self, after: str = "", limit: int = 1000) -> list[str]:
        """One page of block ids, sorted, each strictly greater than `after` (as DirStore)."""
        if not isinstance(after, str) or _PREFIX_RE.fullmatch(after) is None:
            raise ValueError(f"invalid iter_ids cursor {after!r}: expected lower-case hex")
        if limit < 1:
            raise ValueError(f"iter_ids limit must be positive, got {limit}")
        out: list[str] = []
        cursor = after
        while len(out) < limit:
            want = min(limit - len(out), PAGE_MAX)
            page = self._json("GET", "/blocks", {"after": cursor, "limit": want}).get("ids")
            if not isinstance(page, list) or len(page) > want:
                raise self._fail(NodeProtocolError, "GET /blocks: malformed page", errno.EPROTO)
            for bid in page:
                if not isinstance(bid, str) or not BLOCK_ID_RE.fullmatch(bid) or bid <= cursor:
                    raise self._fail(
                        NodeProtocolError,
                        f"GET /blocks: id {str(bid)[:80]!r} is malformed or out of order",
                        errno.EPROTO,
                    )
                cursor = bid
            out.extend(page)
            if len(page) < want:
                break
        return out

    # ----------------------------------------------------------------- node

    def status(self) -> dict:
        """The node's GET /status (see hafs.node), its figures checked to be integers."""
        st = self._json("GET", "/status")
        for key in ("total_bytes", "free_bytes", "block_count", "block_bytes"):
            value = st.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise self._fail(
                    NodeProtocolError, f"GET /status: bad {key} {value!r}", errno.EPROTO
                )
        return st

    def usage(self) -> StoreUsage:
        """Capacity and free space of the node's disk, and what the blocks take (<= 1 s old)."""
        st = self.status()
        return StoreUsage(
            total_bytes=st["total_bytes"],
            free_bytes=st["free_bytes"],
            block_count=st["block_count"],
            block_bytes=st["block_bytes"],
        )

    def ping(self) -> None:
        """Return if the node answers as the expected node (a cheap health probe)."""
        self._json("GET", "/ping")

    @classmethod
    def _anonymous_store(
        cls, address: str, token: str | None, auth: NodeAuth | None, timeout: float
    ) -> RemoteStore:
        """A store that sends no identity and takes any (probe, claim: before the ring exists)."""
        store = cls(address, "?", "?", token=token, auth=auth, timeout=timeout, max_connections=1)
        store._anonymous = True
        store._headers = [
            (k, v) for k, v in store._headers if k not in (b"hafs-node-id", b"hafs-fs-uuid")
        ]
        return store

    def _reported_identity(self, what: str, answer: dict) -> tuple[str, str] | tuple[None, None]:
        """(node_id, fs_uuid) of a /ping or /claim answer: both strings, or both None."""
        node_id, fs_uuid = answer.get("node_id"), answer.get("fs_uuid")
        if node_id is None and fs_uuid is None:
            return None, None
        if not (isinstance(node_id, str) and node_id and isinstance(fs_uuid, str) and fs_uuid):
            raise self._fail(NodeProtocolError, f"{what}: bad node_id or fs_uuid", errno.EPROTO)
        return node_id, fs_uuid

    @classmethod
    def probe(
        cls,
        address: str,
        *,
        token: str | None = None,
        auth: NodeAuth | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> tuple[str, str] | tuple[None, None]:
        """(node_id, fs_uuid) that the node at `address` serves, both None if it is unclaimed.

        For mkfs, before the ring exists: sends no identity (as `claim`); `auth` or
        `token` as for the constructor. Raises NodeError subclasses like the other calls.
        """
        with cls._anonymous_store(address, token, auth, timeout) as store:
            return store._reported_identity("GET /ping", store._json("GET", "/ping"))

    @classmethod
    def claim(
        cls,
        address: str,
        node_id: str,
        fs_uuid: str,
        *,
        token: str | None = None,
        auth: NodeAuth | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        """Make the unclaimed node at `address` node `node_id` of filesystem `fs_uuid`.

        Durable on return. Idempotent: a node that already is that node says yes
        again. Raises NodeIdentityMismatch if it is another node or filesystem,
        NodeAuthError (token), NodeUnavailable (unreachable), NodeRefused (it
        cannot write its directory) or NodeProtocolError (not a hafs node).
        """
        body = json.dumps({"node_id": node_id, "fs_uuid": fs_uuid}).encode()
        with cls._anonymous_store(address, token, auth, timeout) as store:
            answer = store._json("POST", "/claim", content=body)
            if store._reported_identity("POST /claim", answer) != (node_id, fs_uuid):
                raise store._fail(
                    NodeProtocolError, "POST /claim: answered another identity", errno.EPROTO
                )

    def set_owner(self, claim: OwnerClaim, expect: tuple[str | None, ...] | None = None) -> None:
        """Record `claim`'s store as the node's owner, durably (POST /owner); with `expect`,
        only if the node's owner now is one of those (else NotOwner, nothing changed)."""
        body = {"owner": claim.token, "where": claim.where}
        if expect is not None:
            body["expect"] = list(expect)
        status, _, answer = self._request("POST", "/owner", content=json.dumps(body).encode())
        if status == 409:
            detail = _detail(answer) or "another metadata store owns it"
            raise NotOwner(f"node {self.node_id} ({self.address}): {detail}")
        if status != 200:
            raise self._unexpected("POST", "/owner", status, answer)

    def check_identity(self) -> None:
        """Check that the node is `node_id` of `fs_uuid` (e.g. when mounting), and with an
        owner, take the node for it (module docstring, "Ownership").

        Raises NodeIdentityError (a UserError: the ring or the node is misconfigured)
        if it is another one (NodeOwnedElsewhere: another metadata store's),
        NodeAuthError if the token is wrong, and other NodeErrors if it cannot be asked.
        """
        try:
            st = self._json("GET", "/ping")
        except NodeIdentityMismatch as e:
            raise NodeIdentityError(
                f"{e}: the ring names {self.address} as node {self.node_id} of filesystem"
                f" {self.fs_uuid}; fix the node's address or start the right node there"
            ) from None
        if st.get("node_id") != self.node_id or st.get("fs_uuid") != self.fs_uuid:
            raise NodeIdentityError(
                f"{self.address} is node {st.get('node_id')!r} of filesystem"
                f" {st.get('fs_uuid')!r}, expected node {self.node_id} of {self.fs_uuid}"
            )
        if self.owner is None or "owner" not in st:  # no owner to take; an older node
            return
        recorded = st["owner"]
        if recorded == self.owner.token:
            return
        if not self.owner.takes(recorded):
            raise NodeOwnedElsewhere(
                foreign(f"node {self.node_id} at {self.address}", st.get("owner_where"))
            )
        try:
            self.set_owner(self.owner, expect=(recorded,))
        except NotOwner as e:  # taken by another store meanwhile
            raise NodeOwnedElsewhere(str(e)) from None

    def cleanup_tmp(self, older_than_s: float = 3600) -> int:
        """Nothing to do here: the node removes its stale temp files when it starts."""
        return 0
