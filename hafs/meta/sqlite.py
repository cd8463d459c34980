"""The `sqlite` metadata engine: one SQLite file (WAL), the embedded default.

The schema below is the documentation of what this engine records.  Invariants
it keeps (DESIGN.md):

- Inode numbers are never reused (AUTOINCREMENT), so a handle the kernel still
  holds can never point at a new file.
- An extent is written only after its block is durable on the replicas
  (the caller stores first, then calls `commit`): data before metadata.
- `blocks.refcount` equals the number of extents pointing at the block, and is
  changed in the same transaction as the extents.

Every operation of the interface (hafs/meta/__init__.py) is one transaction:
`BEGIN IMMEDIATE` takes SQLite's write lock before the checks, so the checks
and the change they guard are atomic with respect to every other mount of the
filesystem (every process on this host), and a race gives the POSIX answer.
Read-only operations are single statements (each its own snapshot).

Concurrency: one SqliteMeta is used from one thread at a time (the mount's
trio thread; `direct = True`: the queries are indexed point or range lookups,
tens of microseconds).  The WAL is fsync'd explicitly by `sync()` (called from
fsync(), in a worker thread).  Other processes (other mounts, fsck) have their
own connections; `busy_timeout` makes them wait for each other's short
transactions.
"""

from __future__ import annotations

import errno
import functools
import inspect
import json
import logging
import os
import secrets
import socket
import sqlite3
import stat
import time
from collections.abc import Callable, Container, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from .. import __version__
from ..errors import FsError, LockLost, MetaDamaged, UserError
from . import (
    CHANGEABLE_CONFIG,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT_INODE,
    BlockRow,
    Degraded,
    Dentry,
    Entry,
    Extent,
    FileExtent,
    FsConfig,
    FsState,
    Inode,
    Owner,
    Record,
    SessionInfo,
    Usage,
    Xattr,
    check_config_changes,
    check_name,
    check_xattr,
    now_ns,
    session_conflict,
)
from .locks import CreatedGrants, Lease, LockInfo, default_holder, wait_for

log = logging.getLogger(__name__)

SCHEMA_VERSION = 4
OWNERS_KEPT = 16  # earlier owner tokens remembered (a node down at an adopt has one)
DEGRADED_SCHEMA = 3  # the first schema with the table of degraded blocks
CREATED_TOKEN = 1  # the first grant of a new inode's lock (inode numbers are never reused)
APPLICATION_ID = 0x68616673  # "hafs": marks a SQLite file as a hafs metadata database
RECOVER_HINT = (
    "stop every mount, then run 'hafs fsck --home {home} --salvage': it reads what can be read"
    " of meta.db into a new database (keeping the damaged file as meta.db.damaged-TIME) and"
    " repairs the filesystem; or load a dump made by 'hafs meta dump' into a new home"
)

SCHEMA = """
-- Key/value settings of the filesystem.  Keys: fs_uuid, replicas (R),
-- write_quorum (W; absent: a majority of R), node_token (the nodes' bearer
-- token; absent: none), ca_pem (the CA, PEM, the nodes' TLS certificates are
-- checked against; absent: the system's CAs), ring (JSON: {"version": N,
-- "nodes": [{id, address, weight, zone, state}]}), ring_changed_ns (when the
-- ring last got a new version; absent: at mkfs), created_ns, owner (the owner
-- token the nodes record: hafs.store.owner; absent in a store made before owners,
-- until it first changes its nodes), owner_previous (JSON list of the tokens held
-- before), owner_file (JSON {"dev", "ino", "path"}: this database file when it got
-- its token, so that a copy of it knows itself a copy).
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

-- Mount sessions (the Sessions interface): which mounts of the filesystem are
-- alive, and which fsck repairs it.  A session ends by `end` or when its lease
-- runs out (expires_ns, wall clock) without renewal: its mount died.
CREATE TABLE sessions (
    id         TEXT PRIMARY KEY,   -- "host:pid:random"
    kind       TEXT NOT NULL,      -- "mount", "rebalance" or "repair"
    host       TEXT NOT NULL,
    mountpoint TEXT NOT NULL,      -- '' for a repair
    pid        INTEGER NOT NULL,
    version    TEXT NOT NULL,      -- hafs version of the session's process
    since_ns   INTEGER NOT NULL,
    expires_ns INTEGER NOT NULL
) WITHOUT ROWID;

-- Inodes whose last name went while a session had them open: deleted by that
-- session at its last close, or by whoever reaps the session when it died.
CREATE TABLE orphans (
    inode   INTEGER PRIMARY KEY,
    session TEXT NOT NULL
);
"""

COUNTERS = """
-- Running totals for statfs (usage()), kept by the triggers below in the same
-- transaction as every change of blocks and extents, whoever makes it (fsck too):
-- stored_bytes/stored_blocks = sum(size)/count(*) of blocks with refcount > 0,
-- logical_bytes = sum(length) of extents, inodes = count(*) of inodes.
CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TRIGGER blocks_added AFTER INSERT ON blocks WHEN NEW.refcount > 0 BEGIN
    UPDATE counters SET value = value + NEW.size WHERE name = 'stored_bytes';
    UPDATE counters SET value = value + 1 WHERE name = 'stored_blocks';
END;
CREATE TRIGGER blocks_removed AFTER DELETE ON blocks WHEN OLD.refcount > 0 BEGIN
    UPDATE counters SET value = value - OLD.size WHERE name = 'stored_bytes';
    UPDATE counters SET value = value - 1 WHERE name = 'stored_blocks';
END;
CREATE TRIGGER blocks_changed AFTER UPDATE OF refcount, size ON blocks
WHEN (OLD.refcount > 0) != (NEW.refcount > 0) OR OLD.size != NEW.size BEGIN
    UPDATE counters SET value = value + (NEW.refcount > 0) * NEW.size
        - (OLD.refcount > 0) * OLD.size WHERE name = 'stored_bytes';
    UPDATE counters SET value = value + (NEW.refcount > 0) - (OLD.refcount > 0)
        WHERE name = 'stored_blocks';
END;
CREATE TRIGGER extents_added AFTER INSERT ON extents BEGIN
    UPDATE counters SET value = value + NEW.length WHERE name = 'logical_bytes';
END;
CREATE TRIGGER extents_removed AFTER DELETE ON extents BEGIN
    UPDATE counters SET value = value - OLD.length WHERE name = 'logical_bytes';
END;
CREATE TRIGGER extents_changed AFTER UPDATE OF length ON extents BEGIN
    UPDATE counters SET value = value + NEW.length - OLD.length WHERE name = 'logical_bytes';
END;
CREATE TRIGGER inodes_added AFTER INSERT ON inodes BEGIN
    UPDATE counters SET value = value + 1 WHERE name = 'inodes';
END;
CREATE TRIGGER inodes_removed AFTER DELETE ON inodes BEGIN
    UPDATE counters SET value = value - 1 WHERE name = 'inodes';
END;
"""
FILL_COUNTERS = """
INSERT INTO counters SELECT 'stored_bytes', coalesce(sum(size), 0) FROM blocks WHERE refcount > 0;
INSERT INTO counters SELECT 'stored_blocks', count(*) FROM blocks WHERE refcount > 0;
INSERT INTO counters SELECT 'logical_bytes', coalesce(sum(length), 0) FROM extents;
INSERT INTO counters SELECT 'inodes', count(*) FROM inodes;
"""
SCHEMA += COUNTERS + FILL_COUNTERS

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
    3: """
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY, kind TEXT NOT NULL, host TEXT NOT NULL, mountpoint TEXT NOT NULL,
        pid INTEGER NOT NULL, version TEXT NOT NULL, since_ns INTEGER NOT NULL,
        expires_ns INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE orphans (inode INTEGER PRIMARY KEY, session TEXT NOT NULL);
    """
    + COUNTERS
    + FILL_COUNTERS,
}

_INODE_COLS = "id, mode, uid, gid, nlink, size, atime_ns, mtime_ns, ctime_ns, rdev, target"
_INODE_COLS_I = ", ".join(f"i.{c.strip()}" for c in _INODE_COLS.split(","))

