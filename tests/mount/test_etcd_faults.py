"""Cluster mode under etcd failures, through real mounts (tests/clusterfs.py): the leader
killed during a copy, the majority lost and back, a mount cut off from etcd past its lease.

Each test prints its figures (FIGURE lines: run with -rP to see them).
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from clusterfs import cluster_fs, log_allows
from conftest import eventually, fsync_and_close_errno, hafs

LEASE_S = 3
BOUND_S = 5  # meta_timeout_s
OPTS = (
    f"gc_grace_s=0,gc_interval_s=1,lock_ttl_s={LEASE_S},lock_wait_s=20,node_timeout_s=3,"
    f"meta_timeout_s={BOUND_S}"
)
OUTAGE = ("META-UNAVAILABLE", "LOCK-LOST", "I/O error in")  # what an outage logs


@pytest.fixture
def cluster(tmp_path, request):
    with cluster_fs(tmp_path, OPTS, log_allows(request)) as c:
        yield c


def make_tree(root: Path, n: int = 200) -> None:
    """n files (empty to 2 MB) in nested directories, and a symlink."""
    rng = random.Random(12)
    for i in range(n):
        d = root / f"d{i % 20:02d}" / (f"s{i % 3}" if i % 2 else "")
        d.mkdir(parents=True, exist_ok=True)
        size = rng.choice([0, 1, 100, 4096, 70_000, 300_000]) if i % 50 else 2_000_000
        (d / f"f{i:03d}").write_bytes(rng.randbytes(size))
    os.symlink("d00/f000", root / "link")


def files_in(root: Path) -> int:
    return sum(len(names) for _, _, names in os.walk(root))


def test_the_etcd_leader_killed_during_a_copy_loses_nothing(cluster, tmp_path):
    a, b = cluster.mounts
    src = tmp_path / "src"
    make_tree(src)
    leader = cluster.etcd.leader()
    assert leader is not None
    cp = subprocess.Popen(
        ["cp", "-a", str(src), str(a.mnt / "copy")], stderr=subprocess.PIPE, text=True
    )
    try:
        assert eventually(lambda: files_in(a.mnt / "copy") >= 40, timeout=120)
        killed = time.monotonic()
        cluster.etcd.stop_member(leader, signal.SIGKILL)
        deadline = killed + 30
        while (new := cluster.etcd.leader()) in (None, leader) and time.monotonic() < deadline:
            time.sleep(0.01)
        elected = time.monotonic() - killed
        assert new not in (None, leader)
        _, err = cp.communicate(timeout=300)
        copied = time.monotonic() - killed
    finally:
        if cp.poll() is None:
            cp.kill()
            cp.wait()
    assert cp.returncode == 0, err
    assert err == ""
    checked = 0
    for path in sorted(src.rglob("*")):
        other = b.mnt / "copy" / path.relative_to(src)
        if path.is_symlink():
            assert os.readlink(other) == os.readlink(path)
        elif path.is_dir():
            assert other.is_dir()
        else:
            assert other.read_bytes() == path.read_bytes(), other
            checked += 1
    assert checked == 200
    p = hafs("fsck", "--meta", cluster.url, "--home", cluster.admin, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    print(
        f"FIGURE leader m{leader} SIGKILLed during cp -a of 200 files: m{new} leads"
        f" {elected:.2f} s later; cp ended {copied:.1f} s after the kill, exit 0, no error"
    )


@pytest.mark.log_allows(*OUTAGE)
def test_without_a_quorum_calls_fail_with_eio_within_the_bound_and_resume(cluster):
    a, b = cluster.mounts
    (a.mnt / "f").write_bytes(b"before")
    fd = os.open(a.mnt / "w", os.O_WRONLY | os.O_CREAT)
    figures = []
    try:
        os.write(fd, b"1" * 1000)
        os.fsync(fd)
        for i in (1, 2):
            cluster.etcd.stop_member(i, signal.SIGKILL)
        time.sleep(1.2)  # the kernel's entries and attributes (1 s) are old
        calls = [
            ("stat", lambda: os.stat(a.mnt / "f")),
            ("create", lambda: os.close(os.open(a.mnt / "g", os.O_CREAT | os.O_WRONLY))),
            ("write+fsync", lambda: (os.write(fd, b"2" * 1000), os.fsync(fd))),
        ]
        for what, call in calls:
            t = time.monotonic()
            with pytest.raises(OSError) as e:
                call()
            took = time.monotonic() - t
            assert e.value.errno == errno.EIO, (what, e.value)
            assert took < BOUND_S + 3, (what, took)
            figures.append(f"{what} EIO in {took:.2f} s")
        assert fsync_and_close_errno(fd) == errno.EIO  # its lock went with the lease
        fd = None
        started = time.monotonic()
        cluster.etcd.start_member(1)  # a quorum again
        healthy = time.monotonic()
        assert eventually(lambda: os.stat(a.mnt / "f"), timeout=30)
        resumed = time.monotonic()
        (a.mnt / "g").write_bytes(b"after")  # the same mounts work on
        assert (b.mnt / "g").read_bytes() == b"after"
        assert (b.mnt / "f").read_bytes() == b"before"
        assert eventually(lambda: cluster.mounted() == sorted([str(a.mnt), str(b.mnt)]), 10)
    finally:
        if fd is not None:
            fsync_and_close_errno(fd)
    log = a.log.read_text()
    assert log.count("META-UNAVAILABLE") == 1 and "META-AVAILABLE" in log
    print(
        f"FIGURE meta_timeout_s={BOUND_S}, 2 of 3 members killed: {', '.join(figures)};"
        f" a member restarted: etcd healthy after {healthy - started:.2f} s, the mount"
        f" answers {resumed - healthy:.2f} s after that"
    )


@pytest.mark.log_allows(*OUTAGE)
def test_a_mount_cut_off_past_its_lease_loses_its_lock_to_the_other(cluster):
    a, b = cluster.mounts
    fd = os.open(a.mnt / "f", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"A" * 100_000)  # buffered on A, under its write lock
        paused = time.monotonic()
        for i in (1, 2):
            cluster.etcd.pause_member(i)  # no quorum: nobody renews a lease
        try:
            assert eventually(lambda: "LEASE-LOST" in a.log.read_text(), timeout=30)
            lease_lost = time.monotonic() - paused
            assert eventually(lambda: "LOCK-LOST" in a.log.read_text(), timeout=30)
            lock_lost = time.monotonic() - paused
        finally:
            for i in (1, 2):
                cluster.etcd.resume_member(i)
        cluster.etcd.wait_healthy()
        with pytest.raises(OSError) as e:
            os.fsync(fd)
        assert e.value.errno == errno.EIO
        with pytest.raises(OSError) as e:
            os.write(fd, b"A")  # no new lock in the middle of the file
        assert e.value.errno == errno.EIO
        (b.mnt / "f").write_bytes(b"B" * 50_000)
    finally:
        err = fsync_and_close_errno(fd)
    assert err == errno.EIO
    assert (b.mnt / "f").read_bytes() == b"B" * 50_000
    assert eventually(lambda: (a.mnt / "f").read_bytes() == b"B" * 50_000)
    (a.mnt / "g").write_bytes(b"after")  # A serves on, with a new lease and session
    assert (b.mnt / "g").read_bytes() == b"after"
    assert "SESSION-LOST" in a.log.read_text()
    print(
        f"FIGURE lock_ttl_s={LEASE_S}, 2 of 3 members paused: LEASE-LOST after"
        f" {lease_lost:.2f} s, LOCK-LOST logged after {lock_lost:.2f} s"
    )
