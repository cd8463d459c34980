"""fsck by breaking things: each test damages a filesystem, then checks that fsck finds
the damage (exit code and report), repairs what a good copy allows, and that a second
run is clean.  Filesystems are written through the Vfs (no mount), except in the two
tests of fsck beside a running mount and after a mount killed with SIGKILL."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import trio
from conftest import hafs, make_mount, vfs_session

from hafs import home
from hafs.admin import fsck
from hafs.errors import FsError, StorageError
from hafs.fs.vfs import Vfs
from hafs.meta import ROOT_INODE
from hafs.store.dirstore import DirStore, block_id
from hafs.store.ring import Ring

KB = 1024


# ------------------------------------------------------------------ helpers


async def _dir_of(v: Vfs, path: str) -> tuple[int, bytes]:
    """(parent inode, name) of `path`, making the parent directories."""
    *dirs, name = path.strip("/").split("/")
    parent = ROOT_INODE
    for d in dirs:
        try:
            parent = (await v.lookup(parent, d.encode())).id
        except FsError:
            parent = (await v.mkdir(parent, d.encode(), 0o755, 0, 0)).id
    return parent, name.encode()


def build(tmp_path: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    """A filesystem in tmp_path/h holding `files`, plus hard links {new path: existing path}."""
    h = tmp_path / "h"
    home.create(h)

    async def work(v: Vfs) -> None:
        inos = {}
        for path, data in files.items():
            parent, name = await _dir_of(v, path)
            fh, inode = await v.create(parent, name, 0o644, os.O_WRONLY, 0, 0)
            await v.write(fh, 0, data)
            await v.release(fh)
            inos[path] = inode.id
        for new, old in (links or {}).items():
            parent, name = await _dir_of(v, new)
            await v.link(inos[old], parent, name)

    trio.run(vfs_session, h, work)
    return h


def read_back(h: Path, ino: int) -> bytes | StorageError:
    """The file's bytes read through a Vfs, or the storage error the read raised."""

    async def work(v: Vfs) -> bytes | StorageError:
        fh, _, _ = await v.open(ino, os.O_RDONLY)
        try:
            return await v.read(fh, 0, (await v.getattr(ino)).size + 1)
        except StorageError as e:
            return e
        finally:
            await v.release(fh)

    return trio.run(vfs_session, h, work)


def db(h: Path) -> sqlite3.Connection:
    return sqlite3.connect(h / "meta.db", isolation_level=None)


def ino_of(h: Path, path: str) -> int:
    ino = ROOT_INODE
    with db(h) as c:
        for part in path.strip("/").split("/"):
            q = "SELECT inode FROM dentries WHERE parent = ? AND name = ?"
            ino = c.execute(q, (ino, part.encode())).fetchone()[0]
    return ino


def blocks_of(h: Path, path: str) -> list[str]:
    q = "SELECT block_id FROM extents WHERE inode = ? ORDER BY offset"
    with db(h) as c:
        return [r[0] for r in c.execute(q, (ino_of(h, path),))]


def ring(h: Path) -> Ring:
    with db(h) as c:
        row = c.execute("SELECT value FROM settings WHERE key = 'ring'").fetchone()
    return Ring.from_json(json.loads(row[0]))


def block_file(h: Path, node: str, bid: str) -> Path:
    return h / "nodes" / node / "blocks" / bid[:2] / bid


def holders(h: Path, bid: str) -> list[str]:
    return sorted(n.name for n in (h / "nodes").iterdir() if block_file(h, n.name, bid).exists())


def named(h: Path, bid: str) -> list[str]:
    return sorted(ring(h).replicas(bid, 2))


def store(h: Path, node: str) -> DirStore:
    ident = json.loads((h / "nodes" / node / "hafs-node.json").read_text())
    return DirStore.open(h / "nodes" / node, node, ident["fs_uuid"])


def check(h: Path, **kw) -> fsck.Report:
    report = fsck.run(h, **kw)
    assert report.error is None, report.error
    return report


def found(report: fsck.Report) -> dict[str, int]:
    return {k: n for k, n in report.found.items() if n}


def assert_clean(h: Path, **kw) -> fsck.Report:
    report = check(h, **kw)
    assert report.exit_code == 0, report.render()
    assert not found(report)
    return report


