"""Mounts with -o writeback_cache: small writes reach hafs gathered into large ones, and
what the kernel's cache must not break still holds.

Two mounts of one filesystem, both with the option: close-to-open between them, size
and mtime as the kernel keeps them, O_APPEND from several processes, mmap, the write
lock taken before anything the kernel holds reaches hafs, fsync.
"""

from __future__ import annotations

import mmap
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import MOUNT_OPTS, Mount, fuse_requests, hafs
from nodeproc import free_port

from hafs.store.chunker import MiB

WB_OPTS = f"{MOUNT_OPTS},writeback_cache,lock_ttl_s=2,lock_wait_s=20"
PAGE = 4096


def two_mounts(base) -> tuple[Mount, Mount, str]:
    """Mounts A (serving metrics at the returned URL) and B of one new filesystem."""
    (base / "a").mkdir()
    (base / "b").mkdir()
    hafs("mkfs", "--home", base / "home")
    port = free_port()
    a = Mount(base / "home", base / "a", f"{WB_OPTS},metrics=127.0.0.1:{port}")
    b = Mount(base / "home", base / "b", WB_OPTS)
    return a, b, f"http://127.0.0.1:{port}/metrics"


def started(a: Mount, b: Mount):
    """Both mounted for the body of a `with`-less generator fixture; stopped always."""
    a.start()
    try:
        b.start()
        try:
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()
    for m in (a, b):
        bad = m.bad_log_lines()
        assert not bad, "unexpected errors in the daemon's log:\n" + "\n".join(bad[:20])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    a, b, url = two_mounts(tmp_path_factory.mktemp("wb"))
    for both in started(a, b):
        yield (*both, url)


@pytest.fixture
def dirs(pair, request):
    """A fresh directory for the test: (its path on A, on B, A's metrics URL)."""
    a, b, url = pair
    name = re.sub(r"\W", "_", request.node.name)
    (a.mnt / name).mkdir()
    return a.mnt / name, b.mnt / name, url


def write_in_pieces(path, data: bytes, piece: int = PAGE, flags: int = 0) -> None:
    """`data` in write(2)s of `piece` bytes (as dd bs=4k, head or stdio do), then close."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o644)
    try:
        for off in range(0, len(data), piece):
            os.write(fd, data[off : off + piece])
    finally:
        os.close(fd)


def read_with_size(path) -> tuple[int, bytes]:
    """(st_size right after the open, the bytes read to the end)."""
    with open(path, "rb") as f:
        return os.fstat(f.fileno()).st_size, f.read()


def test_small_writes_arrive_gathered_and_whole_at_close(dirs):
    a, b, url = dirs
    data = os.urandom(MiB + 123)
    before = fuse_requests(url)["write"]
    write_in_pieces(a / "f", data)
    writes = fuse_requests(url)["write"] - before
    assert writes <= len(data) // PAGE // 8, f"{writes} write requests for 257 write(2)s"
    assert read_with_size(b / "f") == (len(data), data)  # close-to-open on the other mount


@pytest.mark.parametrize("new_size", ["same", "longer", "shorter"])
def test_a_rewrite_on_one_mount_is_read_whole_after_reopen_on_the_other(dirs, new_size):
    a, b, _ = dirs
    old = os.urandom(300_000)
    (a / "f").write_bytes(old)
    assert read_with_size(b / "f") == (len(old), old)  # B's kernel caches size and pages
    new = os.urandom({"same": len(old), "longer": 2 * len(old) + 5, "shorter": 1000}[new_size])
    write_in_pieces(a / "f", new)
    assert read_with_size(b / "f") == (len(new), new)  # within B's attribute timeout
    assert os.stat(b / "f").st_size == len(new)
    write_in_pieces(b / "f", old)  # and back the other way
    assert read_with_size(a / "f") == (len(old), old)


def test_size_and_mtime_follow_writes_truncate_utime_and_chmod(dirs):
    a, b, _ = dirs
    fd = os.open(a / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x" * 10_000)
        first = os.fstat(fd)
        assert first.st_size == 10_000
        time.sleep(0.01)
        os.write(fd, b"y" * 10_000)
        st = os.fstat(fd)
        assert st.st_size == 20_000 and st.st_mtime_ns > first.st_mtime_ns
        os.ftruncate(fd, 15_000)
        assert os.fstat(fd).st_size == 15_000
        when = 1_500_000_000_123_456_789
        os.utime(fd, ns=(when, when))
        assert os.fstat(fd).st_mtime_ns == when
        os.fchmod(fd, 0o640)
        st = os.fstat(fd)
        assert (st.st_mode & 0o777, st.st_mtime_ns, st.st_size) == (0o640, when, 15_000)
    finally:
        os.close(fd)
    for mnt in (a, b):  # and so on the other mount, after the close
        st = os.stat(mnt / "f")
        assert (st.st_size, st.st_mtime_ns, st.st_mode & 0o777) == (15_000, when, 0o640), mnt
    assert (b / "f").read_bytes() == b"x" * 10_000 + b"y" * 5_000


APPENDER = """
import os, sys
path, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
fd = os.open(path, os.O_WRONLY | os.O_APPEND)
for i in range(n):
    os.write(fd, b"%s %04d " % (tag.encode(), i) + b"." * 60 + b"\\n")
