"""Read what can be read of a damaged SQLite metadata database (`hafs fsck --salvage`).

SQLite raises DatabaseError on a query that meets a damaged page, and only then:
rows on sound pages stay readable by queries that do not touch the damaged ones.
So each table is walked in its key order, a page of rows at a time (`key > cursor
LIMIT n`).  Where a page fails, its rows are read one at a time up to the damage;
then the walk steps over the damage: it probes positions 1, 2, 4, ... past the last
good key with a key-only query (`key >= x LIMIT 1`) until one answers, bisects back
to the first position that answers, and goes on from the key found there.  Keys map
to integer positions in key order (a rowid; inode and offset; a block id's hex
value), so a step-over costs at most a few hundred probes whatever the size.  Every
key the walk goes on from is looked up again (`key = ?`): garbage read from a
damaged page that still parses is most often a key the tree's own search does not
lead to.  Rows that do not make a valid record (wrong types, keys out of order,
keys not found again) are dropped like unreadable ones.

`read_damaged` yields what `SqliteMeta.dump` does (an FsState and the records), so
`salvage` is this tolerant dump loaded into a new database (`SqliteMeta.load`: the
current schema, application id and schema version), built beside the damaged one
and put in its place; the damaged file is kept (renamed, with its -wal and -shm).
Its `Salvage` counts the rows read per table and the key ranges stepped over.
Write locks, sessions and counters are not read (live or derived state); the
sessions are only looked at, to refuse a salvage while the filesystem is in use.

Not thread-safe: one connection, one walk at a time.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from . import FsState, Record, SessionInfo
from .sqlite import APPLICATION_ID, DUMP_TABLES, SqliteMeta, check_text, state_of

PAGE = 500  # rows per query
_MAX63 = (1 << 63) - 1


@dataclass(frozen=True)
class _Walk:
    """How to walk one table: its key columns, and positions (ints in key order)."""

    keys: str  # key columns, in order
    types: tuple[type, ...]  # what each key column must hold
    where: str  # the probe's condition on a position
    pos: Callable[[tuple], int]  # a key's position
    at: Callable[[int], tuple]  # the probe's parameters for a position
    hi: int  # the largest position


def _hexpos(block_id: str) -> int:
    """A block id's position: its leading hex digits as a 256-bit number."""
    digits = ""
    for ch in block_id[:64]:
        if ch not in "0123456789abcdef":
            break
        digits += ch
    return int(digits.ljust(64, "0"), 16)


_ROWID = _Walk("rowid", (int,), "rowid >= ?", lambda k: k[0], lambda x: (x,), _MAX63)
_ID = _Walk("id", (str,), "id >= ?", lambda k: _hexpos(k[0]), lambda x: (f"{x:064x}",),
            (1 << 256) - 1)  # fmt: skip
WALKS = {
    "settings": _ROWID,
    "inodes": _ROWID,
    "dentries": _ROWID,
    "xattrs": _Walk("inode, name", (int, bytes), "inode >= ?", lambda k: k[0], lambda x: (x,),
                    _MAX63),
    "extents": _Walk("inode, offset", (int, int), "(inode, offset) >= (?, ?)",
                     lambda k: k[0] << 63 | min(max(k[1], 0), _MAX63),
                     lambda x: (x >> 63, x & _MAX63), (_MAX63 << 63) | _MAX63),
    "blocks": _ID,
    "degraded": _ID,
}  # fmt: skip

# What each column of a record must hold (None allowed where the type list says so).
_INT, _BYTES, _STR = (int,), (bytes,), (str,)
_OPT_INT, _OPT_BYTES = (int, type(None)), (bytes, type(None))
COLUMN_TYPES = {
    "settings": (_STR, _STR),
    "inodes": (_INT,) * 10 + (_OPT_BYTES,),
    "dentries": (_INT, _BYTES, _INT),
    "xattrs": (_INT, _BYTES, _BYTES),
    "extents": (_INT, _INT, _INT, _STR),
    "blocks": (_STR, _INT, _INT, _OPT_INT),
    "degraded": (_STR, _STR, _INT),
}


@dataclass
class Salvage:
    """What a tolerant read got: rows per table, and the key ranges it stepped over
    ((last key read before, first key read after); None: the start or the end)."""

    rows: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)  # rows read but not a valid record
    skipped: dict[str, list[tuple[tuple | None, tuple | None]]] = field(default_factory=dict)

    def lost_inodes(self, table: str) -> list[tuple[int, int | None]]:
        """The ranges of inode numbers whose rows of `table` (extents, xattrs) may be
        incomplete: (first, last), last None for no end."""
        out = []
        for after, before in self.skipped.get(table, []):
            last = None if before is None else before[0]
            if before is not None and table == "extents" and before[1] == 0:
                last -= 1  # that inode's first extent came back: nothing before it was lost
            out.append((after[0] if after else 0, last))
        return out

    def summary(self) -> str:
        parts = []
        for table in ("inodes", "dentries", "xattrs", "extents", "blocks", "degraded"):
            text = f"{table} {self.rows[table]:,}"
            gaps = len(self.skipped.get(table, []))
            if gaps or self.dropped[table]:
                text += f" ({gaps} damaged ranges skipped, {self.dropped[table]} bad rows)"
            parts.append(text)
        return "rows read: " + ", ".join(parts)


