"""One suite for every metadata engine: MetaStore, LockService and Sessions.

The `engine` fixture makes a filesystem on each engine; `engine.client(holder)`
opens a second client of the same filesystem (another connection, or another
KvMeta over the same KV), as a second mount would.  Lease ends are driven by
one injected clock (`engine.advance`); lock waits run on real time.  etcd ends
leases on its own clock: there `engine.advance` also sleeps, the lease ttl is
short (`engine.ttl`) and a lease ends up to `engine.expiry_lag` after its ttl
(etcd's leader looks for expired leases every 500 ms and revokes them through
raft).  etcd: one real 3-member cluster for the module (tests/etcdproc.py),
a fresh filesystem prefix per test.
"""

from __future__ import annotations

import errno
import random
import stat
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest
import trio
from etcdproc import require_etcd, running_cluster

import hafs.meta.sqlite as sqlite_mod
from hafs.errors import FsError, LockLost, LockTimeout, UserError
from hafs.meta import ROOT_INODE, Extent, FsConfig
from hafs.meta.etcd import create_etcd, open_etcd
from hafs.meta.kv import K_VERSION, KvMeta
from hafs.meta.memkv import MemKV

UID, GID = 1000, 1000
CONFIG = FsConfig("fs-uuid", 2, 1, "tok", 123)
RING = {
    "version": 1,
    "nodes": [{"id": "n1", "address": "/x", "weight": 1, "zone": "", "state": "up"}],
}
TTL = 5.0
ETCD_TTL = 2.0  # etcd's leases count whole seconds; short, as these tests wait them out
REG = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


class FakeClock:
    """Wall-clock nanoseconds that move only when told (thread-safe enough: one int)."""

    def __init__(self) -> None:
        self.ns = time.time_ns()

    def __call__(self) -> int:
        return self.ns

    def advance(self, s: float) -> None:
        self.ns += int(s * 1e9)


@dataclass
class Engine:
    name: str
    meta: object
    clock: FakeClock
    open_client: Callable[[str], object]
    clients: list = field(default_factory=list)
    ttl: float = TTL
    expiry_lag: float = 0.0
    real_time: bool = False  # leases end on real time (etcd) as well as on `clock`
    race_steps: int = 3000  # per client in the race test

    def client(self, holder: str):
        c = self.open_client(holder)
        self.clients.append(c)
        return c

    def advance(self, s: float) -> None:
        self.clock.advance(s)
        if self.real_time:
            time.sleep(s)


@pytest.fixture(scope="module")
def etcd_cluster(tmp_path_factory):
    require_etcd()
    with running_cluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "memkv", "etcd"])
def engine(request, tmp_path):
    clock = FakeClock()
    ttl = ETCD_TTL if request.param == "etcd" else TTL
    opts = {"lock_ttl_s": ttl, "clock": clock}
    if request.param == "etcd":
        url = request.getfixturevalue("etcd_cluster").url(f"t{random.getrandbits(64):x}")
        meta = create_etcd(url, CONFIG, RING, UID, GID, holder="a", **opts)
        open_client = lambda holder: open_etcd(url, holder=holder, **opts)  # noqa: E731
    elif request.param == "sqlite":
        sqlite_meta = getattr(sqlite_mod, "SqliteMeta", None)
        if sqlite_meta is None:
            pytest.skip("hafs.meta.sqlite has no SqliteMeta (the engine interface) yet")
        path = tmp_path / "meta.db"
        meta = sqlite_meta.create(path, CONFIG, RING, UID, GID, holder="a", **opts)
        open_client = lambda holder: sqlite_meta.open(path, holder=holder, **opts)  # noqa: E731
    else:
        kv = MemKV(clock=clock)
        meta = KvMeta.create(kv, CONFIG, RING, UID, GID, holder="a", **opts)
        open_client = lambda holder: KvMeta.open(kv, holder=holder, **opts)  # noqa: E731
    eng = Engine(request.param, meta, clock, open_client, [meta], ttl)
    if request.param == "etcd":
        eng.expiry_lag, eng.real_time = 1.0, True
        eng.race_steps = 400  # ~13 ms a step on a loaded 2-core machine: 3000 take 80 s
    yield eng
    for c in eng.clients:
        c.close()


def err(code: int, fn: Callable, *args, **kwargs) -> None:
    with pytest.raises(FsError) as e:
        fn(*args, **kwargs)
    assert e.value.errno == code, f"{errno.errorcode[e.value.errno]}, not {errno.errorcode[code]}"


def mkfile(m, parent: int, name: bytes):
    return m.mknod(parent, name, REG, UID, GID)


def mkdir(m, parent: int, name: bytes):
    return m.mknod(parent, name, DIR, UID, GID)


def nlink(m, ino: int) -> int:
    return m.getattr(ino).nlink


# ------------------------------------------------------------ configuration


def test_config_and_ring_compare_and_set(engine):
    m = engine.meta
    assert m.config() == CONFIG
    assert m.ring() == RING and m.ring_changed_ns() == 0
    new = {**RING, "version": 2}
    assert m.replace_ring(new, expect_version=1)
    assert m.ring() == new and m.ring_changed_ns() > 0
    assert not m.replace_ring({**RING, "version": 3}, expect_version=1)
    assert m.ring() == new


def test_owner_token_and_adopt(engine):
    m = engine.meta
    own = m.owner()
    assert own.token is None and own.previous == () and own.copy_of is None  # made without one
    assert own.where  # where the store is, for the messages of the stores it locks out
    m.adopt("t1")  # the first token (an older store changing its nodes for the first time)
    assert (m.owner().token, m.owner().previous) == ("t1", ())
    m.adopt("t1")  # the same token again: nothing to remember
    m.adopt("t2")
    m.adopt("t3")
    assert (m.owner().token, m.owner().previous) == ("t3", ("t1", "t2"))
    other = engine.client("b")  # every client sees it
    assert other.owner().token == "t3" and other.owner().copy_of is None


def test_the_token_and_ca_change_and_other_clients_read_them_fresh(engine):
    m = engine.meta
    other = engine.client("b")
    assert other.config() == CONFIG and CONFIG.ca_pem is None  # written without one: None
    new = m.update_config(node_token="tok2", ca_pem="PEM")
    assert new == replace(CONFIG, node_token="tok2", ca_pem="PEM") == m.config()
    assert other.config() == CONFIG  # read once
    assert other.fresh_config() == new
    got = []  # from another thread, as a refused node client re-reads it
    t = threading.Thread(target=lambda: got.append(other.fresh_config()))
    t.start()
    t.join()
    assert got == [new]
    assert m.update_config(node_token=None).node_token is None
    assert other.fresh_config() == replace(new, node_token=None)
    with pytest.raises(ValueError):
        m.update_config(replicas=3)
    assert other.fresh_config().replicas == CONFIG.replicas


