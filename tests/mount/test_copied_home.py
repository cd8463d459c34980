"""A copied home can never destroy the original's data (hafs.store.owner).

`cp -a home copy` makes a second metadata store naming the same backing
directories; the original then writes new files, whose blocks the copy has never
heard of (strays to it).  Every command of the copy that would change the nodes is
refused with one message; the original keeps every byte.  `hafs node adopt`
makes the copy the filesystem: the original is locked out, and its running mount
deletes nothing more.  A home moved with `mv` keeps working.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from conftest import Mount, hafs, make_mount

from hafs import home as home_mod
from hafs.store.dirstore import block_id
from hafs.store.ring import Ring

COPY = "is a copy of the metadata at"


def write_files(root: Path, names: list[str], seed: int) -> dict[str, bytes]:
    out = {}
    for i, name in enumerate(names):
        data = (seed * 1000 + i).to_bytes(4, "big") * 50_000  # 200 KB: one block each
        (root / name).write_bytes(data)
        out[name] = data
    return out


def check_files(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (root / name).read_bytes() == data, name


def ring_of(h: Path) -> Ring:
    meta = home_mod.open_meta(h)
    try:
        return Ring.from_json(meta.ring())
    finally:
        meta.close()


def block_files(m: Mount) -> set[str]:
    return {f.name for d in m.node_dirs() for f in (d / "blocks").rglob("*") if f.is_file()}


def copied(tmp_path: Path, seed: int) -> tuple[Mount, Path, dict[str, bytes]]:
    """A filesystem (mounted again after) holding files a and b, and `cp -a` of its home."""
    m = make_mount(tmp_path)  # garbage is collected every second, at once
    m.start()
    try:
        files = write_files(m.mnt, ["a", "b"], seed)
    finally:
        m.stop()
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(m.home), str(copy)], check=True)
    m.start()
    return m, copy, files


def test_a_copy_refuses_to_change_the_nodes_and_the_original_keeps_every_byte(tmp_path):
    m, copy, old = copied(tmp_path, seed=1)
    try:  # the original goes on: new blocks the copy does not know
        new = write_files(m.mnt, ["c", "d"], seed=2)
        os.unlink(m.mnt / "a")  # garbage to the original, still a file of the copy
        del old["a"]
    finally:
        m.stop()
    strays = {block_id(d) for d in new.values()}
    assert strays <= block_files(m)

    mnt2 = tmp_path / "mnt2"
    mnt2.mkdir()
    for args, code in [
        (["fsck", "--home", copy, "--repair", "--grace", "0"], 8),
        (["mount", "--home", copy, mnt2], 2),
        (["rebalance", "--home", copy], 2),
        (["node", "remove", "--home", copy, "n1"], 2),
        (["node", "add", "--home", copy, tmp_path / "n4"], 2),
    ]:
        p = hafs(*args, check=False)
        assert p.returncode == code, (args, p.stdout, p.stderr)
        assert COPY in p.stderr and str(m.home / "meta.db") in p.stderr, p.stderr
        assert "hafs node adopt" in p.stderr and "'hafs mkfs'" in p.stderr
    assert not (tmp_path / "n4").exists()
    assert strays <= block_files(m), "the copy deleted the original's blocks"

    # A check of the copy says why it sees strays; a read-only mount of it reads.
    p = hafs("fsck", "--home", copy, "--grace", "0", check=False)
    assert f"note: this metadata {COPY} {m.home / 'meta.db'}" in p.stdout, p.stdout
    hafs("mount", "--home", copy, "-o", "ro", mnt2)
    try:
        check_files(mnt2, {"b": old["b"]})
    finally:
        hafs("umount", mnt2)

    # The original: every byte, and a clean deep fsck (its own repair still works).
    m.start()
    try:
        check_files(m.mnt, {**old, **new})
    finally:
        m.stop()
    p = hafs("fsck", "--home", m.home, "--repair", "--deep", check=False)
    assert p.returncode in (0, 1), p.stdout + p.stderr
    assert not m.bad_log_lines()


def test_adopting_the_copy_locks_the_original_out_even_while_it_is_mounted(tmp_path):
    m, copy, files = copied(tmp_path, seed=3)
    try:
        p = hafs("node", "adopt", "--home", copy)
        assert f"the metadata at {os.uname().nodename}:{copy / 'meta.db'} is the owner" in p.stdout
        for node in m.node_dirs():
            ident = json.loads((node / "hafs-node.json").read_text())
            assert ident["owner_where"].endswith(str(copy / "meta.db"))
        # The original's mount drops a file: its garbage collection must delete nothing.
        os.unlink(m.mnt / "a")
        deadline = time.monotonic() + 15
        while "belongs to another metadata store" not in m.log.read_text():
            assert time.monotonic() < deadline, "the original's garbage collection never ran"
            time.sleep(0.2)
        assert block_id(files["a"]) in block_files(m)
    finally:
        m.stop()

    # The adopted copy is the filesystem now: it mounts and has every byte.
    copy_mount = Mount(copy, tmp_path / "mnt2")
    copy_mount.mnt.mkdir()
    copy_mount.start()
    try:
        check_files(copy_mount.mnt, files)
    finally:
        copy_mount.stop()
    # The original is refused by its nodes, with where their owner is.
    for args, code in [
        (["mount", "--home", m.home, m.mnt], 2),
        (["fsck", "--home", m.home, "--repair"], 8),
    ]:
        p = hafs(*args, check=False)
        assert p.returncode == code, (args, p.stdout, p.stderr)
        assert "belongs to another metadata store" in p.stderr, p.stderr
        assert str(copy / "meta.db") in p.stderr and "hafs node adopt" in p.stderr


def test_a_home_moved_with_mv_keeps_working(tmp_path):
    m = make_mount(tmp_path)
    m.start()
    try:
        files = write_files(m.mnt, ["a", "b", "c"], seed=4)
    finally:
        m.stop()
    moved = Mount(tmp_path / "elsewhere", m.mnt)
    os.rename(m.home, moved.home)  # mv: the same meta.db, its nodes inside it
    moved.start()
    try:
        check_files(moved.mnt, files)
        assert "NODE-MOVED the home moved from" in moved.log.read_text()
    finally:
        moved.stop()
    ring = ring_of(moved.home)
    assert all(Path(n.address).is_relative_to(moved.home) for n in ring.nodes.values())
    p = hafs("fsck", "--home", moved.home, "--deep")
    assert "result: clean" in p.stdout
    assert not moved.bad_log_lines()
