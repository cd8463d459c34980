"""Mount sessions: a mount that dies with a file it unlinked while open leaves that file
to another mount, which deletes it (and its blocks) once the dead session is reaped."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time

from conftest import Mount, hafs

from hafs import home

OPTS = "gc_grace_s=0,gc_interval_s=1,lock_ttl_s=2,lock_wait_s=20"


def test_a_dead_mounts_unlinked_open_file_is_deleted_by_another_mount(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    hafs("mkfs", "--home", tmp_path / "home")
    a = Mount(tmp_path / "home", tmp_path / "a", OPTS)
    b = Mount(tmp_path / "home", tmp_path / "b", OPTS)
    a.start()
    try:
        b.start()
        try:
            status = json.loads(hafs("status", "--home", a.home, "--json").stdout)
            assert sorted(m["mountpoint"] for m in status["mounts"]) == [str(a.mnt), str(b.mnt)]
            fd = os.open(a.mnt / "f", os.O_RDWR | os.O_CREAT)
            os.write(fd, os.urandom(2_000_000))
            os.fsync(fd)
            ino = os.fstat(fd).st_ino
            os.unlink(a.mnt / "f")
            meta = home.open_meta(a.home)
            try:
                assert meta.getattr(ino).nlink == 0
                blocks = {e.block_id for e in meta.extents(ino, 0, 2**40)}
                assert blocks
                os.kill(a.daemon_pid(), signal.SIGKILL)  # dies with the file open
                deadline = time.monotonic() + 20
                while meta.getattr(ino) is not None:
                    assert time.monotonic() < deadline, "the dead mount's file was kept"
                    time.sleep(0.2)
                while meta.scan_blocks("", 1000):  # and its blocks collected
                    assert time.monotonic() < deadline, "its blocks were not collected"
                    time.sleep(0.2)
                alive = [s.mountpoint for s in meta.sessions.alive()]
                assert alive == [str(b.mnt)]
            finally:
                meta.close()
            with contextlib.suppress(OSError):  # its mount is dead
                os.close(fd)
        finally:
            b.stop()
    finally:
        a.stop()
    assert "SESSION-ENDED of the mount at" in a.log.read_text()
    p = hafs("fsck", "--home", a.home, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
