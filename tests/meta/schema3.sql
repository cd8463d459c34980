-- The metadata schema of hafs before schema 4 (user_version 3), exactly as that code
-- created it (hafs/meta.py at 3cee4ec): tests upgrade databases made with it.
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

-- Write locks (the embedded LockService, hafs/locks.py).  A row stays when
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
