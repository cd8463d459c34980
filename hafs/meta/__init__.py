"""What a metadata engine is: one interface, engines that implement whole operations.

DESIGN.md, "Metadata engines".  An engine keeps everything a filesystem knows
besides its blocks: inodes, directory entries, extents, block refcounts,
xattrs, the configuration and the ring, degraded-block records, write locks
(`LockService`) and mount sessions (`Sessions`).  Engines:

- `sqlite` (meta/sqlite.py): the embedded default, one SQLite file (WAL);
- `kv` (meta/kv.py): every operation written once over a small transactional
  key-value interface (`KV`), with its key layout; `memkv` (in memory, for
  tests) and `etcd` (the cluster engine) are thin adapters under it.

Every method of `MetaStore` is one engine transaction with its checks inside
it: a check and the change it guards cannot be separated by another client.
A conflict with another client is retried inside the engine or becomes the
POSIX answer (`FsError` with EEXIST, ENOENT, ENOTEMPTY, ...), never an I/O
error.  `LockLost` refuses a commit whose fencing token is older than the
inode's newest one (invariant 6).

Blocking: the methods are plain calls.  An engine whose calls are cheap enough
for the trio thread (SQLite: indexed point lookups, tens of microseconds) says
so with `direct = True`; the others (network round trips) are called from
worker threads, except the methods an engine names in `local_calls`, which
never make a request (answered from memory: no thread hop for them).  Trio
code never calls an engine itself: it goes through `AsyncMeta`, which does the
one or the other, so the vfs is written once for every engine.  Synchronous
tools (fsck, rebalance, status, node management) call the engine directly from
their own threads.
"""

from __future__ import annotations

import errno
import functools
import time
from collections.abc import Callable, Container, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from ..errors import FsError

ROOT_INODE = 1
NAME_MAX = 255
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 64 * 1024
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
LEAD_ROLE = "gc"  # the elected role: garbage collection, repair, the cleanup after dead mounts


def now_ns() -> int:
    return time.time_ns()


def check_name(name: bytes) -> None:
    """A name a new entry may have (every engine checks it inside its operations)."""
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG)
    if name in (b".", b"..") or b"/" in name or not name:
        raise FsError(errno.EINVAL)


def check_xattr(name: bytes, value: bytes) -> None:
    """An xattr a file may have.  POSIX ACLs are refused: stored as a plain xattr an ACL
    would not change the mode, and `cp -a` sets the mode that way; tools fall back to
    chmod."""
    if not name or len(name) > XATTR_NAME_MAX:
        raise FsError(errno.ERANGE)
    if len(value) > XATTR_SIZE_MAX:
        raise FsError(errno.E2BIG)
    if name.startswith(b"system.posix_acl_"):
        raise FsError(errno.EOPNOTSUPP)


# ------------------------------------------------------------------- values


@dataclass
class Inode:
    id: int
    mode: int  # st_mode: type and permission bits
    uid: int
    gid: int
    nlink: int  # 0: unlinked, kept while open on a mount
    size: int  # bytes; past the last extent: a hole
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int  # device number of block/char special files
    target: bytes | None  # symlink target; None for anything else


@dataclass(frozen=True)
class Extent:
    """The block `block_id` supplies bytes [offset, offset+length) of a file from its own
    bytes [0, length); length <= the block's size (a truncate may keep a prefix)."""

    offset: int
    length: int
    block_id: str

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class Dentry:
    cursor: int  # opaque readdir cursor (> 0): readdir(after=cursor) goes on after this entry
    name: bytes
    inode: int


@dataclass(frozen=True)
class FsConfig:
    """The filesystem's configuration, read once (typed, instead of settings decoded
    in every tool)."""

    fs_uuid: str
    replicas: int  # R
    write_quorum: int  # W
    node_token: str | None  # bearer token of the block nodes
    created_ns: int
    ca_pem: str | None = None  # the CA (PEM) the nodes' TLS certificates are checked against;
    # None: the system's CAs (a configuration written before this field reads as None)


CHANGEABLE_CONFIG = ("node_token", "ca_pem")  # what `MetaStore.update_config` may change


def check_config_changes(changes: dict) -> None:
    """Refuse (ValueError) a change of a configuration field that never changes."""
    fixed = sorted(set(changes) - set(CHANGEABLE_CONFIG))
    if fixed:
        raise ValueError(f"the configuration's {', '.join(fixed)} cannot be changed")