def rand(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def fsck_hafs(*args) -> subprocess.CompletedProcess:
    """Run the fsck.hafs script (the form `fsck -t hafs` calls)."""
    script = shutil.which("fsck.hafs") or Path(sys.executable).with_name("fsck.hafs")
    cmd = [str(script)] if Path(script).exists() else [sys.executable, "-c", _FSCK_MAIN]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=120)


_FSCK_MAIN = "import sys; from hafs.cli import fsck_main; sys.exit(fsck_main())"


# -------------------------------------------------------------------- tests


def test_clean_filesystem_cli_json_and_progress(tmp_path):
    h = build(tmp_path, {"/a": rand(1, 300 * KB), "/d/b": rand(2, 3000 * KB), "/d/e/c": b"x"})
    out = io.StringIO()
    report = fsck.run(h, deep=True, progress=fsck.Progress(out, enabled=True))
    assert report.exit_code == 0 and not found(report) and report.stats["bytes_read"] > 0
    assert "replicas: " in out.getvalue() and out.getvalue().endswith("\r\x1b[K")
    p = hafs("fsck", "--home", h, "--json", "--deep")
    r = json.loads(p.stdout)
    assert r["exit_code"] == 0 and r["problems"] == {} and r["stats"]["inodes"] == 6
    assert "result: clean (exit 0)" in hafs("fsck", "--home", h).stdout
    assert fsck_hafs("-n", h).returncode == 0
    p = hafs("fsck", "--home", tmp_path / "none", check=False)
    assert p.returncode == 8 and "no hafs filesystem" in p.stderr


def test_missing_and_misplaced_replicas_are_put_back(tmp_path):
    h = build(tmp_path, {"/a": rand(1, 200 * KB), "/b": rand(2, 200 * KB)})
    (a,), (b,) = blocks_of(h, "/a"), blocks_of(h, "/b")
    gone = named(h, a)[0]
    block_file(h, gone, a).unlink()
    # b: one named copy moved to the node the ring does not name (a failed-over write)
    moved_from = named(h, b)[1]
    other = ({"n1", "n2", "n3"} - set(named(h, b))).pop()
    block_file(h, moved_from, b).rename(block_file(h, other, b))

    report = check(h)
    assert report.exit_code == 4
    assert found(report) == {"missing_replica": 2, "misplaced_replica": 1}
    assert f"block {a} on node {gone}: missing" in report.details["missing_replica"]
    assert any(other in d for d in report.details["misplaced_replica"])
    assert holders(h, a) != named(h, a)  # a check changes nothing
    assert fsck_hafs(h).returncode == 4  # fsck.hafs without -y only checks too
    assert holders(h, a) != named(h, a)

    p = hafs("fsck", "--home", h, "--repair", "--json", check=False)  # the CLI this time
    r = json.loads(p.stdout)
    assert p.returncode == r["exit_code"] == 1, r
    assert {k: (v["found"], v["repaired"]) for k, v in r["problems"].items()} == {
        "missing_replica": (2, 2),
        "misplaced_replica": (1, 1),
    }
    assert holders(h, a) == named(h, a) and holders(h, b) == named(h, b)
    log = (h / "hafs.log").read_text()  # repairs leave an audit trail beside the mounts' log
    assert f"FSCK-REPAIR missing_replica: block {a} copied to node {gone}" in log
    assert "FSCK-DONE exit 1" in log
    assert block_id(block_file(h, gone, a).read_bytes()) == a
    assert_clean(h, deep=True)


