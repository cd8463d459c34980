"""Fewer round trips for the `kv` engine (meta/kv.py): batched reads and a small cache of
files' extents and xattrs.

On etcd every KV call is a request (3-4 ms on loopback); an operation that
reads five keys one after the other waits five times.  What is here cuts the
number of waits without weakening what a KvMeta answers:

- The KV adapter over the network (meta/etcd.py) hands the duration of each of
  its calls (get, scan, batch, commit, lease_*) to `KvMeta.observe_requests`'s
  observer: a mount's `hafs_meta_request_seconds{call}` (hafs/metrics.py), so
  the round trips of a workload can be counted.  Watches (long polls) are not.
- `KV.batch` reads several keys and ranges at one revision in one request
  (etcd: a transaction of range operations only); KvMeta uses it where it
  knows the keys an operation reads before it reads the first (a create reads
  its parent and the name; a commit the inode, its extents and the new
  blocks' rows).  `Txn.prefetch` (meta/kv.py) records those rows as its own
  reads, checks included, so a batched operation is the unbatched one with
  fewer waits.
- A transaction's first attempt takes an inode as this client last saw it
  (`FileCache.guess`) instead of reading it: its commit compares the inode's
  revision, so a guess that is no longer true only costs a re-run, which reads.
- `FileCache` keeps a file's extents and xattrs as read at one revision of its
  inode, for at most `ttl_s` (1 s) and at most `size` files.  An entry is used
  only while nothing says the inode changed: every read of the inode (getattr,
  lookup, an open, any transaction) that finds another mod_revision drops it,
  and this client's own changes drop or replace it.  A change by another client
  is seen by the first read of the inode after it (an open reads it: close-to-
  open), and in any case after ttl_s.  An inode this client deleted is
  answered absent without a request (numbers are never reused).

Concurrency: KvMeta runs in worker threads; FileCache holds a threading.Lock
for each call.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from . import Extent

FILE_TTL_S = 1.0  # how long a file's extents and xattrs are trusted without a read of it
FILE_ENTRIES = 4096  # files whose extents and xattrs are kept
FIRST_EXTENTS = 16  # extents (and xattrs) a getattr reads with the inode
GONE = 1 << 62  # the revision of an inode found absent: newer than any
DELETED = GONE + 1  # of one this client deleted


@dataclass
class FileView:
    """What is known of a file at one revision of its inode: its extents that end in
    (lo, hi] and start before hi, in order (hi None: up to the end), and its xattrs
    (None: not all known).  A view without extents (None) is a marker: the inode was
    at `revision`, nothing older may be kept."""

    revision: int
    read_at: float  # when the read that found `revision` began
    lo: int = 0
    hi: int | None = None
    extents: list[Extent] | None = None
    xattrs: dict[bytes, bytes] | None = None
    value: bytes | None = None  # the inode's stored value at `revision`, if known

    def covers(self, start: int, end: int) -> bool:
        return self.extents is not None and self.lo <= start and (self.hi is None or end <= self.hi)

    def within(self, start: int, end: int) -> list[Extent]:
        return [e for e in self.extents or () if e.end > start and e.offset < end]


def _merged(old: FileView, new: FileView, keep_window: bool) -> FileView:
    """Two views of one revision as one: the windows joined where they meet; else the
    old one's when `keep_window`, the new one's otherwise."""
    view = FileView(old.revision, max(old.read_at, new.read_at))
    view.xattrs = new.xattrs if new.xattrs is not None else old.xattrs
    view.value = new.value if new.value is not None else old.value
    a, b = old, new
    if a.extents is None or b.extents is None:
        w = b if b.extents is not None else a
    elif (a.hi is None or b.lo <= a.hi) and (b.hi is None or a.lo <= b.hi):
        lo = min(a.lo, b.lo)
        hi = None if a.hi is None or b.hi is None else max(a.hi, b.hi)
        by_end = {e.end: e for e in (*a.extents, *b.extents)}
        w = FileView(0, 0, lo, hi, [by_end[k] for k in sorted(by_end)])
    else:
        w = a if keep_window else b
    view.lo, view.hi, view.extents = w.lo, w.hi, w.extents
    return view


class FileCache:
    """Files' extents and xattrs at an inode revision (module docstring)."""

    def __init__(
        self,
        size: int = FILE_ENTRIES,
        ttl_s: float = FILE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.size = size
        self.ttl_s = ttl_s
        self.clock = clock
        self._lock = threading.Lock()
        self._views: OrderedDict[int, FileView] = OrderedDict()

    def __len__(self) -> int:
        return len(self._views)

    def get(self, ino: int) -> FileView | None:
        """The view of `ino`, if one is fresh."""
        with self._lock:
            view = self._views.get(ino)
            if view is None or self.clock() - view.read_at > self.ttl_s:
                return None
            self._views.move_to_end(ino)
            return view

    def gone(self, ino: int) -> bool:
        """Whether this client deleted the inode (it never comes back: inode numbers are
        never reused).  One found absent may be one another client is about to create."""
        with self._lock:
            view = self._views.get(ino)
            return view is not None and view.revision == DELETED

    def deleted(self, ino: int) -> None:
        """This client's commit deleted the inode."""
        with self._lock:
            self._store(ino, FileView(DELETED, 0.0))

    def put(self, ino: int, view: FileView, keep_window: bool = False) -> None:
        """Keep `view` unless the inode is known at a newer revision; one of the same
        revision is merged with it (`_merged`)."""
        with self._lock:
            old = self._views.get(ino)
            if old is not None and old.revision > view.revision:
                return
            if old is not None and old.revision == view.revision:
                view = _merged(old, view, keep_window)
            self._store(ino, view)

    def seen(self, ino: int, revision: int, value: bytes | None = None) -> None:
        """The inode was found at `revision` with `value` (if given), by a read or by this
        client's commit: a view of an older revision goes."""
        if revision == 0:  # absent: deleted (inode numbers are never reused)
            revision = GONE
        with self._lock:
            old = self._views.get(ino)
            if old is not None and old.revision > revision:
                return
            if old is not None and old.revision == revision:
                old.value = value if value is not None else old.value
                return
            self._store(ino, FileView(revision, 0.0, value=value))

    def guess(self, ino: int) -> tuple[bytes, int] | None:
        """The inode's value and revision as last found here, however old: what a
        transaction may assume on its first attempt (its commit compares the revision)."""
        with self._lock:
            view = self._views.get(ino)
            if view is None or view.value is None:
                return None
            return view.value, view.revision

    def _store(self, ino: int, view: FileView) -> None:
        self._views[ino] = view
        self._views.move_to_end(ino)
        while len(self._views) > self.size:
            self._views.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._views.clear()
