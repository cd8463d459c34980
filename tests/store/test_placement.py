"""Placement: R copies on the ring's nodes, the next node when one fails, verified reads."""

import errno
import os
import threading

import pytest
import trio

from hafs.errors import BlockMissing, NoSpace, QuorumLost
from hafs.store.chunker import MAX_SIZE
from hafs.store.dirstore import DirStore, block_id
from hafs.store.placement import (
    DEADLINE_MARGIN_S,
    HEDGE_MAX_S,
    LAST_RESORT_S,
    Placement,
    is_temporary,
    writable_bytes,
)
from hafs.store.remote import NodeRefused, NodeTimeout, NodeUnavailable
from hafs.store.ring import NodeSpec, Ring


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
    placement.stores[second].delete(bid)
    order = []
    for n, store in placement.stores.items():
        store.get = lambda b, n=n, get=store.get: (order.append(n), get(b))[1]
    assert await placement.get(bid) == data  # the down node is still asked as a last resort
    assert order[0] == second and order[-1] == first and len(order) == len(ring.nodes)


async def test_blocks_written_around_a_failing_node_are_recorded_and_repaired(tmp_path):
    placement, ring = make(tmp_path, failing={"n1"})
    recorded = {}
    placement.on_degraded = lambda bid, nodes: recorded.setdefault(bid, nodes)
    blocks = {}
    for _ in range(30):
        data = os.urandom(1000)
        bid = block_id(data)
        await placement.put(bid, data)
        blocks[bid] = data
    affected = {bid for bid in blocks if "n1" in ring.replicas(bid, 2)}
    assert affected and set(recorded) == affected
    for bid in affected:  # recorded where the copies went: R nodes, not n1
        assert sorted(recorded[bid]) == holders(placement, bid) and "n1" not in recorded[bid]

    placement.health.mark_down("n1", "test")
    assert all([await placement.repair(b, recorded[b]) is None for b in affected])  # waits

    placement.stores["n1"] = DirStore.open(tmp_path / "n1", "n1", "fs")  # the disk is back
    placement.health.success("n1")
    for bid in affected:
        assert await placement.repair(bid, recorded[bid]) is True
        assert holders(placement, bid) == sorted(ring.replicas(bid, 2))  # extra copy gone
        assert await placement.get(bid) == blocks[bid]


async def test_a_repair_that_cannot_copy_keeps_every_copy(tmp_path):
    placement, ring = make(tmp_path, failing={"n1"})
    while "n1" not in ring.replicas(bid := block_id(data := os.urandom(1000)), 2):
        pass  # a block the ring places on the failing node
    await placement.put(bid, data)
    before = holders(placement, bid)
    assert await placement.repair(bid, before) is False  # n1 still fails its writes
    assert holders(placement, bid) == before


class RestartingStore(DirStore):
    """A node that refuses connections for its first `refusals` calls (a restart)."""

    refusals = 1

    def _maybe_refuse(self):
        if self.refusals:
            self.refusals -= 1
            raise NodeUnavailable("http://test", self.node_id, "connection refused", 111)

    def get(self, block_id):
        self._maybe_refuse()
        return super().get(block_id)

    def put(self, block_id, data):
        self._maybe_refuse()
        return super().put(block_id, data)


class HungStore(DirStore):
    calls = 0

    def get(self, block_id):
        self.calls += 1
        raise NodeTimeout("http://test", self.node_id, "no answer within 1 s", 110)


def test_only_temporary_failures_are_retried():
    refused = NodeUnavailable("a", "n1", "connection refused", 111)
    assert is_temporary(refused) and is_temporary(NodeRefused("a", "n1", "disk", 5, 500))
    assert not is_temporary(NodeTimeout("a", "n1", "slow", 110))
    assert not is_temporary(NodeRefused("a", "n1", "full", 28, 507))
    assert not is_temporary(NodeRefused("a", "n1", "bad body", 5, 422))
    assert not is_temporary(OSError(5, "disk error"))


async def test_a_restarting_node_is_retried_after_a_backoff(tmp_path):
    placement, ring = make(tmp_path, n=1, r=1)
    placement.write_quorum = 1
    placement.stores["n1"] = RestartingStore.open(tmp_path / "n1", "n1", "fs")
    data = os.urandom(100)
    bid = block_id(data)
    await placement.put(bid, data)  # refused, then stored on the retry
    placement.stores["n1"].refusals = 1
    assert await placement.get(bid) == data  # refused, then read on the retry


