"""Cluster mode: metadata in a real 3-member etcd, blocks on three real `hafs node`s, and two
mounts with separate local state directories standing for two client hosts.

Each mount holds one etcd lease of lock_ttl_s (3 s here, so that pauses and deaths are
noticed quickly): its session, its write locks and its election to the background work
are bound to it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import time

import pytest
from clusterfs import cluster_fs, log_allows
from conftest import eventually, fsync_and_close_errno, hafs

from hafs import home

LEASE_S = 3
OPTS = f"gc_grace_s=0,gc_interval_s=1,lock_ttl_s={LEASE_S},lock_wait_s=20,node_timeout_s=3"


@pytest.fixture
def cluster(tmp_path, request):
    with cluster_fs(tmp_path, OPTS, log_allows(request)) as c:
        yield c.url, c.mounts, c.admin


def test_two_clients_see_each_others_files_close_to_open(cluster):
    url, (a, b), admin = cluster
    data = os.urandom(3_000_000)
    (a.mnt / "d").mkdir()
    (a.mnt / "d" / "f").write_bytes(data)  # closed on A ...
    assert (b.mnt / "d" / "f").read_bytes() == data  # ... so an open on B sees all of it
    os.rename(b.mnt / "d" / "f", b.mnt / "d" / "g")
    assert eventually(lambda: os.listdir(a.mnt / "d") == ["g"])
    assert (a.mnt / "d" / "g").read_bytes() == data
    os.unlink(b.mnt / "d" / "g")
    assert eventually(lambda: os.listdir(a.mnt / "d") == [])
    status = json.loads(hafs("status", "--meta", url, "--home", admin, "--json").stdout)
    assert sorted(m["mountpoint"] for m in status["mounts"]) == [str(a.mnt), str(b.mnt)]
    p = hafs("fsck", "--meta", url, "--home", admin, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def test_mkfs_refuses_an_existing_name_and_mount_a_missing_one(cluster, tmp_path):
    url, _, admin = cluster
    p = hafs("mkfs", "--meta", url, "--home", tmp_path / "other", check=False)
    assert p.returncode == 2 and "already holds a filesystem" in p.stderr, p.stderr
    assert not (tmp_path / "other").exists()  # no state directory left by a failed mkfs
    (tmp_path / "m").mkdir()
    missing = url.rsplit("/", 1)[0] + "/nothere"
    p = hafs("mount", "--meta", missing, "--home", tmp_path / "s", tmp_path / "m", check=False)
    assert p.returncode == 2 and "holds no hafs filesystem" in p.stderr, p.stderr
    assert not os.path.ismount(tmp_path / "m")
    assert not (tmp_path / "s").exists()  # nor by a failed mount


def mounted(url: str, admin) -> list[str]:
    status = json.loads(hafs("status", "--meta", url, "--home", admin, "--json").stdout)
    return sorted(m["mountpoint"] for m in status["mounts"])


@pytest.mark.log_allows("LOCK-LOST", "I/O error in")
def test_a_paused_writer_loses_its_lock_and_its_mount_goes_on(cluster):
    url, (a, b), admin = cluster
    fd = os.open(a.mnt / "f", os.O_WRONLY | os.O_CREAT)
    os.write(fd, b"A" * 100_000)  # buffered on A, under the lock bound to A's lease
    pid = a.daemon_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        (b.mnt / "f").write_bytes(b"B" * 50_000)  # waits until etcd ends A's lease
    finally:
        os.kill(pid, signal.SIGCONT)
    err = fsync_and_close_errno(fd)
    assert err == errno.EIO, errno.errorcode.get(err, err)
    assert (b.mnt / "f").read_bytes() == b"B" * 50_000
    assert eventually(lambda: (a.mnt / "f").read_bytes() == b"B" * 50_000)
    (a.mnt / "g").write_bytes(b"after the pause")  # A serves on, with a new lease
    assert (b.mnt / "g").read_bytes() == b"after the pause"
    # A's session is registered again by its next renewal (a lock may take the new
    # lease first): within a renewal period, not at once
    both = sorted([str(a.mnt), str(b.mnt)])
    assert eventually(lambda: mounted(url, admin) == both, timeout=LEASE_S), mounted(url, admin)
    log = a.log.read_text()
    assert "LOCK-LOST /f" in log and "SESSION-LOST" in log


def test_a_killed_mounts_unlinked_open_file_is_deleted_by_the_other(cluster, tmp_path):
    url, (a, b), admin = cluster
    fd = os.open(a.mnt / "f", os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, os.urandom(2_000_000))
        os.fsync(fd)
        ino = os.fstat(fd).st_ino
        os.unlink(a.mnt / "f")
        meta = home.open_meta(admin)
        try:
            blocks = {e.block_id for e in meta.extents(ino, 0, 2**40)}
            assert blocks and meta.getattr(ino).nlink == 0
            on_nodes = lambda: {p.name for p in tmp_path.glob("d*/blocks/**/*")}  # noqa: E731
            assert blocks <= on_nodes()
            time.sleep(LEASE_S)  # B keeps it: A's session is alive
            assert meta.getattr(ino) is not None
            os.kill(a.daemon_pid(), signal.SIGKILL)  # dies with the file open
            assert eventually(lambda: meta.getattr(ino) is None, timeout=5 * LEASE_S)
            assert eventually(lambda: not meta.block_rows(sorted(blocks)), timeout=10)
            assert not blocks & on_nodes()  # their copies deleted from the nodes
            assert [s.mountpoint for s in meta.sessions.alive()] == [str(b.mnt)]
        finally:
            meta.close()
    finally:
        with contextlib.suppress(OSError):  # its mount is dead
            os.close(fd)
    assert "SESSION-ENDED of the mount at" in b.log.read_text()
    p = hafs("fsck", "--meta", url, "--home", admin, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def test_gc_and_repair_run_on_one_mount_and_move_when_it_dies(cluster):
    url, mounts, admin = cluster
    leads = lambda m: "LEADER gc" in m.log.read_text()  # noqa: E731
    assert eventually(lambda: any(leads(m) for m in mounts), timeout=10)
    time.sleep(LEASE_S)  # the other mount asked too, meanwhile
    (leader,) = [m for m in mounts if leads(m)]
    (other,) = [m for m in mounts if m is not leader]
    status = json.loads(hafs("status", "--meta", url, "--home", admin, "--json").stdout)
    assert [m["mountpoint"] for m in status["mounts"] if m["leader"]] == [str(leader.mnt)]
    os.kill(leader.daemon_pid(), signal.SIGKILL)
    assert eventually(lambda: leads(other), timeout=5 * LEASE_S)  # once the lease ended
    status = json.loads(hafs("status", "--meta", url, "--home", admin, "--json").stdout)
    assert [m["mountpoint"] for m in status["mounts"] if m["leader"]] == [str(other.mnt)]


def test_mounts_learn_a_new_ring_version_by_watch(cluster):
    url, mounts, admin = cluster
    ring = json.loads(hafs("node", "list", "--meta", url, "--home", admin, "--json").stdout)
    node = ring["nodes"][0]["id"]
    hafs("node", "set", "--meta", url, "--home", admin, node, "--weight", "2")
    version = json.loads(hafs("status", "--meta", url, "--home", admin, "--json").stdout)[
        "ring_version"
    ]
    for m in mounts:
        assert eventually(lambda m=m: f"RING-VERSION {version}:" in m.log.read_text()), m.mnt
