"""Tests of the backing-directory block store (hafs.blocks)."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from pathlib import Path

import pytest

from hafs.errors import (
    BlockCorrupt,
    BlockMissing,
    NodeIdentityError,
    NodeOwnedElsewhere,
    NotOwner,
    UserError,
)
from hafs.store.dirstore import (
    BLOCK_ID_RE,
    IDENTITY_FILE,
    DirStore,
    StoreUsage,
    block_id,
    read_identity,
)
from hafs.store.owner import OwnerClaim

FS = "3f0c6a55-0b8e-4d0e-9a43-5d1b8a3c2f10"
OTHER_FS = "9d8e2b11-7c4a-4f2e-8d6b-0a1e3c5b7d92"


@pytest.fixture
def store(tmp_path: Path) -> DirStore:
    return DirStore.create(tmp_path / "n1", "n1", FS)


def block_path(store: DirStore, bid: str) -> Path:
    return store.path / "blocks" / bid[:2] / bid


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes | None]]:
    """Everything under `root`: path -> (mode, mtime_ns, content of files)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (
                st.st_mode,
                st.st_mtime_ns,
                p.read_bytes() if p.is_file() else None,
            )
    st = root.stat()
    out["."] = (st.st_mode, st.st_mtime_ns, None)
    return out


# --------------------------------------------------------------------- ids


def test_block_id_is_blake3_hex() -> None:
    bid = block_id(b"hello")
    assert BLOCK_ID_RE.match(bid)
    # BLAKE3 test vector for "hello"
    assert bid == "ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f"
    assert block_id(memoryview(b"hello")) == bid


# ----------------------------------------------------------------- put/get


def test_put_get_round_trip(store: DirStore) -> None:
    for data in (b"", b"x", os.urandom(4096), os.urandom(1 << 20)):
        bid = block_id(data)
        store.put(bid, data)
        assert store.get(bid) == data
        assert store.has(bid)
        assert store.size(bid) == len(data)
        assert block_path(store, bid).read_bytes() == data
    assert os.listdir(store.path / "tmp") == []


def test_put_accepts_memoryview_and_bytearray(store: DirStore) -> None:
    buf = bytearray(os.urandom(10_000))
    view = memoryview(buf)[100:5000]
    bid = block_id(view)
    store.put(bid, view)
    assert store.get(bid) == bytes(view)
    data = bytearray(b"abc" * 1000)
    store.put(block_id(data), data)
    assert store.get(block_id(data)) == bytes(data)


def test_put_is_idempotent_and_refreshes_mtime(store: DirStore) -> None:
    data = os.urandom(5000)
    bid = block_id(data)
    store.put(bid, data)
    path = block_path(store, bid)
    ino = path.stat().st_ino
    old = time.time_ns() - 10 * 3600 * 10**9
    os.utime(path, ns=(old, old))
    assert store.mtime_ns(bid) == old

    store.put(bid, data)
    assert path.stat().st_ino == ino  # not rewritten
    assert store.mtime_ns(bid) > old  # but the garbage grace period restarts
    assert store.get(bid) == data
    assert os.listdir(path.parent) == [bid]


def test_put_replaces_a_file_of_the_wrong_size(store: DirStore, caplog) -> None:
    data = os.urandom(5000)
    bid = block_id(data)
    store.put(bid, data)
    block_path(store, bid).write_bytes(data[:100])
    with caplog.at_level(logging.WARNING, logger="hafs.store.dirstore"):
        store.put(bid, data)
    assert "BLOCK-CORRUPT" in caplog.text
    assert store.get(bid) == data


def test_get_missing(store: DirStore) -> None:
    bid = block_id(b"never stored")
    with pytest.raises(BlockMissing) as exc:
        store.get(bid)
    assert exc.value.block_id == bid
    assert "n1" in str(exc.value)
    assert not store.has(bid)
    assert store.size(bid) is None
    assert store.mtime_ns(bid) is None