@dataclass(frozen=True)
class Owner:
    """Who a metadata store is to its nodes (hafs.store.owner: the nodes record the owner
    token of the store that owns them)."""

    token: str | None  # the store's owner token; None: an older store that has none yet
    previous: tuple[str, ...] = ()  # tokens it held before ('hafs node adopt' gave a new one)
    where: str = ""  # the store's location, for messages (host:path of meta.db, an etcd URL)
    copy_of: str | None = None  # a copy of the store recorded there: it must change no node
    moved_from: str | None = None  # its file was recorded there (it moved on its disk, or
    # the disk's number changed): `adopt` with its token records where it is now


@dataclass(frozen=True)
class Usage:
    """The figures statfs and status need."""

    inodes: int
    logical_bytes: int  # bytes of files that extents cover
    stored_bytes: int  # bytes of referenced blocks (each once: dedup)
    blocks: int  # referenced blocks


@dataclass(frozen=True)
class BlockRow:
    id: str
    size: int
    refcount: int
    zero_since_ns: int | None  # refcount 0 since then; None while referenced


@dataclass(frozen=True)
class SessionInfo:
    """A mount (or a repairing fsck) of the filesystem that is alive."""

    id: str
    kind: str  # "mount", "rebalance" or "repair"
    host: str
    mountpoint: str
    pid: int
    version: str  # hafs version
    since_ns: int
    expires_ns: int


@dataclass(frozen=True)
class FsState:
    """What a dump holds besides its records: the settings and the inode counter."""

    config: FsConfig
    ring: dict
    ring_changed_ns: int  # 0: not changed since mkfs
    next_ino: int  # the lowest inode number never handed out (numbers are never reused)
    owner: str | None = None  # the store's owner token (hafs.store.owner); None: none yet
    owner_previous: tuple[str, ...] = ()  # the tokens it held before


@dataclass(frozen=True)
class Entry:
    """A directory entry (one per name: hard links are several entries of one inode)."""

    parent: int
    name: bytes
    inode: int


@dataclass(frozen=True)
class Xattr:
    inode: int
    name: bytes
    value: bytes


@dataclass(frozen=True)
class FileExtent:
    inode: int
    extent: Extent


@dataclass(frozen=True)
class Degraded:
    """A block recorded as written while a node failed (`record_degraded`)."""

    block_id: str
    nodes: tuple[str, ...]
    since_ns: int


# What `MetaStore.dump` yields and an engine's `load` takes, kind by kind in this order.
# Blocks with refcount 0 are the garbage list.
Record = Inode | Entry | Xattr | FileExtent | BlockRow | Degraded


def session_conflict(kind: str, alive: list[SessionInfo]) -> str | None:
    """Why a new session of `kind` may not start beside the `alive` ones (None: it may).

    A repair ("hafs fsck --repair") runs alone; a mount or a rebalance never runs beside
    a repair; two rebalances never run at once.  Every engine's `register` asks this
    inside the transaction that adds the session.
    """
    for s in alive:
        where = f"{s.host}:{s.mountpoint}" if s.mountpoint else s.host
        if s.kind == "repair":
            return (
                "the filesystem is being repaired by 'hafs fsck --repair' or 'hafs node adopt'"
                f" ({s.host}, pid {s.pid}): wait until that has finished"
            )
        if kind == "repair":
            return (
                f"the filesystem is in use ({s.kind} on {where}, pid {s.pid}): unmount every"
                " mount and let rebalances finish before 'hafs fsck --repair' or 'hafs node"
                " adopt'; a check without --repair may run while it is mounted"
            )
        if kind == "rebalance" and s.kind == "rebalance":
            return f"another 'hafs rebalance' is running ({s.host}, pid {s.pid}): wait for it"
    return None


# ---------------------------------------------------------------- interface


