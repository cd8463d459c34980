"""Mounting and unmounting: the daemon's life from checks to a clean exit.

`hafs mount` (background) starts `hafs mount --foreground --ready-fd N` as a
new session and waits until it reports, through that pipe, either "ok"
(mounted) or one line of error; so every refusal reaches the user's terminal
and the exit code.  The foreground daemon:

1. checks the mountpoint (an empty directory not mounted; a hafs mount whose
   daemon, named by HOME/run/*.pid, is gone is detached with `fusermount3 -u -z`
   first, found in /proc/self/mounts without a stat of the dead mount);
2. opens the metadata and the backing directories and registers a mount
   session in the metadata (several mounts of one filesystem work together
   through the write locks; a session is refused while `fsck --repair` runs,
   and `fsck --repair` is refused while a session is alive); a read-write
   mount is refused for a copy of a home and for nodes that belong to another
   metadata store (hafs.home.owner_claim, hafs.store.owner);
3. mounts, serves (renewing its session, and reaping the sessions of mounts
   that died: their files unlinked while open are deleted), and on
   SIGINT/SIGTERM or unmount flushes every open file, syncs the metadata,
   ends its session and unmounts.

`-o ro` mounts read-only: the kernel refuses writes (EROFS), the metadata is
opened read-only, no background loop that writes runs, and no session is
registered (a read-only connection cannot write one).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pyfuse3
import trio

from . import home as home_mod
from . import logs, systemd
from .errors import MetaUnavailable, UserError
from .fs.vfs import Options, Vfs
from .fuse_ops import FuseOps
from .helpers import split_generic
from .metrics import MountMetrics, is_loopback
from .store.placement import Placement

log = logging.getLogger(__name__)

FUSE_PASSTHROUGH = {"allow_other", "allow_root"}
POSITIVE_OPTIONS = {
    "threads",
    "write_buffer_mb",
    "flush_mb",
    "gc_interval_s",
    "node_timeout_s",
    "probe_interval_s",
    "meta_timeout_s",
}


def _flag(name: str, sep: str, value: str) -> bool:
    """The value of flag option `name` (`name` alone or name=1: on; name=0: off)."""
    flag = value.lower()
    if not sep or flag in ("1", "true", "yes", "on"):
        return True
    if flag in ("0", "false", "no", "off"):
        return False
    raise UserError(
        f"mount option {name} is a flag, not {value!r}: give '{name}' alone"
        f" (or {name}=1; {name}=0 leaves it off)"
    )


def parse_options(text: str | None) -> tuple[Options, set[str]]:
    """Split `-o a=1,b` into vfs Options and FUSE options; unknown names are an error."""
    opts = Options()
    fuse: set[str] = set()
    for item in filter(None, (text or "").split(",")):
        name, sep, value = item.partition("=")
        if name in FUSE_PASSTHROUGH:
            if _flag(name, sep, value):
                fuse.add(name)
            continue
        if name not in Options.__dataclass_fields__:
            known = ", ".join(sorted([*Options.__dataclass_fields__, *FUSE_PASSTHROUGH]))
            raise UserError(f"unknown mount option {name!r}: known options are {known}")
        kind = type(getattr(opts, name))
        if kind is bool:
            setattr(opts, name, _flag(name, sep, value))
            continue
        if kind is str:
            setattr(opts, name, value)
            continue
        try:
            setattr(opts, name, kind(value))
            if kind(value) < (1 if name in POSITIVE_OPTIONS else 0):
                raise ValueError
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            least = 1 if name in POSITIVE_OPTIONS else 0
            raise UserError(f"mount option {name} needs {what} >= {least}, not {value!r}")
    return opts, fuse


def mounted_fs(path: Path) -> tuple[str, str] | None:
    """(fsname, fstype) of the filesystem mounted exactly at `path`, if any.

    Only the parent is resolved: nothing asks the mount itself (a dead one
    answers ENOTCONN, or stale attributes from the kernel's cache).
    """
    path = Path(os.path.abspath(path))
    target = os.path.join(os.path.realpath(path.parent), path.name)
    found = None
    with open("/proc/self/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            if _unescape(mnt) == target:
                found = _unescape(dev), fstype  # the last one is on top
    return found


def _unescape(field: str) -> str:
    """A /proc/self/mounts field with its octal escapes (space, tab, newline, \\) undone."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def hafs_daemon(home: Path, mountpoint: Path) -> int | None:
    """The pid of the live daemon serving `home` at `mountpoint` (its pid file), else None."""
    return _daemon(pid_file(home, mountpoint))


def live_daemons(home: Path) -> list[tuple[int, str]]:
    """(pid, mountpoint) of every mount daemon of `home` that is running (by its pid file)."""
    out = []
    for pidf in sorted((home / "run").glob("*.pid")):
        pid = _daemon(pidf)
        if pid is not None:
            out.append((pid, pidf.read_text().split(maxsplit=1)[-1].strip()))
    return out


def _daemon(pidf: Path) -> int | None:
    """The pid a pid file names if it is a live hafs mount daemon, else None."""
    try:
        pid = int(pidf.read_text().split()[0])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    is_hafs = b"mount" in argv and any(b"hafs" in arg for arg in argv)
    return pid if is_hafs and _alive(pid) else None


def _detach_dead_mount(path: Path, fsname: str) -> None:
    """Lazily unmount a hafs mount whose daemon is gone; UserError if that fails."""
    log.warning("detaching the dead mount of %s left at %s (its daemon is gone)", fsname, path)
    errors = []
    for cmd in (["fusermount3", "-u", "-z", str(path)], ["umount", "-l", str(path)]):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            errors.append(f"{cmd[0]}: {e}")
            continue
        if p.returncode == 0 and mounted_fs(path) != (fsname, "fuse.hafs"):
            return
        errors.append(f"{cmd[0]}: {p.stderr.strip() or f'exit {p.returncode}'}")
    raise UserError(
        f"{path} holds a dead hafs mount that cannot be detached ({'; '.join(errors)}):"
        f" run 'fusermount3 -u -z {path}' as its owner"
    )


def set_readahead(mountpoint: Path, kb: int) -> None:
    """Set the kernel's read-ahead of the mount at `mountpoint` (its bdi in sysfs).

    FUSE mounts start at 128 KiB, so a sequential reader costs a request per
    128 KiB; 1 MiB requests take a quarter less CPU here.  Only root may write
    the setting: otherwise the kernel default stays.  Blocking, and only once
    the mount is served: the kernel resets the setting when the FUSE handshake
    completes, and the stat here waits for that.
    """
    if kb <= 0:
        return
    try:
        dev = os.stat(mountpoint).st_dev
    except OSError as e:
        log.info("kernel read-ahead left at its default: %s", e)
        return
    path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
    except OSError as e:
        log.info("kernel read-ahead left at its default: cannot write %s: %s", path, e.strerror)


def check_mountpoint(path: Path) -> None:
    """Refuse anything but an empty, unmounted directory; detach a dead hafs mount.

    A hafs mount at `path` is dead when the daemon its home's pid file names is
    gone (kill -9): it is detached at once, without asking the mount (whose
    root the kernel may still answer from its attribute cache).
    """
    info = mounted_fs(path)
    if info is not None:
        fsname, fstype = info
        home = Path(fsname[len("hafs:") :]) if fstype == "fuse.hafs" else None
        pid = hafs_daemon(home, path) if home is not None else None
        if home is None:
            raise UserError(
                f"{path} is already a mountpoint ({fsname}, {fstype}): unmount it first, or"
                " choose another directory"
            )
        if pid is not None:
            raise UserError(
                f"{path} is already mounted: the filesystem in {home} is served there by"
                f" daemon {pid}; unmount it first ('hafs umount {path}')"
            )
        _detach_dead_mount(path, fsname)
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise UserError(f"mountpoint {path} does not exist: create it with 'mkdir -p {path}'")
        raise UserError(f"mountpoint {path} cannot be used: {e.strerror}")
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"mountpoint {path} is not a directory")
    if any(os.scandir(path)):
        raise UserError(f"mountpoint {path} is not empty: use an empty directory")