def test_get_corrupt_moves_the_block_aside(store: DirStore, caplog) -> None:
    data = os.urandom(4096)
    bid = block_id(data)
    store.put(bid, data)
    path = block_path(store, bid)
    bad = bytearray(path.read_bytes())
    bad[1234] ^= 0x01
    path.write_bytes(bad)

    with caplog.at_level(logging.WARNING, logger="hafs.store.dirstore"):
        with pytest.raises(BlockCorrupt) as exc:
            store.get(bid)
    assert exc.value.block_id == bid
    assert exc.value.where == "n1"
    assert f"BLOCK-CORRUPT {bid} on node n1" in caplog.text

    assert not path.exists()
    kept = os.listdir(store.path / "corrupt")
    assert len(kept) == 1 and kept[0].startswith(bid + ".")
    assert (store.path / "corrupt" / kept[0]).read_bytes() == bad
    with pytest.raises(BlockMissing):
        store.get(bid)
    assert store.iter_ids() == []

    store.put(bid, data)  # repair puts a good copy back
    assert store.get(bid) == data


def test_corrupt_block_of_the_right_size_is_not_rewritten_by_put(store: DirStore) -> None:
    # put() trusts existing files of the right size (no hashing); get() catches them.
    data = os.urandom(100)
    bid = block_id(data)
    store.put(bid, data)
    block_path(store, bid).write_bytes(bytes(100))
    store.put(bid, data)
    with pytest.raises(BlockCorrupt):
        store.get(bid)
    store.put(bid, data)
    assert store.get(bid) == data


BAD_IDS = [
    "../etc",
    "../../../../etc/passwd",
    "A" * 64,
    block_id(b"x").upper(),
    "a" * 63,
    "a" * 65,
    "a" * 64 + "\n",
    "g" * 64,
    "",
    "ab/cd/" + "a" * 58,
    None,
    b"a" * 64,
]


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_invalid_ids_are_refused_everywhere(store: DirStore, bad) -> None:
    calls = [
        lambda: store.put(bad, b"data"),
        lambda: store.get(bad),
        lambda: store.has(bad),
        lambda: store.size(bad),
        lambda: store.delete(bad),
        lambda: store.mtime_ns(bad),
    ]
    for call in calls:
        with pytest.raises(ValueError):
            call()
    if not (isinstance(bad, str) and re.fullmatch("[0-9a-f]{0,64}", bad)):  # else a fine cursor
        with pytest.raises(ValueError):
            store.iter_ids(after=bad)
    assert os.listdir(store.path / "tmp") == []
    assert store.iter_ids() == []


def test_iter_ids_cursor_validation(store: DirStore) -> None:
    for bad in ("../x", "A", "a" * 65, "zz"):
        with pytest.raises(ValueError):
            store.iter_ids(after=bad)
    with pytest.raises(ValueError):
        store.iter_ids(limit=0)


# ------------------------------------------------------------- listing


def test_iter_ids_pages_through_everything(store: DirStore) -> None:
    ids = set()
    for i in range(2500):
        data = i.to_bytes(4, "big")
        bid = block_id(data)
        store.put(bid, data)
        ids.add(bid)
    # stray files are ignored
    (store.path / "blocks" / "zz").mkdir()
    some = sorted(ids)[0]
    (block_path(store, some).parent / "junk").write_bytes(b"")

    seen: list[str] = []
    after = ""
    pages = 0
    while True:
        page = store.iter_ids(after=after, limit=100)
        if not page:
            break
        assert len(page) <= 100
        assert page == sorted(page)
        assert all(bid > after for bid in page)
        seen.extend(page)
        after = page[-1]
        pages += 1
    assert pages == 25
    assert seen == sorted(ids)
    assert len(set(seen)) == len(seen)

    # a prefix works as a cursor too
    cut = sorted(ids)[1234]
    assert store.iter_ids(after=cut[:3], limit=5000) == sorted(b for b in ids if b > cut[:3])
    assert store.iter_ids(after="f" * 64) == []


def test_iter_ids_of_empty_store(store: DirStore) -> None:
    assert store.iter_ids() == []


def test_delete(store: DirStore) -> None:
    data = b"to be deleted"
    bid = block_id(data)
    assert store.delete(bid) is False
    store.put(bid, data)
    assert store.delete(bid) is True
    assert not store.has(bid)
    assert store.delete(bid) is False
    with pytest.raises(BlockMissing):
        store.get(bid)


