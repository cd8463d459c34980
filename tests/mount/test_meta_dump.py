"""`hafs meta dump` / `hafs meta load` through real mounts: an embedded filesystem moved
onto a real 3-member etcd and back, every file byte for byte and every attribute equal
(stat, xattrs, hard links, symlinks), fsck clean after each step; each load makes the
loaded metadata the owner of the nodes, so the metadata it came from is refused by them."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
from pathlib import Path

from conftest import HAFS, Mount, hafs, make_mount
from etcdproc import require_etcd, running_cluster

from hafs.store.chunker import MiB

OPTS = "gc_grace_s=0,gc_interval_s=1,lock_ttl_s=3,node_timeout_s=3"


def populate(root: Path) -> None:
    rnd = random.Random(12)
    big = rnd.randbytes(5 * MiB + 17)  # several blocks
    (root / "d" / "e").mkdir(parents=True)
    (root / "empty").write_bytes(b"")
    (root / "one").write_bytes(b"1")
    (root / "big").write_bytes(big)
    (root / "d" / "copy").write_bytes(big)  # the same blocks (dedup)
    with open(root / "sparse", "wb") as f:  # a hole, then data
        f.seek(10 * MiB)
        f.write(b"end of a sparse file")
    for i in range(50):
        (root / "d" / "e" / f"small{i}").write_bytes(rnd.randbytes(rnd.randrange(1, 5000)))
    os.link(root / "one", root / "d" / "hard-one")
    os.link(root / "one", root / "d" / "e" / "hard-two")
    os.symlink("../big", root / "d" / "to-big")
    os.symlink("/nowhere/at/all", root / "dangling")
    os.mkfifo(root / "d" / "fifo", 0o640)
    name = os.fsencode(root) + b"/not-utf8-\xff\xfe"
    with open(name, "wb") as f:
        f.write(b"odd name")
    os.setxattr(root / "big", "user.checksum", hashlib.sha256(big).digest())
    os.setxattr(root / "d", "user.empty", b"")
    os.setxattr(root / "d" / "e", "user.big", bytes(range(256)) * 200)
    os.chmod(root / "one", 0o4751)
    os.chown(root / "d" / "e", 1234, 5678)
    os.chown(root / "dangling", 42, 43, follow_symlinks=False)
    os.utime(root / "big", ns=(1_234_567_890_123_456_789, 1_111_111_111_222_222_222))
    (root / "gone").write_bytes(rnd.randbytes(300_000))
    (root / "gone").unlink()  # its block: garbage


def tree(root: Path) -> dict:
    """Every path under root (and root) with its attributes, xattrs, target or content hash."""
    out = {}
    todo = [os.fsencode(root)]
    base = len(todo[0])
    while todo:
        path = todo.pop()
        st = os.lstat(path)
        attrs = {
            k: getattr(st, k)
            for k in ("st_ino", "st_mode", "st_uid", "st_gid", "st_nlink", "st_size", "st_rdev",
                      "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns")
        }  # fmt: skip
        attrs["xattrs"] = {
            n: os.getxattr(path, n, follow_symlinks=False)
            for n in os.listxattr(path, follow_symlinks=False)
        }
        if os.path.islink(path):
            attrs["target"] = os.readlink(path)
        elif os.path.isdir(path):
            todo.extend(os.path.join(path, n) for n in os.listdir(path))
        elif os.path.isfile(path):
            with open(path, "rb") as f:
                attrs["sha256"] = hashlib.sha256(f.read()).hexdigest()
        out[path[base:]] = attrs
    return out


def to_file(path: Path, *args) -> None:
    with open(path, "wb") as out:
        p = subprocess.run([*HAFS, *map(str, args)], stdout=out, stderr=subprocess.PIPE,
                           timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr.decode()


def from_file(path: Path, *args) -> str:
    with open(path, "rb") as inp:
        p = subprocess.run([*HAFS, *map(str, args)], stdin=inp, capture_output=True,
                           timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr.decode()
    return p.stdout.decode()


def fsck_clean(*where) -> None:
    p = hafs("fsck", *where, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def owners(m: Mount) -> set[str]:
    """Where the owner of each node of the home's default directories is."""
    return {json.loads((n / "hafs-node.json").read_text())["owner_where"] for n in m.node_dirs()}


