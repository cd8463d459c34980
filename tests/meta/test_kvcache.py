"""What the kv engine's batched reads and file cache (meta/kvcache.py) must guarantee.

- Batched reads are the reads one after the other: same rows, same revisions.
- A client never answers from a revision of a file older than one it has read since:
  once another client's commit is visible to it (any read of the inode at the new
  revision: getattr, lookup, an open), its extents and xattrs are the new ones; its
  own changes at once; anyone's after the cache's ttl without a read.
- The cache is bounded.
- The requests an operation makes are counted (the figures the bench reports).

On MemKV and on a real 3-member etcd cluster (tests/etcdproc.py).
"""

from __future__ import annotations

import errno
import random
import stat
import threading

import pytest
from etcdproc import require_etcd, running_cluster
from prometheus_client import generate_latest

from hafs.errors import FsError, LockLost, LockTimeout
from hafs.meta import ROOT_INODE, AsyncMeta, Extent, FsConfig
from hafs.meta.etcd import EtcdKV, create_etcd, open_etcd, prefix_of
from hafs.meta.kv import KvMeta, k_inode, k_xattr, prefix_end
from hafs.meta.kvcache import FIRST_EXTENTS, FileCache, FileView
from hafs.meta.memkv import MemKV
from hafs.metrics import MountMetrics

CONFIG = FsConfig("fs-uuid", 2, 1, "tok", 123)
RING = {"version": 1, "nodes": []}
REG = stat.S_IFREG | 0o644


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Counted:
    """A KV whose calls are counted by name (what EtcdKV's `observe` sees on etcd)."""

    def __init__(self, kv) -> None:
        self.kv = kv
        self.name = kv.name
        self.calls: list[str] = []

    def __getattr__(self, name):
        attr = getattr(self.kv, name)
        if name in ("get", "scan", "batch", "commit") or name.startswith("lease_"):

            def call(*args, **kwargs):
                self.calls.append(name)
                return attr(*args, **kwargs)

            return call
        return attr


@pytest.fixture(scope="module")
def etcd_cluster(tmp_path_factory):
    require_etcd()
    with running_cluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


@pytest.fixture(params=["memkv", "etcd"])
def clients(request):
    """Two clients (a, b) of one new filesystem, each with its own file cache, and a
    raw KV of it; a's requests counted in a.kv.calls."""
    if request.param == "etcd":
        cluster = request.getfixturevalue("etcd_cluster")
        url = cluster.url(f"c{random.getrandbits(64):x}")
        create_etcd(url, CONFIG, RING, 0, 0).close()
        a, b = open_etcd(url, holder="a"), open_etcd(url, holder="b")
        raw = EtcdKV(cluster.endpoints, prefix_of(url.rsplit("/", 1)[1]))
    else:
        raw = MemKV()
        KvMeta.create(raw, CONFIG, RING, 0, 0)
        a, b = KvMeta.open(raw, holder="a"), KvMeta.open(raw, holder="b")
    a.kv = a.locks.kv = a.lease.kv = Counted(a.kv)
    a.files = FileCache(clock=Clock())
    yield a, b, raw
    for m in (a, b):
        m.close()
    raw.close()


def commit(m, ino: int, extents: list[Extent], size: int) -> None:
    m.commit(ino, 0, size, extents, {e.block_id: e.length for e in extents}, size, 1)


def blocks(tag: str, n: int, length: int = 100) -> list[Extent]:
    return [Extent(i * length, length, f"{tag}{i:060d}") for i in range(n)]


