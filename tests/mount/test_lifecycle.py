"""Mount lifecycle: remount, kill -9, replicas on disk, dedup and space, bad input."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import Mount, hafs, make_mount

from hafs.meta.sqlite import SqliteMeta
from hafs.mount import parse_options
from hafs.store.chunker import MiB
from hafs.store.ring import Ring


@pytest.fixture
def fresh(tmp_path):
    m = make_mount(tmp_path)
    m.start()
    try:
        yield m
    finally:
        m.stop()
    bad = m.bad_log_lines(allowed=(" ERROR ",))  # error lines are some tests' subject
    assert not bad, "unexpected tracebacks in the daemon's log:\n" + "\n".join(bad[:20])


def block_files(m: Mount) -> dict[str, list[Path]]:
    """block id -> the backing directories holding it."""
    out: dict[str, list[Path]] = {}
    for node in m.node_dirs():
        for f in (node / "blocks").rglob("*"):
            if f.is_file():
                out.setdefault(f.name, []).append(node)
    return out


def test_remount_keeps_everything(fresh, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}").write_bytes(random.Random(i).randbytes(i * 100_000))
    subprocess.run(["cp", "-a", str(src), str(fresh.mnt / "t")], check=True)
    fresh.stop()
    fresh.start()
    assert subprocess.run(["diff", "-r", str(src), str(fresh.mnt / "t")]).returncode == 0


def ring_of(m: Mount) -> Ring:
    meta = SqliteMeta.open(m.home / "meta.db")
    try:
        return Ring.from_json(meta.ring())
    finally:
        meta.close()


def test_every_block_on_exactly_r_nodes_where_the_ring_says(fresh):
    for i in range(10):
        (fresh.mnt / f"f{i}").write_bytes(os.urandom(random.Random(i).randrange(1, 3 * MiB)))
    meta = SqliteMeta.open(fresh.home / "meta.db")
    try:
        ring = Ring.from_json(meta.ring())
        referenced = {r[0] for r in meta.db.execute("SELECT block_id FROM extents")}
    finally:
        meta.close()
    on_disk = block_files(fresh)
    assert referenced and referenced <= set(on_disk)
    for bid in referenced:
        holders = sorted(p.name for p in on_disk[bid])
        assert holders == sorted(ring.replicas(bid, 2)), bid


def test_dedup_and_space_comes_back(fresh):
    data = os.urandom(8 * MiB)
    (fresh.mnt / "a").write_bytes(data)
    blocks_one = set(block_files(fresh))
    (fresh.mnt / "b").write_bytes(data)  # identical content: no new block
    assert set(block_files(fresh)) == blocks_one
    st = hafs("status", "--home", fresh.home, "--json")
    import json

    report = json.loads(st.stdout)
    assert report["logical_bytes"] == 16 * MiB and report["stored_bytes"] == 8 * MiB
    os.unlink(fresh.mnt / "a")
    assert set(block_files(fresh)) == blocks_one  # still referenced by b
    os.truncate(fresh.mnt / "b", 0)
    deadline = time.monotonic() + 20  # the mount collects garbage every second (grace 0)
    while block_files(fresh) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert block_files(fresh) == {}


def test_kill_9_and_remount(fresh):
    done = os.urandom(5 * MiB)
    (fresh.mnt / "closed").write_bytes(done)
    fd = os.open(fresh.mnt / "synced", os.O_WRONLY | os.O_CREAT)
    os.write(fd, done[:MiB])
    os.fsync(fd)
    os.write(fd, b"never synced")  # may be lost
    pid = fresh.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            time.sleep(0.05)
        except ProcessLookupError:
            break
    try:
        os.close(fd)
    except OSError:
        pass
    with pytest.raises(OSError):  # the dead mount: "Transport endpoint is not connected"
        os.stat(fresh.mnt)
    fresh.start()  # no manual step: the dead mountpoint is detected and detached
    assert (fresh.mnt / "closed").read_bytes() == done
    assert (fresh.mnt / "synced").read_bytes()[:MiB] == done[:MiB]


def _kill_9(pid: int) -> None:
    """SIGKILL the daemon and wait until it is gone (nothing asks the mount meanwhile)."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1][0] == "Z":
                    return
        except (OSError, IndexError):
            return
        time.sleep(0.01)
    raise AssertionError(f"daemon {pid} still runs 10 s after SIGKILL")