def test_root_and_new_inodes(engine):
    m = engine.meta
    root = m.getattr(ROOT_INODE)
    assert stat.S_ISDIR(root.mode) and root.nlink == 2 and (root.uid, root.gid) == (UID, GID)
    f = mkfile(m, ROOT_INODE, b"f")
    d = mkdir(m, ROOT_INODE, b"d")
    s = m.mknod(ROOT_INODE, b"s", stat.S_IFLNK | 0o777, UID, GID, target=b"f/../x")
    c = m.mknod(ROOT_INODE, b"c", stat.S_IFCHR | 0o600, UID, GID, rdev=0x0501)
    assert (f.nlink, d.nlink, s.nlink) == (1, 2, 1)
    assert s.target == b"f/../x" and s.size == 6 and f.target is None
    assert c.rdev == 0x0501 and stat.S_ISCHR(c.mode)
    assert len({f.id, d.id, s.id, c.id, ROOT_INODE}) == 5
    assert m.getattr(f.id) == f and m.lookup(ROOT_INODE, b"s") == s
    assert nlink(m, ROOT_INODE) == 3  # the new directory's ".."
    assert m.getattr(ROOT_INODE).mtime_ns >= c.ctime_ns
    assert m.usage().inodes == 5


def test_mknod_errors(engine):
    m = engine.meta
    f = mkfile(m, ROOT_INODE, b"f")
    d = mkdir(m, ROOT_INODE, b"d")
    err(errno.EEXIST, mkfile, m, ROOT_INODE, b"f")
    err(errno.EEXIST, mkdir, m, ROOT_INODE, b"d")
    err(errno.ENOTDIR, mkfile, m, f.id, b"x")
    err(errno.ENOENT, mkfile, m, 999_999, b"x")
    err(errno.ENAMETOOLONG, mkfile, m, ROOT_INODE, b"n" * 256)
    err(errno.EINVAL, mkfile, m, ROOT_INODE, b"a/b")
    m.rmdir(ROOT_INODE, b"d")
    err(errno.ENOENT, mkfile, m, d.id, b"x")  # a removed directory takes no new entries
    assert mkfile(m, ROOT_INODE, b"n" * 255).nlink == 1


def test_setgid_directory_gives_its_group(engine):
    m = engine.meta
    g = m.mknod(ROOT_INODE, b"g", DIR | stat.S_ISGID, UID, 4242)
    f = m.mknod(g.id, b"f", REG, UID, GID)
    sub = m.mknod(g.id, b"sub", DIR, UID, GID)
    plain = m.mknod(ROOT_INODE, b"p", DIR, UID, GID)
    assert f.gid == 4242 and not f.mode & stat.S_ISGID
    assert sub.gid == 4242 and sub.mode & stat.S_ISGID
    assert plain.gid == GID and not plain.mode & stat.S_ISGID


def test_lookup_parent_and_path(engine):
    m = engine.meta
    d = mkdir(m, ROOT_INODE, b"d")
    f = mkfile(m, d.id, b"f")
    assert m.lookup(d.id, b"f").id == f.id
    assert m.lookup(d.id, b"nope") is None
    err(errno.ENOENT, m.lookup, 999_999, b"f")
    err(errno.ENOTDIR, m.lookup, f.id, b"x")
    assert m.parent_of(f.id) == d.id and m.parent_of(d.id) == ROOT_INODE
    assert m.path_of(f.id) == "/d/f" and m.path_of(ROOT_INODE) == "/"
    m.unlink(d.id, b"f")
    assert m.path_of(f.id) == f"<inode {f.id}>"


# ------------------------------------------------------- link and unlink


def test_unlink_of_the_last_name_deletes_a_file_not_open_here(engine):
    m = engine.meta
    f = mkfile(m, ROOT_INODE, b"f")
    m.commit(f.id, 0, 10, [Extent(0, 10, "b1")], {"b1": 10}, 10, 1, None)
    m.set_xattr(f.id, b"user.a", b"1")
    assert m.unlink(ROOT_INODE, b"f", open_here={f.id + 1}).nlink == 0
    assert m.getattr(f.id) is None and f.id not in m.unlinked_inodes()  # in one transaction
    assert m.list_xattrs(f.id) == [] and m.extents(f.id, 0, 10) == []
    assert refcounts(m)["b1"][0] == 0  # its block is garbage
    assert not m.delete_inode(f.id)


def test_link_and_unlink(engine):
    m = engine.meta
    d = mkdir(m, ROOT_INODE, b"d")
    f = mkfile(m, ROOT_INODE, b"f")
    before = m.getattr(d.id).mtime_ns
    assert m.link(f.id, d.id, b"g").nlink == 2
    assert m.lookup(d.id, b"g").id == f.id and nlink(m, f.id) == 2
    assert m.getattr(d.id).mtime_ns >= before and nlink(m, d.id) == 2
    err(errno.EEXIST, m.link, f.id, d.id, b"g")
    err(errno.EPERM, m.link, d.id, ROOT_INODE, b"d2")
    err(errno.ENOTDIR, m.link, f.id, f.id, b"x")
    err(errno.ENOENT, m.link, 999_999, ROOT_INODE, b"x")

    left = m.unlink(ROOT_INODE, b"f")
    assert left.id == f.id and left.nlink == 1 and f.id not in m.unlinked_inodes()
    assert m.path_of(f.id) == "/d/g"
    left = m.unlink(d.id, b"g", open_here={f.id})  # kept while open
    assert left.nlink == 0 and f.id in m.unlinked_inodes()
    err(errno.ENOENT, m.link, f.id, ROOT_INODE, b"again")  # no name left: no new one
    err(errno.ENOENT, m.unlink, ROOT_INODE, b"f")
    err(errno.EISDIR, m.unlink, ROOT_INODE, b"d")
    err(errno.ENOTDIR, m.unlink, f.id, b"x")
    assert m.getattr(f.id) is not None  # kept until deleted (open on a mount)
    assert m.delete_inode(f.id)
    assert m.getattr(f.id) is None and f.id not in m.unlinked_inodes()
    assert not m.delete_inode(f.id)
    assert not m.delete_inode(d.id)  # has a name


def test_rmdir(engine):
    m = engine.meta
    d = mkdir(m, ROOT_INODE, b"d")
    sub = mkdir(m, d.id, b"sub")
    mkfile(m, ROOT_INODE, b"f")
    assert nlink(m, d.id) == 3 and nlink(m, ROOT_INODE) == 3
    err(errno.ENOTEMPTY, m.rmdir, ROOT_INODE, b"d")
    err(errno.ENOTDIR, m.rmdir, ROOT_INODE, b"f")
    err(errno.ENOENT, m.rmdir, ROOT_INODE, b"nope")
    err(errno.EINVAL, m.rmdir, ROOT_INODE, b".")
    assert m.rmdir(d.id, b"sub") == sub.id
    assert nlink(m, sub.id) == 0 and nlink(m, d.id) == 2 and sub.id in m.unlinked_inodes()
    assert m.rmdir(ROOT_INODE, b"d") == d.id
    assert nlink(m, ROOT_INODE) == 2 and m.lookup(ROOT_INODE, b"d") is None
    assert m.readdir(d.id, 0, 10) == []


# ------------------------------------------------------------------ rename


