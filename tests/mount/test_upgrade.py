"""A filesystem whose metadata has the previous code's schema (3) mounts after the upgrade
in place, with every file, attribute, xattr, lock token and degraded record intact."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

from conftest import hafs, make_mount

from hafs.meta.sqlite import APPLICATION_ID, SCHEMA_VERSION

SCHEMA3 = Path(__file__).parent.parent / "meta" / "schema3.sql"
TABLES3 = ("settings", "inodes", "dentries", "extents", "blocks", "locks", "xattrs", "degraded")


def rewrite_as_schema3(db_path: Path) -> None:
    """Replace the database by one made with schema 3's own SQL, holding the same rows."""
    old = db_path.with_suffix(".v4")
    db_path.rename(old)
    for suffix in ("-wal", "-shm"):
        Path(str(db_path) + suffix).unlink(missing_ok=True)
    db = sqlite3.connect(db_path, isolation_level=None)
    db.executescript(SCHEMA3.read_text())
    db.execute("ATTACH ? AS v4", (str(old),))
    db.execute("BEGIN")
    for table in TABLES3:
        db.execute(f"INSERT INTO main.{table} SELECT * FROM v4.{table}")
    db.execute("DELETE FROM main.settings WHERE key GLOB 'owner*'")  # the old code had no owners
    db.execute("COMMIT")
    db.execute("DETACH v4")
    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    db.execute("PRAGMA user_version = 3")
    db.close()
    old.unlink()


def test_a_schema_3_filesystem_mounts_after_the_upgrade_with_everything_intact(tmp_path):
    m = make_mount(tmp_path)
    m.start()
    try:
        data = os.urandom(3_000_000)
        (m.mnt / "d").mkdir()
        (m.mnt / "d" / "f").write_bytes(data)
        os.chmod(m.mnt / "d" / "f", 0o640)
        os.utime(m.mnt / "d" / "f", ns=(1_600_000_000 * 10**9, 1_700_000_000 * 10**9))
        os.setxattr(m.mnt / "d" / "f", "user.k", b"v")
        os.symlink("d/f", m.mnt / "link")
        os.link(m.mnt / "d" / "f", m.mnt / "hard")
        before = os.stat(m.mnt / "d" / "f")
    finally:
        m.stop()
    db_path = m.home / "meta.db"
    db = sqlite3.connect(db_path, isolation_level=None)
    ino = before.st_ino
    # a write lock's token and the inode's fence (as a writer on the old code left them),
    # and a degraded record
    db.execute("UPDATE inodes SET fence_token = 41 WHERE id = ?", (ino,))
    db.execute("INSERT OR REPLACE INTO locks VALUES (?, NULL, 41, NULL, NULL)", (f"inode:{ino}",))
    bid = db.execute("SELECT block_id FROM extents WHERE inode = ? LIMIT 1", (ino,)).fetchone()[0]
    db.execute("INSERT INTO degraded VALUES (?, 'n1 n2', 1)", (bid,))
    db.close()
    rewrite_as_schema3(db_path)
    for node in m.node_dirs():  # nor did its nodes record one
        ident = json.loads((node / "hafs-node.json").read_text())
        del ident["owner"], ident["owner_where"]
        (node / "hafs-node.json").write_text(json.dumps(ident))
    db = sqlite3.connect(db_path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 3
    assert not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'sessions'").fetchone()
    db.close()

    m.options = "gc_grace_s=3600,repair_interval_s=0"  # keep the degraded record as it is
    m.start()
    try:
        after = os.stat(m.mnt / "d" / "f")
        assert (m.mnt / "d" / "f").read_bytes() == data
        assert (after.st_ino, after.st_mode, after.st_nlink, after.st_mtime_ns) == (
            before.st_ino,
            before.st_mode,
            2,
            1_700_000_000 * 10**9,
        )
        assert os.getxattr(m.mnt / "d" / "f", "user.k") == b"v"
        assert os.readlink(m.mnt / "link") == "d/f"
        assert os.stat(m.mnt / "hard").st_ino == ino
        (m.mnt / "d" / "f").write_bytes(b"new")  # a writer after the upgrade: a newer token
        assert (m.mnt / "d" / "f").read_bytes() == b"new"
    finally:
        m.stop()
    db = sqlite3.connect(db_path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        token = db.execute("SELECT token FROM locks WHERE name = ?", (f"inode:{ino}",)).fetchone()
        fence = db.execute("SELECT fence_token FROM inodes WHERE id = ?", (ino,)).fetchone()
        assert token[0] == 42 and fence[0] == 42, "the token went on from the old one"
        assert db.execute("SELECT nodes FROM degraded WHERE id = ?", (bid,)).fetchone() == (
            "n1 n2",
        )
        owner = db.execute("SELECT value FROM settings WHERE key = 'owner'").fetchone()[0]
    finally:
        db.close()
    for node in m.node_dirs():  # taken by the first store that changed them: this one
        assert json.loads((node / "hafs-node.json").read_text())["owner"] == owner
    assert not m.bad_log_lines()
    p = hafs("fsck", "--home", m.home, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
