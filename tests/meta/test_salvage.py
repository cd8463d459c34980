"""The tolerant reader of a damaged SQLite database (hafs/meta/salvage.py): pages are
damaged on purpose (tests/dbdamage.py), and every row on a sound page must come back,
none from a damaged one, and the rebuilt database must be whole and repairable."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import dbdamage
import pytest
from metacheck import assert_consistent

from hafs.admin import fsck
from hafs.errors import MetaDamaged, UserError
from hafs.meta import ROOT_INODE, Extent, FsConfig
from hafs.meta.salvage import read_damaged, salvage
from hafs.meta.sqlite import APPLICATION_ID, SCHEMA_VERSION, SqliteMeta

CONFIG = FsConfig("fs-uuid", 2, 1, "tok", 123)
RING = {"version": 3, "nodes": [{"id": "n1", "address": "/x", "weight": 1, "zone": "",
                                 "state": "up"}]}  # fmt: skip
REG, DIR = 0o100644, 0o40755
TABLES = ("inodes", "dentries", "xattrs", "extents", "blocks")
KIND = {"inodes": "Inode", "dentries": "Entry", "xattrs": "Xattr", "extents": "FileExtent",
        "blocks": "BlockRow"}  # fmt: skip


def build(path: Path) -> None:
    """2,000 files in 20 directories, one extent and one block each, xattrs on every
    other one (a few of them big enough for overflow pages)."""
    m = SqliteMeta.create(path, CONFIG, RING, 0, 0, owner="t1")
    m.adopt("t2")  # the owner token the nodes record, and one held before (store.owner)
    for d in range(20):
        di = m.mknod(ROOT_INODE, b"d%02d" % d, DIR, 0, 0)
        for i in range(100):
            f = m.mknod(di.id, b"file-%04d" % i, REG, 0, 0)
            bid = f"{(d * 100 + i) * 7919:064x}"
            m.commit(f.id, 0, 10, [Extent(0, 10, bid)], {bid: 10}, 10, 1, None)
            if i % 2:
                m.set_xattr(f.id, b"user.tag", b"t" * 150)
            if i == 50:
                m.set_xattr(f.id, b"user.big", bytes(range(256)) * 40)  # overflow pages
    m.record_degraded(f"{7919:064x}", ["n1"])
    m.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    m.close()


def records(m) -> tuple:
    with m.dump() as (state, recs):
        return state, {repr(r): type(r).__name__ for r in recs}


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "meta.db"
    build(path)
    return path


def middle(db: Path, table: str, kind: str = "leaf") -> int:
    numbers = dbdamage.pages(db, table, kind)
    assert len(numbers) >= 3, (table, numbers)
    return numbers[len(numbers) // 2]


def test_every_row_on_a_sound_page_comes_back_and_none_from_a_damaged_one(db):
    m = SqliteMeta.open(db)
    state, before = records(m)
    m.close()
    hit = {t: middle(db, t) for t in TABLES}
    lost = {t: dbdamage.cells(db, p) for t, p in hit.items()}
    dbdamage.damage(db, hit.values())
    m = SqliteMeta.open(db)
    try:
        with pytest.raises(MetaDamaged):  # SQLite finds it damaged
            m.scan_inodes(0, 10_000)
    finally:
        m.close()
    with read_damaged(db) as (got_state, recs, tally):
        got = {repr(r): type(r).__name__ for r in recs}
    assert got_state == state
    assert got.keys() <= before.keys()
    for table in TABLES:
        kind = KIND[table]
        missing = sum(1 for r, k in before.items() if k == kind and r not in got)
        assert missing == lost[table], (table, missing, lost[table])
        assert len(tally.skipped[table]) >= 1
    assert sum(1 for k in got.values() if k == "Degraded") == 1


def test_salvage_rebuilds_a_whole_database_that_fsck_makes_consistent(db, tmp_path):
    dbdamage.damage(db, [middle(db, t) for t in ("inodes", "dentries", "extents", "blocks")])
    damaged_bytes = db.read_bytes()
    problems, kept, tally = salvage(db)
    assert "malformed" in problems or "out of range" in problems, problems
    assert kept.read_bytes() == damaged_bytes and kept.name.startswith("meta.db.damaged-")
    names = {p.name for p in tmp_path.iterdir()}  # SQLite's readers make the -wal, -shm
    assert names - {f"{kept.name}-wal", f"{kept.name}-shm"} == {"meta.db", kept.name}
    wal = tmp_path / f"{kept.name}-wal"
    assert not wal.exists() or wal.stat().st_size == 0  # nothing was written into it
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()
    m = SqliteMeta.open(db, check_s=2.0)
    try:
        assert m.config() == CONFIG and m.ring() == RING
        own = m.owner()  # still the owner of its nodes: the new file is recorded as its own
        assert (own.token, own.previous, own.copy_of, own.moved_from) == ("t2", ("t1",), None, None)
        report = fsck.Report(str(tmp_path), repair=True, deep=False, grace_s=0)
        fsck.Checker(m, report).check_metadata()
        assert report.found["dangling_entry"] and report.found["orphan_inode"]
        assert report.fixed == report.found, report.render()
        assert_consistent(m)
        assert m.lookup(ROOT_INODE, b"lost+found") is not None
        new = m.mknod(ROOT_INODE, b"new", REG, 0, 0)  # it takes changes, with a new number
        assert new.id > 2020
    finally:
        m.close()


def test_a_sound_database_is_left_alone(db):
    before = db.read_bytes()
    assert salvage(db) is None
    assert db.read_bytes() == before


def test_damage_it_cannot_get_past_says_so(db, tmp_path):
    root = dbdamage.pages(db, "inodes", "internal")[0]  # every inode is below it
    dbdamage.damage(db, [root])
    with read_damaged(db) as (_, recs, tally):
        kinds = [type(r).__name__ for r in recs]
    assert "Inode" not in kinds and kinds.count("Entry") == 2020  # the rest is read
    assert tally.skipped["inodes"] == [(None, None)]
    dbdamage.damage(db, dbdamage.pages(db, "settings"))
    with pytest.raises(UserError, match="settings .* are damaged .* restore it from a backup"):
        with read_damaged(db):
            pass