def test_rename_file_within_and_across(engine):
    m = engine.meta
    a, b = mkdir(m, ROOT_INODE, b"a"), mkdir(m, ROOT_INODE, b"b")
    f = mkfile(m, a.id, b"f")
    assert m.rename(a.id, b"f", a.id, b"g", 0) is None
    assert m.lookup(a.id, b"f") is None and m.lookup(a.id, b"g").id == f.id
    assert m.rename(a.id, b"g", b.id, b"h", 0) is None
    assert m.path_of(f.id) == "/b/h" and (nlink(m, a.id), nlink(m, b.id)) == (2, 2)
    err(errno.ENOENT, m.rename, a.id, b"g", b.id, b"x", 0)
    err(errno.ENOTDIR, m.rename, b.id, b"h", f.id, b"x", 0)


def test_rename_over_a_file_returns_it(engine):
    m = engine.meta
    f, g = mkfile(m, ROOT_INODE, b"f"), mkfile(m, ROOT_INODE, b"g")
    err(errno.EEXIST, m.rename, ROOT_INODE, b"f", ROOT_INODE, b"g", RENAME_NOREPLACE)
    assert m.rename(ROOT_INODE, b"f", ROOT_INODE, b"g", 0) == g.id
    assert nlink(m, g.id) == 0 and g.id in m.unlinked_inodes()
    assert m.lookup(ROOT_INODE, b"g").id == f.id and m.lookup(ROOT_INODE, b"f") is None
    m.link(f.id, ROOT_INODE, b"h")  # two names of one file: nothing happens
    assert m.rename(ROOT_INODE, b"g", ROOT_INODE, b"h", 0) is None
    assert m.lookup(ROOT_INODE, b"g").id == f.id and nlink(m, f.id) == 2


def test_rename_directories(engine):
    m = engine.meta
    a, b = mkdir(m, ROOT_INODE, b"a"), mkdir(m, ROOT_INODE, b"b")
    d = mkdir(m, a.id, b"d")
    mkfile(m, ROOT_INODE, b"f")
    err(errno.ENOTDIR, m.rename, a.id, b"d", ROOT_INODE, b"f", 0)
    err(errno.EISDIR, m.rename, ROOT_INODE, b"f", a.id, b"d", 0)
    err(errno.EINVAL, m.rename, ROOT_INODE, b"a", d.id, b"x", 0)  # into itself
    assert m.rename(a.id, b"d", b.id, b"d", 0) is None
    assert (nlink(m, a.id), nlink(m, b.id), nlink(m, ROOT_INODE)) == (2, 3, 4)
    assert m.parent_of(d.id) == b.id
    # over an empty directory: it loses its name, its parent a link
    empty = mkdir(m, a.id, b"empty")
    assert m.rename(b.id, b"d", a.id, b"empty", 0) == empty.id
    assert nlink(m, empty.id) == 0 and empty.id in m.unlinked_inodes()
    assert (nlink(m, a.id), nlink(m, b.id)) == (3, 2)
    # over a non-empty one: ENOTEMPTY, nothing changes
    full = mkdir(m, b.id, b"full")
    mkfile(m, full.id, b"x")
    err(errno.ENOTEMPTY, m.rename, a.id, b"empty", b.id, b"full", 0)
    assert m.lookup(a.id, b"empty").id == d.id and nlink(m, full.id) == 2


def test_rename_exchange_file_with_dir_across_parents(engine):
    m = engine.meta
    a, b = mkdir(m, ROOT_INODE, b"a"), mkdir(m, ROOT_INODE, b"b")
    f = mkfile(m, a.id, b"f")
    d = mkdir(m, b.id, b"d")
    mkfile(m, d.id, b"inside")  # exchange does not care about emptiness
    err(errno.ENOENT, m.rename, a.id, b"f", b.id, b"none", RENAME_EXCHANGE)
    assert m.rename(a.id, b"f", b.id, b"d", RENAME_EXCHANGE) is None
    assert m.lookup(a.id, b"f").id == d.id and m.lookup(b.id, b"d").id == f.id
    assert (nlink(m, a.id), nlink(m, b.id)) == (3, 2)  # the directory moved from b to a
    assert (nlink(m, f.id), nlink(m, d.id)) == (1, 2)
    assert m.path_of(d.id) == "/a/f" and m.path_of(f.id) == "/b/d"
    # two files in one directory: swapped names, nothing else
    g = mkfile(m, a.id, b"g")
    m.rename(a.id, b"g", a.id, b"f", RENAME_EXCHANGE)
    assert m.lookup(a.id, b"f").id == g.id and nlink(m, a.id) == 3


# ------------------------------------------------------ setattr and xattrs


def test_setattr(engine):
    m = engine.meta
    f = mkfile(m, ROOT_INODE, b"f")
    engine.clock.advance(1)
    n = m.setattr(f.id, mode=0o4711, uid=7, gid=8, atime_ns=11, mtime_ns=22)
    assert n.mode == stat.S_IFREG | 0o4711 and (n.uid, n.gid) == (7, 8)
    assert (n.atime_ns, n.mtime_ns) == (11, 22) and n.ctime_ns >= f.ctime_ns
    assert m.getattr(f.id) == n
    err(errno.ENOENT, m.setattr, 999_999, mode=0o600)


def test_xattrs(engine):
    m = engine.meta
    f = mkfile(m, ROOT_INODE, b"f")
    assert m.get_xattr(f.id, b"user.a") is None and m.list_xattrs(f.id) == []
    m.set_xattr(f.id, b"user.a", b"1")
    m.set_xattr(f.id, b"user.b", b"")
    m.set_xattr(f.id, b"user.a", b"2")
    assert m.get_xattr(f.id, b"user.a") == b"2" and m.get_xattr(f.id, b"user.b") == b""
    assert sorted(m.list_xattrs(f.id)) == [b"user.a", b"user.b"]
    m.remove_xattr(f.id, b"user.a")
    err(errno.ENODATA, m.remove_xattr, f.id, b"user.a")
    assert m.list_xattrs(f.id) == [b"user.b"]
    m.unlink(ROOT_INODE, b"f", open_here={f.id})
    assert m.delete_inode(f.id) and m.list_xattrs(f.id) == []


# ----------------------------------------------------------------- readdir


def listing(m, parent: int, limit: int, between: Callable[[int], None] = lambda i: None):
    names, after, page = [], 0, 0
    while True:
        rows = m.readdir(parent, after, limit)
        if not rows:
            return names
        assert all(d.cursor > 0 for d, _ in rows)
        names += [d.name for d, _ in rows]
        for d, inode in rows:
            assert inode.id == d.inode
        after = rows[-1][0].cursor
        between(page)
        page += 1


def test_readdir_pages_survive_creates_and_deletes(engine):
    m = engine.meta
    d = mkdir(m, ROOT_INODE, b"d")
    stay = [f"s{i:03}".encode() for i in range(60)]
    going = [f"g{i:03}".encode() for i in range(30)]
    for n in stay + going:
        mkfile(m, d.id, n)
    sub = mkdir(m, d.id, b"sub")
    stay.append(b"sub")
    assert sorted(listing(m, d.id, 1000)) == sorted(stay + going)

    def churn(page: int) -> None:  # between the first pages: delete some, create others
        if page >= 10:
            return  # (an engine that lists new entries last would otherwise never end)
        for n in going[page * 3 : page * 3 + 3]:
            m.unlink(d.id, n)
        for i in range(3):
            mkfile(m, d.id, f"new{page}-{i}".encode())

    names = listing(m, d.id, 7, churn)
    assert len(names) == len(set(names))  # nothing twice
    assert set(stay) <= set(names)  # everything present throughout, once
    assert m.readdir(d.id, 0, 100)[0][0].cursor > 0
    assert [x[1].id for x in m.readdir(d.id, 0, 1000) if x[0].name == b"sub"] == [sub.id]