def test_batched_reads_equal_unbatched(clients):
    a, b, raw = clients
    f = b.mknod(ROOT_INODE, b"f", REG, 0, 0).id
    commit(b, f, blocks("a", 40), 4000)
    b.set_xattr(f, b"user.x", b"1")
    reads = [
        (k_inode(f), None, 0),
        (k_inode(10**9), None, 0),  # absent
        (b"E", b"F", 7),
        (b"E", b"F", 1000),
        (k_xattr(f, b""), prefix_end(k_xattr(f, b"")), 10),
        (b"Z", b"Y", 10),  # empty range
    ]
    one_by_one = []
    for start, end, limit in reads:
        if end is None:
            row = raw.get(start)
            one_by_one.append([] if row is None else [(start, *row)])
        else:
            one_by_one.append(raw.scan(start, end, limit))
    assert raw.batch(reads) == one_by_one
    assert raw.batch([]) == []


def test_another_clients_commit_is_seen_once_its_inode_is_read(clients):
    a, b, _ = clients
    f = b.mknod(ROOT_INODE, b"f", REG, 0, 0).id
    commit(b, f, blocks("a", 3), 300)
    b.set_xattr(f, b"user.v", b"old")
    assert a.getattr(f).size == 300
    assert a.extents(f, 0, 300) == blocks("a", 3)
    assert a.get_xattr(f, b"user.v") == b"old"
    commit(b, f, blocks("b", 5), 500)  # b's commits: a has not read the inode since
    b.set_xattr(f, b"user.v", b"new")
    assert a.getattr(f).size == 500  # (as an open does)
    assert a.extents(f, 0, 500) == blocks("b", 5)
    assert a.get_xattr(f, b"user.v") == b"new"
    assert a.list_xattrs(f) == [b"user.v"]
    b.remove_xattr(f, b"user.v")
    assert a.lookup(ROOT_INODE, b"f").id == f  # a lookup reads the inode too
    assert a.get_xattr(f, b"user.v") is None
    assert a.allocated_bytes(f) == 500


def test_without_a_read_of_the_inode_the_cache_lasts_its_ttl(clients):
    a, b, _ = clients
    f = b.mknod(ROOT_INODE, b"f", REG, 0, 0).id
    commit(b, f, blocks("a", 2), 200)
    a.getattr(f)
    commit(b, f, blocks("b", 2), 200)
    a.files.clock.t += a.files.ttl_s + 0.01
    assert a.extents(f, 0, 200) == blocks("b", 2)


def test_a_clients_own_changes_are_seen_at_once(clients):
    a, b, _ = clients
    f = a.mknod(ROOT_INODE, b"f", REG, 0, 0).id
    assert a.extents(f, 0, 1 << 30) == []
    commit(a, f, blocks("a", 3), 300)
    assert a.extents(f, 0, 300) == blocks("a", 3)
    a.set_xattr(f, b"user.k", b"v")
    assert a.get_xattr(f, b"user.k") == b"v"
    a.truncate(f, 150, 2)
    assert a.extents(f, 0, 300) == [*blocks("a", 1), Extent(100, 50, blocks("a", 2)[1].block_id)]
    assert a.allocated_bytes(f) == 150
    a.unlink(ROOT_INODE, b"f")
    assert a.getattr(f) is None
    assert a.extents(f, 0, 300) == []
    assert a.get_xattr(f, b"user.k") is None


def test_a_big_file_is_read_in_windows(clients):
    a, b, _ = clients
    f = b.mknod(ROOT_INODE, b"f", REG, 0, 0).id
    n = 3 * FIRST_EXTENTS
    commit(b, f, blocks("a", n), 100 * n)
    a.getattr(f)  # its first extents only
    for off in range(0, 100 * n, 50):
        assert a.extents(f, off, off + 250) == [
            e for e in blocks("a", n) if e.end > off and e.offset < off + 250
        ]
    assert a.allocated_bytes(f) == 100 * n


def test_an_older_read_never_replaces_a_newer_one():
    cache = FileCache(clock=Clock())
    new = FileView(7, cache.clock(), extents=[Extent(0, 5, "new")])
    cache.put(1, new)
    cache.put(1, FileView(5, cache.clock(), extents=[Extent(0, 5, "old")]))
    assert cache.get(1).extents == [Extent(0, 5, "new")]
    cache.seen(1, 9)  # the inode moved on: nothing of 7 or older is served again
    assert cache.get(1) is None
    cache.put(1, new)
    assert cache.get(1) is None
    cache.seen(2, 3)
    cache.seen(2, 0)  # found absent: deleted, and inode numbers are never reused
    cache.put(2, FileView(3, cache.clock(), extents=[]))
    assert cache.get(2) is None


