"""A node cannot be starved by slow clients (issue 13, point 4).

Real `hafs node` processes on loopback; the flood is bounded in count (1,100
sockets) and time (about 20 s), and every socket is closed in `finally`.
"""

from __future__ import annotations

import contextlib
import re
import resource
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from nodeproc import Node, running

from hafs.store.dirstore import block_id

TOKEN = "starve-me-not"
HEAD_TIMEOUT_S = 10.0  # hafs.node.server.HEAD_TIMEOUT_S
SLOW_HEAD = b"GET /ping HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 4000  # never finished


@pytest.fixture(scope="module", autouse=True)
def enough_descriptors() -> Iterator[None]:
    """The flood needs 1,100 descriptors in this process (the node raises its own limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    if want < 1300:
        pytest.skip(f"the hard descriptor limit {hard} is too low for the flood")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def ask(port: int, token: str | None, sock: socket.socket | None = None) -> int:
    """The status of an authorised GET /ping (on `sock`, kept open, or a new connection)."""
    own = sock is None
    if own:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        sock.sendall(f"GET /ping HTTP/1.1\r\nHost: t\r\n{auth}\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer) < _length(answer):
            piece = sock.recv(4096)
            if not piece:
                raise ConnectionError(f"closed after {answer!r}")
            answer += piece
        return int(answer.split(b" ", 2)[1])
    finally:
        if own:
            sock.close()


def _length(answer: bytes) -> int:
    head, _, _ = answer.partition(b"\r\n\r\n")
    m = re.search(rb"(?i)content-length: *(\d+)", head)
    return len(head) + 4 + (int(m.group(1)) if m else 0)


def closed_by_node(sock: socket.socket, wait: float) -> bool:
    """True if the node closed `sock` (EOF or reset) within `wait` seconds."""
    sock.settimeout(wait)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except TimeoutError:
        return False
    except OSError:
        return True


def shed(node: Node, reason: str) -> int:
    """hafs_node_connections_shed_total{reason} from the node's /metrics."""
    with node.client(TOKEN) as c:
        text = c.get("/metrics").text
    m = re.search(rf'hafs_node_connections_shed_total{{reason="{reason}"}} (\d+)', text)
    assert m, text
    return int(m.group(1))


class Flood:
    """`count` sockets from several loopback addresses, each sending one byte a second
    of a request head that never ends; a socket the node closes is opened again."""

    def __init__(self, port: int, count: int, sources: int = 11) -> None:
        self.port = port
        self.sources = [f"127.0.0.{i + 1}" for i in range(sources)]
        self.socks: list[socket.socket | None] = [None] * count
        self.sent = [0] * count
        self.reconnects = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self, i: int) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((self.sources[i % len(self.sources)], 0))
        sock.connect_ex(("127.0.0.1", self.port))
        self.socks[i], self.sent[i] = sock, 0

    def _run(self) -> None:
        for i in range(len(self.socks)):
            self._open(i)
        while not self.stop.wait(1.0):
            for i, sock in enumerate(self.socks):
                try:
                    sock.send(SLOW_HEAD[self.sent[i] : self.sent[i] + 1])
                    self.sent[i] += 1
                except BlockingIOError:  # still connecting (or the backlog is full)
                    continue
                except OSError:  # the node closed it: come back
                    sock.close()
                    self.reconnects += 1
                    self._open(i)

    def __enter__(self) -> Flood:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)
        for sock in self.socks:
            if sock is not None:
                sock.close()


def test_an_authorised_client_is_served_during_a_slow_flood(tmp_path) -> None:
    """1,100 sockets trickling a head at one byte a second hold no slot an authorised
    client needs: puts and gets are served, each within a few seconds."""
    with running(tmp_path / "n1", token=TOKEN) as node, Flood(node.port, 1100) as flood:
        started = time.monotonic()
        time.sleep(4)  # every flood socket is connected and trickling
        served = 0
        while time.monotonic() - started < 18:
            data = f"block {served} during the flood".encode()
            t0 = time.monotonic()
            with node.store(timeout=5) as store:  # a new client each round: new connections
                store.put(block_id(data), data)
                assert bytes(store.get(block_id(data))) == data
            assert time.monotonic() - t0 < 5, "a put and a get took longer than 5 s"
            served += 1
            time.sleep(1)
        assert served >= 10
        assert flood.reconnects > 0, "the node never shed a flood connection"
        print(f"served {served} put+get rounds; {flood.reconnects} flood reconnects")
        assert shed(node, "peer") + shed(node, "unauthenticated") > 0
        assert ask(node.port, TOKEN) == 200
    assert "Traceback" not in node.log_text()


def test_a_head_must_arrive_whole_within_the_deadline(tmp_path) -> None:
    """A client trickling a head is closed HEAD_TIMEOUT_S after it connected, though it
    is never silent for long (so a per-read timeout would never fire)."""
    with running(tmp_path / "n1", token=TOKEN) as node:
        sock = socket.create_connection(("127.0.0.1", node.port))
        try:
            t0 = time.monotonic()
            sock.settimeout(1)
            closed = False
            for byte in SLOW_HEAD[:30]:
                try:
                    sock.send(bytes([byte]))
                    if not sock.recv(1):
                        closed = True
                        break
                except TimeoutError:
                    continue
                except OSError:
                    closed = True
                    break
            elapsed = time.monotonic() - t0
            assert closed, "the node kept a trickling head for 30 s"
            assert elapsed < HEAD_TIMEOUT_S + 3
        finally:
            sock.close()


@contextlib.contextmanager
def sockets(port: int, count: int) -> Iterator[list[socket.socket]]:
    socks = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        yield socks
    finally:
        for s in socks:
            s.close()


def test_a_full_node_sheds_the_oldest_unauthenticated_then_idle_connection(tmp_path) -> None:
    """At --max-connections, an authorised request is served, not refused: the oldest
    unauthenticated connection is closed for it, and with none left the oldest idle one."""
    with running(tmp_path / "n1", "--max-connections", "4", token=TOKEN) as node:
        with sockets(node.port, 4) as silent:
            time.sleep(0.5)  # the node has accepted all four
            assert ask(node.port, TOKEN) == 200
            assert closed_by_node(silent[0], 3)
            assert not any(closed_by_node(s, 0.2) for s in silent[1:])
        assert shed(node, "full") >= 1

        with sockets(node.port, 4) as keepalive:
            for s in keepalive:  # authenticated, then idle between requests
                assert ask(node.port, TOKEN, s) == 200
            assert ask(node.port, TOKEN) == 200
            assert closed_by_node(keepalive[0], 3)
            for s in keepalive[1:]:  # the others stay open and usable
                assert ask(node.port, TOKEN, s) == 200
        assert shed(node, "full") >= 2


def test_unauthenticated_connections_are_bounded_per_peer(tmp_path) -> None:
    """Over --max-unauthenticated-per-peer, the oldest of that address's is closed; a
    request with a wrong token does not authenticate its connection."""
    args = ("--max-unauthenticated-per-peer", "2")
    with running(tmp_path / "n1", *args, token=TOKEN) as node, sockets(node.port, 3) as socks:
        assert ask(node.port, "wrong", socks[1]) == 401
        assert closed_by_node(socks[0], 3)
        assert ask(node.port, TOKEN, socks[1]) == 200  # now authenticated
        with sockets(node.port, 1):
            assert not closed_by_node(socks[2], 0.5)  # 2 and the new one: within the bound
            with sockets(node.port, 1):
                assert closed_by_node(socks[2], 3)
        assert not closed_by_node(socks[1], 0.2)
        assert shed(node, "peer") >= 2