def pid_file(home: Path, mountpoint: Path) -> Path:
    """HOME/run/<hash of the mountpoint>.pid: "PID MOUNTPOINT" of the daemon serving it."""
    digest = hashlib.sha1(os.fsencode(os.path.realpath(mountpoint))).hexdigest()[:16]
    return home / "run" / f"{digest}.pid"


def metrics_file(home: Path, mountpoint: Path) -> Path:
    """HOME/run/<hash of the mountpoint>.metrics: the URL of the mount's metrics (-o metrics)."""
    return pid_file(home, mountpoint).with_suffix(".metrics")


def metrics_url(mountpoint: Path) -> str:
    """The URL of the metrics of the hafs mount at `mountpoint`; UserError if there is none."""
    mountpoint = mountpoint.absolute()
    info = mounted_fs(mountpoint)
    if info is None or info[1] != "fuse.hafs":
        raise UserError(f"{mountpoint} is not a hafs mountpoint: give the directory hafs mounted")
    home = Path(info[0][len("hafs:") :])
    try:
        return metrics_file(home, mountpoint).read_text().strip()
    except OSError:
        raise UserError(
            f"the mount at {mountpoint} serves no metrics: mount it with -o"
            " metrics=127.0.0.1:PORT (any free port) to use hafs stats"
        ) from None


