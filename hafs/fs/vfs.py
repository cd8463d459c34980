"""Vfs: POSIX semantics over the metadata store, open files and block placement.

The vfs decides; `fuse_ops` only translates.  Methods raise `FsError(errno)`
for POSIX errors and storage errors (BlockMissing, QuorumLost, ...) for I/O
failures; they never raise FUSE types.

Concurrency rules (trio, one thread):
- Every metadata change is one whole operation of the metadata engine
  (hafs/meta: create, link, unlink, rename, commit, ...), whose checks run
  inside its transaction: atomic with respect to this mount's other requests
  and to every other mount, whatever the engine.  The vfs reaches the engine
  only through `AsyncMeta` (`await self.meta.op(...)`).
- Name syntax (length, "/", "." and "..") is checked here; everything that
  depends on the metadata's state is checked by the engine.
- Lookup counts (`lookups`) and open files (`files`) are kept here; an inode
  whose last name is gone is deleted only once the kernel forgot it and no
  handle has it open (then its blocks are released).
- Background work (flushes, read-ahead, garbage collection, ring reloads)
  runs in the nursery given to `run`.  Garbage collection and repair run only
  while this mount is elected to LEAD_ROLE (`lead`: on etcd one client at a
  time; the embedded engine elects every mount).
- A new ring version (from `hafs node` or `hafs rebalance`) is swapped into
  the placement between two awaits (`reload_ring`); a put, get or delete that
  began on the previous version goes on with the stores it started with.  The
  engine says when to look (`wait_ring`: a watch on etcd, a poll otherwise).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import trio

from ..errors import BlockMissing, FsError, HafsError, LockLost, MetaUnavailable
from ..meta import LEAD_ROLE, NAME_MAX, AsyncMeta, Dentry, Inode, MetaStore, now_ns
from ..store.chunker import MiB
from ..store.dirstore import DirStore, disk_id
from ..store.placement import Placement, writable_bytes
from ..store.ring import RING_RELOAD_S, NodeSpec, Ring
from .cache import BlockCache
from .files import FileState, Shared, WriteBudget, content_version, failure_level

PAGE_SIZE = mmap.PAGESIZE
log = logging.getLogger(__name__)

REPAIR_BATCH = 200  # degraded blocks looked at per repair round
XATTR_ABSENT_S = 1.0  # an absent security.* xattr is answered from memory this long (see getxattr)
FREE_INODES = 1_000_000_000  # free inodes statfs reports: hafs has no inode table to fill
ALLOCATED_KEPT = 100_000  # files whose allocated bytes are remembered (see allocated_bytes)
RETRY_HOLD_S = 5.0  # the handle of an open answered ESTALE waits this long for its retry


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
    meta_timeout_s: float = 30.0  # cluster mode: a metadata call etcd does not answer fails (EIO)
    probe_interval_s: float = 2.0  # how often down nodes are asked whether they are back
    repair_interval_s: float = 10.0  # how often degraded blocks are put right (0: never)
    metrics: str = ""  # HOST:PORT to serve Prometheus metrics at (empty: not served)
    # the kernel's writeback cache: small writes gather in its page cache and reach the mount
    # as large ones (at close, fsync or memory pressure); the kernel keeps size and mtime
    writeback_cache: bool = False


@dataclass
class Handle:
    ino: int
    append: bool
    writer: bool
    file: FileState


@dataclass
class Replacement:
    """A kernel inode being replaced by one of a new generation (see open): the processes
    whose lookup replies carried the new generation, and the versions those replies had
    (the kernel keeps the size of the one it built its new inode from)."""

    pids: set[int] = field(default_factory=set)
    versions: set[tuple[int, int, int]] = field(default_factory=set)


class Vfs:
    def __init__(
        self,
        meta: MetaStore,
        placement: Placement,
        opts: Options,
        open_store: Callable[[NodeSpec], object] | None = None,
        read_only: bool = False,
    ) -> None:
        """meta: the metadata engine (its lock service and sessions are the mount's).
        open_store(spec): the block store of a node that joins the ring while mounted
        (the mount's: `home.Filesystem.open_store`, with its credentials and owner claim;
        default: `home.open_store` with the filesystem's uuid and credentials, the
        `home.node_auth` the other stores should share, so that all follow a change at once).
        read_only: a `-o ro` mount (the kernel refuses writes): no background loop
        that writes runs (garbage collection, repair, the purge of unlinked inodes)."""
        self.engine = meta
        self.meta = AsyncMeta(meta)
        self.read_only = read_only
        self._open_store = open_store
        self._ring_refused: int | None = None  # a version that could not be used (logged)
        self.locks = meta.locks
        self.placement = placement
        self.metrics = placement.metrics  # the mount's (fuse_ops, files and cache count there)
        self._degraded: list[tuple[str, list[str]]] = []  # recorded by the repair loop
        placement.on_degraded = self._note_degraded
        self._repair_after = ""  # where the next repair round goes on in the degraded table
        self.opts = opts
        self.lookups: Counter[int] = Counter()
        # inode -> content_version of the bytes the kernel's page cache holds of it: an open
        # that finds the same version keeps those pages (keep_cache); see open().  With the
        # writeback cache, also the version whose size and mtime the kernel's inode keeps.
        self.page_versions: dict[int, tuple[int, int, int]] = {}
        # inode -> content_version of the last attributes the kernel took from a reply
        # (see attrs_given): an open that finds that version needs not drop them
        self.attr_versions: dict[int, tuple[int, int, int]] = {}
        # inode -> (content_version, the bytes its extents cover): st_blocks of a file
        # unchanged since the last reply without a scan of its extents
        self._allocated: dict[int, tuple[tuple[int, int, int], int]] = {}
        # inode -> the generation entry replies give the kernel (0 unless bumped to make the
        # kernel replace its inode, see entry_generation and open); `replacing`: bumped,
        # until an open comes from a process that looked the file up since; `_held`:
        # (inode, pid) -> the handle of an open answered ESTALE, kept for its retry
        self.generations: Counter[int] = Counter()
        self.replacing: dict[int, Replacement] = {}
        self._held: dict[tuple[int, int], int] = {}
        self._opening: Counter[int] = Counter()  # inode -> opens not answered yet
        # inode -> {security.* name: until when it is known absent} (see getxattr)
        self._absent_xattrs: dict[int, dict[bytes, float]] = {}
        self.files: dict[int, FileState] = {}
        self.handles: dict[int, Handle] = {}
        self.dir_handles: dict[int, int] = {}
        self._next_fh = 1
        self.shared: Shared | None = None
        self.leading = False  # elected to LEAD_ROLE at the last look (`lead`)

    # -------------------------------------------------------------- lifecycle

    async def run(self, purge_unlinked: bool = True, *, task_status=trio.TASK_STATUS_IGNORED):
        """Run background work until cancelled; ready once the vfs can serve requests.

        purge_unlinked: delete inodes left without a name by a crash while they
        were open; only when no other mount of the filesystem is running.
        """
        if purge_unlinked and not self.read_only:
            for ino in await self.meta.unlinked_inodes():
                await self.meta.delete_inode(ino)
        async with trio.open_nursery() as nursery:
            limiter = trio.CapacityLimiter(self.opts.threads)
            self.shared = Shared(
                meta=self.meta,
                placement=self.placement,
                cache=BlockCache(self.opts.cache_mb * MiB, self.placement.get, self.metrics),
                budget=WriteBudget(self.opts.write_buffer_mb * MiB),
                nursery=nursery,
                limiter=limiter,
                flush_bytes=self.opts.flush_mb * MiB,
                readahead_blocks=self.opts.readahead_blocks,
                uncommitted=Counter(),
                open_files=self.files,
                page_versions=self.page_versions,
                locks=self.locks,
                lock_wait_s=self.opts.lock_wait_s,
                record_degraded=self.record_degraded,
                metrics=self.metrics,
            )
            self.metrics.buffer_limit.set(self.shared.budget.limit)
            if not self.read_only:
                gc = self._when_leading(self.collect_garbage)
                nursery.start_soon(self._every, self.opts.gc_interval_s, gc)
                nursery.start_soon(self._every, 1.0, self.record_degraded)
                if self.opts.repair_interval_s > 0:
                    every = self.opts.repair_interval_s
                    nursery.start_soon(self._every, every, self._when_leading(self.repair_degraded))
            nursery.start_soon(self._every, self.opts.lock_ttl_s / 4, self._keepalive)
            nursery.start_soon(self.placement.probe_loop, self.opts.probe_interval_s)
            nursery.start_soon(self._every, 0.1, self._follow_ring)  # it waits in the engine
            nursery.start_soon(self._every, 1.0, self.sample_metrics)
            task_status.started()

    async def shutdown(self) -> None:
        """Flush every open file (on unmount)."""
        for fs in list(self.files.values()):
            try:
                await fs.flush()
            except Exception:
                log.exception("flushing inode %d at unmount failed", fs.ino)
        await self.record_degraded()
        await self.fsync_meta()

    @staticmethod
    async def _every(interval_s: float, work: Callable) -> None:
        """Run `work` every interval until cancelled.  A round that fails (a node or the
        metadata answering with an error) is logged and tried again next round: background
        work never ends the mount."""
        while True:
            await trio.sleep(interval_s)
            try:
                await work()
            except MetaUnavailable as e:  # the engine logs an outage once
                log.debug("background %s failed: %s", work.__name__.strip("_"), e)
            except Exception as e:
                log.error(
                    "background %s failed, trying again in %g s: %s",
                    work.__name__.strip("_"),
                    interval_s,
                    e,
                    exc_info=not isinstance(e, HafsError | OSError),
                )

    async def lead(self) -> bool:
        """Whether this mount has LEAD_ROLE now (taking it if no live mount has it);
        LEADER / LEADER-LOST logged when that changes."""
        leading = await self.meta.sessions.elect(LEAD_ROLE)
        if leading != self.leading:
            self.leading = leading
            if leading:
                log.info("LEADER %s: this mount runs garbage collection and repair", LEAD_ROLE)
            else:
                log.warning("LEADER-LOST %s: another mount runs them now", LEAD_ROLE)
        return leading

    def _when_leading(self, work: Callable) -> Callable:
        """`work`, run only while this mount leads (a leader paused past its lease may
        finish the round it was in beside the new one: each step is its own transaction)."""

        async def run() -> None:
            if await self.lead():
                await work()

        run.__name__ = work.__name__
        return run

    async def _follow_ring(self) -> None:
        """Reload the ring each time the engine says it may have changed (etcd: a watch;
        sqlite: every RING_RELOAD_S)."""
        version = self.placement.ring.version
        await trio.to_thread.run_sync(
            self.engine.wait_ring, version, RING_RELOAD_S, abandon_on_cancel=True
        )
        await self.reload_ring()

    async def sample_metrics(self) -> None:
        """Set the gauges of state the trio thread owns (a scrape only reads them)."""
        m = self.metrics
        m.locks_held.set(sum(fs.lease is not None for fs in self.files.values()))
        m.buffer_bytes.set(self.shared.budget.used)
        down = self.placement.health.down()
        nodes = list(self.placement.stores)
        m.nodes.labels("down").set(sum(n in down for n in nodes))
        m.nodes.labels("up").set(sum(n not in down for n in nodes))
        m.degraded_blocks.set(await self.meta.count_degraded() + len(self._degraded))

    async def _keepalive(self) -> None:
        """Renew the write locks this mount holds, a few times per lease."""
        for fs in list(self.files.values()):
            if fs.lease is not None:
                try:
                    await self.locks.keepalive(fs.lease)
                except LockLost as e:
                    await fs.lose_lock(str(e))

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
            desc = await self.meta.ring()
            if desc.get("version") == current.version:
                return False
            ring = await trio.to_thread.run_sync(Ring.from_json, desc)
            opener = await self._store_opener()
            stores = {}
            for spec in ring.nodes.values():
                old = current.nodes.get(spec.id)
                if old is not None and old.address == spec.address and spec.id in placement.stores:
                    stores[spec.id] = placement.stores[spec.id]
                else:
                    stores[spec.id] = await trio.to_thread.run_sync(opener, spec)
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

    async def _store_opener(self) -> Callable[[NodeSpec], object]:
        if self._open_store is None:
            from ..home import node_auth, open_store  # tests may pass their own

            config = await self.meta.config()
            auth, timeout = node_auth(self.engine), self.opts.node_timeout_s
            self._open_store = lambda spec: open_store(spec, config.fs_uuid, auth, timeout)
        return self._open_store

    def _note_degraded(self, block_id: str, nodes: list[str]) -> None:
        """Placement's report of a block stored off its ring nodes (called on the trio
        thread, inside a put): recorded in the metadata by the next `record_degraded`,
        before the commit that references the block."""
        self._degraded.append((block_id, nodes))

    async def record_degraded(self) -> None:
        while self._degraded:  # taken before the await: concurrent callers share the work
            block_id, nodes = self._degraded.pop(0)
            try:
                await self.meta.record_degraded(block_id, nodes)
            except BaseException:
                self._degraded.insert(0, (block_id, nodes))  # the next round tries again
                raise

    async def repair_degraded(self, batch: int = REPAIR_BATCH) -> int:
        """Put right the next `batch` recorded degraded blocks (in id order, wrapping
        around, so blocks waiting for a node that stays down hold up no others) whose
        nodes answer; returns how many."""
        await self.record_degraded()
        rows = await self.meta.degraded_blocks(self._repair_after, batch)
        self._repair_after = rows[-1][0] if len(rows) == batch else ""
        done = failed = 0
        for block_id, holders in rows:
            repaired = await self.placement.repair(block_id, holders)
            if repaired:
                await self.meta.forget_degraded(block_id)
                done += 1
            elif repaired is not None:  # None: waiting for a node, or a ring without it
                failed += 1
        if done or failed:
            log.info(
                "REPAIR: %d degraded blocks put right, %d deferred; %d still recorded",
                done,
                failed,
                await self.meta.count_degraded(),
            )
        return done

    async def collect_garbage(self) -> int:
        """Delete blocks unreferenced for longer than the grace period; returns how many."""
        cutoff = now_ns() - int(self.opts.gc_grace_s * 1e9)
        done = 0
        for block_id in await self.meta.garbage_blocks(cutoff, 1000):
            if block_id in self.shared.uncommitted:
                continue
            if await self.placement.delete(block_id, self.opts.gc_grace_s):
                if await self.meta.forget_block(block_id):
                    done += 1
        if done:
            log.info("garbage collection deleted %d unreferenced blocks", done)
        return done

    # ---------------------------------------------------------------- helpers

    def _local(self, inode: Inode) -> Inode:
        """The inode as this mount sees it: with the size and mtime of buffered writes."""
        fs = self.files.get(inode.id)
        if fs is not None and fs.has_changes():
            inode = replace(inode, size=fs.size, mtime_ns=fs.mtime_ns or inode.mtime_ns)
        return inode

    async def _inode(self, ino: int) -> Inode:
        inode = await self.meta.getattr(ino)
        if inode is None:
            raise FsError(errno.ENOENT)
        return self._local(inode)

    def _replaceable(self, inode: Inode) -> bool:
        """Whether the kernel's inode of this file may be replaced (see entry_generation)."""
        return self.opts.writeback_cache and inode.nlink == 1

    async def _maybe_free(self, ino: int) -> None:
        """Delete an inode that has no name, no kernel reference and no open handle."""
        if self.lookups[ino] > 0 or ino in self.files:
            return
        inode = await self.meta.getattr(ino)  # a read first: most forgotten inodes have names
        if inode is not None and inode.nlink == 0:
            await self.meta.delete_inode(ino)  # (the engine checks again, in its transaction)

    # ----------------------------------------------------------------- lookup

    async def lookup(self, parent: int, name: bytes) -> Inode:
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        inode = await self.meta.lookup(parent, name)
        if inode is None:
            raise FsError(errno.ENOENT)
        return self._local(inode)

    async def _dir(self, ino: int) -> Inode:
        inode = await self._inode(ino)
        if not stat.S_ISDIR(inode.mode):
            raise FsError(errno.ENOTDIR)
        return inode

    async def getattr(self, ino: int) -> Inode:
        return await self._inode(ino)

    async def allocated_bytes(self, inode: Inode) -> int:
        """The bytes `inode` really holds (its st_blocks): what its extents cover, plus
        what an open handle buffers, at most its size; a hole holds nothing. A block the
        file shares with others (dedup) counts once for each file. Not a regular file:
        its size."""
        if not stat.S_ISREG(inode.mode) or inode.size == 0:
            return inode.size
        fs = self.files.get(inode.id)
        if fs is not None and fs.has_changes():
            held = await self.meta.allocated_bytes(inode.id) + fs.dirty.nbytes
        else:  # the extents change only with the version (each commit sets the ctime)
            version = content_version(inode)
            known = self._allocated.get(inode.id)
            if known is not None and known[0] == version:
                held = known[1]
            else:
                held = await self.meta.allocated_bytes(inode.id)
                self._allocated.pop(inode.id, None)
                self._allocated[inode.id] = (version, held)
                if len(self._allocated) > ALLOCATED_KEPT:
                    del self._allocated[next(iter(self._allocated))]  # the oldest
        return min(held, inode.size)

    async def forget(self, ino: int, n: int) -> None:
        self.lookups[ino] -= n
        if self.lookups[ino] <= 0:
            del self.lookups[ino]
            self.page_versions.pop(ino, None)  # the kernel dropped the inode, its pages too
            self.attr_versions.pop(ino, None)
            self.generations.pop(ino, None)
            self.replacing.pop(ino, None)
            self._absent_xattrs.pop(ino, None)
            await self._maybe_free(ino)

    def attrs_given(self, inode: Inode) -> None:
        """The kernel took `inode`'s attributes from a reply: they are of its version
        until the kernel changes them itself (its writes mark them out of date in the
        kernel, which then asks again) or another mount changes the file (open sees that)."""
        self.attr_versions[inode.id] = content_version(inode)

    def entry_generation(self, inode: Inode, pid: int = 0) -> int:
        """The generation to give the kernel in an entry reply (lookup, create, readdir) of
        `inode` (as `_local` returns it), asked for by process `pid` (0: unknown).

        A regular file the kernel builds its inode of from this reply (it does not know
        the inode yet, or it is being replaced) holds no pages: they are of this version
        from now on.  With the writeback cache the kernel keeps the size and mtime of an
        inode it has, whatever the replies say (they could be its own newer ones); so
        when another mount changed the file since, and no handle here has it open, the
        reply carries a new generation: the kernel then drops its inode (its size, mtime
        and pages) and builds a new one from this reply; see open() for the opens of the
        old one meanwhile.  Only for a file of one name: the kernel fails calls through a
        name it has not looked up again with EIO once it dropped the inode (a hard-linked
        file keeps its inode, and the size the kernel knows, until the kernel lets go of
        it).
        """
        ino = inode.id
        if not stat.S_ISREG(inode.mode):
            return self.generations[ino]
        version = content_version(inode)
        r = self.replacing.get(ino)
        if r is None and ino not in self.files:
            if self.lookups[ino] == 0:
                self.page_versions[ino] = version
            elif self._replaceable(inode) and self.page_versions.get(ino) != version:
                self.generations[ino] += 1
                r = self.replacing[ino] = Replacement()
        if r is not None:
            r.pids.add(pid)
            r.versions.add(version)
            if len(r.versions) == 1:
                self.page_versions[ino] = version
            else:  # which of them the kernel's new inode has is not known: none is current
                self.page_versions.pop(ino, None)
        return self.generations[ino]

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
        cached = self.page_versions.get(ino)
        before = None  # read first only for a truncate, or to keep the kernel's pages
        if size is not None or cached is not None:
            before = await self.meta.getattr(ino)
            if before is None:
                raise FsError(errno.ENOENT)
        # whether the kernel's pages are of the committed bytes: then they stay current
        current = before is not None and cached == content_version(before)
        if size is not None:
            inode = self._local(before)
            if stat.S_ISDIR(inode.mode):
                raise FsError(errno.EISDIR)
            fs = self.files.get(ino)
            if fs is None:  # truncate(2) of a file not open here: lock it for the change
                fs = await self._file(inode)
                try:
                    await fs.truncate(size)
                    await fs.flush()
                finally:
                    await self._close_file(fs)
            else:
                await fs.truncate(size)
                if fs.writers == 0:
                    await fs.flush()
                    await fs.release_lock()
        fields = {
            k: v
            for k, v in (
                ("mode", mode),
                ("uid", uid),
                ("gid", gid),
                ("atime_ns", atime_ns),
                ("mtime_ns", mtime_ns),
            )
            if v is not None
        }
        if mtime_ns is not None:
            fs = self.files.get(ino)
            if fs is not None and fs.mtime_ns is not None:
                fs.mtime_ns = mtime_ns  # the explicit time wins over buffered writes
        after = await self.meta.setattr(ino, **fields) if fields else await self.meta.getattr(ino)
        if after is None:
            raise FsError(errno.ENOENT)
        if (
            current
            and before is not None
            and self.page_versions.get(ino) == content_version(before)  # (no writer dropped it)
            and after.size == (before.size if size is None else size)
            and (mtime_ns is not None or after.mtime_ns == before.mtime_ns)
        ):
            # chmod, chown, utime or a truncate by the kernel's own request: its pages (cut
            # as it cut them) are the bytes of the new version (another mount's commit in
            # between would show in the size or mtime)
            self.page_versions[ino] = content_version(after)
        return self._local(after)

    # ----------------------------------------------------------------- create

    async def _new_inode(
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
        return await self.meta.mknod(parent, name, mode, uid, gid, rdev, target, locked=locked)

    async def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Inode:
        return await self._new_inode(parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid)

    async def mknod(
        self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int
    ) -> Inode:
        return await self._new_inode(parent, name, mode, uid, gid, rdev=rdev)

    async def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Inode:
        return await self._new_inode(parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target)

    async def create(
        self, parent: int, name: bytes, mode: int, flags: int, uid: int, gid: int
    ) -> tuple[int, Inode]:
        """A new file and a handle of it.  On an engine that takes a writer's lock in the
        create's transaction (no wait, no request) the handle holds it from here on; on
        the others the lock is taken at the first change, as for any file (a `touch`
        then writes no lock)."""
        locked = self.engine.locks_at_create and flags & os.O_ACCMODE != os.O_RDONLY
        mode = stat.S_IFREG | (mode & 0o7777)
        inode = await self._new_inode(parent, name, mode, uid, gid, locked=locked)
        self.page_versions[inode.id] = content_version(inode)  # (empty: nothing cached)
        fh = await self._open_handle(inode, flags)
        if locked:
            h = self.handles[fh]
            try:
                await h.file.take_lock()
            except BaseException:
                await self.release(fh)
                raise
        return fh, inode

    async def readlink(self, ino: int) -> bytes:
        inode = await self._inode(ino)
        if not stat.S_ISLNK(inode.mode):
            raise FsError(errno.EINVAL)
        return inode.target or b""

    async def link(self, ino: int, parent: int, name: bytes) -> Inode:
        return self._local(await self.meta.link(ino, parent, name))

    # ----------------------------------------------------------------- remove

    async def unlink(self, parent: int, name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        # not open here: deleted with its last name, in the same transaction
        inode = await self.meta.unlink(parent, name, self.files)
        if inode.nlink == 0:
            await self._maybe_free(inode.id)  # (or once the kernel and its handles let go)

    async def rmdir(self, parent: int, name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        await self._maybe_free(await self.meta.rmdir(parent, name))

    # ----------------------------------------------------------------- rename

    async def rename(self, p_old: int, n_old: bytes, p_new: int, n_new: bytes, flags: int) -> None:
        if len(n_old) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        replaced = await self.meta.rename(p_old, n_old, p_new, n_new, flags)
        if replaced is not None:
            await self._maybe_free(replaced)

    # ------------------------------------------------------------------ files

    async def _file(self, inode: Inode) -> FileState:
        """The open-file state of an inode (made on first use, shared by its handles)."""
        fs = self.files.get(inode.id)
        if fs is None:
            fs = self.files[inode.id] = FileState(inode.id, inode.size, self.shared)
        else:
            await fs.refresh(inode)
        fs.handles += 1
        return fs

    async def _close_file(self, fs: FileState) -> None:
        fs.handles -= 1
        if fs.handles == 0:
            await fs.release_lock()
            if self.files.get(fs.ino) is fs:
                del self.files[fs.ino]
                await self._maybe_free(fs.ino)

    async def _open_handle(self, inode: Inode, flags: int) -> int:
        """A new handle.  With the writeback cache a writer takes the file's write lock
        here: its writes stay in the kernel until close, fsync or memory pressure, so the
        lock (and a wait for another mount's writer) cannot wait for the first of them;
        and the kernel, not the handle, puts O_APPEND writes at the end."""
        fs = await self._file(inode)
        writer = flags & os.O_ACCMODE != os.O_RDONLY
        fs.writers += writer
        fh = self._next_fh
        self._next_fh += 1
        wb = self.opts.writeback_cache
        self.handles[fh] = Handle(inode.id, bool(flags & os.O_APPEND) and not wb, writer, fs)
        if wb and writer:
            try:
                await fs.take_lock()
            except BaseException:
                await self.release(fh)
                raise
        return fh

    async def open(self, ino: int, flags: int, pid: int = 0) -> tuple[int, bool, bool]:
        """A handle of the file for process `pid` (0: unknown), whether the kernel may keep
        the pages it caches of it (close-to-open: only if they are of the version open
        finds in the metadata; otherwise the kernel drops them and caches this version
        from now on), and whether the attributes it has of the file are of that version
        too (else it must drop them: a read would stop at an old size).  Without the
        writeback cache they are when its last attributes were of it (attrs_given): the
        kernel's own writes since then made it ask again.

        With the writeback cache the kernel would keep the size and mtime of its inode
        as well: an open of a file another mount changed, of which the kernel has no
        open file here, answers ESTALE and gives the file a new generation; the kernel
        then looks the name up again (twice, from the process that opens), builds a new
        inode from that reply (entry_generation) and opens that.  Until an open comes
        from a process that looked the file up since, every open is one of the old inode
        (the kernel fails the I/O of an inode it replaced with EIO) and answers ESTALE as
        well.  The handle of an open answered ESTALE is kept for its retry from the same
        process, which is never answered ESTALE: a writer keeps its write lock from the
        first try, so the size of the new inode is the one it writes after.  A file the
        kernel has open here keeps its inode, with the size it knows, until its last close.
        """
        inode = await self.meta.getattr(ino)
        if inode is None:
            raise FsError(errno.ENOENT)
        if stat.S_ISDIR(inode.mode):
            raise FsError(errno.EISDIR)
        generation = self.generations[ino]  # of the kernel's inode this open is for
        fh = self._held.pop((ino, pid), None)  # the kernel's retry of an open answered ESTALE
        retry = fh is not None
        self._opening[ino] += 1
        try:
            if fh is None:
                fh = await self._open_handle(inode, flags)
            h = self.handles[fh]
            if self.opts.writeback_cache and h.writer:  # the lock was waited for: read again
                inode = await self.meta.getattr(ino) or inode
            version = content_version(inode)
            keep_cache = self.page_versions.get(ino) == version
            r = self.replacing.get(ino)
            if r is not None and pid in r.pids:  # after its lookup: the old inode is gone
                del self.replacing[ino]
            elif not retry and (r is not None or self.generations[ino] != generation):
                self._hold_for_retry(ino, pid, fh)  # an open of the old inode
                fh = None
                raise FsError(errno.ESTALE)
            # (pages of a file the kernel has open are not dropped)
            if not keep_cache and not retry and h.file.handles == self._opening[ino]:
                if self._replaceable(inode):
                    self.generations[ino] += 1
                    self.replacing[ino] = Replacement()
                    self.page_versions.pop(ino, None)
                    self._hold_for_retry(ino, pid, fh)
                    fh = None
                    raise FsError(errno.ESTALE)
                self.page_versions[ino] = version
            attrs_current = keep_cache or (
                not self.opts.writeback_cache and self.attr_versions.get(ino) == version
            )
            if flags & os.O_TRUNC and h.writer:
                await h.file.truncate(0)
        except BaseException:
            if fh is not None:
                await self.release(fh)
            raise
        finally:
            self._opening[ino] -= 1
            if self._opening[ino] <= 0:
                del self._opening[ino]
        return fh, keep_cache, attrs_current

    def _hold_for_retry(self, ino: int, pid: int, fh: int) -> None:
        """Keep the handle of an open answered ESTALE for its retry (see open); released
        after RETRY_HOLD_S if none comes (the process died meanwhile)."""
        earlier = self._held.pop((ino, pid), None)
        self._held[(ino, pid)] = fh
        self.shared.nursery.start_soon(self._release_held, (ino, pid), fh, earlier)

    async def _release_held(self, key: tuple[int, int], fh: int, earlier: int | None) -> None:
        if earlier is not None:
            await self._release_quietly(earlier)
        await trio.sleep(RETRY_HOLD_S)
        if self._held.get(key) == fh:
            del self._held[key]
            await self._release_quietly(fh)

    async def _release_quietly(self, fh: int) -> None:
        """Release a handle no process holds (background work: logged, never raised)."""
        try:
            await self.release(fh)
        except Exception as e:
            log.log(failure_level(e), "release of a handle kept for a retry failed: %s", e)

    def _handle(self, fh: int) -> Handle:
        try:
            return self.handles[fh]
        except KeyError:
            raise FsError(errno.EBADF) from None

    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:
        file = self._handle(fh).file
        try:
            return await file.read(off, size)
        except BlockMissing as e:  # EIO for this read; the log says which file lost what
            log.error(
                "BLOCK-UNREADABLE %s of %s (inode %d, bytes %d..%d): %s",
                e.block_id,
                await self.meta.path_of(file.ino),
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
        if (off | len(data)) % PAGE_SIZE and not self.opts.writeback_cache:
            # the kernel keeps a page this write covers only in part without its other
            # bytes (not up to date): a later open must not keep such pages, or every
            # read of the file becomes a request per missing page.  (The writeback cache
            # reads a page in before a write covers it in part: its pages are whole.)
            self.page_versions.pop(h.ino, None)
        await h.file.write(off, data)
        return len(data)

    async def flush(self, fh: int) -> None:
        fs = self._handle(fh).file
        await fs.flush()
        await self.record_degraded()
        self._pages_committed(fs)

    def _pages_committed(self, fs: FileState) -> None:
        """After a final flush under the file's write lock: the kernel's pages, current when
        the lock was taken (else take_lock dropped the entry), are the bytes this mount's
        last commit left (the version it returned).  Nothing committed since the last
        time (a close after a flush): nothing changes."""
        if fs.lease is not None and fs.ino in self.page_versions and fs.commits != fs.pages_at:
            if fs.committed_version is not None:
                self.page_versions[fs.ino] = fs.committed_version
                fs.pages_at = fs.commits

    async def fsync(self, fh: int) -> None:
        await self._handle(fh).file.flush()
        await self.record_degraded()
        await self.fsync_meta()

    async def fsync_meta(self) -> None:
        """Make every committed metadata change durable."""
        await trio.to_thread.run_sync(self.engine.sync)

    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        fs = h.file
        fs.writers -= h.writer
        try:
            if fs.writers == 0:  # the last writer: commit, then let other mounts write
                try:
                    await fs.flush()
                except BaseException:
                    self.page_versions.pop(h.ino, None)  # the kernel has uncommitted bytes
                    raise
                self._pages_committed(fs)
                if fs.writers == 0:  # (a writer that opened it meanwhile keeps the lock)
                    await fs.release_lock()
        finally:
            if fs.writers == 0:
                fs.lost = None  # the writers that lost the lock are closed: a new one may write
            await self._close_file(fs)

    # ------------------------------------------------------------ directories

    async def opendir(self, ino: int) -> int:
        await self._dir(ino)
        fh = self._next_fh
        self._next_fh += 1
        self.dir_handles[fh] = ino
        return fh

    def releasedir(self, fh: int) -> None:
        self.dir_handles.pop(fh, None)

    async def readdir(self, fh: int, after: int, limit: int = 256) -> list[tuple[Dentry, Inode]]:
        """A page of (entry, inode) after cursor `after` (0: from the start)."""
        ino = self.dir_handles.get(fh)
        if ino is None:
            raise FsError(errno.EBADF)
        page = await self.meta.readdir(ino, after, limit)
        return [(d, self._local(inode)) for d, inode in page]

    # ----------------------------------------------------------------- xattrs

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        """The kernel asks for security.capability before every write(2) (to drop it, as
        a write must); that it is absent is answered from memory for XATTR_ABSENT_S, as
        fresh as the kernel's attributes (a change on this mount forgets it at once)."""
        absent = self._absent_xattrs.get(ino)
        now = trio.current_time()
        if absent is not None and absent.get(name, 0.0) > now:
            raise FsError(errno.ENODATA)
        value = await self.meta.get_xattr(ino, name)
        if value is None:
            if name.startswith(b"security."):
                self._absent_xattrs.setdefault(ino, {})[name] = now + XATTR_ABSENT_S
            raise FsError(errno.ENODATA)
        return value

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        self._absent_xattrs.pop(ino, None)
        await self.meta.set_xattr(ino, name, value)

    async def listxattr(self, ino: int) -> list[bytes]:
        return await self.meta.list_xattrs(ino)

    async def removexattr(self, ino: int, name: bytes) -> None:
        self._absent_xattrs.pop(ino, None)
        await self.meta.remove_xattr(ino, name)

    # ----------------------------------------------------------------- statfs

    async def statfs(self) -> dict[str, int]:
        """What df shows: Used is what this filesystem stores, Avail what a user can still
        fill, Size their sum (so that df's Size - Avail = Used holds).

        Used: the bytes of the blocks files reference, each once (deduplicated), one
        copy each (the bytes users stored, not times R), from the metadata's running
        totals.  Avail: free space as a user can fill it, raw space / R, each disk once:
        backing directories are asked directly, remote nodes by the figures the probe
        loop keeps (a node not heard from yet counts 0); a disk holding several nodes
        counts once; it is what blocks of R copies on distinct nodes can still take
        (`writable_bytes`: 0 once fewer than R nodes have room for a block).  Size is
        not the disks' raw capacity / R: other files on those disks take space that is
        neither hafs's Used nor Avail.
        Inodes: hafs has no inode table to fill, so `df -i` shows the inodes in use and
        FREE_INODES more free.  The filesystem id (f_fsid, `stat -f`) cannot be given:
        the FUSE protocol's statfs reply has no such field (the kernel reports 0).
        """
        nodes: dict[str, tuple[str, int, int]] = {}  # node id -> disk, total, free
        for node_id, store in self.placement.stores.items():
            if isinstance(store, DirStore):
                try:
                    st = os.statvfs(store.path)
                    nodes[node_id] = (
                        disk_id(store.path),
                        st.f_blocks * st.f_frsize,
                        st.f_bavail * st.f_frsize,
                    )
                except OSError:
                    continue  # a lost disk adds no space
        nodes.update(self.placement.usage)
        r = self.placement.replicas
        free = writable_bytes({n: (disk, f) for n, (disk, _, f) in nodes.items()}, r)
        usage = await self.meta.usage()
        bsize = 4096
        used_blocks = (usage.stored_bytes + bsize - 1) // bsize
        return {
            "f_bsize": bsize,
            "f_frsize": bsize,
            "f_blocks": used_blocks + free // bsize,
            "f_bfree": free // bsize,
            "f_bavail": free // bsize,
            "f_files": usage.inodes + FREE_INODES,
            "f_ffree": FREE_INODES,
            "f_favail": FREE_INODES,
            "f_namemax": NAME_MAX,
        }
