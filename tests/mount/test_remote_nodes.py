"""A mount over real `hafs node` processes: claim, replicas, failover, hung and dead nodes.

Three nodes on loopback (R=2, W=2), started unclaimed and claimed by `hafs mkfs`.
Nodes are killed and stopped by PID; the mount is always unmounted.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import Mount, hafs
from nodeproc import Node, start_node, tls_files

from hafs.store.chunker import MiB

TIMEOUT_S = 2  # node_timeout_s of the mount
OPTIONS = (
    f"node_timeout_s={TIMEOUT_S},probe_interval_s=1,gc_grace_s=0,gc_interval_s=1,"
    "repair_interval_s=1"
)
# Log lines these tests cause on purpose (a node killed or stopped under a running mount).
EXPECTED = (
    "BLOCK-WRITE-FAILED",
    "BLOCK-READ-FAILED",
    "BLOCK-CORRUPT",
    "BLOCK-UNREADABLE",
    "I/O error in read",
)


class Cluster:
    def __init__(self, base: Path, n: int = 3, token: str | None = None, cas=()) -> None:
        """`cas`: a trustme CA per node that serves HTTPS with a certificate it signed."""
        self.base = base
        self.token = token
        self.tls = [tls_files(ca, base, name=f"d{i + 1}") for i, ca in enumerate(cas)]
        self.nodes: list[Node] = []
        for i in range(n):
            self.nodes.append(
                start_node(base / f"d{i + 1}", init=None, token=token, tls=self._tls(i))
            )
        self.mount = Mount(base / "home", base / "mnt", OPTIONS)
        self.mount.mnt.mkdir()

    def mkfs(self, *extra: str) -> None:
        args = ["mkfs", "--home", self.mount.home, "--replicas", "2", *extra]
        for node in self.nodes:
            args += ["--node", node.url]
        hafs(*args)

    def _tls(self, i: int):
        return self.tls[i] if i < len(self.tls) else None

    def restart(self, i: int) -> None:
        old = self.nodes[i]
        old.stop(signal.SIGKILL)
        self.nodes[i] = start_node(
            old.data, init=None, token=self.token, port=old.port, tls=self._tls(i)
        )

    def holders(self) -> dict[str, int]:
        """block id -> number of nodes holding it (read from the nodes' directories)."""
        out: dict[str, int] = {}
        for node in self.nodes:
            for f in (node.data / "blocks").rglob("*"):
                if f.is_file():
                    out[f.name] = out.get(f.name, 0) + 1
        return out

    def close(self) -> None:
        try:
            self.mount.stop()
        finally:
            for node in self.nodes:
                node.stop()


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        c.mkfs()
        c.mount.start()
        yield c
    finally:
        c.close()
    bad = c.mount.bad_log_lines(allowed=EXPECTED)
    assert not bad, "unexpected errors in the daemon's log:\n" + "\n".join(bad[:20])


def make_tree(root: Path, files: int, size: int, seed: int = 0) -> dict[str, bytes]:
    rnd = random.Random(seed)
    root.mkdir(parents=True)
    out = {}
    for i in range(files):
        data = rnd.randbytes(size)
        (root / f"f{i:03}").write_bytes(data)
        out[f"f{i:03}"] = data
    return out


def check_tree(root: Path, expected: dict[str, bytes]) -> None:
    for name, data in expected.items():
        assert (root / name).read_bytes() == data, name


def test_mkfs_claims_the_nodes_and_blocks_land_on_r_of_them(cluster, tmp_path):
    for i, node in enumerate(cluster.nodes):
        assert f'"node_id": "n{i + 1}"' in (node.data / "hafs-node.json").read_text()
    src = make_tree(tmp_path / "src", 12, 3 * MiB)
    subprocess.run(["cp", "-a", str(tmp_path / "src"), str(cluster.mount.mnt / "t")], check=True)
    subprocess.run(["diff", "-r", str(tmp_path / "src"), str(cluster.mount.mnt / "t")], check=True)
    holders = cluster.holders()
    assert len(holders) >= 12
    assert set(holders.values()) == {2}, "every block on exactly R=2 nodes"
    # remount: everything is read back from the nodes
    cluster.mount.stop()
    cluster.mount.start()
    check_tree(cluster.mount.mnt / "t", src)
    status = hafs("status", "--home", cluster.mount.home).stdout
    for node in cluster.nodes:
        assert node.url in status
    # df: three nodes on one disk count as that disk once, divided by R
    disk = os.statvfs(tmp_path)
    deadline = time.monotonic() + 10
    while (st := os.statvfs(cluster.mount.mnt)).f_bavail == 0:  # until the first probe
        assert time.monotonic() < deadline, "df never saw the nodes' space"
        time.sleep(0.2)
    expected = disk.f_bavail * disk.f_frsize // 2
    assert st.f_bavail * st.f_frsize == pytest.approx(expected, rel=0.02)


def test_mkfs_refuses_a_node_of_another_filesystem(cluster, tmp_path):
    home = tmp_path / "other"
    p = hafs("mkfs", "--home", home, "-r", "1", "--node", cluster.nodes[0].url, check=False)
    assert p.returncode == 2
    assert "already serves node n1 of filesystem" in p.stderr
    assert not home.exists() or not (home / "meta.db").exists()


def test_kill_9_of_a_node_during_a_copy(cluster, tmp_path):
    mnt = cluster.mount.mnt
    before = make_tree(tmp_path / "before", 8, 2 * MiB, seed=1)
    subprocess.run(["cp", "-a", str(tmp_path / "before"), str(mnt / "before")], check=True)
    during = make_tree(tmp_path / "during", 30, 2 * MiB, seed=2)
    victim = cluster.nodes[1]
    killer = threading.Timer(0.5, lambda: os.kill(victim.proc.pid, signal.SIGKILL))
    killer.start()
    copy = subprocess.run(
        ["cp", "-a", str(tmp_path / "during"), str(mnt / "during")], capture_output=True, text=True
    )
    killer.join()
    assert victim.proc.wait(10) == -signal.SIGKILL
    assert copy.returncode == 0, copy.stderr  # two nodes left: W=2 copies still possible
    check_tree(mnt / "before", before)
    check_tree(mnt / "during", during)
    after = make_tree(tmp_path / "after", 4, MiB, seed=3)
    subprocess.run(["cp", "-a", str(tmp_path / "after"), str(mnt / "after")], check=True)
    check_tree(mnt / "after", after)
    assert "NODE-DOWN n2" in cluster.mount.log.read_text()
    # the node comes back; fsck --repair puts every block back on the nodes the ring names
    cluster.mount.stop()
    cluster.restart(1)
    p = hafs("fsck", "--home", cluster.mount.home, "--repair", check=False)
    assert p.returncode in (0, 1), p.stdout + p.stderr
    assert hafs("fsck", "--home", cluster.mount.home, check=False).returncode == 0
    assert set(cluster.holders().values()) == {2}
    assert degraded_blocks(cluster) == 0, "fsck --repair clears the record"
    cluster.mount.start()
    check_tree(mnt / "during", during)


def degraded_blocks(cluster) -> int:
    p = hafs("status", "--home", cluster.mount.home, "--json", check=False)  # 1: a node down
    return json.loads(p.stdout)["degraded_blocks"]


def test_blocks_written_while_a_node_is_dead_are_repaired_when_it_returns(cluster, tmp_path):
    mnt = cluster.mount.mnt
    cluster.nodes[1].stop(signal.SIGKILL)
    files = make_tree(tmp_path / "src", 10, 2 * MiB, seed=5)
    subprocess.run(["cp", "-a", str(tmp_path / "src"), str(mnt / "t")], check=True)
    subprocess.run(["sync", "-f", str(mnt / "t")], check=True)
    holders = cluster.holders()
    assert set(holders.values()) == {2}, "R copies made on the two nodes left"
    assert degraded_blocks(cluster) > 0, "the blocks that belong on n2 are recorded"
    cluster.restart(1)  # the same directory and port: the probe finds it, repair follows
    deadline = time.monotonic() + 30
    while degraded_blocks(cluster):
        assert time.monotonic() < deadline, "degraded blocks were not repaired"
        time.sleep(0.5)
    assert cluster.holders() == holders, "each block still on exactly R=2 nodes"
    assert any((cluster.nodes[1].data / "blocks").rglob("*/*")), "n2 got its blocks back"
    log = cluster.mount.log.read_text()
    assert "NODE-UP n2" in log and "REPAIR: " in log
    p = hafs("fsck", "--home", cluster.mount.home, check=False)  # a check beside the mount
    assert p.returncode == 0, p.stdout + p.stderr
    check_tree(mnt / "t", files)


def test_a_hung_node_never_stalls_the_mount(cluster, tmp_path):
    mnt = cluster.mount.mnt
    files = make_tree(tmp_path / "src", 10, 2 * MiB, seed=4)
    subprocess.run(["cp", "-a", str(tmp_path / "src"), str(mnt / "t")], check=True)
    cluster.mount.stop()  # a cold cache: reads must go to the nodes
    hung = cluster.nodes[0]
    os.kill(hung.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        cluster.mount.start()  # the hung node's identity check times out; the mount goes on
        assert time.monotonic() - started < TIMEOUT_S + 10
        for name, data in files.items():
            t = time.monotonic()
            assert (mnt / "t" / name).read_bytes() == data
            assert time.monotonic() - t < 2 * TIMEOUT_S + 2, f"reading {name} stalled"
        t = time.monotonic()
        new = os.urandom(3 * MiB)
        with open(mnt / "new", "wb") as f:
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        assert time.monotonic() - t < 2 * TIMEOUT_S + 2, "a write stalled"
        assert (mnt / "new").read_bytes() == new
    finally:
        os.kill(hung.proc.pid, signal.SIGCONT)
    # the probe brings it back; then reads use it again: with another node dead, every
    # block still has a copy on the revived node or the third one
    deadline = time.monotonic() + 15
    while "NODE-UP n1" not in cluster.mount.log.read_text():
        assert time.monotonic() < deadline, "the node was not probed back"
        time.sleep(0.2)
    cluster.mount.stop()
    p = hafs("fsck", "--home", cluster.mount.home, "--repair", check=False)
    assert p.returncode in (0, 1), p.stdout + p.stderr
    cluster.mount.start()
    cluster.nodes[1].stop(signal.SIGKILL)
    check_tree(mnt / "t", files)
    assert (mnt / "new").read_bytes() == new


def test_a_corrupt_block_on_a_node_is_never_returned(cluster, tmp_path):
    mnt = cluster.mount.mnt
    data = os.urandom(2 * MiB)
    (mnt / "f").write_bytes(data)
    cluster.mount.stop()

    def blocks(node: Node) -> list[Path]:  # the file's: the only blocks of this filesystem
        return [f for f in (node.data / "blocks").rglob("*") if f.is_file()]

    # every copy on one node that holds some (each block is on 2 of the 3: not every node)
    node = max(cluster.nodes, key=lambda n: len(blocks(n)))
    assert blocks(node)
    for f in blocks(node):
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        f.write_bytes(bytes(raw))
    cluster.mount.start()
    assert (mnt / "f").read_bytes() == data
    # every copy corrupt: EIO, and the log names the block and the file
    cluster.mount.stop()
    for node in cluster.nodes:
        for f in (node.data / "blocks").rglob("*"):
            if f.is_file():
                f.write_bytes(b"x" + f.read_bytes()[1:])
    cluster.mount.start()
    with pytest.raises(OSError) as err:
        (mnt / "f").read_bytes()
    assert err.value.errno == errno.EIO
    assert any(
        "BLOCK-UNREADABLE" in ln and " of /f " in ln
        for ln in cluster.mount.log.read_text().splitlines()
    )


def test_wrong_token_is_refused_at_mkfs_and_mount(tmp_path):
    c = Cluster(tmp_path, n=2, token="s3cret-token")
    try:
        wrong = tmp_path / "wrong.token"
        wrong.write_text("not-the-token\n")
        one = ["mkfs", "--home", c.mount.home, "--replicas", "1", "--node", c.nodes[0].url]
        p = hafs(*one, check=False)
        assert p.returncode == 2 and "token" in p.stderr, p.stderr
        p = hafs(*one, "--token-file", wrong, check=False)
        assert p.returncode == 2 and "token" in p.stderr, p.stderr
        right = tmp_path / "right.token"
        right.write_text("s3cret-token\n")
        c.mkfs("--token-file", str(right))
        assert (c.mount.home / "meta.db").stat().st_mode & 0o077 == 0
        c.mount.start()
        (c.mount.mnt / "f").write_bytes(b"hello")
        assert (c.mount.mnt / "f").read_bytes() == b"hello"
    finally:
        c.close()
