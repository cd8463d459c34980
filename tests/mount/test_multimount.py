"""Several mounts of one embedded filesystem: write locks, fencing, close-to-open."""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
import time

import pytest
from conftest import Mount, eventually, fsync_and_close_errno, hafs

LOCK_OPTS = "gc_grace_s=0,gc_interval_s=1,lock_ttl_s=2,lock_wait_s=20"


@pytest.fixture
def two(tmp_path):
    """Two mounts of one filesystem (2 s leases, so expiry tests stay short)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    hafs("mkfs", "--home", tmp_path / "home")
    a = Mount(tmp_path / "home", tmp_path / "a", LOCK_OPTS)
    b = Mount(tmp_path / "home", tmp_path / "b", LOCK_OPTS)
    a.start()
    try:
        b.start()
        try:
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()
    bad = a.bad_log_lines(allowed=("LOCK-LOST", "I/O error in", "storing bytes"))
    assert not bad, "\n".join(bad[:20])


def test_close_to_open_and_namespace_changes(two):
    a, b = two
    data = os.urandom(3_000_000)
    (a.mnt / "f").write_bytes(data)  # closed on a ...
    assert (b.mnt / "f").read_bytes() == data  # ... so an open on b sees all of it
    (a.mnt / "f").write_bytes(b"short")
    assert (b.mnt / "f").read_bytes() == b"short"
    assert eventually(lambda: os.stat(b.mnt / "f").st_size == 5)
    os.rename(a.mnt / "f", a.mnt / "g")
    assert eventually(lambda: os.listdir(b.mnt) == ["g"])  # within about a second
    os.unlink(a.mnt / "g")
    assert eventually(lambda: os.listdir(b.mnt) == [])


def test_second_writer_waits_for_the_first_to_close(two):
    a, b = two
    first = os.urandom(5_000_000)
    second = os.urandom(4_000_000)
    (a.mnt / "f").write_bytes(b"old")
    fd = os.open(a.mnt / "f", os.O_WRONLY | os.O_TRUNC)
    os.write(fd, first[:1_000_000])
    times = {}

    def writer_b():
        with open(b.mnt / "f", "wb") as f:  # O_TRUNC: waits for a's lock
            times["b_opened"] = time.monotonic()
            f.write(second)

    t = threading.Thread(target=writer_b)
    t.start()
    time.sleep(1.0)
    assert "b_opened" not in times, "the second writer must wait"
    os.write(fd, first[1_000_000:])
    times["a_closing"] = time.monotonic()
    os.close(fd)
    t.join(30)
    assert times["b_opened"] >= times["a_closing"]
    assert (a.mnt / "f").read_bytes() == second
    assert (b.mnt / "f").read_bytes() == second


def test_killed_mount_loses_its_lock_at_lease_expiry(two):
    a, b = two
    fd = os.open(a.mnt / "f", os.O_WRONLY | os.O_CREAT)
    os.write(fd, b"from a")
    status = json.loads(hafs("status", "--home", a.home, "--json").stdout)
    assert [lk["path"] for lk in status["locks"]] == ["/f"]
    os.kill(a.daemon_pid(), signal.SIGKILL)
    start = time.monotonic()
    (b.mnt / "f").write_bytes(b"from b")  # waits until a's 2 s lease is over
    assert time.monotonic() - start < 15
    assert (b.mnt / "f").read_bytes() == b"from b"
    try:
        os.close(fd)
    except OSError:
        pass


def test_paused_writer_is_fenced_off(two):
    a, b = two
    fd = os.open(a.mnt / "f", os.O_WRONLY | os.O_CREAT)
    os.write(fd, b"A" * 100_000)  # buffered on a, under a's lease
    pid = a.daemon_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(3)  # past a's 2 s lease
        (b.mnt / "f").write_bytes(b"B" * 50_000)
    finally:
        os.kill(pid, signal.SIGCONT)
    for _ in range(2):  # no new lock in the middle of the file: EIO until it is closed
        with pytest.raises(OSError) as e:
            os.write(fd, b"A" * 1000)
        assert e.value.errno == errno.EIO
    assert fsync_and_close_errno(fd) == errno.EIO
    assert (b.mnt / "f").read_bytes() == b"B" * 50_000
    assert eventually(lambda: (a.mnt / "f").read_bytes() == b"B" * 50_000)
    assert "LOCK-LOST" in a.log.read_text()
    with open(a.mnt / "f", "r+b") as f:  # closed: a new writer of it takes a new lock
        f.write(b"C")
    assert (b.mnt / "f").read_bytes() == b"C" + b"B" * 49_999


def test_lock_wait_timeout_names_path_and_holder(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    hafs("mkfs", "--home", tmp_path / "home")
    opts = "lock_ttl_s=5,lock_wait_s=1"
    a = Mount(tmp_path / "home", tmp_path / "a", opts)
    b = Mount(tmp_path / "home", tmp_path / "b", opts)
    a.start()
    b.start()
    try:
        fd = os.open(a.mnt / "f", os.O_WRONLY | os.O_CREAT)
        os.write(fd, b"x")
        with pytest.raises(OSError) as e:
            with open(b.mnt / "f", "ab") as f:
                f.write(b"y")
        assert e.value.errno == errno.ENOLCK
        os.close(fd)
        log = b.log.read_text()
        assert "LOCK-WAIT-TIMEOUT /f" in log and str(a.mnt) in log
    finally:
        b.stop()
        a.stop()
