"""POSIX behaviour through a real mount, driven with syscalls and ordinary tools; each
test runs on a mount with the defaults and on one with the kernel's writeback cache."""

from __future__ import annotations

import errno
import mmap
import os
import random
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import module_mount

from hafs.store.chunker import MiB


@pytest.fixture(scope="module", params=["", "writeback_cache"], ids=["default", "writeback"])
def mount(tmp_path_factory, request):
    yield from module_mount(tmp_path_factory, request.param)


def run(*cmd, cwd=None):
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert p.returncode == 0, f"{cmd} failed: {p.stderr}"
    return p.stdout


def test_write_read_at_offsets(work):
    p = work / "f"
    data = random.Random(1).randbytes(3 * MiB + 123)
    p.write_bytes(data)
    assert p.read_bytes() == data
    fd = os.open(p, os.O_RDWR)
    try:
        os.pwrite(fd, b"hello", 1_000_000)
        os.pwrite(fd, b"world", len(data) + 10)  # past the end: a 10-byte hole
        expect = bytearray(data)
        expect[1_000_000:1_000_005] = b"hello"
        expect += bytes(10) + b"world"
        assert os.pread(fd, len(expect) + 100, 0) == expect
        assert os.fstat(fd).st_size == len(expect)
    finally:
        os.close(fd)
    assert p.read_bytes() == expect  # and after close, from the blocks


def test_append_and_trunc(work):
    p = work / "log"
    for i in range(20):
        with open(p, "ab") as f:
            f.write(b"line %d\n" % i)
    assert p.read_bytes() == b"".join(b"line %d\n" % i for i in range(20))
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"end\n")  # O_APPEND writes at the end whatever the offset
    os.close(fd)
    assert p.read_bytes().endswith(b"line 19\nend\n")
    with open(p, "wb") as f:  # O_TRUNC
        f.write(b"new")
    assert p.read_bytes() == b"new"


def test_truncate_up_and_down(work):
    p = work / "t"
    data = os.urandom(2 * MiB)
    p.write_bytes(data)
    os.truncate(p, 1000)
    assert p.read_bytes() == data[:1000]
    os.truncate(p, 5000)
    assert p.read_bytes() == data[:1000] + bytes(4000)
    run("truncate", "-s", "0", str(p))
    assert p.stat().st_size == 0 and p.read_bytes() == b""
    fd = os.open(p, os.O_RDWR)
    os.write(fd, b"abc")
    os.ftruncate(fd, 1)  # truncate an open file with buffered data
    os.write(fd, b"Z")  # the offset is 3: a hole at 1..2
    os.close(fd)
    assert p.read_bytes() == b"a\0\0Z"


def test_sparse_file_takes_no_blocks(mount, work):
    p = work / "sparse"
    before = sum(len(files) for _, _, files in os.walk(mount.home / "nodes"))
    with open(p, "wb") as f:
        f.seek(512 * MiB)
        f.write(b"x")
    after = sum(len(files) for _, _, files in os.walk(mount.home / "nodes"))
    assert p.stat().st_size == 512 * MiB + 1
    assert after - before <= 2 * 1  # one small block, two replicas (plus nothing for the hole)
    with open(p, "rb") as f:
        f.seek(100 * MiB)
        assert f.read(4096) == bytes(4096)
        f.seek(512 * MiB - 2)
        assert f.read() == b"\0\0x"


def _du_bytes(path: Path) -> int:
    return int(subprocess.check_output(["du", "-B1", str(path)]).split()[0])


