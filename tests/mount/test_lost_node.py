"""A node lost for good under a running mount, and a node that moved: `hafs node remove
--lost` and `hafs node set --address`, with real `hafs node` processes (R=2, W=2).

A node is killed with SIGKILL and its directory deleted; one file's block is left with
its only copy on that node (its other copy deleted by hand), so the removal must name
that file and restore every other block to two copies from the survivors.
"""

from __future__ import annotations

import errno
import json
import shutil
import signal
import time

import pytest
from conftest import hafs
from nodeproc import start_node
from test_remote_nodes import EXPECTED, Cluster, check_tree, make_tree

from hafs import home
from hafs.store.dirstore import block_id
from hafs.store.ring import Ring


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        c.mkfs()
        c.mount.start()
        yield c
    finally:
        c.close()
    bad = c.mount.bad_log_lines(allowed=(*EXPECTED, "BLOCK-LOST"))
    assert not bad, "unexpected errors in the daemon's log:\n" + "\n".join(bad[:20])


def ring_of(h) -> Ring:
    meta = home.open_meta(h)
    try:
        return Ring.from_json(meta.ring())
    finally:
        meta.close()


def blocks_of(node) -> set[str]:
    return {f.name for f in (node.data / "blocks").rglob("*") if f.is_file()}


def wait_for_ring(mount, version: int) -> None:
    """Until the mount's log says it uses ring `version`."""
    deadline = time.monotonic() + 10
    while f"RING-VERSION {version}:" not in mount.log.read_text():
        assert time.monotonic() < deadline, f"the mount never switched to ring {version}"
        time.sleep(0.1)


def test_a_lost_node_is_dropped_and_its_blocks_restored_while_mounted(cluster, tmp_path):
    mnt, h = cluster.mount.mnt, cluster.mount.home
    files = make_tree(mnt / "t", 40, 5000, seed=7)
    cluster.mount.stop()  # the mount keeps the small blocks it wrote in its block cache:
    cluster.mount.start()  # a new one fetches them from the nodes
    n1, n2, n3 = cluster.nodes
    # One file whose block is only on n3: delete its other copy by hand.
    only = next(name for name in sorted(files) if block_id(files[name]) in blocks_of(n3))
    bid = block_id(files[only])  # files of 5000 bytes are one block each
    for node in (n1, n2):
        node.block_file(bid).unlink(missing_ok=True)
    assert sum(bid in blocks_of(n) for n in cluster.nodes) == 1

    n3.stop(signal.SIGKILL)
    shutil.rmtree(n3.data)
    p = hafs("node", "remove", "--home", h, "--lost", "n3", check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "LOST DATA: blocks with no good copy on any node: 1." in p.stdout, p.stdout
    assert f"  /t/{only}" in p.stdout.splitlines(), p.stdout
    ring = ring_of(h)
    assert "n3" not in ring.nodes
    wait_for_ring(cluster.mount, ring.version)

    # Every other block is on both survivors, verified; the mount reads every file but one.
    survivors = blocks_of(n1) & blocks_of(n2)
    for name, data in files.items():
        if name != only:
            assert block_id(data) in survivors, name
    check_tree(mnt / "t", {k: v for k, v in files.items() if k != only})
    with pytest.raises(OSError) as e:
        (mnt / "t" / only).read_bytes()
    assert e.value.errno == errno.EIO

    # fsck agrees: the one file lost data, nothing else is wrong.
    cluster.mount.stop()
    report = json.loads(hafs("fsck", "--home", h, "--json", check=False).stdout)
    assert report["lost_paths"] == [f"/t/{only}"], report
    assert set(report["problems"]) == {"lost_block"}, report["problems"]
    cluster.mount.start()


def test_remove_lost_refuses_a_node_that_still_answers(cluster):
    h = cluster.mount.home
    before = ring_of(cluster.mount.home)
    p = hafs("node", "remove", "--home", h, "--lost", "n2", check=False)
    assert p.returncode == 2
    assert "node n2 still answers at" in p.stderr and "hafs node remove n2" in p.stderr
    assert ring_of(h) == before


def test_node_set_address_follows_a_moved_node_and_refuses_a_wrong_one(cluster, tmp_path):
    mnt, h = cluster.mount.mnt, cluster.mount.home
    files = make_tree(mnt / "t", 20, 5000, seed=8)
    n1, n2, _ = cluster.nodes

    # n2 moves: another directory, another port.
    n2.stop()
    shutil.move(n2.data, tmp_path / "moved")
    cluster.nodes[1] = n2 = start_node(tmp_path / "moved", init=None)
    before = ring_of(h)
    for wrong, message in [
        (n1.url, "the node there is node n1 of filesystem"),  # another node of this filesystem
        ("http://127.0.0.1:1", "does not answer at http://127.0.0.1:1"),
    ]:
        p = hafs("node", "set", "--home", h, "n2", "--address", wrong, check=False)
        assert p.returncode == 2, p.stderr
        assert message in p.stderr and "node n2" in p.stderr, p.stderr
        assert ring_of(h) == before
    p = hafs("node", "set", "--home", h, "n2", "--address", n2.url)
    assert f"node n2: {n2.url}" in p.stdout
    ring = ring_of(h)
    assert ring.nodes["n2"].address == n2.url
    wait_for_ring(cluster.mount, ring.version)
    # The mount follows: with n1 stopped, every file is read from n2 or n3.
    n1.stop()
    check_tree(mnt / "t", files)
