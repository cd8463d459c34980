"""Open-file state: write buffering, flushing to blocks, and reads.

One `FileState` per inode that is open on this mount (all handles share it,
so a read sees every write of the mount).  A write lands in the `DirtyBuffer`.
A flush turns dirty bytes into blocks:

1. take a segment of dirty bytes out of the buffer (they move to `inflight`,
   where reads still find them) and widen the range to the edges of the
   extents it cuts into: this *region* is all that is re-chunked, so a random
   write re-chunks one block's neighbourhood, never the whole file;
2. in a worker thread: assemble the region's new bytes, cut them with FastCDC,
   hash each block; all-zero blocks become holes;
3. store every new block on R replicas (durable), except those the engine
   says files reference already (`MetaStore.referenced`: durable since their
   first reference, and no garbage until their count has been zero for the
   grace period, far longer than this flush), and only then
4. commit the region's new extents and the file size in one transaction
   (data before metadata); blocks shorter than the chunker's minimum (small
   files, the tails of files) then go into the block cache, so reading back
   what was just written (`diff`, a build) costs no block fetch; large
   blocks of a stream are left out (no copy, and they would push out what
   reads cached).

A background flush of a file being written sequentially keeps the last,
still-growing block in the buffer, so streams are cut where their content
says, not where the buffer happened to fill.

Concurrency rules: every method runs on the trio thread.  Writes never await
on the file's lock (only on the mount-wide write budget).  Flushes and
truncates of one file hold `lock`, so the extents of the file cannot change
while a flush works on them.  A read takes its snapshot of inflight and dirty
bytes, then the extents (an engine over the network awaits here: a region
committed in between is found in both, with the same bytes), then fetches
immutable blocks.
"""

from __future__ import annotations

import errno
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from ..errors import FsError, LockLost, LockTimeout, MetaError, MetaUnavailable, one_error
from ..meta import AsyncMeta, Extent, Inode, LockService
from ..meta.locks import Lease
from ..metrics import MountMetrics
from ..store.chunker import MAX_SIZE, MIN_SIZE, cut_points
from ..store.dirstore import block_id as hash_block
from ..store.placement import Placement
from .cache import BlockCache
from .dirty import DirtyBuffer

log = logging.getLogger(__name__)

_ZEROS = bytes(MAX_SIZE)
MAX_PENDING = 4  # regions of one file stored at once
INLINE_CUT_BYTES = 64 * 1024  # regions up to this size are cut and hashed on the trio thread
# a read of a file open here catches up with another mount's size at most this often, as the
# kernel's attributes do (fuse_ops.ATTR_TIMEOUT); an open always does (close-to-open)
READ_REFRESH_S = 1.0


