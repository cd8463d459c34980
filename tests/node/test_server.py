"""Tests of the block node server (hafs.node) and its client (hafs.remote).

Real `python -m hafs.node` processes on loopback ports, stopped by PID; raw
HTTP for the requests a RemoteStore never sends; a fake server for the answers
a hafs node never gives.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from hafs import __version__
from hafs.errors import BlockCorrupt, BlockMissing, NodeIdentityError, NodeOwnedElsewhere, NotOwner
from hafs.store import remote as remote_module
from hafs.store.chunker import MAX_SIZE
from hafs.store.dirstore import DirStore, block_id, read_identity
from hafs.store.owner import OwnerClaim
from hafs.store.remote import (
    NodeAuthError,
    NodeCertificateError,
    NodeError,
    NodeIdentityMismatch,
    NodeProtocolError,
    NodeRefused,
    NodeTimeout,
    NodeUnavailable,
    RemoteStore,
)

OTHER_FS = "9d8e2b11-7c4a-4f2e-8d6b-0a1e3c5b7d92"
TOKEN = "s3cr3t-t0ken-for-tests"


# ------------------------------------------------------------------ fixtures


from nodeproc import FS, Node, free_port, run_node, running, start_node  # noqa: E402


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator[Node]:
    """One node for the tests that do not restart or break it."""
    with running(tmp_path_factory.mktemp("node") / "n1") as n:
        yield n
    bad = [
        line
        for line in n.log_text().splitlines()
        if re.search(r"Traceback| ERROR ", line) and "DISK-ERROR" not in line
    ]
    assert not bad, "unexpected errors in the node's log:\n" + "\n".join(bad[:20])


@pytest.fixture(scope="module")
def token_node(tmp_path_factory) -> Iterator[Node]:
    with running(tmp_path_factory.mktemp("tnode") / "n1", token=TOKEN) as n:
        yield n


@pytest.fixture
def remote(node) -> Iterator[RemoteStore]:
    with node.store() as s:
        yield s


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def raw_request(port: int, request: bytes, timeout: float = 10) -> tuple[int, bytes]:
    """Send raw bytes, read until the node closes; (status, whole answer). Status 0: none."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(request)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                answer += chunk
    m = re.match(rb"HTTP/1\.1 (\d{3})", answer)
    return (int(m.group(1)) if m else 0), answer


def ping_ok(node: Node) -> bool:
    with node.client(node.token) as c:
        return c.get("/ping").status_code == 200


# ---------------------------------------------------------- the happy paths


def test_round_trip(remote: RemoteStore, node: Node) -> None:
    blocks = {block_id(d): d for d in (b"", b"a", b"hello world", os.urandom(300_000))}
    for bid, data in blocks.items():
        assert not remote.has(bid)
        assert remote.size(bid) is None and remote.mtime_ns(bid) is None
        remote.put(bid, data)
        remote.put(bid, memoryview(data))  # idempotent; any buffer
    for bid, data in blocks.items():
        assert remote.get(bid) == data
        assert remote.has(bid)
        assert remote.size(bid) == len(data)
        assert remote.mtime_ns(bid) == node.block_file(bid).stat().st_mtime_ns
        assert node.block_file(bid).read_bytes() == data
    mine = sorted(blocks)
    listed = [b for b in remote.iter_ids() if b in blocks]
    assert listed == mine
    # Paging: a cursor, limits smaller than the count, a hex prefix as cursor.
    assert [b for b in remote.iter_ids(after=mine[0]) if b in blocks] == mine[1:]
    everything = remote.iter_ids(limit=10**6)
    assert remote.iter_ids(limit=2) == everything[:2]
    assert (
        remote.iter_ids(after=everything[1][:5], limit=1)
        == [b for b in everything if b > everything[1][:5]][:1]
    )
    for bid in mine:
        assert remote.delete(bid) is True
        assert remote.delete(bid) is False
        assert not remote.has(bid)
        with pytest.raises(BlockMissing):
            remote.get(bid)
    with pytest.raises(ValueError):
        remote.iter_ids(after="XYZ")
    with pytest.raises(ValueError):
        remote.get("../etc/passwd")


def test_largest_block(remote: RemoteStore) -> None:
    data = os.urandom(MAX_SIZE)
    bid = block_id(data)
    remote.put(bid, data)
    assert remote.get(bid) == data
    assert remote.delete(bid)
    with pytest.raises(ValueError):
        remote.put(block_id(data + b"x"), data + b"x")


def test_status_and_usage(remote: RemoteStore, node: Node) -> None:
    st = remote.status()
    assert st["node_id"] == "n1" and st["fs_uuid"] == FS
    assert st["version"] and st["max_block_size"] == MAX_SIZE
    assert 0 < st["free_bytes"] <= st["total_bytes"]
    data = os.urandom(1000)
    remote.put(block_id(data), data)
    time.sleep(1.1)  # the node reuses a block count for 1 s
    usage = remote.usage()
    count = len(list((node.data / "blocks").glob("*/*")))
    assert usage.block_count == count >= 1
    assert usage.block_bytes >= 1000
    remote.ping()
    remote.check_identity()
    remote.delete(block_id(data))


def test_metrics(remote: RemoteStore, node: Node) -> None:
    data = os.urandom(5000)
    bid = block_id(data)
    with node.client() as c:
        before = c.get("/metrics").text
        remote.put(bid, data)
        remote.get(bid)
        remote.has(bid)
        c.get("/blocks/nothex")
        after = c.get("/metrics")
    assert after.status_code == 200
    assert after.headers["content-type"].startswith("text/plain; version=0.0.4")

    def value(text: str, sample: str) -> float:
        m = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    text = after.text
    assert "# TYPE hafs_node_requests_total counter" in text
    for sample in (
        'hafs_node_requests_total{method="PUT",status="204"}',
        'hafs_node_requests_total{method="GET",status="200"}',
        'hafs_node_requests_total{method="HEAD",status="200"}',
        'hafs_node_requests_total{method="GET",status="400"}',
        "hafs_node_blocks_stored_total",
    ):
        assert value(text, sample) >= value(before, sample) + 1, sample
    assert value(text, "hafs_node_received_bytes_total") >= value(
        before, "hafs_node_received_bytes_total"
    ) + len(data)
    assert value(text, "hafs_node_sent_bytes_total") >= value(
        before, "hafs_node_sent_bytes_total"
    ) + len(data)
    assert re.search(r"^hafs_node_blocks \d+(\.0)?$", text, re.M)
    (info,) = (f for f in text_string_to_metric_families(text) if f.name == "hafs_node_info")
    assert info.samples[0].labels == {"node_id": "n1", "fs_uuid": FS, "version": __version__}
    remote.delete(bid)