def test_flipped_byte_is_found_by_deep_and_repaired(tmp_path):
    h = build(tmp_path, {"/a": rand(1, 200 * KB), "/b": rand(2, 200 * KB)})
    (a,), (b,) = blocks_of(h, "/a"), blocks_of(h, "/b")
    for bid in (a, b):
        f = block_file(h, named(h, bid)[0], bid)
        raw = bytearray(f.read_bytes())
        raw[1000] ^= 0x40
        f.write_bytes(raw)

    assert_clean(h)  # presence and size cannot see it
    report = check(h, deep=True)
    assert report.exit_code == 4 and found(report) == {"corrupt_replica": 2}
    assert f"block {a} on node {named(h, a)[0]}: corrupt" in report.details["corrupt_replica"]
    # get() moved the bad copies aside, as every reader does
    assert len(list((h / "nodes" / named(h, a)[0] / "corrupt").iterdir())) >= 1
    assert not block_file(h, named(h, a)[0], a).exists()

    report = check(h, repair=True, deep=True)  # the copies are missing now: put back
    assert report.exit_code == 1 and found(report) == {"missing_replica": 2}
    assert report.fixed == report.found
    for bid in (a, b):
        for node in named(h, bid):
            assert block_id(block_file(h, node, bid).read_bytes()) == bid
    assert_clean(h, deep=True)

    f = block_file(h, named(h, a)[1], a)  # flipped and repaired in one run
    f.write_bytes(b"\0" + f.read_bytes()[1:])
    report = check(h, repair=True, deep=True)
    assert report.exit_code == 1 and found(report) == {"corrupt_replica": 1}
    assert_clean(h, deep=True)


def test_block_without_any_copy_names_every_path(tmp_path):
    data = rand(1, 200 * KB)
    h = build(
        tmp_path,
        {"/d/a": data, "/b": data, "/other": rand(2, 200 * KB)},  # /b shares /d/a's block
        links={"/c/link": "/d/a"},
    )
    (bid,) = blocks_of(h, "/d/a")
    assert blocks_of(h, "/b") == [bid]
    for node in holders(h, bid):
        block_file(h, node, bid).unlink()

    expected = {"/d/a", "/c/link", "/b"}
    for kw in ({}, {"repair": True}, {"repair": True, "deep": True}, {}):
        report = check(h, **kw)
        assert report.exit_code == 4, report.render()
        assert found(report) == {"lost_block": 1}
        assert report.lost_paths == expected
        assert not report.fixed
        detail = report.details["lost_block"][0]
        assert bid in detail and all(p in detail for p in expected)
    text = report.render()
    assert "LOST DATA" in text and "/c/link" in text and "EIO" in text

    # the files are kept: reads of the lost range fail, other files read fine
    with db(h) as c:
        q = "SELECT count(*) FROM extents WHERE block_id = ?"
        assert c.execute(q, (bid,)).fetchone() == (2,)
    assert isinstance(read_back(h, ino_of(h, "/b")), StorageError)
    assert read_back(h, ino_of(h, "/other")) == rand(2, 200 * KB)


def test_stray_block_is_reclaimed_only_after_the_grace(tmp_path):
    h = build(tmp_path, {"/a": rand(1, 100 * KB)})
    stray = rand(9, 5000)
    sid = block_id(stray)
    store(h, "n1").put(sid, stray)

    report = check(h)
    assert report.exit_code == 0 and report.pending == 1 and not found(report)
    report = check(h, repair=True)  # younger than the default hour: left for a writer
    assert report.exit_code == 0 and report.pending == 1
    assert block_file(h, "n1", sid).exists()

    report = check(h, grace_s=0)
    assert report.exit_code == 4 and found(report) == {"stray_block": 1}
    assert sid in report.details["stray_block"][0]
    report = check(h, repair=True, grace_s=0)
    assert report.exit_code == 1 and report.fixed == report.found
    assert not block_file(h, "n1", sid).exists()
    assert holders(h, blocks_of(h, "/a")[0]) == named(h, blocks_of(h, "/a")[0])
    assert assert_clean(h, grace_s=0).pending == 0


def test_orphan_blocks_of_a_writer_killed_before_commit(tmp_path):
    h = build(tmp_path, {"/keep": rand(1, 100 * KB)})
    r = ring(h)
    orphans = [rand(100 + i, 3000 + i) for i in range(5)]
    for data in orphans:  # stored on R nodes as Placement.put does, never committed
        bid = block_id(data)
        for node in r.replicas(bid, 2):
            store(h, node).put(bid, data)
    old = time.time() - 7200
    tmp = h / "nodes" / "n2" / "tmp" / "deadbeef.0123"  # a put cut short by the kill
    tmp.write_bytes(b"partial")
    os.utime(tmp, (old, old))

    report = check(h)
    assert report.exit_code == 0 and report.pending == 10
    report = check(h, grace_s=0)
    assert report.exit_code == 4 and found(report) == {"stray_block": 10}

    report = check(h, repair=True, grace_s=0)
    assert report.exit_code == 1 and report.fixed == report.found
    assert any("1 stale temp files" in n for n in report.notes)
    assert not tmp.exists()
    for data in orphans:
        assert holders(h, block_id(data)) == []
    assert_clean(h, grace_s=0)
    assert read_back(h, ino_of(h, "/keep")) == rand(1, 100 * KB)


