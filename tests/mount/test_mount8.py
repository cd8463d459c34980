"""hafs through mount(8), umount(8), fstab (`mount -T FILE`) and fsck(8), as an admin uses it.

These need root and /sbin/mount.hafs (`hafs install-helpers`, in the README's
set-up); mount(8) runs that helper with PYTHONPATH pointing at this checkout,
so the code under test is this tree's.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Mount, _wait_gone, make_mount
from conftest import hafs as run_hafs

import hafs
from hafs.errors import UserError
from hafs.helpers import HELPER_DIR, parse_source, split_generic

ENV = {**os.environ, "PYTHONPATH": str(Path(hafs.__file__).parents[1])}

needs_mount8 = pytest.mark.skipif(
    os.geteuid() != 0 or not (HELPER_DIR / "mount.hafs").exists(),
    reason="needs root and /sbin/mount.hafs: run 'hafs install-helpers'",
)


def run(
    *cmd: str | Path, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    argv = list(map(str, cmd))
    p = subprocess.run(argv, capture_output=True, text=True, env=env or ENV, timeout=120)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {p.returncode}:\n{p.stderr}")
    return p


def options_of(mnt: Path) -> set[str]:
    return set(run("findmnt", "-n", "-o", "OPTIONS", mnt).stdout.strip().split(","))


def plain_umount(m: Mount) -> None:
    """`umount MNT` (umount(8), no hafs involved), then the daemon exits by itself."""
    pid = m.daemon_pid()
    run("umount", m.mnt)
    assert pid is not None and _wait_gone(pid, 30), "the daemon did not exit after umount"
    assert not os.path.ismount(m.mnt)


# ------------------------------------------------------------ without a mount


def test_generic_options_are_split_from_hafs_options():
    generic, rest = split_generic("rw,relatime,cache_mb=32,_netdev,nosuid,noexec,x-systemd.a=b")
    assert rest == "cache_mb=32"
    assert not generic.read_only
    assert generic.fuse_options() == {"rw", "noatime", "nosuid", "noexec"}
    generic, rest = split_generic("defaults,noauto,user,nouser,ro")
    assert (generic.read_only, rest) == (True, "")
    assert "ro" in generic.fuse_options() and "rw" not in generic.fuse_options()


def test_source_must_be_a_home(tmp_path):
    with pytest.raises(UserError, match="no hafs filesystem there"):
        parse_source(str(tmp_path))
    with pytest.raises(UserError, match="home directory"):
        parse_source("etcd://h1:2379/fs")
    run_hafs("mkfs", "--home", tmp_path / "h")
    assert parse_source(str(tmp_path / "h")) == tmp_path / "h"


def test_install_helpers_writes_scripts_that_run(tmp_path):
    out = run_hafs("install-helpers", "--dir", tmp_path).stdout
    assert str(tmp_path / "mount.hafs") in out and str(tmp_path / "fsck.hafs") in out
    for name in ("mount.hafs", "fsck.hafs"):
        assert os.access(tmp_path / name, os.X_OK)
        p = run(tmp_path / name, "--help")
        assert p.stdout.startswith(f"usage: {name}")
    p = run_hafs("install-helpers", "--dir", tmp_path / "f" / "g", check=False)
    assert p.returncode == 2 and "cannot write into" in p.stderr


@needs_mount8
def test_mount_helper_refuses_bad_input_before_mounting(tmp_path):
    m = make_mount(tmp_path)
    p = run(HELPER_DIR / "mount.hafs", tmp_path / "nowhere", m.mnt, check=False)
    assert p.returncode == 32 and "no hafs filesystem there" in p.stderr
    p = run(HELPER_DIR / "mount.hafs", m.home, m.mnt, "-o", "cache_mb=x", check=False)
    assert p.returncode == 32 and "cache_mb" in p.stderr
    p = run(HELPER_DIR / "mount.hafs", m.home, m.mnt, "-o", "bogus", check=False)
    assert p.returncode == 32 and "unknown mount option 'bogus'" in p.stderr
    run(HELPER_DIR / "mount.hafs", m.home, m.mnt, "-f", "-s", "-o", "bogus,ro")  # fake, sloppy
    assert not os.path.ismount(m.mnt)


# ------------------------------------------------------------------- mount(8)


@needs_mount8
def test_mount_t_hafs_and_plain_umount(tmp_path):
    m = make_mount(tmp_path)
    try:
        run("mount", "-t", "hafs", m.home, m.mnt, "-o", "cache_mb=32,nosuid,nodev,noexec")
        assert {"rw", "noatime", "nosuid", "nodev", "noexec"} <= options_of(m.mnt)
        assert run("findmnt", "-n", "-o", "FSTYPE,SOURCE", m.mnt).stdout.split() == [
            "fuse.hafs",
            f"hafs:{m.home}",
        ]
        data = os.urandom(3 << 20)
        (m.mnt / "f").write_bytes(data)
        (m.mnt / "d").mkdir()
        plain_umount(m)
        assert "unmounted" in m.log.read_text()
        run("mount", "-t", "hafs", m.home, m.mnt)
        assert (m.mnt / "f").read_bytes() == data and (m.mnt / "d").is_dir()
        plain_umount(m)
    finally:
        m.stop()
    assert not m.bad_log_lines()


@needs_mount8
def test_fstab_line_through_mount_T_and_fsck(tmp_path):
    m = make_mount(tmp_path)
    fstab = tmp_path / "fstab"
    fstab.write_text(
        f"{m.home} {m.mnt} hafs defaults,_netdev,noauto,relatime,noexec,cache_mb=32 0 2\n"
    )
    try:
        run("mount", "-T", fstab, m.mnt)
        assert {"rw", "noatime", "noexec"} <= options_of(m.mnt)
        (m.mnt / "f").write_text("from fstab\n")
        plain_umount(m)
        # fsck(8) finds the entry in the fstab and runs fsck.hafs -n SOURCE
        p = run("fsck", "-n", m.mnt, env={**ENV, "FSTAB_FILE": str(fstab)}, check=False)
        assert p.returncode == 0, p.stdout + p.stderr
        assert f"hafs fsck {m.home}" in p.stdout and "clean" in p.stdout
        p = run("fsck", "-t", "hafs", "-n", m.home, check=False)
        assert p.returncode == 0 and "clean" in p.stdout
        p = run(HELPER_DIR / "fsck.hafs", "-n", tmp_path / "nowhere", check=False)
        assert p.returncode == 8 and "no hafs filesystem there" in p.stderr
        run("mount", "-T", fstab, m.mnt)
        assert (m.mnt / "f").read_text() == "from fstab\n"
    finally:
        m.stop()
    assert not m.bad_log_lines()


def snapshot(home: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every file of the filesystem in `home`.

    Left out: the log, the pid files and SQLite's coordination files (-shm,
    and the -wal, which a reader creates empty when it is missing).
    """
    out = {}
    for p in sorted(home.rglob("*")):
        rel = str(p.relative_to(home))
        if p.is_file() and rel not in ("hafs.log", "meta.db-shm", "meta.db-wal"):
            if not rel.startswith("run/"):
                out[rel] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