# What a dump reads of each table, in dump order: (table, key columns, columns, the record
# a row makes).  Entries go in id order, the oldest first (a load keeps that order).
DUMP_TABLES: tuple[tuple[str, str, str, Callable[[tuple], Record]], ...] = (
    ("inodes", "id", _INODE_COLS, lambda r: Inode(*r)),
    ("dentries", "id", "parent, name, inode", lambda r: Entry(*r)),
    ("xattrs", "inode, name", "inode, name, value", lambda r: Xattr(*r)),
    ("extents", "inode, offset", "inode, offset, length, block_id",
     lambda r: FileExtent(r[0], Extent(*r[1:]))),
    ("blocks", "id", "id, size, refcount, zero_since_ns", lambda r: BlockRow(*r)),
    ("degraded", "id", "id, nodes, since_ns", lambda r: Degraded(r[0], tuple(r[1].split()), r[2])),
)  # fmt: skip

# How a load stores each kind of record: (statement, the row of a record).
_LOAD: dict[type, tuple[str, Callable[[Any], tuple]]] = {
    Inode: (
        f"INSERT INTO inodes ({_INODE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        lambda i: (i.id, i.mode, i.uid, i.gid, i.nlink, i.size, i.atime_ns, i.mtime_ns,
                   i.ctime_ns, i.rdev, i.target),
    ),
    Entry: (
        "INSERT INTO dentries (parent, name, inode) VALUES (?, ?, ?)",
        lambda e: (e.parent, e.name, e.inode),
    ),
    Xattr: ("INSERT INTO xattrs VALUES (?, ?, ?)", lambda x: (x.inode, x.name, x.value)),
    FileExtent: (
        "INSERT INTO extents (inode, offset, length, block_id) VALUES (?, ?, ?, ?)",
        lambda f: (f.inode, f.extent.offset, f.extent.length, f.extent.block_id),
    ),
    BlockRow: (
        "INSERT INTO blocks VALUES (?, ?, ?, ?)",
        lambda b: (b.id, b.size, b.refcount, b.zero_since_ns),
    ),
    Degraded: (
        "INSERT INTO degraded VALUES (?, ?, ?)",
        lambda d: (d.block_id, " ".join(d.nodes), d.since_ns),
    ),
}  # fmt: skip


def settings_of(
    config: FsConfig,
    ring: dict,
    ring_changed_ns: int = 0,
    owner: str | None = None,
    owner_previous: tuple[str, ...] = (),
) -> dict[str, str]:
    """The rows of the settings table that say `config`, `ring` and the owner token (its
    file's identity, "owner_file", is the caller's: `_file_identity`)."""
    settings = {
        "fs_uuid": config.fs_uuid,
        "replicas": str(config.replicas),
        "write_quorum": str(config.write_quorum),
        "ring": json.dumps(ring),
        "created_ns": str(config.created_ns),
    }
    for key in CHANGEABLE_CONFIG:  # absent: None
        if getattr(config, key) is not None:
            settings[key] = getattr(config, key)
    if ring_changed_ns:
        settings["ring_changed_ns"] = str(ring_changed_ns)
    if owner is not None:
        settings["owner"] = owner
    if owner_previous:
        settings["owner_previous"] = json.dumps(list(owner_previous))
    return settings


