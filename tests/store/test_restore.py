"""Restore: a block back to a verified copy on each target, extra copies dropped only then.

Real DirStores in tmp_path (doubles only to inject a fault), and real `hafs node`
processes for the remote path.
"""

from __future__ import annotations

import os

import pytest
import trio
from nodeproc import FS as NODE_FS
from nodeproc import start_node

from hafs.errors import BlockMissing
from hafs.store.dirstore import DirStore, block_id
from hafs.store.placement import NodeHealth, Placement
from hafs.store.remote import NodeUnavailable
from hafs.store.restore import drop_extra, restore
from hafs.store.ring import NodeSpec, Ring

FS = "fs"


class FlippingStore(DirStore):
    """A disk that stores every block with its first byte flipped (fault injection)."""

    def put(self, block_id, data):
        bad = bytearray(data)
        bad[0] ^= 0xFF
        super().put(block_id, bytes(bad))


class DeadStore(DirStore):
    """A node that refuses every connection (fault injection)."""

    calls = 0

    def _refuse(self, *args):
        self.calls += 1
        raise NodeUnavailable("http://test", self.node_id, "connection refused", 111)

    get = put = size = delete = _refuse


class UnreadableStore(DirStore):
    """A disk whose existing copy cannot be read until it is deleted (EIO)."""

    broken = True

    def get(self, block_id):
        if self.broken:
            raise OSError(5, "Input/output error (injected)")
        return super().get(block_id)

    def delete(self, block_id):
        self.broken = False
        return super().delete(block_id)


def nodes(tmp_path, n=4, **kinds):
    """Stores n1..n<n>: DirStores, or the class given by node id in `kinds`."""
    out = {}
    for i in range(1, n + 1):
        nid = f"n{i}"
        DirStore.create(tmp_path / nid, nid, FS)
        out[nid] = kinds.get(nid, DirStore).open(tmp_path / nid, nid, FS)
    return out


def block(n=5000):
    data = os.urandom(n)
    return block_id(data), data


def corrupt(store: DirStore, bid: str) -> None:
    """Flip a byte of the store's copy in place (same size)."""
    path = store.path / "blocks" / bid[:2] / bid
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 1
    path.write_bytes(raw)


def holds(store, bid, data) -> bool:
    try:
        return bytes(store.get(bid)) == data
    except BlockMissing:
        return False


def test_a_block_is_copied_to_the_targets_that_lack_it_and_read_back(tmp_path):
    stores = nodes(tmp_path)
    bid, data = block()
    stores["n3"].put(bid, data)
    res = restore(bid, stores, ["n1", "n2"])
    assert res.complete and res.good == ["n1", "n2"] and res.written == ["n1", "n2"]
    assert res.source == "n3" and res.size == len(data) and not res.corrupt
    assert all(holds(stores[n], bid, data) for n in ("n1", "n2", "n3"))
    again = restore(bid, stores, ["n1", "n2"])  # nothing to do: both verified, nothing written
    assert again.complete and again.written == [] and again.good == ["n1", "n2"]


def test_a_corrupt_source_is_reported_and_the_next_good_one_used(tmp_path):
    stores = nodes(tmp_path)
    bid, data = block()
    for n in ("n3", "n4"):
        stores[n].put(bid, data)
    corrupt(stores["n3"], bid)
    res = restore(bid, stores, ["n1"], sources=["n3", "n4"])
    assert res.complete and res.source == "n4" and res.written == ["n1"]
    assert res.corrupt == ["n3"] and res.problems == ["corrupt on n3"]
    assert holds(stores["n1"], bid, data)
    assert not stores["n3"].has(bid)  # moved aside by its store, never copied


def test_a_corrupt_target_is_rewritten(tmp_path):
    stores = nodes(tmp_path)
    bid, data = block()
    for n in ("n1", "n2"):
        stores[n].put(bid, data)
    corrupt(stores["n1"], bid)
    res = restore(bid, stores, ["n1", "n2"])
    assert res.complete and res.corrupt == ["n1"] and res.written == ["n1"]
    assert res.source == "n2" and holds(stores["n1"], bid, data)


