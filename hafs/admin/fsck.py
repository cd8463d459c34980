"""`hafs fsck`: check, and with `repair=True` repair, a filesystem's metadata and blocks.

Phases, in this order (each reads the metadata in short paged queries and
lists node contents page by page, so memory holds a page, the problems found
and a compact set of unhealthy block ids, never every id):

1. **database**: SQLite ``PRAGMA integrity_check``; a damaged database stops
   fsck (nothing is trusted or written) with a message on how to recover it.
2. **metadata**: the root; entries naming a missing inode or sitting in a
   missing or non-directory parent (dropped); directories with several names
   (extra names dropped) or unreachable from the root (a cycle: moved to
   /lost+found); inodes without a name: link count 0 (left by a crash while
   open: deleted, their blocks released) or > 0 (moved to /lost+found, named
   by inode number); link counts (files: their names; directories: 2 + their
   subdirectories); sizes of directories (0) and symlinks (the target's
   length); extents (of a missing or non-regular inode, with a bad block id or
   length, longer than their block, past the file size, overlapping); blocks
   referenced by extents but absent from the blocks table (the row is added);
   refcounts (recomputed from the extents).
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

Exit codes follow fsck(8): 0 no problem, 1 problems found and all corrected,
4 problems left (every problem counts in a check), 8 operational error.
Pending garbage and unlinked inodes still open on a running mount are not
problems.

Concurrency: fsck is a synchronous tool (no trio).  The replica probes of a
page (stat, or read and hash) run in a small thread pool; the workers touch
nothing but DirStore (made for any number of threads) and the rate throttle
(locked); the metadata, the report and every repair stay on the calling
thread.  Without repair fsck may run beside mounts: it opens SQLite
read-only, never takes HOME/mount.lock (whether a mount runs is read from
/proc/locks), checks the metadata inside one read transaction (a consistent
snapshot), treats unlinked inodes as possibly open, and re-reads the metadata
before reporting a block whose copies are missing (a mount may have dropped it
meanwhile).  With repair it holds HOME/mount.lock exclusively for the whole run
(mounts hold it shared), so it refuses to start while the filesystem is
mounted and no mount can start until it has finished.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import TextIO
from urllib.parse import quote

from ..errors import BlockCorrupt, BlockMissing, HafsError, UserError
from ..home import is_remote, meta_path, open_store
from ..meta.sqlite import (
    APPLICATION_ID,
    DEGRADED_SCHEMA,
    ROOT_INODE,
    SCHEMA_VERSION,
    SqliteMeta,
    now_ns,
)
from ..store.dirstore import BLOCK_ID_RE, DirStore, read_identity
from ..store.restore import RestoreResult, drop_extra, fetch, restore
from ..store.ring import Ring

log = logging.getLogger(__name__)

EXIT_CLEAN, EXIT_CORRECTED, EXIT_LEFT, EXIT_OPERATIONAL = 0, 1, 4, 8
DEFAULT_GRACE_S = 3600.0
DEFAULT_THREADS = 8  # replica probes in flight: disks answer several requests at once
PROBE_CHUNK = 32  # probes per worker task (a task per probe costs more than a cached stat)
PAGE = 1000  # rows per metadata query, ids per node listing
IN_BATCH = 500  # ids per "IN (...)" query
MAX_DETAILS = 1000  # detail lines kept per problem kind (counts are exact)
MAX_PATHS = 100  # paths named per inode (hard links)
# A repair's session: a dead fsck on this host is noticed at once by its pid; its lease
# only matters across hosts, and fsck renews nothing while it works.
REPAIR_SESSION_S = 24 * 3600.0
S_IFMT, S_IFDIR = 0o170000, 0o040000

# Problem kinds, in report order, with what they mean.
KINDS = {
    "database_damaged": "the SQLite integrity check failed",
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

RECOVER_HINT = (
    "stop every mount, keep a copy of meta.db (and meta.db-wal, meta.db-shm), then restore"
    " meta.db from a backup, or salvage it with 'sqlite3 meta.db .recover | sqlite3 new.db'"
    " and put new.db in its place; then run 'hafs fsck --repair'"
)


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
            out.append(
                f"LOST DATA: blocks with no good copy on any node: {self.found['lost_block']:,}."
                " These files are kept; reads of the lost ranges fail with EIO (never wrong"
                " bytes). Restore them from a backup:"
            )
            out.extend(f"  {p}" for p in sorted(self.lost_paths))
        if self.pending:
            out.append(
                f"pending: {self.pending:,} unreferenced blocks or copies younger than the grace"
                f" period ({self.grace_s:g} s) were left for writers that may be about to use them"
            )
        out.extend(f"note: {n}" for n in self.notes)
        out.append(f"result: {RESULTS[self.exit_code]} (exit {self.exit_code})")
        return "\n".join(out)


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
    meta = session = None
    try:
        if not meta_path(home).exists():
            raise FsckError(f"no hafs filesystem in {home} (no meta.db): check --home")
        meta = _open_meta(meta_path(home), writable=repair)
        if repair:
            try:  # refused while a mount is alive; no mount starts until it ends
                session = meta.sessions.register("repair", "", REPAIR_SESSION_S)
            except UserError as e:
                raise FsckError(str(e)) from None
        else:
            report.mounted = any(s.kind == "mount" for s in meta.sessions.alive())
        checker = Checker(meta, report, progress, report.mounted, rate_mib, threads)
        checker.run()
    except FsckError as e:
        report.error = str(e)
    except sqlite3.DatabaseError as e:
        report.error = f"metadata database {meta_path(home)} is damaged ({e}): {RECOVER_HINT}"
    finally:
        progress.close()
        if meta is not None:
            if session is not None:
                meta.sessions.end(session)
            meta.close()
        report.seconds = time.monotonic() - t0
    return report


def _open_meta(path: Path, writable: bool) -> SqliteMeta:
    """The metadata; read-only for a check (a mount may be running beside us)."""
    if writable:
        try:
            return SqliteMeta.open(path)
        except HafsError as e:
            raise FsckError(str(e)) from None
    try:
        db = sqlite3.connect(
            f"file:{quote(os.fspath(path))}?mode=ro", uri=True, isolation_level=None
        )
    except sqlite3.Error as e:
        raise FsckError(f"cannot open metadata database {path}: {e}") from None
    try:
        db.execute("PRAGMA busy_timeout = 10000")
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as e:
        db.close()
        raise FsckError(f"metadata database {path} is damaged ({e}): {RECOVER_HINT}") from None
    if app_id != APPLICATION_ID:
        db.close()
        raise FsckError(f"{path} is not a hafs metadata database (application id {app_id:#x})")
    if version > SCHEMA_VERSION:
        db.close()
        raise FsckError(
            f"metadata database {path} has schema version {version}, newer than this hafs"
            f" understands ({SCHEMA_VERSION}): upgrade hafs"
        )
    return SqliteMeta(db, path)


# ---------------------------------------------------------------- checker


def _valid_id(bid: object) -> bool:
    return isinstance(bid, str) and BLOCK_ID_RE.fullmatch(bid) is not None


def _show(name: bytes | str) -> str:
    return name if isinstance(name, str) else name.decode("utf-8", "backslashreplace")


def _age(ns: int) -> str:
    s = max(0, now_ns() - ns) / 1e9
    return f"{s:.0f} s" if s < 7200 else f"{s / 3600:.1f} h"


class Checker:
    """One fsck run over an open metadata store (see the module docstring)."""

    def __init__(
        self,
        meta: SqliteMeta,
        report: Report,
        progress: Progress,
        live: bool = False,
        rate_mib: float | None = None,
        threads: int = DEFAULT_THREADS,
    ) -> None:
        self.meta = meta
        self.db = meta.db
        self.report = report
        self.progress = progress
        self.repair = report.repair
        self.deep = report.deep
        self.live = live  # a mount may be running: metadata can change under us
        self.throttle = Throttle(rate_mib)
        self.threads = threads  # replica probes (stat, or read and hash) in flight
        self.cutoff_ns = 0  # garbage older than this may go; set when the garbage phase starts
        self.unhealthy: set[str] = set()  # blocks a repair left short of R good named copies
        self._lost_found: int | None = None
        self.ring: Ring
        self.replicas = 0
        self.stores: dict[str, DirStore | None] = {}

    def run(self) -> None:
        self.progress.start("database")
        rows = [r[0] for r in self.db.execute("PRAGMA integrity_check(100)")]
        if rows != ["ok"]:
            self.report.add(
                "database_damaged",
                f"{self.meta.path}: {'; '.join(rows[:5])}" + ("; ..." if len(rows) > 5 else ""),
            )
            self.report.notes.append(
                f"the metadata database is damaged, nothing else was checked: {RECOVER_HINT}"
            )
            return
        self._open_nodes()
        st = self.report.stats
        st["entries"] = self.db.execute("SELECT count(*) FROM dentries").fetchone()[0]
        self._timed("metadata", self.check_metadata)
        st["extents"] = self.db.execute("SELECT count(*) FROM extents").fetchone()[0]
        st["blocks"] = self.db.execute("SELECT count(*) FROM blocks").fetchone()[0]
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
        # a check opens the database as it is: schema 2 (before any mount upgraded it)
        # has no table of degraded blocks
        schema = self.db.execute("PRAGMA user_version").fetchone()[0]
        degraded = self.meta.count_degraded() if schema >= DEGRADED_SCHEMA else 0
        if degraded:
            self.report.notes.append(
                f"{degraded} blocks are recorded as written while a node was failing;"
                " a mount repairs them in the background, as does 'hafs fsck --repair'"
            )
        st["bytes_read"] = self.throttle.bytes

    # ------------------------------------------------------------ helpers

    def _timed(self, phase: str, fn, *args) -> None:
        t0 = time.monotonic()
        fn(*args)
        phases = self.report.phase_seconds
        phases[phase] = round(phases.get(phase, 0.0) + time.monotonic() - t0, 3)

    def _pages(self, sql: str, first: tuple, key) -> object:
        """Yield pages of `sql` (parameters: the cursor..., PAGE); `key(last_row)` is the cursor."""
        cursor = first
        while True:
            rows = self.db.execute(sql, (*cursor, PAGE)).fetchall()
            if not rows:
                return
            yield rows
            if len(rows) < PAGE:
                return
            cursor = key(rows[-1])

    def _dir_path(self, ino: int) -> str:
        """The path of directory `ino` (its first name at each level); '' for the root."""
        parts: list[str] = []
        seen: set[int] = set()
        while ino != ROOT_INODE:
            if ino in seen or len(parts) > 4096:
                return "<cycle>/" + "/".join(reversed(parts))
            seen.add(ino)
            row = self.db.execute(
                "SELECT parent, name FROM dentries WHERE inode = ? ORDER BY id LIMIT 1", (ino,)
            ).fetchone()
            if row is None:
                return f"<inode {ino}>" + "".join("/" + p for p in reversed(parts))
            ino = row[0]
            parts.append(_show(row[1]))
        return "".join("/" + p for p in reversed(parts))

    def paths(self, ino: int) -> list[str]:
        """Every path of inode `ino` (one per hard link), or a placeholder if it has none."""
        rows = self.db.execute(
            "SELECT parent, name FROM dentries WHERE inode = ? ORDER BY id LIMIT ?",
            (ino, MAX_PATHS),
        ).fetchall()
        if ino == ROOT_INODE:
            return ["/"]
        return [f"{self._dir_path(p)}/{_show(n)}" for p, n in rows] or [f"<inode {ino}, no name>"]

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
                self.report.notes.append("created /lost+found")
            self._lost_found = inode.id
        return self._lost_found

    def _move_to_lost_found(self, ino: int, is_dir: bool) -> str:
        """Give inode `ino` the name /lost+found/<ino> (its only name); returns the path."""
        lf = self._lost_and_found()
        name = str(ino).encode()
        while self.meta.lookup(lf, name) is not None:
            name += b"_"
        t = now_ns()
        with self.meta.txn():
            self.db.execute(
                "INSERT INTO dentries (parent, name, inode) VALUES (?, ?, ?)", (lf, name, ino)
            )
            if is_dir:
                self.db.execute(
                    "UPDATE inodes SET nlink = nlink + 1, ctime_ns = ? WHERE id = ?", (t, lf)
                )
            else:
                self.db.execute("UPDATE inodes SET nlink = 1, ctime_ns = ? WHERE id = ?", (t, ino))
        return f"/lost+found/{_show(name)}"

    def _release_block(self, bid: str) -> None:
        """One extent of `bid` was deleted: lower its refcount (inside a transaction)."""
        self.db.execute(
            "UPDATE blocks SET refcount = refcount - 1, zero_since_ns = CASE WHEN refcount = 1"
            " THEN ? ELSE zero_since_ns END WHERE id = ? AND refcount > 0",
            (now_ns(), bid),
        )

    # ------------------------------------------------------------- nodes

    def _open_nodes(self) -> None:
        try:
            config = self.meta.config()
            fs_uuid, token, self.replicas = config.fs_uuid, config.node_token, config.replicas
            self.ring = Ring.from_json(self.meta.ring())
        except (HafsError, ValueError) as e:
            raise FsckError(f"the metadata's settings are unusable: {e}") from None
        for spec in self.ring.nodes.values():
            try:
                if is_remote(spec.address):
                    store = open_store(spec, fs_uuid, token)
                    store.check_identity()
                elif self.repair:
                    store = DirStore.open(spec.address, spec.id, fs_uuid)
                else:  # no I/O but the identity check: a check changes nothing
                    ident = read_identity(spec.address)
                    if ident is None or (ident["fs_uuid"], ident["node_id"]) != (fs_uuid, spec.id):
                        store = DirStore.open(spec.address, spec.id, fs_uuid)  # says what's wrong
                    else:
                        store = DirStore(spec.address, spec.id, fs_uuid)
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
        self.progress.start("metadata")
        if self.repair:  # HOME/mount.lock is ours: nothing else changes the metadata
            self._check_metadata()
            return
        self.db.execute("BEGIN")  # a check sees one snapshot, whatever a mount does meanwhile
        try:
            self._check_metadata()
        finally:
            self.db.execute("COMMIT")

    def _check_metadata(self) -> None:
        self._check_root()
        self._check_entries()
        self._check_directory_names()
        self._check_unreachable()
        self._check_unnamed_inodes()
        self._check_link_counts()
        self._check_extents()
        self._check_block_rows()
        self._check_refcounts()

    def _check_root(self) -> None:
        row = self.db.execute("SELECT mode FROM inodes WHERE id = ?", (ROOT_INODE,)).fetchone()
        if row is not None:
            if not stat.S_ISDIR(row[0]):
                self.report.add("root_missing", f"inode {ROOT_INODE} is not a directory")
            return
        self.report.add("root_missing", f"inode {ROOT_INODE} (the root directory) is missing")
        if self.repair:
            t = now_ns()
            with self.meta.txn():
                self.db.execute(
                    "INSERT INTO inodes (id, mode, uid, gid, nlink, atime_ns, mtime_ns, ctime_ns)"
                    " VALUES (?, ?, ?, ?, 2, ?, ?, ?)",
                    (ROOT_INODE, S_IFDIR | 0o755, os.getuid(), os.getgid(), t, t, t),
                )
            self.report.repaired("root_missing", "made a new root directory")

    def _check_entries(self) -> None:
        sql = (
            "SELECT d.id, d.parent, d.name, d.inode, i.id IS NULL, p.id IS NULL FROM dentries d"
            " LEFT JOIN inodes i ON i.id = d.inode LEFT JOIN inodes p ON p.id = d.parent"
            " WHERE d.id > ? AND (i.id IS NULL OR p.id IS NULL"
            f" OR (p.mode & {S_IFMT}) != {S_IFDIR}) ORDER BY d.id LIMIT ?"
        )
        for rows in self._pages(sql, (0,), lambda r: (r[0],)):
            for _, parent, name, ino, no_inode, no_parent in rows:
                why = (
                    f"inode {ino} is missing"
                    if no_inode
                    else f"its directory (inode {parent}) is "
                    + ("missing" if no_parent else "not a directory")
                )
                self.report.add("dangling_entry", f"{self._dir_path(parent)}/{_show(name)}: {why}")
            if self.repair:
                with self.meta.txn():
                    self.db.executemany("DELETE FROM dentries WHERE id = ?", [r[:1] for r in rows])
                self.report.repaired("dangling_entry", f"dropped {len(rows)} entries", len(rows))

    def _check_directory_names(self) -> None:
        sql = (
            "SELECT d.id, d.parent, d.name, d.inode FROM dentries d JOIN inodes i ON i.id = d.inode"
            f" WHERE d.id > ? AND (i.mode & {S_IFMT}) = {S_IFDIR} AND (d.inode = {ROOT_INODE}"
            " OR EXISTS (SELECT 1 FROM dentries e WHERE e.inode = d.inode AND e.id < d.id))"
            " ORDER BY d.id LIMIT ?"
        )
        for rows in self._pages(sql, (0,), lambda r: (r[0],)):
            for did, parent, name, ino in rows:
                self.report.add(
                    "extra_directory_entry",
                    f"{self._dir_path(parent)}/{_show(name)}: another name of directory"
                    f" {self._dir_path(ino) or '/'} (inode {ino})",
                )
                if self.repair:  # link counts are recomputed below
                    with self.meta.txn():
                        self.db.execute("DELETE FROM dentries WHERE id = ?", (did,))
                    self.report.repaired("extra_directory_entry")

    _UNREACHABLE = (
        "WITH RECURSIVE reach(id) AS (SELECT 1 UNION SELECT d.inode FROM dentries d"
        " JOIN reach r ON d.parent = r.id JOIN inodes c ON c.id = d.inode"
        f" WHERE (c.mode & {S_IFMT}) = {S_IFDIR})"
        f" SELECT i.id FROM inodes i WHERE (i.mode & {S_IFMT}) = {S_IFDIR} AND i.id != 1"
        " AND EXISTS (SELECT 1 FROM dentries d WHERE d.inode = i.id)"
        " AND i.id NOT IN reach ORDER BY i.id LIMIT ?"
    )

    def _check_unreachable(self) -> None:
        found = [r[0] for r in self.db.execute(self._UNREACHABLE, (MAX_DETAILS,))]
        for ino in found:
            self.report.add(
                "unreachable_directory", f"directory {self._dir_path(ino)} (inode {ino})"
            )
        if not (found and self.repair):
            return
        moved = 0
        while row := self.db.execute(self._UNREACHABLE, (1,)).fetchone():
            ino = row[0]  # cut it out of its cycle, give it a reachable name
            with self.meta.txn():  # link counts are recomputed below
                self.db.execute("DELETE FROM dentries WHERE inode = ?", (ino,))
                where = self._move_to_lost_found(ino, True)
            moved += 1
            log.info("FSCK-REPAIR unreachable directory %d moved to %s", ino, where)
        self.report.repaired("unreachable_directory", f"{moved} moved to /lost+found", len(found))

    def _check_unnamed_inodes(self) -> None:
        sql = (
            "SELECT i.id, i.mode, i.nlink, i.size FROM inodes i WHERE i.id > ? AND i.id != 1"
            " AND NOT EXISTS (SELECT 1 FROM dentries d WHERE d.inode = i.id) ORDER BY i.id LIMIT ?"
        )
        open_unlinked = 0
        for rows in self._pages(sql, (0,), lambda r: (r[0],)):
            for ino, mode, nlink, size in rows:
                what = "directory" if stat.S_ISDIR(mode) else f"file of {size:,} bytes"
                if nlink == 0 and self.live:
                    open_unlinked += 1  # maybe still open on the mount
                    continue
                if nlink == 0:
                    self.report.add(
                        "unlinked_inode", f"inode {ino} ({what}): link count 0, no name"
                    )
                    if not self.repair:
                        continue
                    if stat.S_ISDIR(mode) and self.meta.has_entries(ino):
                        where = self._move_to_lost_found(ino, True)
                        self.report.repaired("unlinked_inode", f"inode {ino} -> {where}")
                    else:
                        self.meta.delete_inode(ino)
                        self.report.repaired("unlinked_inode", f"inode {ino} deleted")
                    continue
                self.report.add(
                    "orphan_inode", f"inode {ino} ({what}) has {nlink} links but no name"
                )
                if self.repair:
                    where = self._move_to_lost_found(ino, stat.S_ISDIR(mode))
                    self.report.repaired("orphan_inode", f"inode {ino} -> {where}")
        if open_unlinked:
            self.report.notes.append(
                f"{open_unlinked} deleted files may still be open on the mount (not problems)"
            )

    def _check_link_counts(self) -> None:
        self.report.stats["inodes"] = total = self.meta.count_inodes()
        self.progress.start("inodes", total)
        sql = (
            "SELECT i.id, i.mode, i.nlink, i.size, i.target,"
            " (SELECT count(*) FROM dentries d WHERE d.inode = i.id),"
            f" CASE WHEN (i.mode & {S_IFMT}) = {S_IFDIR} THEN (SELECT count(*) FROM dentries d"
            f" JOIN inodes c ON c.id = d.inode WHERE d.parent = i.id AND (c.mode & {S_IFMT}) ="
            f" {S_IFDIR}) ELSE 0 END FROM inodes i WHERE i.id > ? ORDER BY i.id LIMIT ?"
        )
        for rows in self._pages(sql, (0,), lambda r: (r[0],)):
            nlinks, sizes = [], []
            for ino, mode, nlink, size, target, names, subdirs in rows:
                if names or ino == ROOT_INODE:  # unnamed inodes were dealt with above
                    want = 2 + subdirs if stat.S_ISDIR(mode) else names
                    if nlink != want:
                        self.report.add(
                            "link_count",
                            f"{self._where(ino)}: link count {nlink}, should be {want}",
                        )
                        nlinks.append((want, ino))
                want_size = (
                    0 if stat.S_ISDIR(mode) else len(target or b"") if stat.S_ISLNK(mode) else size
                )
                if size != want_size:
                    self.report.add(
                        "inode_size", f"{self._where(ino)}: size {size}, should be {want_size}"
                    )
                    sizes.append((want_size, ino))
            if self.repair and (nlinks or sizes):
                with self.meta.txn():
                    self.db.executemany("UPDATE inodes SET nlink = ? WHERE id = ?", nlinks)
                    self.db.executemany("UPDATE inodes SET size = ? WHERE id = ?", sizes)
                self.report.repaired("link_count", n=len(nlinks))
                self.report.repaired("inode_size", n=len(sizes))
            self.progress.advance(len(rows))

    def _check_extents(self) -> None:
        sql = (
            "SELECT e.inode, e.offset, e.length, e.block_id, i.mode, i.size, b.size FROM extents e"
            " LEFT JOIN inodes i ON i.id = e.inode LEFT JOIN blocks b ON b.id = e.block_id"
            " WHERE (e.inode, e.offset) > (?, ?) ORDER BY e.inode, e.offset LIMIT ?"
        )
        prev: tuple[int, int, int] | None = None  # (inode, offset, length once repaired)
        for rows in self._pages(sql, (0, -1), lambda r: (r[0], r[1])):
            drop: list[tuple[int, int, str]] = []
            cut: list[tuple[int, int, int]] = []  # (new length, inode, offset)
            for ino, off, length, bid, mode, isize, bsize in rows:
                where = f"inode {ino} extent at {off} (+{length})"
                bad = (
                    "its inode is missing"
                    if mode is None
                    else "its inode is not a regular file"
                    if not stat.S_ISREG(mode)
                    else f"malformed block id {bid!r}"
                    if not _valid_id(bid)
                    else "a negative offset or empty length"
                    if off < 0 or length <= 0
                    else None
                )
                if bad:
                    self.report.add("extent_invalid", f"{where}: {bad}")
                    drop.append((ino, off, bid))
                    continue
                new = length
                if bsize is not None and new > bsize:
                    self.report.add("extent_invalid", f"{where}: longer than its block ({bsize})")
                    new = bsize
                if off >= isize or off + new > isize:
                    self.report.add(
                        "extent_past_size", f"{self._where(ino)}: {where} past the size {isize}"
                    )
                    if off >= isize:
                        drop.append((ino, off, bid))
                        continue
                    new = isize - off
                if prev is not None and prev[0] == ino and off < prev[1] + prev[2]:
                    self.report.add(
                        "extent_overlap",
                        f"{self._where(ino)}: extent at {prev[1]} (+{prev[2]}) overlaps the one"
                        f" at {off}; the earlier one is cut short",
                    )
                    cut.append((off - prev[1], ino, prev[1]))
                if new != length:
                    cut.append((new, ino, off))
                prev = (ino, off, new)
            if self.repair and (drop or cut):
                with self.meta.txn():
                    for ino, off, bid in drop:
                        self.db.execute(
                            "DELETE FROM extents WHERE inode = ? AND offset = ?", (ino, off)
                        )
                        self._release_block(bid)
                    self.db.executemany(
                        "UPDATE extents SET length = ? WHERE inode = ? AND offset = ?", cut
                    )
                for kind in ("extent_invalid", "extent_past_size", "extent_overlap"):
                    self.report.repaired(kind, n=self.report.found[kind] - self.report.fixed[kind])

    def _check_block_rows(self) -> None:
        sql = (
            "SELECT e.block_id, count(*), max(e.length) FROM extents e WHERE e.block_id > ?"
            " AND NOT EXISTS (SELECT 1 FROM blocks b WHERE b.id = e.block_id)"
            " GROUP BY e.block_id ORDER BY e.block_id LIMIT ?"
        )
        for rows in self._pages(sql, ("",), lambda r: (r[0],)):
            for bid, refs, longest in rows:
                if not _valid_id(bid):
                    continue  # an invalid extent, reported above
                self.report.add(
                    "missing_block_row",
                    f"block {bid} (used by {', '.join(self._block_paths(bid)[:3])})",
                )
                if self.repair:
                    data = self._fetch(bid, None, self.ring.walk(bid), {})
                    size = len(data) if data is not None else longest
                    with self.meta.txn():
                        self.db.execute(
                            "INSERT INTO blocks (id, size, refcount) VALUES (?, ?, ?)",
                            (bid, size, refs),
                        )
                    self.report.repaired("missing_block_row", f"block {bid}, size {size}")

    def _check_refcounts(self) -> None:
        sql = (
            "SELECT b.id, b.refcount, b.zero_since_ns,"
            " (SELECT count(*) FROM extents e WHERE e.block_id = b.id)"
            " FROM blocks b WHERE b.id > ? ORDER BY b.id LIMIT ?"
        )
        for rows in self._pages(sql, ("",), lambda r: (r[0],)):
            fixes = []
            for bid, refcount, since, actual in rows:
                if refcount == actual and (since is None) == (actual > 0):
                    continue
                why = (
                    f"refcount {refcount}, {actual} extents use it"
                    if refcount != actual
                    else "its garbage timestamp disagrees with its refcount"
                )
                self.report.add("refcount", f"block {bid}: {why}")
                fixes.append((actual, None if actual else since or now_ns(), bid))
            if self.repair and fixes:
                with self.meta.txn():
                    self.db.executemany(
                        "UPDATE blocks SET refcount = ?, zero_since_ns = ? WHERE id = ?", fixes
                    )
                self.report.repaired("refcount", n=len(fixes))

    # ---------------------------------------------------------- replicas

    def check_replicas(self) -> None:
        """Probe the named copies of each page of blocks in worker threads, then judge here.

        Workers only stat or read and hash (DirStore allows any number of threads);
        the metadata, the report and repairs stay on this thread.
        """
        total = self.db.execute("SELECT count(DISTINCT block_id) FROM extents").fetchone()[0]
        self.progress.start("replicas", total)
        sql = (
            "SELECT x.block_id, b.size FROM (SELECT DISTINCT block_id FROM extents"
            " WHERE block_id > ? ORDER BY block_id LIMIT ?) x"
            " LEFT JOIN blocks b ON b.id = x.block_id ORDER BY x.block_id"
        )
        with ThreadPoolExecutor(self.threads, thread_name_prefix="fsck") as pool:
            for rows in self._pages(sql, ("",), lambda r: (r[0],)):
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
            with self.meta.txn():
                self.db.execute("UPDATE blocks SET size = ? WHERE id = ?", (length, bid))
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
        q = "SELECT 1 FROM extents WHERE block_id = ? LIMIT 1"
        return self.db.execute(q, (bid,)).fetchone() is not None

    def _block_paths(self, bid: str) -> list[str]:
        inodes = self.db.execute(
            "SELECT DISTINCT inode FROM extents WHERE block_id = ? LIMIT ?", (bid, MAX_PATHS)
        ).fetchall()
        return [p for (ino,) in inodes for p in self.paths(ino)]

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
        sql = (
            "SELECT b.id, b.zero_since_ns FROM blocks b WHERE b.id > ? AND NOT EXISTS"
            " (SELECT 1 FROM extents e WHERE e.block_id = b.id) ORDER BY b.id LIMIT ?"
        )
        for rows in self._pages(sql, ("",), lambda r: (r[0],)):
            for bid, since in rows:
                self.progress.advance()
                if not _valid_id(bid):
                    self.report.add("garbage_block", f"block row with a malformed id {bid!r}")
                    if self.repair:
                        with self.meta.txn():
                            self.db.execute("DELETE FROM blocks WHERE id = ?", (bid,))
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
            referenced = self._among(
                "SELECT DISTINCT block_id, NULL FROM extents WHERE block_id IN ({})", ids
            )
            rows = self._among("SELECT id, size FROM blocks WHERE id IN ({})", ids)
            for bid in ids:
                if bid in referenced:
                    named = self.ring.replicas(bid, self.replicas)
                    if node_id not in named:
                        self._misplaced(bid, node_id, named, rows.get(bid))
                elif bid not in rows:  # rows without extents: check_garbage_rows
                    self._stray(bid, node_id, store)
            self.progress.advance(len(ids))

    def _among(self, sql: str, ids: list[str]) -> dict:
        out = {}
        for i in range(0, len(ids), IN_BATCH):
            batch = ids[i : i + IN_BATCH]
            out.update(self.db.execute(sql.format(",".join("?" * len(batch))), batch).fetchall())
        return out

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