@needs_mount8
def test_ro_refuses_every_write_and_changes_nothing(tmp_path):
    m = make_mount(tmp_path, options="")  # gc_grace_s 600: the deleted file's blocks wait
    m.start()
    try:
        (m.mnt / "d").mkdir()
        (m.mnt / "d" / "f").write_bytes(b"x" * 100_000)
        (m.mnt / "gone").write_bytes(os.urandom(1 << 20))
        os.setxattr(m.mnt / "d" / "f", "user.k", b"v")
        os.symlink("f", m.mnt / "d" / "s")
        (m.mnt / "gone").unlink()  # garbage a collection would delete with gc_grace_s=0
        m.stop()
        before = snapshot(m.home)
        wal = m.home / "meta.db-wal"
        assert not wal.exists()  # a clean unmount folded it into meta.db

        run("mount", "-t", "hafs", m.home, m.mnt, "-o", "ro,gc_grace_s=0,gc_interval_s=1")
        assert "ro" in options_of(m.mnt)
        f, d = m.mnt / "d" / "f", m.mnt / "d"
        assert f.read_bytes() == b"x" * 100_000 and os.getxattr(f, "user.k") == b"v"
        writes = {
            "create": lambda: open(d / "new", "w"),
            "open for writing": lambda: open(f, "r+b"),
            "truncate": lambda: os.truncate(f, 0),
            "mkdir": lambda: os.mkdir(d / "sub"),
            "rmdir": lambda: os.rmdir(d),
            "unlink": lambda: os.unlink(f),
            "rename": lambda: os.rename(f, d / "g"),
            "symlink": lambda: os.symlink("f", d / "t"),
            "link": lambda: os.link(f, d / "h"),
            "chmod": lambda: os.chmod(f, 0o600),
            "chown": lambda: os.chown(f, 1, 1),
            "utime": lambda: os.utime(f, (1, 1)),
            "setxattr": lambda: os.setxattr(f, "user.k", b"w"),
            "removexattr": lambda: os.removexattr(f, "user.k"),
            "mknod": lambda: os.mkfifo(d / "fifo"),
        }
        for what, write in writes.items():
            with pytest.raises(OSError) as e:
                write()
            assert e.value.errno == errno.EROFS, f"{what}: {e.value}"
        time.sleep(2.5)  # two rounds of garbage collection, if it ran
        plain_umount(m)
        assert snapshot(m.home) == before
        assert not wal.exists() or wal.stat().st_size == 0
        assert "read-only" in m.log.read_text()
    finally:
        m.stop()
    assert not m.bad_log_lines()


# ----------------------------------------------------------------------- logs


def test_sighup_reopens_the_log_and_keeps_the_mount(tmp_path):
    m = make_mount(tmp_path)
    logfile = tmp_path / "logs" / "mount.log"
    logfile.parent.mkdir()
    try:
        run_hafs("mount", "--home", m.home, "--log", logfile, m.mnt)
        assert "mounting" in logfile.read_text()
        logfile.rename(logfile.with_suffix(".log.1"))  # what logrotate does
        pid = m.daemon_pid()
        os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not logfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "LOG-REOPENED" in logfile.read_text()
        assert os.path.ismount(m.mnt)
        (m.mnt / "f").write_text("still mounted\n")
        assert (m.mnt / "f").read_text() == "still mounted\n"
        run_hafs("umount", m.mnt)
        assert "unmounted" in logfile.read_text()
        assert "unmounted" not in logfile.with_suffix(".log.1").read_text()
        assert not m.log.exists()  # --log replaced HOME/hafs.log
    finally:
        m.stop()