def test_the_cache_is_bounded():
    cache = FileCache(size=8, clock=Clock())
    for ino in range(100):
        cache.put(ino, FileView(1, cache.clock(), extents=[]))
        cache.seen(1000 + ino, 5)
    assert len(cache) == 8  # markers (seen) count too
    assert cache.get(95) is None and cache.get(99) is not None  # the newest stay
    cache.get(96)  # used: kept before the others
    for ino in range(200, 207):
        cache.put(ino, FileView(1, cache.clock(), extents=[]))
    assert cache.get(96) is not None and cache.get(99) is None and len(cache) == 8


def test_requests_per_operation(clients):
    """What an operation asks of the store, in requests (each a round trip on etcd)."""
    a, _, _ = clients
    a.lease.id()  # taken once per client
    a.mknod(ROOT_INODE, b"warm", REG, 0, 0)  # takes the inode numbers
    calls = a.kv.calls

    def count(fn, *args, **kwargs):
        calls.clear()
        result = fn(*args, **kwargs)
        return result, list(calls)

    _, c = count(a.lookup, ROOT_INODE, b"f")
    assert c == ["batch"]  # the name and its directory, in one
    f, c = count(a.mknod, ROOT_INODE, b"f", REG, 0, 0)
    assert c == ["get", "commit"]  # the directory as its last commit here left it
    _, c = count(a.get_xattr, f.id, b"security.capability")
    assert c == []  # a new file has none
    _, c = count(a.extents, f.id, 0, 4096)
    assert c == []  # nor extents
    _, c = count(a.getattr, f.id)
    assert c == ["batch"]
    _, c = count(a.allocated_bytes, f.id)
    assert c == []  # read with the inode
    _, c = count(a.get_xattr, f.id, b"security.capability")
    assert c == []
    lease, c = count(a.locks._try, f"inode:{f.id}")
    assert c == ["batch", "commit"]
    token = lease[0].token
    _, c = count(a.fence, f.id, token)
    assert c == ["commit"]  # the lock is compared, not read; the inode as last seen
    _, c = count(a.extents, f.id, 0, 4096)
    assert c == ["batch"]  # fenced: the inode changed, so read again, with the inode
    _, c = count(a.extents, f.id, 0, 4096)
    assert c == []
    ext = Extent(0, 4096, "c" * 64)
    _, c = count(a.commit, f.id, 0, 4096, [ext], {ext.block_id: 4096}, 4096, 5, token)
    assert c == ["batch", "commit"]  # the extents and the block's row in one read
    _, c = count(a.locks._release, lease[0])
    assert c == ["commit"]
    a.files.clock.t += a.files.ttl_s + 0.01  # (what was read before is too old now)
    page, c = count(a.readdir, ROOT_INODE, 0, 100)
    assert c == ["scan", "batch"]  # the entries; their inodes with their first extents
    _, c = count(a.allocated_bytes, f.id)  # (st_blocks of a readdirplus entry)
    assert c == []
    _, c = count(a.unlink, ROOT_INODE, b"f")
    assert c == ["get", "batch", "get", "commit"]  # name; extents and xattrs; a block
    g = a.mknod(ROOT_INODE, b"g", REG, 0, 0).id
    _, c = count(a.setattr, g, mode=0o600)
    assert c == ["commit"]  # the inode as its create left it