class _Reader:
    """The walk over the tables of one damaged database (the module docstring)."""

    def __init__(self, db: sqlite3.Connection, tally: Salvage) -> None:
        self.db = db
        self.tally = tally

    def rows(self, table: str, cols: str) -> Iterator[tuple]:
        """The rows (`cols`) of `table` that can be read, in key order."""
        w = WALKS[table]
        nk = len(w.types)
        key: tuple | None = None  # None: from the start
        inclusive = True
        while True:
            page, broken = self._page(table, cols, w, key, inclusive)
            for row in page:
                self.tally.rows[table] += 1
                yield row[nk:]
            if page:
                key, inclusive = page[-1][:nk], False
            if not broken:
                if len(page) < PAGE:
                    return
                continue
            after = key
            key = self._step_over(table, w, key)
            before = [] if key is None else self._back(table, cols, w, key, after)
            self.tally.skipped.setdefault(table, []).append(
                (after, before[0][:nk] if before else key)
            )
            for row in before:
                self.tally.rows[table] += 1
                yield row[nk:]
            if key is None:
                return
            inclusive = True

    def _query(self, table: str, cols: str, w: _Walk, key, op: str, n: int) -> list:
        """Up to n rows whose key is `op` key (">", ">=", "<"; "<" reads downwards)."""
        sql = f"SELECT {w.keys}, {cols} FROM {table}"
        args: tuple = ()
        if key is not None:
            sql += f" WHERE ({w.keys}) {op} ({', '.join('?' * len(key))})"
            args = key
        desc = ", ".join(f"{k} DESC" for k in w.keys.split(", "))
        sql += f" ORDER BY {desc if op == '<' else w.keys} LIMIT {n}"
        return self.db.execute(sql, args).fetchall()

    def _back(self, table: str, cols: str, w: _Walk, key: tuple, after) -> list:
        """The row just before `key` (the first key after a damage), if a read downwards
        from it gets one between `after` and `key`.  In a WITHOUT ROWID table the parent
        page holds a row between two children: the one just before the first child a
        step-over reaches, which no read upwards gets (they descend into the damaged child
        first).  A rowid table's parents hold no rows."""
        if w is _ROWID:
            return []
        try:
            rows = self._query(table, cols, w, key, "<", 1)
        except sqlite3.DatabaseError:
            return []
        good = self._in_order(w, rows, after, False)
        return good if good and good[0][: len(w.types)] < key else []

    def _page(self, table, cols, w, key, inclusive) -> tuple[list, bool]:
        """Up to PAGE rows after `key`, and whether damage stopped them."""
        try:
            rows = self._query(table, cols, w, key, ">=" if inclusive else ">", PAGE)
        except sqlite3.DatabaseError:
            rows = None
        nk = len(w.types)
        if rows is not None:
            good = self._in_order(w, rows, key, inclusive)
            broken = len(good) < len(rows)
            while good and not self._found(table, w, good[-1][:nk]):  # the next cursor
                good.pop()
                self.tally.dropped[table] += 1
                broken = True
            return good, broken
        out: list = []  # one at a time, up to the damage
        while len(out) < PAGE:
            try:
                rows = self._query(table, cols, w, key, ">=" if inclusive else ">", 1)
            except sqlite3.DatabaseError:
                return out, True
            if not rows:
                return out, False
            if not self._in_order(w, rows, key, inclusive) or not self._found(
                table, w, rows[0][:nk]
            ):
                return out, True
            out.append(rows[0])
            key, inclusive = rows[0][:nk], False
        return out, False

    def _found(self, table: str, w: _Walk, key: tuple) -> bool:
        """Whether a lookup of `key` finds it: a key read from a damaged page that still
        parses is garbage that the tree's own search does not lead to (most of the time)."""
        sql = f"SELECT 1 FROM {table} WHERE ({w.keys}) = ({', '.join('?' * len(key))})"
        try:
            return self.db.execute(sql, key).fetchone() is not None
        except sqlite3.DatabaseError:
            return False

    @staticmethod
    def _in_order(w: _Walk, rows: list, key, inclusive: bool) -> list:
        """The leading rows whose keys have the right types and come in order after `key`."""
        nk = len(w.types)
        good = []
        for row in rows:
            k = row[:nk]
            if not all(type(v) is t for v, t in zip(k, w.types)):
                break
            if key is not None and not (k >= key if inclusive else k > key):
                break
            good.append(row)
            key, inclusive = k, False
        return good

    def _probe(self, table: str, w: _Walk, x: int, after) -> tuple[bool, tuple | None]:
        """Whether a read from position x answers (with the first key there, after `after`)."""
        sql = f"SELECT {w.keys} FROM {table} WHERE {w.where} ORDER BY {w.keys} LIMIT 1"
        try:
            rows = self.db.execute(sql, w.at(x)).fetchall()
        except sqlite3.DatabaseError:
            return False, None
        if not rows:
            return True, None
        good = self._in_order(w, rows, after, False)
        if not good or not self._found(table, w, tuple(good[0])):
            return False, None
        return True, tuple(good[0])

    def _step_over(self, table: str, w: _Walk, key) -> tuple | None:
        """The first key that can be read after the damage that follows `key` (None: none)."""
        p = -1 if key is None else w.pos(key)
        failed, step = p, 1
        while True:
            x = min(p + step, w.hi)
            ok, found = self._probe(table, w, x, key)
            if ok:
                break
            if x >= w.hi:
                return None  # damaged to the end
            failed, step = x, step * 2
        while x - failed > 1:  # probe(failed) failed, probe(x) answered: bisect
            mid = (failed + x) // 2
            ok, k = self._probe(table, w, mid, key)
            if ok:
                x, found = mid, k
            else:
                failed = mid
        return found


