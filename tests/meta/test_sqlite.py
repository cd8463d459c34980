"""The sqlite engine's own matters: schema, upgrades, identity checks, rollback.

What every engine must do is in test_engines.py."""

import os
import shutil
import sqlite3

import pytest

from hafs.errors import UserError
from hafs.meta import ROOT_INODE, Extent, FsConfig, Usage
from hafs.meta.sqlite import SCHEMA_VERSION, SqliteMeta

A, B, C = "a" * 64, "b" * 64, "c" * 64
CONFIG = FsConfig("u", 2, 2, None, 0)


@pytest.fixture
def meta(tmp_path):
    m = SqliteMeta.create(tmp_path / "meta.db", CONFIG, {"version": 1, "nodes": []}, 0, 0)
    yield m
    m.close()


def refcounts(meta):
    return dict(meta.db.execute("SELECT id, refcount FROM blocks"))


def scanned_usage(meta) -> Usage:
    """usage() as a scan of the tables computes it (what the running totals must equal)."""
    db = meta.db
    stored, blocks = db.execute(
        "SELECT coalesce(sum(size), 0), count(*) FROM blocks WHERE refcount > 0"
    ).fetchone()
    logical = db.execute("SELECT coalesce(sum(length), 0) FROM extents").fetchone()[0]
    return Usage(db.execute("SELECT count(*) FROM inodes").fetchone()[0], logical, stored, blocks)


_names = iter(range(10**6))


def new_file(meta) -> int:
    return meta.mknod(ROOT_INODE, b"f%d" % next(_names), 0o100644, 0, 0).id


def test_root_and_settings(meta):
    root = meta.getattr(ROOT_INODE)
    assert root.nlink == 2 and root.mode == 0o40755
    assert meta.config() == CONFIG
    meta.db.execute("DELETE FROM settings WHERE key = 'replicas'")
    meta._config = None
    with pytest.raises(UserError, match="lacks a valid setting"):
        meta.config()


def test_inode_numbers_are_never_reused(meta):
    first = new_file(meta)
    meta.unlink(ROOT_INODE, b"f%d" % (next(_names) - 1), open_here={first})
    assert meta.delete_inode(first)
    assert new_file(meta) > first


def test_extents_and_refcounts_move_together(meta):
    ino = new_file(meta)
    meta.commit(ino, 0, 300, [Extent(0, 100, A), Extent(100, 200, B)], {A: 100, B: 200}, 300, 1)
    other = new_file(meta)
    meta.commit(other, 0, 100, [Extent(0, 100, A)], {A: 100}, 100, 1)
    assert refcounts(meta) == {A: 2, B: 1}
    # rewrite the second extent of the first file
    meta.commit(ino, 100, 300, [Extent(100, 150, C)], {C: 150}, 250, 2)
    assert refcounts(meta) == {A: 2, B: 0, C: 1}
    assert meta.extents(ino, 0, 1000) == [Extent(0, 100, A), Extent(100, 150, C)]
    assert meta.extents(ino, 150, 160) == [Extent(100, 150, C)]
    assert meta.garbage_blocks(before_ns=2**62, limit=10) == [B]
    # truncate keeps a prefix of a block and drops the extents past the end
    assert meta.usage() == scanned_usage(meta) == Usage(3, 350, 250, 2)
    meta.truncate(ino, 50, 3, None)
    assert meta.extents(ino, 0, 1000) == [Extent(0, 50, A)]
    assert refcounts(meta) == {A: 2, B: 0, C: 0}
    assert meta.usage() == scanned_usage(meta) == Usage(3, 150, 100, 1)
    meta.db.execute("UPDATE inodes SET nlink = 0 WHERE id = ?", (other,))
    meta.delete_inode(other)
    assert refcounts(meta)[A] == 1
    assert meta.forget_block(B) and not meta.forget_block(A)
    assert meta.usage() == scanned_usage(meta) == Usage(2, 50, 100, 1)
    assert meta.count_inodes() == 2


