"""Vfs: POSIX semantics over the metadata store, open files and block placement.

The vfs decides; `fuse_ops` only translates.  Methods raise `FsError(errno)`
for POSIX errors and storage errors (BlockMissing, QuorumLost, ...) for I/O
failures; they never raise FUSE types.

Concurrency rules (trio, one thread):
- Every metadata change is one `meta.txn()` with no await inside, so a change
  is atomic with respect to every other request of this mount.
- Checks and the change they guard run without an await in between (e.g.
  "target is an empty directory" and the rename that replaces it).
- Lookup counts (`lookups`) and open files (`files`) are kept here; an inode
  whose last name is gone is deleted only once the kernel forgot it and no
  handle has it open (then its blocks are released).
- Background work (flushes, read-ahead, garbage collection, ring reloads)
  runs in the nursery given to `run`.
- A new ring version (from `hafs node` or `hafs rebalance`) is swapped into
  the placement between two awaits (`reload_ring`); a put, get or delete that
  began on the previous version goes on with the stores it started with.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

import trio

from ..errors import BlockMissing, FsError, HafsError, LockLost
from ..meta.locks import SqliteLockService, default_holder
from ..meta.sqlite import Dentry, Inode, MetaStore, now_ns
from ..store.chunker import MiB
from ..store.dirstore import DirStore, disk_id
from ..store.placement import Placement
from ..store.ring import RING_RELOAD_S, NodeSpec, Ring
from .cache import BlockCache
from .files import FileState, Shared, WriteBudget

log = logging.getLogger(__name__)

NAME_MAX = 255
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 64 * 1024
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
REPAIR_BATCH = 200  # degraded blocks looked at per repair round


@dataclass
class Options:
    """Tunables of a mount (each one a `-o name=value` mount option)."""

    cache_mb: int = 128  # block cache for reads
    write_buffer_mb: int = 256  # buffered, not yet stored bytes of all files together
    flush_mb: int = 16  # a file with this much buffered data starts a background flush
    readahead_blocks: int = 4  # blocks fetched ahead of a sequential reader
    readahead_kb: int = 1024  # the kernel's read-ahead for this mount (needs root; 0: leave it)
    threads: int = 16  # worker threads for block I/O
    gc_grace_s: float = 600.0  # unreferenced blocks are deleted after this long
    gc_interval_s: float = 30.0  # how often garbage collection looks for them
    lock_ttl_s: float = 10.0  # a write lock's lease; a dead mount's locks free up after it
    lock_wait_s: float = 30.0  # a writer waits this long for another mount's lock (then ENOLCK)
    node_timeout_s: float = 10.0  # a remote node's request fails after this long (then: next node)
    probe_interval_s: float = 2.0  # how often down nodes are asked whether they are back
    repair_interval_s: float = 10.0  # how often degraded blocks are put right (0: never)


@dataclass
class Handle:
    ino: int
    append: bool
    writer: bool
    file: FileState


class Vfs:
    def __init__(
        self,
        meta: MetaStore,
        placement: Placement,
        opts: Options,
        holder: str = "vfs",
        open_store: Callable[[NodeSpec], object] | None = None,
        read_only: bool = False,
    ) -> None:
        """open_store(spec): the block store of a node that joins the ring while mounted
        (default: `home.open_store` with the filesystem's uuid and node token).
        read_only: a `-o ro` mount (the kernel refuses writes): no background loop
        that writes runs (garbage collection, repair, the purge of unlinked inodes)."""
        self.meta = meta
        self.read_only = read_only
        self._open_store = open_store
        self._ring_refused: int | None = None  # a version that could not be used (logged)
        self.locks = SqliteLockService(meta.db, default_holder(holder), opts.lock_ttl_s)
        self.placement = placement
        placement.on_degraded = meta.record_degraded  # for repair_degraded
        self._repair_after = ""  # where the next repair round goes on in the degraded table
        self.opts = opts
        self.lookups: Counter[int] = Counter()
        self.files: dict[int, FileState] = {}
        self.handles: dict[int, Handle] = {}
        self.dir_handles: dict[int, int] = {}
        self._next_fh = 1
        self.shared: Shared | None = None

    # -------------------------------------------------------------- lifecycle

    async def run(self, purge_unlinked: bool = True, *, task_status=trio.TASK_STATUS_IGNORED):
        """Run background work until cancelled; ready once the vfs can serve requests.

        purge_unlinked: delete inodes left without a name by a crash while they
        were open; only when no other mount of the filesystem is running.
        """
        if purge_unlinked and not self.read_only:
            for ino in self.meta.unlinked_inodes():
                self.meta.delete_inode(ino)
        async with trio.open_nursery() as nursery:
            limiter = trio.CapacityLimiter(self.opts.threads)
            self.shared = Shared(
                meta=self.meta,
                placement=self.placement,
                cache=BlockCache(self.opts.cache_mb * MiB, self.placement.get),
                budget=WriteBudget(self.opts.write_buffer_mb * MiB),
                nursery=nursery,
                limiter=limiter,
                flush_bytes=self.opts.flush_mb * MiB,
                readahead_blocks=self.opts.readahead_blocks,
                uncommitted=Counter(),
                open_files=self.files,
                locks=self.locks,
                lock_wait_s=self.opts.lock_wait_s,
            )
            if not self.read_only:
                nursery.start_soon(self._gc_loop)
            nursery.start_soon(self._keepalive_loop)
            nursery.start_soon(self.placement.probe_loop, self.opts.probe_interval_s)
            nursery.start_soon(self._ring_loop)
            if self.opts.repair_interval_s > 0 and not self.read_only:
                nursery.start_soon(self._repair_loop)
            task_status.started()

    async def shutdown(self) -> None:
        """Flush every open file (on unmount)."""
        for fs in list(self.files.values()):
            try:
                await fs.flush()
            except Exception:
                log.exception("flushing inode %d at unmount failed", fs.ino)
        await self.fsync_meta()

    async def _keepalive_loop(self) -> None:
        """Renew the write locks this mount holds, a few times per lease."""
        while True:
            await trio.sleep(self.opts.lock_ttl_s / 4)
            for fs in list(self.files.values()):
                if fs.lease is not None:
                    try:
                        self.locks.keepalive(fs.lease)
                    except LockLost as e:
                        fs.lose_lock(str(e))

    async def _ring_loop(self) -> None:
        while True:
            await trio.sleep(RING_RELOAD_S)
            try:
                await self.reload_ring()
            except Exception:  # a bug here must not take the mount down: keep the ring
                log.exception("reloading the ring failed")

    async def reload_ring(self) -> bool:
        """Switch the placement to the ring version in the metadata if it is new (RING-VERSION).

        The ring is built in a worker thread (about 28 ms for 10 nodes); unchanged
        nodes keep their store objects, joining ones get a store opened in a thread.
        A version that cannot be used is logged once and tried again each time.
        Returns True if the placement switched.
        """
        placement = self.placement
        current = placement.ring
        desc: dict = {}
        try:
            desc = self.meta.ring_json()
            if desc.get("version") == current.version:
                return False
            ring = await trio.to_thread.run_sync(Ring.from_json, desc)
            stores = {}
            for spec in ring.nodes.values():
                old = current.nodes.get(spec.id)
                if old is not None and old.address == spec.address and spec.id in placement.stores:
                    stores[spec.id] = placement.stores[spec.id]
                else:
                    stores[spec.id] = await trio.to_thread.run_sync(self._store_opener(), spec)
        except (HafsError, OSError, ValueError) as e:
            if self._ring_refused != desc.get("version"):
                self._ring_refused = desc.get("version")
                log.error(
                    "RING-VERSION %s cannot be used, staying on %d: %s",
                    self._ring_refused,
                    current.version,
                    e,
                )
            return False
        if placement.ring is not current:
            return False  # switched meanwhile
        placement.set_ring(ring, stores)
        self._ring_refused = None
        log.info(
            "RING-VERSION %d: %s",
            ring.version,
            ", ".join(
                f"{n.id} w{n.weight:g}{' draining' if n.state != 'up' else ''}"
                for n in ring.nodes.values()
            ),
        )
        return True

    def _store_opener(self) -> Callable[[NodeSpec], object]:
        if self._open_store is None:
            from ..home import open_store  # the mount's default; tests may pass their own

            fs_uuid = self.meta.setting("fs_uuid")
            token = self.meta.setting_or("node_token", None)
            timeout = self.opts.node_timeout_s
            self._open_store = lambda spec: open_store(spec, fs_uuid, token, timeout)
        return self._open_store

    async def _repair_loop(self) -> None:
        while True:
            await trio.sleep(self.opts.repair_interval_s)
            await self.repair_degraded()

    async def repair_degraded(self, batch: int = REPAIR_BATCH) -> int:
        """Put right the next `batch` recorded degraded blocks (in id order, wrapping
        around, so blocks waiting for a node that stays down hold up no others) whose
        nodes answer; returns how many."""
        rows = self.meta.degraded_blocks(self._repair_after, batch)
        self._repair_after = rows[-1][0] if len(rows) == batch else ""
        done = failed = 0
        for block_id, holders in rows:
            repaired = await self.placement.repair(block_id, holders)
            if repaired:
                self.meta.forget_degraded(block_id)
                done += 1
            elif repaired is not None:  # None: waiting for a node, or a ring without it
                failed += 1
        if done or failed:
            log.info(
                "REPAIR: %d degraded blocks put right, %d deferred; %d still recorded",
                done,
                failed,
                self.meta.count_degraded(),
            )
        return done

    async def _gc_loop(self) -> None:
        while True:
            await trio.sleep(self.opts.gc_interval_s)
            await self.collect_garbage()

    async def collect_garbage(self) -> int:
        """Delete blocks unreferenced for longer than the grace period; returns how many."""
        cutoff = now_ns() - int(self.opts.gc_grace_s * 1e9)
        done = 0
        for block_id in self.meta.garbage_blocks(cutoff, 1000):
            if block_id in self.shared.uncommitted:
                continue
            if await self.placement.delete(block_id, self.opts.gc_grace_s):
                if self.meta.forget_block(block_id):
                    done += 1
        if done:
            log.info("garbage collection deleted %d unreferenced blocks", done)
        return done

    # ---------------------------------------------------------------- helpers

    def _inode(self, ino: int) -> Inode:
        inode = self.meta.get_inode(ino)
        if inode is None:
            raise FsError(errno.ENOENT)
        fs = self.files.get(ino)
        if fs is not None and fs.has_changes():
            inode = replace(inode, size=fs.size, mtime_ns=fs.mtime_ns or inode.mtime_ns)
        return inode

    def _dir(self, ino: int) -> Inode:
        inode = self._inode(ino)
        if not stat.S_ISDIR(inode.mode):
            raise FsError(errno.ENOTDIR)
        return inode

    @staticmethod
    def _check_name(name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        if name in (b".", b"..") or b"/" in name or not name:
            raise FsError(errno.EINVAL)

    def _touch_dir(self, ino: int, t: int) -> None:
        self.meta.update_inode(ino, mtime_ns=t, ctime_ns=t)

    def _maybe_free(self, ino: int) -> None:
        """Delete an inode that has no name, no kernel reference and no open handle."""
        if self.lookups[ino] > 0 or ino in self.files:
            return
        inode = self.meta.get_inode(ino)
        if inode is not None and inode.nlink == 0:
            self.meta.delete_inode(ino)

    # ----------------------------------------------------------------- lookup

    def lookup(self, parent: int, name: bytes) -> Inode:
        self._dir(parent)
        if name == b".":
            return self._inode(parent)
        if name == b"..":
            return self._inode(self.meta.parent_of(parent) or parent)
        ino = self.meta.lookup(parent, name)
        if ino is None:
            raise FsError(errno.ENOENT)
        return self._inode(ino)

    def getattr(self, ino: int) -> Inode:
        return self._inode(ino)

    def forget(self, ino: int, n: int) -> None:
        self.lookups[ino] -= n
        if self.lookups[ino] <= 0:
            del self.lookups[ino]
            self._maybe_free(ino)

    # ---------------------------------------------------------------- setattr

    async def setattr(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
    ) -> Inode:
        inode = self._inode(ino)
        t = now_ns()
        if size is not None:
            if stat.S_ISDIR(inode.mode):
                raise FsError(errno.EISDIR)
            fs = self.files.get(ino)
            if fs is None:  # truncate(2) of a file not open here: lock it for the change
                fs = self._file(inode)
                try:
                    await fs.truncate(size)
                    await fs.flush()
                finally:
                    self._close_file(fs)
            else:
                await fs.truncate(size)
                if fs.writers == 0:
                    await fs.flush()
                    fs.release_lock()
        fields: dict[str, int] = {}
        if mode is not None:
            fields["mode"] = (inode.mode & ~0o7777) | (mode & 0o7777)
        if uid is not None:
            fields["uid"] = uid
        if gid is not None:
            fields["gid"] = gid
        if atime_ns is not None:
            fields["atime_ns"] = atime_ns
        if mtime_ns is not None:
            fields["mtime_ns"] = mtime_ns
            fs = self.files.get(ino)
            if fs is not None and fs.mtime_ns is not None:
                fs.mtime_ns = mtime_ns  # the explicit time wins over buffered writes
        if fields or size is not None:
            fields["ctime_ns"] = t
            with self.meta.txn():
                self.meta.update_inode(ino, **fields)
        return self._inode(ino)

    # ----------------------------------------------------------------- create

    def _new_inode(
        self,
        parent: int,
        name: bytes,
        mode: int,
        uid: int,
        gid: int,
        rdev: int = 0,
        target: bytes | None = None,
    ) -> Inode:
        self._check_name(name)
        pinode = self._dir(parent)
        if pinode.nlink == 0:
            raise FsError(errno.ENOENT)  # a removed directory takes no new entries
        if self.meta.lookup(parent, name) is not None:
            raise FsError(errno.EEXIST)
        if pinode.mode & stat.S_ISGID:  # BSD group semantics of setgid directories
            gid = pinode.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        is_dir = stat.S_ISDIR(mode)
        t = now_ns()
        with self.meta.txn():
            ino = self.meta.create_inode(mode, uid, gid, 2 if is_dir else 1, rdev, target)
            self.meta.add_entry(parent, name, ino)
            self._touch_dir(parent, t)
            if is_dir:
                self.meta.add_nlink(parent, 1, t)
        return self._inode(ino)

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Inode:
        return self._new_inode(parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int) -> Inode:
        return self._new_inode(parent, name, mode, uid, gid, rdev=rdev)

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Inode:
        return self._new_inode(parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target)

    def create(
        self, parent: int, name: bytes, mode: int, flags: int, uid: int, gid: int
    ) -> tuple[int, Inode]:
        inode = self._new_inode(parent, name, stat.S_IFREG | (mode & 0o7777), uid, gid)
        return self._open_handle(inode, flags), inode

    def readlink(self, ino: int) -> bytes:
        inode = self._inode(ino)
        if not stat.S_ISLNK(inode.mode):
            raise FsError(errno.EINVAL)
        return inode.target or b""

    def link(self, ino: int, parent: int, name: bytes) -> Inode:
        inode = self._inode(ino)
        if stat.S_ISDIR(inode.mode):
            raise FsError(errno.EPERM)
        if inode.nlink == 0:
            raise FsError(errno.ENOENT)
        self._check_name(name)
        self._dir(parent)
        if self.meta.lookup(parent, name) is not None:
            raise FsError(errno.EEXIST)
        t = now_ns()
        with self.meta.txn():
            self.meta.add_entry(parent, name, ino)
            self.meta.add_nlink(ino, 1, t)
            self._touch_dir(parent, t)
        return self._inode(ino)

    # ----------------------------------------------------------------- remove

    def unlink(self, parent: int, name: bytes) -> None:
        self._dir(parent)
        ino = self.meta.lookup(parent, name)
        if ino is None:
            raise FsError(errno.ENOENT)
        if stat.S_ISDIR(self._inode(ino).mode):
            raise FsError(errno.EISDIR)
        t = now_ns()
        with self.meta.txn():
            self.meta.remove_entry(parent, name)
            self.meta.add_nlink(ino, -1, t)
            self._touch_dir(parent, t)
        self._maybe_free(ino)

    def rmdir(self, parent: int, name: bytes) -> None:
        self._dir(parent)
        if name == b".":
            raise FsError(errno.EINVAL)
        ino = self.meta.lookup(parent, name)
        if ino is None:
            raise FsError(errno.ENOENT)
        self._dir(ino)
        if self.meta.has_entries(ino):
            raise FsError(errno.ENOTEMPTY)
        t = now_ns()
        with self.meta.txn():
            self.meta.remove_entry(parent, name)
            self.meta.update_inode(ino, nlink=0, ctime_ns=t)
            self.meta.add_nlink(parent, -1, t)
            self._touch_dir(parent, t)
        self._maybe_free(ino)

    # ----------------------------------------------------------------- rename

    def rename(self, p_old: int, n_old: bytes, p_new: int, n_new: bytes, flags: int) -> None:
        self._dir(p_old)
        self._dir(p_new)
        self._check_name(n_new)
        ino = self.meta.lookup(p_old, n_old)
        if ino is None:
            raise FsError(errno.ENOENT)
        target = self.meta.lookup(p_new, n_new)
        is_dir = stat.S_ISDIR(self._inode(ino).mode)
        t = now_ns()
        if flags & RENAME_EXCHANGE:
            if target is None:
                raise FsError(errno.ENOENT)
            target_is_dir = stat.S_ISDIR(self._inode(target).mode)
            with self.meta.txn():
                self.meta.set_entry(p_old, n_old, target)
                self.meta.set_entry(p_new, n_new, ino)
                if p_old != p_new and is_dir != target_is_dir:
                    moved_dir_to_new = 1 if is_dir else -1
                    self.meta.add_nlink(p_new, moved_dir_to_new, t)
                    self.meta.add_nlink(p_old, -moved_dir_to_new, t)
                for i in {p_old, p_new}:
                    self._touch_dir(i, t)
                self.meta.update_inode(ino, ctime_ns=t)
                self.meta.update_inode(target, ctime_ns=t)
            return
        if target is not None and flags & RENAME_NOREPLACE:
            raise FsError(errno.EEXIST)
        if target == ino:
            return  # two names of one file: POSIX says do nothing
        target_is_dir = False
        if target is not None:
            target_is_dir = stat.S_ISDIR(self._inode(target).mode)
            if is_dir and not target_is_dir:
                raise FsError(errno.ENOTDIR)
            if target_is_dir and not is_dir:
                raise FsError(errno.EISDIR)
            if target_is_dir and self.meta.has_entries(target):
                raise FsError(errno.ENOTEMPTY)
        with self.meta.txn():
            if target is not None:
                self.meta.set_entry(p_new, n_new, ino)
                if target_is_dir:
                    self.meta.update_inode(target, nlink=0, ctime_ns=t)
                    self.meta.add_nlink(p_new, -1, t)
                else:
                    self.meta.add_nlink(target, -1, t)
            else:
                self.meta.add_entry(p_new, n_new, ino)
            self.meta.remove_entry(p_old, n_old)
            if is_dir and p_old != p_new:
                self.meta.add_nlink(p_old, -1, t)
                self.meta.add_nlink(p_new, 1, t)
            for i in {p_old, p_new}:
                self._touch_dir(i, t)
            self.meta.update_inode(ino, ctime_ns=t)
        if target is not None:
            self._maybe_free(target)

    # ------------------------------------------------------------------ files

    def _file(self, inode: Inode) -> FileState:
        """The open-file state of an inode (made on first use, shared by its handles)."""
        fs = self.files.get(inode.id)
        if fs is None:
            fs = self.files[inode.id] = FileState(inode.id, inode.size, self.shared)
        else:
            fs.refresh()
        fs.handles += 1
        return fs

    def _close_file(self, fs: FileState) -> None:
        fs.handles -= 1
        if fs.handles == 0:
            fs.release_lock()
            if self.files.get(fs.ino) is fs:
                del self.files[fs.ino]
                self._maybe_free(fs.ino)

    def _open_handle(self, inode: Inode, flags: int) -> int:
        fs = self._file(inode)
        writer = flags & os.O_ACCMODE != os.O_RDONLY
        fs.writers += writer
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = Handle(inode.id, bool(flags & os.O_APPEND), writer, fs)
        return fh

    async def open(self, ino: int, flags: int) -> int:
        inode = self._inode(ino)
        if stat.S_ISDIR(inode.mode):
            raise FsError(errno.EISDIR)
        fh = self._open_handle(inode, flags)
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            try:
                await self.handles[fh].file.truncate(0)
            except BaseException:
                await self.release(fh)
                raise
        return fh

    def _handle(self, fh: int) -> Handle:
        try:
            return self.handles[fh]
        except KeyError:
            raise FsError(errno.EBADF) from None

    async def read(self, fh: int, off: int, size: int) -> bytes:
        file = self._handle(fh).file
        try:
            return await file.read(off, size)
        except BlockMissing as e:  # EIO for this read; the log says which file lost what
            log.error(
                "BLOCK-UNREADABLE %s of %s (inode %d, bytes %d..%d): %s",
                e.block_id,
                self.meta.path_of(file.ino),
                file.ino,
                off,
                off + size,
                e,
            )
            raise

    async def write(self, fh: int, off: int, data: bytes) -> int:
        h = self._handle(fh)
        if h.append:
            off = h.file.size
        await h.file.write(off, data)
        return len(data)

    async def flush(self, fh: int) -> None:
        await self._handle(fh).file.flush()

    async def fsync(self, fh: int) -> None:
        await self._handle(fh).file.flush()
        await self.fsync_meta()

    async def fsync_meta(self) -> None:
        """Make every committed metadata change durable."""
        await trio.to_thread.run_sync(self.meta.sync)

    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        fs = h.file
        fs.writers -= h.writer
        try:
            if fs.writers == 0:  # the last writer: commit, then let other mounts write
                await fs.flush()
                fs.release_lock()
        finally:
            self._close_file(fs)

    # ------------------------------------------------------------ directories

    def opendir(self, ino: int) -> int:
        self._dir(ino)
        fh = self._next_fh
        self._next_fh += 1
        self.dir_handles[fh] = ino
        return fh

    def releasedir(self, fh: int) -> None:
        self.dir_handles.pop(fh, None)

    def readdir(self, fh: int, after: int, limit: int = 256) -> list[tuple[Dentry, Inode]]:
        """A page of (entry, inode) after cursor `after` (0: from the start)."""
        ino = self.dir_handles.get(fh)
        if ino is None:
            raise FsError(errno.EBADF)
        out = []
        for d in self.meta.readdir(ino, after, limit):
            inode = self.meta.get_inode(d.inode)
            if inode is not None:
                fs = self.files.get(d.inode)
                if fs is not None:
                    inode = replace(inode, size=fs.size)
                out.append((d, inode))
        return out

    # ----------------------------------------------------------------- xattrs

    def getxattr(self, ino: int, name: bytes) -> bytes:
        self._inode(ino)
        value = self.meta.get_xattr(ino, name)
        if value is None:
            raise FsError(errno.ENODATA)
        return value

    def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        self._inode(ino)
        if not name or len(name) > XATTR_NAME_MAX:
            raise FsError(errno.ERANGE)
        if len(value) > XATTR_SIZE_MAX:
            raise FsError(errno.E2BIG)
        if name.startswith(b"system.posix_acl_"):
            # No POSIX ACLs: stored as a plain xattr an ACL would not change the mode, and
            # `cp -a` sets the mode this way; refused, tools fall back to chmod.
            raise FsError(errno.EOPNOTSUPP)
        with self.meta.txn():
            self.meta.set_xattr(ino, name, value)
            self.meta.update_inode(ino, ctime_ns=now_ns())

    def listxattr(self, ino: int) -> list[bytes]:
        self._inode(ino)
        return self.meta.list_xattrs(ino)

    def removexattr(self, ino: int, name: bytes) -> None:
        self._inode(ino)
        with self.meta.txn():
            if not self.meta.remove_xattr(ino, name):
                raise FsError(errno.ENODATA)
            self.meta.update_inode(ino, ctime_ns=now_ns())

    # ----------------------------------------------------------------- statfs

    def statfs(self) -> dict[str, int]:
        """Capacity and free space as a user can fill them: raw space / R, each disk once.

        Backing directories are asked directly; remote nodes by the figures the
        probe loop keeps (a node not heard from yet counts 0).  A disk holding
        several nodes (backing directories or nodes on this machine) counts once.
        """
        seen: dict[str, tuple[int, int]] = {}
        for store in self.placement.stores.values():
            if isinstance(store, DirStore):
                try:
                    st = os.statvfs(store.path)
                    seen[disk_id(store.path)] = (
                        st.f_blocks * st.f_frsize,
                        st.f_bavail * st.f_frsize,
                    )
                except OSError:
                    continue  # a lost disk adds no space
        for disk, total, free in self.placement.usage.values():
            seen[disk] = (total, free)
        space = seen.values()
        r = self.placement.replicas
        total = sum(t for t, _ in space) // r
        free = sum(f for _, f in space) // r
        bsize = 4096
        files = self.meta.count_inodes()
        return {
            "f_bsize": bsize,
            "f_frsize": bsize,
            "f_blocks": total // bsize,
            "f_bfree": free // bsize,
            "f_bavail": free // bsize,
            "f_files": files + 1_000_000_000,
            "f_ffree": 1_000_000_000,
            "f_favail": 1_000_000_000,
            "f_namemax": NAME_MAX,
        }
