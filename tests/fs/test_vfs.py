"""The vfs without a mount: real metadata and backing directories, trio, no FUSE.

Every test ends with `assert_consistent`, the metadata invariants fsck will check:
refcounts equal extent counts, link counts equal entries, extents inside files.
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest
import trio
from conftest import vfs_session
from metacheck import assert_consistent

from hafs import home
from hafs.errors import FsError
from hafs.fs.vfs import Options, Vfs
from hafs.meta import ROOT_INODE
from hafs.meta.kv import KvMeta
from hafs.meta.memkv import MemKV
from hafs.store.chunker import MiB
from hafs.store.dirstore import block_id
from hafs.store.placement import Placement


def engine_of(fs: home.Filesystem, name: str):
    """The filesystem's metadata on engine `name`: its own SQLite, or a copy of its
    configuration and ring in a fresh memkv (the same nodes serve the blocks)."""
    if name == "sqlite":
        return fs.meta
    return KvMeta.create(MemKV(), fs.config, fs.meta.ring(), os.getuid(), os.getgid())


@pytest.fixture(params=["sqlite", "memkv"])
async def vfs(tmp_path, request):
    home.create(tmp_path / "h")
    fs = home.open_fs(tmp_path / "h")
    meta = engine_of(fs, request.param)
    placement = Placement(fs.ring, fs.stores, fs.replicas, trio.CapacityLimiter(8))
    v = Vfs(meta, placement, Options(flush_mb=4, gc_grace_s=0))
    async with trio.open_nursery() as nursery:
        await nursery.start(v.run)
        yield v
        await v.shutdown()
        assert_consistent(meta)
        nursery.cancel_scope.cancel()
    fs.meta.close()


def block_ids(meta, ino: int) -> set[str]:
    return {e.block_id for e in meta.extents(ino, 0, 2**62)}


def refcounts(meta) -> set[int]:
    return {b.refcount for b in meta.scan_blocks("", 10_000)}


async def write_file(v: Vfs, name: bytes, data: bytes, parent=ROOT_INODE, chunk=128 * 1024) -> int:
    fh, inode = await v.create(parent, name, 0o644, os.O_WRONLY, 0, 0)
    for off in range(0, len(data), chunk):
        await v.write(fh, off, data[off : off + chunk])
    await v.flush(fh)
    await v.release(fh)
    return inode.id


async def read_file(v: Vfs, ino: int) -> bytes:
    fh, _, _ = await v.open(ino, os.O_RDONLY)
    try:
        return await v.read(fh, 0, (await v.getattr(ino)).size + 10)
    finally:
        await v.release(fh)


async def test_write_read_large_file(vfs):
    data = random.Random(1).randbytes(20 * MiB + 7)
    ino = await write_file(vfs, b"big", data)
    assert (await vfs.getattr(ino)).size == len(data)
    vfs.shared.cache.clear()
    assert await read_file(vfs, ino) == data


async def test_random_write_rechunks_only_the_neighbourhood(vfs):
    data = bytearray(random.Random(2).randbytes(24 * MiB))
    ino = await write_file(vfs, b"f", bytes(data))
    before = block_ids(vfs.engine, ino)
    fh, _, _ = await vfs.open(ino, os.O_RDWR)
    await vfs.write(fh, 12 * MiB, b"patch" * 100)
    await vfs.release(fh)
    data[12 * MiB : 12 * MiB + 500] = b"patch" * 100
    after = block_ids(vfs.engine, ino)
    assert len(after - before) <= 3, "only the edited block's neighbourhood is rewritten"
    assert len(before - after) <= 2
    vfs.shared.cache.clear()
    assert await read_file(vfs, ino) == data


async def test_dedup_refcounts_and_unlink(vfs):
    data = random.Random(3).randbytes(6 * MiB)
    a = await write_file(vfs, b"a", data)
    await write_file(vfs, b"b", data)
    assert refcounts(vfs.engine) == {2}
    await vfs.unlink(ROOT_INODE, b"a")
    assert vfs.engine.getattr(a) is None  # no kernel reference, no open handle
    assert refcounts(vfs.engine) == {1}
    await vfs.unlink(ROOT_INODE, b"b")
    assert refcounts(vfs.engine) == {0}
    assert await vfs.collect_garbage() > 0
    assert vfs.engine.scan_blocks("", 10) == []
    assert all(not any(s.iter_ids()) for s in vfs.placement.stores.values())


def block_calls(v: Vfs, call: str = "put") -> float:
    """The block calls (puts by default) the vfs's placement made so far (its metrics)."""
    return sum(
        s.value
        for metric in v.placement.metrics.registry.collect()
        for s in metric.samples
        if s.name == "hafs_block_call_seconds_count" and s.labels.get("call") == call
    )


