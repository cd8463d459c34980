"""`hafs fsck`: check, and with `repair=True` repair, a filesystem's metadata and blocks.

Phases, in this order (each reads the metadata in short paged queries and
lists node contents page by page, so memory holds a page, the problems found
and a compact set of unhealthy block ids, never every id):

1. **database**: the engine's check of its own storage (`check_storage`: SQLite's
   ``PRAGMA integrity_check``; nothing for a KV engine); damaged storage stops fsck
   (nothing is trusted or written) with the engine's advice on recovering it.
2. **metadata**: the root; entries naming a missing inode or sitting in a
   missing or non-directory parent (dropped); directories with several names
   (all but the oldest dropped) or unreachable from the root (a cycle: moved to
   /lost+found); inodes without a name: link count 0 (left by a crash while
   open: deleted, their blocks released) or > 0 (moved to /lost+found, named
   by inode number); link counts (files: their names; directories: 2 + their
   subdirectories); sizes of directories (0) and symlinks (the target's
   length); extents (of a missing or non-regular inode, with a bad block id or
   length, longer than their block, past the file size, overlapping); blocks
   referenced by extents but without a block row (the row is added);
   refcounts (recomputed from the extents).  Everything is read through the
   engine's paged scans and repaired through its `fsck_*` operations (no SQL
   here), so it runs on every engine: `Checker(meta, report).check_metadata()`.
3. **replicas**: every referenced block must have a good copy on each of the
   R nodes the ring names: presence and size, or with `deep` a read through
   `DirStore.get` (hash verified; a corrupt copy is moved to corrupt/ by get(),
   also in a check).  Repair copies a verified good copy (from a named node or
   any other) to the named nodes that lack one and reads each copy back and
   hashes it there (hafs.store.restore, the path the mount's repair and
   rebalance share).  A block with no good copy is
   reported with every path that uses it; the file is kept and reads of the
   lost range fail with EIO.
4. **garbage**: block rows no extent references, deleted (every copy, then
   the row) once unreferenced for longer than the grace period and no copy
   was re-stored within it; then every node is listed page by page: a copy on
   a node the ring does not name is deleted once the named copies are good; a
   block file no metadata knows of is deleted once older than the grace.
   Younger garbage is left for a writer about to commit it ("pending").

Memory: a page of each scan or node listing, the problems found, a compact set
of unhealthy block ids, and one thing that grows with the filesystem: the
`InodeTable` (about 33 bytes an inode: number, type, size, names, subdirectories,
a directory's parent), which the checks of names, link counts and reachability
need whole.  Blocks are never all held: refcounts are counted per block row
(`block_refs`).

Exit codes follow fsck(8): 0 no problem, 1 problems found and all corrected,
4 problems left (every problem counts in a check), 8 operational error.
Pending garbage and unlinked inodes still open on a running mount are not
problems.

Concurrency: fsck is a synchronous tool (no trio).  The replica probes of a
page (stat, or read and hash) run in a small thread pool; the workers touch
nothing but DirStore (made for any number of threads) and the rate throttle
(locked); the metadata, the report and every repair stay on the calling
thread.  Without repair fsck may run beside mounts: it opens the metadata
read-only (an older layout as it is: a check writes nothing, not even an
upgrade), takes no session, reports the filesystem as mounted when a mount
session is alive, checks the metadata inside the engine's snapshot where it
has one (SQLite: one read transaction; the KV engine has none, and says so in
the report), treats unlinked inodes as possibly open, and re-reads the
metadata before reporting a block whose copies are missing (a mount may have
dropped it meanwhile).  With repair it holds a "repair" session for the whole
run: registering it is refused while a mount or rebalance session is alive,
and no mount or rebalance starts until it has ended, on any host.  A repair
deletes blocks, so it is refused for a copy of a home and for nodes that
another metadata store owns (`home.owner_claim`, hafs.store.owner): the copy
would take the original's new blocks for strays.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import stat
import sys
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, TextIO

from ..errors import BlockCorrupt, BlockMissing, HafsError, NodeOwnedElsewhere, UserError
from ..home import is_remote, node_auth, open_meta, open_store, owner_claim
from ..meta import ROOT_INODE, BlockRow, Inode, MetaStore, now_ns
from ..store.dirstore import BLOCK_ID_RE, DirStore, read_identity
from ..store.owner import OwnerClaim
from ..store.restore import RestoreResult, drop_extra, fetch, restore
from ..store.ring import Ring
from . import tool_session

log = logging.getLogger(__name__)

EXIT_CLEAN, EXIT_CORRECTED, EXIT_LEFT, EXIT_OPERATIONAL = 0, 1, 4, 8
DEFAULT_GRACE_S = 3600.0
DEFAULT_THREADS = 8  # replica probes in flight: disks answer several requests at once
PROBE_CHUNK = 32  # probes per worker task (a task per probe costs more than a cached stat)
PAGE = 1000  # rows per metadata query, ids per node listing
MAX_DETAILS = 1000  # detail lines kept per problem kind (counts are exact)
MAX_PATHS = 100  # paths named per inode (hard links)
S_IFDIR = stat.S_IFDIR

# Problem kinds, in report order, with what they mean.
KINDS = {
    "database_damaged": "the metadata engine's check of its storage failed (SQLite: integrity)",
    "root_missing": "the root directory is missing or not a directory",
    "dangling_entry": "a directory entry names a missing inode or has no directory to live in",
    "extra_directory_entry": "a directory (or the root) with more than one name",
    "unreachable_directory": "a directory in a cycle, not reachable from the root",
    "unlinked_inode": "an inode with link count 0 and no name, left by a crash while open",
    "orphan_inode": "an inode with links but no directory entry (moved to /lost+found)",
    "link_count": "a link count that disagrees with the directory entries",
    "inode_size": "a directory or symlink whose size is wrong",
    "extent_invalid": "an extent of a missing or non-regular inode, or a bad block id or length",
    "extent_past_size": "an extent reaching past the end of its file",
    "extent_overlap": "extents of one file that overlap",
    "missing_block_row": "a block referenced by extents but absent from the blocks table",
    "refcount": "a block reference count that disagrees with the extents",
    "block_row_size": "a block row whose size disagrees with the block's verified content",
    "node_unavailable": "a node whose backing directory or server cannot be used",
    "missing_replica": "a copy missing on a node the ring names for it",
    "corrupt_replica": "a copy whose bytes do not hash to its id (moved to corrupt/)",
    "lost_block": "a block with no good copy anywhere: reads of its range fail with EIO",
    "misplaced_replica": "a copy on a node the ring does not name for it",
    "garbage_block": "a block no file references any more, past the grace period",
    "stray_block": "a block file no metadata knows of, past the grace period",
}

STATS = (
    "inodes",
    "entries",
    "extents",
    "blocks",
    "replicas_checked",
    "bytes_read",
    "copies_listed",
)

UNREPAIRABLE = {"database_damaged", "node_unavailable", "lost_block"}


class FsckError(HafsError):
    """fsck cannot run: no filesystem, unreadable metadata, mounted during --repair."""


# ------------------------------------------------------------------- report


@dataclass
class Report:
    """What fsck found and did; `exit_code` sums it up as fsck(8) does."""

    home: str
    repair: bool
    deep: bool
    grace_s: float
    mounted: bool = False
    found: Counter = field(default_factory=Counter)
    fixed: Counter = field(default_factory=Counter)
    details: dict[str, list[str]] = field(default_factory=dict)
    lost_paths: set[str] = field(default_factory=set)
    pending: int = 0  # unreferenced copies or rows younger than the grace: left alone
    notes: list[str] = field(default_factory=list)
    stats: Counter = field(default_factory=lambda: Counter(dict.fromkeys(STATS, 0)))
    phase_seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0

    def add(self, kind: str, detail: str) -> None:
        assert kind in KINDS, kind
        self.found[kind] += 1
        lines = self.details.setdefault(kind, [])
        if len(lines) < MAX_DETAILS:
            lines.append(detail)

    def repaired(self, kind: str, detail: str = "", n: int = 1) -> None:
        if n <= 0:
            return
        self.fixed[kind] += n
        log.info("FSCK-REPAIR %s%s", kind, f": {detail}" if detail else "")

    @property
    def left(self) -> int:
        return sum(max(0, n - self.fixed[k]) for k, n in self.found.items())

    @property
    def exit_code(self) -> int:
        if self.error:
            return EXIT_OPERATIONAL
        if self.left:
            return EXIT_LEFT
        return EXIT_CORRECTED if sum(self.fixed.values()) else EXIT_CLEAN

    def to_json(self) -> dict:
        return {
            "home": self.home,
            "repair": self.repair,
            "deep": self.deep,
            "grace_s": self.grace_s,
            "mounted": self.mounted,
            "exit_code": self.exit_code,
            "result": RESULTS[self.exit_code],
            "error": self.error,
            "problems": {
                k: {
                    "found": self.found[k],
                    "repaired": self.fixed[k],
                    "left": self.found[k] - self.fixed[k],
                    "details": self.details.get(k, []),
                }
                for k in KINDS
                if self.found[k]
            },
            "lost_paths": sorted(self.lost_paths),
            "pending": self.pending,
            "notes": self.notes,
            "stats": dict(self.stats),
            "phase_seconds": self.phase_seconds,
            "seconds": round(self.seconds, 3),
        }

    def render(self, max_lines: int = 20) -> str:
        mode = "repair" if self.repair else "check only"
        how = "deep (every replica read and hashed)" if self.deep else "presence and size"
        out = [f"hafs fsck {self.home} ({mode}, replicas: {how})"]
        if self.mounted:
            out.append("the filesystem is mounted: checked beside the running mount")
        if self.error:
            out.append(f"error: {self.error}")
        s = self.stats
        out.append(
            f"checked {s['inodes']:,} inodes, {s['entries']:,} entries, {s['extents']:,} extents,"
            f" {s['blocks']:,} blocks ({s['replicas_checked']:,} replicas"
            + (f", {s['bytes_read'] / 2**20:,.1f} MiB read" if s["bytes_read"] else "")
            + f"), {s['copies_listed']:,} block files listed in {self.seconds:.1f} s"
        )
        for kind in KINDS:
            n = self.found[kind]
            if not n:
                continue
            fixed = self.fixed[kind]
            state = (
                f"{n:,} found, {fixed:,} repaired"
                if self.repair
                else f"{n:,} found"
                + (" (--repair cannot fix this)" if kind in UNREPAIRABLE else " (--repair fixes)")
            )
            if self.repair and fixed < n:
                state += f", {n - fixed:,} LEFT"
            out.append(f"  {kind}: {state} - {KINDS[kind]}")
            lines = self.details.get(kind, [])
            out.extend(f"      {d}" for d in lines[:max_lines])
            if n > max_lines:
                more = n - max_lines
                out.append(f"      ... and {more:,} more (--json lists up to {MAX_DETAILS})")
        if self.lost_paths:
            out.extend(lost_data(self.found["lost_block"], self.lost_paths))
        if self.pending:
            out.append(
                f"pending: {self.pending:,} unreferenced blocks or copies younger than the grace"
                f" period ({self.grace_s:g} s) were left for writers that may be about to use them"
            )
        out.extend(f"note: {n}" for n in self.notes)
        out.append(f"result: {RESULTS[self.exit_code]} (exit {self.exit_code})")
        return "\n".join(out)


def lost_data(blocks: int, paths: set[str]) -> list[str]:
    """The lines of a report that name the files that lost data (fsck, node remove --lost)."""
    return [
        f"LOST DATA: blocks with no good copy on any node: {blocks:,}. These files are kept;"
        " reads of the lost ranges fail with EIO (never wrong bytes). Restore them from a"
        " backup:",
        *(f"  {p}" for p in sorted(paths)),
    ]


RESULTS = {
    EXIT_CLEAN: "clean",
    EXIT_CORRECTED: "errors corrected",
    EXIT_LEFT: "errors left uncorrected",
    EXIT_OPERATIONAL: "operational error",
}


# ---------------------------------------------------------- progress, rate


class Progress:
    """One self-overwriting status line on a terminal: phase, done/total, rate, ETA."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.phase, self.total, self.done = "", None, 0
        self._t0 = self._last = 0.0
        self._shown = False

    def start(self, phase: str, total: int | None = None) -> None:
        self.phase, self.total, self.done = phase, total, 0
        self._t0 = time.monotonic()
        self._last = 0.0
        self._draw()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.enabled and time.monotonic() - self._last >= 0.2:
            self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        self._last = now
        rate = self.done / (now - self._t0) if now > self._t0 else 0.0
        line = f"{self.phase}: {self.done:,}"
        if self.total:
            line += f"/{self.total:,} ({100 * self.done // self.total}%)"
        line += f"  {rate:,.0f}/s"
        if self.total and rate > 0:
            eta = max(0, self.total - self.done) / rate
            line += f"  ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        self.stream.write("\r" + line + "\x1b[K")
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False


class Throttle:
    """Keeps the bytes read at or below `rate_mib` MiB/s on average (None: unlimited).

    Thread-safe: each reader sleeps off its own share of the excess.
    """

    def __init__(self, rate_mib: float | None) -> None:
        self.rate = rate_mib * 2**20 if rate_mib else None
        self.bytes = 0
        self._t0 = time.monotonic()
        self._lock = threading.Lock()

    def consume(self, n: int) -> None:
        with self._lock:
            self.bytes += n
            if not self.rate:
                return
            ahead = self.bytes / self.rate - (time.monotonic() - self._t0)
        if ahead > 0:
            time.sleep(ahead)


# ------------------------------------------------------------ entry point


def run(
    home: Path,
    *,
    repair: bool = False,
    deep: bool = False,
    rate_mib: float | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    progress: Progress | None = None,
    threads: int = DEFAULT_THREADS,
) -> Report:
    """Check (and with `repair`, repair) the filesystem in `home`.

    Findings and operational errors (report.error) are in the returned report.
    """
    home = Path(home).absolute()
    report = Report(str(home), repair, deep, grace_s)
    progress = progress or Progress(enabled=False)
    t0 = time.monotonic()
    meta = None
    session = contextlib.ExitStack()
    try:
        try:  # a check reads the metadata as it is (an older layout too) and writes nothing
            meta = open_meta(home, read_only=not repair, as_found=not repair)
        except HafsError as e:
            raise FsckError(str(e)) from None
        owner = None
        if repair:
            try:  # refused for a copy of a home, and while a mount is alive
                owner = owner_claim(meta, home)
                session.enter_context(tool_session(meta, "repair"))
            except UserError as e:
                raise FsckError(str(e)) from None
        else:
            report.mounted = any(s.kind == "mount" for s in meta.sessions.alive())
            copy_of = meta.owner().copy_of
            if copy_of is not None:
                report.notes.append(
                    f"this metadata is a copy of the metadata at {copy_of}: it shares that"
                    " filesystem's nodes, whose blocks it does not know (they show here as"
                    " strays); --repair refuses to run on it"
                )
        checker = Checker(meta, report, progress, report.mounted, rate_mib, threads, owner)
        checker.run()
    except FsckError as e:
        report.error = str(e)
    except Exception as e:
        why = meta.damaged(e) if meta is not None else None
        if why is None:
            raise
        report.error = f"{why}: {meta.describe()['recover']}"
    finally:
        progress.close()
        if meta is not None:
            session.close()
            meta.close()
        report.seconds = time.monotonic() - t0
    return report


# ---------------------------------------------------------------- checker


def _valid_id(bid: object) -> bool:
    return isinstance(bid, str) and BLOCK_ID_RE.fullmatch(bid) is not None


def _show(name: bytes | str) -> str:
    return name if isinstance(name, str) else name.decode("utf-8", "backslashreplace")


def _age(ns: int) -> str:
    s = max(0, now_ns() - ns) / 1e9
    return f"{s:.0f} s" if s < 7200 else f"{s / 3600:.1f} h"


def pages(scan: Callable[[Any, int], list], first: Any, key: Callable[[Any], Any]) -> Iterator:
    """The pages of an engine's paged scan: `scan(after, PAGE)`, `key(last row)` the cursor."""
    after = first
    while rows := scan(after, PAGE):
        yield rows
        if len(rows) < PAGE:
            return
        after = key(rows[-1])


MISSING, REG, DIR = 0, stat.S_IFREG >> 12, stat.S_IFDIR >> 12  # InodeTable.types


class InodeTable:
    """What the whole-filesystem checks need of every inode, in flat arrays indexed by
    the inode's position among the sorted inode numbers (33 bytes an inode: ten million
    inodes take about 330 MB; this is the part of fsck's memory that grows with the
    filesystem).

    types: S_IFMT >> 12 (MISSING once deleted); sizes; names: entries naming it;
    subdirs: its entries that name directories; parent: a directory's parent by its
    kept (oldest) name, 0 for none.
    """

    def __init__(self) -> None:
        self.ids = array("q")
        self.types = bytearray()
        self.sizes = array("q")
        self.names = array("I")
        self.subdirs = array("I")
        self.parent = array("q")

    def add(self, ino: int, mode: int, size: int) -> int:
        if not self.ids or ino > self.ids[-1]:  # scans come in order: an append
            self.ids.append(ino)
            self.types.append(stat.S_IFMT(mode) >> 12)
            self.sizes.append(size)
            self.names.append(0)
            self.subdirs.append(0)
            self.parent.append(0)
            return len(self.ids) - 1
        k = bisect.bisect_left(self.ids, ino)
        for col, v in (
            (self.ids, ino),
            (self.types, stat.S_IFMT(mode) >> 12),
            (self.sizes, size),
            (self.names, 0),
            (self.subdirs, 0),
            (self.parent, 0),
        ):
            col.insert(k, v)
        return k

    def find(self, ino: int) -> int | None:
        k = bisect.bisect_left(self.ids, ino)
        if k < len(self.ids) and self.ids[k] == ino and self.types[k] != MISSING:
            return k
        return None

    def type_of(self, ino: int) -> int:
        k = self.find(ino)
        return MISSING if k is None else self.types[k]


class Checker:
    """One fsck run over an open metadata engine (see the module docstring).

    `check_metadata` alone needs nothing but the engine: it is phase 2 on any engine.
    """

    def __init__(
        self,
        meta: MetaStore,
        report: Report,
        progress: Progress | None = None,
        live: bool = False,
        rate_mib: float | None = None,
        threads: int = DEFAULT_THREADS,
        owner: OwnerClaim | None = None,
    ) -> None:
        """owner: the claim on the nodes a repair changes them with (home.owner_claim)."""
        self.meta = meta
        self.report = report
        self.owner = owner
        self.progress = progress or Progress(enabled=False)
        self.repair = report.repair
        self.deep = report.deep
        self.live = live  # a mount may be running: metadata can change under us
        self.throttle = Throttle(rate_mib)
        self.threads = threads  # replica probes (stat, or read and hash) in flight
        self.cutoff_ns = 0  # garbage older than this may go; set when the garbage phase starts
        self.unhealthy: set[str] = set()  # blocks a repair left short of R good named copies
        self._lost_found: int | None = None
        self.ring: Ring | None = None
        self.replicas = 0
        self.stores: dict[str, DirStore | None] = {}
        self.inodes = InodeTable()
        # what the metadata phase found that later phases must not take from the rows:
        self.missing_rows: dict[str, int] = {}  # referenced, no row: longest extent
        self.true_refs: dict[str, int] = {}  # rows whose refcount was wrong: the extents

    def run(self) -> None:
        self.progress.start("database")
        problems = self.meta.check_storage(100)
        if problems:
            where = self.meta.describe()
            self.report.add(
                "database_damaged",
                f"{where['location']}: {'; '.join(problems[:5])}"
                + ("; ..." if len(problems) > 5 else ""),
            )
            self.report.notes.append(
                f"the metadata is damaged, nothing else was checked: {where['recover']}"
            )
            return
        self._open_nodes()
        self._timed("metadata", self.check_metadata)
        self._timed("replicas", self.check_replicas)
        # The grace counts back from now, so with --grace 0 blocks this run released
        # (deleted inodes, dropped extents) are reclaimed too and a second run is clean.
        self.cutoff_ns = now_ns() - int(self.report.grace_s * 1e9)
        self._timed("garbage_rows", self.check_garbage_rows)
        for node_id, store in self.stores.items():
            if store is not None:
                self._timed("node_listing", self.check_node, node_id, store)
        for node_id, store in self.stores.items():
            if not isinstance(store, DirStore):
                continue  # a remote node keeps its corrupt copies on its own host
            try:
                kept = len(os.listdir(store.path / "corrupt"))
            except OSError:
                kept = 0
            if kept:
                self.report.notes.append(
                    f"node {node_id}: {kept} corrupt copies are kept in {store.path / 'corrupt'}"
                    " for inspection; delete them when done"
                )
        if self.repair:
            removed = sum(s.cleanup_tmp(self.report.grace_s) for s in self.stores.values() if s)
            if removed:
                self.report.notes.append(f"removed {removed} stale temp files of cut-off writes")
            if all(s is not None for s in self.stores.values()):  # every node was checked
                self.meta.clear_degraded(keep=self.unhealthy)
            self.meta.sync()
        degraded = self.meta.count_degraded()
        if degraded:
            self.report.notes.append(
                f"{degraded} blocks are recorded as written while a node was failing;"
                " a mount repairs them in the background, as does 'hafs fsck --repair'"
            )
        self.report.stats["bytes_read"] = self.throttle.bytes

    # ------------------------------------------------------------ helpers

    def _timed(self, phase: str, fn, *args) -> None:
        t0 = time.monotonic()
        fn(*args)
        phases = self.report.phase_seconds
        phases[phase] = round(phases.get(phase, 0.0) + time.monotonic() - t0, 3)

    def _dir_path(self, ino: int) -> str:
        """The path of directory `ino` (its oldest name at each level); '' for the root."""
        parts: list[str] = []
        seen: set[int] = set()
        while ino != ROOT_INODE:
            if ino in seen or len(parts) > 4096:
                return "<cycle>/" + "/".join(reversed(parts))
            seen.add(ino)
            names = self.meta.names(ino, 1)
            if not names:
                return f"<inode {ino}>" + "".join("/" + p for p in reversed(parts))
            ino, name = names[0]
            parts.append(_show(name))
        return "".join("/" + p for p in reversed(parts))

    def paths(self, ino: int) -> list[str]:
        """Every path of inode `ino` (one per hard link), or a placeholder if it has none."""
        if ino == ROOT_INODE:
            return ["/"]
        names = self.meta.names(ino, MAX_PATHS)
        return [f"{self._dir_path(p)}/{_show(n)}" for p, n in names] or [f"<inode {ino}, no name>"]

    def _where(self, ino: int) -> str:
        return " and ".join(self.paths(ino)[:3]) + f" (inode {ino})"

    def _lost_and_found(self) -> int:
        """The inode of /lost+found, made as a root directory if missing."""
        if self._lost_found is None:
            inode = self.meta.lookup(ROOT_INODE, b"lost+found")
            if inode is not None:
                if not stat.S_ISDIR(inode.mode):
                    raise FsckError("/lost+found exists and is not a directory: rename it first")
            else:
                root = self.meta.getattr(ROOT_INODE)
                inode = self.meta.mknod(
                    ROOT_INODE, b"lost+found", S_IFDIR | 0o700, root.uid, root.gid
                )
                tab = self.inodes
                k = tab.add(inode.id, inode.mode, 0)
                tab.names[k], tab.parent[k] = 1, ROOT_INODE
                tab.subdirs[tab.find(ROOT_INODE)] += 1
                self.report.notes.append("created /lost+found")
            self._lost_found = inode.id
        return self._lost_found

    def _move_to_lost_found(self, ino: int) -> str:
        """Give inode `ino` (now without a name) the name /lost+found/<ino>; the link
        counts follow (fsck_add_entry).  Returns the path."""
        lf = self._lost_and_found()
        name = str(ino).encode()
        while self.meta.lookup(lf, name) is not None:
            name += b"_"
        self.meta.fsck_add_entry(lf, name, ino)
        tab = self.inodes
        k = tab.find(ino)
        tab.names[k] = 1
        if tab.types[k] == DIR:
            tab.parent[k] = lf
            tab.subdirs[tab.find(lf)] += 1
        return f"/lost+found/{_show(name)}"

    # ------------------------------------------------------------- nodes

    def _open_nodes(self) -> None:
        try:
            config = self.meta.config()
            fs_uuid, auth, self.replicas = config.fs_uuid, node_auth(self.meta), config.replicas
            self.ring = Ring.from_json(self.meta.ring())
        except (HafsError, ValueError) as e:
            raise FsckError(f"the metadata's settings are unusable: {e}") from None
        for spec in self.ring.nodes.values():
            try:
                if is_remote(spec.address):
                    store = open_store(spec, fs_uuid, auth, owner=self.owner)
                    store.check_identity()
                elif self.repair:
                    store = DirStore.open(spec.address, spec.id, fs_uuid, self.owner)
                else:  # no I/O but the identity check: a check changes nothing
                    ident = read_identity(spec.address)
                    if ident is None or (ident["fs_uuid"], ident["node_id"]) != (fs_uuid, spec.id):
                        store = DirStore.open(spec.address, spec.id, fs_uuid)  # says what's wrong
                    else:
                        store = DirStore(spec.address, spec.id, fs_uuid)
            except NodeOwnedElsewhere as e:  # a repair must not change another store's nodes
                raise FsckError(str(e)) from None
            except (HafsError, OSError) as e:
                self.report.add("node_unavailable", f"node {spec.id}: {e}")
                store = None
            self.stores[spec.id] = store
        up = sum(1 for n in self.ring.nodes.values() if n.state == "up" and n.weight > 0)
        if up < self.replicas:
            self.report.notes.append(
                f"the ring has {up} nodes that take blocks, fewer than the {self.replicas}"
                " replicas asked: blocks can only have that many copies"
            )

    # ---------------------------------------------------------- metadata

    def check_metadata(self) -> None:
        """Phase 2, through the engine's paged scans; repairs through its fsck_* calls."""
        self.progress.start("metadata")
        if self.repair:  # the repair session is alone: nothing else changes the metadata
            self._check_metadata()
            return
        with self.meta.snapshot() as consistent:  # a check sees one state, if it can
            if self.live and not consistent:
                self.report.notes.append(
                    "the metadata engine gives no snapshot: findings about things a running"
                    " mount changed meanwhile may be false; check again to be sure"
                )
            self._check_metadata()

    def _check_metadata(self) -> None:
        self._check_root()
        self._load_inodes()
        self._check_entries()
        self._check_directory_names()
        self._check_unreachable()
        self._check_inodes()
        self._check_extents()
        self._check_block_rows()
        self._check_refcounts()

    def _check_root(self) -> None:
        root = self.meta.getattr(ROOT_INODE)
        if root is not None:
            if not stat.S_ISDIR(root.mode):
                self.report.add("root_missing", f"inode {ROOT_INODE} is not a directory")
            return
        self.report.add("root_missing", f"inode {ROOT_INODE} (the root directory) is missing")
        if self.repair and self.meta.fsck_add_root(os.getuid(), os.getgid()):
            self.report.repaired("root_missing", "made a new root directory")

    def _load_inodes(self) -> None:
        for rows in pages(self.meta.scan_inodes, 0, lambda i: i.id):
            for i in rows:
                self.inodes.add(i.id, i.mode, i.size)

    def _check_entries(self) -> None:
        """Dangling entries (dropped); counts names, subdirectories and parents."""
        tab = self.inodes
        for rows in pages(self.meta.scan_entries, (0, b""), lambda e: (e[0], e[1])):
            self.report.stats["entries"] += len(rows)
            for parent, name, ino in rows:
                k, p = tab.find(ino), tab.find(parent)
                if k is None or p is None or tab.types[p] != DIR:
                    why = (
                        f"inode {ino} is missing"
                        if k is None
                        else f"its directory (inode {parent}) is "
                        + ("missing" if p is None else "not a directory")
                    )
                    self.report.add(
                        "dangling_entry", f"{self._dir_path(parent)}/{_show(name)}: {why}"
                    )
                    if self.repair:
                        self.meta.fsck_drop_entry(parent, name)
                        self.report.repaired("dangling_entry", f"dropped {why}")
                        continue
                if k is None:
                    continue
                tab.names[k] += 1
                if p is not None and tab.types[k] == DIR:
                    tab.subdirs[p] += 1
                    if tab.types[p] == DIR and not tab.parent[k]:
                        tab.parent[k] = parent

    def _check_directory_names(self) -> None:
        """A directory keeps its oldest name in a directory; the others are dropped."""
        tab = self.inodes
        for k, ino in enumerate(tab.ids):
            if tab.types[k] != DIR or tab.names[k] <= (0 if ino == ROOT_INODE else 1):
                continue
            names = [
                (p, n) for p, n in self.meta.names(ino, tab.names[k] + 1) if tab.type_of(p) == DIR
            ]
            keep = names[:1] if ino != ROOT_INODE else []
            tab.parent[k] = keep[0][0] if keep else 0
            for parent, name in names[len(keep) :]:
                self.report.add(
                    "extra_directory_entry",
                    f"{self._dir_path(parent)}/{_show(name)}: another name of directory"
                    f" {self._dir_path(ino) or '/'} (inode {ino})",
                )
                if self.repair:  # link counts are recomputed below
                    self.meta.fsck_drop_entry(parent, name)
                    tab.names[k] -= 1
                    tab.subdirs[tab.find(parent)] -= 1
                    self.report.repaired("extra_directory_entry")

    def _reachable(self, k: int, remember_unreachable: bool) -> bool:
        """Whether directory k reaches the root by its parents (marks what it learns)."""
        tab, state = self.inodes, self._state
        path: list[int] = []
        on_path: set[int] = set()
        while True:
            if tab.ids[k] == ROOT_INODE or state[k] == 1:
                ok = True
                break
            if state[k] == 2 or k in on_path:
                ok = False
                break
            path.append(k)
            on_path.add(k)
            p = tab.find(tab.parent[k]) if tab.parent[k] else None
            if p is None or tab.types[p] != DIR:
                ok = False
                break
            k = p
        if ok or remember_unreachable:
            for j in path:
                state[j] = 1 if ok else 2
        return ok

    def _check_unreachable(self) -> None:
        """Named directories whose parents never lead to the root: a cycle (or below one)."""
        tab = self.inodes
        self._state = bytearray(len(tab.ids))  # 0 unknown, 1 reachable, 2 not
        found = [
            k
            for k in range(len(tab.ids))
            if tab.types[k] == DIR
            and tab.ids[k] != ROOT_INODE
            and tab.names[k]
            and not self._reachable(k, True)
        ]
        for k in found:
            ino = tab.ids[k]
            self.report.add(
                "unreachable_directory", f"directory {self._dir_path(ino)} (inode {ino})"
            )
        if not (found and self.repair):
            return
        for k in found:
            self._state[k] = 0
        moved = 0
        for k in found:  # cut one directory of each cycle out of it, give it a reachable name
            if self._reachable(k, False):
                continue  # a move before this one made it reachable
            ino = tab.ids[k]
            for parent, name in self.meta.names(ino, MAX_PATHS):
                self.meta.fsck_drop_entry(parent, name)
                p = tab.find(parent)
                if p is not None:
                    tab.subdirs[p] -= 1
            where = self._move_to_lost_found(ino)
            self._state[k] = 1
            moved += 1
            log.info("FSCK-REPAIR unreachable directory %d moved to %s", ino, where)
        self.report.repaired("unreachable_directory", f"{moved} moved to /lost+found", len(found))

    def _check_inodes(self) -> None:
        """Inodes without a name, link counts, sizes of directories and symlinks."""
        self.report.stats["inodes"] = total = self.meta.count_inodes()
        self.progress.start("inodes", total)
        tab = self.inodes
        open_unlinked = 0
        for rows in pages(self.meta.scan_inodes, 0, lambda i: i.id):
            for inode in rows:
                k = tab.find(inode.id)
                if k is None:
                    continue  # made after the table was loaded (a mount's, beside a check)
                if not tab.names[k] and inode.id != ROOT_INODE:
                    if inode.nlink == 0 and self.live:
                        open_unlinked += 1  # maybe still open on the mount
                        continue
                    if not self._unnamed(inode):
                        continue
                    inode = self.meta.getattr(inode.id)  # moved to /lost+found
                is_dir = stat.S_ISDIR(inode.mode)
                want = 2 + tab.subdirs[k] if is_dir else tab.names[k]
                if inode.nlink != want:
                    self.report.add(
                        "link_count",
                        f"{self._where(inode.id)}: link count {inode.nlink}, should be {want}",
                    )
                    if self.repair:
                        self.meta.fsck_set_nlink(inode.id, want)
                        self.report.repaired("link_count")
                size = inode.size
                link = stat.S_ISLNK(inode.mode)
                want_size = 0 if is_dir else len(inode.target or b"") if link else size
                if size != want_size:
                    self.report.add(
                        "inode_size", f"{self._where(inode.id)}: size {size}, should be {want_size}"
                    )
                    if self.repair:
                        self.meta.fsck_set_size(inode.id, want_size)
                        self.report.repaired("inode_size")
            self.progress.advance(len(rows))
        if open_unlinked:
            self.report.notes.append(
                f"{open_unlinked} deleted files may still be open on the mount (not problems)"
            )

    def _unnamed(self, inode: Inode) -> bool:
        """Judge an inode without a name; True if a repair moved it to /lost+found."""
        ino, mode, nlink = inode.id, inode.mode, inode.nlink
        what = "directory" if stat.S_ISDIR(mode) else f"file of {inode.size:,} bytes"
        if nlink == 0:
            self.report.add("unlinked_inode", f"inode {ino} ({what}): link count 0, no name")
            if not self.repair:
                return False
            if stat.S_ISDIR(mode) and self.meta.readdir(ino, 0, 1):
                where = self._move_to_lost_found(ino)
                self.report.repaired("unlinked_inode", f"inode {ino} -> {where}")
                return True
            if self.meta.delete_inode(ino):
                self.inodes.types[self.inodes.find(ino)] = MISSING
                self.report.repaired("unlinked_inode", f"inode {ino} deleted")
            return False
        self.report.add("orphan_inode", f"inode {ino} ({what}) has {nlink} links but no name")
        if not self.repair:
            return False
        where = self._move_to_lost_found(ino)
        self.report.repaired("orphan_inode", f"inode {ino} -> {where}")
        return True

    def _check_extents(self) -> None:
        tab = self.inodes
        prev: tuple[int, int, int] | None = None  # (inode, offset, length once repaired)
        for rows in pages(self.meta.scan_extents, (0, -1), lambda r: (r[0], r[1].offset)):
            self.report.stats["extents"] += len(rows)
            valid = {b for b in {e.block_id for _, e in rows} if _valid_id(b)}
            blocks = self.meta.block_rows(sorted(valid))
            drop: list[tuple[int, int]] = []
            cut: list[tuple[int, int, int]] = []  # (inode, offset, new length)
            for ino, e in rows:
                off, length, bid = e.offset, e.length, e.block_id
                where = f"inode {ino} extent at {off} (+{length})"
                k = tab.find(ino)
                kind = MISSING if k is None else tab.types[k]
                bad = (
                    "its inode is missing"
                    if kind == MISSING
                    else "its inode is not a regular file"
                    if kind != REG
                    else f"malformed block id {bid!r}"
                    if bid not in valid
                    else "a negative offset or empty length"
                    if off < 0 or length <= 0
                    else None
                )
                if bad:
                    self.report.add("extent_invalid", f"{where}: {bad}")
                    drop.append((ino, off))
                    continue
                row = blocks.get(bid)
                if row is None:
                    self.missing_rows[bid] = max(self.missing_rows.get(bid, 0), length)
                new, isize = length, tab.sizes[k]
                if row is not None and new > row.size:
                    self.report.add(
                        "extent_invalid", f"{where}: longer than its block ({row.size})"
                    )
                    new = row.size
                if off >= isize or off + new > isize:
                    self.report.add(
                        "extent_past_size", f"{self._where(ino)}: {where} past the size {isize}"
                    )
                    if off >= isize:
                        drop.append((ino, off))
                        continue
                    new = isize - off
                if prev is not None and prev[0] == ino and off < prev[1] + prev[2]:
                    self.report.add(
                        "extent_overlap",
                        f"{self._where(ino)}: extent at {prev[1]} (+{prev[2]}) overlaps the one"
                        f" at {off}; the earlier one is cut short",
                    )
                    if off > prev[1]:
                        cut.append((ino, prev[1], off - prev[1]))
                    elif off == prev[1]:  # two at one offset (an engine keyed otherwise)
                        drop.append((ino, off))
                        continue
                    else:  # this one starts earlier (extents come in order of their ends)
                        new = min(new, prev[1] - off)
                        if new != length:
                            cut.append((ino, off, new))
                        continue
                if new != length:
                    cut.append((ino, off, new))
                prev = (ino, off, new)
            if self.repair and (drop or cut):
                for ino, off in drop:
                    self.meta.fsck_drop_extent(ino, off)
                for ino, off, new in cut:
                    self.meta.fsck_cut_extent(ino, off, new)
                for kind in ("extent_invalid", "extent_past_size", "extent_overlap"):
                    self.report.repaired(kind, n=self.report.found[kind] - self.report.fixed[kind])

    def _check_block_rows(self) -> None:
        """Blocks referenced by extents without a row: the row is added."""
        for bid, longest in sorted(self.missing_rows.items()):
            refs = self.meta.block_refs(bid)
            if not refs:
                continue  # its extents were dropped above
            self.report.add(
                "missing_block_row",
                f"block {bid} (used by {', '.join(self._block_paths(bid)[:3])})",
            )
            if self.repair:
                data = self._fetch(bid, None, self.ring.walk(bid), {}) if self.ring else None
                size = len(data) if data is not None else longest
                self.meta.fsck_set_block(bid, size, refs)
                self.report.repaired("missing_block_row", f"block {bid}, size {size}")
        if self.repair:
            self.missing_rows.clear()  # they have rows now

    def _check_refcounts(self) -> None:
        for rows in pages(self.meta.scan_blocks, "", lambda b: b.id):
            self.report.stats["blocks"] += len(rows)
            for b in rows:
                actual = self.meta.block_refs(b.id)
                if b.refcount == actual and (b.zero_since_ns is None) == (actual > 0):
                    continue
                why = (
                    f"refcount {b.refcount}, {actual} extents use it"
                    if b.refcount != actual
                    else "its garbage timestamp disagrees with its refcount"
                )
                self.report.add("refcount", f"block {b.id}: {why}")
                if self.repair:
                    self.meta.fsck_set_block(b.id, b.size, actual)
                    self.report.repaired("refcount")
                else:
                    self.true_refs[b.id] = actual

    def _referenced(self, bid: str, row: BlockRow | None) -> bool:
        """Whether extents use the block, by its row as the metadata phase corrected it."""
        if row is None:
            return bid in self.missing_rows
        return self.true_refs.get(bid, row.refcount) > 0

    # ---------------------------------------------------------- replicas

    def check_replicas(self) -> None:
        """Probe the named copies of each page of blocks in worker threads, then judge here.

        Workers only stat or read and hash (DirStore allows any number of threads);
        the metadata, the report and repairs stay on this thread.
        """
        total = self.meta.usage().blocks + len(self.missing_rows)
        self.progress.start("replicas", total)
        with ThreadPoolExecutor(self.threads, thread_name_prefix="fsck") as pool:
            for rows in self._referenced_pages():
                blocks = [
                    (bid, size, self.ring.replicas(bid, self.replicas))
                    for bid, size in rows
                    if _valid_id(bid)
                ]
                probes = [(node, bid, size) for bid, size, named in blocks for node in named]
                chunks = [probes[i : i + PROBE_CHUNK] for i in range(0, len(probes), PROBE_CHUNK)]
                results = chain.from_iterable(
                    pool.map(lambda c: [self._probe(*p) for p in c], chunks)
                )
                for bid, size, named in blocks:
                    states = {}
                    for node in named:
                        states[node], length = next(results)
                        self._note_length(bid, size, length)
                    self._check_block(bid, size, named, states)
                self.progress.advance(len(rows))

    def _referenced_pages(self) -> Iterator[list[tuple[str, int | None]]]:
        """Pages of (block id, row size) of the blocks extents use, in id order; then those
        without a row (a check's: a repair has added theirs)."""
        for rows in pages(self.meta.scan_blocks, "", lambda b: b.id):
            yield [(b.id, b.size) for b in rows if self._referenced(b.id, b)]
        yield [(bid, None) for bid in sorted(self.missing_rows)]

    def _read(self, store: DirStore, bid: str) -> bytes:
        data = store.get(bid)
        self.throttle.consume(len(data))
        return data

    def _probe(self, node: str, bid: str, size: int | None) -> tuple[str, int | None]:
        """(state, verified length) of the copy of `bid` on `node`; safe in any thread.

        States: "ok", "missing", "corrupt" (moved aside by get()), "down", "error".
        """
        store = self.stores.get(node)
        if store is None:
            return "down", None
        try:
            if not self.deep:
                actual = store.size(bid)
                if actual is None:
                    return "missing", None
                if size is None or actual == size:
                    return "ok", None
            return "ok", len(self._read(store, bid))  # deep, or a wrong size: read and verify
        except BlockMissing:
            return "missing", None
        except BlockCorrupt:
            return "corrupt", None
        except OSError as e:
            log.error("fsck: reading block %s on node %s: %s", bid, node, e)
            return "error", None

    def _note_length(self, bid: str, size: int | None, length: int | None) -> None:
        """A verified copy of `length` bytes: the block row must say the same."""
        self.report.stats["replicas_checked"] += 1
        if size is None or length is None or length == size:
            return
        self.report.add("block_row_size", f"block {bid}: row says {size} bytes, it has {length}")
        if self.repair:
            row = self.meta.block_rows([bid]).get(bid)
            if row is not None:
                self.meta.fsck_set_block(bid, length, row.refcount)
                self.report.repaired("block_row_size")

    def _fetch(self, bid: str, size: int | None, nodes, states: dict[str, str]) -> bytes | None:
        """Verified bytes of `bid` from the first of `nodes` with a good copy, else None.

        A named node whose copy turns out corrupt gets state "corrupt" in `states`.
        """
        data, got = fetch(bid, self.stores, nodes)
        self._note_read(bid, size, got, states)
        return None if data is None else bytes(data)

    def _note_read(self, bid: str, size: int | None, got: RestoreResult, states: dict) -> None:
        """What a restore's reads met: corrupt named copies, the length of the copy read."""
        for node in got.corrupt:
            if node in states:
                states[node] = "corrupt"
        if got.size is not None:
            self.throttle.consume(got.size)
            self._note_length(bid, size, got.size)

    def _exists_elsewhere(self, bid: str, size: int | None, named: list[str]) -> bool:
        """A check's question: does a node the ring does not name hold a good copy?"""
        for node in self.ring.walk(bid):
            if node not in named and self._probe(node, bid, size)[0] == "ok":
                return True
        return False

    def _check_block(
        self, bid: str, size: int | None, named: list[str], states: dict[str, str]
    ) -> None:
        """Judge (and repair) one block given the states of its named copies."""
        if all(s == "ok" for s in states.values()):
            return
        if self.live and not self._still_referenced(bid):
            return
        if self.repair:  # the copies of the right size are good, as in the check (`size`)
            got = restore(bid, self.stores, named, self.ring.walk(bid), size=size)
            self._note_read(bid, size, got, states)
            have_copy = got.found
        else:
            have_copy = "ok" in states.values() or self._exists_elsewhere(bid, size, named)
        if not have_copy:
            self._lost(bid, states)
            return
        for node, state in states.items():
            if state == "ok":
                continue
            kind = "corrupt_replica" if state == "corrupt" else "missing_replica"
            why = {"down": "node unavailable", "error": "read error"}.get(state, state)
            self.report.add(kind, f"block {bid} on node {node}: {why}")
            if not self.repair:
                continue
            if node not in got.written:  # down, or the copy failed (logged by restore)
                self.unhealthy.add(bid)
                continue
            self.report.repaired(kind, f"block {bid} copied to node {node}")

    def _still_referenced(self, bid: str) -> bool:
        return bool(self.meta.block_users(bid, 1))

    def _block_paths(self, bid: str) -> list[str]:
        return [p for ino in self.meta.block_users(bid, MAX_PATHS) for p in self.paths(ino)]

    def _lost(self, bid: str, states: dict[str, str]) -> None:
        paths = self._block_paths(bid)
        self.report.lost_paths.update(paths)
        seen = ", ".join(f"{n}: {s}" for n, s in states.items())
        self.report.add(
            "lost_block",
            f"block {bid}: no good copy on any node ({seen}); used by {', '.join(paths)}",
        )
        if self.repair:
            self.unhealthy.add(bid)  # only repairs consult it: keep a check's memory flat

    # ----------------------------------------------------------- garbage

    def check_garbage_rows(self) -> None:
        """Rows of blocks no extent references: deleted, with every copy, past the grace."""
        self.progress.start("unreferenced blocks")
        for rows in pages(self.meta.scan_blocks, "", lambda b: b.id):
            for bid, since in [
                (b.id, b.zero_since_ns) for b in rows if not self._referenced(b.id, b)
            ]:
                self.progress.advance()
                if not _valid_id(bid):
                    self.report.add("garbage_block", f"block row with a malformed id {bid!r}")
                    if self.repair and self.meta.forget_block(bid):  # its refcount is 0 now
                        self.report.repaired("garbage_block")
                    continue
                if since is None or since >= self.cutoff_ns or self._young_copy(bid):
                    self.report.pending += 1
                    continue
                self.report.add("garbage_block", f"block {bid}: unreferenced for {_age(since)}")
                if self.repair:
                    for store in self.stores.values():
                        if store is not None:
                            store.delete(bid)
                    if self.meta.forget_block(bid):
                        self.report.repaired("garbage_block", f"block {bid} deleted")

    def _young_copy(self, bid: str) -> bool:
        """True if a copy was (re)stored within the grace: a writer may be about to use it."""
        for store in self.stores.values():
            mtime = store.mtime_ns(bid) if store is not None else None
            if mtime is not None and mtime >= self.cutoff_ns:
                return True
        return False

    def check_node(self, node_id: str, store: DirStore) -> None:
        """List a node page by page: misplaced copies and block files nothing knows of."""
        self.progress.start(f"node {node_id}")
        after = ""
        while ids := store.iter_ids(after, PAGE):
            after = ids[-1]
            self.report.stats["copies_listed"] += len(ids)
            rows = self.meta.block_rows(ids)
            for bid in ids:
                row = rows.get(bid)
                if self._referenced(bid, row):
                    named = self.ring.replicas(bid, self.replicas)
                    if node_id not in named:
                        self._misplaced(bid, node_id, named, row.size if row else None)
                elif row is None:  # rows without extents: check_garbage_rows
                    self._stray(bid, node_id, store)
            self.progress.advance(len(ids))

    def _misplaced(self, bid: str, node_id: str, named: list[str], size: int | None) -> None:
        self.report.add(
            "misplaced_replica", f"block {bid} on node {node_id}; the ring names {', '.join(named)}"
        )
        if not self.repair or bid in self.unhealthy:
            return
        # drop the extra copy only once every named copy is good (of the right size, as in
        # the check; a named node lacking one gets it first)
        got = restore(bid, self.stores, named, [node_id], size=size)
        if drop_extra(got, self.stores, [node_id]).deleted:
            self.report.repaired("misplaced_replica", f"block {bid} deleted from node {node_id}")

    def _stray(self, bid: str, node_id: str, store: DirStore) -> None:
        mtime = store.mtime_ns(bid)
        if mtime is None:
            return  # deleted meanwhile
        if mtime >= self.cutoff_ns:
            self.report.pending += 1
            return
        self.report.add(
            "stray_block",
            f"block {bid} on node {node_id}: unknown to the metadata, {_age(mtime)} old",
        )
        if self.repair and store.delete(bid):
            self.report.repaired("stray_block", f"block {bid} deleted from node {node_id}")


# ------------------------------------------------------- command-line glue


def arg_rate(text: str) -> float:
    """argparse type of --rate: a positive number of MiB/s."""
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


def arg_grace(text: str) -> float:
    """argparse type of --grace: seconds, zero or more."""
    value = float(text)
    if not value >= 0:
        raise ValueError(text)
    return value