def test_usage(store: DirStore) -> None:
    u = store.usage()
    assert isinstance(u, StoreUsage)
    assert u.block_count == 0 and u.block_bytes == 0
    assert u.total_bytes > 0 and 0 <= u.free_bytes <= u.total_bytes
    sizes = [0, 1, 4096, 100_000]
    for n in sizes:
        data = os.urandom(n)
        store.put(block_id(data), data)
        store.put(block_id(data), data)  # idempotent: counted once
    (store.path / "tmp" / "leftover").write_bytes(b"x" * 50)
    u = store.usage()
    assert u.block_count == len(sizes)
    assert u.block_bytes == sum(sizes)


# ---------------------------------------------------------- concurrency


def test_concurrent_puts_of_one_id(store: DirStore) -> None:
    data = os.urandom(256 * 1024)
    bid = block_id(data)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            for _ in range(5):
                store.put(bid, data)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert os.listdir(block_path(store, bid).parent) == [bid]
    assert store.get(bid) == data
    assert os.listdir(store.path / "tmp") == []


def test_concurrent_puts_and_gets_of_many_ids(store: DirStore) -> None:
    blocks = [os.urandom(64) + i.to_bytes(2, "big") for i in range(400)]
    # many ids share the first fan-out level, so directory creation races
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(k: int) -> None:
        try:
            barrier.wait()
            for i in range(k, len(blocks) + k):
                data = blocks[i % len(blocks)]
                store.put(block_id(data), data)
                assert store.get(block_id(data)) == data
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k * 50,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.iter_ids(limit=1000) == sorted(block_id(b) for b in blocks)


# ------------------------------------------------------------ temp files


def test_cleanup_tmp(store: DirStore) -> None:
    tmp = store.path / "tmp"
    old = tmp / (block_id(b"a") + ".deadbeef")
    young = tmp / (block_id(b"b") + ".cafebabe")
    old.write_bytes(b"partial")
    young.write_bytes(b"in progress")
    t = time.time() - 7200
    os.utime(old, (t, t))
    assert store.cleanup_tmp(older_than_s=3600) == 1
    assert not old.exists() and young.exists()
    assert store.cleanup_tmp() == 0
    assert store.cleanup_tmp(older_than_s=0) == 1
    assert os.listdir(tmp) == []


def test_leftover_tmp_files_are_harmless(store: DirStore) -> None:
    data = b"block"
    bid = block_id(data)
    (store.path / "tmp" / (bid + ".0123456789abcdef")).write_bytes(b"blo")
    store.put(bid, data)
    assert store.get(bid) == data
    assert store.iter_ids() == [bid]
    assert store.usage().block_count == 1


# ------------------------------------------------------------- create()


def test_create_makes_the_layout(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b" / "n1"
    s = DirStore.create(root, "n1", FS)
    assert s.path == root and s.node_id == "n1"
    ident = json.loads((root / IDENTITY_FILE).read_text())
    assert ident["format"] == 1
    assert ident["fs_uuid"] == FS and ident["node_id"] == "n1"
    assert isinstance(ident["created_ns"], int)
    assert read_identity(root) == ident
    assert {"blocks", "tmp", IDENTITY_FILE} <= set(os.listdir(root))


def test_create_is_idempotent(store: DirStore) -> None:
    data = b"kept"
    store.put(block_id(data), data)
    before = (store.path / IDENTITY_FILE).read_bytes()
    again = DirStore.create(store.path, "n1", FS)
    assert (store.path / IDENTITY_FILE).read_bytes() == before
    assert again.get(block_id(data)) == data


def test_create_in_an_existing_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "n1").mkdir()
    DirStore.create(tmp_path / "n1", "n1", FS)
    assert read_identity(tmp_path / "n1")["node_id"] == "n1"


def test_create_ignores_a_torn_identity_write(tmp_path: Path) -> None:
    root = tmp_path / "n1"
    root.mkdir()
    (root / f".{IDENTITY_FILE}.0011223344556677").write_text('{"form')
    DirStore.create(root, "n1", FS)
    assert sorted(os.listdir(root)) == sorted(["blocks", "tmp", "corrupt", IDENTITY_FILE])


