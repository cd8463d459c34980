"""Placement: R copies on the ring's nodes, the next node when one fails, verified reads."""

import os

import pytest
import trio

from hafs.blocks import DirStore, block_id
from hafs.cluster import Placement
from hafs.errors import BlockMissing, QuorumLost
from hafs.ring import NodeSpec, Ring


class FailingStore(DirStore):
    """A backing directory whose disk fails every put (fault injection)."""

    def put(self, block_id, data):
        raise OSError(5, "Input/output error (injected)")


def make(tmp_path, n=4, failing=(), r=2):
    specs = [NodeSpec(f"n{i + 1}", str(tmp_path / f"n{i + 1}")) for i in range(n)]
    stores = {}
    for s in specs:
        DirStore.create(s.address, s.id, "fs")
        cls = FailingStore if s.id in failing else DirStore
        stores[s.id] = cls.open(s.address, s.id, "fs")
    ring = Ring(specs)
    return Placement(ring, stores, r, trio.CapacityLimiter(4)), ring


def holders(placement, bid):
    return sorted(n for n, s in placement.stores.items() if s.has(bid))


async def test_put_places_r_copies_where_the_ring_says(tmp_path):
    placement, ring = make(tmp_path)
    for _ in range(20):
        data = os.urandom(1000)
        bid = block_id(data)
        await placement.put(bid, data)
        assert holders(placement, bid) == sorted(ring.replicas(bid, 2))
        assert await placement.get(bid) == data


async def test_a_failing_node_is_replaced_by_the_next_on_the_ring(tmp_path):
    placement, ring = make(tmp_path, failing={"n1"})
    moved = 0
    for _ in range(30):
        data = os.urandom(1000)
        bid = block_id(data)
        await placement.put(bid, data)
        got = holders(placement, bid)
        assert len(got) == 2 and "n1" not in got
        moved += "n1" in ring.replicas(bid, 2)
        assert await placement.get(bid) == data  # found off its preferred node
    assert moved > 0


async def test_too_few_working_nodes_is_quorum_lost(tmp_path):
    placement, _ = make(tmp_path, n=3, failing={"n1", "n2"})
    with pytest.raises(QuorumLost):
        await placement.put(block_id(b"x"), b"x")


async def test_reads_skip_corrupt_and_missing_copies(tmp_path):
    placement, ring = make(tmp_path)
    data = os.urandom(5000)
    bid = block_id(data)
    await placement.put(bid, data)
    first, second = ring.replicas(bid, 2)
    path = placement.stores[first].path / "blocks" / bid[:2] / bid
    path.write_bytes(b"garbage")
    assert await placement.get(bid) == data
    placement.stores[second].delete(bid)
    with pytest.raises(BlockMissing):
        await placement.get(bid)


async def test_delete_honours_the_grace_period(tmp_path):
    placement, _ = make(tmp_path)
    data = os.urandom(100)
    bid = block_id(data)
    await placement.put(bid, data)
    assert not await placement.delete(bid, grace_s=3600)
    assert holders(placement, bid)
    assert await placement.delete(bid, grace_s=0)
    assert holders(placement, bid) == []


async def test_write_quorum_lets_a_put_succeed_with_fewer_copies(tmp_path, caplog):
    placement, _ = make(tmp_path, n=3, failing={"n1", "n2"})
    placement.write_quorum = 1
    data = os.urandom(100)
    bid = block_id(data)
    await placement.put(bid, data)
    assert holders(placement, bid) == ["n3"]
    assert "BLOCK-DEGRADED" in caplog.text
    assert await placement.get(bid) == data


class CountingFailingStore(FailingStore):
    calls = 0
    healthy = False

    def put(self, block_id, data):
        type(self).calls += 1
        if self.healthy:
            return super(FailingStore, self).put(block_id, data)
        return super().put(block_id, data)

    def ping(self):
        if not self.healthy:
            raise OSError(5, "still failing (injected)")


async def test_a_failing_node_is_marked_down_skipped_and_probed_back(tmp_path, caplog):
    placement, ring = make(tmp_path, n=4)
    n1 = placement.stores["n1"]
    bad = CountingFailingStore(n1.path, "n1", "fs")
    placement.stores["n1"] = bad
    blocks = [os.urandom(100) for _ in range(40)]
    for data in blocks:
        await placement.put(block_id(data), data)
    # three failures in a row mark it down; after that it is not asked again
    assert placement.health.is_down("n1")
    assert CountingFailingStore.calls == 3
    assert "NODE-DOWN n1" in caplog.text
    # a probe while it still fails keeps it down; once it works, it is up again
    await placement._probe("n1", bad)
    assert placement.health.is_down("n1")
    bad.healthy = True
    await placement._probe("n1", bad)
    assert not placement.health.is_down("n1")
    assert "NODE-UP n1" in caplog.text
    data = os.urandom(100)
    bid = block_id(data)
    await placement.put(bid, data)
    assert holders(placement, bid) == sorted(ring.replicas(bid, 2))


async def test_reads_try_down_nodes_last(tmp_path):
    placement, ring = make(tmp_path)
    data = os.urandom(100)
    bid = block_id(data)
    await placement.put(bid, data)
    first, second = ring.replicas(bid, 2)
    placement.health.mark_down(first, "test")
    order = list(placement._candidates(bid))
    assert order[0] == second and order[-1] == first
    placement.stores[second].delete(bid)
    assert await placement.get(bid) == data  # the down node is still asked as a last resort
