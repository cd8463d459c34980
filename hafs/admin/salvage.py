"""`hafs fsck --salvage`: rebuild a damaged SQLite metadata database from what can be
read of it (meta/salvage.py), then repair the filesystem as `hafs fsck --repair` does.

Refused while anything uses the filesystem: a mount daemon of the home, or a
session alive in the damaged database (a mount, a rebalance, a repair).  A sound
database (SQLite's integrity check) is not rebuilt, only repaired.  The repair on
the new database puts the references right: entries that name a lost inode are
dropped (each reported by its path), inodes that lost their names go to
/lost+found, lost block rows are made again from the extents and the nodes, link
counts and refcounts are recomputed.  Files whose extents or xattrs sat on damaged
pages are named in the report: their lost ranges read as zeros.
"""

from __future__ import annotations

import stat
import time
from pathlib import Path

from ..errors import UserError
from ..home import meta_path, meta_url, open_meta
from ..meta.salvage import Salvage, salvage, sessions
from ..meta.sqlite import session_dead
from . import fsck

MAX_SUSPECTS = 100  # files named whose content may be incomplete


def run(
    home: Path,
    *,
    daemons: list[tuple[int, str]],
    deep: bool = False,
    rate_mib: float | None = None,
    grace_s: float = fsck.DEFAULT_GRACE_S,
    progress: fsck.Progress | None = None,
) -> fsck.Report:
    """Salvage the database of `home` if it is damaged, then repair (the module docstring).
    `daemons`: the home's running mount daemons (pid, mountpoint), which refuse it."""
    home = Path(home).absolute()
    try:
        _check(home, daemons)
        found = salvage(meta_path(home))
    except UserError as e:
        report = fsck.Report(str(home), True, deep, grace_s)
        report.error = str(e)
        return report
    report = fsck.run(
        home, repair=True, deep=deep, rate_mib=rate_mib, grace_s=grace_s, progress=progress
    )
    db = meta_path(home)
    if found is None:
        report.notes.append(f"{db} passes SQLite's integrity check: it was not rebuilt")
        return report
    problems, damaged, tally = found
    report.add("database_damaged", f"{db}: {problems}")
    report.repaired("database_damaged", f"{db} salvaged; the damaged file is kept as {damaged}")
    report.notes.append(
        f"salvaged {db} into a new database ({tally.summary()}); the damaged file is kept as"
        f" {damaged}"
    )
    suspects = _suspects(home, tally)
    if suspects:
        report.notes.append(
            "files with extents or xattrs on damaged pages (what was lost reads as zeros, or"
            " the xattr is gone; compare them with a backup): " + ", ".join(suspects)
        )
    return report


def _check(home: Path, daemons: list[tuple[int, str]]) -> None:
    """UserError when the home's database may not be salvaged now."""
    url = meta_url(home)
    if url is not None:
        raise UserError(
            f"--salvage rebuilds an embedded filesystem's SQLite database; {url} keeps its"
            " metadata in etcd: restore etcd from its snapshot, or load a 'hafs meta dump'"
            " into a new NAME"
        )
    if not meta_path(home).exists():
        raise UserError(f"no hafs filesystem in {home}: nothing to salvage")
    if daemons:
        pid, mountpoint = daemons[0]
        raise UserError(
            f"the filesystem is mounted at {mountpoint} (pid {pid}): unmount it before"
            " 'hafs fsck --salvage'"
        )
    alive = [s for s in sessions(meta_path(home)) or [] if not session_dead(s, time.time_ns())]
    if alive:
        s = alive[0]
        where = f"{s.host}:{s.mountpoint}" if s.mountpoint else s.host
        raise UserError(
            f"the filesystem is in use ({s.kind} on {where}, pid {s.pid}): stop it before"
            " 'hafs fsck --salvage'"
        )


def _suspects(home: Path, tally: Salvage) -> list[str]:
    """Paths of the files whose extents (regular files) or xattrs (any) were in a damaged
    range, up to MAX_SUSPECTS ("..." after them if there are more)."""
    ranges = [(r, True) for r in tally.lost_inodes("extents")]
    ranges += [(r, False) for r in tally.lost_inodes("xattrs")]
    out: list[str] = []
    meta = open_meta(home, read_only=True)
    try:
        for (first, last), files_only in ranges:
            after = first - 1
            while len(out) <= MAX_SUSPECTS and (page := meta.scan_inodes(after, 500)):
                inside = [i for i in page if last is None or i.id <= last]
                for inode in inside:
                    if stat.S_ISREG(inode.mode) or not files_only:
                        path = meta.path_of(inode.id)
                        if path not in out:
                            out.append(path)
                if len(inside) < len(page):
                    break
                after = page[-1].id
    finally:
        meta.close()
    return out[:MAX_SUSPECTS] + (["..."] if len(out) > MAX_SUSPECTS else [])
