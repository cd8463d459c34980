"""Hung nodes (SIGSTOP) under a real mount: no call waits beyond node_timeout_s + a margin.

Three real `hafs node` processes (R=2, W=2) and a real mount with a short
node_timeout_s.  Every read(), write(), fsync() and close() is timed on its own;
with one of three nodes stopped everything still works, with two of three a call
that finds no copy (or no quorum) fails with EIO, each within the bound.  The
nodes are always continued and stopped, the mount always unmounted.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import time

import pytest
from test_remote_nodes import EXPECTED, Cluster

from hafs.store.chunker import MiB

TIMEOUT_S = 3  # node_timeout_s of the mount
BOUND_S = TIMEOUT_S + 2  # what any one call may take, however many nodes are stopped
OPTIONS = f"node_timeout_s={TIMEOUT_S},probe_interval_s=1,gc_grace_s=0,gc_interval_s=1"
ALLOWED = (*EXPECTED, "I/O error in", "storing bytes", "background flush", "NODE-DOWN")


class Timer:
    """Runs syscalls one at a time and keeps the longest."""

    def __init__(self) -> None:
        self.longest = 0.0
        self.what = ""

    def __call__(self, what: str, fn, *args):
        started = time.monotonic()
        try:
            return fn(*args)
        finally:
            took = time.monotonic() - started
            if took > self.longest:
                self.longest, self.what = took, what
            assert took < BOUND_S, f"{what} took {took:.1f} s"


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    c.mount.options = OPTIONS
    try:
        c.mkfs()
        c.mount.start()
        yield c
    finally:
        for node in c.nodes:
            os.kill(node.proc.pid, signal.SIGCONT)
        c.close()
    bad = c.mount.bad_log_lines(allowed=ALLOWED)
    assert not bad, "unexpected errors in the daemon's log:\n" + "\n".join(bad[:20])


def write_file(path, size: int) -> str:
    """A file of `size` random bytes, closed; its sha256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            chunk = os.urandom(MiB)
            h.update(chunk)
            f.write(chunk)
    return h.hexdigest()


def read_file(timer: Timer, path, chunk: int = 128 * 1024) -> str:
    """Read with one timed read() per `chunk`; the sha256, or OSError from the failing call."""
    h = hashlib.sha256()
    fd = timer(f"open {path.name}", os.open, path, os.O_RDONLY)
    try:
        while data := timer(f"read of {path.name}", os.read, fd, chunk):
            h.update(data)
    finally:
        os.close(fd)
    return h.hexdigest()


def write_and_fsync(timer: Timer, path, size: int) -> None:
    """Write, fsync and close with each call timed; OSError from the first that fails."""
    fd = timer(f"open {path.name}", os.open, path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for _ in range(size // MiB):
            timer(f"write to {path.name}", os.write, fd, os.urandom(MiB))
        timer(f"fsync of {path.name}", os.fsync, fd)
    finally:
        timer(f"close of {path.name}", os.close, fd)


def test_one_of_three_nodes_hung_costs_no_call_a_timeout(cluster):
    mnt = cluster.mount.mnt
    digest = write_file(mnt / "big", 64 * MiB)
    cluster.mount.stop()  # a cold cache: the reads must go to the nodes
    cluster.mount.start()
    hung = cluster.nodes[0]
    os.kill(hung.proc.pid, signal.SIGSTOP)
    timer = Timer()
    try:
        assert read_file(timer, mnt / "big") == digest
        write_and_fsync(timer, mnt / "new", 8 * MiB)
        assert read_file(timer, mnt / "new")
    finally:
        os.kill(hung.proc.pid, signal.SIGCONT)
    print(f"one of three stopped: longest call {timer.longest:.2f} s ({timer.what})")


def test_two_of_three_nodes_hung_fail_calls_with_eio_within_the_bound(cluster):
    mnt = cluster.mount.mnt
    small = write_file(mnt / "small", 0) and (mnt / "small").write_bytes(os.urandom(4096))
    assert small == 4096
    write_file(mnt / "mid", 8 * MiB)
    cluster.mount.stop()
    cluster.mount.start()
    stopped = cluster.nodes[:2]
    for node in stopped:
        os.kill(node.proc.pid, signal.SIGSTOP)
    timer = Timer()
    try:
        for _ in range(2):  # before and after the mount has marked the nodes down
            for name in ("small", "mid"):
                try:
                    read_file(timer, mnt / name)  # a block may have a copy on the third node
                except OSError as e:
                    assert e.errno == errno.EIO, e
            with pytest.raises(OSError) as err:
                write_and_fsync(timer, mnt / "new", 8 * MiB)  # W=2: one node cannot do
            assert err.value.errno == errno.EIO
        assert "NODE-DOWN" in cluster.mount.log.read_text()
    finally:
        for node in stopped:
            os.kill(node.proc.pid, signal.SIGCONT)
    print(f"two of three stopped: longest call {timer.longest:.2f} s ({timer.what})")
