"""MetaStore: the filesystem's metadata in SQLite (WAL).

The schema below is the documentation of what hafs records.  Invariants it
keeps (DESIGN.md):

- Inode numbers are never reused (AUTOINCREMENT), so a handle the kernel still
  holds can never point at a new file.
- An extent is written only after its block is durable on the replicas
  (the caller stores first, then calls `replace_extents`): data before metadata.
- `blocks.refcount` equals the number of extents pointing at the block, and is
  changed in the same transaction as the extents.

Concurrency: one MetaStore is used from the trio thread only.  Every public
method is one transaction and contains no await, so no other task can observe
or interleave with a half-done change.  Queries are indexed point or range
lookups (tens of microseconds), cheap enough for the trio loop; the WAL is
fsync'd explicitly by `sync()` (called from fsync()) in a worker thread.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import LockLost, UserError

SCHEMA_VERSION = 3
DEGRADED_SCHEMA = 3  # the first schema with the table of degraded blocks
APPLICATION_ID = 0x68616673  # "hafs": marks a SQLite file as a hafs metadata database
ROOT_INODE = 1

SCHEMA = """
-- Key/value settings of the filesystem.  Keys: fs_uuid, replicas (R),
-- ring (JSON: {"version": N, "nodes": [{id, address, weight, zone, state}]}),
-- ring_changed_ns (when the ring last got a new version; absent: at mkfs),
-- created_ns.
CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- One row per file, directory, symlink or special file.
CREATE TABLE inodes (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused (see AUTOINCREMENT)
    mode     INTEGER NOT NULL,                   -- st_mode: type and permission bits
    uid      INTEGER NOT NULL,
    gid      INTEGER NOT NULL,
    nlink    INTEGER NOT NULL,                   -- 0: unlinked, kept while open on a mount
    size     INTEGER NOT NULL DEFAULT 0,         -- bytes; past the last extent: a hole
    atime_ns INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    rdev     INTEGER NOT NULL DEFAULT 0,         -- device number of block/char special files
    target   BLOB,                               -- symlink target; NULL for anything else
    fence_token INTEGER NOT NULL DEFAULT 0       -- newest write-lock token; older are refused
);

-- Directory entries.  `id` is the readdir cursor: entries are listed in id
-- order, so a cursor survives concurrent creates and deletes.
CREATE TABLE dentries (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    parent INTEGER NOT NULL REFERENCES inodes(id),
    name   BLOB NOT NULL,
    inode  INTEGER NOT NULL REFERENCES inodes(id),
    UNIQUE (parent, name)
);
CREATE INDEX dentries_inode ON dentries(inode);

-- A file's content: the block `block_id` supplies bytes [offset, offset+length)
-- of the file from its own bytes [0, length).  length <= the block's size (a
-- truncate may keep a prefix).  Extents never overlap; bytes of the file that
-- no extent covers are a hole and read as zeros.
CREATE TABLE extents (
    inode    INTEGER NOT NULL REFERENCES inodes(id),
    offset   INTEGER NOT NULL,
    length   INTEGER NOT NULL,
    block_id TEXT NOT NULL REFERENCES blocks(id),
    PRIMARY KEY (inode, offset)
) WITHOUT ROWID;
CREATE INDEX extents_block ON extents(block_id);

-- Every block some extent references, or referenced until recently.
CREATE TABLE blocks (
    id            TEXT PRIMARY KEY,    -- BLAKE3-256 of the content, 64 lower-case hex digits
    size          INTEGER NOT NULL,    -- bytes
    refcount      INTEGER NOT NULL,    -- number of extents pointing here
    zero_since_ns INTEGER              -- refcount 0 since then (garbage after a grace); else NULL
) WITHOUT ROWID;
CREATE INDEX blocks_garbage ON blocks(zero_since_ns) WHERE refcount = 0;

-- Write locks (the embedded LockService, hafs/meta/locks.py).  A row stays when
-- its lock is free, so `token` only grows.  holder NULL: free.
CREATE TABLE locks (
    name        TEXT PRIMARY KEY,   -- "inode:<number>"
    holder      TEXT,               -- "host:pid:mountpoint" of the mount holding it
    token       INTEGER NOT NULL,   -- fencing token of the newest grant
    acquired_ns INTEGER,
    expires_ns  INTEGER             -- the lease ends then unless renewed (wall clock)
) WITHOUT ROWID;

CREATE TABLE xattrs (
    inode INTEGER NOT NULL REFERENCES inodes(id),
    name  BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (inode, name)
) WITHOUT ROWID;

