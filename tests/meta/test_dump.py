"""Dump and load (`MetaStore.dump`, each engine's `load`, and the JSON lines of
hafs/admin/dump.py) on every engine: a dump of any engine loads into any other and
dumps back the same, from one state of the metadata; a load needs an empty store,
goes into etcd in bounded transactions, and leaves nothing when it fails.

The `engine` fixture is the engine suite's (test_engines.py): sqlite, memkv and a
real 3-member etcd (tests/etcdproc.py)."""

from __future__ import annotations

import io
import json
import random
import stat
from dataclasses import replace

import pytest
from metacheck import assert_consistent
from test_engines import (  # noqa: F401  (fixtures)
    CONFIG,
    DIR,
    GID,
    REG,
    RING,
    UID,
    FakeClock,
    engine,
    etcd_cluster,
    mkdir,
    mkfile,
)

from hafs.admin.dump import read_dump, write_dump
from hafs.errors import UserError
from hafs.meta import ROOT_INODE, BlockRow, Entry, Extent, FileExtent, FsState, Inode, Xattr
from hafs.meta.etcd import EtcdKV, load_etcd, open_etcd, parse_meta_url, prefix_of
from hafs.meta.kv import K_LOADING, LOAD_BYTES, LOAD_OPS, KvMeta
from hafs.meta.memkv import MemKV
from hafs.meta.sqlite import SqliteMeta

BIG = bytes(range(256)) * 256  # a 64 KiB xattr value, every byte value in it


def snapshot(m) -> tuple[FsState, list]:
    """The state and the records of a dump, the records in one order for every engine."""
    with m.dump() as (state, records):
        return state, sorted(records, key=repr)


async def build(m) -> dict[str, int]:
    """A filesystem with one of everything a dump must carry; returns inode numbers."""
    d = mkdir(m, ROOT_INODE, b"d")
    f = m.mknod(d.id, b"f\xff\xfe", REG, UID, GID)  # a name that is not UTF-8
    m.link(f.id, ROOT_INODE, b"hard")
    s = m.mknod(ROOT_INODE, b"s", stat.S_IFLNK | 0o777, UID, GID, target=b"d/f\xff\xfe")
    c = m.mknod(ROOT_INODE, b"c", stat.S_IFCHR | 0o600, UID, GID, rdev=0x0501)
    m.mknod(d.id, b"fifo", stat.S_IFIFO | 0o640, 7, 8)
    m.setattr(f.id, mode=0o4750, uid=1234, gid=5678, atime_ns=123, mtime_ns=456)
    m.set_xattr(f.id, b"user.bin", b"\x00\x01\xff")
    m.set_xattr(d.id, b"user.big", BIG)
    lease = await m.locks.acquire(f"inode:{f.id}", wait_s=1)  # a fencing token is recorded
    new = [Extent(0, 100, "b1"), Extent(300, 50, "b2")]  # a hole between them
    m.commit(f.id, 0, 350, new, {"b1": 100, "b2": 50}, 1000, 789, lease.token)
    await m.locks.release(lease)
    g = mkfile(m, ROOT_INODE, b"g")
    m.commit(g.id, 0, 100, [Extent(0, 100, "b1")], {"b1": 100}, 100, 1, None)  # dedup
    m.commit(g.id, 100, 110, [Extent(100, 10, "b3")], {"b3": 10}, 110, 2, None)
    m.truncate(g.id, 100, 3, None)  # b3: garbage (refcount 0 since now)
    m.record_degraded("b1", ["n2", "n1"])
    u = mkfile(m, ROOT_INODE, b"u")  # unlinked while "open": kept with nlink 0
    m.commit(u.id, 0, 5, [Extent(0, 5, "b4")], {"b4": 5}, 5, 1, None)
    m.unlink(ROOT_INODE, b"u", open_here={u.id})
    assert m.replace_ring({**m.ring(), "version": 2}, expect_version=1)
    return {"d": d.id, "f": f.id, "s": s.id, "c": c.id, "g": g.id, "u": u.id}


@pytest.fixture(params=["sqlite", "memkv", "etcd"])
def target(request, tmp_path):
    """load(state, records) into a new, empty store of that engine; returns it opened."""
    opened = []

    def load(state, records):
        if request.param == "sqlite":
            SqliteMeta.load(tmp_path / "loaded.db", state, records)
            m = SqliteMeta.open(tmp_path / "loaded.db", holder="t", clock=FakeClock())
        elif request.param == "memkv":
            kv = MemKV()
            KvMeta.load(kv, state, records)
            m = KvMeta.open(kv, holder="t")
        else:
            cluster = request.getfixturevalue("etcd_cluster")
            url = cluster.url(f"load{random.getrandbits(64):x}")
            load_etcd(url, state, records)
            m = open_etcd(url, holder="t")
        opened.append(m)
        return m

    yield load
    for m in opened:
        m.close()