# ----------------------------------------------------------------- content


def refcounts(m) -> dict[str, tuple[int, int | None]]:
    return {b.id: (b.refcount, b.zero_since_ns) for b in m.scan_blocks("", 1000)}


def test_commit_extents_refcounts_and_garbage(engine):
    m = engine.meta
    f, g = mkfile(m, ROOT_INODE, b"f"), mkfile(m, ROOT_INODE, b"g")
    e1, e2, e3 = Extent(0, 100, "b1"), Extent(100, 50, "b2"), Extent(150, 100, "b1")
    m.commit(f.id, 0, 250, [e1, e2, e3], {"b1": 100, "b2": 50}, 400, 77, None)
    n = m.getattr(f.id)
    assert n.size == 400 and n.mtime_ns == 77 and n.ctime_ns >= 77
    assert m.extents(f.id, 0, 1000) == [e1, e2, e3]
    assert m.extents(f.id, 120, 160) == [e2, e3] and m.extents(f.id, 99, 100) == [e1]
    assert m.extents(f.id, 250, 400) == [] and m.allocated_bytes(f.id) == 250
    assert refcounts(m) == {"b1": (2, None), "b2": (1, None)}
    m.commit(g.id, 0, 100, [Extent(0, 100, "b1")], {"b1": 100}, 100, 1, None)  # dedup
    assert refcounts(m)["b1"] == (3, None)
    u = m.usage()
    assert (u.logical_bytes, u.stored_bytes, u.blocks) == (350, 150, 2)
    assert sorted(m.block_users("b1", 10)) == [f.id, g.id] and m.block_users("b2", 10) == [f.id]

    before = time.time_ns()
    m.commit(f.id, 100, 150, [Extent(100, 50, "b3")], {"b3": 50}, 400, 78, None)
    rc = refcounts(m)
    assert rc["b2"][0] == 0 and rc["b2"][1] >= before and rc["b3"] == (1, None)
    assert m.garbage_blocks(time.time_ns() + 1, 10) == ["b2"]
    assert m.garbage_blocks(rc["b2"][1], 10) == []  # not yet past the grace
    assert not m.forget_block("b1")  # referenced
    m.commit(g.id, 0, 100, [Extent(0, 100, "b2")], {"b2": 50}, 100, 2, None)  # b2 used again
    assert refcounts(m)["b2"] == (1, None) and m.garbage_blocks(time.time_ns() + 1, 10) == []
    assert refcounts(m)["b1"] == (2, None)
    m.unlink(ROOT_INODE, b"g", open_here={g.id})
    assert m.delete_inode(g.id)
    assert refcounts(m)["b2"][0] == 0 and m.block_users("b2", 10) == []
    assert m.forget_block("b2") and "b2" not in refcounts(m)
    assert not m.forget_block("b2")
    assert m.garbage_blocks(time.time_ns() + 1, 10) == []


def test_referenced_names_only_blocks_that_extents_reference(engine):
    # a writer stores again every block not named here: naming one that is no longer
    # referenced would let it be collected under a file; naming none is always safe
    m = engine.meta
    f = mkfile(m, ROOT_INODE, b"f")
    m.commit(
        f.id,
        0,
        200,
        [Extent(0, 100, "b1"), Extent(100, 100, "b2")],
        {"b1": 100, "b2": 100},
        200,
        1,
        None,
    )
    m.commit(f.id, 100, 200, [Extent(100, 100, "b3")], {"b3": 100}, 200, 2, None)  # b2: 0 refs
    ids = ["b1", "b2", "b3", "b4"] + [f"x{i}" for i in range(600)]  # (more than one page)
    found = m.referenced(ids)
    assert found <= {"b1", "b3"}
    if engine.name == "sqlite":  # a local read: it tells
        assert found == {"b1", "b3"}
    else:  # a request on etcd (memkv is the same code): every block is stored again
        assert found == set()


def test_truncate(engine):
    m = engine.meta
    f = mkfile(m, ROOT_INODE, b"f")
    ext = [Extent(0, 100, "b1"), Extent(100, 100, "b2"), Extent(200, 100, "b3")]
    m.commit(f.id, 0, 300, ext, {"b1": 100, "b2": 100, "b3": 100}, 300, 5, None)
    m.truncate(f.id, 150, 9, None)
    assert m.extents(f.id, 0, 1000) == [Extent(0, 100, "b1"), Extent(100, 50, "b2")]
    n = m.getattr(f.id)
    assert n.size == 150 and n.mtime_ns == 9
    assert refcounts(m)["b3"][0] == 0 and refcounts(m)["b2"] == (1, None)
    assert m.extents(f.id, 149, 150) == [Extent(100, 50, "b2")]
    m.truncate(f.id, 1000, 10, None)  # growing: a hole
    assert m.getattr(f.id).size == 1000 and m.allocated_bytes(f.id) == 150
    m.truncate(f.id, 0, 11, None)
    assert m.extents(f.id, 0, 2000) == [] and m.usage().blocks == 0


async def test_fence_tokens(engine):
    a, b = engine.meta, engine.client("b")
    f = mkfile(a, ROOT_INODE, b"f")
    name = f"inode:{f.id}"
    la = await a.locks.acquire(name, wait_s=1)
    a.fence(f.id, la.token)
    a.commit(f.id, 0, 10, [Extent(0, 10, "b1")], {"b1": 10}, 10, 1, la.token)
    await a.locks.release(la)
    lb = await b.locks.acquire(name, wait_s=1)
    assert lb.token > la.token
    b.fence(f.id, lb.token)
    with pytest.raises(LockLost):
        a.commit(f.id, 0, 10, [Extent(0, 10, "b2")], {"b2": 10}, 10, 2, la.token)
    with pytest.raises(LockLost):
        a.truncate(f.id, 0, 3, la.token)
    with pytest.raises(LockLost):
        a.fence(f.id, la.token)
    assert a.extents(f.id, 0, 100) == [Extent(0, 10, "b1")] and a.getattr(f.id).size == 10
    b.truncate(f.id, 5, 4, lb.token)
    assert b.getattr(f.id).size == 5
    await b.locks.release(lb)


async def test_a_create_takes_its_files_lock(engine):
    """mknod(locked=True) on an engine with locks_at_create: the lock is granted by the
    create's transaction, held against every other client, and a lock like any other from
    the creator's acquire on (fenced, released, then granted to another with a greater
    token, the creator's commits refused from then on)."""
    a, b = engine.meta, engine.client("b")
    assert a.locks_at_create
    f = a.mknod(ROOT_INODE, b"f", 0o100644, UID, GID, locked=True)
    name = f"inode:{f.id}"
    assert [(h.name, h.holder) for h in b.locks.held()] == [(name, "a")]
    with pytest.raises(LockTimeout):
        await b.locks.acquire(name, wait_s=0.3)
    la = await a.locks.acquire(name, wait_s=0)
    assert a.fence(f.id, la.token) == f
    a.commit(f.id, 0, 10, [Extent(0, 10, "b1")], {"b1": 10}, 10, 1, la.token)
    await a.locks.release(la)
    lb = await b.locks.acquire(name, wait_s=1)
    assert lb.token > la.token
    b.fence(f.id, lb.token)
    with pytest.raises(LockLost):
        a.commit(f.id, 0, 10, [], {}, 0, 2, la.token)
    assert b.getattr(f.id).size == 10
    await b.locks.release(lb)
    d = a.mknod(ROOT_INODE, b"d", 0o40755, UID, GID, locked=True)  # only a regular file
    assert [h.name for h in a.locks.held()] == [] and a.getattr(d.id).nlink == 2