def test_dropped_entries_go_to_lost_found(tmp_path):
    h = build(tmp_path, {"/d/f": rand(1, 100 * KB), "/d/g": b"g", "/e/inner": b"inner"})
    f, e = ino_of(h, "/d/f"), ino_of(h, "/e")
    with db(h) as c:
        c.execute("DELETE FROM dentries WHERE inode IN (?, ?)", (f, e))

    report = check(h)
    assert report.exit_code == 4
    # both inodes are nameless; the root still counts /e among its subdirectories
    assert found(report) == {"orphan_inode": 2, "link_count": 1}

    report = check(h, repair=True)
    assert report.exit_code == 1 and report.fixed == report.found, report.render()
    assert "created /lost+found" in report.notes
    assert ino_of(h, f"/lost+found/{f}") == f
    assert ino_of(h, f"/lost+found/{e}/inner")
    with db(h) as c:
        nlink = dict(c.execute("SELECT id, nlink FROM inodes").fetchall())
    assert nlink[f] == 1 and nlink[ROOT_INODE] == 4  # d, lost+found
    assert nlink[ino_of(h, "/lost+found")] == 3  # e
    assert read_back(h, f) == rand(1, 100 * KB)
    assert_clean(h, deep=True)


def test_link_counts_and_refcounts_are_recomputed(tmp_path):
    h = build(tmp_path, {"/f": rand(1, 100 * KB), "/d/g": rand(2, 100 * KB)}, {"/d/f2": "/f"})
    (fb,), (gb,) = blocks_of(h, "/f"), blocks_of(h, "/d/g")
    with db(h) as c:
        c.execute("UPDATE inodes SET nlink = 5 WHERE id = ?", (ino_of(h, "/f"),))
        c.execute("UPDATE inodes SET nlink = 9 WHERE id = ?", (ino_of(h, "/d"),))
        c.execute("UPDATE blocks SET refcount = 7 WHERE id = ?", (fb,))
        # refcount 0 since long ago: a garbage collector would delete a block still in use
        c.execute("UPDATE blocks SET refcount = 0, zero_since_ns = 1 WHERE id = ?", (gb,))

    report = check(h, grace_s=0)
    assert report.exit_code == 4
    assert found(report) == {"link_count": 2, "refcount": 2}
    assert any("link count 5, should be 2" in d for d in report.details["link_count"])
    assert any("refcount 7, 1 extents use it" in d for d in report.details["refcount"])

    report = check(h, repair=True, grace_s=0)
    assert report.exit_code == 1 and report.fixed == report.found
    with db(h) as c:
        refs = dict(c.execute("SELECT id, refcount FROM blocks").fetchall())
        nlink = dict(c.execute("SELECT id, nlink FROM inodes").fetchall())
        assert c.execute("SELECT zero_since_ns FROM blocks WHERE id = ?", (gb,)).fetchone() == (
            None,
        )
    assert refs == {fb: 1, gb: 1}
    assert nlink[ino_of(h, "/f")] == 2 and nlink[ino_of(h, "/d")] == 2
    assert holders(h, gb) == named(h, gb)  # still referenced, so never reclaimed
    assert_clean(h, grace_s=0, deep=True)