def test_a_target_that_stores_a_bad_copy_is_caught_on_read_back(tmp_path):
    stores = nodes(tmp_path, n1=FlippingStore)
    bid, data = block()
    stores["n3"].put(bid, data)
    res = restore(bid, stores, ["n1", "n2"])
    assert not res.complete and res.good == ["n2"] and res.written == ["n2"]
    assert "n1" not in res.good and "reading it back" in res.failed["n1"]
    assert "corrupt" in res.failed["n1"] and "n1" in res.corrupt
    assert not stores["n1"].has(bid)  # the bad copy was moved aside by the read-back


def test_a_down_target_is_reported_not_raised(tmp_path):
    stores = nodes(tmp_path, n1=DeadStore)
    bid, data = block()
    stores["n3"].put(bid, data)
    res = restore(bid, stores, ["n1", "n2"])
    assert not res.complete and res.good == ["n2"]
    assert "connection refused" in res.failed["n1"]

    stores["n4"] = None  # a node that could not be opened at all
    res = restore(bid, stores, ["n4", "n2"])
    assert res.failed == {"n4": "node n4 is unavailable"} and res.good == ["n2"]


def test_health_records_failures_and_down_nodes_are_not_asked(tmp_path):
    stores = nodes(tmp_path, n1=DeadStore)
    bid, data = block()
    stores["n3"].put(bid, data)
    health = NodeHealth()
    res = restore(bid, stores, ["n1", "n2"], health=health)
    assert not res.complete and health.is_down("n1")  # a refused connection: down at once
    calls = stores["n1"].calls
    res = restore(bid, stores, ["n1", "n2"], sources=["n1", "n3"], health=health)
    assert stores["n1"].calls == calls  # not asked again, as target or as source
    assert res.failed["n1"].startswith("node n1 is down")
    assert drop_extra(res, stores, ["n3"], health=health).deleted == []


def test_no_good_copy_anywhere_fails_every_lacking_target(tmp_path):
    stores = nodes(tmp_path)
    bid, data = block()
    stores["n3"].put(bid, data)
    corrupt(stores["n3"], bid)
    res = restore(bid, stores, ["n1", "n2"])
    assert not res.found and res.source is None and res.corrupt == ["n3"]
    assert set(res.failed) == {"n1", "n2"}
    assert all("no good copy" in why and "corrupt on n3" in why for why in res.failed.values())


def test_an_unreadable_copy_is_deleted_and_rewritten(tmp_path):
    stores = nodes(tmp_path, n1=UnreadableStore)
    bid, data = block()
    for n in ("n1", "n2"):
        stores[n].put(bid, data)
    res = restore(bid, stores, ["n1", "n2"])
    assert res.complete and res.written == ["n1"] and holds(stores["n1"], bid, data)


def test_with_a_size_a_copy_of_that_size_is_trusted_unread(tmp_path):
    stores = nodes(tmp_path)
    bid, data = block()
    for n in ("n1", "n2"):
        stores[n].put(bid, data)
    corrupt(stores["n1"], bid)  # same size: the fast pass cannot tell
    res = restore(bid, stores, ["n1", "n2"], size=len(data))
    assert res.complete and res.good == ["n1", "n2"] and res.source is None  # nothing read

    stores["n2"].delete(bid)  # now bytes are needed: n1 is read as the source, fails its hash
    stores["n3"].put(bid, data)
    res = restore(bid, stores, ["n1", "n2"], size=len(data))
    assert res.complete and res.corrupt == ["n1"] and res.source == "n3"
    assert sorted(res.written) == ["n1", "n2"]
    assert holds(stores["n1"], bid, data) and holds(stores["n2"], bid, data)


def test_the_throttle_is_charged_for_each_copy_written(tmp_path):
    stores = nodes(tmp_path)
    bid, data = block()
    stores["n3"].put(bid, data)
    charged = []
    restore(bid, stores, ["n1", "n2"], throttle=charged.append)
    assert charged == [len(data), len(data)]