# ------------------------------------------------- degraded and scans


def test_degraded_records(engine):
    m = engine.meta
    m.record_degraded("bb", ["n2"])
    m.record_degraded("aa", ["n1"])
    m.record_degraded("bb", ["n1", "n2"])
    m.record_degraded("cc", ["n3"])
    assert m.count_degraded() == 3
    assert m.degraded_blocks("", 2) == [("aa", ["n1"]), ("bb", ["n1", "n2"])]
    assert m.degraded_blocks("bb", 10) == [("cc", ["n3"])]
    m.forget_degraded("aa")
    assert m.clear_degraded(keep={"cc"}) == 1
    assert m.degraded_blocks("", 10) == [("cc", ["n3"])]
    # a garbage block forgotten takes its record along
    f = mkfile(m, ROOT_INODE, b"f")
    m.commit(f.id, 0, 1, [Extent(0, 1, "cc")], {"cc": 1}, 1, 1, None)
    m.truncate(f.id, 0, 2, None)
    assert m.forget_block("cc") and m.count_degraded() == 0


def test_scans_page_in_key_order(engine):
    m = engine.meta
    files = [mkfile(m, ROOT_INODE, f"f{i}".encode()) for i in range(5)]
    for i, f in enumerate(files):
        new = [Extent(j * 10, 10, f"blk{i}-{j}") for j in range(3)]
        m.commit(f.id, 0, 30, new, {e.block_id: 10 for e in new}, 30, 1, None)
    rows, after = [], ""
    while page := m.scan_blocks(after, 4):
        rows += page
        after = page[-1].id
    assert [r.id for r in rows] == sorted(f"blk{i}-{j}" for i in range(5) for j in range(3))
    assert all(r.refcount == 1 and r.size == 10 and r.zero_since_ns is None for r in rows)
    ext, cursor = [], (0, 0)
    while page := m.scan_extents(cursor, 4):
        ext += page
        cursor = (page[-1][0], page[-1][1].offset)
    assert [(i, e.offset) for i, e in ext] == [(f.id, o) for f in files for o in (0, 10, 20)]


# ------------------------------------------------------------------- locks


async def test_lock_wait_timeout_and_release(engine):
    a, b = engine.meta, engine.client("b")
    la = await a.locks.acquire("inode:7", wait_s=1)
    assert a.locks.valid(la)
    with pytest.raises(LockTimeout) as e:
        await b.locks.acquire("inode:7", wait_s=0.3)
    assert e.value.holder == la.holder
    assert [(h.name, h.token) for h in b.locks.held()] == [("inode:7", la.token)]

    async def release_soon() -> None:
        await trio.sleep(0.2)
        await a.locks.release(la)

    async with trio.open_nursery() as n:
        n.start_soon(release_soon)
        lb = await b.locks.acquire("inode:7", wait_s=5)
    assert lb.token > la.token and lb.holder != la.holder
    await b.locks.keepalive(lb)
    await b.locks.release(lb)
    assert b.locks.held() == []


async def test_lock_expiry_and_takeover(engine):
    a, b = engine.meta, engine.client("b")
    la = await a.locks.acquire("inode:9", wait_s=1)
    engine.advance(engine.ttl / 2)
    await a.locks.keepalive(la)  # renewed: good for another ttl
    engine.advance(engine.ttl * 0.75)
    assert a.locks.valid(la)
    engine.advance(engine.ttl + engine.expiry_lag)  # not renewed: ended
    assert not a.locks.valid(la)
    with pytest.raises(LockLost):
        await a.locks.keepalive(la)
    assert b.locks.held() == []
    lb = await b.locks.acquire("inode:9", wait_s=1)
    assert lb.token > la.token
    await a.locks.release(la)  # a stale release leaves the new holder alone
    assert [h.holder for h in b.locks.held()] == [lb.holder]
    la2 = None
    with pytest.raises(LockTimeout):
        la2 = await a.locks.acquire("inode:9", wait_s=0.1)
    assert la2 is None


# ---------------------------------------------------------------- sessions


def test_sessions(engine):
    a, b = engine.meta, engine.client("b")
    s1 = a.sessions.register("mount", "/mnt/one", ttl_s=engine.ttl)
    s2 = b.sessions.register("mount", "/mnt/two", ttl_s=engine.ttl)
    alive = {s.id: s for s in b.sessions.alive()}
    assert set(alive) == {s1.id, s2.id}
    assert alive[s1.id].mountpoint == "/mnt/one" and alive[s1.id].kind == "mount"
    assert alive[s1.id].pid > 0 and alive[s1.id].host and alive[s1.id].expires_ns > s1.since_ns
    with pytest.raises(UserError, match="mounted"):
        b.sessions.register("repair", "", ttl_s=engine.ttl)
    a.sessions.end(s1)
    engine.advance(engine.ttl / 2)
    s2 = b.sessions.renew(s2)
    engine.advance(engine.ttl * 0.75)
    assert [s.id for s in a.sessions.alive()] == [s2.id]
    assert a.sessions.reap() == []
    engine.advance(engine.ttl + engine.expiry_lag)  # s2's mount died: its lease ran out
    assert a.sessions.alive() == []
    assert [s.id for s in a.sessions.reap()] == [s2.id]
    assert a.sessions.reap() == [] and b.sessions.reap() == []
    r = a.sessions.register("repair", "", ttl_s=engine.ttl)
    with pytest.raises(UserError):
        b.sessions.register("mount", "/mnt/two", ttl_s=engine.ttl)
    a.sessions.end(r)
    b.sessions.register("mount", "/mnt/two", ttl_s=engine.ttl)


def outlive(engine, client, session):
    """Let every other client's lease run out while `client` renews `session`; returns it
    renewed."""
    for _ in range(6):
        engine.advance((engine.ttl + engine.expiry_lag) / 4)
        session = client.sessions.renew(session)
    return session


