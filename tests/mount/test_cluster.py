"""Cluster mode: metadata in a real 3-member etcd, blocks on three real `hafs node`s, and two
mounts with separate local state directories standing for two client hosts."""

from __future__ import annotations

import json
import os
import time

import pytest
from conftest import Mount, hafs
from etcdproc import require_etcd, running_cluster
from nodeproc import start_node

OPTS = "gc_grace_s=0,gc_interval_s=1,lock_ttl_s=3,lock_wait_s=20,node_timeout_s=3"


@pytest.fixture
def cluster(tmp_path):
    require_etcd()
    with running_cluster(tmp_path / "etcd") as etcd:
        nodes = [start_node(tmp_path / f"d{i}", init=None) for i in range(3)]
        try:
            url = etcd.url("prod")
            args = ["mkfs", "--meta", url, "--home", tmp_path / "admin", "--replicas", "2"]
            for n in nodes:
                args += ["--node", n.url]
            hafs(*args)
            mounts = []
            for host in ("a", "b"):
                (tmp_path / host / "mnt").mkdir(parents=True)
                m = Mount(tmp_path / host / "state", tmp_path / host / "mnt", OPTS)
                hafs("mount", "--meta", url, "--home", m.home, "-o", OPTS, m.mnt)
                mounts.append(m)
            try:
                yield url, mounts, tmp_path / "admin"
            finally:
                for m in mounts:
                    m.stop()
            for m in mounts:
                bad = m.bad_log_lines()
                assert not bad, "\n".join(bad[:20])
        finally:
            for n in nodes:
                n.stop()


def eventually(predicate, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


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
    (tmp_path / "m").mkdir()
    missing = url.rsplit("/", 1)[0] + "/nothere"
    p = hafs("mount", "--meta", missing, "--home", tmp_path / "s", tmp_path / "m", check=False)
    assert p.returncode == 2 and "holds no hafs filesystem" in p.stderr, p.stderr
    assert not os.path.ismount(tmp_path / "m")