def test_st_blocks_counts_what_a_file_holds(mount, work):
    """`du` of a 1 PiB sparse file with 16 bytes written is a few KiB; of a dense file,
    its size (while buffered too, but not while only the kernel's writeback cache holds
    the bytes); of a truncated one, what is left."""
    sparse = work / "petabyte"
    subprocess.run(["truncate", "-s", "1P", str(sparse)], check=True)
    with open(sparse, "ab") as f:
        f.write(b"sixteen bytes!!\n")
    assert sparse.stat().st_size == 2**50 + 16
    assert sparse.stat().st_blocks * 512 <= 4096
    assert _du_bytes(sparse) <= 4096

    dense = work / "dense"
    data = os.urandom(10 * MiB)
    with open(dense, "wb") as f:
        f.write(data)
        if "writeback_cache" not in mount.options:
            assert os.fstat(f.fileno()).st_blocks * 512 >= 9 * MiB  # buffered, not yet stored
    assert 10 * MiB <= _du_bytes(dense) <= 10 * MiB + 4096
    os.truncate(dense, 3 * MiB)
    assert 3 * MiB <= dense.stat().st_blocks * 512 <= 3 * MiB + 4096
    os.truncate(dense, 1 * 2**40)  # a 1 TiB hole after the 3 MiB
    assert 3 * MiB <= dense.stat().st_blocks * 512 <= 3 * MiB + 4096
    (work / "copy").write_bytes(data)  # dedup: the same blocks count in each file
    assert (work / "copy").stat().st_blocks * 512 >= 10 * MiB


def test_names_over_255_bytes_are_enametoolong_everywhere(work):
    """Every call gets ENAMETOOLONG for a 256-byte component, lookup included; 255 works."""
    (work / "f").write_bytes(b"x")
    (work / "d").mkdir()
    ok = "n" * 255
    (work / ok).write_bytes(b"255 bytes is the limit")
    assert (work / ok).read_bytes() == b"255 bytes is the limit"
    long = str(work / ("n" * 256))
    long_in_dir = str(work / "d" / ("é" * 128))  # 256 bytes in UTF-8
    calls = {
        "stat": lambda p: os.stat(p),
        "lstat": lambda p: os.lstat(p),
        "open": lambda p: os.open(p, os.O_RDONLY),
        "create": lambda p: os.open(p, os.O_WRONLY | os.O_CREAT, 0o644),
        "mkdir": lambda p: os.mkdir(p),
        "rmdir": lambda p: os.rmdir(p),
        "unlink": lambda p: os.unlink(p),
        "rename from": lambda p: os.rename(p, work / "g"),
        "rename to": lambda p: os.rename(work / "f", p),
        "link": lambda p: os.link(work / "f", p),
        "symlink": lambda p: os.symlink("f", p),
        "mknod": lambda p: os.mkfifo(p),
        "chmod": lambda p: os.chmod(p, 0o600),
        "access": lambda p: os.access(p, os.R_OK) or os.stat(p),
        "getxattr": lambda p: os.getxattr(p, "user.x"),
    }
    for what, call in calls.items():
        for path in (long, long_in_dir):
            with pytest.raises(OSError) as e:
                call(path)
            assert e.value.errno == errno.ENAMETOOLONG, (what, path[-20:], e.value)
    assert sorted(os.listdir(work)) == sorted(["f", "d", ok])
    assert os.listdir(work / "d") == []


def test_directories(work):
    (work / "a" / "b" / "c").mkdir(parents=True)
    assert os.stat(work / "a").st_nlink == 3
    with pytest.raises(OSError) as e:
        os.rmdir(work / "a")
    assert e.value.errno == errno.ENOTEMPTY
    os.rmdir(work / "a" / "b" / "c")
    assert os.stat(work / "a" / "b").st_nlink == 2
    with pytest.raises(FileExistsError):
        os.mkdir(work / "a")
    with pytest.raises(NotADirectoryError):
        (work / "file").write_text("x")
        os.listdir(work / "file")
    assert sorted(os.listdir(work)) == ["a", "file"]


def test_unlinked_open_file_stays_readable(work):
    p = work / "gone"
    data = os.urandom(3 * MiB)
    p.write_bytes(data)
    fd = os.open(p, os.O_RDWR)
    try:
        os.unlink(p)
        assert not p.exists()
        assert os.pread(fd, len(data), 0) == data
        os.pwrite(fd, b"more", len(data))
        assert os.pread(fd, 10, len(data)) == b"more"
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)


