"""The block store of one backing directory.

Layout of a backing directory (DESIGN: "Data layout on a backing directory")::

    hafs-node.json          identity: {"format": 1, "fs_uuid", "node_id", "created_ns",
                            and once a metadata store claimed it "owner" (its token) and
                            "owner_where" (hafs.store.owner)}
    blocks/ab/<id>          one file per block; ab = id[0:2] (256 fan-out directories,
                            made when the store is opened: a new block never waits on a mkdir)
    tmp/<id>.<random>       a put() in progress (or left over by a crash: harmless)
    corrupt/<id>.<time_ns>  blocks that failed verification, kept for inspection

A block id is the BLAKE3-256 hex digest of the block's bytes (`block_id`, the
one place ids are computed). Every public method validates the id against
`BLOCK_ID_RE`, so no caller can make a path out of it.

Durability of `put` (DESIGN invariant 2), in order:

1. write the bytes to ``tmp/<id>.<random>`` (O_EXCL) and fsync the file;
2. (re)create the fan-out directory if someone removed it;
3. rename the temp file to ``blocks/ab/<id>`` (atomic);
4. fsync ``blocks/ab``.

When the block is already there with the right size, steps 1-3 are skipped
(content addressing makes the write idempotent), its mtime is refreshed so a
garbage collector honouring the grace period (invariant 5) cannot delete a block
a writer has just stored again, and step 4 still runs: the file may have been
renamed by another thread or process an instant ago and not yet be durable.

`get` verifies the hash (invariant 1). A block that fails is moved to
``corrupt/`` so it is never served again, logged as ``BLOCK-CORRUPT``, and
reported as `BlockCorrupt`; fsck or read-repair then puts a good copy back.

Concurrency: every method is synchronous and meant for worker threads
(`trio.to_thread.run_sync`); any number of threads, and other processes (fsck
beside a mount), may use one directory at once, with the same or different ids.

- Each put writes its own temp file (random suffix, O_EXCL), so puts of one id
  never share a file; the last rename wins and every contender's bytes are the
  same. No lock is taken on the hot path.
- The only shared mutable state is the set of fan-out directories known to
  exist. Membership is read without the lock (a single set lookup is atomic);
  creating a directory, fsyncing its parent and adding it to the set happen
  under `_dirs_lock`, and a directory joins the set only after its parent was
  fsynced, so no thread trusts a directory entry that is not yet durable. When
  mkdir finds the directory already there (another process made it), the
  parent is fsynced all the same.
- Moving a corrupt block aside races with a put of a good copy: after the
  rename, the moved file's inode is compared with the one that was read, and a
  good copy moved by mistake is renamed back.

Ownership (hafs.store.owner): a DirStore opened with an `OwnerClaim` takes the
directory for that metadata store (`open` switches a directory that records no
owner or a previous token of the store, and refuses one of another store:
NodeOwnedElsewhere) and checks the owner before every delete (NotOwner if
another store took the directory meanwhile).  The identity file is rewritten
(temp file, fsync, rename) under an flock of the directory, so two processes
switching the owner at once cannot lose one another's check.

OS errors other than a missing block (ENOSPC, EIO, EACCES) propagate as
OSError; the layer above treats them as a failed replica.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from blake3 import blake3

from hafs.errors import (
    BlockCorrupt,
    BlockMissing,
    NodeIdentityError,
    NodeOwnedElsewhere,
    NotOwner,
    UserError,
)

from .owner import OwnerClaim, foreign

log = logging.getLogger(__name__)

BLOCK_ID_RE = re.compile(r"^[0-9a-f]{64}$")
IDENTITY_FILE = "hafs-node.json"
IDENTITY_FORMAT = 1

_IDENTITY_TMP_PREFIX = "." + IDENTITY_FILE + "."  # temp files of an atomic identity write
_PREFIX_RE = re.compile(r"[0-9a-f]{0,64}")  # what `after` in iter_ids may be
_FANOUT_RE = re.compile(r"[0-9a-f]{2}")
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC


def block_id(data: bytes | bytearray | memoryview) -> str:
    """Return the id of a block: BLAKE3-256 of its bytes, as 64 lower-case hex digits."""
    return blake3(data).hexdigest()


_compute_id = block_id  # methods take a parameter called block_id


def check_block_id(value: object) -> str:
    """Return `value` if it is a well-formed block id, else raise ValueError."""
    if not isinstance(value, str) or BLOCK_ID_RE.fullmatch(value) is None:
        raise ValueError(f"invalid block id {value!r}: expected 64 lower-case hex digits")
    return value


@dataclass
class StoreUsage:
    total_bytes: int  # capacity of the filesystem holding the directory (f_blocks * f_frsize)
    free_bytes: int  # space available to unprivileged users (f_bavail * f_frsize)
    block_count: int  # number of block files
    block_bytes: int  # sum of their sizes


def disk_id(path: str | Path) -> str:
    """Which disk holds `path`, the same string from any process on this machine:
    the machine id and the device number, so `df` counts a disk shared by several
    nodes (backing directories or local block nodes) once."""
    return f"{_machine_id()}:{os.stat(path).st_dev}"


@functools.cache
def _machine_id() -> str:
    try:
        with open("/etc/machine-id") as f:
            return f.read().strip() or os.uname().nodename
    except OSError:
        return os.uname().nodename


def _fsync_dir(path: str) -> None:
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_identity(path: str | Path) -> dict | None:
    """Return the identity of backing directory `path`, or None if it has no identity file.

    Raises NodeIdentityError if the file exists but is unreadable or malformed.
    """
    file = Path(path) / IDENTITY_FILE
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise NodeIdentityError(
            f"cannot read identity file {file}: {e.strerror}: fix its permissions"
        ) from None
    try:
        ident = json.loads(raw)
    except ValueError as e:
        raise NodeIdentityError(
            f"identity file {file} is not valid JSON ({e}): restore it from a backup, "
            "or re-create the node and let fsck re-replicate its blocks"
        ) from None
    if (
        not isinstance(ident, dict)
        or not isinstance(ident.get("fs_uuid"), str)
        or not isinstance(ident.get("node_id"), str)
    ):
        raise NodeIdentityError(f"identity file {file} lacks fs_uuid or node_id: restore it")
    if ident.get("format") != IDENTITY_FORMAT:
        raise NodeIdentityError(
            f"identity file {file} has format {ident.get('format')!r}; this hafs "
            f"understands format {IDENTITY_FORMAT}: use a matching hafs version"
        )
    return ident


def _describe(ident: dict) -> str:
    return f"filesystem {ident['fs_uuid']} node {ident['node_id']}"


class DirStore:
    """The blocks of one node, stored in a local backing directory (see the module docstring)."""

    def __init__(
        self, path: str | Path, node_id: str, fs_uuid: str, owner: OwnerClaim | None = None
    ) -> None:
        # No I/O here: use DirStore.open() (mount) or DirStore.create() (mkfs).
        self.path = Path(path)
        self.node_id = node_id
        self.fs_uuid = fs_uuid
        self.owner = owner  # the metadata store that changes the blocks (None: no check)
        self._owned: tuple[int, int] | None = None  # (ino, mtime) of the identity file checked
        root = os.fspath(self.path)
        self._blocks = root + "/blocks"
        self._tmp = root + "/tmp"
        self._corrupt = root + "/corrupt"
        self._known_dirs: set[str] = set()  # fan-out directories "ab" known to exist durably

    def __repr__(self) -> str:
        return f"DirStore({os.fspath(self.path)!r}, node_id={self.node_id!r})"

    # ----------------------------------------------------------------- setup

    def _identity(self) -> dict:
        return {"fs_uuid": self.fs_uuid, "node_id": self.node_id}

    def _matches(self, ident: dict) -> bool:
        return ident["fs_uuid"] == self.fs_uuid and ident["node_id"] == self.node_id

    @classmethod
    def create(
        cls, path: str | Path, node_id: str, fs_uuid: str, owner: OwnerClaim | None = None
    ) -> DirStore:
        """Initialise a backing directory for `node_id` of filesystem `fs_uuid` (mkfs).

        Creates the directory (and its parents) if missing and writes the identity
        file atomically (with `owner`'s token, if given). Idempotent for the same
        identity. Refuses, modifying nothing, a directory of another identity or a
        non-empty one without identity.
        """
        if not node_id or not fs_uuid:
            raise ValueError("node_id and fs_uuid must not be empty")
        store = cls(path, node_id, fs_uuid, owner)
        root = store.path
        try:
            store._make_dirs(root)
        except FileExistsError:
            raise UserError(
                f"backing directory {root} of node {node_id} exists and is not a directory: "
                "choose another path"
            ) from None
        except OSError as e:
            raise UserError(
                f"cannot create backing directory {root} of node {node_id}: {e.strerror}"
            ) from None
        ident = read_identity(root)
        if ident is not None and not store._matches(ident):
            raise NodeIdentityError(
                f"backing directory {root} already belongs to {_describe(ident)}; refusing to "
                f"make it {_describe(store._identity())}: choose an empty directory"
            )
        if ident is None:
            names = os.listdir(root)
            others = sorted(n for n in names if not n.startswith(_IDENTITY_TMP_PREFIX))
            if others:
                shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
                raise NodeIdentityError(
                    f"backing directory {root} is not empty ({shown}) and has no identity file "
                    f"{IDENTITY_FILE}: choose an empty directory, or empty this one"
                )
        try:
            if ident is None:
                for n in names:  # temp files of an identity write cut short by a crash
                    os.unlink(os.path.join(root, n))
                store._write_identity({**store._identity(), "created_ns": time.time_ns()})
                log.info("created backing directory %s for node %s of %s", root, node_id, fs_uuid)
            elif owner is not None:
                store._take(ident)
            store._make_subdirs()
        except OSError as e:
            raise UserError(
                f"cannot initialise backing directory {root} of node {node_id}: {e}"
            ) from None
        return store

    @classmethod
    def open(
        cls, path: str | Path, node_id: str, fs_uuid: str, owner: OwnerClaim | None = None
    ) -> DirStore:
        """Open the backing directory of `node_id` of filesystem `fs_uuid` (mount).

        Refuses, modifying nothing, a missing or unwritable directory (UserError)
        and one without this identity (NodeIdentityError).  With `owner`, the
        directory is taken for that metadata store: NodeOwnedElsewhere if it
        belongs to another one (module docstring).
        """
        store = cls(path, node_id, fs_uuid, owner)
        root = store.path
        if not root.is_dir():
            what = "is not a directory" if root.exists() else "is missing"
            raise UserError(
                f"backing directory {root} of node {node_id} {what}: restore it or remove the node"
            )
        ident = read_identity(root)
        if ident is None:
            raise NodeIdentityError(
                f"backing directory {root} has no identity file {IDENTITY_FILE}; expected "
                f"{_describe(store._identity())}: attach the right directory, or initialise "
                "this one with mkfs"
            )
        if not store._matches(ident):
            raise NodeIdentityError(
                f"backing directory {root} belongs to {_describe(ident)}, expected "
                f"{_describe(store._identity())}: attach the right directory for node {node_id}"
            )
        for d in (os.fspath(root), store._blocks, store._tmp):
            if os.path.exists(d) and not os.access(d, os.W_OK | os.X_OK):
                raise UserError(
                    f"backing directory {root} of node {node_id} is not writable ({d}): "
                    "fix its permissions or mount it read-write"
                )
        if owner is not None:
            store._take(ident)
        store._make_subdirs()
        return store

    # ---------------------------------------------------------------- owner

    def _take(self, ident: dict) -> None:
        """Make the directory (identity `ident`) this store's owner's, or refuse it."""
        recorded = ident.get("owner")
        if recorded != self.owner.token:
            if not self.owner.takes(recorded):
                raise NodeOwnedElsewhere(self._foreign(ident))
            self.set_owner(self.owner, expect=(recorded,))

    def _foreign(self, ident: dict) -> str:
        return foreign(
            f"backing directory {self.path} of node {self.node_id}", ident.get("owner_where")
        )

    def owner_of(self) -> tuple[str | None, str | None]:
        """(token, where) of the metadata store the directory records as its owner."""
        ident = read_identity(self.path) or {}
        return ident.get("owner"), ident.get("owner_where")

    def set_owner(self, claim: OwnerClaim, expect: tuple[str | None, ...] | None = None) -> None:
        """Record `claim`'s store as the directory's owner, durably; with `expect`, only if
        the owner recorded now is one of those (else NotOwner, nothing changed)."""
        fd = os.open(self.path, _DIR_FLAGS)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            ident = read_identity(self.path)
            if ident is None or not self._matches(ident):
                raise NodeIdentityError(f"{self.path} is no longer node {self.node_id}'s directory")
            recorded = ident.get("owner")
            if expect is not None and recorded not in expect:
                raise NotOwner(self._foreign(ident))
            if (recorded, ident.get("owner_where")) != (claim.token, claim.where):
                self._write_identity({**ident, "owner": claim.token, "owner_where": claim.where})
                log.info(
                    "NODE-OWNER backing directory %s of node %s: owned by %s (was %s)",
                    self.path,
                    self.node_id,
                    claim.where or claim.token,
                    ident.get("owner_where") or recorded or "nobody",
                )
        finally:
            os.close(fd)  # releases the lock

    def _check_owner(self) -> None:
        """Before a delete: NotOwner unless the directory is (or becomes) this owner's.

        The identity file is read again only when its (inode, mtime) changed since
        the last check that found it this owner's (a rewrite is a rename: a new inode).
        """
        seen = self._identity_stat()
        if seen is not None and seen == self._owned:
            return
        try:
            self._take(read_identity(self.path) or {})
        except NodeIdentityError as e:  # NodeOwnedElsewhere, or no identity any more
            raise NotOwner(str(e)) from None
        if seen is not None and seen == self._identity_stat():  # what _take read: remember it
            self._owned = seen

    def _identity_stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path / IDENTITY_FILE)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns

    def ping(self) -> None:
        """Raise OSError unless the directory is still this node's and writable (health probe)."""
        try:
            ident = read_identity(self.path)
        except NodeIdentityError as e:
            raise OSError(errno.ENODEV, str(e)) from None
        if ident is None or not self._matches(ident):
            raise OSError(errno.ENODEV, f"{self.path} is no longer node {self.node_id}'s directory")
        if not os.access(self._tmp, os.W_OK | os.X_OK):
            raise OSError(errno.EROFS, f"{self._tmp} is not writable")

    def _make_dirs(self, path: Path) -> None:
        """mkdir -p `path`, fsyncing the parent of every directory created."""
        missing = []
        p = path
        while not p.exists():
            missing.append(p)
            if p.parent == p:
                break
            p = p.parent
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:
                if not d.is_dir():
                    raise
            _fsync_dir(os.fspath(d.parent))
        if not path.is_dir():
            raise FileExistsError(errno.EEXIST, "not a directory", os.fspath(path))

    def _make_subdirs(self) -> None:
        for parent, names in (
            (os.fspath(self.path), ("blocks", "tmp", "corrupt")),
            (self._blocks, [f"{i:02x}" for i in range(256)]),
        ):
            created = False
            for name in names:
                try:
                    os.mkdir(f"{parent}/{name}")
                    created = True
                except FileExistsError:
                    pass
            if created:
                _fsync_dir(parent)
        self._known_dirs.update(f"{i:02x}" for i in range(256))

    def _write_identity(self, ident: dict) -> None:
        """Write the identity file atomically and durably (temp file, fsync, rename)."""
        root = os.fspath(self.path)
        ident = {**ident, "format": IDENTITY_FORMAT}
        if self.owner is not None and "owner" not in ident:
            ident.update(owner=self.owner.token, owner_where=self.owner.where)
        tmp = f"{root}/{_IDENTITY_TMP_PREFIX}{secrets.token_hex(8)}"
        data = (json.dumps(ident, indent=1) + "\n").encode()
        fd = os.open(tmp, _NEW_FILE_FLAGS, 0o644)
        try:
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, f"{root}/{IDENTITY_FILE}")
        except BaseException:
            _unlink_quietly(tmp)
            raise
        _fsync_dir(root)

    # ---------------------------------------------------------------- blocks

    def _dir_of(self, bid: str) -> str:
        return f"{self._blocks}/{bid[:2]}"

    def _path_of(self, bid: str) -> str:
        return f"{self._blocks}/{bid[:2]}/{bid}"

    def _ensure_fanout(self, bid: str) -> None:
        """Make blocks/ab exist durably (made by open(); cached, so usually no syscall)."""
        ab = bid[:2]
        if ab in self._known_dirs:  # a set lookup is atomic: no lock on the hot path
            return
        try:
            os.mkdir(f"{self._blocks}/{ab}")
        except FileExistsError:
            pass  # maybe made a moment ago by another process: fsync anyway
        _fsync_dir(self._blocks)
        self._known_dirs.add(ab)

    def put(self, block_id: str, data: bytes | bytearray | memoryview) -> None:
        """Store `data` under `block_id` durably and atomically (see the module docstring).

        The caller computed the id from the data; put() does not hash.
        """
        bid = check_block_id(block_id)
        mv = memoryview(data).cast("B")
        size = mv.nbytes
        target = self._path_of(bid)
        try:
            st = os.stat(target)
        except FileNotFoundError:
            st = None
        if st is not None:
            if st.st_size == size:
                try:
                    os.utime(target)  # restart the garbage grace period
                except FileNotFoundError:
                    pass  # deleted meanwhile: write it again below
                else:
                    _fsync_dir(self._dir_of(bid))
                    return
            else:
                log.warning(
                    "BLOCK-CORRUPT %s on node %s: size %d, expected %d; replacing it",
                    bid,
                    self.node_id,
                    st.st_size,
                    size,
                )
        tmp = f"{self._tmp}/{bid}.{secrets.token_hex(8)}"
        fd = os.open(tmp, _NEW_FILE_FLAGS, 0o644)
        try:
            try:
                while mv:
                    mv = mv[os.write(fd, mv) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            self._ensure_fanout(bid)
            os.rename(tmp, target)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        _fsync_dir(self._dir_of(bid))

    def get(self, block_id: str) -> bytes:
        """Return the bytes of block `block_id`, verified against the id.

        Raises BlockMissing if this node lacks it and BlockCorrupt (after moving
        the file to corrupt/) if its bytes do not hash to the id.
        """
        bid = check_block_id(block_id)
        path = self._path_of(bid)
        try:
            f = open(path, "rb", buffering=0)
        except FileNotFoundError:
            raise BlockMissing(bid, f"not on node {self.node_id}") from None
        with f:
            data = f.readall()
            actual = _compute_id(data)
            if actual == bid:
                return data
            st = os.fstat(f.fileno())
        moved_to = self._quarantine(bid, path, st)
        log.warning(
            "BLOCK-CORRUPT %s on node %s: %d bytes hash to %s; %s",
            bid,
            self.node_id,
            len(data),
            actual,
            f"moved to {moved_to}" if moved_to else "already moved aside",
        )
        raise BlockCorrupt(bid, where=self.node_id)

    def _quarantine(self, bid: str, path: str, st: os.stat_result) -> str | None:
        """Move the corrupt file `path` (whose stat is `st`) to corrupt/; return where."""
        os.makedirs(self._corrupt, exist_ok=True)
        dest = f"{self._corrupt}/{bid}.{time.time_ns()}"
        try:
            os.rename(path, dest)
        except FileNotFoundError:
            return None  # another thread moved it aside (or deleted it) already
        moved = os.stat(dest)
        if (moved.st_dev, moved.st_ino) != (st.st_dev, st.st_ino):
            # A put() replaced the bad file between our read and the rename: the file
            # we moved is a good copy. Put it back (a newer good copy is just as good).
            os.rename(dest, path)
            return None
        return dest

    def has(self, block_id: str) -> bool:
        """True if this node has a file for `block_id` (not verified)."""
        return self.size(block_id) is not None

    def size(self, block_id: str) -> int | None:
        """The size of block `block_id` in bytes, or None if this node lacks it."""
        try:
            return os.stat(self._path_of(check_block_id(block_id))).st_size
        except FileNotFoundError:
            return None

    def mtime_ns(self, block_id: str) -> int | None:
        """When block `block_id` was last stored (put again counts), or None if absent."""
        try:
            return os.stat(self._path_of(check_block_id(block_id))).st_mtime_ns
        except FileNotFoundError:
            return None

    def delete(self, block_id: str) -> bool:
        """Remove block `block_id`; True if it existed. Durable when it returns."""
        bid = check_block_id(block_id)
        if self.owner is not None:
            self._check_owner()
        try:
            os.unlink(self._path_of(bid))
        except FileNotFoundError:
            return False
        _fsync_dir(self._dir_of(bid))
        return True

    def iter_ids(self, after: str = "", limit: int = 1000) -> list[str]:
        """One page of block ids, sorted, each strictly greater than `after`.

        `after` is "" (from the start), a block id (the last of the previous page)
        or any shorter lower-case hex prefix. Fan-out directories that sort
        wholly before `after` are skipped without being listed.
        """
        if not isinstance(after, str) or _PREFIX_RE.fullmatch(after) is None:
            raise ValueError(f"invalid iter_ids cursor {after!r}: expected lower-case hex")
        if limit < 1:
            raise ValueError(f"iter_ids limit must be positive, got {limit}")
        out: list[str] = []
        for ab in _sorted_fanout(self._blocks):
            if ab < after[:2]:
                continue
            try:
                names = os.listdir(f"{self._blocks}/{ab}")
            except FileNotFoundError:
                continue
            ids = sorted(
                n for n in names if n > after and n.startswith(ab) and BLOCK_ID_RE.fullmatch(n)
            )
            out.extend(ids[: limit - len(out)])
            if len(out) >= limit:
                return out
        return out

    def usage(self) -> StoreUsage:
        """Capacity and free space of the underlying filesystem, and what the blocks take."""
        vfs = os.statvfs(self.path)
        count = total = 0
        for ab in _sorted_fanout(self._blocks):
            try:
                it = os.scandir(f"{self._blocks}/{ab}")
            except FileNotFoundError:
                continue
            with it:
                for entry in it:
                    if BLOCK_ID_RE.fullmatch(entry.name) is None:
                        continue
                    try:
                        total += entry.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue
                    count += 1
        return StoreUsage(
            total_bytes=vfs.f_blocks * vfs.f_frsize,
            free_bytes=vfs.f_bavail * vfs.f_frsize,
            block_count=count,
            block_bytes=total,
        )

    def cleanup_tmp(self, older_than_s: float = 3600) -> int:
        """Remove temp files older than `older_than_s` seconds (left by crashes); return how many.

        Younger ones may belong to a put() in progress and are kept.
        """
        cutoff = time.time_ns() - int(older_than_s * 1e9)
        removed = 0
        try:
            it = os.scandir(self._tmp)
        except FileNotFoundError:
            return 0
        with it:
            for entry in it:
                try:
                    if entry.stat(follow_symlinks=False).st_mtime_ns >= cutoff:
                        continue
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue
                removed += 1
        if removed:
            log.info("removed %d stale temp files from %s", removed, self._tmp)
        return removed


def _sorted_fanout(path: str) -> list[str]:
    """The two-hex-digit subdirectory names of `path`, sorted; [] if it is missing."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if _FANOUT_RE.fullmatch(n))


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