def _limit_malloc_arenas() -> None:
    """Keep glibc from giving each worker thread its own heap arena.

    Blocks are 1 MiB buffers allocated in one thread and freed in another;
    with an arena per thread, freed memory piles up in arenas it cannot be
    returned from (measured with tools/memcheck.py: 958 MiB peak on a 5 GiB
    copy with default arenas).  Same as MALLOC_ARENA_MAX=2; no-op off glibc.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def run_foreground(home: Path, mountpoint: Path, options: str | None, ready_fd: int | None) -> int:
    """Mount and serve until unmounted or signalled; returns the exit code."""
    _limit_malloc_arenas()  # before any worker thread exists
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a peer's reset is an error, not our death
    home = home.absolute()
    mountpoint = mountpoint.absolute()

    def report(msg: str) -> None:
        if ready_fd is not None:
            os.write(ready_fd, (msg + "\n").encode())
            os.close(ready_fd)

    try:
        generic, rest = split_generic(options)
        opts, fuse_opts = parse_options(rest)
        if not home_mod.holds_fs(home) and home == home_mod.default_home().absolute():
            home_mod.create(home)
            log.info("created the default filesystem in %s", home)
        check_mountpoint(mountpoint)
        fs = home_mod.open_fs(
            home,
            opts.node_timeout_s,
            opts.lock_ttl_s,
            generic.read_only,
            home_mod.MOUNT_CHECK_S,
            opts.meta_timeout_s,
        )
        try:
            session, alone = None, False  # a read-only mount writes no session
            if not generic.read_only:
                session = fs.meta.sessions.register("mount", str(mountpoint), opts.lock_ttl_s)
                others = [s for s in fs.meta.sessions.alive() if s.id != session.id]
                alone = not any(s.kind == "mount" for s in others)
            down = home_mod.check_remote_nodes(fs)
            metrics = MountMetrics()
            observe = getattr(fs.meta, "observe_requests", None)  # engines with requests
            if observe is not None:
                observe(metrics.meta_request)
            if opts.metrics:
                metrics_at = metrics.serve(opts.metrics)
        except BaseException:
            fs.meta.close()
            raise
    except UserError as e:
        report(f"hafs: {e}")
        if ready_fd is None:
            print(f"hafs: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug, or damage no check foresaw: say so, keep the traceback
        log.exception("the mount of %s failed before serving", home)
        msg = (
            f"hafs: the mount failed before serving ({type(e).__name__}: {e}); see {home}/hafs.log"
        )
        report(msg)
        if ready_fd is None:
            print(msg, file=sys.stderr)
        return 1
    pidf = pid_file(home, mountpoint)
    pidf.parent.mkdir(exist_ok=True)
    pidf.write_text(f"{os.getpid()} {mountpoint}\n")
    metf = metrics_file(home, mountpoint)
    if opts.metrics:
        host, port = metrics_at
        metf.write_text(
            f"http://[{host}]:{port}/metrics\n"
            if ":" in host
            else f"http://{host}:{port}/metrics\n"
        )
        if not is_loopback(host):
            log.warning("serving metrics on %s:%d, beyond this machine", host, port)
        log.info("serving Prometheus metrics at %s", metf.read_text().strip())
    else:
        metf.unlink(missing_ok=True)
    log.info(
        "mounting %s (fs %s) at %s%s",
        home,
        fs.fs_uuid,
        mountpoint,
        " read-only" if generic.read_only else "",
    )
    try:
        fuse_opts |= generic.fuse_options()
        trio.run(
            _serve,
            fs,
            session,
            down,
            mountpoint,
            opts,
            fuse_opts,
            alone,
            report,
            generic.read_only,
            metrics,
        )
    finally:
        metrics.stop()
        metf.unlink(missing_ok=True)
        try:
            if session is not None:
                fs.meta.sessions.end(session)
        finally:
            fs.meta.close()
            pidf.unlink(missing_ok=True)
    log.info("unmounted %s", mountpoint)
    return 0


async def _serve(
    fs,
    session,
    down: dict[str, str],
    mountpoint: Path,
    opts: Options,
    fuse_opts: set[str],
    alone,
    report,
    read_only: bool,
    metrics: MountMetrics,
) -> None:
    placement = Placement(
        fs.ring,
        fs.stores,
        fs.replicas,
        trio.CapacityLimiter(opts.threads),
        fs.write_quorum,
        timeout=opts.node_timeout_s,
        metrics=metrics,
    )
    for node_id, why in down.items():
        placement.health.mark_down(node_id, why)
    vfs = Vfs(fs.meta, placement, opts, open_store=fs.open_store, read_only=read_only)
    ops = FuseOps(vfs)
    options = set(pyfuse3.default_options) | {f"fsname=hafs:{fs.home}", "subtype=hafs"}
    options |= fuse_opts
    async with trio.open_nursery() as nursery:
        await nursery.start(vfs.run, alone)
        if session is not None:
            nursery.start_soon(_session_loop, vfs, session, opts.lock_ttl_s)
        pyfuse3.init(ops, str(mountpoint), options)
        mounted = True
        try:
            report("ok")
            nursery.start_soon(_on_signals)
            nursery.start_soon(_when_served, mountpoint, opts.readahead_kb)
            await pyfuse3.main()  # returns on unmount or terminate()
            systemd.notify("STOPPING=1")
            await vfs.shutdown()
        finally:
            pyfuse3.close(unmount=mounted)
            nursery.cancel_scope.cancel()


async def _session_loop(vfs: Vfs, session, ttl_s: float) -> None:
    """Renew this mount's session (and so its lease) a few times per lease; while this
    mount leads, reap the sessions of mounts that died (the engine deletes the files they
    kept open after their unlink)."""
    sessions = vfs.meta.sessions
    while True:
        await trio.sleep(ttl_s / 4)
        try:
            session = await sessions.renew(session)
            if not await vfs.lead():
                continue
            for dead in await sessions.reap():
                log.warning(
                    "SESSION-ENDED of the mount at %s:%s (pid %d): it stopped renewing its lease",
                    dead.host,
                    dead.mountpoint,
                    dead.pid,
                )
        except MetaUnavailable as e:  # the engine logs an outage once
            log.debug("renewing the mount session failed: %s", e)
        except Exception as e:  # tried again next round; the mount stays up
            log.error("renewing the mount session failed: %s", e)


async def _when_served(mountpoint: Path, readahead_kb: int) -> None:
    """Once the kernel's FUSE handshake is done: set the read-ahead, tell systemd READY=1."""
    await trio.to_thread.run_sync(os.stat, mountpoint)  # waits for the handshake
    await trio.to_thread.run_sync(set_readahead, mountpoint, readahead_kb)
    systemd.notify("READY=1")