async def test_a_dump_loads_into_every_engine_and_dumps_back_the_same(engine, target):
    src = engine.meta
    ino = await build(src)
    src.adopt("t1")
    src.adopt("t2")  # the owner token the nodes record, and the one before (store.owner)
    state, records = snapshot(src)
    assert state.config == src.config() and state.ring["version"] == 2
    assert (state.owner, state.owner_previous) == ("t2", ("t1",))
    assert state.ring_changed_ns == src.ring_changed_ns() > 0
    assert state.next_ino > max(ino.values())
    kinds = {type(r).__name__ for r in records}
    assert kinds == {"Inode", "Entry", "Xattr", "FileExtent", "BlockRow", "Degraded"}

    m = target(state, iter(records))
    assert snapshot(m) == (state, records)
    own = m.owner()  # the same owner, and a loaded database file is its own (not a copy)
    assert (own.token, own.previous, own.copy_of, own.moved_from) == ("t2", ("t1",), None, None)
    assert m.usage() == src.usage() and m.count_degraded() == 1
    assert m.garbage_blocks(2**62, 10) == ["b3"] and m.unlinked_inodes() == [ino["u"]]
    assert m.lookup(ROOT_INODE, b"hard") == src.getattr(ino["f"]) == m.getattr(ino["f"])
    assert m.getattr(ino["s"]).target == b"d/f\xff\xfe" and m.getattr(ino["c"]).rdev == 0x0501
    assert m.get_xattr(ino["d"], b"user.big") == BIG
    assert m.extents(ino["f"], 0, 1000) == [Extent(0, 100, "b1"), Extent(300, 50, "b2")]
    assert_consistent(m)
    # the loaded filesystem takes changes: new inode numbers are never old ones, and
    # a writer's token passes the fence (tokens start again with the engine's locks)
    h = mkfile(m, ROOT_INODE, b"new")
    assert h.id >= state.next_ino
    lease = await m.locks.acquire(f"inode:{ino['f']}", wait_s=1)
    m.commit(ino["f"], 0, 100, [Extent(0, 100, "b5")], {"b5": 100}, 1000, 9, lease.token)
    await m.locks.release(lease)
    assert m.extents(ino["f"], 0, 100) == [Extent(0, 100, "b5")]
    assert_consistent(m)


def test_a_dump_is_one_state_of_the_metadata(engine):
    m, other = engine.meta, engine.client("b")
    for i in range(600):  # more than a page of every scan
        mkfile(m, ROOT_INODE, b"f%03d" % i)
    before = snapshot(m)
    with m.dump() as (state, records):
        first = [next(records)]
        late = mkfile(other, ROOT_INODE, b"late")
        other.unlink(ROOT_INODE, b"f599")
        other.rename(ROOT_INODE, b"f000", ROOT_INODE, b"moved", 0)
        rest = sorted(first + list(records), key=repr)
    assert (state, rest) == before
    after = snapshot(m)[1]
    assert Entry(ROOT_INODE, b"late", late.id) in after and after != rest


def test_a_load_needs_an_empty_store(engine, tmp_path):
    m = engine.meta
    state, records = snapshot(m)
    with pytest.raises(UserError, match="already exists|not empty"):
        if engine.name == "sqlite":
            SqliteMeta.load(m.path, state, iter(records))
        else:
            KvMeta.load(m.kv, state, iter(records))
    assert snapshot(m) == (state, records)  # nothing written