@pytest.mark.parametrize("node_id, fs_uuid", [("n1", OTHER_FS), ("n2", FS)])
def test_create_refuses_a_foreign_identity(store: DirStore, node_id: str, fs_uuid: str) -> None:
    before = snapshot(store.path)
    with pytest.raises(NodeIdentityError) as exc:
        DirStore.create(store.path, node_id, fs_uuid)
    msg = str(exc.value)
    assert str(store.path) in msg
    assert FS in msg and "n1" in msg
    assert snapshot(store.path) == before


def test_create_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    root = tmp_path / "home"
    root.mkdir()
    (root / "thesis.tex").write_text("precious")
    before = snapshot(root)
    with pytest.raises(NodeIdentityError) as exc:
        DirStore.create(root, "n1", FS)
    assert str(root) in str(exc.value)
    assert "thesis.tex" in str(exc.value)
    assert snapshot(root) == before


def test_create_refuses_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError) as exc:
        DirStore.create(f, "n1", FS)
    assert str(f) in str(exc.value)
    assert f.read_text() == "x"


def test_garbled_identity_is_refused(store: DirStore) -> None:
    (store.path / IDENTITY_FILE).write_text("not json")
    before = snapshot(store.path)
    for call in (DirStore.open, DirStore.create):
        with pytest.raises(NodeIdentityError) as exc:
            call(store.path, "n1", FS)
        assert str(store.path) in str(exc.value)
    (store.path / IDENTITY_FILE).write_text(
        json.dumps({"format": 2, "fs_uuid": FS, "node_id": "n1"})
    )
    before = snapshot(store.path)
    with pytest.raises(NodeIdentityError, match="format"):
        DirStore.open(store.path, "n1", FS)
    assert snapshot(store.path) == before


# --------------------------------------------------------------- open()


def test_open_accepts_its_own_directory(store: DirStore) -> None:
    data = os.urandom(1000)
    store.put(block_id(data), data)
    s = DirStore.open(store.path, "n1", FS)
    assert s.get(block_id(data)) == data


def test_open_recreates_missing_subdirectories(store: DirStore) -> None:
    os.rmdir(store.path / "tmp")
    os.rmdir(store.path / "corrupt")
    s = DirStore.open(store.path, "n1", FS)
    s.put(block_id(b"z"), b"z")
    assert s.get(block_id(b"z")) == b"z"


def test_open_refuses_a_missing_directory(tmp_path: Path) -> None:
    root = tmp_path / "gone"
    with pytest.raises(UserError) as exc:
        DirStore.open(root, "n1", FS)
    msg = str(exc.value)
    assert str(root) in msg and "n1" in msg and "missing" in msg
    assert not root.exists()


@pytest.mark.parametrize("node_id, fs_uuid", [("n1", OTHER_FS), ("n2", FS)])
def test_open_refuses_a_foreign_identity(store: DirStore, node_id: str, fs_uuid: str) -> None:
    before = snapshot(store.path)
    with pytest.raises(NodeIdentityError) as exc:
        DirStore.open(store.path, node_id, fs_uuid)
    msg = str(exc.value)
    assert str(store.path) in msg
    assert f"filesystem {FS} node n1" in msg  # what was found
    assert f"filesystem {fs_uuid} node {node_id}" in msg  # what was expected
    assert snapshot(store.path) == before