def test_extents_rows_and_unlinked_inodes(tmp_path):
    h = build(
        tmp_path,
        {"/f": rand(1, 100 * KB), "/g": rand(2, 100 * KB), "/h": rand(3, 100 * KB), "/u": b"u"},
    )
    (gb,), (hb,), (ub,) = blocks_of(h, "/g"), blocks_of(h, "/h"), blocks_of(h, "/u")
    f, hi, u = ino_of(h, "/f"), ino_of(h, "/h"), ino_of(h, "/u")
    with db(h) as c:
        c.execute("UPDATE inodes SET size = 1000 WHERE id = ?", (f,))  # extent past the size
        c.execute("DELETE FROM blocks WHERE id = ?", (gb,))  # row missing
        c.execute("INSERT INTO extents VALUES (?, 10, 100, ?)", (hi, hb))  # overlaps [0, 100K)
        c.execute("UPDATE blocks SET refcount = 2 WHERE id = ?", (hb,))
        # /u was unlinked while open, then the mount crashed
        c.execute("DELETE FROM dentries WHERE inode = ?", (u,))
        c.execute("UPDATE inodes SET nlink = 0 WHERE id = ?", (u,))

    report = check(h)
    assert report.exit_code == 4
    assert found(report) == {
        "extent_past_size": 1,
        "missing_block_row": 1,
        "extent_overlap": 1,
        "unlinked_inode": 1,
    }, report.render()

    report = check(h, repair=True)
    assert report.exit_code == 1 and report.fixed == report.found, report.render()
    with db(h) as c:
        assert c.execute("SELECT length FROM extents WHERE inode = ?", (f,)).fetchall() == [(1000,)]
        assert c.execute("SELECT size, refcount FROM blocks WHERE id = ?", (gb,)).fetchone() == (
            100 * KB,
            1,
        )
        q = "SELECT offset, length FROM extents WHERE inode = ?"
        assert c.execute(q, (hi,)).fetchall() == [(0, 10), (10, 100)]
        assert c.execute("SELECT id FROM inodes WHERE id = ?", (u,)).fetchone() is None
    assert read_back(h, f) == rand(1, 100 * KB)[:1000]
    report = assert_clean(h, deep=True)
    assert report.pending == 1  # /u's block: unreferenced just now, within the grace
    report = check(h, repair=True, grace_s=0)
    assert report.exit_code == 1 and found(report) == report.fixed == {"garbage_block": 1}
    assert holders(h, ub) == []
    assert assert_clean(h, grace_s=0).pending == 0


def test_damaged_database(tmp_path):
    h = build(tmp_path, {"/a": b"a"})
    with db(h) as c:  # make an index disagree with its table: integrity_check notices
        c.execute("PRAGMA writable_schema = ON")
        c.execute(
            "UPDATE sqlite_master SET sql = 'CREATE INDEX dentries_inode ON dentries(parent)'"
            " WHERE name = 'dentries_inode'"
        )
    for repair in (False, True):
        report = check(h, repair=repair)
        assert report.exit_code == 4 and found(report) == {"database_damaged": 1}
        assert any("--salvage" in n for n in report.notes)
    (h / "meta.db").write_bytes(b"not a database" * 1000)
    p = hafs("fsck", "--home", h, check=False)
    assert p.returncode == 8 and "damaged" in p.stderr and "--salvage" in p.stderr


def test_repair_is_refused_while_mounted_and_check_works(tmp_path):
    m = make_mount(tmp_path)
    meta = home.open_meta(m.home)  # a repair's session (as 'fsck --repair' holds): no mount
    session = meta.sessions.register("repair", "", 60)
    try:
        p = hafs("mount", "--home", m.home, m.mnt, check=False)
        assert p.returncode == 2 and not os.path.ismount(m.mnt), p
        assert "being repaired" in p.stderr
    finally:
        meta.sessions.end(session)
        meta.close()
        if os.path.ismount(m.mnt):
            m.stop()
    m.start()
    try:
        (m.mnt / "f").write_bytes(rand(1, 300 * KB))
        fd = os.open(m.mnt / "open-unlinked", os.O_WRONLY | os.O_CREAT)
        try:
            os.write(fd, b"still open")
            os.fsync(fd)
            os.unlink(m.mnt / "open-unlinked")
            p = hafs("fsck", "--home", m.home, "--repair", check=False)
            assert p.returncode == 8, p
            assert "in use (mount on" in p.stderr and "unmount every mount" in p.stderr
            assert len(p.stderr.strip().splitlines()) == 1
            p = hafs("fsck", "--home", m.home, "--json", "--deep", check=False)
            r = json.loads(p.stdout)
            assert p.returncode == 0, r
            assert r["mounted"] is True and r["problems"] == {}
            assert any("may still be open" in n for n in r["notes"])  # not a problem
        finally:
            os.close(fd)
    finally:
        m.stop()
    report = assert_clean(m.home, repair=True, deep=True)
    assert not report.mounted
    assert not m.bad_log_lines()