async def test_small_blocks_just_written_are_read_from_the_cache(vfs):
    small = random.Random(5).randbytes(10_000)
    big = random.Random(6).randbytes(3 * MiB)
    a = await write_file(vfs, b"small", small)
    b = await write_file(vfs, b"big", big)
    gets = block_calls(vfs, "get")
    assert await read_file(vfs, a) == small
    assert block_calls(vfs, "get") == gets, "a small file's block is cached when committed"
    assert await read_file(vfs, b) == big
    assert block_calls(vfs, "get") > gets, "a stream's large blocks are not"
    vfs.shared.cache.clear()
    gets = block_calls(vfs, "get")
    assert await read_file(vfs, a) == small
    assert block_calls(vfs, "get") > gets


async def test_a_block_files_reference_already_is_not_stored_again(vfs, request):
    data = random.Random(4).randbytes(6 * MiB)  # a few blocks
    await write_file(vfs, b"a", data)
    stored = block_calls(vfs)
    assert stored >= 3 * vfs.placement.replicas
    b = await write_file(vfs, b"b", data + b"tail")  # the same blocks but the last
    extra = block_calls(vfs) - stored
    if request.node.callspec.params["vfs"] == "sqlite":  # the engine tells (a local read)
        assert 0 < extra <= 2 * vfs.placement.replicas  # the last block or two, not all
    else:
        assert extra >= 3 * vfs.placement.replicas
    await vfs.unlink(ROOT_INODE, b"a")
    assert await vfs.collect_garbage() > 0  # a's own last block; b's are all kept
    assert await read_file(vfs, b) == data + b"tail"


async def test_zero_blocks_are_holes(vfs):
    ino = await write_file(vfs, b"z", bytes(10 * MiB))
    assert vfs.engine.scan_extents((0, -1), 10) == []
    assert await read_file(vfs, ino) == bytes(10 * MiB)


async def test_interleaved_writers_share_state(vfs):
    fh1, inode = await vfs.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, 0, 0)
    fh2, _, _ = await vfs.open(inode.id, os.O_RDWR)
    await vfs.write(fh1, 0, b"a" * 100)
    await vfs.write(fh2, 50, b"b" * 100)
    assert await vfs.read(fh1, 0, 1000) == b"a" * 50 + b"b" * 100
    await vfs.release(fh1)
    assert await vfs.read(fh2, 0, 1000) == b"a" * 50 + b"b" * 100
    await vfs.release(fh2)
    assert await read_file(vfs, inode.id) == b"a" * 50 + b"b" * 100


async def test_posix_errors(vfs):
    d = await vfs.mkdir(ROOT_INODE, b"d", 0o755, 0, 0)
    await write_file(vfs, b"x", b"1", parent=d.id)
    with pytest.raises(FsError) as e:
        await vfs.rmdir(ROOT_INODE, b"d")
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(FsError) as e:
        await vfs.lookup(ROOT_INODE, b"nope")
    assert e.value.errno == errno.ENOENT
    with pytest.raises(FsError) as e:
        await vfs.mkdir(ROOT_INODE, b"d", 0o755, 0, 0)
    assert e.value.errno == errno.EEXIST
    with pytest.raises(FsError) as e:
        await vfs.unlink(ROOT_INODE, b"d")
    assert e.value.errno == errno.EISDIR
    with pytest.raises(FsError) as e:
        await vfs.mkdir(ROOT_INODE, b"n" * 256, 0o755, 0, 0)
    assert e.value.errno == errno.ENAMETOOLONG
    await vfs.rename(d.id, b"x", ROOT_INODE, b"y", 0)
    await vfs.rmdir(ROOT_INODE, b"d")
    assert [de.name for de, _ in await vfs.readdir(await vfs.opendir(ROOT_INODE), 0)] == [b"y"]


async def test_readdir_cursor_survives_changes(vfs):
    for i in range(50):
        await vfs.mkdir(ROOT_INODE, b"d%02d" % i, 0o755, 0, 0)
    fh = await vfs.opendir(ROOT_INODE)
    page = await vfs.readdir(fh, 0, limit=10)
    cursor = page[-1][0].cursor
    first = {de.name for de, _ in page}
    listed, unlisted = sorted(first)[0], sorted({b"d%02d" % i for i in range(50)} - first)[0]
    await vfs.rmdir(ROOT_INODE, listed)  # already listed
    await vfs.rmdir(ROOT_INODE, unlisted)  # not yet listed
    await vfs.mkdir(ROOT_INODE, b"new", 0o755, 0, 0)
    rest = [de.name for de, _ in await vfs.readdir(fh, cursor, limit=1000)]
    assert len(rest) == len(set(rest)) and not first & set(rest), "nothing listed twice"
    expect = {b"d%02d" % i for i in range(50)} - first - {unlisted}
    assert set(rest) - {b"new"} == expect  # a new entry may or may not be listed (POSIX)