async def test_a_timed_out_read_is_not_retried(tmp_path):
    placement, ring = make(tmp_path, n=1, r=1)
    hung = placement.stores["n1"] = HungStore.open(tmp_path / "n1", "n1", "fs")
    with pytest.raises(BlockMissing):
        await placement.get(block_id(b"x"))
    assert hung.calls == 1


async def test_a_write_around_a_failing_node_avoids_draining_nodes(tmp_path):
    specs = [NodeSpec(f"n{i + 1}", str(tmp_path / f"n{i + 1}")) for i in range(4)]
    specs[3] = NodeSpec("n4", specs[3].address, state="draining")
    stores = {}
    for s in specs:
        DirStore.create(s.address, s.id, "fs")
        stores[s.id] = (FailingStore if s.id == "n1" else DirStore).open(s.address, s.id, "fs")
    placement = Placement(Ring(specs), stores, 2, trio.CapacityLimiter(4))
    for _ in range(30):
        data = os.urandom(1000)
        bid = block_id(data)
        await placement.put(bid, data)
        assert holders(placement, bid) == ["n2", "n3"]  # never the failing or the draining node


class StuckStore(DirStore):
    """A hung node (SIGSTOP): every call blocks until the test lets it go."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.release = threading.Event()
        self.calls = 0

    def _hang(self):
        self.calls += 1
        self.release.wait(30)
        raise NodeTimeout("http://test", self.node_id, "no answer (injected)", 110)

    def get(self, block_id):
        self._hang()

    def put(self, block_id, data):
        self._hang()


def stuck(placement, tmp_path, node_id):
    store = placement.stores[node_id] = StuckStore.open(tmp_path / node_id, node_id, "fs")
    return store


async def test_a_hung_replica_costs_a_read_its_hedge_delay_not_a_timeout(tmp_path):
    placement, ring = make(tmp_path, n=3)
    placement.timeout = 20
    data = os.urandom(1000)
    bid = block_id(data)
    await placement.put(bid, data)
    first, _ = ring.replicas(bid, 2)
    hung = stuck(placement, tmp_path, first)
    try:
        with trio.fail_after(HEDGE_MAX_S + 2):  # far below the timeout of 20 s
            assert await placement.get(bid) == data
        assert hung.calls == 1
    finally:
        hung.release.set()


async def test_a_read_goes_on_in_the_ring_it_began_with(tmp_path):
    # a node joins while the first try hangs: the other candidates come from the ring the
    # read began with, whose stores it holds (not a node it has no store for: KeyError)
    placement, ring = make(tmp_path, n=3)
    placement.timeout = 2
    data = os.urandom(1000)
    bid = block_id(data)
    await placement.put(bid, data)
    first, _ = ring.replicas(bid, 2)
    for n, store in placement.stores.items():
        if n != first:
            store.delete(bid)  # only the hung node has it
    hung = stuck(placement, tmp_path, first)
    new = NodeSpec("n9", str(tmp_path / "n9"))
    DirStore.create(new.address, new.id, "fs")
    try:
        async with trio.open_nursery() as nursery:

            async def switch():
                while hung.calls == 0:
                    await trio.sleep(0.01)
                stores = {**placement.stores, "n9": DirStore.open(new.address, new.id, "fs")}
                placement.set_ring(Ring([*ring.nodes.values(), new], version=2), stores)

            nursery.start_soon(switch)
            with trio.fail_after(placement.timeout + DEADLINE_MARGIN_S + 2):
                with pytest.raises(BlockMissing):
                    await placement.get(bid)
    finally:
        hung.release.set()


async def test_writes_around_a_hung_node_end_within_the_bound(tmp_path):
    placement, ring = make(tmp_path, n=3)
    placement.timeout = 20
    hung = stuck(placement, tmp_path, "n1")
    try:
        for _ in range(10):  # each costs at most a hedge delay, far below the timeout
            data = os.urandom(1000)
            with trio.fail_after(HEDGE_MAX_S + 2):
                await placement.put(block_id(data), data)
            assert "n1" not in holders(placement, block_id(data))
    finally:
        hung.release.set()


def test_writes_are_hedged_in_every_trio_run_of_a_placement(tmp_path):
    # the placement's one hedge timer is a task of the trio run it started in: a
    # placement used again in another run (a tool's second trio.run) gets a new one
    placement, ring = make(tmp_path, n=3)
    placement.timeout = 20
    hung = stuck(placement, tmp_path, "n1")

    async def write():
        for _ in range(3):
            data = os.urandom(1000)
            with trio.fail_after(HEDGE_MAX_S + 2):  # far below the timeout of 20 s
                await placement.put(block_id(data), data)
            assert "n1" not in holders(placement, block_id(data))

    try:
        trio.run(write)
        trio.run(write)
    finally:
        hung.release.set()


async def test_with_every_copy_hung_a_call_fails_within_the_timeout(tmp_path):
    placement, ring = make(tmp_path, n=3)
    placement.timeout = 2
    data = os.urandom(1000)
    bid = block_id(data)
    await placement.put(bid, data)
    hung = [stuck(placement, tmp_path, n) for n in ring.replicas(bid, 2)]
    try:
        for call in (placement.get(bid), placement.put(block_id(b"y"), b"y")):
            started = trio.current_time()
            with pytest.raises((BlockMissing, QuorumLost), match="within 2 s"):
                await call
            assert trio.current_time() - started < placement.timeout + DEADLINE_MARGIN_S + 0.5
    finally:
        for store in hung:
            store.release.set()


async def test_a_node_known_down_is_asked_only_as_a_short_last_resort(tmp_path):
    placement, ring = make(tmp_path, n=3)
    placement.timeout = 20
    data = os.urandom(1000)
    bid = block_id(data)
    await placement.put(bid, data)
    first, second = ring.replicas(bid, 2)
    hung = stuck(placement, tmp_path, first)
    placement.health.mark_down(first, "test")
    try:
        assert await placement.get(bid) == data  # from the other copy: the down node not asked
        assert hung.calls == 0
        placement.stores[second].delete(bid)
        started = trio.current_time()
        with pytest.raises(BlockMissing):
            await placement.get(bid)  # now the down node is asked, but only briefly
        assert hung.calls == 1
        assert trio.current_time() - started < LAST_RESORT_S + 0.5
    finally:
        hung.release.set()


class FullStore(DirStore):
    def put(self, block_id, data):
        raise OSError(errno.ENOSPC, "No space left on device (injected)")


async def test_a_write_that_no_node_has_room_for_is_no_space(tmp_path):
    placement, _ = make(tmp_path, n=3)
    for n in ("n1", "n2"):
        placement.stores[n] = FullStore.open(tmp_path / n, n, "fs")
    with pytest.raises(NoSpace):
        await placement.put(block_id(b"x"), b"x")
    assert not placement.health.down(), "a full node answers: it is not down"
    placement.health.mark_down("n3", "test")  # a node down as well: not for lack of space
    placement.stores["n3"] = StuckStore.open(tmp_path / "n3", "n3", "fs")
    placement.stores["n3"].release.set()
    with pytest.raises(NoSpace):
        await placement.put(block_id(b"z"), b"z")  # n1 and n2 alone would have made W
    placement.health.mark_down("n2", "test")
    placement.stores["n2"] = StuckStore.open(tmp_path / "n2", "n2", "fs")
    placement.stores["n2"].release.set()
    with pytest.raises(QuorumLost) as err:
        await placement.put(block_id(b"w"), b"w")
    assert not isinstance(err.value, NoSpace)  # n1 alone could not have made W: EIO


def test_writable_bytes_needs_r_nodes_with_room():
    big = 100 * MAX_SIZE
    assert writable_bytes({"a": ("d1", big), "b": ("d2", big)}, 2) == big - MAX_SIZE
    assert writable_bytes({"a": ("d1", big), "b": ("d2", 0), "c": ("d3", MAX_SIZE)}, 2) == 0
    assert writable_bytes({"a": ("d1", big)}, 2) == 0  # fewer than R nodes
    three_on_one_disk = {n: ("d1", big) for n in "abc"}
    assert writable_bytes(three_on_one_disk, 2) == (big - MAX_SIZE) // 2
    uneven = {"a": ("d1", 10 * MAX_SIZE), "b": ("d2", 2 * MAX_SIZE), "c": ("d3", 2 * MAX_SIZE)}
    assert writable_bytes(uneven, 2) == 2 * MAX_SIZE  # every block needs b or c