def test_dangling_entries_aliases_and_cycles(tmp_path):
    h = build(tmp_path, {"/a/b/f": b"f", "/c/g": b"g"})
    a, b, c = ino_of(h, "/a"), ino_of(h, "/a/b"), ino_of(h, "/c")
    with db(h) as conn:
        add = "INSERT INTO dentries (parent, name, inode) VALUES (?, ?, ?)"
        conn.execute(add, (ROOT_INODE, b"ghost", 99999))
        conn.execute(add, (ROOT_INODE, b"alias", c))  # a second name of directory /c
        conn.execute("UPDATE dentries SET parent = ? WHERE inode = ?", (b, a))  # a <-> b

    report = check(h)
    assert report.exit_code == 4
    assert found(report) == {
        "dangling_entry": 1,
        "extra_directory_entry": 1,
        "unreachable_directory": 2,
        "link_count": 1,  # /a/b gained a subdirectory
    }, report.render()
    assert "/ghost: inode 99999 is missing" in report.details["dangling_entry"]

    report = check(h, repair=True)
    assert report.exit_code == 1 and found(report) == report.fixed, report.render()
    assert ino_of(h, f"/lost+found/{a}/b/f") and ino_of(h, "/c/g")
    with db(h) as conn:
        assert conn.execute("SELECT count(*) FROM dentries WHERE inode = ?", (b,)).fetchone() == (
            1,
        )
    assert_clean(h)


def test_unavailable_node_is_reported_until_it_is_back(tmp_path):
    h = build(tmp_path, {f"/f{i}": rand(i, 50 * KB) for i in range(12)})
    on_n3 = sum("n3" in named(h, blocks_of(h, f"/f{i}")[0]) for i in range(12))
    assert on_n3
    (h / "nodes" / "n3").rename(tmp_path / "n3-away")

    for repair in (False, True):
        report = check(h, repair=repair)
        assert report.exit_code == 4, report.render()
        assert found(report) == {"node_unavailable": 1, "missing_replica": on_n3}
        assert "n3" in report.details["node_unavailable"][0]
        assert not report.fixed and not report.lost_paths

    (tmp_path / "n3-away").rename(h / "nodes" / "n3")
    assert_clean(h, repair=True, deep=True)


def test_rate_limits_replica_reads(tmp_path):
    h = build(tmp_path, {"/a": rand(1, 1024 * KB)})
    report = check(h, deep=True, rate_mib=4)
    assert report.stats["bytes_read"] == 2 * 1024 * KB  # both replicas
    assert report.phase_seconds["replicas"] >= 0.5 - 0.2  # 2 MiB at 4 MiB/s, less one read
    assert fsck.run(h, deep=True).phase_seconds["replicas"] < 0.3


def test_after_kill_9_of_the_mount_only_reclaimable_things_are_left(tmp_path):
    m = make_mount(tmp_path, options="gc_grace_s=3600,flush_mb=4")
    m.start()
    try:
        (m.mnt / "closed").write_bytes(rand(1, 2048 * KB))
        fd = os.open(m.mnt / "open-unlinked", os.O_WRONLY | os.O_CREAT)
        os.write(fd, rand(2, 300 * KB))
        os.fsync(fd)
        os.unlink(m.mnt / "open-unlinked")
        fd2 = os.open(m.mnt / "being-written", os.O_WRONLY | os.O_CREAT)
        for i in range(12):  # background flushes store (and commit) some of it
            os.write(fd2, rand(10 + i, 1024 * KB))
        os.kill(m.daemon_pid(), 9)
        for f in (fd, fd2):
            try:
                os.close(f)
            except OSError:
                pass
    finally:
        m.stop()
    reclaimable = {"unlinked_inode", "garbage_block", "stray_block"}
    report = check(m.home, grace_s=0)
    assert set(found(report)) <= reclaimable, report.render()
    assert found(report)["unlinked_inode"] == 1
    report = check(m.home, repair=True, grace_s=0)
    assert report.exit_code == 1 and report.fixed == report.found, report.render()
    assert_clean(m.home, grace_s=0, deep=True)
    m.start()
    try:
        assert (m.mnt / "closed").read_bytes() == rand(1, 2048 * KB)
        assert sorted(os.listdir(m.mnt)) == ["being-written", "closed"]
    finally:
        m.stop()
    assert not m.bad_log_lines()


