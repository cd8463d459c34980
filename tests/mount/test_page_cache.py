"""The kernel keeps a file's cached pages across opens while nobody changed the file
(keep_cache), and drops them at open once any mount did (close-to-open)."""

from __future__ import annotations

import os
import subprocess
import time

from conftest import Mount, fuse_requests, hafs
from nodeproc import free_port

SIZE = 256 * 1024  # whole pages: the kernel caches what was written without reading it back


def reads_answered(url: str) -> int:
    """FUSE read requests the mount answered so far."""
    return fuse_requests(url)["read"]


def read_all(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def two_mounts(tmp_path) -> tuple[Mount, Mount, str]:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    hafs("mkfs", "--home", tmp_path / "home")
    port = free_port()
    a = Mount(tmp_path / "home", tmp_path / "a", f"metrics=127.0.0.1:{port}")
    b = Mount(tmp_path / "home", tmp_path / "b")
    return a, b, f"http://127.0.0.1:{port}/metrics"


def test_pages_are_kept_until_another_mount_changes_the_file(tmp_path):
    a, b, url = two_mounts(tmp_path)
    a.start()
    try:
        b.start()
        try:
            first = os.urandom(SIZE)
            (a.mnt / "f").write_bytes(first)
            assert read_all(a.mnt / "f") == first
            before = reads_answered(url)
            for _ in range(3):  # unchanged: every open keeps the pages, no read reaches hafs
                assert read_all(a.mnt / "f") == first
            assert reads_answered(url) == before

            second = os.urandom(SIZE)  # same size: only the version tells the change
            (b.mnt / "f").write_bytes(second)
            assert read_all(a.mnt / "f") == second  # the open after B's close sees it whole
            assert reads_answered(url) > before
            # the kernel's own check (its attributes of the file, refreshed after their
            # timeout, show another mtime) may drop the pages once more
            time.sleep(1.2)
            os.stat(a.mnt / "f")
            assert read_all(a.mnt / "f") == second
            before = reads_answered(url)
            for _ in range(3):
                assert read_all(a.mnt / "f") == second
            assert reads_answered(url) == before  # ...and keeps the new version from then on
        finally:
            b.stop()
    finally:
        a.stop()
    assert not a.bad_log_lines() and not b.bad_log_lines()


def test_a_writer_that_finds_the_file_changed_does_not_keep_stale_pages(tmp_path):
    """A reads the file (its kernel caches it), B replaces it, then A writes a few bytes
    through the handle it opened before: A's next open shows B's bytes around A's."""
    a, b, _ = two_mounts(tmp_path)
    a.start()
    try:
        b.start()
        try:
            old, new = os.urandom(SIZE), os.urandom(SIZE)
            (a.mnt / "f").write_bytes(old)
            with open(a.mnt / "f", "r+b") as f:
                assert f.read() == old  # cached on A
                (b.mnt / "f").write_bytes(new)  # A holds no write lock yet: B goes first
                time.sleep(1.5)  # A's attributes of the file time out (no help from them)
                f.seek(0)
                f.write(b"0123456789")
            assert read_all(a.mnt / "f") == b"0123456789" + new[10:]
            assert read_all(b.mnt / "f") == b"0123456789" + new[10:]
        finally:
            b.stop()
    finally:
        a.stop()
    assert not a.bad_log_lines() and not b.bad_log_lines()


def test_an_open_after_another_mounts_close_sees_the_new_size(tmp_path):
    """B's kernel holds the file's attributes (a second's timeout); A makes the file
    longer, then shorter; B's next open, within that second, sees each whole."""
    a, b, _ = two_mounts(tmp_path)
    a.start()
    try:
        b.start()
        try:
            (a.mnt / "f").write_bytes(b"short")
            assert read_all(b.mnt / "f") == b"short"
            for data in (os.urandom(3 * SIZE + 17), b"tiny"):
                os.stat(b.mnt / "f")  # B's kernel holds the attributes a second from now
                (a.mnt / "f").write_bytes(data)
                with open(b.mnt / "f", "rb") as f:
                    assert os.fstat(f.fileno()).st_size == len(data)
                    assert f.read() == data
        finally:
            b.stop()
    finally:
        a.stop()
    assert not a.bad_log_lines() and not b.bad_log_lines()


def test_chmod_and_utime_keep_the_cached_pages(tmp_path):
    """They change the file's ctime, not its bytes: the kernel keeps its pages."""
    a, b, url = two_mounts(tmp_path)
    a.start()
    try:
        data = os.urandom(SIZE)
        (a.mnt / "f").write_bytes(data)
        assert read_all(a.mnt / "f") == data
        before = reads_answered(url)
        os.chmod(a.mnt / "f", 0o600)
        os.utime(a.mnt / "f", ns=(1_600_000_000_000_000_000, 1_500_000_000_000_000_000))
        for _ in range(3):
            assert read_all(a.mnt / "f") == data
        assert reads_answered(url) == before
        st = os.stat(a.mnt / "f")
        assert (st.st_mode & 0o777, st.st_mtime_ns) == (0o600, 1_500_000_000_000_000_000)
    finally:
        a.stop()
    assert not a.bad_log_lines()


def test_pages_written_in_part_are_not_kept(tmp_path):
    """tar writes 10240-byte records: the pages they cover in part stay in the kernel
    without their other bytes.  The next open drops the file's pages, so a reader gets
    each file in one request instead of one request per missing page."""
    src = tmp_path / "src"
    src.mkdir()
    files = {f"f{i}": os.urandom(3 * 10240 + 1000 * i) for i in range(10)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    subprocess.run(["tar", "-cf", tmp_path / "t.tar", "-C", src, "."], check=True)
    a, b, url = two_mounts(tmp_path)
    a.start()
    try:
        subprocess.run(["tar", "-xf", tmp_path / "t.tar", "-C", a.mnt], check=True)
        before = reads_answered(url)
        for name, data in files.items():
            assert read_all(a.mnt / name) == data
        assert reads_answered(url) - before <= len(files)
        before = reads_answered(url)
        for name, data in files.items():  # read whole once: kept from now on
            assert read_all(a.mnt / name) == data
        assert reads_answered(url) == before
    finally:
        a.stop()
    assert not a.bad_log_lines()