os.close(fd)
"""


def test_o_append_from_several_processes_on_both_mounts(dirs):
    """Three appending processes on each mount: every line there once, none cut."""
    a, b, _ = dirs
    (a / "log").write_bytes(b"")
    n = 200
    procs = [
        subprocess.Popen([sys.executable, "-c", APPENDER, str(d / "log"), f"{m}{i}", str(n)])
        for i in range(3)
        for m, d in (("a", a), ("b", b))
    ]
    assert [p.wait(120) for p in procs] == [0] * len(procs)
    want = sorted(
        b"%s%d %04d " % (m, i, k) + b"." * 60
        for i in range(3)
        for m in (b"a", b"b")
        for k in range(n)
    )
    for d in (a, b):
        assert sorted((d / "log").read_bytes().splitlines()) == want, d


def test_a_partial_page_write_through_a_write_only_handle(dirs):
    """The kernel reads the rest of the page itself (a read on an O_WRONLY handle)."""
    a, b, _ = dirs
    old = os.urandom(3 * PAGE)
    (a / "f").write_bytes(old)
    fd = os.open(b / "f", os.O_WRONLY)
    try:
        os.pwrite(fd, b"0123456789", PAGE + 100)
    finally:
        os.close(fd)
    want = old[: PAGE + 100] + b"0123456789" + old[PAGE + 110 :]
    assert (a / "f").read_bytes() == want and (b / "f").read_bytes() == want


def test_mmap_writes_reach_the_other_mount_at_msync_and_munmap(dirs):
    a, b, _ = dirs
    (a / "m").write_bytes(bytes(2 * MiB))
    with open(a / "m", "r+b") as f:
        with mmap.mmap(f.fileno(), 0) as m:
            m[100:105] = b"first"
            m.flush()  # msync: written back and committed
            assert (b / "m").read_bytes()[100:105] == b"first"
            m[MiB : MiB + 6] = b"second"
    data = (b / "m").read_bytes()  # after munmap and close
    assert data[100:105] == b"first" and data[MiB : MiB + 6] == b"second"
    assert len(data) == 2 * MiB


def test_a_writer_on_the_other_mount_waits_at_open_and_keeps_both_changes(dirs):
    """B writes into the page A is writing too, while A has the file open: B waits for
    A's close (its open takes the lock), and neither change overwrites the other."""
    a, b, _ = dirs
    (a / "f").write_bytes(bytes(2 * PAGE))
    fd = os.open(a / "f", os.O_RDWR)
    os.pwrite(fd, b"A" * 100, 1000)  # in A's kernel only, under A's lock
    done = {}

    def writer_b():
        fd_b = os.open(b / "f", os.O_RDWR)
        done["opened"] = time.monotonic()
        os.pwrite(fd_b, b"B" * 10, 10)  # the same page
        os.close(fd_b)

    t = threading.Thread(target=writer_b)
    t.start()
    try:
        time.sleep(1.0)
        assert "opened" not in done, "B's writer must wait while A holds the file open"
        os.pwrite(fd, b"a" * 10, 3000)
        closing = time.monotonic()
    finally:
        os.close(fd)
        t.join(30)
    assert done["opened"] >= closing
    want = bytearray(2 * PAGE)
    want[10:20], want[1000:1100], want[3000:3010] = b"B" * 10, b"A" * 100, b"a" * 10
    assert (a / "f").read_bytes() == want and (b / "f").read_bytes() == want


def test_a_reader_on_the_other_mount_does_not_wait(dirs):
    a, b, _ = dirs
    (a / "f").write_bytes(b"committed")
    fd = os.open(a / "f", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b" and cached")
        assert (b / "f").read_bytes() == b"committed"  # not A's cached bytes, and no wait
    finally:
        os.close(fd)
    assert (b / "f").read_bytes() == b"committed and cached"


@pytest.fixture
def fresh_pair(tmp_path):
    a, b, _ = two_mounts(tmp_path)
    yield from started(a, b)


def test_fsync_returns_once_the_data_is_durable(fresh_pair):
    """Written in small pieces, fsync'd, then A's daemon is killed: B reads all of it."""
    a, b = fresh_pair
    data = os.urandom(MiB // 2 + 7)
    fd = os.open(a.mnt / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    for off in range(0, len(data), PAGE):
        os.write(fd, data[off : off + PAGE])
    os.fsync(fd)
    os.kill(a.daemon_pid(), signal.SIGKILL)
    try:
        os.close(fd)
    except OSError:
        pass  # (the mount is gone)
    assert read_with_size(b.mnt / "f") == (len(data), data)