def test_extra_copy_is_kept_while_a_named_copy_cannot_be_written(tmp_path, monkeypatch):
    h = build(tmp_path, {"/a": rand(1, 200 * KB)})
    (bid,) = blocks_of(h, "/a")
    full, kept = named(h, bid)
    other = ({"n1", "n2", "n3"} - {full, kept}).pop()
    block_file(h, full, bid).rename(block_file(h, other, bid))  # written elsewhere on failover

    real_put = DirStore.put

    def put(self, block_id, data):
        if self.node_id == full:
            raise OSError(28, "No space left on device")
        return real_put(self, block_id, data)

    monkeypatch.setattr(DirStore, "put", put)
    report = check(h, repair=True)
    assert report.exit_code == 4
    assert found(report) == {"missing_replica": 1, "misplaced_replica": 1} and not report.fixed
    assert holders(h, bid) == sorted([kept, other])  # the extra copy is still needed

    monkeypatch.setattr(DirStore, "put", real_put)
    report = check(h, repair=True)
    assert report.exit_code == 1 and report.fixed == report.found
    assert holders(h, bid) == sorted([full, kept])
    assert_clean(h, deep=True)


def test_a_check_reads_a_database_of_the_previous_schema_without_changing_it(tmp_path):
    h = build(tmp_path, {"/a": rand(3, 100 * KB)})
    d = db(h)
    d.executescript("DROP TABLE degraded; PRAGMA user_version = 2;")  # as schema 2 left it
    d.close()
    report = fsck.run(h)
    assert report.exit_code == 0 and not found(report)
    assert db(h).execute("PRAGMA user_version").fetchone()[0] == 2  # a check writes nothing


def test_metadata_phase_on_a_kv_engine():
    """Phase 2 through the engine interface alone: a KvMeta over MemKV, damaged through
    the KV itself (an entry naming no inode, a wrong refcount, a file's only name lost)."""
    from metacheck import assert_consistent

    from hafs.meta import Extent, FsConfig
    from hafs.meta.kv import KvMeta, k_block, k_entry, k_name, u64
    from hafs.meta.memkv import MemKV

    kv = MemKV()
    meta = KvMeta.create(kv, FsConfig("u", 2, 1, None, 1), {"version": 1, "nodes": []}, 0, 0)
    data = rand(1, 5000)
    bid = block_id(data)
    d = meta.mknod(ROOT_INODE, b"d", 0o40755, 0, 0)
    inos = []
    for parent, name in ((ROOT_INODE, b"f"), (d.id, b"g")):
        ino = meta.mknod(parent, name, 0o100644, 0, 0).id
        meta.commit(ino, 0, len(data), [Extent(0, len(data), bid)], {bid: len(data)}, 5000, 1)
        inos.append(ino)
    g = inos[1]
    assert_consistent(meta)
    (row,) = meta.scan_blocks("", 10)
    wrong = row.size.to_bytes(8, "big") + (7).to_bytes(8, "big", signed=True) + b"\xff" * 8
    kv.commit({}, {k_entry(ROOT_INODE, b"ghost"): u64(99999), k_block(bid): wrong}, ())
    kv.commit({}, {}, [k_entry(d.id, b"g"), k_name(g, d.id, b"g")])

    def phase2(repair: bool) -> fsck.Report:
        report = fsck.Report("memkv", repair, False, 0.0)
        fsck.Checker(meta, report).check_metadata()
        return report

    damage = {"dangling_entry": 1, "refcount": 1, "orphan_inode": 1}
    report = phase2(False)
    assert found(report) == damage, report.render()
    assert "/ghost: inode 99999 is missing" in report.details["dangling_entry"]
    assert "refcount 7, 2 extents use it" in report.details["refcount"][0]
    assert report.stats["inodes"] == 4 and report.stats["extents"] == 2
    report = phase2(True)
    assert found(report) == damage and report.fixed == report.found, report.render()
    lost = meta.lookup(ROOT_INODE, b"lost+found")
    assert meta.lookup(lost.id, str(g).encode()).id == g
    assert meta.lookup(ROOT_INODE, b"ghost") is None
    assert_consistent(meta)
    assert not found(phase2(False))
