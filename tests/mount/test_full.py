"""A full filesystem: ENOSPC (not EIO) for the writer, `df` says full, nothing written is lost.

The mount's three backing directories are small tmpfs mounts (R=2), mounted
here and unmounted always; the log must hold no traceback or exception group.
"""

from __future__ import annotations

import errno
import os
import subprocess

import pytest
from conftest import Mount, hafs

from hafs.store.chunker import MiB

TMPFS_MB = 8
# Log lines a full disk causes on purpose.
EXPECTED = ("BLOCK-WRITE-FAILED", "storing bytes", "background flush")


@pytest.fixture
def small_disks(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting tmpfs needs root")
    mounted = []
    try:
        for i in range(3):
            d = tmp_path / f"disk{i + 1}"
            d.mkdir()
            cmd = ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m", "tmpfs", str(d)]
            subprocess.run(cmd, check=True)
            mounted.append(d)
        yield mounted
    finally:
        for d in mounted:
            subprocess.run(["umount", "-l", str(d)], check=False)


def write_until_an_error(path, limit_mb: int) -> OSError | None:
    """Write `limit_mb` MiB, fsync and close; the first error (write, fsync or close)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    error = None
    try:
        for _ in range(limit_mb):
            os.write(fd, os.urandom(MiB))
        os.fsync(fd)
    except OSError as e:
        error = e
    finally:
        try:
            os.close(fd)
        except OSError as e:
            error = error or e
    return error


def test_writing_past_the_space_is_enospc_and_df_says_full(tmp_path, small_disks):
    home, mnt = tmp_path / "home", tmp_path / "mnt"
    mnt.mkdir()
    nodes = [arg for d in small_disks for arg in ("--node", d)]
    hafs("mkfs", "--home", home, "--replicas", "2", *nodes)
    m = Mount(home, mnt, "gc_grace_s=3600")
    m.start()
    try:
        kept = os.urandom(2 * MiB)
        (mnt / "kept").write_bytes(kept)
        assert os.statvfs(mnt).f_bavail > 0
        # 3 disks of 8 MiB, 2 copies each: about 12 MiB fit, 64 do not
        error = write_until_an_error(mnt / "big", 64)
        assert error is not None and error.errno == errno.ENOSPC, error
        st = os.statvfs(mnt)
        assert st.f_bavail == 0 and st.f_bfree == 0, "df says the filesystem is full"
        assert (mnt / "kept").read_bytes() == kept
        error = write_until_an_error(mnt / "more", 8)  # still full: ENOSPC again, not EIO
        assert error is not None and error.errno == errno.ENOSPC, error
        m.stop()
        m.start()
        assert (mnt / "kept").read_bytes() == kept, "what was written survives a remount"
    finally:
        m.stop()
    log = m.log.read_text()
    assert "Traceback" not in log and "unexpected error" not in log and "Group" not in log
    assert "no space in" in log
    bad = m.bad_log_lines(allowed=EXPECTED)
    assert not bad, "unexpected errors in the daemon's log:\n" + "\n".join(bad[:20])