def config_of(settings: dict[str, str]) -> FsConfig:
    """The FsConfig the settings table's rows say (KeyError, ValueError: a bad setting)."""
    replicas = int(settings["replicas"])
    return FsConfig(
        fs_uuid=settings["fs_uuid"],
        replicas=replicas,
        write_quorum=int(settings.get("write_quorum", replicas // 2 + 1)),
        node_token=settings.get("node_token"),
        created_ns=int(settings.get("created_ns", 0)),
        ca_pem=settings.get("ca_pem"),
    )


def state_of(settings: dict[str, str], next_ino: int) -> FsState:
    """The FsState of a dump (KeyError, ValueError: a bad or missing setting)."""
    ring = json.loads(settings["ring"])
    if not isinstance(ring, dict):
        raise ValueError("ring")
    changed = int(settings.get("ring_changed_ns", 0))
    previous = json.loads(settings.get("owner_previous", "[]"))
    if not isinstance(previous, list) or not all(isinstance(p, str) for p in previous):
        raise ValueError("owner_previous")
    owner = settings.get("owner")
    return FsState(config_of(settings), ring, changed, next_ino, owner, tuple(previous))


def _is_dir(inode: Inode) -> bool:
    return stat.S_ISDIR(inode.mode)


class Damage:
    """Whether this client met a damaged database file; shared by the engine, its locks
    and its sessions.  The first SQLite error that is not a constraint is logged once
    (META-DAMAGED, with what to do); from then on every change is refused with EROFS,
    so nothing more is written into a damaged file."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.why: str | None = None

    def mark(self, e: sqlite3.DatabaseError) -> None:
        if self.why is None:
            self.why = f"metadata database {self.path} is damaged ({e})"
            log.error(
                "META-DAMAGED %s: no more changes are taken; unmount, then run"
                " 'hafs fsck --home %s --salvage' (it rebuilds the database from what can be"
                " read of it)",
                self.why,
                self.path.parent if self.path else "HOME",
            )


def _guarded(fn: Callable, changes: bool) -> Callable:
    """fn, with SQLite's errors of a damaged file turned into MetaDamaged (see Damage)."""

    def check(self: Any) -> None:
        if changes and self.damage.why is not None:
            raise MetaDamaged(errno.EROFS, self.damage.why)

    def failed(self: Any, e: sqlite3.DatabaseError) -> MetaDamaged:
        self.damage.mark(e)
        return MetaDamaged(errno.EIO, self.damage.why or str(e))

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def acall(self: Any, *args: Any, **kwargs: Any) -> Any:
            check(self)
            try:
                return await fn(self, *args, **kwargs)
            except sqlite3.IntegrityError:
                raise  # a bug, not damage: it keeps its traceback
            except sqlite3.DatabaseError as e:
                raise failed(self, e) from None

        return acall

    @functools.wraps(fn)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        check(self)
        try:
            return fn(self, *args, **kwargs)
        except sqlite3.IntegrityError:
            raise
        except sqlite3.DatabaseError as e:
            raise failed(self, e) from None

    return call


def _guard(reads: str, changes: str) -> Callable[[type], type]:
    """Class decorator: guard the named methods (see Damage)."""

    def deco(cls: type) -> type:
        for names, is_change in ((reads, False), (changes, True)):
            for name in names.split():
                setattr(cls, name, _guarded(getattr(cls, name), is_change))
        return cls

    return deco


@_guard(
    reads="config ring ring_changed_ns owner getattr lookup parent_of readdir unlinked_inodes"
    " path_of get_xattr list_xattrs extents allocated_bytes usage count_inodes garbage_blocks"
    " degraded_blocks count_degraded scan_inodes scan_entries scan_blocks scan_extents"
    " block_users",
    changes="replace_ring adopt mknod link unlink rmdir rename setattr delete_inode set_xattr"
    " remove_xattr fence commit truncate forget_block record_degraded forget_degraded"
    " clear_degraded",
)
class SqliteMeta:
    """The metadata database of one filesystem (see the module docstring)."""

    direct = True
    local_calls: frozenset[str] = frozenset()  # (every call is: direct)
    locks_at_create = True  # (two transactions saved: the lock row and fence go with the create)

    def __init__(
        self,
        db: sqlite3.Connection,
        path: Path,
        *,
        holder: str | None = None,
        lock_ttl_s: float = 10.0,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        """holder: this client's name in the locks (default host:pid); clock: wall-clock
        nanoseconds that end leases (tests inject one)."""
        self.db = db
        self.path = path
        self.clock = clock
        self.damage = Damage(path)
        self.schema = db.execute("PRAGMA user_version").fetchone()[0]  # as opened (or upgraded)
        self.locks = SqliteLockService(
            db, holder or default_holder(), lock_ttl_s, clock, damage=self.damage
        )
        self.sessions = SqliteSessions(self)
        self._config: FsConfig | None = None

    # ---------------------------------------------------------------- opening

    @classmethod
    def create(
        cls,
        path: Path,
        config: FsConfig,
        ring: dict,
        root_uid: int,
        root_gid: int,
        *,
        owner: str | None = None,
        **opts: Any,
    ) -> SqliteMeta:
        """Create a new database at `path` (which must not exist) with a root directory;
        `owner`: its owner token (hafs.store.owner)."""
        if path.exists():
            raise UserError(f"{path} already exists: this home already holds a filesystem")
        settings = settings_of(config, ring, owner=owner)
        db = _connect(path)
        try:
            if owner is not None:
                settings["owner_file"] = json.dumps(_file_identity(path))
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
        return cls(db, path, **opts)

    @classmethod
    def open(
        cls,
        path: Path,
        read_only: bool = False,
        as_found: bool = False,
        check_s: float = 0.0,
        **opts: Any,
    ) -> SqliteMeta:
        """Open an existing database, refusing (without modifying it) anything but ours;
        an older schema is upgraded in place.

        read_only: a connection that cannot write (a `-o ro` mount); an older schema
        is then refused instead of upgraded, unless `as_found` (fsck's check: it reads
        the database as it is, the tables an older schema lacks read as empty).
        check_s: first run SQLite's quick_check for at most that many seconds (a
        mount: 2 s, about 1 GB of database here) and refuse a damaged database
        (UserError) before anything is written to it."""
        if not path.exists():
            raise UserError(f"metadata database {path} is missing: run 'hafs mkfs' to create one")
        hint = RECOVER_HINT.format(home=path.parent)
        damaged = f"metadata database {path} is damaged ({{}}): nothing was changed; {hint}"
        try:
            db = _connect(path, check_only=True)
            app_id = db.execute("PRAGMA application_id").fetchone()[0]
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if check_s > 0 and app_id == APPLICATION_ID:
                problem = _quick_check(db, check_s)
                if problem:
                    db.close()
                    raise UserError(damaged.format(problem))
        except sqlite3.DatabaseError as e:
            raise UserError(damaged.format(e)) from None
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
        if read_only and not as_found and version < SCHEMA_VERSION:
            raise UserError(
                f"metadata database {path} has schema version {version}: mount it read-write"
                f" once to upgrade it to {SCHEMA_VERSION}"
            )
        try:
            db = _connect(path, read_only=read_only)
            while not read_only and version < SCHEMA_VERSION:  # as_found: read as it is
                step, nxt = MIGRATIONS[version], version + 1
                db.executescript(f"BEGIN IMMEDIATE; {step}; PRAGMA user_version = {nxt}; COMMIT;")
                version += 1
        except sqlite3.DatabaseError as e:
            raise UserError(damaged.format(e)) from None
        return cls(db, path, **opts)

    def close(self) -> None:
        self.db.close()

    def sync(self) -> None:
        """Make every committed transaction durable (fsync the WAL). Blocking: call in a thread."""
        try:
            _fsync(Path(str(self.path) + "-wal"))
        except FileNotFoundError:
            pass

    @contextmanager
    def txn(self) -> Iterator[sqlite3.Connection]:
        """One transaction around several statements (this engine's own checks: fsck's)."""
        with transaction(self.db):
            yield self.db

    # ---------------------------------------------------- configuration, ring

    def _setting(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def config(self) -> FsConfig:
        if self._config is None:
            self._config = self._config_of(self.db)
        return self._config

    def _config_of(self, db: sqlite3.Connection) -> FsConfig:
        values = dict(db.execute("SELECT key, value FROM settings"))
        try:
            return config_of(values)
        except (KeyError, ValueError) as e:
            raise UserError(
                f"metadata database {self.path} lacks a valid setting {e}: run 'hafs fsck'"
            ) from None

    def fresh_config(self) -> FsConfig:
        """Read through a connection of its own: the main one belongs to the caller's thread."""
        db = _connect(self.path, read_only=True)
        try:
            return self._config_of(db)
        finally:
            db.close()

    def update_config(self, **changes: str | None) -> FsConfig:
        check_config_changes(changes)
        with self.txn():
            for key, value in changes.items():
                if value is None:
                    self.db.execute("DELETE FROM settings WHERE key = ?", (key,))
                else:
                    self.db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, value))
        self._config = None
        return self.config()

    def ring(self) -> dict:
        text = self._setting("ring")
        if text is None:
            raise UserError(f"metadata database {self.path} lacks the ring: run 'hafs fsck'")
        return json.loads(text)

    def ring_changed_ns(self) -> int:
        return int(self._setting("ring_changed_ns", "0"))

    def wait_ring(self, version: int, poll_s: float) -> None:
        """A poll: SQLite has no watch (the caller reads the ring after poll_s)."""
        time.sleep(poll_s)

    def replace_ring(self, ring: dict, expect_version: int) -> bool:
        with self.txn():
            if self.ring().get("version") != expect_version:
                return False
            self.db.execute("UPDATE settings SET value = ? WHERE key = 'ring'", (json.dumps(ring),))
            self.db.execute(
                "INSERT OR REPLACE INTO settings VALUES ('ring_changed_ns', ?)", (str(now_ns()),)
            )
        return True

    # ------------------------------------------------------------ ownership

    def owner(self) -> Owner:
        """(see MetaStore.owner) The file is the store's when it has the recorded inode on
        the recorded disk (a move on the disk) or at the recorded path (the disk's
        number changed); a copy is another inode: `cp`, a backup put back (that needs
        'hafs node adopt'; a salvage or a load records its new file as the store's)."""
        values = dict(self.db.execute("SELECT key, value FROM settings WHERE key GLOB 'owner*'"))
        token = values.get("owner")
        where = f"{socket.gethostname()}:{self.path}"
        previous = tuple(json.loads(values.get("owner_previous", "[]")))
        if token is None or "owner_file" not in values:
            return Owner(token, previous, where)
        was, now = json.loads(values["owner_file"]), _file_identity(self.path)
        if now["ino"] != was["ino"] or (now["dev"] != was["dev"] and now["path"] != was["path"]):
            return Owner(token, previous, where, copy_of=was["path"])
        return Owner(token, previous, where, moved_from=was["path"] if now != was else None)

    def adopt(self, token: str) -> None:
        with self.txn():
            old = self._setting("owner")
            previous = json.loads(self._setting("owner_previous", "[]"))
            if old is not None and old != token and old not in previous:
                previous = [*previous, old][-OWNERS_KEPT:]
            self.db.executemany(
                "INSERT OR REPLACE INTO settings VALUES (?, ?)",
                [
                    ("owner", token),
                    ("owner_previous", json.dumps(previous)),
                    ("owner_file", json.dumps(_file_identity(self.path))),
                ],
            )

    # ----------------------------------------------------------------- inodes

    def getattr(self, ino: int) -> Inode | None:
        row = self.db.execute(f"SELECT {_INODE_COLS} FROM inodes WHERE id = ?", (ino,)).fetchone()
        return Inode(*row) if row else None

    def _need(self, ino: int) -> Inode:
        inode = self.getattr(ino)
        if inode is None:
            raise FsError(errno.ENOENT)
        return inode

    def _need_dir(self, ino: int) -> Inode:
        inode = self._need(ino)
        if not _is_dir(inode):
            raise FsError(errno.ENOTDIR)
        return inode

    def _entry(self, parent: int, name: bytes) -> int | None:
        row = self.db.execute(
            "SELECT inode FROM dentries WHERE parent = ? AND name = ?", (parent, name)
        ).fetchone()
        return row[0] if row else None

    def _take_entry(self, parent: int, name: bytes) -> int | None:
        """Remove the entry (inside a transaction); the inode it named, None if none."""
        row = self.db.execute(
            "DELETE FROM dentries WHERE parent = ? AND name = ? RETURNING inode", (parent, name)
        ).fetchone()
        return row[0] if row else None

    def lookup(self, parent: int, name: bytes) -> Inode | None:
        if name in (b".", b".."):
            self._need_dir(parent)
            return self.getattr(parent if name == b"." else self.parent_of(parent) or parent)
        row = self.db.execute(
            f"SELECT {_INODE_COLS_I} FROM dentries d JOIN inodes i ON i.id = d.inode"
            " WHERE d.parent = ? AND d.name = ?",
            (parent, name),
        ).fetchone()
        if row is not None:
            return Inode(*row)
        self._need_dir(parent)
        return None

    def parent_of(self, ino: int) -> int | None:
        row = self.db.execute(
            "SELECT parent FROM dentries WHERE inode = ? LIMIT 1", (ino,)
        ).fetchone()
        return row[0] if row else None

    def readdir(self, parent: int, after: int, limit: int) -> list[tuple[Dentry, Inode]]:
        rows = self.db.execute(
            f"SELECT d.id, d.name, {_INODE_COLS_I} FROM dentries d JOIN inodes i"
            " ON i.id = d.inode WHERE d.parent = ? AND d.id > ? ORDER BY d.id LIMIT ?",
            (parent, after, limit),
        )
        return [(Dentry(r[0], r[1], r[2]), Inode(*r[2:])) for r in rows]

    def _touch(self, ino: int, t: int, nlink_delta: int = 0) -> None:
        self.db.execute(
            "UPDATE inodes SET mtime_ns = ?, ctime_ns = ?, nlink = nlink + ? WHERE id = ?",
            (t, t, nlink_delta, ino),
        )

    def _add_nlink(self, ino: int, delta: int, t: int) -> None:
        self.db.execute(
            "UPDATE inodes SET nlink = nlink + ?, ctime_ns = ? WHERE id = ?", (delta, t, ino)
        )

    def _orphan(self, ino: int) -> None:
        """The inode lost its last name: this session keeps it until it lets go of it."""
        session = self.sessions.current
        if session is not None:
            self.db.execute("INSERT OR REPLACE INTO orphans VALUES (?, ?)", (ino, session.id))

    def mknod(
        self,
        parent: int,
        name: bytes,
        mode: int,
        uid: int,
        gid: int,
        rdev: int = 0,
        target: bytes | None = None,
        locked: bool = False,
    ) -> Inode:
        check_name(name)
        locked = locked and stat.S_ISREG(mode)
        with self.txn():
            pinode = self._need_dir(parent)
            if pinode.nlink == 0:
                raise FsError(errno.ENOENT)  # a removed directory takes no new entries
            if self._entry(parent, name) is not None:
                raise FsError(errno.EEXIST)
            if pinode.mode & stat.S_ISGID:  # BSD group semantics of setgid directories
                gid = pinode.gid
                if stat.S_ISDIR(mode):
                    mode |= stat.S_ISGID
            is_dir = stat.S_ISDIR(mode)
            t = now_ns()
            fields = (mode, uid, gid, 2 if is_dir else 1, len(target or b""), t, t, t, rdev, target)
            ino = self.db.execute(
                "INSERT INTO inodes (mode, uid, gid, nlink, size, atime_ns, mtime_ns, ctime_ns,"
                " rdev, target, fence_token) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*fields, CREATED_TOKEN if locked else 0),
            ).lastrowid
            self.db.execute(
                "INSERT INTO dentries (parent, name, inode) VALUES (?, ?, ?)", (parent, name, ino)
            )
            self._touch(parent, t, 1 if is_dir else 0)
            inode = Inode(ino, *fields)
            lease = self.locks.grant_created(ino) if locked else None
        if lease is not None:
            self.locks.keep_created(lease, inode)  # (committed: the next acquire takes it)
        return inode

    def link(self, ino: int, parent: int, name: bytes) -> Inode:
        check_name(name)
        with self.txn():
            inode = self._need(ino)
            if _is_dir(inode):
                raise FsError(errno.EPERM)
            if inode.nlink == 0:
                raise FsError(errno.ENOENT)
            pinode = self._need_dir(parent)
            if pinode.nlink == 0:
                raise FsError(errno.ENOENT)
            if self._entry(parent, name) is not None:
                raise FsError(errno.EEXIST)
            t = now_ns()
            self.db.execute(
                "INSERT INTO dentries (parent, name, inode) VALUES (?, ?, ?)", (parent, name, ino)
            )
            self._add_nlink(ino, 1, t)
            self._touch(parent, t)
            return self._need(ino)

    def unlink(self, parent: int, name: bytes, open_here: Container[int] = ()) -> Inode:
        with self.txn():  # (a refusal after a change below rolls the change back)
            ino = self._take_entry(parent, name)
            if ino is None:
                self._need_dir(parent)  # (ENOTDIR, or ENOENT for a parent that is gone)
                raise FsError(errno.ENOENT)
            t = now_ns()
            inode = Inode(
                *self.db.execute(
                    "UPDATE inodes SET nlink = nlink - 1, ctime_ns = ? WHERE id = ?"
                    f" RETURNING {_INODE_COLS}",
                    (t, ino),
                ).fetchone()
            )
            if _is_dir(inode):
                raise FsError(errno.EISDIR)
            self._touch(parent, t)
            if inode.nlink == 0:
                if ino in open_here:
                    self._orphan(ino)
                else:
                    self._drop_inode(ino)
            return inode

    def _has_entries(self, ino: int) -> bool:
        row = self.db.execute("SELECT 1 FROM dentries WHERE parent = ? LIMIT 1", (ino,))
        return row.fetchone() is not None

    def rmdir(self, parent: int, name: bytes) -> int:
        with self.txn():
            self._need_dir(parent)
            if name == b".":
                raise FsError(errno.EINVAL)
            ino = self._take_entry(parent, name)
            if ino is None:
                raise FsError(errno.ENOENT)
            self._need_dir(ino)
            if self._has_entries(ino):
                raise FsError(errno.ENOTEMPTY)
            t = now_ns()
            self.db.execute("UPDATE inodes SET nlink = 0, ctime_ns = ? WHERE id = ?", (t, ino))
            self._touch(parent, t, -1)
            self._orphan(ino)
            return ino

    def _set_entry(self, parent: int, name: bytes, ino: int) -> None:
        self.db.execute(
            "UPDATE dentries SET inode = ? WHERE parent = ? AND name = ?", (ino, parent, name)
        )

    def _is_ancestor(self, ino: int, of: int) -> bool:
        """Whether directory `ino` is `of` or one of its ancestors."""
        for _ in range(4096):
            if of == ino:
                return True
            if of == ROOT_INODE:
                return False
            parent = self.parent_of(of)
            if parent is None:
                return False
            of = parent
        return False

    def rename(self, p_old: int, n_old: bytes, p_new: int, n_new: bytes, flags: int) -> int | None:
        check_name(n_new)
        with self.txn():
            self._need_dir(p_old)
            new_parent = self._need_dir(p_new)
            ino = self._entry(p_old, n_old)
            if ino is None:
                raise FsError(errno.ENOENT)
            target = self._entry(p_new, n_new)
            is_dir = _is_dir(self._need(ino))
            if is_dir and p_old != p_new and self._is_ancestor(ino, p_new):
                raise FsError(errno.EINVAL)  # a directory cannot move into itself
            t = now_ns()
            if flags & RENAME_EXCHANGE:
                if target is None:
                    raise FsError(errno.ENOENT)
                target_is_dir = _is_dir(self._need(target))
                if target_is_dir and p_old != p_new and self._is_ancestor(target, p_old):
                    raise FsError(errno.EINVAL)
                self._set_entry(p_old, n_old, target)
                self._set_entry(p_new, n_new, ino)
                if p_old != p_new and is_dir != target_is_dir:
                    moved_dir_to_new = 1 if is_dir else -1
                    self._add_nlink(p_new, moved_dir_to_new, t)
                    self._add_nlink(p_old, -moved_dir_to_new, t)
                for i in {p_old, p_new}:
                    self._touch(i, t)
                self.db.execute(
                    "UPDATE inodes SET ctime_ns = ? WHERE id IN (?, ?)", (t, ino, target)
                )
                return None
            if target is not None and flags & RENAME_NOREPLACE:
                raise FsError(errno.EEXIST)
            if target == ino:
                return None  # two names of one file: POSIX says do nothing
            if new_parent.nlink == 0:
                raise FsError(errno.ENOENT)
            target_is_dir = False
            if target is not None:
                target_is_dir = _is_dir(self._need(target))
                if is_dir and not target_is_dir:
                    raise FsError(errno.ENOTDIR)
                if target_is_dir and not is_dir:
                    raise FsError(errno.EISDIR)
                if target_is_dir and self._has_entries(target):
                    raise FsError(errno.ENOTEMPTY)
                self._set_entry(p_new, n_new, ino)
                if target_is_dir:
                    self.db.execute(
                        "UPDATE inodes SET nlink = 0, ctime_ns = ? WHERE id = ?", (t, target)
                    )
                    self._add_nlink(p_new, -1, t)
                else:
                    self._add_nlink(target, -1, t)
            else:
                self.db.execute(
                    "INSERT INTO dentries (parent, name, inode) VALUES (?, ?, ?)",
                    (p_new, n_new, ino),
                )
            self.db.execute("DELETE FROM dentries WHERE parent = ? AND name = ?", (p_old, n_old))
            if is_dir and p_old != p_new:
                self._add_nlink(p_old, -1, t)
                self._add_nlink(p_new, 1, t)
            for i in {p_old, p_new}:
                self._touch(i, t)
            self.db.execute("UPDATE inodes SET ctime_ns = ? WHERE id = ?", (t, ino))
            if target is not None and self._need(target).nlink == 0:
                self._orphan(target)
            return target

    _SETTABLE = frozenset({"mode", "uid", "gid", "atime_ns", "mtime_ns"})

    def setattr(self, ino: int, **fields: int) -> Inode:
        if not fields.keys() <= self._SETTABLE:
            raise TypeError(f"setattr cannot set {sorted(fields.keys() - self._SETTABLE)}")
        if "mode" in fields:
            fields["mode"] &= 0o7777
        fields["ctime_ns"] = now_ns()
        # one statement: the file type stays, the permission bits change
        cols = ", ".join("mode = (mode & ~4095) | ?" if k == "mode" else f"{k} = ?" for k in fields)
        with self.txn():
            row = self.db.execute(
                f"UPDATE inodes SET {cols} WHERE id = ? RETURNING {_INODE_COLS}",
                (*fields.values(), ino),
            ).fetchone()
            if row is None:
                raise FsError(errno.ENOENT)
            return Inode(*row)

    def delete_inode(self, ino: int) -> bool:
        with self.txn():
            inode = self.getattr(ino)
            if inode is None or inode.nlink > 0:
                return False
            self._drop_inode(ino)
            self.db.execute("DELETE FROM orphans WHERE inode = ?", (ino,))
            return True

    def _drop_inode(self, ino: int) -> None:
        self._drop_extents(ino, 0, None)
        self.db.execute("DELETE FROM xattrs WHERE inode = ?", (ino,))
        self.db.execute("DELETE FROM inodes WHERE id = ?", (ino,))

    def unlinked_inodes(self) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT id FROM inodes WHERE nlink = 0")]

    def path_of(self, ino: int) -> str:
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

    # ----------------------------------------------------------------- xattrs

    def get_xattr(self, ino: int, name: bytes) -> bytes | None:
        row = self.db.execute(
            "SELECT value FROM xattrs WHERE inode = ? AND name = ?", (ino, name)
        ).fetchone()
        return None if row is None else row[0]

    def set_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        check_xattr(name, value)
        with self.txn():
            self._need(ino)
            self.db.execute("INSERT OR REPLACE INTO xattrs VALUES (?, ?, ?)", (ino, name, value))
            self.db.execute("UPDATE inodes SET ctime_ns = ? WHERE id = ?", (now_ns(), ino))

    def list_xattrs(self, ino: int) -> list[bytes]:
        return [r[0] for r in self.db.execute("SELECT name FROM xattrs WHERE inode = ?", (ino,))]

    def remove_xattr(self, ino: int, name: bytes) -> None:
        with self.txn():
            self._need(ino)
            cur = self.db.execute("DELETE FROM xattrs WHERE inode = ? AND name = ?", (ino, name))
            if cur.rowcount != 1:
                raise FsError(errno.ENODATA)
            self.db.execute("UPDATE inodes SET ctime_ns = ? WHERE id = ?", (now_ns(), ino))

    # ---------------------------------------------------------------- content

    def extents(self, ino: int, start: int, end: int) -> list[Extent]:
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

    def allocated_bytes(self, ino: int) -> int:
        """One scan of the inode's extents (its primary key)."""
        row = self.db.execute(
            "SELECT coalesce(sum(length), 0) FROM extents WHERE inode = ?", (ino,)
        ).fetchone()
        return row[0]

    def fence(self, ino: int, token: int) -> Inode:
        created = self.locks.grants.fenced(f"inode:{ino}", token)
        if created is not None:
            return created  # its create wrote the token: no older one can exist
        with self.txn():
            return self._fence(ino, token)

    def _fence(self, ino: int, token: int) -> Inode:
        row = self.db.execute(
            "UPDATE inodes SET fence_token = ? WHERE id = ? AND fence_token <= ?"
            f" RETURNING {_INODE_COLS}",
            (token, ino, token),
        ).fetchone()
        if row is not None:
            return Inode(*row)
        self._refused(ino, token)

    def _refused(self, ino: int, token: int) -> NoReturn:
        row = self.db.execute("SELECT fence_token FROM inodes WHERE id = ?", (ino,)).fetchone()
        raise LockLost(
            f"inode {ino}: write token {token} refused, "
            + (f"a newer writer holds token {row[0]}" if row else "the file was deleted")
        )

    def commit(
        self,
        ino: int,
        start: int,
        end: int,
        new: list[Extent],
        sizes: dict[str, int],
        size: int,
        mtime_ns: int,
        token: int | None = None,
    ) -> Inode:
        with self.txn():
            # the new size and the fence in one statement (a refused token rolls back all)
            where = "WHERE id = ?5"
            if token is not None:
                where = ", fence_token = ?1 WHERE id = ?5 AND fence_token <= ?1"
            row = self.db.execute(
                f"UPDATE inodes SET size = ?2, mtime_ns = ?3, ctime_ns = ?4 {where}"
                f" RETURNING {_INODE_COLS}",
                (token, size, mtime_ns, max(mtime_ns, now_ns()), ino),
            ).fetchone()
            if row is None:
                if token is None:
                    raise FsError(errno.ENOENT)
                self._refused(ino, token)
            self._drop_extents(ino, start, end)
            for e in new:
                self._ref_block(e.block_id, sizes[e.block_id])
            self.db.executemany(
                "INSERT INTO extents (inode, offset, length, block_id) VALUES (?, ?, ?, ?)",
                [(ino, e.offset, e.length, e.block_id) for e in new],
            )
        return Inode(*row)

    def truncate(self, ino: int, size: int, mtime_ns: int, token: int | None = None) -> Inode:
        with self.txn():
            if token is None:
                self._need(ino)
            else:  # the fence reads the inode too (LockLost if it is gone, as on every engine)
                self._fence(ino, token)
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
            row = self.db.execute(
                "UPDATE inodes SET size = ?, mtime_ns = ?, ctime_ns = ? WHERE id = ?"
                f" RETURNING {_INODE_COLS}",
                (size, mtime_ns, mtime_ns, ino),
            ).fetchone()
        return Inode(*row)

    def _drop_extents(self, ino: int, start: int, end: int | None) -> None:
        """Delete extents starting in [start, end) and release their blocks (inside a txn)."""
        cond = "inode = ? AND offset >= ?" + ("" if end is None else " AND offset < ?")
        args = (ino, start) if end is None else (ino, start, end)
        rows = self.db.execute(f"DELETE FROM extents WHERE {cond} RETURNING block_id", args)
        rows = rows.fetchall()
        if not rows:
            return
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

    # ---------------------------------------------------------------- figures

    def usage(self) -> Usage:
        """From the running totals (a few point reads, whatever the filesystem's size)."""
        c = dict(self.db.execute("SELECT name, value FROM counters"))
        return Usage(c["inodes"], c["logical_bytes"], c["stored_bytes"], c["stored_blocks"])

    def count_inodes(self) -> int:
        return self.db.execute("SELECT value FROM counters WHERE name = 'inodes'").fetchone()[0]

    # ----------------------------------------------------------------- blocks

    def garbage_blocks(self, before_ns: int, limit: int) -> list[str]:
        rows = self.db.execute(
            "SELECT id FROM blocks WHERE refcount = 0 AND zero_since_ns < ? LIMIT ?",
            (before_ns, limit),
        )
        return [r[0] for r in rows]

    def referenced(self, block_ids: list[str]) -> set[str]:
        found: set[str] = set()
        for i in range(0, len(block_ids), 500):  # (below SQLite's bound on parameters)
            page = block_ids[i : i + 500]
            rows = self.db.execute(
                f"SELECT id FROM blocks WHERE refcount > 0 AND id IN ({','.join('?' * len(page))})",
                page,
            )
            found.update(r[0] for r in rows)
        return found

    def forget_block(self, block_id: str) -> bool:
        with self.txn():
            cur = self.db.execute("DELETE FROM blocks WHERE id = ? AND refcount = 0", (block_id,))
            if cur.rowcount == 1:
                self.db.execute("DELETE FROM degraded WHERE id = ?", (block_id,))
            return cur.rowcount == 1

    def record_degraded(self, block_id: str, nodes: list[str]) -> None:
        with self.txn():
            row = self.db.execute("SELECT nodes FROM degraded WHERE id = ?", (block_id,)).fetchone()
            known = row[0].split() if row else []
            self.db.execute(
                "INSERT INTO degraded (id, nodes, since_ns) VALUES (?, ?, ?)"
                " ON CONFLICT(id) DO UPDATE SET nodes = excluded.nodes",
                (block_id, " ".join(sorted({*known, *nodes})), now_ns()),
            )

    def degraded_blocks(self, after: str, limit: int) -> list[tuple[str, list[str]]]:
        rows = self.db.execute(
            "SELECT id, nodes FROM degraded WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
        )
        return [(bid, nodes.split()) for bid, nodes in rows]

    def forget_degraded(self, block_id: str) -> None:
        with self.txn():
            self.db.execute("DELETE FROM degraded WHERE id = ?", (block_id,))

    def clear_degraded(self, keep: set[str]) -> int:
        with self.txn():
            ids = [r[0] for r in self.db.execute("SELECT id FROM degraded")]
            gone = [(bid,) for bid in ids if bid not in keep]
            self.db.executemany("DELETE FROM degraded WHERE id = ?", gone)
        return len(gone)

    def count_degraded(self) -> int:
        if self.schema < DEGRADED_SCHEMA:
            return 0  # opened as found, before any mount upgraded it
        return self.db.execute("SELECT count(*) FROM degraded").fetchone()[0]

    # ------------------------------------------------------------------ scans

    def scan_inodes(self, after: int, limit: int) -> list[Inode]:
        rows = self.db.execute(
            f"SELECT {_INODE_COLS} FROM inodes WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
        )
        return [Inode(*r) for r in rows]

    def scan_entries(self, after: tuple[int, bytes], limit: int) -> list[tuple[int, bytes, int]]:
        rows = self.db.execute(
            "SELECT parent, name, inode FROM dentries WHERE (parent, name) > (?, ?)"
            " ORDER BY parent, name LIMIT ?",
            (*after, limit),
        )
        return [tuple(r) for r in rows]

    def scan_blocks(self, after: str, limit: int) -> list[BlockRow]:
        rows = self.db.execute(
            "SELECT id, size, refcount, zero_since_ns FROM blocks WHERE id > ? ORDER BY id LIMIT ?",
            (after, limit),
        )
        return [BlockRow(*r) for r in rows]

    def scan_extents(self, after: tuple[int, int], limit: int) -> list[tuple[int, Extent]]:
        rows = self.db.execute(
            "SELECT inode, offset, length, block_id FROM extents WHERE (inode, offset) > (?, ?)"
            " ORDER BY inode, offset LIMIT ?",
            (*after, limit),
        )
        return [(r[0], Extent(*r[1:])) for r in rows]

    def block_users(self, block_id: str, limit: int) -> list[int]:
        rows = self.db.execute(
            "SELECT DISTINCT inode FROM extents WHERE block_id = ? LIMIT ?", (block_id, limit)
        )
        return [r[0] for r in rows]

    def block_refs(self, block_id: str) -> int:
        q = "SELECT count(*) FROM extents WHERE block_id = ?"
        return self.db.execute(q, (block_id,)).fetchone()[0]

    def block_rows(self, block_ids: list[str]) -> dict[str, BlockRow]:
        out = {}
        for i in range(0, len(block_ids), 500):  # SQLite's limit on parameters is higher
            batch = block_ids[i : i + 500]
            rows = self.db.execute(
                "SELECT id, size, refcount, zero_since_ns FROM blocks"
                f" WHERE id IN ({','.join('?' * len(batch))})",
                batch,
            )
            out.update((r[0], BlockRow(*r)) for r in rows)
        return out

    def names(self, ino: int, limit: int) -> list[tuple[int, bytes]]:
        rows = self.db.execute(
            "SELECT parent, name FROM dentries WHERE inode = ? ORDER BY id LIMIT ?", (ino, limit)
        )
        return [tuple(r) for r in rows]

    # ------------------------------------------------------------------- fsck

    def describe(self) -> dict:
        return {
            "engine": "sqlite",
            "location": str(self.path),
            "schema": self.schema,
            "current": SCHEMA_VERSION,
            "recover": RECOVER_HINT.format(home=self.path.parent),
        }

    def check_storage(self, limit: int) -> list[str]:
        rows = [r[0] for r in self.db.execute(f"PRAGMA integrity_check({int(limit)})")]
        return [] if rows == ["ok"] else rows

    def damaged(self, exc: BaseException) -> str | None:
        """Any DatabaseError but a busy database's (SQLITE_BUSY, SQLITE_LOCKED)."""
        if not isinstance(exc, sqlite3.DatabaseError):
            return None
        if getattr(exc, "sqlite_errorname", "").startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return None
        return f"metadata database {self.path} is damaged ({exc})"

    @contextmanager
    def snapshot(self) -> Iterator[bool]:
        """One read transaction (WAL: a mount's commits meanwhile are not seen)."""
        if self.db.in_transaction:
            yield True
            return
        self.db.execute("BEGIN")
        self.db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()  # the snapshot: now
        try:
            yield True
        finally:
            self.db.execute("COMMIT")

    # ------------------------------------------------------------ dump, load

    @contextmanager
    def dump(self) -> Iterator[tuple[FsState, Iterator[Record]]]:
        """Every record, read in one read transaction (see MetaStore.dump); each table is one
        streamed query in its key order."""
        with self.snapshot():
            settings = dict(self.db.execute("SELECT key, value FROM settings"))
            seq = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'inodes'")
            top = self.db.execute("SELECT max(id) FROM inodes").fetchone()[0] or 0
            try:
                state = state_of(settings, max(top, *(r[0] for r in seq)) + 1)
            except (KeyError, ValueError) as e:
                raise UserError(
                    f"metadata database {self.path} lacks a valid setting {e}: run 'hafs fsck'"
                ) from None
            yield state, self._records()

    def _records(self) -> Iterator[Record]:
        for table, key, cols, make in DUMP_TABLES:
            for row in self.db.execute(f"SELECT {cols} FROM {table} ORDER BY {key}"):
                yield make(row)

    @classmethod
    def load(
        cls, path: Path, state: FsState, records: Iterable[Record], place: Path | None = None
    ) -> None:
        """Make a new database at `path` (which must not exist) from a dump's state and
        records.  It is built beside, as PATH.loading, and linked into place once whole, so
        a load that fails (a bad or cut-off dump) leaves nothing behind.  Fencing tokens
        start again at 0, as the write locks do.  The state's owner token is kept, with this
        file as its own (`place`: where the caller renames it to, if not `path`)."""
        if path.exists():
            raise UserError(f"{path} already exists: a load needs a home that holds no filesystem")
        tmp = path.with_name(path.name + ".loading")
        for stale in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            stale.unlink(missing_ok=True)  # left by a load that was killed
        db = _connect(tmp)
        try:
            db.executescript(SCHEMA)
            with transaction(db):
                settings = settings_of(
                    state.config,
                    state.ring,
                    state.ring_changed_ns,
                    state.owner,
                    state.owner_previous,
                )
                if state.owner is not None:  # the file, as it will be linked into its place
                    settings["owner_file"] = json.dumps(_file_identity(tmp, place or path))
                db.executemany("INSERT INTO settings VALUES (?, ?)", settings.items())
                for kind, rows in _batches(records, 1000):
                    sql, row = _LOAD[kind]
                    db.executemany(sql, map(row, rows))
                cur = db.execute(
                    "UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'inodes'",
                    (state.next_ino - 1,),
                )
                if cur.rowcount == 0:
                    db.execute(
                        "INSERT INTO sqlite_sequence VALUES ('inodes', ?)", (state.next_ino - 1,)
                    )
                db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.close()  # the last connection: the WAL is checkpointed into the file
            if state.config.node_token is not None:  # a secret, as mkfs keeps it
                os.chmod(tmp, 0o600)
            _fsync(tmp)
            try:
                os.link(tmp, path)  # never over a database made meanwhile
            except FileExistsError:
                raise UserError(f"{path} was created meanwhile: nothing was loaded") from None
            _fsync(path.parent)
        except BaseException:
            db.close()
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def fsck_add_root(self, uid: int, gid: int) -> bool:
        t = now_ns()
        with self.txn():
            cur = self.db.execute(
                "INSERT OR IGNORE INTO inodes (id, mode, uid, gid, nlink, atime_ns, mtime_ns,"
                " ctime_ns) VALUES (?, ?, ?, ?, 2, ?, ?, ?)",
                (ROOT_INODE, stat.S_IFDIR | 0o755, uid, gid, t, t, t),
            )
            return cur.rowcount == 1

    def fsck_drop_entry(self, parent: int, name: bytes) -> int | None:
        with self.txn():
            ino = self._entry(parent, name)
            if ino is not None:
                self.db.execute(
                    "DELETE FROM dentries WHERE parent = ? AND name = ?", (parent, name)
                )
            return ino

    def fsck_add_entry(self, parent: int, name: bytes, ino: int) -> None:
        check_name(name)
        with self.txn():
            inode = self._need(ino)
            self._need_dir(parent)
            if self._entry(parent, name) is not None:
                raise FsError(errno.EEXIST)
            t = now_ns()
            self.db.execute(
                "INSERT INTO dentries (parent, name, inode) VALUES (?, ?, ?)", (parent, name, ino)
            )
            if _is_dir(inode):
                self._add_nlink(parent, 1, t)
            else:
                self.db.execute(
                    "UPDATE inodes SET nlink = (SELECT count(*) FROM dentries WHERE inode = ?),"
                    " ctime_ns = ? WHERE id = ?",
                    (ino, t, ino),
                )
            self.db.execute("DELETE FROM orphans WHERE inode = ?", (ino,))

    def fsck_set_nlink(self, ino: int, nlink: int) -> None:
        with self.txn():
            self._need(ino)
            self.db.execute("UPDATE inodes SET nlink = ? WHERE id = ?", (nlink, ino))

    def fsck_set_size(self, ino: int, size: int) -> None:
        with self.txn():
            self._need(ino)
            self.db.execute("UPDATE inodes SET size = ? WHERE id = ?", (size, ino))

    def fsck_drop_extent(self, ino: int, offset: int) -> bool:
        with self.txn():
            row = self.db.execute(
                "SELECT block_id FROM extents WHERE inode = ? AND offset = ?", (ino, offset)
            ).fetchone()
            if row is None:
                return False
            self.db.execute("DELETE FROM extents WHERE inode = ? AND offset = ?", (ino, offset))
            self.db.execute(
                "UPDATE blocks SET refcount = max(refcount - 1, 0), zero_since_ns ="
                " CASE WHEN refcount <= 1 THEN coalesce(zero_since_ns, ?) ELSE NULL END"
                " WHERE id = ?",
                (now_ns(), row[0]),
            )
            return True

    def fsck_cut_extent(self, ino: int, offset: int, length: int) -> None:
        with self.txn():
            row = self.db.execute(
                "SELECT length FROM extents WHERE inode = ? AND offset = ?", (ino, offset)
            ).fetchone()
            if row is None:
                raise FsError(errno.ENOENT)
            if not 0 < length < row[0]:
                raise FsError(errno.EINVAL, f"cannot cut an extent of {row[0]} to {length}")
            self.db.execute(
                "UPDATE extents SET length = ? WHERE inode = ? AND offset = ?",
                (length, ino, offset),
            )

    def fsck_set_block(self, block_id: str, size: int, refcount: int) -> None:
        with self.txn():
            row = self.db.execute(
                "SELECT zero_since_ns FROM blocks WHERE id = ?", (block_id,)
            ).fetchone()
            since = None if refcount > 0 else (row[0] if row else None) or now_ns()
            self.db.execute(
                "INSERT OR REPLACE INTO blocks (id, size, refcount, zero_since_ns)"
                " VALUES (?, ?, ?, ?)",
                (block_id, size, refcount, since),
            )


@_guard(reads="valid held", changes="_try keepalive release")
class SqliteLockService:
    """Write locks in the `locks` table, shared by every mount of the home on this host.

    Times are wall-clock nanoseconds (one clock for every process on the host);
    tests inject a clock that follows trio's.  Methods run on the trio thread;
    each database access is one short transaction with no await inside.

    A new file its creator writes is locked by the create's transaction
    (`grant_created`: inode numbers are never reused, so its first grant has
    CREATED_TOKEN, which the same transaction writes as the inode's fence token);
    the next acquire of it takes that grant without a transaction, and the fence
    after it needs none (meta.locks.CreatedGrants).
    """

    def __init__(
        self,
        db: sqlite3.Connection,
        holder: str,
        ttl_s: float = 10.0,
        clock: Callable[[], int] = time.time_ns,
        damage: Damage | None = None,
    ) -> None:
        self.db = db
        self.holder = holder
        self.ttl_ns = int(ttl_s * 1e9)
        self.clock = clock
        self.damage = damage or Damage(None)
        self.grants = CreatedGrants()

    def grant_created(self, ino: int) -> Lease:
        """Lock the new inode `ino` for this holder, inside the caller's transaction."""
        name, now = f"inode:{ino}", self.clock()
        lease = Lease(name, self.holder, CREATED_TOKEN, now + self.ttl_ns)
        self.db.execute(  # (REPLACE: a salvaged database may have kept a row of the name)
            "INSERT OR REPLACE INTO locks VALUES (?, ?, ?, ?, ?)",
            (name, self.holder, CREATED_TOKEN, now, lease.expires_ns),
        )
        return lease

    def keep_created(self, lease: Lease, inode: Inode) -> None:
        """The create that granted `lease` committed: the next acquire takes it."""
        self.grants.keep(lease, inode)
        log.debug("LOCK-ACQUIRE %s token %d (with its create)", lease.name, lease.token)

    def _try(self, name: str) -> tuple[Lease | None, str | None]:
        """One attempt: (lease, None) on success, (None, current holder) otherwise."""
        lease = self.grants.take(name, self.valid)
        if lease is not None:
            return lease, None
        now = self.clock()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            row = self.db.execute(
                "SELECT holder, token, expires_ns FROM locks WHERE name = ?", (name,)
            ).fetchone()
            if row and row[0] is not None and row[0] != self.holder and row[2] > now:
                self.db.execute("ROLLBACK")
                return None, row[0]
            token = (row[1] if row else 0) + 1
            expires = now + self.ttl_ns
            self.db.execute(
                "INSERT OR REPLACE INTO locks VALUES (?, ?, ?, ?, ?)",
                (name, self.holder, token, now, expires),
            )
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        if row and row[0] is not None and row[0] != self.holder:
            log.warning("LOCK-TAKEOVER %s: the lease of %s had expired", name, row[0])
        log.debug("LOCK-ACQUIRE %s token %d", name, token)
        return Lease(name, self.holder, token, expires), None

    async def acquire(self, name: str, wait_s: float) -> Lease:
        """Take the lock, waiting up to wait_s seconds for its holder; LockTimeout after."""
        return await wait_for(name, wait_s, lambda: self._try(name))

    async def keepalive(self, lease: Lease) -> None:
        """Renew the lease; LockLost if it expired or someone else holds the lock now."""
        now = self.clock()
        if now >= lease.expires_ns:
            raise LockLost(
                f"lease of {lease.name} expired {(now - lease.expires_ns) / 1e9:.1f} s ago"
            )
        expires = now + self.ttl_ns
        with transaction(self.db):
            cur = self.db.execute(
                "UPDATE locks SET expires_ns = ? WHERE name = ? AND holder = ? AND token = ?",
                (expires, lease.name, lease.holder, lease.token),
            )
        if cur.rowcount != 1:
            raise LockLost(f"lock {lease.name} was taken over")
        lease.expires_ns = expires

    def valid(self, lease: Lease) -> bool:
        """Whether the lease is still ours by the clock (commits check the token too)."""
        return self.clock() < lease.expires_ns

    async def release(self, lease: Lease) -> None:
        with transaction(self.db):
            self.db.execute(
                "UPDATE locks SET holder = NULL, expires_ns = NULL, acquired_ns = NULL"
                " WHERE name = ? AND holder = ? AND token = ?",
                (lease.name, lease.holder, lease.token),
            )
        log.debug("LOCK-RELEASE %s token %d", lease.name, lease.token)

    def held(self) -> list[LockInfo]:
        """Every lock whose lease has not expired."""
        rows = self.db.execute(
            "SELECT name, holder, token, acquired_ns, expires_ns FROM locks"
            " WHERE holder IS NOT NULL AND expires_ns > ? ORDER BY name",
            (self.clock(),),
        )
        return [LockInfo(*r) for r in rows]


@_guard(reads="alive", changes="register renew end reap")
class SqliteSessions:
    """Mount sessions in the `sessions` table (see the Sessions protocol).

    A session is alive while its lease (expires_ns, wall clock of this host)
    has not run out; a session of this host whose process is gone is dead at
    once (a killed mount is noticed without waiting for its lease).
    """

    def __init__(self, meta: SqliteMeta) -> None:
        self.meta = meta
        self.db = meta.db
        self.damage = meta.damage
        self.current: SessionInfo | None = None  # the session of this engine's client

    def register(self, kind: str, mountpoint: str, ttl_s: float) -> SessionInfo:
        host, pid, t = socket.gethostname(), os.getpid(), self.meta.clock()
        info = SessionInfo(
            id=f"{host}:{pid}:{secrets.token_hex(4)}",
            kind=kind,
            host=host,
            mountpoint=mountpoint,
            pid=pid,
            version=__version__,
            since_ns=t,
            expires_ns=t + int(ttl_s * 1e9),
        )
        with transaction(self.db):
            self._reap()
            why = session_conflict(kind, self._alive())
            if why is not None:
                raise UserError(why)
            self.db.execute(
                "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    info.id,
                    kind,
                    host,
                    mountpoint,
                    pid,
                    info.version,
                    info.since_ns,
                    info.expires_ns,
                ),
            )
        self.current = info
        self._ttl_ns = int(ttl_s * 1e9)
        return info

    def renew(self, session: SessionInfo) -> SessionInfo:
        expires = self.meta.clock() + self._ttl_ns
        with transaction(self.db):
            cur = self.db.execute(
                "UPDATE sessions SET expires_ns = ? WHERE id = ?", (expires, session.id)
            )
            if cur.rowcount != 1:  # reaped while this process was paused: take it up again
                self.db.execute(
                    "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        session.id,
                        session.kind,
                        session.host,
                        session.mountpoint,
                        session.pid,
                        session.version,
                        session.since_ns,
                        expires,
                    ),
                )
        renewed = SessionInfo(**{**session.__dict__, "expires_ns": expires})
        if self.current is not None and self.current.id == session.id:
            self.current = renewed
        return renewed

    def end(self, session: SessionInfo) -> None:
        with transaction(self.db):
            self.db.execute("DELETE FROM sessions WHERE id = ?", (session.id,))
        if self.current is not None and self.current.id == session.id:
            self.current = None

    def _rows(self) -> list[SessionInfo]:
        if self.db.execute("PRAGMA user_version").fetchone()[0] < 4:
            return []  # a database no mount of this version has opened (fsck reads it as is)
        return [
            SessionInfo(*r)
            for r in self.db.execute(
                "SELECT id, kind, host, mountpoint, pid, version, since_ns, expires_ns"
                " FROM sessions ORDER BY since_ns"
            )
        ]

    def _alive(self) -> list[SessionInfo]:
        t = self.meta.clock()
        return [s for s in self._rows() if not session_dead(s, t)]

    def alive(self) -> list[SessionInfo]:
        return self._alive()

    def _reap(self) -> list[SessionInfo]:
        """End the dead sessions and delete the inodes that only they kept (also those of
        a session that ended while the kernel still held them, at an unmount)."""
        t = self.meta.clock()
        dead = [s for s in self._rows() if session_dead(s, t)]
        for s in dead:
            self.db.execute("DELETE FROM sessions WHERE id = ?", (s.id,))
        if self.db.execute("PRAGMA user_version").fetchone()[0] >= 4:
            left = self.db.execute(
                "SELECT inode FROM orphans WHERE session NOT IN (SELECT id FROM sessions)"
            ).fetchall()
            for (ino,) in left:
                self.meta.delete_inode(ino)  # unless it has a name again
                self.db.execute("DELETE FROM orphans WHERE inode = ?", (ino,))
        return dead

    def reap(self) -> list[SessionInfo]:
        with transaction(self.db):
            return self._reap()

    def elect(self, role: str) -> bool:
        """Always: the mounts of an embedded filesystem share one host, and each runs the
        background work (its transactions keep them from harming each other)."""
        return True

    def leader(self, role: str) -> str | None:
        return None  # no election: every mount has every role