def test_rename(work):
    (work / "a").write_text("A")
    (work / "b").write_text("B")
    os.mkdir(work / "d")
    os.rename(work / "a", work / "b")  # over an existing file
    assert (work / "b").read_text() == "A" and not (work / "a").exists()
    os.rename(work / "b", work / "d" / "c")  # across directories
    assert (work / "d" / "c").read_text() == "A"
    os.mkdir(work / "e")
    (work / "e" / "x").write_text("X")
    with pytest.raises(OSError) as e:
        os.rename(work / "d", work / "e")  # over a non-empty directory
    assert e.value.errno == errno.ENOTEMPTY
    os.rename(work / "e", work / "d" / "e2")  # a directory into another
    assert os.stat(work / "d").st_nlink == 3
    assert (work / "d" / "e2" / "x").read_text() == "X"
    run("mv", str(work / "d"), str(work / "moved"))
    assert (work / "moved" / "e2" / "x").read_text() == "X"


def _renameat2(old, new, flags):
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    r = libc.renameat2(at_fdcwd, os.fsencode(old), at_fdcwd, os.fsencode(new), flags)
    if r != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def test_rename_noreplace_and_exchange(work):
    (work / "a").write_text("A")
    (work / "b").write_text("B")
    with pytest.raises(OSError) as e:
        _renameat2(work / "a", work / "b", 1)  # RENAME_NOREPLACE
    assert e.value.errno == errno.EEXIST
    _renameat2(work / "a", work / "b", 2)  # RENAME_EXCHANGE
    assert (work / "a").read_text() == "B" and (work / "b").read_text() == "A"
    os.mkdir(work / "dir")
    _renameat2(work / "a", work / "dir", 2)  # a file and a directory swap
    assert (work / "dir").read_text() == "B" and (work / "a").is_dir()


def test_hard_and_symbolic_links(work):
    (work / "f").write_text("data")
    run("ln", str(work / "f"), str(work / "g"))
    assert os.stat(work / "f").st_nlink == 2
    assert os.stat(work / "f").st_ino == os.stat(work / "g").st_ino
    os.unlink(work / "f")
    assert os.stat(work / "g").st_nlink == 1 and (work / "g").read_text() == "data"
    run("ln", "-s", "g", str(work / "s"))
    assert os.readlink(work / "s") == "g"
    assert (work / "s").read_text() == "data"
    assert stat.S_ISLNK(os.lstat(work / "s").st_mode)