class MetaStore(Protocol):
    """One filesystem's metadata (see the module docstring)."""

    direct: bool  # calls are cheap enough for the trio thread
    local_calls: frozenset[str]  # methods that are, on an engine that is not direct
    locks_at_create: bool  # mknod(locked=True) takes the write lock in its transaction
    locks: LockService
    sessions: Sessions

    def close(self) -> None: ...
    def sync(self) -> None:
        """Make every committed transaction durable (fsync, or a no-op where commits are)."""

    # configuration and ring
    def config(self) -> FsConfig:
        """The configuration, read once (cached)."""

    def fresh_config(self) -> FsConfig:
        """The configuration as stored now (not cached); callable from any thread (a
        node client that was refused re-reads the token and CA with it)."""

    def update_config(self, **changes: str | None) -> FsConfig:
        """Change the fields of CHANGEABLE_CONFIG (`hafs node token`, `hafs node ca`) in
        one transaction; returns the new configuration.  The others never change."""

    def ring(self) -> dict:
        """The ring description: {"version": N, "nodes": [{id, address, weight, zone, state}]}."""

    def ring_changed_ns(self) -> int:
        """When the ring last got a new version (0: at mkfs)."""

    def replace_ring(self, ring: dict, expect_version: int) -> bool:
        """Store `ring` if the stored one still has `expect_version` (else False)."""

    # ownership of the nodes (hafs.store.owner, hafs.home.owner_claim)
    def owner(self) -> Owner:
        """The store's owner token and, for a store that is a file (sqlite), whether this
        file is the one the token was given to: a copy (`cp -a` of the home: another
        file) says where that one was; for the same file at another path or on a disk
        now numbered otherwise, `moved_from` says where it was recorded.  Reads only."""

    def adopt(self, token: str) -> None:
        """Make `token` the store's owner token (the one it had joins `previous`) and, for a
        file, record this file as the one it belongs to."""

    def wait_ring(self, version: int, poll_s: float) -> None:
        """Block until the stored ring may have a version other than `version`: an engine
        with a watch (etcd) returns as soon as it is written (and every so often anyway),
        one without (sqlite) after poll_s.  Called from a worker thread of its own."""

    # inodes and entries
    def getattr(self, ino: int) -> Inode | None: ...
    def lookup(self, parent: int, name: bytes) -> Inode | None:
        """The inode named `name` in `parent`; ENOENT/ENOTDIR for a bad parent."""

    def parent_of(self, ino: int) -> int | None: ...
    def readdir(self, parent: int, after: int, limit: int) -> list[tuple[Dentry, Inode]]:
        """Up to `limit` entries after cursor `after` (0: from the start), with their inodes."""

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
        """A new file, directory, symlink or special file: EEXIST, ENOENT (parent gone),
        ENOTDIR.  A setgid parent gives its group (and setgid to a directory).

        locked (a regular file its creator writes): an engine with `locks_at_create`
        takes the file's write lock in the same transaction; the caller's next
        `locks.acquire` of "inode:<ino>" then gets it without a request, and it must ask
        for it (and release it) as for any lock.  Other engines ignore it."""

    def link(self, ino: int, parent: int, name: bytes) -> Inode: ...
    def unlink(self, parent: int, name: bytes, open_here: Container[int] = ()) -> Inode:
        """Remove a non-directory's name; returns the inode as left (nlink 0: no name).
        An inode that lost its last name is deleted in the same transaction unless it is
        in `open_here` (the caller's open files): then it stays, kept for this session."""

    def rmdir(self, parent: int, name: bytes) -> int:
        """Remove an empty directory; returns its inode number."""

    def rename(self, p_old: int, n_old: bytes, p_new: int, n_new: bytes, flags: int) -> int | None:
        """rename(2) with RENAME_NOREPLACE / RENAME_EXCHANGE; returns the inode that lost its
        name by being replaced (None: none)."""

    def setattr(self, ino: int, **fields: int) -> Inode:
        """Set mode, uid, gid, atime_ns, mtime_ns (ctime follows)."""

    def delete_inode(self, ino: int) -> bool:
        """Delete an inode without a name (its extents release their blocks); False if it
        has a name again or is gone."""

    def unlinked_inodes(self) -> list[int]:
        """Inodes with no name left (kept while open on some mount)."""

    def path_of(self, ino: int) -> str:
        """One path of the inode, for messages ('<inode N>' when it has no name)."""

    # xattrs
    def get_xattr(self, ino: int, name: bytes) -> bytes | None: ...
    def set_xattr(self, ino: int, name: bytes, value: bytes) -> None: ...
    def list_xattrs(self, ino: int) -> list[bytes]: ...
    def remove_xattr(self, ino: int, name: bytes) -> None:
        """ENODATA when the inode has no such xattr."""

    # content
    def extents(self, ino: int, start: int, end: int) -> list[Extent]:
        """Extents overlapping [start, end), in offset order."""

    def allocated_bytes(self, ino: int) -> int:
        """Bytes of the file that extents cover (holes are not counted)."""

    def fence(self, ino: int, token: int) -> Inode:
        """Record `token` as the inode's newest write token; LockLost if a newer one is.
        Returns the inode as it is then (the last writer's size: one call, not two)."""

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
        """Replace the file's content in [start, end) by `new` and set its size (data before
        metadata: every new block is durable already).  Old extents lie wholly inside or
        outside the range.  `sizes`: each new block's size.  With a token, LockLost unless
        it is the inode's newest.  Returns the inode as committed."""

    def truncate(self, ino: int, size: int, mtime_ns: int, token: int | None = None) -> Inode:
        """Cut or extend the file to `size` (fenced as commit).  Returns the inode then."""

    # figures
    def usage(self) -> Usage: ...
    def count_inodes(self) -> int: ...

    # blocks: garbage and degraded records
    def garbage_blocks(self, before_ns: int, limit: int) -> list[str]:
        """Blocks no extent has referenced since before `before_ns`."""

    def referenced(self, block_ids: list[str]) -> set[str]:
        """Those of the blocks that extents reference now, where the engine can tell
        without a request over the network (else none): such a block is durable already
        (invariant 2 held for its first reference) and no garbage until its count has
        been zero for the grace period, so a writer may reference it without storing it
        again."""

    def forget_block(self, block_id: str) -> bool:
        """Drop an unreferenced block's row (after its copies are deleted); False if it is
        referenced again."""

    def record_degraded(self, block_id: str, nodes: list[str]) -> None:
        """A block whose copies went to `nodes`, not (all) where the ring says."""

    def degraded_blocks(self, after: str, limit: int) -> list[tuple[str, list[str]]]: ...
    def forget_degraded(self, block_id: str) -> None: ...
    def clear_degraded(self, keep: set[str]) -> int: ...
    def count_degraded(self) -> int: ...

    # paged scans (fsck, rebalance): each page in key order after the cursor given
    def scan_inodes(self, after: int, limit: int) -> list[Inode]: ...
    def scan_entries(self, after: tuple[int, bytes], limit: int) -> list[tuple[int, bytes, int]]:
        """(parent, name, inode) after (parent, name), in that order."""

    def scan_blocks(self, after: str, limit: int) -> list[BlockRow]: ...
    def scan_extents(self, after: tuple[int, int], limit: int) -> list[tuple[int, Extent]]:
        """(inode, extent) after (inode, offset)."""

    def block_users(self, block_id: str, limit: int) -> list[int]:
        """Inodes whose extents reference the block."""

    def block_refs(self, block_id: str) -> int:
        """How many extents reference the block (what its refcount must say)."""

    def block_rows(self, block_ids: list[str]) -> dict[str, BlockRow]:
        """The rows of those of `block_ids` that have one."""

    def names(self, ino: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to `limit` entries (parent, name) naming the inode: the oldest first where the
        engine records an order (sqlite), else in key order."""

    # fsck: checks of the engine's own storage, and repairs.  A check opens the engine
    # read-only (hafs.home.open_meta(read_only=True)) and modifies nothing.  The repairs
    # are what `fsck --repair` needs beyond the filesystem operations, each one
    # transaction that takes the stored state as it is (damaged); they run inside a
    # "repair" session, alone.  They keep the engine's own indexes and refcounts right;
    # the link counts and sizes they leave are fsck's to set.
    def describe(self) -> dict:
        """What a report names the metadata by: {"engine", "location", "schema"
        (version of the stored layout), "current" (the one this hafs writes), "recover"
        (how to recover a store `check_storage` finds damaged)}."""

    def check_storage(self, limit: int) -> list[str]:
        """Up to `limit` problems of the engine's own storage (sqlite: integrity_check;
        [] when it is sound or there is nothing to check)."""

    def damaged(self, exc: BaseException) -> str | None:
        """What `exc`, raised by one of this engine's calls, says about damaged storage
        (None: it is not such an error)."""

    def snapshot(self) -> AbstractContextManager[bool]:
        """A block whose reads see one state of the metadata, where the engine can give
        one (sqlite: a read transaction); yields whether it does.  No writes inside."""

    # dump and load ("hafs meta dump", "hafs meta load", "hafs fsck --salvage")
    def dump(self) -> AbstractContextManager[tuple[FsState, Iterator[Record]]]:
        """Every record of the filesystem as one state of the metadata shows it (sqlite: one
        read transaction; kv: reads at one revision, that the KV keeps until the block
        ends): the FsState and an iterator of the records (inodes, entries, xattrs,
        extents, blocks, degraded records, each kind in key order; entries the oldest first
        where the engine records an order), read page by page.  Not in it: live state (write
        locks, sessions, fencing tokens), and what the engine derives from the records
        (indexes, counters).  Each engine also has a `load` constructor beside `create`
        that makes a new filesystem from an FsState and records (refusing a store that
        holds anything), so that any engine's dump loads into any other."""

    def fsck_add_root(self, uid: int, gid: int) -> bool:
        """Make a new, empty root directory (inode ROOT_INODE) if there is none."""

    def fsck_drop_entry(self, parent: int, name: bytes) -> int | None:
        """Drop the entry, whatever it names and wherever it sits; returns the inode it
        named (None: there was no such entry).  Link counts are left as they are: a file
        that lost its last name this way keeps its links, so fsck sees an orphan to move
        to /lost+found, not a deleted file."""

    def fsck_add_entry(self, parent: int, name: bytes, ino: int) -> None:
        """Give the existing inode `ino` the name `name` in directory `parent` (EEXIST,
        ENOENT, ENOTDIR as for link).  Link counts follow as link and mkdir would: a
        directory adds one to the parent's, a non-directory's becomes its number of names."""

    def fsck_set_nlink(self, ino: int, nlink: int) -> None: ...
    def fsck_set_size(self, ino: int, size: int) -> None:
        """Set the size field only (no extent changes: for directories and symlinks)."""

    def fsck_drop_extent(self, ino: int, offset: int) -> bool:
        """Drop the extent at (ino, offset) and release its block (a missing block row is
        left missing); False if there is none."""

    def fsck_cut_extent(self, ino: int, offset: int, length: int) -> None:
        """Shorten the extent at (ino, offset) to `length` bytes (0 < length < its
        length; ENOENT if there is none, EINVAL for a bad length)."""

    def fsck_set_block(self, block_id: str, size: int, refcount: int) -> None:
        """Make the block's row say `size` bytes and `refcount` extents, adding the row if
        missing.  Refcount 0 keeps the time it went to zero (now, if it was referenced);
        a referenced block has none."""