def test_drop_extra_deletes_nothing_unless_every_target_is_good(tmp_path):
    stores = nodes(tmp_path, n1=FlippingStore)
    bid, data = block()
    for n in ("n3", "n4"):
        stores[n].put(bid, data)
    res = restore(bid, stores, ["n1", "n2"])
    assert not res.complete
    dropped = drop_extra(res, stores, ["n3", "n4"])
    assert dropped.deleted == [] and set(dropped.kept) == {"n3", "n4"}
    assert stores["n3"].has(bid) and stores["n4"].has(bid)

    stores["n1"] = DirStore.open(tmp_path / "n1", "n1", FS)  # the disk is fixed
    res = restore(bid, stores, ["n1", "n2"])
    assert res.complete
    dropped = drop_extra(res, stores, ["n3", "n4", "n1"])  # a target is never an extra
    assert dropped.deleted == ["n3", "n4"] and not dropped.kept
    assert [n for n, s in stores.items() if s.has(bid)] == ["n1", "n2"]


def test_drop_extra_keeps_the_copy_of_a_down_node(tmp_path):
    stores = nodes(tmp_path)
    bid, data = block()
    for n in ("n1", "n2", "n3"):
        stores[n].put(bid, data)
    health = NodeHealth()
    health.mark_down("n3", "test")
    res = restore(bid, stores, ["n1", "n2"], health=health)
    dropped = drop_extra(res, stores, ["n3"], health=health)
    assert dropped.deleted == [] and dropped.kept["n3"].startswith("node n3 is down")
    assert stores["n3"].has(bid)


@pytest.fixture
def two_nodes(tmp_path):
    started = []
    try:
        for nid in ("r1", "r2"):
            started.append(start_node(tmp_path / nid, init=nid))
        yield started
    finally:
        for node in started:
            node.stop()


def test_restore_between_real_nodes(tmp_path, two_nodes):
    r1, r2 = two_nodes
    stores = {"r1": r1.store("r1", NODE_FS), "r2": r2.store("r2", NODE_FS)}
    try:
        bid, data = block(100_000)
        stores["r1"].put(bid, data)
        path = r1.block_file(bid)  # corrupt r1's copy on its disk (same size)
        raw = bytearray(path.read_bytes())
        raw[0] ^= 1
        path.write_bytes(raw)
        stores["r2"].put(bid, data)
        res = restore(bid, stores, ["r1"], sources=["r2"])
        assert res.complete and res.corrupt == ["r1"] and res.written == ["r1"]
        assert res.source == "r2" and path.read_bytes() == data

        r2.stop()  # a stopped node: reported, not raised, its copy is not dropped
        health = NodeHealth()
        res = restore(bid, stores, ["r1", "r2"], health=health)
        assert res.good == ["r1"] and "r2" in res.failed and health.is_down("r2")
        res = restore(bid, stores, ["r1"], health=health)
        dropped = drop_extra(res, stores, ["r2"], health=health)
        assert res.complete and dropped.deleted == [] and "r2 is down" in dropped.kept["r2"]
    finally:
        for s in stores.values():
            s.close()


async def test_the_mounts_repair_keeps_the_stand_in_copy_until_the_named_copy_verifies(tmp_path):
    stores = nodes(tmp_path, n1=FlippingStore)
    ring = Ring([NodeSpec(n, str(tmp_path / n)) for n in stores])
    placement = Placement(ring, stores, 2, trio.CapacityLimiter(4))
    while True:  # a block the ring places on n1
        bid, data = block()
        named = ring.replicas(bid, 2)
        if "n1" in named:
            break
    stand_in = next(n for n in ring.walk(bid) if n not in named)
    other = next(n for n in named if n != "n1")
    for n in (other, stand_in):
        stores[n].put(bid, data)

    assert await placement.repair(bid, [other, stand_in]) is False  # n1's copy fails its hash
    assert stores[stand_in].has(bid) and not stores["n1"].has(bid)
    assert not placement.health.is_down("n1")  # a disk that answers: not a down node

    stores["n1"] = DirStore.open(tmp_path / "n1", "n1", FS)  # the disk is replaced
    assert await placement.repair(bid, [other, stand_in]) is True
    assert sorted(n for n, s in stores.items() if s.has(bid)) == sorted(named)
    assert await placement.get(bid) == data