async def test_a_client_paused_past_its_lease_loses_its_locks_and_registers_again(engine):
    a, b = engine.meta, engine.client("b")
    sa = a.sessions.register("mount", "/mnt/a", ttl_s=engine.ttl)
    sb = b.sessions.register("mount", "/mnt/b", ttl_s=engine.ttl)
    f = mkfile(a, ROOT_INODE, b"f")
    la = await a.locks.acquire(f"inode:{f.id}", wait_s=1)
    a.fence(f.id, la.token)
    sb = outlive(engine, b, sb)  # a is paused: it renews nothing
    assert [s.id for s in b.sessions.alive()] == [sb.id] and b.locks.held() == []
    lb = await b.locks.acquire(f"inode:{f.id}", wait_s=1)
    b.fence(f.id, lb.token)
    b.commit(f.id, 0, 10, [Extent(0, 10, "from-b")], {"from-b": 10}, 10, 1, lb.token)
    with pytest.raises(LockLost):  # a wakes up: its lock went with its lease
        await a.locks.keepalive(la)
    with pytest.raises(LockLost):  # and the fence refuses what it buffered
        a.commit(f.id, 0, 10, [Extent(0, 10, "from-a")], {"from-a": 10}, 10, 2, la.token)
    assert b.extents(f.id, 0, 100) == [Extent(0, 10, "from-b")]
    sa = a.sessions.renew(sa)  # a goes on: its session is registered again
    assert {s.id for s in b.sessions.alive()} == {sa.id, sb.id}
    la2 = await a.locks.acquire("inode:12345", wait_s=1)  # and it takes new locks
    assert a.locks.valid(la2) and [h.holder for h in b.locks.held()] == [la.holder, lb.holder]
    await a.locks.keepalive(la2)
    await b.locks.release(lb)


def test_a_dead_clients_unlinked_open_files_are_deleted_by_the_reaper(engine):
    a, b = engine.meta, engine.client("b")
    a.sessions.register("mount", "/mnt/a", ttl_s=engine.ttl)
    sb = b.sessions.register("mount", "/mnt/b", ttl_s=engine.ttl)
    f = mkfile(a, ROOT_INODE, b"f")
    a.commit(f.id, 0, 10, [Extent(0, 10, "kept")], {"kept": 10}, 10, 1, None)
    a.unlink(ROOT_INODE, b"f", open_here={f.id})  # while open on a
    d = mkdir(a, ROOT_INODE, b"d")
    a.rmdir(ROOT_INODE, b"d")  # a's shell still in it
    g = mkfile(b, ROOT_INODE, b"g")
    b.unlink(ROOT_INODE, b"g", open_here={g.id})  # while open on b
    assert b.sessions.reap() == [] and a.sessions.reap() == []
    assert None not in (b.getattr(f.id), b.getattr(d.id), b.getattr(g.id))
    sb = outlive(engine, b, sb)  # a dies
    assert [s.mountpoint for s in b.sessions.reap()] == ["/mnt/a"]
    assert b.getattr(f.id) is None and b.getattr(d.id) is None
    assert b.getattr(g.id) is not None  # b's own: b lives
    assert b.unlinked_inodes() == [g.id]
    assert b.garbage_blocks(2**62, 10) == ["kept"]  # collected after the grace
    assert b.sessions.reap() == []


def test_one_client_at_a_time_is_elected_and_the_role_moves_when_it_dies(engine):
    a, b = engine.meta, engine.client("b")
    sa = a.sessions.register("mount", "/mnt/a", ttl_s=engine.ttl)
    sb = b.sessions.register("mount", "/mnt/b", ttl_s=engine.ttl)
    if engine.name == "sqlite":  # embedded: one host, every mount has the role
        assert a.sessions.elect("gc") and b.sessions.elect("gc")
        assert a.sessions.leader("gc") is None
        return
    assert a.sessions.elect("gc") and not b.sessions.elect("gc")
    assert a.sessions.elect("gc") and not b.sessions.elect("gc")
    assert b.sessions.leader("gc") == sa.id
    assert b.sessions.elect("repair") and not a.sessions.elect("repair")  # roles are apart
    sb = outlive(engine, b, sb)  # a dies
    assert b.sessions.leader("gc") is None
    assert b.sessions.elect("gc") and b.sessions.leader("gc") == sb.id
    a.sessions.renew(sa)  # a comes back: the role stays where it is
    assert not a.sessions.elect("gc") and b.sessions.elect("gc")
    b.close()  # b unmounts: its lease is revoked, the role free at once
    assert a.sessions.elect("gc") and a.sessions.leader("gc") == sa.id


def test_wait_ring_returns_once_the_ring_changes(engine):
    m, other = engine.meta, engine.client("b")
    poll = 0.1 if engine.name == "sqlite" else 60  # sqlite polls; the kv engines watch
    m.wait_ring(0, 0)  # the stored version is another: at once
    waiter = threading.Thread(target=m.wait_ring, args=(1, poll))
    waiter.start()
    time.sleep(0.2)
    assert other.replace_ring({**RING, "version": 2}, 1)
    waiter.join(8)  # before the watch would be made again (WATCH_S), so the watch saw it
    assert not waiter.is_alive()


# -------------------------------------------------------------------- race

RACE_ERRNOS = {errno.EEXIST, errno.ENOENT, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR}
RACE_ERRNOS |= {errno.EPERM, errno.EINVAL}
NAMES = [b"x", b"y"]


def race_step(m, rng: random.Random) -> None:
    a, b = rng.choice(NAMES), rng.choice(NAMES)
    d = m.lookup(ROOT_INODE, b"d")
    sub = d.id if d is not None and stat.S_ISDIR(d.mode) else ROOT_INODE
    where = rng.choice([ROOT_INODE, sub])
    k = rng.randrange(12)
    if k == 0:
        mkfile(m, ROOT_INODE, a)
    elif k == 1:
        mkdir(m, ROOT_INODE, b"d")
    elif k == 2:
        mkfile(m, sub, a)
    elif k == 3:
        f = m.lookup(ROOT_INODE, a)
        if f is not None:
            m.link(f.id, where, b)
    elif k == 4:
        m.unlink(where, a)
    elif k == 5:
        m.rename(ROOT_INODE, a, where, b, rng.choice([0, RENAME_NOREPLACE]))
    elif k == 6:
        m.rmdir(ROOT_INODE, b"d")
    elif k == 7:
        m.rename(sub, a, ROOT_INODE, b, 0)
    elif k == 8:
        for ino in m.unlinked_inodes():
            m.delete_inode(ino)
    elif k == 9:
        m.rename(ROOT_INODE, a, ROOT_INODE, b"d", RENAME_EXCHANGE)
    elif k == 10:
        f = m.lookup(where, a)
        if f is not None and stat.S_ISREG(f.mode):
            blk = rng.choice(["r1", "r2", "r3"])
            m.commit(f.id, 0, 1 << 40, [Extent(0, 10, blk)], {blk: 10}, 10, 1, None)
    else:
        m.rmdir(where, a)


def check_consistent(m) -> None:
    """Every entry's inode exists, nlink matches the entries, no entry under a removed
    directory, every directory reachable once, refcounts equal the extents."""
    names: Counter[int] = Counter()
    subdirs: Counter[int] = Counter()
    dirs, todo = [], [ROOT_INODE]
    while todo:
        parent = todo.pop()
        dirs.append(parent)
        for dent, inode in m.readdir(parent, 0, 10_000):
            assert m.getattr(dent.inode) is not None
            names[dent.inode] += 1
            if stat.S_ISDIR(inode.mode):
                subdirs[parent] += 1
                todo.append(inode.id)
    assert len(dirs) == len(set(dirs))
    for ino in dirs:
        assert nlink(m, ino) == 2 + subdirs[ino], ino
    for ino, n in names.items():
        if not stat.S_ISDIR(m.getattr(ino).mode):
            assert nlink(m, ino) == n, ino
    for ino in m.unlinked_inodes():
        inode = m.getattr(ino)
        assert inode.nlink == 0 and names[ino] == 0
        if stat.S_ISDIR(inode.mode):
            assert m.readdir(ino, 0, 10) == []  # nothing was created in a removed directory
    uses: Counter[str] = Counter(e.block_id for _, e in m.scan_extents((0, 0), 100_000))
    for b in m.scan_blocks("", 100_000):
        assert b.refcount == uses[b.id], b
        assert (b.zero_since_ns is None) == (b.refcount > 0), b