def _valid(table: str, row: tuple) -> bool:
    return all(type(v) in t for v, t in zip(row, COLUMN_TYPES[table], strict=True))


@contextmanager
def read_damaged(path: Path) -> Iterator[tuple[FsState, Iterator[Record], Salvage]]:
    """What can be read of the database at `path` (opened read-only): the FsState, an
    iterator of the records (in `SqliteMeta.dump`'s order) and the Salvage it fills in.
    UserError when not even the settings can be read."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        db.execute("PRAGMA cell_size_check = ON")  # find more damage than a plain read
        try:
            app_id = db.execute("PRAGMA application_id").fetchone()[0]
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
        except sqlite3.DatabaseError as e:
            raise UserError(
                f"{path}: its header or schema page is damaged ({e}): nothing can be salvaged;"
                " restore it from a backup (a dump: 'hafs meta load' into a new home)"
            ) from None
        if app_id != APPLICATION_ID:
            raise UserError(f"{path} is not a hafs metadata database (application id {app_id:#x})")
        tally = Salvage()
        reader = _Reader(db, tally)
        settings = dict(r for r in reader.rows("settings", "key, value") if _valid("settings", r))
        try:
            seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'inodes'").fetchone()
        except sqlite3.DatabaseError:
            seq = None  # the load counts from the inodes it gets
        try:
            state = state_of(settings, (seq[0] if seq else 0) + 1)
        except (KeyError, ValueError) as e:
            raise UserError(
                f"{path}: its settings (uuid, replicas, ring) are damaged (missing or bad: {e}):"
                " nothing can be salvaged; restore it from a backup (a dump: 'hafs meta load'"
                " into a new home)"
            ) from None

        def records() -> Iterator[Record]:
            for table, _, cols, make in DUMP_TABLES:
                if table not in tables:
                    continue  # an older schema
                for row in reader.rows(table, cols):
                    if _valid(table, row):
                        yield make(row)
                    else:
                        tally.dropped[table] += 1

        yield state, records(), tally
    finally:
        db.close()


def sessions(path: Path) -> list[SessionInfo] | None:
    """The sessions recorded in the database (None: they cannot be read)."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.DatabaseError:
        return None
    try:
        rows = db.execute(
            "SELECT id, kind, host, mountpoint, pid, version, since_ns, expires_ns FROM sessions"
        ).fetchall()
        return [SessionInfo(*r) for r in rows]
    except sqlite3.DatabaseError:
        return None
    finally:
        db.close()


def integrity(path: Path) -> str | None:
    """What SQLite's integrity check says is wrong with the database (None: nothing)."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        try:
            return check_text(db.execute("PRAGMA integrity_check(3)").fetchall())
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        return str(e)


def salvage(path: Path) -> tuple[str, Path, Salvage] | None:
    """Rebuild the database at `path` from what can be read of it, if SQLite's integrity
    check finds it damaged: (what the check found, where the damaged file went, what was
    read); None if it is sound.  Nothing is written into the damaged file, which stays in
    place until the new one is whole (a salvage cut off before may run again)."""
    problems = integrity(path)
    if problems is None:
        return None
    new = path.with_name(path.name + ".salvage")
    new.unlink(missing_ok=True)  # left by a salvage that was cut off
    with read_damaged(path) as (state, records, tally):
        SqliteMeta.load(new, state, records, place=path)  # its owner token too (store.owner)
    damaged = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    while damaged.exists():
        damaged = damaged.with_name(damaged.name + "+")
    os.rename(path, damaged)
    for side in ("-wal", "-shm"):
        if os.path.exists(f"{path}{side}"):
            os.rename(f"{path}{side}", f"{damaged}{side}")
    os.rename(new, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return problems, damaged, tally