def test_a_guess_that_is_no_longer_true_costs_a_rerun(clients):
    a, b, _ = clients
    f = a.mknod(ROOT_INODE, b"f", REG, 0, 0).id
    assert b.setattr(f, mode=0o600).mode & 0o777 == 0o600  # a's view of f is old now
    a.kv.calls.clear()
    assert a.setattr(f, uid=7).mode & 0o777 == 0o600  # b's change kept
    assert a.kv.calls == ["commit", "get", "commit"]
    assert b.getattr(f).uid == 7
    b.mknod(ROOT_INODE, b"h", REG, 0, 0)  # the directory changed since a's last look
    a.kv.calls.clear()
    with pytest.raises(FsError) as e:  # what is current answers
        a.mknod(ROOT_INODE, b"h", REG, 0, 0)
    assert e.value.errno == errno.EEXIST
    assert a.kv.calls == ["get", "commit", "batch", "commit"]


async def test_a_create_takes_its_files_lock(clients):
    """mknod(locked=True): the lock is granted by the create's transaction; acquiring and
    fencing it then need no request, and it is a lock like any other."""
    a, b, _ = clients
    f = a.mknod(ROOT_INODE, b"f", REG, 0, 0, locked=True)
    name = f"inode:{f.id}"
    a.kv.calls.clear()
    lease = await a.locks.acquire(name, 1)
    assert a.fence(f.id, lease.token) == f
    assert [c for c in a.kv.calls if c != "lease_keepalive"] == []
    with pytest.raises(LockTimeout):
        await b.locks.acquire(name, 0.3)  # held: another client waits
    ext = Extent(0, 10, "d" * 64)
    a.commit(f.id, 0, 10, [ext], {ext.block_id: 10}, 10, 5, lease.token)
    await a.locks.release(lease)
    other = await b.locks.acquire(name, 1)
    assert other.token > lease.token
    with pytest.raises(LockLost):
        a.commit(f.id, 0, 10, [], {}, 0, 6, lease.token)
    assert b.getattr(f.id).size == 10
    await b.locks.release(other)


def test_a_mounts_metrics_count_the_requests_to_etcd(clients):
    _, b, raw = clients
    if not isinstance(raw, EtcdKV):
        pytest.skip("MemKV makes no requests")
    b.mknod(ROOT_INODE, b"warm", REG, 0, 0)  # (takes inode numbers)
    metrics = MountMetrics()
    b.observe_requests(metrics.meta_request)
    b.mknod(ROOT_INODE, b"f", REG, 0, 0)
    text = generate_latest(metrics.registry).decode()
    assert 'hafs_meta_request_seconds_count{call="get"} 1.0' in text  # the name
    assert 'hafs_meta_request_seconds_count{call="commit"} 1.0' in text


def test_an_inode_this_client_deleted_is_absent_without_a_request(clients):
    a, b, _ = clients
    f = a.mknod(ROOT_INODE, b"f", REG, 0, 0).id
    g = b.mknod(ROOT_INODE, b"g", REG, 0, 0).id
    a.unlink(ROOT_INODE, b"f")
    a.kv.calls.clear()
    assert a.getattr(f) is None
    assert a.kv.calls == []
    assert a.getattr(10**9) is None  # never made (or not yet: another client may)
    b.unlink(ROOT_INODE, b"g")
    assert a.getattr(g) is None  # another's delete: asked
    assert a.kv.calls == ["batch", "batch"]


async def test_calls_answered_from_memory_make_no_thread_hop():
    # a threaded engine's `local_calls` run on the trio thread (a flush asks `referenced`
    # every time: on etcd it would cost a worker thread's round trip for nothing)
    meta = KvMeta.create(MemKV(), CONFIG, RING, 0, 0)
    threads = []
    real = meta.referenced
    meta.referenced = lambda ids: threads.append(threading.get_ident()) or real(ids)
    real_getattr = meta.getattr
    meta.getattr = lambda ino: threads.append(threading.get_ident()) or real_getattr(ino)
    am = AsyncMeta(meta)
    assert await am.referenced(["b1"]) == set()
    assert (await am.getattr(ROOT_INODE)).id == ROOT_INODE
    assert threads[0] == threading.get_ident() != threads[1]  # getattr: a request, a thread