def test_threads_share_one_store(remote: RemoteStore) -> None:
    datas = [os.urandom(50_000 + i) for i in range(32)]
    errors: list[BaseException] = []

    def work(part: list[bytes]) -> None:
        try:
            for d in part:
                remote.put(block_id(d), d)
                assert remote.get(block_id(d)) == d
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(datas[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for d in datas:
        assert remote.delete(block_id(d))


# -------------------------------------------------------------- bad requests


@pytest.mark.parametrize(
    "target",
    [
        b"/blocks/" + b"A" * 64,
        b"/blocks/" + b"a" * 63,
        b"/blocks/" + b"a" * 65,
        b"/blocks/nothex",
        b"/blocks/" + b"g" * 64,
        b"/blocks/..%2F..%2Fhafs-node.json",
        b"/blocks/..%2f" + b"a" * 61,
        b"/blocks/../hafs-node.json",
        b"/blocks/../../../../etc/passwd",
        b"/blocks/%00" + b"a" * 63,
        b"/blocks/" + b"a" * 62 + b"/x",
        b"/blocks/",
    ],
)
@pytest.mark.parametrize("method", [b"GET", b"PUT", b"HEAD", b"DELETE"])
def test_bad_ids_are_400(node: Node, target: bytes, method: bytes) -> None:
    before = files_under(node.data)
    body = b"hello"
    status, answer = raw_request(
        node.port,
        method
        + b" "
        + target
        + b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 5\r\n\r\n"
        + body,
    )
    assert status == 400, answer[:300]
    assert files_under(node.data) == before


def test_unknown_paths_and_methods(node: Node) -> None:
    bid = block_id(b"x")
    with node.client() as c:
        assert c.get("/").status_code == 404
        assert c.get("/hafs-node.json").status_code == 404
        assert c.post(f"/blocks/{bid}", content=b"x").status_code == 405
        assert c.put("/status", content=b"x").status_code == 405
        assert c.delete("/blocks").status_code == 405
        for query in (
            "after=XYZ",
            "limit=0",
            "limit=10001",
            "limit=x",
            "bogus=1",
            "after=" + "a" * 65,
        ):
            assert c.get(f"/blocks?{query}").status_code == 400, query
    assert ping_ok(node)


def test_wrong_hash_is_422_and_stores_nothing(node: Node, remote: RemoteStore) -> None:
    bid = block_id(b"the right bytes")
    before = files_under(node.data)
    with node.client() as c:
        r = c.put(f"/blocks/{bid}", content=b"the wrong bytes")
    assert r.status_code == 422
    assert "hash" in r.json()["error"]
    assert files_under(node.data) == before
    assert not remote.has(bid)
    with pytest.raises(NodeRefused) as e:
        remote.put(bid, b"the wrong bytes")
    assert e.value.status == 422 and isinstance(e.value, OSError)
    assert files_under(node.data) == before


def test_oversized_body_is_413_before_it_is_read(node: Node) -> None:
    before = files_under(node.data)
    bid = "a" * 64
    # Only the head is sent: the node answers from Content-Length, not waiting for the body.
    t0 = time.monotonic()
    status, _ = raw_request(
        node.port,
        f"PUT /blocks/{bid} HTTP/1.1\r\nHost: t\r\nContent-Length: {MAX_SIZE + 1}\r\n\r\n".encode(),
    )
    assert status == 413 and time.monotonic() - t0 < 5
    status, _ = raw_request(
        node.port,
        f"PUT /blocks/{bid} HTTP/1.1\r\nHost: t\r\nContent-Length: {10**30}\r\n\r\n".encode(),
    )
    assert status in (400, 413)
    # A chunked body is counted while it streams: refused once it passes MAX_SIZE.
    chunk = b"x" * 65536
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    body = framed * (MAX_SIZE // len(chunk) + 2) + b"0\r\n\r\n"
    status, _ = raw_request(
        node.port,
        f"PUT /blocks/{bid} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        + body,
    )
    assert status == 413
    # A body longer than announced is not taken either.
    with node.client() as c:
        data = os.urandom(MAX_SIZE + 1)
        with contextlib.suppress(httpx.TransportError):  # the node may close while we send
            assert c.put(f"/blocks/{block_id(data)}", content=data).status_code == 413
    assert files_under(node.data) == before
    assert ping_ok(node)


def test_garbage_on_the_socket(node: Node) -> None:
    for junk in (
        b"\x00\xff\xfe garbage \r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /sta tus HTTP/1.1\r\nHost: t\r\n\r\n",
        b"PUT /blocks/" + b"a" * 64 + b" HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"PUT /blocks/" + b"a" * 64 + b" HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
        b"Content-Length: 6\r\n\r\nhello!",
        b"GET /status HTTP/1.1\r\nHost: t\r\nX-Big: " + b"y" * 100_000 + b"\r\n\r\n",
        b"GET /status HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n",
        random.Random(7).randbytes(5000) + b"\r\n\r\n",
        b"A" * 20_000,  # a request line longer than the server buffers
    ):
        status, answer = raw_request(node.port, junk)
        assert status in (0, 400, 413, 431), answer[:200]
        assert ping_ok(node)
    # A client that connects and vanishes mid-body.
    with socket.create_connection(("127.0.0.1", node.port)) as s:
        s.sendall(
            b"PUT /blocks/" + b"b" * 64 + b" HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\nab"
        )
    time.sleep(0.1)
    assert ping_ok(node)
    assert not (node.data / "blocks" / "bb" / ("b" * 64)).exists()
    with node.client() as c:  # the next request on a fresh connection is served as usual
        assert c.get("/status").json()["node_id"] == "n1"


def test_token(token_node: Node, tmp_path: Path) -> None:
    data = b"guarded"
    bid = block_id(data)
    before = files_under(token_node.data)
    for token in (None, "wrong", TOKEN + "x", TOKEN[:-1]):
        with token_node.client(token) as c:
            for method, path in (
                ("PUT", f"/blocks/{bid}"),
                ("GET", f"/blocks/{bid}"),
                ("HEAD", f"/blocks/{bid}"),
                ("DELETE", f"/blocks/{bid}"),
                ("GET", "/blocks"),
                ("GET", "/status"),
                ("GET", "/metrics"),
                ("GET", "/ping"),
                ("GET", "/blocks/nothex"),
                ("GET", "/nowhere"),
            ):
                r = c.request(method, path, content=data if method == "PUT" else None)
                assert r.status_code == 401, (token, method, path)
                assert "hafs-node-id" not in r.headers
    for header in (f"Basic {TOKEN}", TOKEN, f"Bearer{TOKEN}", f"Bearer {TOKEN} {TOKEN}"):
        with httpx.Client(base_url=token_node.url, trust_env=False) as c:
            assert c.get("/ping", headers={"authorization": header}).status_code == 401
    assert files_under(token_node.data) == before
    with pytest.raises(NodeAuthError) as e:
        token_node.store(token="wrong").put(bid, data)
    assert e.value.errno == 13 and e.value.status == 401
    with pytest.raises(NodeAuthError):
        token_node.store(token=None).get(bid)
    with token_node.store() as s:
        s.put(bid, data)
        assert s.get(bid) == data
        assert s.delete(bid)
    with httpx.Client(base_url=token_node.url, trust_env=False) as c:
        assert c.get("/ping", headers={"authorization": f"bearer  {TOKEN}"}).status_code == 200


def test_refused_body_keeps_the_connection(token_node: Node) -> None:
    """An answer sent before the body was read: the body is drained, the next request served."""
    body = os.urandom(1 << 20)
    bid = block_id(body)
    refused = (
        f"PUT /blocks/{bid} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer nope\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    ping = f"GET /ping HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n".encode()
    status, answer = raw_request(
        token_node.port, refused + ping + b"\r\n" + ping + b"Connection: close\r\n\r\n"
    )
    assert status == 401
    assert re.findall(rb"HTTP/1\.1 (\d+)", answer) == [b"401", b"200", b"200"]
    assert not token_node.block_file(bid).exists()


def test_probe(node: Node, token_node: Node) -> None:
    assert RemoteStore.probe(node.url) == ("n1", FS)
    assert RemoteStore.probe(token_node.url, token=TOKEN) == ("n1", FS)
    with pytest.raises(NodeAuthError):
        RemoteStore.probe(token_node.url)
    with pytest.raises(NodeUnavailable):
        RemoteStore.probe(f"http://127.0.0.1:{free_port()}", timeout=2)


def test_identity_mismatch(node: Node) -> None:
    bid = block_id(b"whose?")
    with node.store(node_id="n2") as s:
        with pytest.raises(NodeIdentityMismatch):
            s.has(bid)
        with pytest.raises(NodeIdentityError):
            s.check_identity()
    with node.store(fs_uuid=OTHER_FS) as s:
        with pytest.raises(NodeIdentityMismatch):
            s.put(bid, b"whose?")
        with pytest.raises(NodeIdentityError):
            s.check_identity()
    assert not node.block_file(bid).exists()


# ------------------------------------------------------------ node lifecycle


def test_identity_contract(tmp_path: Path, node: Node) -> None:
    p = run_node()
    assert p.returncode == 2 and "needs --data DIR" in p.stderr
    d = tmp_path / "d"
    p = run_node("--data", str(d), "--fs-uuid", FS)
    assert p.returncode == 2 and "missing" in p.stderr and "--init" in p.stderr
    p = run_node("--data", str(tmp_path / "nowhere" / "d"))
    assert p.returncode == 2 and "cannot create" in p.stderr and "parent" in p.stderr
    assert not d.exists() and not (tmp_path / "nowhere").exists()
    d.mkdir()
    p = run_node("--data", str(d), "--fs-uuid", FS)
    assert p.returncode == 2 and "empty" in p.stderr and FS in p.stderr
    p = run_node("--data", str(d), "--init", "n1")
    assert p.returncode == 2 and "--fs-uuid" in p.stderr
    p = run_node("--data", str(d), "--init", "../n1", "--fs-uuid", FS)
    assert p.returncode == 2 and "node id" in p.stderr
    p = run_node("--data", str(d), "--init", "n1", "--fs-uuid", "not-a-uuid")
    assert p.returncode == 2 and "UUID" in p.stderr
    (d / "stray").write_text("x")
    p = run_node("--data", str(d), "--init", "n1", "--fs-uuid", FS)
    assert p.returncode == 2 and "not empty" in p.stderr
    p = run_node("--data", str(d))  # not a node directory, and not free to be claimed
    assert p.returncode == 2 and "no identity file" in p.stderr and "not empty" in p.stderr
    assert os.listdir(d) == ["stray"]
    DirStore.create(tmp_path / "other", "n1", OTHER_FS)
    p = run_node("--data", str(tmp_path / "other"), "--init", "n1", "--fs-uuid", FS)
    assert p.returncode == 2 and OTHER_FS in p.stderr
    p = run_node("--data", str(tmp_path / "other"), "--fs-uuid", FS)
    assert p.returncode == 2 and OTHER_FS in p.stderr and "refusing" in p.stderr
    p = run_node("--data", str(tmp_path / "other"), "--listen", "nonsense")
    assert p.returncode == 2 and "HOST:PORT" in p.stderr
    p = run_node("--data", str(tmp_path / "other"), "--token-file", str(tmp_path / "none"))
    assert p.returncode == 2 and "token file" in p.stderr
    assert not list((tmp_path / "other" / "blocks").glob("*/*"))
    busy = f"127.0.0.1:{node.port}"
    p = run_node("--data", str(tmp_path / "n2"), "--init", "n2", "--fs-uuid", FS, "--listen", busy)
    assert p.returncode == 2 and "cannot listen" in p.stderr and "Traceback" not in p.stderr
    assert "Address already in use" in p.stderr
    p = run_node("--data", str(tmp_path / "n3"), "--listen", busy)  # would be served unclaimed
    assert p.returncode == 2 and "cannot listen" in p.stderr
    assert not (tmp_path / "n2").exists() and not (tmp_path / "n3").exists()  # nothing created
    p = run_node("--data", str(tmp_path / "n4"), "--listen", "127.0.0.1:70000")
    assert p.returncode == 2 and "port 70000 is out of range 1-65535" in p.stderr
    assert not (tmp_path / "n4").exists()
    for option in ("--max-connections", "--max-unauthenticated-per-peer"):
        p = run_node("--data", str(tmp_path / "n5"), option, "0")
        assert p.returncode == 2 and f"{option} must be at least 1" in p.stderr


def test_restart_serves_old_blocks_and_sigterm_exits_0(tmp_path: Path) -> None:
    data = tmp_path / "n1"
    node = start_node(data)
    store = node.store(timeout=5)
    try:
        blocks = [os.urandom(n) for n in (1, 1000, 200_000)]
        for b in blocks:
            store.put(block_id(b), b)
        assert node.stop(signal.SIGTERM) == 0
        assert "NODE-STOPPED" in node.log_text()
        with pytest.raises(NodeUnavailable) as e:
            store.get(block_id(blocks[0]))
        assert not isinstance(e.value, NodeTimeout)
        # Restart without --init, on the same port: the pooled client reconnects by itself.
        node = start_node(data, init=None, port=node.port)
        for b in blocks:
            assert store.get(block_id(b)) == b
        assert sorted(store.iter_ids()) == sorted(block_id(b) for b in blocks)
        assert node.stop(signal.SIGINT) == 0
        assert "Traceback" not in node.log_text()
    finally:
        store.close()
        node.stop(signal.SIGKILL)


def test_sigterm_lets_a_running_request_finish(tmp_path: Path) -> None:
    node = start_node(tmp_path / "n1")
    try:
        data = os.urandom(1 << 20)
        bid = block_id(data)
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as idle:
            idle.sendall(b"GET /ping HTTP/1.1\r\nHost: t\r\n\r\n")  # then stays idle
            answer = b""
            while not answer.endswith(b"}"):  # the whole JSON answer
                answer += idle.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200")
            with socket.create_connection(("127.0.0.1", node.port), timeout=10) as s:
                head = f"PUT /blocks/{bid} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(data)}"
                s.sendall(head.encode() + b"\r\n\r\n" + data[:1000])
                time.sleep(0.2)
                os.kill(node.proc.pid, signal.SIGTERM)
                time.sleep(0.2)
                assert idle.recv(100) == b""  # idle connections are closed at once
                s.sendall(data[1000:])
                answer = s.recv(1000)
        assert answer.startswith(b"HTTP/1.1 204") and b"connection: close" in answer.lower()
        assert node.proc.wait(10) == 0
        assert node.block_file(bid).read_bytes() == data
    finally:
        node.stop(signal.SIGKILL)


def test_corrupt_block_is_never_served(tmp_path: Path) -> None:
    with running(tmp_path / "n1") as node, node.store() as store:
        data = os.urandom(10_000)
        bid = block_id(data)
        store.put(bid, data)
        f = node.block_file(bid)
        raw = bytearray(f.read_bytes())
        raw[5000] ^= 1
        f.write_bytes(raw)
        with node.client() as c:
            r = c.get(f"/blocks/{bid}")
            assert r.status_code == 410 and r.content != bytes(raw)
            assert c.get(f"/blocks/{bid}").status_code == 404  # moved aside
        assert not f.exists()
        assert [p.name.split(".")[0] for p in (node.data / "corrupt").iterdir()] == [bid]
        with pytest.raises(BlockMissing):
            store.get(bid)
        store.put(bid, data)  # a good copy comes back
        f.write_bytes(raw)
        with pytest.raises(BlockCorrupt):
            store.get(bid)
        time.sleep(0.2)
        assert "BLOCK-CORRUPT" in node.log_text()


def test_stopped_node_times_out(node: Node) -> None:
    with node.store(timeout=0.5) as store:
        data = b"frozen"
        store.put(block_id(data), data)
        os.kill(node.proc.pid, signal.SIGSTOP)
        try:
            for call in (lambda: store.get(block_id(data)), lambda: store.put("c" * 64, b"x")):
                t0 = time.monotonic()
                with pytest.raises(NodeTimeout) as e:
                    call()
                assert time.monotonic() - t0 < 2.0
                assert isinstance(e.value, OSError) and e.value.errno == 110
        finally:
            os.kill(node.proc.pid, signal.SIGCONT)
        assert store.get(block_id(data)) == data
        store.delete(block_id(data))


def test_connection_refused() -> None:
    port = free_port()
    with RemoteStore(f"http://127.0.0.1:{port}", "n1", FS, timeout=2) as store:
        t0 = time.monotonic()
        with pytest.raises(NodeUnavailable) as e:
            store.get("a" * 64)
        assert time.monotonic() - t0 < 1
        assert e.value.errno == 111 and not isinstance(e.value, NodeTimeout)


def test_bad_addresses() -> None:
    from hafs.errors import UserError

    for address in ("127.0.0.1:80", "ftp://h:1", "http://h", "http://h:1/path", "http://h:x"):
        with pytest.raises(UserError):
            RemoteStore(address, "n1", FS)


# ---------------------------------------------------------- unclaimed nodes


def post_claim(node: Node, body: object) -> httpx.Response:
    with node.client(node.token) as c:
        if isinstance(body, bytes):
            return c.post("/claim", content=body)
        return c.post("/claim", json=body)


def test_unclaimed_node_answers_but_serves_no_blocks(tmp_path: Path) -> None:
    data = tmp_path / "u"  # missing: the node creates it
    with running(data, init=None) as node:
        assert data.is_dir() and os.listdir(data) == []
        assert "NODE-READY unclaimed node" in node.log_text()
        assert "hafs mkfs --node" in node.log_text()
        with node.client() as c:
            r = c.get("/ping")
            unclaimed = {"node_id": None, "fs_uuid": None, "owner": None, "owner_where": None}
            assert r.status_code == 200 and r.json() == unclaimed
            assert r.headers["hafs-node-id"] == "" and r.headers["hafs-fs-uuid"] == ""
            st = c.get("/status").json()
            assert st["node_id"] is None and st["fs_uuid"] is None
            assert 0 < st["free_bytes"] <= st["total_bytes"] and st["block_count"] == 0
            assert c.get("/metrics").status_code == 200
            # A client that names an identity is not refused with 409 on /ping.
            ident = {"hafs-node-id": "n1", "hafs-fs-uuid": FS}
            assert c.get("/ping", headers=ident).status_code == 200
            bid = block_id(b"early")
            for method, path in (
                ("PUT", f"/blocks/{bid}"),
                ("GET", f"/blocks/{bid}"),
                ("HEAD", f"/blocks/{bid}"),
                ("DELETE", f"/blocks/{bid}"),
                ("GET", "/blocks"),
                ("GET", "/blocks/nothex"),
            ):
                r = c.request(method, path, content=b"early" if method == "PUT" else None)
                assert r.status_code == 503, (method, path)
                if method != "HEAD":
                    assert "not claimed" in r.json()["error"] and "hafs mkfs" in r.json()["error"]
            assert c.get("/claim").status_code == 405
        assert RemoteStore.probe(node.url) == (None, None)
        with node.store() as s:  # a mount whose ring names this address: refused, clearly
            with pytest.raises(NodeIdentityMismatch, match="unclaimed"):
                s.get(bid)
            with pytest.raises(NodeIdentityError, match="unclaimed"):
                s.check_identity()
        assert os.listdir(data) == []
    assert "Traceback" not in node.log_text()


def test_claim_serves_the_identity_now_and_after_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "u"
    data.mkdir()
    node = start_node(data, init=None)
    try:
        RemoteStore.claim(node.url, "n7", FS)
        assert "NODE-CLAIMED node n7 of filesystem " + FS in node.log_text()
        assert RemoteStore.probe(node.url) == ("n7", FS)
        with node.store("n7") as s:
            s.check_identity()
            blob = os.urandom(10_000)
            s.put(block_id(blob), blob)
            assert s.get(block_id(blob)) == blob
            assert s.status()["node_id"] == "n7"
        RemoteStore.claim(node.url, "n7", FS)  # a retried mkfs: the same identity again
        for other in (("n8", FS), ("n7", OTHER_FS)):
            with pytest.raises(NodeIdentityMismatch) as e:
                RemoteStore.claim(node.url, *other)
            assert e.value.status == 409 and f"node n7 of filesystem {FS}" in str(e.value)
        assert RemoteStore.probe(node.url) == ("n7", FS)
        assert node.stop() == 0
        node = start_node(data, init=None, port=node.port)  # no --init: the claimed identity
        assert RemoteStore.probe(node.url) == ("n7", FS)
        with node.store("n7") as s:
            assert s.get(block_id(blob)) == blob
        with pytest.raises(NodeIdentityMismatch):
            RemoteStore.claim(node.url, "n8", FS)
        RemoteStore.claim(node.url, "n7", FS)
    finally:
        node.stop()
    assert not re.search(r"Traceback| ERROR ", node.log_text())


def test_bad_claims_change_nothing(tmp_path: Path) -> None:
    data = tmp_path / "u"
    with running(data, init=None) as node:
        for body in (
            b"",
            b"{not json",
            b"\xff\xfe",
            [],
            {"node_id": "n1"},
            {"node_id": "n1", "fs_uuid": FS, "extra": 1},
            {"node_id": "../n1", "fs_uuid": FS},
            {"node_id": "", "fs_uuid": FS},
            {"node_id": 5, "fs_uuid": FS},
            {"node_id": "n1", "fs_uuid": "not-a-uuid"},
            {"node_id": "n1", "fs_uuid": 7},
            {"node_id": "n1", "fs_uuid": FS.upper()},  # one spelling: headers compare bytes
        ):
            r = post_claim(node, body)
            assert r.status_code == 400, body
            assert "bad claim" in r.json()["error"]
        r = post_claim(node, {"node_id": "n1", "fs_uuid": FS, "pad": "x" * 5000})
        assert r.status_code == 413
        with pytest.raises(NodeProtocolError):  # 400: what the node said comes through
            RemoteStore.claim(node.url, "n/1", FS)
        assert os.listdir(data) == []
        assert RemoteStore.probe(node.url) == (None, None)
        # The directory was filled behind the node's back: the claim is refused, nothing written.
        (data / "stray").write_text("x")
        with pytest.raises(NodeIdentityMismatch, match="not empty"):
            RemoteStore.claim(node.url, "n1", FS)
        assert os.listdir(data) == ["stray"]
        assert RemoteStore.probe(node.url) == (None, None)


def test_claim_needs_the_token(tmp_path: Path) -> None:
    with running(tmp_path / "u", init=None, token=TOKEN) as node:
        for token in (None, "wrong"):
            with pytest.raises(NodeAuthError):
                RemoteStore.claim(node.url, "n1", FS, token=token)
            with pytest.raises(NodeAuthError):
                RemoteStore.probe(node.url, token=token)
            with node.client(token) as c:
                assert c.post("/claim", json={"node_id": "n1", "fs_uuid": FS}).status_code == 401
        assert os.listdir(node.data) == []
        assert RemoteStore.probe(node.url, token=TOKEN) == (None, None)
        RemoteStore.claim(node.url, "n1", FS, token=TOKEN)
        assert RemoteStore.probe(node.url, token=TOKEN) == ("n1", FS)


def test_concurrent_claims_one_wins(tmp_path: Path) -> None:
    with running(tmp_path / "u", "--threads", "4", init=None) as node:
        claims = [(f"n{i}", FS if i % 2 else OTHER_FS) for i in range(8)]
        barrier = threading.Barrier(len(claims))
        outcome: dict[tuple[str, str], object] = {}

        def claim(ident: tuple[str, str]) -> None:
            barrier.wait()
            try:
                RemoteStore.claim(node.url, *ident)
                outcome[ident] = "won"
            except NodeError as e:
                outcome[ident] = e

        threads = [threading.Thread(target=claim, args=(c,)) for c in claims]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [ident for ident, result in outcome.items() if result == "won"]
        assert len(winners) == 1, outcome
        losers = [r for r in outcome.values() if r != "won"]
        assert len(losers) == len(claims) - 1
        assert all(isinstance(r, NodeIdentityMismatch) for r in losers), losers
        assert RemoteStore.probe(node.url) == winners[0]
        ident = read_identity(node.data)
        assert ident is not None and (ident["node_id"], ident["fs_uuid"]) == winners[0]
        assert node.log_text().count("NODE-CLAIMED") == 1


# ------------------------------------------------- a node that answers garbage


class _FakeNode(socketserver.ThreadingTCPServer):
    """A fake node: reads each request and sends `answer` (bytes, or a function of the
    socket), `per_connection` times per connection, then closes; counts what it saw."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _FakeHandler)
        self.tls = tls
        self.answer: bytes | Callable[[socket.socket], None] = b""
        self.per_connection = 1
        self.connections = 0  # accepted
        self.requests = 0  # read in full
        self.closed_by_client = 0  # connections the client closed between requests
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"{'https' if self.tls else 'http'}://{host}:{port}"


class _FakeHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        srv: _FakeNode = self.server  # type: ignore[assignment]
        with srv.lock:
            srv.connections += 1
        with contextlib.suppress(OSError):  # the client may go away at any point
            sock = srv.tls.wrap_socket(self.request, server_side=True) if srv.tls else self.request
            buf = b""
            for _ in range(srv.per_connection):
                while b"\r\n\r\n" not in buf:
                    chunk = sock.recv(65536)
                    if not chunk:
                        with srv.lock:
                            srv.closed_by_client += 1
                        return
                    buf += chunk
                head, buf = buf.split(b"\r\n\r\n", 1)
                m = re.search(rb"content-length: (\d+)", head, re.I)
                size = int(m.group(1)) if m else 0
                while len(buf) < size:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                buf = buf[size:]
                with srv.lock:
                    srv.requests += 1
                answer = srv.answer
                if callable(answer):
                    answer(sock)
                else:
                    sock.sendall(answer)


@contextlib.contextmanager
def serving(server: _FakeNode) -> Iterator[_FakeNode]:
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def fake() -> Iterator[_FakeNode]:
    """One fake for the garbage answers: one answer per connection."""
    with serving(_FakeNode()) as server:
        yield server


@pytest.fixture
def keep_alive_fake() -> Iterator[_FakeNode]:
    """A fresh fake that keeps its connections open (its counters start at 0)."""
    server = _FakeNode()
    server.per_connection = 10**6
    with serving(server) as s:
        yield s


def _answer(
    status: int, body: bytes = b"", headers: str = "Hafs-Node-Id: n1\r\n", close: bool = True
) -> bytes:
    return (
        f"HTTP/1.1 {status} X\r\n{headers}Content-Length: {len(body)}\r\n"
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    ).encode() + body


PING = _answer(200, f'{{"node_id": "n1", "fs_uuid": "{FS}"}}'.encode(), close=False)


def test_garbage_answers_never_give_wrong_bytes(fake: _FakeNode) -> None:
    good = b"the real content"
    bid = block_id(good)
    with RemoteStore(fake.url, "n1", FS, timeout=2) as store:
        cases = [
            (_answer(200, b"not the real content"), BlockCorrupt),
            (_answer(200, good, headers=""), NodeProtocolError),  # not a hafs node
            (_answer(200, good, headers="Hafs-Node-Id: n9\r\n"), NodeIdentityMismatch),
            (_answer(302, b"", headers="Hafs-Node-Id: n1\r\nLocation: /x\r\n"), NodeProtocolError),
            (_answer(500, b'{"error": "disk on fire"}'), NodeRefused),
            (_answer(200, b"x" * (MAX_SIZE + 1)), NodeProtocolError),
            (b"SSH-2.0-OpenSSH_9.6\r\n", NodeProtocolError),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", NodeError),
            (b"", NodeError),
        ]
        for answer, expected in cases:
            fake.answer = answer
            with pytest.raises(expected):
                store.get(bid)
        fake.answer = _answer(200, good)
        assert store.get(bid) == good  # the fake serves the right bytes: accepted
        for answer in (
            _answer(200, b"[1, 2]"),
            _answer(200, b"{not json"),
            _answer(200, b'{"ids": ["zz"]}'),
            _answer(200, b'{"ids": ["' + b"b" * 64 + b'", "' + b"a" * 64 + b'"]}'),
            _answer(200, b'{"ids": 5}'),
        ):
            fake.answer = answer
            with pytest.raises(NodeProtocolError):
                store.iter_ids()
        fake.answer = _answer(200, b'{"total_bytes": -1}')
        with pytest.raises(NodeProtocolError):
            store.usage()
        fake.answer = _answer(200, headers="Hafs-Node-Id: n1\r\nHafs-Size: 1x\r\n")
        with pytest.raises(NodeProtocolError):
            store.size(bid)
        fake.answer = _answer(418, b"teapot")
        with pytest.raises(NodeProtocolError):
            store.delete(bid)


def wait_for(condition: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_pool_reuses_connections_across_threads(keep_alive_fake: _FakeNode) -> None:
    fake = keep_alive_fake
    fake.answer = PING
    errors: list[BaseException] = []
    with RemoteStore(fake.url, "n1", FS, max_connections=3) as store:

        def work() -> None:
            try:
                for _ in range(25):
                    store.ping()
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert fake.requests == 200
        assert 1 <= fake.connections <= 3
        assert fake.closed_by_client == 0
    wait_for(lambda: fake.closed_by_client == fake.connections)  # close() closed them


def test_waiting_for_a_free_connection_times_out(keep_alive_fake: _FakeNode) -> None:
    keep_alive_fake.answer = PING
    with RemoteStore(keep_alive_fake.url, "n1", FS, timeout=0.5, max_connections=1) as store:
        store.ping()
        taken = store._pool.take(time.monotonic() + 1)  # the only connection, in use
        assert taken is not None
        t0 = time.monotonic()
        with pytest.raises(NodeTimeout, match="no free connection") as e:
            store.ping()
        assert 0.4 < time.monotonic() - t0 < 2 and e.value.errno == 110
        store._pool.give(taken[0], True)
        store.ping()
    assert keep_alive_fake.connections == 1


def test_connections_not_kept(keep_alive_fake: _FakeNode, monkeypatch) -> None:
    """Connection: close, an answer not read in full, an idle one too old: not reused."""
    fake = keep_alive_fake
    with RemoteStore(fake.url, "n1", FS, timeout=5) as store:
        fake.answer = _answer(200, b"{}")  # Connection: close
        store.ping()
        store.ping()
        assert fake.connections == 2
        wait_for(lambda: fake.closed_by_client == 2)
        # An oversized answer is refused from its Content-Length, at once, unread.
        head = f"HTTP/1.1 200 OK\r\nHafs-Node-Id: n1\r\nContent-Length: {MAX_SIZE + 1}\r\n\r\n"
        fake.answer = head.encode()  # and no body: the fake waits for the next request
        t0 = time.monotonic()
        with pytest.raises(NodeProtocolError, match="more than"):
            store.get("a" * 64)
        assert time.monotonic() - t0 < 1
        fake.answer = PING
        store.ping()
        assert fake.connections == 4
        store.ping()
        assert fake.connections == 4  # kept: a complete keep-alive answer
        monkeypatch.setattr(remote_module, "KEEPALIVE_EXPIRY_S", 0.2)
        time.sleep(0.3)
        store.ping()
        assert fake.connections == 5
        wait_for(lambda: fake.closed_by_client == 4)  # the expired one was closed


def test_stale_connection_is_retried_once(keep_alive_fake: _FakeNode) -> None:
    fake = keep_alive_fake
    fake.answer = PING
    fake.per_connection = 1  # the fake closes each connection after one answer
    with RemoteStore(fake.url, "n1", FS, timeout=5) as store:
        store.ping()
        time.sleep(0.1)  # the close reaches us; the connection sits in the pool
        store.ping()  # on the pooled connection: fails at once, retried on a new one
        assert (fake.connections, fake.requests) == (2, 2)
        time.sleep(0.1)
        fake.answer = b""  # closes without answering: the retry fails too, and that is all
        t0 = time.monotonic()
        with pytest.raises(NodeUnavailable) as e:
            store.ping()
        assert not isinstance(e.value, NodeTimeout) and e.value.errno == errno.ECONNRESET
        assert time.monotonic() - t0 < 1
        assert (fake.connections, fake.requests) == (3, 3)
        # A fresh connection that fails is not retried.
        with pytest.raises(NodeUnavailable):
            store.ping()
        assert fake.connections == 4


def test_trickling_answer_is_cut_off_at_the_timeout(keep_alive_fake: _FakeNode) -> None:
    def trickle(sock: socket.socket) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nHafs-Node-Id: n1\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(1000):
            sock.sendall(b"x")
            time.sleep(0.02)

    keep_alive_fake.answer = trickle
    with RemoteStore(keep_alive_fake.url, "n1", FS, timeout=0.5) as store:
        t0 = time.monotonic()
        with pytest.raises(NodeTimeout):
            store.get("a" * 64)
        assert 0.4 < time.monotonic() - t0 < 1.5


def test_chunked_answers(keep_alive_fake: _FakeNode) -> None:
    """An answer without Content-Length is decoded by h11, within the same bounds."""
    good = os.urandom(100_000)
    bid = block_id(good)

    def chunked(body_size: int) -> Callable[[socket.socket], None]:
        def send(sock: socket.socket) -> None:
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nHafs-Node-Id: n1\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            whole = good * (body_size // len(good) + 1)
            for off in range(0, body_size, 65536):
                piece = whole[off : min(off + 65536, body_size)]
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            sock.sendall(b"0\r\n\r\n")

        return send

    with RemoteStore(keep_alive_fake.url, "n1", FS, timeout=5) as store:
        keep_alive_fake.answer = chunked(len(good))
        assert store.get(bid) == good
        keep_alive_fake.answer = chunked(MAX_SIZE + 1)
        with pytest.raises(NodeProtocolError, match="more than"):
            store.get(bid)


def test_get_returns_a_read_only_view(remote: RemoteStore) -> None:
    data = os.urandom(70_000)
    bid = block_id(data)
    remote.put(bid, bytearray(data))
    got = remote.get(bid)
    assert isinstance(got, memoryview) and got.readonly
    assert got == data and bytes(got[5:10]) == data[5:10] and len(got) == len(data)
    remote.delete(bid)


def test_https(tmp_path: Path, monkeypatch) -> None:
    """https:// addresses: TLS with the system's trust (here a test CA via SSL_CERT_FILE)."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server = _FakeNode(tls)
    server.per_connection = 10**6
    good = os.urandom(300_000)
    server.answer = _answer(200, good, close=False)
    with serving(server):
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        with RemoteStore(server.url, "n1", FS, timeout=5) as store:
            assert store.get(block_id(good)) == good
            assert store.get(block_id(good)) == good
        assert server.connections == 1
        monkeypatch.delenv("SSL_CERT_FILE")
        with RemoteStore(server.url, "n1", FS, timeout=5) as store:
            with pytest.raises(NodeCertificateError, match="not signed by the system's CAs"):
                store.get(block_id(good))


# --------------------------------------------------------------- property test


_HEX = "0123456789abcdef"


@st.composite
def id_and_body(draw) -> tuple[str, bytes]:
    body = draw(st.binary(max_size=3000))
    kind = draw(st.sampled_from(["right", "hex", "text", "near"]))
    if kind == "right":
        return block_id(body), body
    if kind == "hex":
        return draw(st.text(_HEX, min_size=64, max_size=64)), body
    if kind == "near":  # the right id, damaged: upper case, cut, or with a suffix
        good = block_id(body)
        return draw(st.sampled_from([good.upper(), good[:-1], good + "0", "../" + good])), body
    return draw(st.text(max_size=80)), body


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=id_and_body())
def test_property_nothing_stored_unless_id_is_the_hash(node: Node, case) -> None:
    bid, body = case
    with node.client() as c:
        r = c.put("/blocks/" + quote(bid, safe=""), content=body)
        right = bid == block_id(body)
        if right:
            assert r.status_code == 204
            assert c.get(f"/blocks/{bid}").content == body
        elif re.fullmatch("[0-9a-f]{64}", bid):
            assert r.status_code == 422
        elif bid == ".":  # a dot segment: the client sends PUT /blocks/, the listing's path
            assert r.status_code == 405, r.status_code
        else:
            assert r.status_code in (400, 404), (bid, r.status_code)
        assert c.get("/ping").status_code == 200
    for path in (node.data / "blocks").glob("*/*"):
        assert block_id(path.read_bytes()) == path.name
    assert not [p for p in (node.data / "tmp").iterdir() if p.stat().st_mtime > time.time() - 60]
    assert sorted(os.listdir(node.data)) == ["blocks", "corrupt", "hafs-node.json", "tmp"]


def test_token_rotation_on_sighup(tmp_path) -> None:
    """A node takes every token of its --token-file; SIGHUP reads the file again, so an
    admin adds the new token, switches the clients, then removes the old one."""
    old, new = "old-token-1", "new-token-2"
    data = tmp_path / "n1"
    node = start_node(data, token=old)
    token_file = data.parent / f"{data.name}.token"
    try:

        def status(token: str) -> int:
            with node.client(token) as c:
                return c.get("/ping").status_code

        def reload(text: str, nth: int) -> None:
            token_file.write_text(text)
            node.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while node.log_text().count("TOKENS-RELOADED") < nth:
                assert time.monotonic() < deadline, node.log_text()
                time.sleep(0.05)

        assert (status(old), status(new)) == (200, 401)
        reload(f"{new}\n{old}\n", 1)
        assert (status(old), status(new)) == (200, 200)
        reload(f"{new}\n", 2)
        assert (status(old), status(new)) == (401, 200)
        token_file.write_text("not a token\n")  # a broken file keeps the tokens
        node.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "TOKENS-KEPT" not in node.log_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert status(new) == 200
    finally:
        node.stop()


# ---------------------------------------------------------------- ownership

MINE = OwnerClaim("tok-mine", "host:/home/a/meta.db")
THEIRS = OwnerClaim("tok-theirs", "host:/home/copy/meta.db")


def test_a_node_is_taken_by_its_first_store_and_refuses_deletes_from_others(tmp_path):
    node = start_node(tmp_path / "n1")  # --init: no owner yet, as a node made before owners
    try:
        with node.client() as c:
            assert c.get("/ping").json()["owner"] is None
        blobs = [os.urandom(2000) for _ in range(3)]
        with node.store(owner=MINE) as mine, node.store(owner=THEIRS) as theirs:
            mine.check_identity()  # takes it
            ping = node.client().get("/ping").json()
            assert (ping["owner"], ping["owner_where"]) == (MINE.token, MINE.where)
            for blob in blobs:
                mine.put(block_id(blob), blob)
            with pytest.raises(NodeOwnedElsewhere, match=r"host:/home/a/meta\.db"):
                theirs.check_identity()
            theirs.put(block_id(blobs[0]), blobs[0])  # writes and reads are not refused
            assert theirs.get(block_id(blobs[0])) == blobs[0]
            with pytest.raises(NotOwner, match="belongs to another metadata store"):
                theirs.delete(block_id(blobs[0]))
            with node.store() as anonymous, pytest.raises(NotOwner):
                anonymous.delete(block_id(blobs[0]))  # no Hafs-Owner: refused too
            assert mine.delete(block_id(blobs[0]))
        assert node.stop() == 0
        node = start_node(node.data, init=None, port=node.port)  # the owner is on disk
        with node.store(owner=THEIRS) as theirs, pytest.raises(NotOwner):
            theirs.delete(block_id(blobs[1]))
        assert read_identity(node.data)["owner"] == MINE.token
    finally:
        node.stop()
    assert not re.search(r"Traceback| ERROR ", node.log_text())


def test_an_adopted_store_takes_the_node_and_switches_its_previous_token(tmp_path):
    adopted = OwnerClaim("tok-adopted", "host:/disk2/meta.db", frozenset({MINE.token}))
    with running(tmp_path / "n1") as node:
        blobs = [os.urandom(2000) for _ in range(2)]
        with node.store(owner=MINE) as mine, node.store(owner=adopted) as new:
            mine.check_identity()
            for blob in blobs:
                mine.put(block_id(blob), blob)
            new.set_owner(adopted)  # hafs node adopt: unconditional
            with pytest.raises(NotOwner):
                mine.delete(block_id(blobs[0]))  # the old store is locked out at once
            mine.set_owner(MINE)  # as if the node had missed the adopt (down): the old token
            assert new.delete(block_id(blobs[0]))  # 403, switched (a previous token), retried
            assert read_identity(node.data)["owner"] == adopted.token
            with pytest.raises(NotOwner):  # a compare-and-set that lost
                mine.set_owner(MINE, expect=(None, MINE.token))


@pytest.mark.parametrize(
    "body",
    [
        {"owner": "t"},
        {"owner": "t", "where": "w", "extra": 1},
        {"owner": "bad token", "where": "w"},
        {"owner": "t" * 65, "where": "w"},
        {"owner": "t", "where": "x" * 2000},
        {"owner": "t", "where": "w", "expect": "t"},
        {"owner": "t", "where": "w", "expect": [1]},
    ],
)
def test_bad_owner_bodies_are_400_and_change_nothing(node: Node, body) -> None:
    before = read_identity(node.data)
    with node.client() as c:
        r = c.post("/owner", json=body)
    assert r.status_code == 400 and "bad owner" in r.json()["error"], r.text
    assert read_identity(node.data) == before