def test_failed_transaction_changes_nothing(meta):
    ino = new_file(meta)
    with pytest.raises(KeyError):
        # the size of block B is missing: the whole replace is rolled back
        meta.commit(ino, 0, 200, [Extent(0, 100, A), Extent(100, 100, B)], {A: 100}, 200, 1)
    assert refcounts(meta) == {} and meta.extents(ino, 0, 1000) == []


def test_refuses_foreign_newer_and_damaged_databases(tmp_path, meta):
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE x (y)").connection.commit()
    with pytest.raises(UserError, match="not a hafs metadata database"):
        SqliteMeta.open(other)
    meta.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(UserError, match="newer"):
        SqliteMeta.open(meta.path)
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(UserError, match="damaged"):
        SqliteMeta.open(bad)
    with pytest.raises(UserError, match="missing"):
        SqliteMeta.open(tmp_path / "none.db")


def test_degraded_blocks_are_recorded_merged_and_forgotten(meta):
    meta.record_degraded(A, ["n1", "n3"])
    meta.record_degraded(A, ["n4"])  # written again around another failing node
    meta.record_degraded(B, ["n2"])
    assert meta.degraded_blocks("", 10) == [(A, ["n1", "n3", "n4"]), (B, ["n2"])]
    assert meta.degraded_blocks(A, 10) == [(B, ["n2"])]  # paged in id order
    meta.forget_degraded(B)
    assert meta.count_degraded() == 1
    assert meta.clear_degraded(keep={A}) == 0 and meta.clear_degraded(keep=set()) == 1
    ino = new_file(meta)  # a collected garbage block takes its record with it
    meta.commit(ino, 0, 10, [Extent(0, 10, C)], {C: 10}, 10, 1)
    meta.record_degraded(C, ["n1"])
    meta.truncate(ino, 0, 1, None)
    assert meta.forget_block(C) and meta.count_degraded() == 0


def test_a_version_2_database_is_upgraded(tmp_path, meta):
    ino = new_file(meta)
    meta.commit(ino, 0, 300, [Extent(0, 100, A), Extent(100, 200, B)], {A: 100, B: 200}, 300, 1)
    triggers = [
        r[0] for r in meta.db.execute("SELECT name FROM sqlite_master WHERE type='trigger'")
    ]
    meta.db.executescript(
        "".join(f"DROP TRIGGER {t};" for t in triggers)
        + "DROP TABLE counters; DROP TABLE degraded; DROP TABLE sessions; DROP TABLE orphans;"
        " PRAGMA user_version = 2;"
    )
    meta.close()
    upgraded = SqliteMeta.open(meta.path)
    try:
        assert upgraded.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        assert upgraded.usage() == scanned_usage(upgraded) == Usage(2, 300, 300, 2)
        upgraded.record_degraded(A, ["n1"])
        assert upgraded.count_degraded() == 1
    finally:
        upgraded.close()


def test_allocated_bytes_counts_extents_not_holes(meta):
    ino = new_file(meta)
    assert meta.allocated_bytes(ino) == 0
    meta.commit(ino, 0, 2**50 + 10, [Extent(2**50, 10, A)], {A: 10}, 2**50 + 10, 1)
    assert meta.allocated_bytes(ino) == 10  # a 1 PiB hole holds nothing
    meta.commit(ino, 0, 100, [Extent(0, 100, B)], {B: 100}, 2**50 + 10, 2)
    other = new_file(meta)
    meta.commit(other, 0, 100, [Extent(0, 100, B)], {B: 100}, 100, 1)
    assert (meta.allocated_bytes(ino), meta.allocated_bytes(other)) == (110, 100)  # B in each