-- Blocks stored with fewer than R copies or off the nodes the ring names (a
-- node was down or failed the write), until a repair puts them right.
CREATE TABLE degraded (
    id       TEXT PRIMARY KEY,  -- the block
    nodes    TEXT NOT NULL,     -- space-separated ids of the nodes its copies went to
    since_ns INTEGER NOT NULL   -- first recorded
) WITHOUT ROWID;
"""

# Each entry upgrades a database of that version to the next one.
MIGRATIONS = {
    1: """
    ALTER TABLE inodes ADD COLUMN fence_token INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE locks (
        name TEXT PRIMARY KEY, holder TEXT, token INTEGER NOT NULL,
        acquired_ns INTEGER, expires_ns INTEGER
    ) WITHOUT ROWID;
    """,
    2: """
    CREATE TABLE degraded (
        id TEXT PRIMARY KEY, nodes TEXT NOT NULL, since_ns INTEGER NOT NULL
    ) WITHOUT ROWID;
    """,
}

_INODE_COLS = "id, mode, uid, gid, nlink, size, atime_ns, mtime_ns, ctime_ns, rdev, target"


@dataclass
class Inode:
    id: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int
    target: bytes | None


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    block_id: str

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class Dentry:
    cursor: int
    name: bytes
    inode: int


def now_ns() -> int:
    return time.time_ns()


class MetaStore:
    """The metadata database of one filesystem (see the module docstring)."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self.db = db
        self.path = path

    # ---------------------------------------------------------------- opening

    @classmethod
    def create(
        cls, path: Path, settings: dict[str, str], root_uid: int, root_gid: int
    ) -> MetaStore:
        """Create a new database at `path` (which must not exist) with a root directory."""
        if path.exists():
            raise UserError(f"{path} already exists: this home already holds a filesystem")
        db = _connect(path)
        try:
            db.executescript(SCHEMA)
            with transaction(db):
                db.executemany("INSERT INTO settings VALUES (?, ?)", settings.items())
                t = now_ns()
                db.execute(
                    "INSERT INTO inodes (id, mode, uid, gid, nlink, atime_ns, mtime_ns, ctime_ns)"
                    " VALUES (?, ?, ?, ?, 2, ?, ?, ?)",
                    (ROOT_INODE, 0o40755, root_uid, root_gid, t, t, t),
                )
                db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            db.close()
            path.unlink(missing_ok=True)
            raise
        return cls(db, path)

    @classmethod
    def open(cls, path: Path, read_only: bool = False) -> MetaStore:
        """Open an existing database, refusing (without modifying it) anything but ours.

        read_only: a connection that cannot write (a `-o ro` mount); an older schema
        is then refused instead of upgraded."""
        if not path.exists():
            raise UserError(f"metadata database {path} is missing: run 'hafs mkfs' to create one")
        try:
            db = _connect(path, check_only=True)
            app_id = db.execute("PRAGMA application_id").fetchone()[0]
            version = db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise UserError(
                f"metadata database {path} is damaged ({e}): restore it from a backup"
                " or run 'hafs fsck'"
            ) from None
        if app_id != APPLICATION_ID:
            db.close()
            raise UserError(f"{path} is not a hafs metadata database (application id {app_id:#x})")
        if version > SCHEMA_VERSION:
            db.close()
            raise UserError(
                f"metadata database {path} has schema version {version}, newer than this hafs"
                f" understands ({SCHEMA_VERSION}): upgrade hafs"
            )
        db.close()
        if read_only and version < SCHEMA_VERSION:
            raise UserError(
                f"metadata database {path} has schema version {version}: mount it read-write"
                f" once to upgrade it to {SCHEMA_VERSION}"
            )
        db = _connect(path, read_only=read_only)
        while version < SCHEMA_VERSION:
            step, nxt = MIGRATIONS[version], version + 1
            db.executescript(f"BEGIN IMMEDIATE; {step}; PRAGMA user_version = {nxt}; COMMIT;")
            version += 1
        return cls(db, path)

    def close(self) -> None:
        self.db.close()

    def sync(self) -> None:
        """Make every committed transaction durable (fsync the WAL). Blocking: call in a thread."""
        wal = Path(str(self.path) + "-wal")
        try:
            fd = os.open(wal, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @contextmanager
    def txn(self) -> Iterator[sqlite3.Connection]:
        with transaction(self.db):
            yield self.db

    # --------------------------------------------------------------- settings

    def setting(self, key: str) -> str:
        row = self.db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise UserError(f"metadata database {self.path} lacks setting {key!r}: run 'hafs fsck'")
        return row[0]

    def setting_or(self, key: str, default: str | None) -> str | None:
        row = self.db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def ring_json(self) -> dict:
        return json.loads(self.setting("ring"))

    def replace_ring(self, ring: dict, expect_version: int) -> bool:
        """Store a new ring description if the stored one still has `expect_version`.

        One transaction: the ring and ring_changed_ns change together, and a
        concurrent change (another `hafs node` or rebalance) makes this return False.
        """
        with self.txn():
            if self.ring_json().get("version") != expect_version:
                return False
            self.db.execute("UPDATE settings SET value = ? WHERE key = 'ring'", (json.dumps(ring),))
            self.db.execute(
                "INSERT OR REPLACE INTO settings VALUES ('ring_changed_ns', ?)", (str(now_ns()),)
            )
        return True

    # ----------------------------------------------------------------- inodes

    def get_inode(self, ino: int) -> Inode | None:
        row = self.db.execute(f"SELECT {_INODE_COLS} FROM inodes WHERE id = ?", (ino,)).fetchone()
        return Inode(*row) if row else None

    def create_inode(
        self, mode: int, uid: int, gid: int, nlink: int, rdev: int = 0, target: bytes | None = None
    ) -> int:
        """Insert an inode (no transaction of its own: call inside txn())."""
        t = now_ns()
        cur = self.db.execute(
            "INSERT INTO inodes (mode, uid, gid, nlink, size, atime_ns, mtime_ns, ctime_ns, rdev,"
            " target) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (mode, uid, gid, nlink, len(target) if target else 0, t, t, t, rdev, target),
        )
        return cur.lastrowid

    def update_inode(self, ino: int, **fields: int) -> None:
        """Set inode columns (no transaction of its own)."""
        cols = ", ".join(f"{k} = ?" for k in fields)
        self.db.execute(f"UPDATE inodes SET {cols} WHERE id = ?", (*fields.values(), ino))

    def add_nlink(self, ino: int, delta: int, ctime_ns: int) -> None:
        self.db.execute(
            "UPDATE inodes SET nlink = nlink + ?, ctime_ns = ? WHERE id = ?", (delta, ctime_ns, ino)
        )

    def unlinked_inodes(self) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT id FROM inodes WHERE nlink = 0")]

    def delete_inode(self, ino: int) -> None:
        """Remove an inode with no entries left: its extents (releasing blocks), xattrs, row."""
        with self.txn():
            self._drop_extents(ino, 0, None)
            self.db.execute("DELETE FROM xattrs WHERE inode = ?", (ino,))
            self.db.execute("DELETE FROM inodes WHERE id = ?", (ino,))

    def count_inodes(self) -> int:
        return self.db.execute("SELECT count(*) FROM inodes").fetchone()[0]

    # --------------------------------------------------------------- dentries

    def lookup(self, parent: int, name: bytes) -> int | None:
        row = self.db.execute(
            "SELECT inode FROM dentries WHERE parent = ? AND name = ?", (parent, name)
        ).fetchone()
        return row[0] if row else None

    def add_entry(self, parent: int, name: bytes, ino: int) -> None:
        self.db.execute(
            "INSERT INTO dentries (parent, name, inode) VALUES (?, ?, ?)", (parent, name, ino)
        )

    def remove_entry(self, parent: int, name: bytes) -> None:
        self.db.execute("DELETE FROM dentries WHERE parent = ? AND name = ?", (parent, name))

    def set_entry(self, parent: int, name: bytes, ino: int) -> None:
        """Point an existing entry at another inode (rename over an existing name)."""
        self.db.execute(
            "UPDATE dentries SET inode = ? WHERE parent = ? AND name = ?", (ino, parent, name)
        )

    def parent_of(self, ino: int) -> int | None:
        row = self.db.execute(
            "SELECT parent FROM dentries WHERE inode = ? LIMIT 1", (ino,)
        ).fetchone()
        return row[0] if row else None

    def has_entries(self, parent: int) -> bool:
        return (
            self.db.execute("SELECT 1 FROM dentries WHERE parent = ? LIMIT 1", (parent,)).fetchone()
            is not None
        )

    def readdir(self, parent: int, after: int, limit: int) -> list[Dentry]:
        rows = self.db.execute(
            "SELECT id, name, inode FROM dentries WHERE parent = ? AND id > ? ORDER BY id LIMIT ?",
            (parent, after, limit),
        )
        return [Dentry(*r) for r in rows]

    # ---------------------------------------------------------------- extents

    def extents(self, ino: int, start: int, end: int) -> list[Extent]:
        """Extents overlapping [start, end), in offset order."""
        first = self.db.execute(
            "SELECT offset, length, block_id FROM extents WHERE inode = ? AND offset <= ?"
            " ORDER BY offset DESC LIMIT 1",
            (ino, start),
        ).fetchone()
        out = [Extent(*first)] if first and first[0] + first[1] > start else []
        out.extend(
            Extent(*r)
            for r in self.db.execute(
                "SELECT offset, length, block_id FROM extents WHERE inode = ? AND offset > ?"
                " AND offset < ? ORDER BY offset",
                (ino, start, end),
            )
        )
        return out

    def replace_extents(
        self,
        ino: int,
        start: int,
        end: int,
        new: list[Extent],
        sizes: dict[str, int],
        size: int,
        mtime_ns: int,
        token: int | None = None,
    ) -> None:
        """Replace the file's content in [start, end) by `new`, and set its size.

        Every old extent must lie wholly inside [start, end) or outside it (the
        caller widens the range to extent edges).  `sizes` gives the stored size
        of each new block.  One transaction: extents and refcounts change together.
        With a write-lock `token`, the change is refused (LockLost) unless the
        token is at least the newest one recorded for the inode.
        """
        with self.txn():
            if token is not None:
                self.fence(ino, token)
            self._drop_extents(ino, start, end)
            for e in new:
                self._ref_block(e.block_id, sizes[e.block_id])
            self.db.executemany(
                "INSERT INTO extents (inode, offset, length, block_id) VALUES (?, ?, ?, ?)",
                [(ino, e.offset, e.length, e.block_id) for e in new],
            )
            self.db.execute(
                "UPDATE inodes SET size = ?, mtime_ns = ?, ctime_ns = ? WHERE id = ?",
                (size, mtime_ns, max(mtime_ns, now_ns()), ino),
            )

    def truncate(self, ino: int, size: int, mtime_ns: int, token: int | None = None) -> None:
        """Set the size; extents past it are dropped and one straddling it is shortened."""
        with self.txn():
            if token is not None:
                self.fence(ino, token)
            self._drop_extents(ino, size, None)
            row = self.db.execute(
                "SELECT offset, length FROM extents WHERE inode = ? AND offset < ?"
                " ORDER BY offset DESC LIMIT 1",
                (ino, size),
            ).fetchone()
            if row and row[0] + row[1] > size:
                self.db.execute(
                    "UPDATE extents SET length = ? WHERE inode = ? AND offset = ?",
                    (size - row[0], ino, row[0]),
                )
            self.db.execute(
                "UPDATE inodes SET size = ?, mtime_ns = ?, ctime_ns = ? WHERE id = ?",
                (size, mtime_ns, mtime_ns, ino),
            )

    def fence(self, ino: int, token: int) -> None:
        """Record `token` as the inode's newest; LockLost if a newer one is recorded."""
        cur = self.db.execute(
            "UPDATE inodes SET fence_token = ? WHERE id = ? AND fence_token <= ?",
            (token, ino, token),
        )
        if cur.rowcount != 1:
            row = self.db.execute("SELECT fence_token FROM inodes WHERE id = ?", (ino,)).fetchone()
            raise LockLost(
                f"inode {ino}: write token {token} refused, "
                + (f"a newer writer holds token {row[0]}" if row else "the file was deleted")
            )

    def path_of(self, ino: int) -> str:
        """One path of the inode (for messages), or '<inode N>' when it has no name."""
        parts = []
        while ino != ROOT_INODE and len(parts) < 256:
            row = self.db.execute(
                "SELECT parent, name FROM dentries WHERE inode = ? LIMIT 1", (ino,)
            ).fetchone()
            if row is None:
                return f"<inode {ino}>" + ("/" + "/".join(reversed(parts)) if parts else "")
            ino = row[0]
            parts.append(row[1].decode(errors="replace"))
        return "/" + "/".join(reversed(parts))

    def _drop_extents(self, ino: int, start: int, end: int | None) -> None:
        """Delete extents starting in [start, end) and release their blocks (inside a txn)."""
        cond = "inode = ? AND offset >= ?" + ("" if end is None else " AND offset < ?")
        args = (ino, start) if end is None else (ino, start, end)
        rows = self.db.execute(f"SELECT block_id FROM extents WHERE {cond}", args).fetchall()
        if not rows:
            return
        self.db.execute(f"DELETE FROM extents WHERE {cond}", args)
        t = now_ns()
        self.db.executemany(
            "UPDATE blocks SET refcount = refcount - 1,"
            " zero_since_ns = CASE WHEN refcount = 1 THEN ? ELSE NULL END WHERE id = ?",
            [(t, r[0]) for r in rows],
        )

    def _ref_block(self, block_id: str, size: int) -> None:
        self.db.execute(
            "INSERT INTO blocks (id, size, refcount) VALUES (?, ?, 1)"
            " ON CONFLICT(id) DO UPDATE SET refcount = refcount + 1, zero_since_ns = NULL",
            (block_id, size),
        )

    # ----------------------------------------------------------------- blocks

    def garbage_blocks(self, before_ns: int, limit: int) -> list[str]:
        """Blocks no extent has referenced since before `before_ns`."""
        rows = self.db.execute(
            "SELECT id FROM blocks WHERE refcount = 0 AND zero_since_ns < ? LIMIT ?",
            (before_ns, limit),
        )
        return [r[0] for r in rows]

    def forget_block(self, block_id: str) -> bool:
        """Drop the row of an unreferenced block; False if it is referenced again."""
        with self.txn():
            cur = self.db.execute("DELETE FROM blocks WHERE id = ? AND refcount = 0", (block_id,))
            if cur.rowcount == 1:
                self.db.execute("DELETE FROM degraded WHERE id = ?", (block_id,))
            return cur.rowcount == 1

    def record_degraded(self, block_id: str, nodes: list[str]) -> None:
        """Note a block whose copies went to `nodes`, not (all) where the ring says."""
        with self.txn():
            row = self.db.execute("SELECT nodes FROM degraded WHERE id = ?", (block_id,)).fetchone()
            known = row[0].split() if row else []
            self.db.execute(
                "INSERT INTO degraded (id, nodes, since_ns) VALUES (?, ?, ?)"
                " ON CONFLICT(id) DO UPDATE SET nodes = excluded.nodes",
                (block_id, " ".join(sorted({*known, *nodes})), now_ns()),
            )

    def degraded_blocks(self, after: str, limit: int) -> list[tuple[str, list[str]]]:
        """Up to `limit` recorded degraded blocks with ids after `after`: (id, nodes)."""
        rows = self.db.execute(
            "SELECT id, nodes FROM degraded WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
        )
        return [(bid, nodes.split()) for bid, nodes in rows]

    def forget_degraded(self, block_id: str) -> None:
        """The block is where the ring says again."""
        with self.txn():
            self.db.execute("DELETE FROM degraded WHERE id = ?", (block_id,))

    def clear_degraded(self, keep: set[str]) -> int:
        """Forget every recorded degraded block but those in `keep` (after a full repair)."""
        with self.txn():
            ids = [r[0] for r in self.db.execute("SELECT id FROM degraded")]
            gone = [(bid,) for bid in ids if bid not in keep]
            self.db.executemany("DELETE FROM degraded WHERE id = ?", gone)
        return len(gone)

    def count_degraded(self) -> int:
        return self.db.execute("SELECT count(*) FROM degraded").fetchone()[0]

    def usage(self) -> tuple[int, int, int]:
        """(logical bytes in files, stored bytes of referenced blocks, referenced block count)."""
        logical = self.db.execute("SELECT coalesce(sum(length), 0) FROM extents").fetchone()[0]
        stored, count = self.db.execute(
            "SELECT coalesce(sum(size), 0), count(*) FROM blocks WHERE refcount > 0"
        ).fetchone()
        return logical, stored, count

    # ----------------------------------------------------------------- xattrs

    def get_xattr(self, ino: int, name: bytes) -> bytes | None:
        row = self.db.execute(
            "SELECT value FROM xattrs WHERE inode = ? AND name = ?", (ino, name)
        ).fetchone()
        return row[0] if row else None

    def set_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        self.db.execute("INSERT OR REPLACE INTO xattrs VALUES (?, ?, ?)", (ino, name, value))

    def remove_xattr(self, ino: int, name: bytes) -> bool:
        cur = self.db.execute("DELETE FROM xattrs WHERE inode = ? AND name = ?", (ino, name))
        return cur.rowcount == 1

    def list_xattrs(self, ino: int) -> list[bytes]:
        return [r[0] for r in self.db.execute("SELECT name FROM xattrs WHERE inode = ?", (ino,))]


def _connect(path: Path, check_only: bool = False, read_only: bool = False) -> sqlite3.Connection:
    if read_only:  # WAL is the database's mode already; a reader only needs the busy timeout
        db = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
        db.execute("PRAGMA busy_timeout = 10000")
        return db
    if check_only:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()  # raises on a non-database
        return db
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")  # commits survive a crash; sync() makes them durable
    db.execute("PRAGMA foreign_keys = OFF")  # integrity is kept by the code and checked by fsck
    db.execute("PRAGMA busy_timeout = 10000")
    return db


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    if db.in_transaction:  # nested: part of the caller's transaction
        yield
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