class CountingKV(MemKV):
    """A MemKV that records the size of every commit (keys and bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.commits: list[tuple[int, int]] = []

    def commit(self, checks, puts, deletes, lease=None, leased=None):
        n = sum(len(k) + len(v) for k, v in puts.items()) + sum(len(k) for k in deletes)
        self.commits.append((len(puts) + len(deletes), n))
        return super().commit(checks, puts, deletes, lease, leased)


def big_dump(files: int, xattrs: int) -> tuple[FsState, list]:
    """A dump of `files` files in the root (one extent each) and `xattrs` 64 KiB xattrs."""
    t = 1_700_000_000_000_000_000
    root = Inode(ROOT_INODE, DIR, UID, GID, 2, 0, t, t, t, 0, None)
    records: list = [root]
    for i in range(2, files + 2):
        records += [
            Inode(i, REG, UID, GID, 1, 10, t, t, t, 0, None),
            Entry(ROOT_INODE, b"f%05d" % i, i),
            FileExtent(i, Extent(0, 10, f"{i:064x}")),
            BlockRow(f"{i:064x}", 10, 1, None),
        ]
    records += [Xattr(2, b"user.x%04d" % j, BIG) for j in range(xattrs)]
    return FsState(CONFIG, RING, 0, files + 2), records


def test_a_kv_load_goes_in_bounded_transactions():
    state, records = big_dump(3000, 300)  # 12,000 keys and 19 MiB of xattrs
    kv = CountingKV()
    KvMeta.load(kv, state, iter(records))
    assert len(kv.commits) > 10
    assert all(n <= LOAD_OPS and size <= LOAD_BYTES for n, size in kv.commits), kv.commits
    m = KvMeta.open(kv)
    assert snapshot(m) == (state, sorted(records, key=repr))
    assert_consistent(m)


def test_a_big_load_into_etcd_stays_within_its_limits(etcd_cluster):
    state, records = big_dump(3000, 300)
    url = etcd_cluster.url(f"big{random.getrandbits(64):x}")
    load_etcd(url, state, iter(records))
    m = open_etcd(url)
    try:
        assert snapshot(m) == (state, sorted(records, key=repr))
        assert m.usage().inodes == 3001
    finally:
        m.close()


def failing(records: list, after: int):
    yield from records[:after]
    raise UserError("the dump broke off")


@pytest.mark.parametrize("where", ["memkv", "etcd"])
def test_a_failed_kv_load_leaves_nothing(where, request):
    state, records = big_dump(1000, 0)
    if where == "memkv":
        kv = MemKV()
    else:
        endpoints, name = parse_meta_url(
            request.getfixturevalue("etcd_cluster").url(f"fail{random.getrandbits(64):x}")
        )
        kv = EtcdKV(endpoints, prefix_of(name))
    try:
        with pytest.raises(UserError, match="broke off"):
            KvMeta.load(kv, state, failing(records, 3000))  # after several transactions
        assert kv.scan(b"", b"\xff", 10) == []
        # a load that died before it could clean up is named by open
        kv.commit({}, {K_LOADING: b'{"host": "h", "pid": 1}'}, ())
        with pytest.raises(UserError, match="'hafs meta load' into it has not finished"):
            KvMeta.open(kv)
        with pytest.raises(UserError, match="not empty"):
            KvMeta.load(kv, state, iter(records))
    finally:
        kv.close()


def test_a_failed_sqlite_load_leaves_nothing(tmp_path):
    state, records = big_dump(1000, 0)
    with pytest.raises(UserError, match="broke off"):
        SqliteMeta.load(tmp_path / "meta.db", state, failing(records, 3000))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------ JSON lines


def dumped(m) -> bytes:
    out = io.BytesIO()
    write_dump(m, out)
    return out.getvalue()


async def test_json_lines_carry_every_record_exactly():
    m = KvMeta.create(MemKV(), replace(CONFIG, ca_pem="PEM"), RING, UID, GID, owner="t1")
    await build(m)
    text = dumped(m)
    lines = text.splitlines()
    head, end = json.loads(lines[0]), json.loads(lines[-1])
    assert head["hafs_dump"] == 1 and head["source"]["engine"] == "kv"
    assert head["owner"] == {"token": "t1", "previous": []} and head["config"]["ca_pem"] == "PEM"
    assert end == {"type": "end", "records": len(lines) - 2}
    state, records = read_dump(io.BytesIO(text), "fs.json")
    assert (state, sorted(records, key=repr)) == snapshot(m)
    del head["owner"]  # a dump of an older hafs: no owner
    older = b"\n".join([json.dumps(head).encode(), *lines[1:]])
    assert read_dump(io.BytesIO(older), "fs.json")[0] == replace(state, owner=None)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda ls: ls[:-1], "without the dump's end line: it is incomplete"),
        (lambda ls: ls[:1], "without the dump's end line"),
        (lambda ls: ls[:3] + ls[4:], "came before: it is damaged"),
        (lambda ls: ls + [b'{"type": "inode"}'], "line 6: more after the end"),
        (lambda ls: [ls[0].replace(b'"hafs_dump":1', b'"hafs_dump":9')] + ls[1:],
         "format 9 .*newer than this hafs reads \\(1\\): upgrade hafs"),
        (lambda ls: [b'{"some": "json"}'] + ls[1:], "not a hafs metadata dump"),
        (lambda ls: ls[:2] + [ls[2].replace(b'"inode":2', b'"inode":"x"')] + ls[3:],
         "line 3: a bad entry record: 'inode' is not an integer"),
        (lambda ls: ls[:2] + [b'{"type": "block", "id": "b"}'] + ls[3:],
         "line 3: a bad block record: no 'size'"),
        (lambda ls: ls[:2] + [b"not json"] + ls[3:], "line 3: not a line of a hafs"),
        (lambda ls: [], "is empty"),
    ],
)
def test_json_lines_refuse_what_is_not_a_whole_dump(edit, message):
    m = KvMeta.create(MemKV(), CONFIG, RING, UID, GID)
    mkfile(m, ROOT_INODE, b"a")  # inode 1, 2; entry; end: 5 lines
    lines = dumped(m).splitlines()
    assert len(lines) == 5 and b'"type":"entry"' in lines[3]
    lines[2], lines[3] = lines[3], lines[2]  # the entry on line 3
    text = b"\n".join(edit(lines)) + b"\n"
    with pytest.raises(UserError, match=message):
        state, records = read_dump(io.BytesIO(text), "fs.json")
        list(records)
