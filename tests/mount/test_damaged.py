"""A damaged metadata database: refused with one clear line before anything is written;
damage met while serving stops the changes (EROFS), logged once, with what to do."""

from __future__ import annotations

import errno
import os
import sqlite3

import pytest
from conftest import hafs, make_mount

from hafs.errors import MetaDamaged
from hafs.meta import ROOT_INODE
from hafs.meta.sqlite import SqliteMeta


def damage_pages(db_path, first_page: int = 2) -> None:
    """Overwrite the middle of every page from `first_page` on with garbage (the header
    and the schema page stay readable, so the file still opens as a hafs database)."""
    page = sqlite3.connect(db_path).execute("PRAGMA page_size").fetchone()[0]
    size = os.path.getsize(db_path)
    with open(db_path, "r+b") as f:
        for n in range(first_page - 1, size // page):
            f.seek(n * page + 8)
            f.write(b"\xa5" * (page // 2))


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
