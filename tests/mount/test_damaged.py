"""A damaged metadata database: refused with one clear line before anything is written;
damage met while serving stops the changes (EROFS), logged once, with what to do; and
`hafs fsck --salvage` brings back what can be read of it."""

from __future__ import annotations

import errno
import json
import os
import sqlite3

import dbdamage
import pytest
from conftest import hafs, make_mount

from hafs.errors import MetaDamaged
from hafs.meta import ROOT_INODE
from hafs.meta.sqlite import APPLICATION_ID, SCHEMA_VERSION, SqliteMeta


def damage_pages(db_path, first_page: int = 2) -> None:
    """Overwrite the middle of every page from `first_page` on with garbage (the header
    and the schema page stay readable, so the file still opens as a hafs database)."""
    last = os.path.getsize(db_path) // dbdamage.page_size(db_path)
    dbdamage.damage(db_path, range(first_page, last + 1))


def filled_home(tmp_path):
    m = make_mount(tmp_path)
    m.start()
    try:
        for i in range(300):
            (m.mnt / f"f{i:03}").write_bytes(b"x" * 100)
    finally:
        m.stop()
    db = m.home / "meta.db"
    sqlite3.connect(db).execute("PRAGMA wal_checkpoint(TRUNCATE)").close()
    return m, db


def test_a_damaged_database_is_refused_with_one_line_and_left_as_it_was(tmp_path):
    m, db = filled_home(tmp_path)
    damage_pages(db)
    before = db.read_bytes()
    p = hafs("mount", "--home", m.home, m.mnt, check=False)
    assert p.returncode == 2, p
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "is damaged" in lines[0] and "hafs fsck" in lines[0], lines
    assert not os.path.ismount(m.mnt)
    assert db.read_bytes() == before, "nothing was written into the damaged file"
    p = hafs("mount", "--foreground", "--home", m.home, m.mnt, check=False)  # no traceback
    assert p.returncode == 2 and "Traceback" not in p.stderr and "is damaged" in p.stderr


def test_damage_met_while_serving_refuses_changes_after_one_log_line(tmp_path, caplog):
    m, db = filled_home(tmp_path)
    meta = SqliteMeta.open(db)  # opened before the damage, as by a running mount
    try:
        damage_pages(db)
        meta.db.execute("PRAGMA cache_size = 0")  # read the pages again from the file
        with pytest.raises(MetaDamaged) as e:
            for inode in meta.scan_inodes(0, 10_000):
                meta.lookup(ROOT_INODE, b"f%03d" % (inode.id % 300))
        assert e.value.errno == errno.EIO
        for change in (
            lambda: meta.mknod(ROOT_INODE, b"new", 0o100644, 0, 0),
            lambda: meta.record_degraded("a" * 64, ["n1"]),
            lambda: meta.sessions.register("mount", "/x", 10),
        ):
            with pytest.raises(MetaDamaged) as e:
                change()
            assert e.value.errno == errno.EROFS
        damaged = [r for r in caplog.records if "META-DAMAGED" in r.getMessage()]
        assert len(damaged) == 1 and "hafs fsck --home" in damaged[0].getMessage()
    finally:
        meta.close()


def middle_leaf(db, table: str) -> int:
    leaves = dbdamage.pages(db, table)
    assert len(leaves) >= 3, (table, leaves)
    return leaves[len(leaves) // 2]


def test_salvage_brings_back_every_file_whose_rows_survived(tmp_path):
    m = make_mount(tmp_path)
    m.start()
    expect = {}
    try:
        for d in range(5):
            (m.mnt / f"d{d}").mkdir()
            for i in range(150):
                expect[f"/d{d}/f{i:03}"] = f"d{d}/f{i:03}\n".encode() * (i + 1)
                (m.mnt / f"d{d}" / f"f{i:03}").write_bytes(expect[f"/d{d}/f{i:03}"])
        p = hafs("fsck", "--home", m.home, "--salvage", check=False)
        assert p.returncode == 8 and "unmount it before" in p.stderr, p.stderr
    finally:
        m.stop()
    db = m.home / "meta.db"
    sqlite3.connect(db).execute("PRAGMA wal_checkpoint(TRUNCATE)").close()
    dbdamage.damage(db, [middle_leaf(db, t) for t in ("inodes", "dentries", "extents", "blocks")])

    p = hafs("fsck", "--home", m.home, "--salvage", "--json", check=False)
    assert p.returncode == 1, p.stdout + p.stderr  # errors corrected
    report = json.loads(p.stdout)
    problems = report["problems"]
    assert problems["database_damaged"]["repaired"] == 1
    assert {"dangling_entry", "orphan_inode", "missing_block_row"} <= problems.keys()
    assert all(v["left"] == 0 for v in problems.values()), problems
    kept = list(m.home.glob("meta.db.damaged-*[0-9]"))
    assert len(kept) == 1 and any(str(kept[0]) in n for n in report["notes"])
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()
    salvaged = SqliteMeta.open(db)
    own = salvaged.owner()  # it kept the owner token the nodes know: their owner still
    salvaged.close()
    assert own.token and own.copy_of is None and own.moved_from is None
    nodes = sorted((m.home / "nodes").iterdir())
    assert nodes and all(
        json.loads((n / "hafs-node.json").read_text())["owner"] == own.token for n in nodes
    )
    lost = {d.split(":")[0] for d in problems["dangling_entry"]["details"]}
    suspects = {
        path
        for n in report["notes"]
        if n.startswith("files with extents or xattrs on damaged pages")
        for path in n.split(": ", 1)[1].split(", ")
    }
    assert suspects, report["notes"]

    m.start()  # the salvaged filesystem mounts
    try:
        # files (and directories) whose entry was lost are in /lost+found, whole
        found = [f.read_bytes() for f in (m.mnt / "lost+found").rglob("*") if f.is_file()]
        assert found and all(data in expect.values() for data in found)
        survived = 0
        for path, data in expect.items():
            f = m.mnt / path[1:]
            if not f.exists():
                assert path in lost or data in found, f"{path} is gone and not reported"
            elif f.read_bytes() != data:
                assert path in suspects, f"{path} reads wrong bytes and is not named"
            else:
                survived += 1
        whole = survived + len(found)  # about 130 rows were on the damaged pages
        assert whole >= len(expect) - 150 and survived >= len(expect) / 2, (survived, len(found))
        (m.mnt / "after").write_bytes(b"the salvaged filesystem takes changes")
    finally:
        m.stop()
    assert not m.bad_log_lines()
    p = hafs("fsck", "--home", m.home, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