class WriteBudget:
    """Mount-wide limit on buffered bytes (dirty + in flight): writers wait above it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._changed = trio.Event()

    def add(self, n: int) -> None:
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n
        self._changed.set()
        self._changed = trio.Event()

    async def wait_below_limit(self) -> None:
        while self.used > self.limit:
            await self._changed.wait()


@dataclass
class Shared:
    """What every FileState of a mount uses (passed down, never a back-reference)."""

    meta: AsyncMeta
    placement: Placement
    cache: BlockCache
    budget: WriteBudget
    nursery: trio.Nursery  # for background flushes and read-ahead
    limiter: trio.CapacityLimiter  # chunking and hashing threads
    flush_bytes: int  # start a background flush when a file has this much dirty data
    readahead_blocks: int
    uncommitted: Counter  # block ids stored but not yet referenced: garbage collection skips them
    locks: LockService  # write locks, shared with the other mounts of the filesystem
    lock_wait_s: float  # how long a writer waits for another mount's lock
    open_files: dict  # inode -> FileState of every open file (owned by the vfs)
    # inode -> content_version of what the kernel's page cache holds of it (owned by the
    # vfs, see Vfs.open); a writer that finds the file changed under it drops the entry
    page_versions: dict
    record_degraded: Callable[[], Awaitable[None]]  # writes placement's degraded reports
    metrics: MountMetrics  # the mount's (write-lock waits are counted here)


def _cut_and_hash(buf: bytearray) -> list[tuple[int, int, str | None]]:
    """(start, length, block id or None for an all-zero block) of each block of buf."""
    out = []
    mv = memoryview(buf)
    start = 0
    for end in cut_points(mv):
        chunk = mv[start:end]
        out.append(
            (start, end - start, None if chunk == _ZEROS[: end - start] else hash_block(chunk))
        )
        start = end
    return out


def content_version(inode: Inode) -> tuple[int, int, int]:
    """What tells whether a file's bytes changed: every commit and truncate, by any
    mount, sets its ctime to the time of the change (and its size and mtime)."""
    return inode.size, inode.mtime_ns, inode.ctime_ns


def failure_level(e: BaseException) -> int:
    """How loud a failure of background work is: an etcd outage is logged once, by the
    engine (META-UNAVAILABLE)."""
    return logging.DEBUG if isinstance(e, MetaUnavailable) else logging.ERROR


class FileState:
    def __init__(self, ino: int, size: int, shared: Shared) -> None:
        """size: of the inode as just read (an open's)."""
        self.ino = ino
        self.size = size  # logical size, including buffered writes
        self.committed_size = size  # size recorded in the metadata
        self.mtime_ns: int | None = None  # mtime of buffered changes, written at commit
        self.dirty = DirtyBuffer()
        self.inflight: list[tuple[int, bytes]] = []  # bytes of regions being stored
        self.pending: list[tuple[int, int]] = []  # regions being stored and committed
        self._pending_changed = trio.Event()
        self.lock = trio.Lock()  # flushes and truncates
        self._taking = trio.Lock()  # acquiring the write lock
        self.error: BaseException | None = None  # reported once (next write, fsync or close)
        # the write lock was lost while writers had the file open: each of their writes,
        # fsyncs and closes fails (EIO) until the last of them is closed (vfs.release), so
        # that no lock is taken again in the middle of what they write
        self.lost: LockLost | None = None
        self.handles = 0
        self.writers = 0  # handles open for writing
        self.lease: Lease | None = None  # the write lock, from the first change to the last close
        self.bg_flushing = False
        self.s = shared
        self._last_read_block: str | None = None
        self._refreshed_at = trio.current_time()  # of the last read of the inode (`size`'s)
        self.commits = 0  # commits of this mount's changes of the file (extents, sizes)
        self.committed_version: tuple[int, int, int] | None = None  # as the last one left it
        self.pages_at = 0  # `commits` when the vfs last recorded the kernel's pages' version

    # ------------------------------------------------------------------ write

    async def write(self, off: int, data: bytes) -> None:
        self._raise_error()
        await self.take_lock()
        if self.s.budget.used > self.s.budget.limit:
            # The buffer is full: every file with buffered bytes stores them now,
            # also files below flush_mb that nobody writes to any more.
            for fs in self.s.open_files.values():
                fs.start_background_flush(force=True)
            await self.s.budget.wait_below_limit()
        self.s.budget.add(self.dirty.write(off, data))
        self.size = max(self.size, off + len(data))
        self.mtime_ns = time.time_ns()
        if self.dirty.nbytes >= self.s.flush_bytes:
            self.start_background_flush()

    def start_background_flush(self, force: bool = False) -> None:
        if self.dirty and not self.bg_flushing:
            self.bg_flushing = True
            self.s.nursery.start_soon(self._background_flush, force)

    async def _background_flush(self, force: bool) -> None:
        try:
            await self.flush(final=False, force=force)
        except Exception as e:  # kept and reported by the next write, fsync or close
            log.log(failure_level(e), "background flush of inode %d failed: %s", self.ino, e)
        finally:
            self.bg_flushing = False

    # ------------------------------------------------------------ write lock

    def has_changes(self) -> bool:
        """Whether this mount holds changes of the file that are not committed yet."""
        return bool(self.lease or self.dirty or self.pending)

    async def refresh(self, inode: Inode | None = None) -> None:
        """Catch up with the metadata (another mount may have changed the file); `inode`:
        the caller's fresh copy."""
        if not self.has_changes():
            started = trio.current_time()
            inode = inode or await self.s.meta.getattr(self.ino)
            self._refreshed_at = started
            if inode is not None and not self.has_changes():
                self.size = self.committed_size = inode.size

    async def take_lock(self) -> None:
        """Hold the file's write lock before its first change (see locks.py)."""
        if self.lost is not None:
            raise self.lost
        if self.lease is not None:
            if self.s.locks.valid(self.lease):
                return
            await self.lose_lock("its lease expired")
            self._raise_error()
        async with self._taking:  # one task of this mount asks; the others share its lease
            if self.lease is not None:
                return
            started = trio.current_time()
            try:
                lease = await self.s.locks.acquire(f"inode:{self.ino}", self.s.lock_wait_s)
                self.s.metrics.lock_wait_seconds.observe(trio.current_time() - started)
            except LockTimeout as e:
                log.warning(
                    "LOCK-WAIT-TIMEOUT %s: still held by %s after %.0f s",
                    await self.s.meta.path_of(self.ino),
                    e.holder,
                    self.s.lock_wait_s,
                )
                raise FsError(errno.ENOLCK, str(e)) from None
            try:
                inode = await self.s.meta.fence(self.ino, lease.token)
                await self.refresh(inode)  # the last writer's size, before any change here
                if self.s.page_versions.get(self.ino) != content_version(inode):
                    # changed since the kernel cached it: what this mount writes now does not
                    # make those pages current (the next open drops them)
                    self.s.page_versions.pop(self.ino, None)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self.s.locks.release(lease)
                raise
            self.lease = lease

    async def _fenced_truncate(self, size: int) -> None:
        try:
            inode = await self.s.meta.truncate(self.ino, size, self.mtime_ns, self._token())
            self.committed_version = content_version(inode)
            self.commits += 1
        except LockLost as e:
            await self.lose_lock(str(e))
            self._raise_error()

    def _token(self) -> int:
        """The token of the write lock the file's changes are made under.  Without one
        (lost while a flush or truncate waited) nothing may be committed: an unfenced
        commit would overwrite the next writer's data."""
        if self.lease is None:
            raise LockLost(f"inode {self.ino}: its write lock was lost")
        return self.lease.token

    async def lose_lock(self, why: str) -> None:
        """The lease is gone: drop the uncommitted changes; fsync and close report EIO.
        The error is set before the await for the path: an fsync meanwhile reports it."""
        self._drop_changes()
        lost = LockLost(f"write lock of inode {self.ino} lost: {why}")
        if self.writers:
            self.lost = lost
        else:  # (a truncate of a file no handle writes: that truncate fails)
            self.error = lost
        try:
            path = await self.s.meta.path_of(self.ino)
        except MetaError:  # (etcd does not answer: the lock was lost for that)
            path = f"inode {self.ino}"
        log.error("LOCK-LOST %s: %s; its uncommitted writes are dropped", path, why)

    def _drop_changes(self) -> None:
        self.s.page_versions.pop(self.ino, None)  # the kernel has bytes that were not committed
        before = self.dirty.nbytes
        self.dirty.truncate_range(0)
        self.s.budget.release(before)
        self.lease = None
        self.mtime_ns = None
        self.size = self.committed_size

    async def release_lock(self) -> None:
        if self.lease is not None and not (self.dirty or self.pending):
            lease, self.lease = self.lease, None
            await self.s.locks.release(lease)

    def _raise_error(self) -> None:
        if self.lost is not None:
            raise self.lost
        if self.error is not None:
            err, self.error = self.error, None
            raise err

    # ------------------------------------------------------------------ flush

    async def flush(self, final: bool = True, force: bool = False) -> None:
        """Store buffered bytes as blocks and commit them (all of them when final).

        Regions are cut under the lock; storing and committing them runs in
        the background (at most MAX_PENDING regions per file), so the next
        region is cut while the previous one is written.  A final flush waits
        for every region and reports the first error.
        """
        async with self.lock:
            if final:
                self._raise_error()
            try:
                while self.dirty and self.error is None:  # a failed region ends the flush
                    partial = not final and not force
                    if partial and self.dirty.nbytes < self.s.flush_bytes // 2:
                        break
                    segs = self.dirty.segments()
                    start, end = max(segs, key=lambda se: se[1] - se[0]) if partial else segs[0]
                    keep_tail = partial and end == self.size
                    if not await self._flush_region(start, end, keep_tail):
                        break
                if final:
                    await self._wait_pending(lambda: not self.pending)
            except BaseException as e:
                if not final:
                    self.error = e
                raise
            if final:
                self._raise_error()
                if self.mtime_ns is not None or self.committed_size != self.size:
                    await self._commit_mtime()

    async def _wait_pending(self, done) -> None:
        while not done():
            await self._pending_changed.wait()

    async def _commit_mtime(self) -> None:
        """Commit a size and mtime that no flushed block carried (a truncate up, zeros)."""
        self.mtime_ns = self.mtime_ns or time.time_ns()
        await self._fenced_truncate(self.size)
        self.committed_size = self.size
        self.mtime_ns = None

    async def _widen(self, start: int, end: int) -> tuple[int, int, list[Extent]]:
        """Widen [start, end) to the edges of the extents and dirty segments it cuts into."""
        while True:
            # (nothing committed, under the lock: no extents to read, as for a new file)
            exts = await self.s.meta.extents(self.ino, start, end) if self.committed_size else []
            new_start = min([start] + [e.offset for e in exts[:1]])
            new_end = max([end] + [e.end for e in exts[-1:]])
            for s, e in self.dirty.segments():
                if s < new_end and e > new_start:
                    new_start, new_end = min(new_start, s), max(new_end, e)
            if (new_start, new_end) == (start, end):
                return start, end, exts
            start, end = new_start, new_end

    async def _flush_region(self, seg_start: int, seg_end: int, keep_tail: bool) -> bool:
        """Cut the dirty segment [seg_start, seg_end) into blocks and start storing them.

        False if nothing could be flushed yet (one growing block of a stream).
        Runs under `lock`.
        """
        token = self._token()  # the lease the bytes were written under, even if lost meanwhile
        start, end, exts = await self._widen(seg_start, seg_end)
        # a region still being stored must be committed before this one reads its extents
        await self._wait_pending(
            lambda: (
                len(self.pending) < MAX_PENDING
                and not any(s < end and e > start for s, e in self.pending)
            )
        )
        start, end, exts = await self._widen(start, end)
        keep_tail = keep_tail and end == seg_end
        pieces = self.dirty.take(start, end)  # still charged to the budget until committed
        self.inflight.extend(pieces)
        try:
            old = [(e, await self.s.cache.get(e.block_id)) for e in exts]
            if end - start <= INLINE_CUT_BYTES:  # microseconds: cheaper than a thread hop
                blocks = _assemble_and_cut(start, end, old, pieces)
            else:
                blocks = await trio.to_thread.run_sync(
                    _assemble_and_cut, start, end, old, pieces, limiter=self.s.limiter
                )
            if keep_tail:
                if len(blocks) < 2:  # one growing block: wait for more data
                    self._finish_region(pieces, failed=True)
                    return False
                tail_start = start + blocks[-1][0]
                self._return_to_dirty(pieces, from_offset=tail_start)
                blocks = blocks[:-1]
                end = tail_start
        except BaseException:
            self._finish_region(pieces, failed=True)
            raise
        self.pending.append((start, end))
        self.s.nursery.start_soon(self._store_and_commit, start, end, blocks, pieces, token)
        return True

    def _finish_region(self, pieces: list[tuple[int, bytes]], failed: bool) -> None:
        if failed:  # the bytes go back to the buffer where no newer write replaced them
            self._return_to_dirty(pieces)
        for p in pieces:
            self._remove_inflight(p)
        self.s.budget.release(sum(len(d) for _, d in pieces))

    async def _store_and_commit(
        self, start: int, end: int, blocks: list, pieces: list, token: int
    ) -> None:
        new = [
            Extent(start + off, length, bid) for off, length, bid, _ in blocks if bid is not None
        ]
        data = {bid: chunk for _, _, bid, chunk in blocks if bid is not None}
        self.s.uncommitted.update(data.keys())
        failed = True
        try:
            # blocks files reference already are durable and kept past this commit
            known = await self.s.meta.referenced(list(data)) if data else set()
            todo = [(bid, chunk) for bid, chunk in data.items() if bid not in known]
            if len(todo) == 1:  # (a small file: no nursery for one block)
                await self.s.placement.put(*todo[0])
            elif todo:
                with one_error():
                    async with trio.open_nursery() as nursery:
                        for bid, chunk in todo:
                            nursery.start_soon(self.s.placement.put, bid, chunk)
            await self.s.record_degraded()  # before the commit that references the blocks
            size = max(self.committed_size, end)
            inode = await self.s.meta.commit(
                self.ino,
                start,
                end,
                new,
                {bid: len(c) for bid, c in data.items()},
                size,
                self.mtime_ns or time.time_ns(),
                token,  # the lease this region was written under, even if lost since
            )
            self.committed_version = content_version(inode)
            self.committed_size = size
            self.commits += 1
            failed = False
            for bid, chunk in data.items():
                if len(chunk) < MIN_SIZE:
                    self.s.cache.put(bid, bytes(chunk))
            if not self.dirty and len(self.pending) == 1:
                self.mtime_ns = None
        except LockLost as e:  # a newer writer committed meanwhile: these bytes must go
            failed = False
            await self.lose_lock(str(e))
        except Exception as e:
            log.log(
                failure_level(e),
                "storing bytes %d-%d of inode %d failed: %s",
                start,
                end,
                self.ino,
                e,
            )
            self.error = self.error or e
        finally:
            self.s.uncommitted.subtract(data.keys())
            for bid in data:
                if self.s.uncommitted[bid] <= 0:
                    del self.s.uncommitted[bid]
            self._finish_region(pieces, failed)
            self.pending.remove((start, end))
            self._pending_changed.set()
            self._pending_changed = trio.Event()

    def _return_to_dirty(self, pieces: list[tuple[int, bytes]], from_offset: int = 0) -> None:
        """Put taken bytes back where no newer write replaced them."""
        for off, data in pieces:
            if off + len(data) <= from_offset:
                continue
            if off < from_offset:
                data, off = data[from_offset - off :], from_offset
            self.s.budget.add(self.dirty.fill_gaps(off, data))

    def _remove_inflight(self, piece: tuple[int, bytes]) -> None:
        for i, p in enumerate(self.inflight):
            if p is piece:
                del self.inflight[i]
                return

    # --------------------------------------------------------------- truncate

    async def truncate(self, size: int) -> None:
        await self.take_lock()
        async with self.lock:
            await self._wait_pending(lambda: not self.pending)
            before = self.dirty.nbytes
            self.dirty.truncate_range(size)
            self.s.budget.release(before - self.dirty.nbytes)
            self.size = size
            self.mtime_ns = time.time_ns()
            if size < self.committed_size:
                await self._fenced_truncate(size)
                self.committed_size = size

    # ------------------------------------------------------------------- read

    async def read(self, off: int, size: int) -> bytes | bytearray | memoryview:
        if trio.current_time() - self._refreshed_at >= READ_REFRESH_S:
            await self.refresh()
        end = min(off + size, self.size)
        if off >= end:
            return b""
        # buffered bytes first: a region committed meanwhile is in both, with the same bytes
        overlay = [
            (o, d) for o, d in self.inflight if o < end and o + len(d) > off
        ] + self.dirty.overlapping(off, end)
        exts = await self.s.meta.extents(self.ino, off, end)
        await self._read_ahead(exts)
        # (views, not slices: the reply is copied once, by the kernel)
        if len(exts) == 1 and not overlay and exts[0].offset <= off and exts[0].end >= end:
            e = exts[0]
            block = await self.s.cache.get(e.block_id)
            return memoryview(block)[off - e.offset : end - e.offset]
        for e in exts[1:]:  # fetched at once, not one after the other
            if e.block_id not in self.s.cache:
                self.s.nursery.start_soon(self._prefetch, e.block_id)
        out = bytearray(end - off)
        for e in exts:
            block = await self.s.cache.get(e.block_id)
            lo, hi = max(e.offset, off), min(e.end, end)
            out[lo - off : hi - off] = memoryview(block)[lo - e.offset : hi - e.offset]
        for o, d in overlay:
            lo, hi = max(o, off), min(o + len(d), end)
            out[lo - off : hi - off] = memoryview(d)[lo - o : hi - o]
        return out

    async def _read_ahead(self, exts: list[Extent]) -> None:
        """When a read reaches a new block, fetch the next few blocks in the background."""
        if not exts or self.s.readahead_blocks <= 0 or exts[-1].block_id == self._last_read_block:
            return
        self._last_read_block = exts[-1].block_id
        last = exts[-1]
        if last.end >= self.size:
            return  # (the file's last block: nothing to read ahead, no query for it)
        ahead = await self.s.meta.extents(
            self.ino, last.end, last.end + self.s.readahead_blocks * MAX_SIZE
        )
        for e in ahead[: self.s.readahead_blocks]:
            if e.block_id not in self.s.cache:
                self.s.nursery.start_soon(self._prefetch, e.block_id)

    async def _prefetch(self, block_id: str) -> None:
        try:
            await self.s.cache.get(block_id)
        except Exception as e:  # the read that needs it will report the error
            log.debug("read-ahead of block %s failed: %s", block_id, e)


def _assemble_and_cut(
    start: int, end: int, old: list[tuple[Extent, bytes]], pieces: list[tuple[int, bytes]]
) -> list[tuple[int, int, str | None, bytes]]:
    """The region's new bytes, cut into blocks: (offset in region, length, id, bytes)."""
    if len(pieces) == 1 and not old and pieces[0][0] == start and len(pieces[0][1]) == end - start:
        buf = pieces[0][1]
    else:
        buf = bytearray(end - start)
        for e, block in old:
            buf[e.offset - start : e.end - start] = block[: e.length]
        for off, data in pieces:
            buf[off - start : off - start + len(data)] = data
    mv = memoryview(buf)
    return [(o, n, bid, mv[o : o + n]) for o, n, bid in _cut_and_hash(buf)]