def test_open_refuses_a_directory_without_identity(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    root.mkdir()
    with pytest.raises(NodeIdentityError) as exc:
        DirStore.open(root, "n1", FS)
    assert str(root) in str(exc.value)
    assert os.listdir(root) == []


def test_open_refuses_a_read_only_directory(store: DirStore) -> None:
    before_mode = store.path.stat().st_mode
    store.path.chmod(0o555)
    try:
        if os.access(store.path, os.W_OK):
            pytest.skip("permissions are not enforced for this user (root)")
        before = snapshot(store.path)
        with pytest.raises(UserError) as exc:
            DirStore.open(store.path, "n1", FS)
        assert str(store.path) in str(exc.value) and "writable" in str(exc.value)
        assert snapshot(store.path) == before
    finally:
        store.path.chmod(before_mode)


def test_open_refuses_an_unwritable_directory_as_reported_by_access(
    store: DirStore, monkeypatch
) -> None:
    # The same check as above, but runs as root too: access(2) is what open() asks.
    real_access = os.access
    root = str(store.path)

    def access(path, mode, **kw):
        if os.fspath(path) == root and mode & os.W_OK:
            return False
        return real_access(path, mode, **kw)

    before = snapshot(store.path)
    monkeypatch.setattr(os, "access", access)
    with pytest.raises(UserError) as exc:
        DirStore.open(store.path, "n1", FS)
    monkeypatch.undo()
    assert root in str(exc.value) and "writable" in str(exc.value)
    assert snapshot(store.path) == before


def test_init_does_no_io(tmp_path: Path) -> None:
    s = DirStore(tmp_path / "nothing", "n1", FS)
    assert s.path == tmp_path / "nothing"
    assert not (tmp_path / "nothing").exists()


# --------------------------------------------------------------- ownership

MINE = OwnerClaim("tok-mine", "host:/home/a/meta.db")
THEIRS = OwnerClaim("tok-theirs", "host:/home/copy/meta.db")


def test_create_records_the_owner_and_open_accepts_it(tmp_path: Path) -> None:
    store = DirStore.create(tmp_path / "n1", "n1", FS, MINE)
    ident = read_identity(store.path)
    assert (ident["owner"], ident["owner_where"]) == (MINE.token, MINE.where)
    DirStore.open(store.path, "n1", FS, MINE)
    assert store.owner_of() == (MINE.token, MINE.where)


def test_a_directory_without_owner_is_taken_by_the_first_store(store: DirStore) -> None:
    assert store.owner_of() == (None, None)  # made before owners (or by --init)
    DirStore.open(store.path, "n1", FS)  # no claim: read only, nothing written
    assert store.owner_of() == (None, None)
    DirStore.open(store.path, "n1", FS, MINE)
    assert store.owner_of() == (MINE.token, MINE.where)
    before = snapshot(store.path)
    with pytest.raises(NodeOwnedElsewhere, match="belongs to another metadata store"):
        DirStore.open(store.path, "n1", FS, THEIRS)
    assert snapshot(store.path) == before, "a refusal changes nothing"


def test_a_previous_token_of_the_store_is_switched(tmp_path: Path) -> None:
    DirStore.create(tmp_path / "n1", "n1", FS, MINE)
    adopted = OwnerClaim("tok-new", "host:/disk2/meta.db", frozenset({MINE.token}))
    store = DirStore.open(tmp_path / "n1", "n1", FS, adopted)
    assert store.owner_of() == (adopted.token, adopted.where)
    with pytest.raises(NodeOwnedElsewhere, match=r"host:/disk2/meta\.db"):
        DirStore.open(tmp_path / "n1", "n1", FS, MINE)  # the old token is locked out


def test_deletes_stop_once_another_store_owns_the_directory(tmp_path: Path) -> None:
    mine = DirStore.create(tmp_path / "n1", "n1", FS, MINE)
    for data in (b"one", b"two"):
        mine.put(block_id(data), data)
    assert mine.delete(block_id(b"one"))
    # Another store takes the directory (hafs node adopt) while `mine` is still open.
    DirStore(tmp_path / "n1", "n1", FS).set_owner(THEIRS)
    with pytest.raises(NotOwner, match="belongs to another metadata store"):
        mine.delete(block_id(b"two"))
    assert mine.has(block_id(b"two"))
    reader = DirStore.open(tmp_path / "n1", "n1", FS)  # a store without a claim still reads
    assert reader.get(block_id(b"two")) == b"two"


def test_set_owner_with_expect_is_a_compare_and_set(store: DirStore) -> None:
    store.set_owner(MINE, expect=(None,))
    with pytest.raises(NotOwner):
        store.set_owner(THEIRS, expect=(None,))
    assert store.owner_of()[0] == MINE.token
    store.set_owner(THEIRS)  # unconditional: what hafs node adopt does
    assert store.owner_of()[0] == THEIRS.token
    assert read_identity(store.path)["created_ns"] > 0  # the rest of the identity is kept