def test_remount_at_once_after_kill_9_every_time(fresh):
    """The kernel may answer a stat of the dead mount's root from its cache; `hafs mount`
    right after the kill must detach the dead mount by its daemon's pid, not by a stat."""
    written = {}
    for round_ in range(5):
        name = f"round-{round_}"
        written[name] = os.urandom(300_000 + round_)
        with open(fresh.mnt / name, "wb") as f:
            f.write(written[name])
            f.flush()
            os.fsync(f.fileno())
        os.stat(fresh.mnt)  # the root's attributes are now in the kernel's cache
        _kill_9(fresh.daemon_pid())
        fresh.start()  # at once: no wait, no manual step
        assert {n: (fresh.mnt / n).read_bytes() for n in written} == written
        assert len(subprocess.check_output(["findmnt", "-n", str(fresh.mnt)]).splitlines()) == 1


def test_files_closed_by_parallel_writers_survive_kill_9_right_after(fresh):
    """Closes that share grouped flushes (hafs.store.syncer) each return durable: every
    file closed before the SIGKILL is whole after the remount."""
    written = {f"w{w}-{i}": os.urandom(4096 + w * 100 + i) for w in range(8) for i in range(25)}

    def writer(w: int) -> None:
        for name, data in written.items():
            if name.startswith(f"w{w}-"):
                with open(fresh.mnt / name, "wb") as f:
                    f.write(data)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _kill_9(fresh.daemon_pid())
    fresh.start()
    assert {n: (fresh.mnt / n).read_bytes() for n in written} == written


def test_mount_refuses_a_live_mount_and_another_filesystem(fresh, tmp_path):
    pid = fresh.daemon_pid()
    p = hafs("mount", "--home", fresh.home, fresh.mnt, check=False)
    assert p.returncode == 2 and f"served there by daemon {pid}" in p.stderr, p.stderr
    assert os.path.ismount(fresh.mnt) and (fresh.mnt / ".").stat()  # still served
    other = tmp_path / "other"
    other.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(other)], check=True)
    try:
        _fails("mount", "--home", fresh.home, other, expect="is already a mountpoint (tmpfs")
    finally:
        subprocess.run(["umount", str(other)], check=True)