class Lease(Protocol):
    name: str
    token: int  # fencing token: greater than every earlier grant of the name


class LockService(Protocol):
    """Write locks granted as leases with fencing tokens (invariant 6)."""

    async def acquire(self, name: str, wait_s: float) -> Any:
        """A Lease; waits up to wait_s for another holder, then LockTimeout."""

    async def keepalive(self, lease: Any) -> None:
        """Renew; LockLost if it expired or was taken over."""

    def valid(self, lease: Any) -> bool:
        """Whether the lease is still ours by the clock (commits check the token too)."""

    async def release(self, lease: Any) -> None: ...
    def held(self) -> list[Any]:
        """Every lock whose lease has not ended (LockInfo), for status."""


class Sessions(Protocol):
    """Which mounts of the filesystem are alive (and which fsck repairs it)."""

    def register(self, kind: str, mountpoint: str, ttl_s: float) -> SessionInfo:
        """Start a session; UserError when `session_conflict` forbids it."""

    def renew(self, session: SessionInfo) -> SessionInfo: ...
    def end(self, session: SessionInfo) -> None: ...
    def alive(self) -> list[SessionInfo]: ...
    def reap(self) -> list[SessionInfo]:
        """End the sessions whose lease ran out (their mounts died) and delete the inodes
        that only sessions that are over kept (unlinked while open there); returns the
        sessions ended."""

    def elect(self, role: str) -> bool:
        """Whether this client has `role` now (taking it if no live client has it): the
        background work that runs on one client at a time (LEAD_ROLE).  The role is bound
        to the client's lease, so it moves on when that client dies.  An engine without an
        election answers True (every client has it)."""

    def leader(self, role: str) -> str | None:
        """The session id of the client that has `role` (None: no election, or no one)."""


