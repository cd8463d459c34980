"""Leases and fencing tokens of the embedded lock service, on trio's MockClock
(pytest-trio's autojump_clock: virtual time jumps whenever every task sleeps)."""

import pytest
import trio

from hafs.errors import LockLost, LockTimeout
from hafs.meta import ROOT_INODE, FsConfig
from hafs.meta.sqlite import SqliteLockService, SqliteMeta


@pytest.fixture
def meta(tmp_path):
    config = FsConfig("u", 2, 2, None, 0)
    m = SqliteMeta.create(tmp_path / "meta.db", config, {"version": 1, "nodes": []}, 0, 0)
    yield m
    m.close()


def services(meta, *holders, ttl=10.0):
    clock = lambda: int(trio.current_time() * 1e9)  # noqa: E731 - wall clock follows MockClock
    return [SqliteLockService(meta.db, h, ttl_s=ttl, clock=clock) for h in holders]


async def test_tokens_only_grow(meta, autojump_clock):
    a, b = services(meta, "a", "b")
    tokens = []
    for svc in (a, b, a, b):
        lease = await svc.acquire("inode:5", wait_s=1)
        tokens.append(lease.token)
        await svc.release(lease)
    assert tokens == sorted(tokens) and len(set(tokens)) == 4


async def test_second_holder_waits_then_times_out(meta, autojump_clock):
    a, b = services(meta, "a", "b")
    lease = await a.acquire("x", wait_s=1)
    with pytest.raises(LockTimeout) as e:
        await b.acquire("x", wait_s=3)
    assert e.value.holder == "a"
    await a.release(lease)
    assert (await b.acquire("x", wait_s=0)).token == lease.token + 1


async def test_waiter_gets_the_lock_when_released(meta, autojump_clock):
    a, b = services(meta, "a", "b")
    lease = await a.acquire("x", wait_s=1)
    got = []

    async def waiter():
        got.append(await b.acquire("x", wait_s=30))

    async with trio.open_nursery() as n:
        n.start_soon(waiter)
        await trio.sleep(5)
        assert not got
        await a.release(lease)
    assert got[0].token == lease.token + 1


async def test_expired_lease_is_taken_over_and_fenced(meta, autojump_clock):
    a, b = services(meta, "a", "b", ttl=10)
    ino = meta.mknod(ROOT_INODE, b"f", 0o100644, 0, 0).id
    old = await a.acquire("inode", wait_s=1)
    meta.fence(ino, old.token)
    await trio.sleep(5)
    await a.keepalive(old)  # renewed: valid until t=15
    await trio.sleep(9)
    assert a.valid(old)
    await trio.sleep(2)  # t=16: expired
    assert not a.valid(old)
    new = await b.acquire("inode", wait_s=0)  # no wait: the lease is over
    assert new.token > old.token
    meta.fence(ino, new.token)
    with pytest.raises(LockLost):
        await a.keepalive(old)
    with pytest.raises(LockLost):
        meta.truncate(ino, 0, 1, token=old.token)  # the old writer's commit is refused
    meta.truncate(ino, 0, 1, token=new.token)
    assert [i.holder for i in b.held()] == ["b"]


async def test_keepalive_after_takeover_is_lost(meta, autojump_clock):
    a, b = services(meta, "a", "b", ttl=10)
    old = await a.acquire("x", wait_s=1)
    await trio.sleep(11)
    await b.acquire("x", wait_s=0)
    old.expires_ns = int(trio.current_time() * 1e9) + 10**9  # as if a's clock lagged
    with pytest.raises(LockLost):
        await a.keepalive(old)