def _quick_check(db: sqlite3.Connection, budget_s: float) -> str | None:
    """The first problem SQLite's quick_check finds within budget_s seconds (None: none
    found; a check cut short by the budget found none in what it read)."""
    deadline = time.monotonic() + budget_s
    db.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
    try:
        rows = db.execute("PRAGMA quick_check(1)").fetchall()
    except sqlite3.OperationalError as e:
        if "interrupted" in str(e):
            return None
        raise
    finally:
        db.set_progress_handler(None, 0)
    return check_text(rows)


def check_text(rows: list[tuple]) -> str | None:
    """One line of what an integrity_check or quick_check answered (None: "ok")."""
    if rows == [("ok",)]:
        return None
    text = " ".join(
        " ".join(str(r[0]) for r in rows).replace("*** in database main ***", "").split()
    )
    return text if len(text) <= 200 else text[:197] + "..."


def _batches(records: Iterable[Record], size: int) -> Iterator[tuple[type, list[Record]]]:
    """Runs of up to `size` records of one kind, in the order they come."""
    kind, batch = None, []
    for rec in records:
        if type(rec) is not kind or len(batch) >= size:
            if batch:
                yield kind, batch
            kind, batch = type(rec), []
        batch.append(rec)
    if batch:
        yield kind, batch


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def session_dead(s: SessionInfo, now: int) -> bool:
    """Whether a session has ended: its lease ran out by `now` (wall-clock ns), or it is a
    process of this host that is gone."""
    if s.expires_ns <= now:
        return True
    if s.host == socket.gethostname() and s.pid != os.getpid():
        return not _pid_alive(s.pid)
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _file_identity(path: Path, place: Path | None = None) -> dict:
    """What tells the database file from a copy of it: its disk, its inode, its path
    (`place`: the path it is linked to next, if not `path`)."""
    st = os.stat(path)
    return {"dev": st.st_dev, "ino": st.st_ino, "path": os.path.realpath(place or path)}


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