def locked_out(m: Mount, owner: str) -> None:
    """The metadata of `m` may no longer change its nodes: they belong to `owner`."""
    for args, code in [
        (["fsck", "--home", m.home, "--repair"], 8),
        (["mount", "--home", m.home, "-o", OPTS, m.mnt], 2),
    ]:
        p = hafs(*args, check=False)
        assert p.returncode == code, (args, p.stdout, p.stderr)
        assert "belongs to another metadata store" in p.stderr and owner in p.stderr, p.stderr
    assert not os.path.ismount(m.mnt)


def mounted(m: Mount, *where):
    hafs("mount", *where, "-o", OPTS, m.mnt)
    assert os.path.ismount(m.mnt)
    return m


def test_embedded_to_etcd_and_back(tmp_path):
    require_etcd()
    a = make_mount(tmp_path / "a", OPTS)
    a.start()
    try:
        populate(a.mnt)
        before = tree(a.mnt)
        one = before[b"/one"]
        assert len(before) == 64 and one["st_nlink"] == 3 and one["st_mode"] & 0o4000
        assert before[b"/d/e/hard-two"]["st_ino"] == one["st_ino"]
        assert before[b"/d"]["xattrs"] == {"user.empty": b""}
        assert before[b"/big"]["st_mtime_ns"] == 1_111_111_111_222_222_222
    finally:
        a.stop()
    fsck_clean("--home", a.home)
    to_file(tmp_path / "one.json", "meta", "dump", "--home", a.home)
    assert owners(a) == {f"{os.uname().nodename}:{a.home / 'meta.db'}"}

    with running_cluster(tmp_path / "etcd") as etcd:
        url = etcd.url("moved")
        state = tmp_path / "b" / "state"
        out = from_file(tmp_path / "one.json", "meta", "load", "--meta", url, "--home", state)
        assert out.startswith("loaded ") and url in out and "not taken" not in out
        assert owners(a) == {url}  # the nodes are the loaded metadata's now
        locked_out(a, url)  # the embedded metadata, still in its home, is refused
        p = subprocess.run([*HAFS, "meta", "load", "--meta", url, "--home", state],
                           stdin=open(tmp_path / "one.json", "rb"), capture_output=True,
                           text=True)  # fmt: skip
        assert p.returncode == 2 and "not empty" in p.stderr, p.stderr  # loads only once
        (tmp_path / "b" / "mnt").mkdir()
        b = mounted(Mount(state, tmp_path / "b" / "mnt", OPTS), "--meta", url, "--home", state)
        try:
            assert tree(b.mnt) == before
            (b.mnt / "d" / "new").write_bytes(b"written after the move")  # changes work
            with open(b.mnt / "one", "ab") as f:
                f.write(b"+")
            os.rename(b.mnt / "d" / "copy", b.mnt / "copy-moved")
            after = tree(b.mnt)
        finally:
            b.stop()
        assert not b.bad_log_lines()
        fsck_clean("--meta", url, "--home", state)
        to_file(tmp_path / "two.json", "meta", "dump", "--meta", url, "--home", state)

    make_home = tmp_path / "c" / "home"
    from_file(tmp_path / "two.json", "meta", "load", "--home", make_home)
    assert owners(a) == {f"{os.uname().nodename}:{make_home / 'meta.db'}"}
    (tmp_path / "c" / "mnt").mkdir()
    c = mounted(Mount(make_home, tmp_path / "c" / "mnt", OPTS), "--home", make_home)
    try:
        assert tree(c.mnt) == after
        assert (c.mnt / "one").read_bytes() == b"1+"
    finally:
        c.stop()
    assert not c.bad_log_lines() and not a.bad_log_lines()
    fsck_clean("--home", make_home)