def test_ctrl_c_in_foreground_unmounts_cleanly(tmp_path):
    m = make_mount(tmp_path)
    proc = subprocess.Popen(
        ["python3", "-m", "hafs", "mount", "--foreground", "--home", str(m.home), str(m.mnt)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(m.mnt):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        fd = os.open(m.mnt / "f", os.O_WRONLY | os.O_CREAT)
        os.write(fd, b"buffered, then Ctrl-C")
        os.close(fd)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert not os.path.ismount(m.mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["fusermount3", "-u", "-z", str(m.mnt)], capture_output=True)
    m.start()
    try:
        assert (m.mnt / "f").read_bytes() == b"buffered, then Ctrl-C"
    finally:
        m.stop()


# ------------------------------------------------------------------ bad input


def _fails(*args, expect: str) -> str:
    p = hafs(*args, check=False)
    assert p.returncode == 2, p
    assert expect in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    return p.stderr


def test_bad_mountpoints(tmp_path):
    m = make_mount(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").touch()
    _fails("mount", "--home", m.home, tmp_path / "full", expect="not empty")
    _fails("mount", "--home", m.home, tmp_path / "nope", expect="does not exist")
    _fails("mount", "--home", m.home, "-o", "bogus=1", m.mnt, expect="unknown mount option")
    _fails("mount", "--home", m.home, "-o", "allow_other=maybe", m.mnt, expect="is a flag")
    _fails("mount", "--home", tmp_path / "nohome", m.mnt, expect="hafs mkfs")
    assert os.listdir(tmp_path / "full") == ["x"] and not os.path.ismount(tmp_path / "full")
    assert not (tmp_path / "nope").exists() and not (tmp_path / "nohome").exists()
    assert not os.path.ismount(m.mnt)
    m.start()
    try:
        pid = m.daemon_pid()
        _fails("mount", "--home", m.home, m.mnt, expect="already")
        assert os.path.ismount(m.mnt) and m.daemon_pid() == pid  # the first mount serves on
    finally:
        m.stop()


def test_flag_options_take_1_and_0():
    for text, flags in [
        ("allow_other", {"allow_other"}),
        ("allow_other=1", {"allow_other"}),
        ("allow_other=true,allow_root=0", {"allow_other"}),
        ("threads=4,allow_root=off", set()),
    ]:
        assert parse_options(text)[1] == flags, text
    assert parse_options("threads=4,allow_other=1")[0].threads == 4


def test_foreign_and_missing_backing_directories(tmp_path):
    a = make_mount(tmp_path / "a")
    b = make_mount(tmp_path / "b")
    a_nodes = a.node_dirs()
    # swap one node directory of a for one of b: identity mismatch
    os.rename(a_nodes[0], tmp_path / "saved")
    os.rename(b.node_dirs()[0], a_nodes[0])
    _fails("mount", "--home", a.home, a.mnt, expect="belongs to")
    assert not os.path.ismount(a.mnt)
    os.rename(a_nodes[0], tmp_path / "b_node")
    _fails("mount", "--home", a.home, a.mnt, expect="missing")
    os.rename(tmp_path / "saved", a_nodes[0])
    a.start()
    a.stop()


def test_corrupt_and_newer_metadata(tmp_path):
    m = make_mount(tmp_path)
    db = sqlite3.connect(m.home / "meta.db")
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    before = (m.home / "meta.db").read_bytes()
    _fails("mount", "--home", m.home, m.mnt, expect="newer")
    assert (m.home / "meta.db").read_bytes() == before
    (m.home / "meta.db").write_bytes(b"garbage" * 1000)
    _fails("mount", "--home", m.home, m.mnt, expect="damaged")
    assert not os.path.ismount(m.mnt)


def test_mkfs_refuses_existing(tmp_path):
    make_mount(tmp_path)
    before = (tmp_path / "home" / "meta.db").read_bytes()
    _fails("mkfs", "--home", tmp_path / "home", expect="already holds")
    assert (tmp_path / "home" / "meta.db").read_bytes() == before
    _fails("mkfs", "--home", tmp_path / "x", "--replicas", "4", expect="--replicas 4")
    assert not (tmp_path / "x").exists()  # refused before anything was made


def test_corrupt_replica_is_never_returned(fresh):
    data = os.urandom(2 * MiB)
    (fresh.mnt / "f").write_bytes(data)
    fresh.stop()  # a cold block cache
    ring = ring_of(fresh)
    flipped = 0
    for bid in block_files(fresh):
        preferred = ring.replicas(bid, 2)[0]  # the copy a read tries first
        path = fresh.home / "nodes" / preferred / "blocks" / bid[:2] / bid
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(raw)
        flipped += 1
    assert flipped
    fresh.start()
    assert (fresh.mnt / "f").read_bytes() == data  # served by the other replica
    log = fresh.log.read_text()
    assert log.count("BLOCK-CORRUPT") >= flipped
    assert not fresh.bad_log_lines()


def test_every_copy_corrupt_is_eio_not_wrong_bytes(fresh):
    (fresh.mnt / "f").write_bytes(os.urandom(100_000))
    fresh.stop()
    for bid, holders in block_files(fresh).items():
        for node in holders:
            path = node / "blocks" / bid[:2] / bid
            raw = bytearray(path.read_bytes())
            raw[0] ^= 1
            path.write_bytes(raw)
    fresh.start()
    with pytest.raises(OSError) as e:
        (fresh.mnt / "f").read_bytes()
    assert e.value.errno == 5  # EIO
    assert "is missing" in fresh.log.read_text()  # the block is named in the log