def test_two_clients_race_on_the_same_names(engine):
    clients = [engine.meta, engine.client("b")]
    errors: Counter[str] = Counter()
    failures: list[BaseException] = []

    def run(m, seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(engine.race_steps):
            try:
                race_step(m, rng)
            except FsError as e:
                if e.errno not in RACE_ERRNOS:
                    failures.append(e)
                errors[errno.errorcode[e.errno]] += 1
            except BaseException as e:  # noqa: BLE001 - any other answer fails the test
                failures.append(e)
                return

    threads = [threading.Thread(target=run, args=(m, i)) for i, m in enumerate(clients)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads inside transactions, not between them
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert failures == []
    assert errors["EEXIST"] > 0 and errors["ENOENT"] > 0  # the race was run
    check_consistent(clients[1])
    for ino in clients[0].unlinked_inodes():
        clients[0].delete_inode(ino)
    check_consistent(clients[0])


# --------------------------------------------------- the kv engine's own


def test_kv_create_and_open_refuse_what_is_not_theirs():
    kv = MemKV()
    with pytest.raises(UserError, match="holds no hafs filesystem"):
        KvMeta.open(kv)
    KvMeta.create(kv, CONFIG, RING, 0, 0)
    with pytest.raises(UserError, match="not empty"):
        KvMeta.create(kv, CONFIG, RING, 0, 0)
    assert KvMeta.open(kv).config() == CONFIG
    kv.commit({}, {K_VERSION: b"99"}, ())
    with pytest.raises(UserError, match="newer than this hafs"):
        KvMeta.open(kv)
    other = MemKV()
    other.commit({}, {b"something/else": b"1"}, ())
    with pytest.raises(UserError, match="not a hafs filesystem"):
        KvMeta.open(other)


def test_kv_inode_numbers_are_never_reused_across_clients():
    kv = MemKV()
    a = KvMeta.create(kv, CONFIG, RING, 0, 0)
    b = KvMeta.open(kv)
    seen = set()
    for i in range(100):
        m = a if i % 3 else b
        ino = mkfile(m, ROOT_INODE, f"f{i}".encode()).id
        assert ino not in seen
        seen.add(ino)
        m.unlink(ROOT_INODE, f"f{i}".encode(), open_here={ino})
        assert m.delete_inode(ino)
    c = KvMeta.open(kv)  # a new client starts past every batch handed out
    assert mkfile(c, ROOT_INODE, b"new").id > max(seen)


def test_kv_readdir_never_splits_a_hash_collision(monkeypatch):
    import hafs.meta.kv as kvmod

    monkeypatch.setattr(kvmod, "name_hash", lambda name: 1 + name[0] // 2)  # pairs collide
    m = KvMeta.create(MemKV(), CONFIG, RING, 0, 0)
    names = [bytes([c]) for c in range(ord("a"), ord("a") + 12)]
    for n in names:
        mkfile(m, ROOT_INODE, n)
    for limit in (1, 2, 3, 5):
        listed = listing(m, ROOT_INODE, limit)
        assert sorted(listed) == names, limit


class InterleavingKV(MemKV):
    """A MemKV that runs `before_commit` (once) just before the next commit: another
    client's whole operation lands between a transaction's reads and its commit."""

    before_commit: Callable[[], object] | None = None

    def commit(self, *args, **kwargs):
        hook, self.before_commit = self.before_commit, None
        if hook is not None:
            hook()
        return super().commit(*args, **kwargs)


@pytest.mark.parametrize(
    "mine, theirs, answer",
    [
        (lambda m, d, f: m.rmdir(ROOT_INODE, b"d"), lambda m, d, f: mkfile(m, d, b"n"),
         errno.ENOTEMPTY),
        (lambda m, d, f: mkfile(m, d, b"n"), lambda m, d, f: m.rmdir(ROOT_INODE, b"d"),
         errno.ENOENT),
        (lambda m, d, f: mkdir(m, d, b"n"), lambda m, d, f: mkfile(m, d, b"n"), errno.EEXIST),
        (lambda m, d, f: m.link(f, d, b"n"), lambda m, d, f: m.unlink(ROOT_INODE, b"f"),
         errno.ENOENT),
        (lambda m, d, f: m.rename(ROOT_INODE, b"f", d, b"n", 0),
         lambda m, d, f: m.unlink(ROOT_INODE, b"f"), errno.ENOENT),
        (lambda m, d, f: m.rename(ROOT_INODE, b"f", d, b"n", RENAME_NOREPLACE),
         lambda m, d, f: mkfile(m, d, b"n"), errno.EEXIST),
        (lambda m, d, f: m.unlink(ROOT_INODE, b"f"),
         lambda m, d, f: m.rename(ROOT_INODE, b"f", d, b"n", 0), errno.ENOENT),
    ],
)  # fmt: skip
def test_kv_conflict_becomes_the_posix_answer(mine, theirs, answer):
    kv = InterleavingKV()
    a = KvMeta.create(kv, CONFIG, RING, 0, 0)
    b = KvMeta.open(kv)
    d = mkdir(a, ROOT_INODE, b"d").id
    f = mkfile(a, ROOT_INODE, b"f").id
    kv.before_commit = lambda: theirs(b, d, f)
    err(answer, mine, a, d, f)
    assert kv.before_commit is None  # the other client's operation did run in between
    check_consistent(a)


def test_scans_page_through_everything(engine):
    from metacheck import assert_consistent, pages

    m = engine.meta
    d = mkdir(m, ROOT_INODE, b"d")
    files = [mkfile(m, d.id if i % 2 else ROOT_INODE, b"f%03d" % i) for i in range(25)]
    m.link(files[0].id, d.id, b"again")
    for i, f in enumerate(files[:10]):
        m.commit(f.id, 0, 10, [Extent(0, 10, "%064x" % (i % 3))], {"%064x" % (i % 3): 10}, 10, 1)
    inodes = list(pages(m.scan_inodes, 0, lambda i: i.id, limit=4))
    assert [i.id for i in inodes] == sorted({ROOT_INODE, d.id, *(f.id for f in files)})
    entries = list(pages(m.scan_entries, (0, b""), lambda e: (e[0], e[1]), limit=4))
    assert len(entries) == len(set(entries)) == 27
    assert (d.id, b"again", files[0].id) in entries
    assert m.count_inodes() == 27
    assert len(list(pages(m.scan_extents, (0, -1), lambda r: (r[0], r[1].offset), 3))) == 10
    assert_consistent(m)


# ------------------------------------------------------------- fsck's calls


def test_fsck_entries_names_and_link_counts(engine):
    from metacheck import assert_consistent

    m = engine.meta
    f, d = mkfile(m, ROOT_INODE, b"f"), mkdir(m, ROOT_INODE, b"d")
    m.link(f.id, d.id, b"g")
    assert m.names(f.id, 10) == [(ROOT_INODE, b"f"), (d.id, b"g")]
    assert m.names(f.id, 1) == [(ROOT_INODE, b"f")] and m.names(9999, 5) == []
    assert m.fsck_drop_entry(ROOT_INODE, b"f") == f.id
    assert m.fsck_drop_entry(ROOT_INODE, b"f") is None
    assert m.lookup(ROOT_INODE, b"f") is None and m.names(f.id, 10) == [(d.id, b"g")]
    assert nlink(m, f.id) == 2  # link counts are left for fsck_set_nlink
    m.fsck_set_nlink(f.id, 1)
    assert_consistent(m)

    assert m.fsck_drop_entry(d.id, b"g") == f.id  # a name-less file keeps its links
    assert nlink(m, f.id) == 1 and f.id not in m.unlinked_inodes()
    m.fsck_add_entry(d.id, b"back", f.id)  # a non-directory's nlink: its names
    assert m.lookup(d.id, b"back").id == f.id and nlink(m, f.id) == 1
    assert m.parent_of(f.id) == d.id
    err(errno.EEXIST, m.fsck_add_entry, d.id, b"back", f.id)
    err(errno.ENOTDIR, m.fsck_add_entry, f.id, b"x", d.id)
    err(errno.ENOENT, m.fsck_add_entry, d.id, b"x", 99999)
    err(errno.ENOENT, m.fsck_add_entry, 99999, b"x", f.id)
    err(errno.EINVAL, m.fsck_add_entry, d.id, b"a/b", f.id)

    e = mkdir(m, d.id, b"e")
    assert nlink(m, d.id) == 3
    assert m.fsck_drop_entry(d.id, b"e") == e.id and nlink(m, d.id) == 3
    root_links = nlink(m, ROOT_INODE)
    m.fsck_add_entry(ROOT_INODE, b"e", e.id)  # a directory: the parent's nlink grows
    assert nlink(m, ROOT_INODE) == root_links + 1 and m.parent_of(e.id) == ROOT_INODE
    m.fsck_set_nlink(d.id, 2)
    assert_consistent(m)

    h = mkfile(m, ROOT_INODE, b"h")
    m.fsck_drop_entry(ROOT_INODE, b"h")
    m.fsck_set_nlink(h.id, 0)
    assert h.id in m.unlinked_inodes() and m.delete_inode(h.id)
    err(errno.ENOENT, m.fsck_set_nlink, h.id, 1)
    m.fsck_set_size(d.id, 4096)
    assert m.getattr(d.id).size == 4096
    assert not m.fsck_add_root(0, 0) and m.getattr(ROOT_INODE).uid == UID  # it has one


def test_fsck_extents_and_block_rows(engine):
    from metacheck import assert_consistent

    m = engine.meta
    f = mkfile(m, ROOT_INODE, b"f")
    e1, e2, e3 = Extent(0, 100, "b1"), Extent(100, 50, "b2"), Extent(150, 100, "b1")
    m.commit(f.id, 0, 250, [e1, e2, e3], {"b1": 100, "b2": 50}, 400, 77, None)
    assert m.block_refs("b1") == 2 and m.block_refs("b2") == 1 and m.block_refs("b9") == 0
    rows = m.block_rows(["b2", "b1", "b9"])
    assert sorted(rows) == ["b1", "b2"] and (rows["b1"].size, rows["b1"].refcount) == (100, 2)

    m.fsck_cut_extent(f.id, 150, 40)
    assert m.extents(f.id, 0, 1000) == [e1, e2, Extent(150, 40, "b1")]
    err(errno.EINVAL, m.fsck_cut_extent, f.id, 150, 40)
    err(errno.EINVAL, m.fsck_cut_extent, f.id, 150, 0)
    err(errno.ENOENT, m.fsck_cut_extent, f.id, 7, 1)
    assert refcounts(m)["b1"] == (2, None)  # a cut keeps the block's use

    before = time.time_ns()
    assert m.fsck_drop_extent(f.id, 100) and not m.fsck_drop_extent(f.id, 100)
    assert m.extents(f.id, 0, 1000) == [e1, Extent(150, 40, "b1")]
    rc = refcounts(m)
    assert rc["b2"][0] == 0 and rc["b2"][1] >= before and m.block_refs("b2") == 0
    assert m.garbage_blocks(time.time_ns() + 1, 10) == ["b2"]

    m.fsck_set_block("b1", 100, 5)
    assert refcounts(m)["b1"] == (5, None)
    m.fsck_set_block("b1", 100, 0)
    since = refcounts(m)["b1"][1]
    assert since >= before and sorted(m.garbage_blocks(time.time_ns() + 1, 10)) == ["b1", "b2"]
    m.fsck_set_block("b1", 100, 0)
    assert refcounts(m)["b1"] == (0, since)  # still unreferenced since then
    m.fsck_set_block("b1", 90, 2)
    assert refcounts(m)["b1"] == (2, None) and m.block_rows(["b1"])["b1"].size == 90
    assert m.garbage_blocks(time.time_ns() + 1, 10) == ["b2"]
    m.fsck_set_block("b7", 10, 0)  # a row that was missing
    assert refcounts(m)["b7"][0] == 0 and "b7" in m.garbage_blocks(time.time_ns() + 1, 10)
    m.fsck_set_size(f.id, 190)  # no extent changes
    assert m.getattr(f.id).size == 190 and len(m.extents(f.id, 0, 1000)) == 2
    assert_consistent(m)
    assert m.forget_block("b2") and m.forget_block("b7")


def test_fsck_storage_check_description_and_snapshot(engine):
    m = engine.meta
    assert m.check_storage(10) == []
    d = m.describe()
    assert d["engine"] == ("sqlite" if engine.name == "sqlite" else "kv")
    assert d["schema"] == d["current"] and d["location"] and d["recover"]
    assert m.damaged(ValueError("not the storage")) is None
    other = engine.client("b")
    before = m.count_inodes()
    with m.snapshot() as consistent:
        mkfile(other, ROOT_INODE, b"meanwhile")
        seen = m.count_inodes()
    assert consistent == (engine.name == "sqlite")
    assert seen == (before if consistent else before + 1)
    assert m.count_inodes() == before + 1


def test_kv_read_only_open_refuses_every_write():
    from hafs.meta.kv import ReadOnly

    kv = MemKV()
    KvMeta.create(kv, CONFIG, RING, UID, GID).close()
    before = kv.scan(b"", b"\xff", 1000)
    m = KvMeta.open(kv, read_only=True)
    assert m.getattr(ROOT_INODE).nlink == 2 and m.sessions.alive() == []
    with pytest.raises(ReadOnly):
        mkfile(m, ROOT_INODE, b"f")
    with pytest.raises(ReadOnly):
        m.fsck_set_nlink(ROOT_INODE, 3)
    with pytest.raises(ReadOnly):
        m.sessions.register("repair", "", 60)
    assert kv.scan(b"", b"\xff", 1000) == before
