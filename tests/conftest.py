"""Fixtures that mount hafs for real: `hafs mount` in its own process, torn down always."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from hafs import home as home_mod
from hafs.fs.vfs import Options, Vfs
from hafs.mount import pid_file
from hafs.store.placement import Placement

HAFS = [sys.executable, "-m", "hafs"]

# Log lines a healthy run never writes.
BAD_LOG = re.compile(r"Traceback|unexpected error| ERROR ")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "log_allows(*texts): log lines with these texts are expected in a mount's log"
    )


def hafs(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.run([*HAFS, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"hafs {' '.join(map(str, args))} exited {p.returncode}:\n{p.stderr}")
    return p


def eventually(predicate, timeout: float = 3.0) -> bool:
    """Whether predicate() becomes true within timeout (OSError counts as not yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


@dataclass
class Mount:
    home: Path
    mnt: Path
    options: str = ""

    @property
    def log(self) -> Path:
        return self.home / "hafs.log"

    def daemon_pid(self) -> int | None:
        try:
            return int(pid_file(self.home, self.mnt).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def node_dirs(self) -> list[Path]:
        return sorted((self.home / "nodes").iterdir())

    def start(self) -> None:
        args = ["mount", "--home", self.home]
        if self.options:
            args += ["-o", self.options]
        hafs(*args, self.mnt)
        assert os.path.ismount(self.mnt)

    def stop(self) -> None:
        """Unmount and make sure the daemon is gone, whatever state it is in."""
        pid = self.daemon_pid()
        p = hafs("umount", self.mnt, check=False, timeout=60) if os.path.ismount(self.mnt) else None
        if p is not None and p.returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
        if pid is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if not _wait_gone(pid, 10):
                    os.kill(pid, sig)
            _wait_gone(pid, 10)
        subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)

    def bad_log_lines(self, allowed: tuple[str, ...] = ()) -> list[str]:
        if not self.log.exists():
            return []
        return [
            line
            for line in self.log.read_text(errors="replace").splitlines()
            if BAD_LOG.search(line) and not any(a in line for a in allowed)
        ]


def fsync_and_close_errno(fd: int) -> int | None:
    """fsync(fd), then close(fd) (closed in any case): the errno of the first that failed
    (None: neither did)."""
    try:
        os.fsync(fd)
    except OSError as e:
        try:
            os.close(fd)
        except OSError:
            pass
        return e.errno
    try:
        os.close(fd)
    except OSError as e:
        return e.errno
    return None


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


MOUNT_OPTS = "gc_grace_s=0,gc_interval_s=1"


def make_mount(base: Path, options: str = MOUNT_OPTS) -> Mount:
    home, mnt = base / "home", base / "mnt"
    mnt.mkdir(parents=True)
    hafs("mkfs", "--home", home)
    return Mount(home, mnt, options)


def module_mount(tmp_path_factory, extra_options: str = ""):
    """The body of a module's `mount` fixture (`yield from`): a mount of a new filesystem
    with MOUNT_OPTS and `extra_options`; fails the module's last test on a bad log line."""
    options = ",".join(filter(None, [MOUNT_OPTS, extra_options]))
    m = make_mount(tmp_path_factory.mktemp("hafs"), options)
    m.start()
    try:
        yield m
    finally:
        m.stop()
    bad = m.bad_log_lines()
    assert not bad, "unexpected errors in the daemon's log:\n" + "\n".join(bad[:20])


@pytest.fixture(scope="module")
def mount(tmp_path_factory):
    """One hafs mount per test module (a module may override it, e.g. to parametrize it)."""
    yield from module_mount(tmp_path_factory)


def fuse_requests(url: str) -> Counter[str]:
    """FUSE requests a mount with -o metrics answered so far, by operation (from `url`)."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith("hafs_fuse_op_seconds_count{"):
            labels, _, value = line.rpartition(" ")
            out[labels.split('op="', 1)[1].split('"', 1)[0]] += int(float(value))
    return out


@pytest.fixture
def work(mount, request):
    """A fresh directory inside the module's mount for each test."""
    d = mount.mnt / re.sub(r"\W", "_", request.node.name)
    d.mkdir()
    return d


async def vfs_session(home: Path, work):
    """`await work(vfs)` on a running Vfs over the filesystem in `home`, without a mount.

    Garbage collection is off (a long grace); the vfs is flushed and closed after.
    """
    fs = home_mod.open_fs(home)
    placement = Placement(fs.ring, fs.stores, fs.replicas, trio.CapacityLimiter(8), fs.write_quorum)
    v = Vfs(fs.meta, placement, Options(gc_grace_s=3600, gc_interval_s=3600))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(v.run)
            result = await work(v)
            await v.shutdown()
            nursery.cancel_scope.cancel()
    finally:
        fs.meta.close()
    return result