async def test_full_write_buffer_flushes_idle_files(tmp_path):
    """Files each below flush_mb but together over the buffer: writers must not wait forever."""
    home.create(tmp_path / "h")
    fs = home.open_fs(tmp_path / "h")
    placement = Placement(fs.ring, fs.stores, fs.replicas, trio.CapacityLimiter(8))
    v = Vfs(fs.meta, placement, Options(write_buffer_mb=1, flush_mb=4))
    async with trio.open_nursery() as nursery:
        await nursery.start(v.run)
        handles = []
        data = random.Random(9).randbytes(512 * 1024)
        with trio.fail_after(20):
            for i in range(6):
                fh, inode = await v.create(ROOT_INODE, b"f%d" % i, 0o644, os.O_WRONLY, 0, 0)
                await v.write(fh, 0, data)
                handles.append((fh, inode.id))
            assert v.shared.budget.used <= 2 * 1024 * 1024
            for fh, _ in handles:
                await v.release(fh)
        for _, ino in handles:
            assert await read_file(v, ino) == data
        assert_consistent(fs.meta)
        nursery.cancel_scope.cancel()
    fs.meta.close()


async def test_concurrent_first_writes_share_one_lease(vfs):
    fh, inode = await vfs.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, 0, 0)
    fh2, _, _ = await vfs.open(inode.id, os.O_RDWR)
    async with trio.open_nursery() as n:
        n.start_soon(vfs.write, fh, 0, b"a" * 10)
        n.start_soon(vfs.write, fh2, 10, b"b" * 10)
    fs = vfs.files[inode.id]
    held = vfs.locks.held()
    assert len(held) == 1 and held[0].token == fs.lease.token
    await vfs.locks.keepalive(fs.lease)  # still ours: nobody released it under us
    await vfs.release(fh)
    assert vfs.locks.held()  # the second writer still has the file open
    await vfs.release(fh2)
    assert vfs.locks.held() == []
    assert await read_file(vfs, inode.id) == b"a" * 10 + b"b" * 10


async def test_repair_rounds_go_past_blocks_waiting_for_a_down_node(tmp_path):
    h = tmp_path / "h"
    home.create(h, 2, [str(h / "nodes" / f"n{i}") for i in (1, 2, 3, 4)])
    repaired = await vfs_session(h, repair_rounds)
    assert repaired > 0


def disk_gone(p: Placement, node_id: str) -> Path:
    """Take the node's directory away (so probes keep it down) and mark it down."""
    path = p.stores[node_id].path
    path.rename(path.with_name(node_id + "-gone"))
    p.health.mark_down(node_id, "test")
    return path


def disk_back(p: Placement, path: Path) -> None:
    path.with_name(path.name + "-gone").rename(path)
    p.health.success(path.name)


async def repair_rounds(vfs) -> int:
    """Degrade blocks around n1, repair while n2 is down, then with every node up;
    returns how many blocks were repaired (each checked on exactly its named nodes)."""
    p = vfs.placement
    n1 = disk_gone(p, "n1")
    blocks = [os.urandom(1000) for _ in range(40)]
    for data in blocks:
        await p.put(block_id(data), data)
    await vfs.record_degraded()
    recorded = dict(vfs.engine.degraded_blocks("", 100))
    assert set(recorded) == {block_id(d) for d in blocks if "n1" in p.ring.replicas(block_id(d), 2)}
    disk_back(p, n1)
    n2 = disk_gone(p, "n2")  # blocks with a copy on n2 (or due there) must wait
    waiting = {bid for bid, nodes in recorded.items() if "n2" in nodes + p.ring.replicas(bid, 2)}
    assert waiting and waiting != set(recorded)
    for _ in range(2 * len(recorded)):  # one block per round: the rounds must rotate
        await vfs.repair_degraded(batch=1)
    assert {bid for bid, _ in vfs.engine.degraded_blocks("", 100)} == waiting
    disk_back(p, n2)
    for bid in recorded:
        named = p.ring.replicas(bid, 2)
        holders = sorted(n for n, s in p.stores.items() if s.has(bid))
        if bid not in waiting:
            assert holders == sorted(named)
        elif "n2" not in named:  # on its named nodes; the copy on n2 goes when n2 is back
            assert holders == sorted({*named, "n2"})
    for _ in range(2 * len(recorded)):
        await vfs.repair_degraded(batch=1)
    assert vfs.engine.count_degraded() == 0
    for bid in recorded:
        holders = sorted(n for n, s in p.stores.items() if s.has(bid))
        assert holders == sorted(p.ring.replicas(bid, 2))
    return len(recorded)