def test_damage_is_told_from_a_busy_database_and_integrity_is_checked(meta, tmp_path):
    other = sqlite3.connect(tmp_path / "meta.db", isolation_level=None, timeout=0)
    meta.db.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(sqlite3.OperationalError) as busy:
            other.execute("BEGIN IMMEDIATE")
    finally:
        meta.db.execute("ROLLBACK")
        other.close()
    assert meta.damaged(busy.value) is None  # waited out, not damage
    why = meta.damaged(sqlite3.DatabaseError("database disk image is malformed"))
    assert "is damaged" in why and "malformed" in why
    assert meta.damaged(OSError(5, "EIO")) is None
    assert meta.check_storage(10) == [] and "--salvage" in meta.describe()["recover"]
    meta.db.execute("PRAGMA writable_schema = ON")  # an index that disagrees with its table
    meta.db.execute(
        "UPDATE sqlite_master SET sql = 'CREATE INDEX dentries_inode ON dentries(parent)'"
        " WHERE name = 'dentries_inode'"
    )
    meta.mknod(ROOT_INODE, b"f", 0o100644, 0, 0)
    meta.close()
    m = SqliteMeta.open(tmp_path / "meta.db", read_only=True)
    try:
        assert m.check_storage(10)
    finally:
        m.close()
    meta.db = sqlite3.connect(":memory:")  # for the fixture's close


def test_a_read_only_opening_as_found_reads_an_older_schema_unchanged(tmp_path):
    path = tmp_path / "meta.db"
    SqliteMeta.create(path, CONFIG, {"version": 1, "nodes": []}, 0, 0).close()
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript("DROP TABLE degraded; DROP TABLE sessions; PRAGMA user_version = 2;")
    db.close()
    with pytest.raises(UserError, match="mount it read-write once"):
        SqliteMeta.open(path, read_only=True)
    m = SqliteMeta.open(path, read_only=True, as_found=True)
    try:
        assert m.describe()["schema"] == 2 and m.count_degraded() == 0
        assert m.sessions.alive() == [] and m.getattr(ROOT_INODE).nlink == 2
    finally:
        m.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    db.close()


# ---------------------------------------------------------------- ownership


def test_a_copy_of_the_database_knows_itself_a_copy(tmp_path):
    path = tmp_path / "h" / "meta.db"
    path.parent.mkdir()
    SqliteMeta.create(path, CONFIG, {"version": 1, "nodes": []}, 0, 0, owner="t1").close()
    m = SqliteMeta.open(path)
    assert (m.owner().token, m.owner().copy_of, m.owner().moved_from) == ("t1", None, None)
    m.close()
    copy = tmp_path / "copy" / "meta.db"
    shutil.copytree(path.parent, copy.parent, copy_function=shutil.copy2)  # cp -a
    c = SqliteMeta.open(copy)
    assert c.owner().token == "t1" and c.owner().copy_of == str(path.resolve())
    c.adopt("t2")  # hafs node adopt: this file is the store now, with a new token
    assert (c.owner().token, c.owner().previous, c.owner().copy_of) == ("t2", ("t1",), None)
    c.close()
    m = SqliteMeta.open(path, read_only=True)  # the original is untouched by all this
    assert (m.owner().token, m.owner().copy_of) == ("t1", None)
    m.close()


def test_a_moved_database_is_the_store_and_one_put_back_is_a_copy(tmp_path):
    path = tmp_path / "h" / "meta.db"
    path.parent.mkdir()
    SqliteMeta.create(path, CONFIG, {"version": 1, "nodes": []}, 0, 0, owner="t1").close()
    moved = tmp_path / "elsewhere"
    os.rename(path.parent, moved)  # mv home elsewhere: the same file
    m = SqliteMeta.open(moved / "meta.db")
    own = m.owner()
    assert own.copy_of is None and own.moved_from == str(path.resolve())
    m.adopt(own.token)  # records where it is now
    assert m.owner().moved_from is None and m.owner().previous == ()
    m.close()
    backup = tmp_path / "backup.db"
    shutil.copy2(moved / "meta.db", backup)
    os.replace(backup, moved / "meta.db")  # a backup put back in place: another file
    m = SqliteMeta.open(moved / "meta.db")
    assert m.owner().copy_of == str((moved / "meta.db").resolve())
    m.close()