def test_chmod_chown_and_permissions(work):
    p = work / "f"
    p.write_text("secret")
    run("chmod", "600", str(p))
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    os.chown(p, 1234, 5678)
    assert (p.stat().st_uid, p.stat().st_gid) == (1234, 5678)
    os.chmod(work, 0o777)
    # default_permissions: another user may not read a 0600 file it does not own
    code = "import sys; open(sys.argv[1]).read()"
    r = subprocess.run(
        [
            "setpriv",
            "--reuid=4321",
            "--regid=4321",
            "--clear-groups",
            "python3",
            "-c",
            code,
            str(p),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "Permission denied" in r.stderr
    # ... nor chown it
    r = subprocess.run(
        ["setpriv", "--reuid=1234", "--regid=5678", "--clear-groups", "chown", "4321", str(p)],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0


def test_utimens_nanoseconds(work):
    p = work / "f"
    p.write_text("x")
    os.utime(p, ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))
    st = p.stat()
    assert st.st_atime_ns == 1_600_000_000_123_456_789
    assert st.st_mtime_ns == 1_500_000_000_987_654_321


def test_xattrs(work):
    p = work / "f"
    p.write_text("x")
    os.setxattr(p, "user.a", b"1")
    os.setxattr(p, "user.b", b"\0" * 1000)
    assert os.getxattr(p, "user.a") == b"1"
    assert sorted(os.listxattr(p)) == ["user.a", "user.b"]
    os.removexattr(p, "user.a")
    with pytest.raises(OSError) as e:
        os.getxattr(p, "user.a")
    assert e.value.errno == errno.ENODATA
    with pytest.raises(OSError) as e:
        os.setxattr(p, "user.big", b"x" * (64 * 1024 + 1))
    assert e.value.errno in (errno.E2BIG, errno.ENOSPC, errno.ERANGE)
    with pytest.raises(OSError) as e:
        os.setxattr(p, "user." + "n" * 300, b"x")
    assert e.value.errno == errno.ERANGE


def test_statfs_tells_the_truth(mount):
    st = os.statvfs(mount.mnt)
    node = os.statvfs(mount.node_dirs()[0])  # all nodes share one disk here
    assert st.f_bavail * st.f_frsize == pytest.approx(node.f_bavail * node.f_frsize / 2, rel=0.05)
    assert st.f_blocks >= st.f_bfree == st.f_bavail  # Size = Used + Avail (tests/mount/test_df.py)
    out = run("df", "-B1", str(mount.mnt))
    assert "hafs" in out


def test_fsync_and_mmap(work):
    p = work / "m"
    p.write_bytes(bytes(3 * MiB))
    with open(p, "r+b") as f:
        with mmap.mmap(f.fileno(), 0) as m:
            m[MiB : MiB + 5] = b"mmap!"
            m.flush()
        os.fsync(f.fileno())
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert m[MiB : MiB + 5] == b"mmap!"
        assert m[:MiB] == bytes(MiB)


def test_many_files_in_one_directory(work):
    n = 3000
    for i in range(n):
        (work / f"f{i:05d}").touch()
    names = os.listdir(work)
    assert len(names) == n and len(set(names)) == n
    # a readdir that deletes as it goes still sees every other entry once
    seen = []
    with os.scandir(work) as it:
        for i, entry in enumerate(it):
            seen.append(entry.name)
            if i % 2 == 0:
                os.unlink(entry.path)
    assert len(seen) == len(set(seen))
    assert set(os.listdir(work)) | set(seen) == {f"f{i:05d}" for i in range(n)}


def tree(root: Path) -> dict[str, object]:
    """Relative path -> file bytes, symlink target or "dir", and the mode bits, for a tree."""
    out: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        if p.is_symlink():
            what = ("link", os.readlink(p))
        elif p.is_dir():
            what = ("dir",)
        else:
            what = ("file", p.read_bytes())
        out[str(p.relative_to(root))] = (*what, stat.S_IMODE(st.st_mode))
    return out


def test_real_tools(work, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        d = src / f"d{i % 5}"
        d.mkdir(exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(random.Random(i).randrange(1, 300_000)))
    os.symlink("d0/f0", src / "link")
    expected = tree(src)
    assert len(expected) == 36  # 5 directories, 30 files, 1 symlink
    run("cp", "-a", str(src), str(work / "cp"))
    run("diff", "-r", str(src), str(work / "cp"))
    assert tree(work / "cp") == expected
    run("tar", "-cf", str(tmp_path / "t.tar"), "-C", str(src), ".")
    (work / "untar").mkdir()
    run("tar", "-xf", str(tmp_path / "t.tar"), "-C", str(work / "untar"))
    assert tree(work / "untar") == expected
    run("rsync", "-a", "--delete", str(src) + "/", str(work / "rsync"))
    assert tree(work / "rsync") == expected
    (src / "d1" / "f1").unlink()
    run("rsync", "-a", "--delete", str(src) + "/", str(work / "rsync"))
    assert tree(work / "rsync") == tree(src)  # --delete removed it through the mount


def test_git_and_sqlite(work):
    run("git", "init", "-q", str(work / "repo"))
    repo = work / "repo"
    (repo / "a.txt").write_text("hello\n")
    env = ["-c", "user.name=t", "-c", "user.email=t@t"]
    run("git", *env, "-C", str(repo), "add", "a.txt")
    run("git", *env, "-C", str(repo), "commit", "-q", "-m", "one")
    (repo / "a.txt").write_text("hello again\n")
    run("git", *env, "-C", str(repo), "commit", "-q", "-am", "two")
    assert run("git", "-C", str(repo), "fsck", "--strict") is not None
    assert "two" in run("git", "-C", str(repo), "log", "--oneline")
    import sqlite3

    db = sqlite3.connect(work / "db.sqlite")
    db.execute("CREATE TABLE t (x INTEGER, y TEXT)")
    with db:
        db.executemany("INSERT INTO t VALUES (?, ?)", [(i, "v" * (i % 100)) for i in range(20000)])
    db.close()
    db = sqlite3.connect(work / "db.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT count(*), sum(x) FROM t").fetchone() == (20000, sum(range(20000)))
    db.close()