# ------------------------------------------------------------ trio access


class AsyncCalls:
    """An engine object (the MetaStore, its Sessions) as trio code calls it:
    `await meta.lookup(...)`.

    A direct engine is called on the trio thread (no await inside, so each call
    is atomic with respect to every other task of the mount, and an SQLite
    connection is never used from two threads); the others in a worker thread,
    at most `limiter` at once.
    """

    def __init__(self, obj: Any, direct: bool, limiter: trio.CapacityLimiter) -> None:
        self._obj = obj
        self._direct = direct
        self._limiter = limiter

    def __getattr__(self, name: str) -> Callable[..., Any]:
        fn = getattr(self._obj, name)
        if self._direct or name in getattr(self._obj, "local_calls", ()):

            async def call(*args: Any, **kwargs: Any) -> Any:
                return fn(*args, **kwargs)
        else:

            async def call(*args: Any, **kwargs: Any) -> Any:
                return await trio.to_thread.run_sync(
                    functools.partial(fn, *args, **kwargs), limiter=self._limiter
                )

        call.__name__ = name
        setattr(self, name, call)  # made once per method
        return call


class AsyncMeta(AsyncCalls):
    """The MetaStore for trio code; `.sessions` likewise; `.engine` the engine itself."""

    def __init__(self, engine: MetaStore, limiter: trio.CapacityLimiter | None = None) -> None:
        limiter = limiter or trio.CapacityLimiter(8)
        super().__init__(engine, engine.direct, limiter)
        self.engine = engine
        self.sessions = AsyncCalls(engine.sessions, engine.direct, limiter)