async def _on_signals() -> None:
    """SIGINT/SIGTERM: flush and unmount; SIGHUP: reopen the log file (logrotate)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for sig in signals:
            if sig == signal.SIGHUP:
                logs.reopen()
                continue
            log.info("signal %s: flushing and unmounting", signal.Signals(sig).name)
            pyfuse3.terminate()
            return


def start_background(argv: list[str], timeout: float = 60.0, keep_stderr: bool = False) -> int:
    """Start the daemon for `hafs mount ARGV` and wait until it is mounted or failed.

    keep_stderr: the daemon logs to this stderr (the journal, under systemd)."""
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "hafs", "mount", "--foreground", "--ready-fd", str(w), *argv]
    proc = subprocess.Popen(
        cmd,
        pass_fds=(w,),
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=None if keep_stderr else subprocess.DEVNULL,
    )
    os.close(w)
    deadline = time.monotonic() + timeout
    buf = b""
    with os.fdopen(r, "rb") as f:
        while time.monotonic() < deadline:
            chunk = f.read1(4096)
            if not chunk:
                break
            buf += chunk
            if buf.endswith(b"\n"):
                break
    msg = buf.decode(errors="replace").strip()
    if msg == "ok":
        return 0
    if proc.poll() is None and not msg:
        msg = f"hafs: the mount daemon (pid {proc.pid}) did not report within {timeout:.0f} s"
    elif not msg:
        msg = f"hafs: the mount daemon exited with code {proc.wait()} before mounting; see its log"
    print(msg, file=sys.stderr)
    return 2 if proc.wait() == 2 else 1


def umount(mountpoint: Path, timeout: float = 120.0) -> int:
    """Unmount a hafs mount and wait until its daemon has exited."""
    mountpoint = mountpoint.absolute()
    info = mounted_fs(mountpoint)
    if info is None or not info[0].startswith("hafs:"):
        raise UserError(f"{mountpoint} is not a hafs mountpoint")
    home = Path(info[0][len("hafs:") :])
    pid = None
    try:
        pid = int(pid_file(home, mountpoint).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    p = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True)
    if p.returncode != 0:
        raise UserError(
            f"cannot unmount {mountpoint}: {p.stderr.strip()} (close the files open in it first)"
        )
    deadline = time.monotonic() + timeout
    while pid is not None and _alive(pid):
        if time.monotonic() > deadline:
            print(f"hafs: daemon {pid} is still running after unmount", file=sys.stderr)
            return 1
        time.sleep(0.05)
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (child of a test harness) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False
