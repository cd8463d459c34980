"""df, df -i and stat -f on a real mount tell what this filesystem stores."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from conftest import make_mount

from hafs.store.chunker import MiB


def df(mnt, inodes: bool = False) -> dict[str, int]:
    """The figures `df` shows for `mnt` (bytes, or inodes as `df -i`), by column name."""
    cols = "itotal,iused,iavail" if inodes else "size,used,avail"
    out = subprocess.run(
        ["df", "-B1", f"--output={cols}", str(mnt)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    values = out.stdout.splitlines()[1].split()
    return dict(zip(cols.split(","), map(int, values), strict=True))


@pytest.fixture
def mount(tmp_path):
    m = make_mount(tmp_path, "gc_interval_s=3600")
    m.start()
    try:
        yield m
    finally:
        m.stop()
    assert not m.bad_log_lines()


def test_df_used_is_what_was_stored_once(mount):
    before = df(mount.mnt)
    assert before["used"] == 0  # an empty filesystem stores nothing, whatever the disk holds
    data = os.urandom(5 * MiB + 1000)
    (mount.mnt / "a").write_bytes(data)
    after = df(mount.mnt)
    assert after["used"] == len(data) + 4096 - len(data) % 4096  # in whole 4 KiB units
    # df's arithmetic holds: Size = Used + Avail (statvfs: f_blocks - f_bfree = used)
    st = os.statvfs(mount.mnt)
    assert (st.f_blocks - st.f_bfree) * st.f_frsize == after["used"]
    assert after["size"] == after["used"] + after["avail"]
    # Avail is the backing disk's free space / R (the three nodes share one disk here)
    node = os.statvfs(mount.node_dirs()[0])
    assert st.f_bavail * st.f_frsize == pytest.approx(node.f_bavail * node.f_frsize / 2, rel=0.05)
    # a copy of the same bytes is stored once: Used does not grow
    shutil.copyfile(mount.mnt / "a", mount.mnt / "b")
    assert df(mount.mnt)["used"] == after["used"]
    # Used counts one copy (the bytes users stored), not R copies
    on_disk = sum(f.stat().st_size for d in mount.node_dirs() for f in d.rglob("*") if f.is_file())
    assert on_disk >= 2 * len(data) > after["used"]


def test_df_inodes_count_the_files(mount):
    before = df(mount.mnt, inodes=True)
    assert before["iused"] == 1  # the root directory
    (mount.mnt / "d").mkdir()
    for i in range(9):
        (mount.mnt / "d" / f"f{i}").write_bytes(b"x")
    after = df(mount.mnt, inodes=True)
    assert after["iused"] == 11
    assert after["itotal"] == after["iused"] + after["iavail"]
    assert after["iavail"] == before["iavail"] > 0
    os.unlink(mount.mnt / "d" / "f0")
    assert df(mount.mnt, inodes=True)["iused"] == 10


def test_stat_f_shows_the_filesystem(mount):
    out = subprocess.run(
        ["stat", "-f", "-c", "%i %l %S %b %f", str(mount.mnt)], capture_output=True, text=True
    )
    fsid, namemax, bsize, blocks, free = out.stdout.split()
    assert (int(namemax), int(bsize)) == (255, 4096) and int(blocks) >= int(free) > 0
    # FUSE's statfs reply has no filesystem id: the kernel reports 0 (README, "df")
    assert int(fsid, 16) == 0
