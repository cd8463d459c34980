#!/usr/bin/env python3
"""Run one filesystem yardstick on hafs, a plain directory and bindfs, side by side.

    python3 tools/bench.py [--quick] [--reps N] [--only seqwrite,...]
                           [--targets hafs,hafs-nodes,cluster,plain,bindfs]
                           [-o cache_mb=256,...]
                           [--json OUT.jsonl] [--keep] [--workdir /var/tmp]
                           [--fsbench PATH] [--timeout SECONDS]

Every target gets a fresh directory inside one temporary directory under
--workdir (default /var/tmp; refused if it is a tmpfs, so every target lives
on the same disk):

  hafs    `hafs mkfs` with the defaults (R=2, three backing directories in
          HOME/nodes), mounted with `hafs mount --home HOME [-o OPTIONS] MNT`;
  hafs-nodes  the same workloads on three `hafs node` processes on loopback
          ports (data directories on the same disk), claimed by `hafs mkfs
          --node URL ...` (R=2, W=2), mounted the same way; the nodes are
          stopped by PID afterwards;
  cluster the same over three more `hafs node`s, with the metadata in a 3-member etcd
          cluster on loopback ports (tests/etcdproc.py of this checkout; `hafs mkfs --meta
          etcd://.../bench --home HOME --node URL ...`); etcd and the nodes are stopped by
          PID afterwards (skipped with a note when etcd is not installed);
  plain   a plain directory on the same filesystem;
  bindfs  `bindfs SRC MNT` (libfuse's C passthrough; skipped with a note when
          bindfs is not installed), the cost of FUSE itself.

On each it runs `python3 FSBENCH DIR LABEL --unique-data [--quick] [--reps N]
[--only ...]` (the yardstick syncs and drops the kernel caches itself), collects
its JSON lines and prints one table: a row per workload, a column per target, each
cell the median rate over the repetitions and, with --reps >= 2, the spread
(half of max - min of the per-repetition rates, relative to the median).

FUSE requests: hafs targets are mounted with `-o metrics=127.0.0.1:PORT` (a free
port; or the one given in -o), and the mount's per-operation request counters are
read whenever the yardstick reports a workload; the difference is that workload's
requests (and, on cluster, its requests to etcd, `hafs_meta_request_seconds`, listed
under the table with their mean time), shown in a "req" column per hafs target: per
MiB (seqwrite, seqread, cp), per file (smallfiles, tree: the yardstick reports their
phases together, so one figure covers all of them, shown on the first phase's row) and
per write
(randwrite, its pre-fill included), with the busiest operations listed under the
table, so that a change in round trips shows up beside the rates.

Whatever happens (a failure, a hang past --timeout, Ctrl-C, SIGTERM) every
mount made here is unmounted before exit: `hafs umount MNT` (or `fusermount3
-u MNT` for bindfs), falling back to `fusermount3 -u -z MNT`.

FSBENCH, the yardstick: `--fsbench PATH` (any script with that interface and
its JSON lines), else the shared fsbench.py of the workspace when a checkout
has one beside it (../shared/bench/fsbench.py), else the built-in one,
tools/fsbench_builtin.py (the same workloads, standard library only), so a
bare clone runs as it is; `--fsbench builtin` picks the built-in one always.

Exit code: 0 all targets ran, 1 a target failed or hung, 2 bad input, 130
interrupted.  Standard library only (plus the `hafs` command and bindfs; the cluster
target also imports this checkout's hafs and tests/etcdproc.py, and runs etcd).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILTIN_FSBENCH = REPO / "tools" / "fsbench_builtin.py"
SHARED_FSBENCH = REPO.parent / "shared" / "bench" / "fsbench.py"  # used when present
ALL_TARGETS = ["hafs", "hafs-nodes", "cluster", "plain", "bindfs"]
ALL_WORKLOADS = ["seqwrite", "seqread", "cp", "smallfiles", "tree", "randwrite"]
# Table rows: (row name, fsbench workload, field of the record holding the rate)
ROWS = [
    ("seqwrite", "seqwrite", "rate"),
    ("seqread", "seqread", "rate"),
    ("cp", "cp", "rate"),
    ("smallfiles_create", "smallfiles_create", "rate"),
    ("smallfiles_stat", "smallfiles_stat", "rate"),
    ("smallfiles_read", "smallfiles_read", "rate"),
    ("smallfiles_delete", "smallfiles_delete", "rate"),
    ("tree_untar", "tree_untar", "rate"),
    ("tree_diff", "tree_diff", "rate"),
    ("tree_rmrf", "tree_rmrf", "rate"),
    ("randwrite", "randwrite", "rate"),
    ("randwrite+fsync", "randwrite", "iops_incl_fsync"),
]
MiB = 1024 * 1024
GiB = 1024 * MiB

INTERRUPTED = False  # set when a Ctrl-C / SIGTERM was seen, even if deferred


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# processes, mounts and cleanup (also used by tools/memcheck.py)
# ---------------------------------------------------------------------------


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def install_sigterm_handler() -> None:
    """Make SIGTERM behave like Ctrl-C, so `kill PID` also runs the cleanup.

    SIGINT gets Python's usual handler even when we were started with it ignored
    (as `cmd &` in a non-interactive shell does), so `kill -INT` works there too.
    """
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def hafs_cmd() -> list[str]:
    exe = shutil.which("hafs")
    return [exe] if exe else [sys.executable, "-m", "hafs"]


class Result:
    def __init__(self, rc: int | None, out: str, err: str, seconds: float):
        self.rc, self.out, self.err, self.seconds = rc, out, err, seconds

    def __bool__(self) -> bool:
        return self.rc == 0


def run_shielded(cmd: list[str], timeout: float | None = None, reraise: bool = True) -> Result:
    """Run `cmd` to completion in its own session, so a Ctrl-C does not cut it short.

    A Ctrl-C (KeyboardInterrupt) seen while it runs is remembered and re-raised
    once it has finished (when `reraise`), so `hafs mount` never leaves a half-started
    daemon behind and `hafs umount` always completes.  On timeout the command is
    killed and rc is None.
    """
    global INTERRUPTED
    interrupted = False
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        p = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, start_new_session=True
        )
        rc: int | None = None
        while True:
            try:
                left = None if timeout is None else max(0.0, timeout - (time.monotonic() - t0))
                rc = p.wait(timeout=left)
                break
            except KeyboardInterrupt:
                interrupted = INTERRUPTED = True
                log(f"  (interrupt noted: waiting for '{' '.join(cmd)}' to finish first)")
            except subprocess.TimeoutExpired:
                log(f"  '{' '.join(cmd)}' did not finish within {timeout:.0f} s: killing it")
                p.kill()
                p.wait()
                rc = None
                break
        fo.seek(0)
        fe.seek(0)
        res = Result(
            rc,
            fo.read().decode(errors="replace"),
            fe.read().decode(errors="replace"),
            time.monotonic() - t0,
        )
    if interrupted and reraise:
        raise KeyboardInterrupt
    return res


def mounted_at(path: Path) -> tuple[str, str] | None:
    """(source, fstype) of what is mounted exactly at `path`, else None."""
    target = os.path.realpath(path)
    found = None
    with open("/proc/self/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            if mnt.replace("\\040", " ") == target:
                found = (dev, fstype)  # the last one is the top of the stack
    return found


def mounts_under(path: Path) -> list[str]:
    root = os.path.realpath(path).rstrip("/") + "/"
    with open("/proc/self/mounts") as f:
        return [
            m.replace("\\040", " ")
            for m in (line.split()[1] for line in f)
            if m.replace("\\040", " ").startswith(root)
        ]


def fs_of(path: Path) -> tuple[str, str, str]:
    """(mountpoint, fstype, device) of the filesystem holding `path`."""
    path_s = os.path.realpath(path)
    best = ("", "?", "?")
    with open("/proc/self/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            mnt = mnt.replace("\\040", " ")
            if (path_s == mnt or path_s.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(
                best[0]
            ):
                best = (mnt, fstype, dev)
    return best


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def hafs_daemon_pid(home: Path, mnt: Path) -> int | None:
    """Pid of the daemon serving `mnt`, or None.

    Looks where hafs writes it: HOME/mount.pid ("PID MOUNTPOINT") or, with
    several mounts per home, HOME/run/*.pid (same format); then, as a last resort,
    for a live `hafs mount --foreground ... MNT` process.
    """
    target = os.path.realpath(mnt)
    candidates = [home / "mount.pid", *sorted((home / "run").glob("*.pid"))]
    for f in candidates:
        try:
            fields = f.read_text().split(maxsplit=1)
            pid = int(fields[0])
        except (OSError, ValueError, IndexError):
            continue
        where = fields[1].strip() if len(fields) > 1 else ""
        if (not where or os.path.realpath(where) == target) and pid_alive(pid):
            return pid
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv if a]
        if "hafs" in " ".join(args[:3]) and "--foreground" in args and target in args:
            return int(d.name)
    return None


def unmount(mnt: Path, kind: str, home: Path | None = None) -> bool:
    """Unmount `mnt` (kind 'hafs' or 'fuse'); never raises, never gives up silently.

    hafs: `hafs umount MNT` (flushes, waits for the daemon), retried a few times
    if the mount is busy, then `fusermount3 -u -z MNT`.  If a daemon we started
    is still alive afterwards it gets SIGTERM (by its pid, see hafs_daemon_pid).
    Returns True if nothing is left mounted at `mnt`.
    """
    pid = hafs_daemon_pid(home, mnt) if home is not None else None
    for _attempt in range(3):
        if not mounted_at(mnt):
            break
        if kind == "hafs":
            r = run_shielded([*hafs_cmd(), "umount", str(mnt)], timeout=600, reraise=False)
        else:
            r = run_shielded(["fusermount3", "-u", str(mnt)], timeout=120, reraise=False)
        if r:
            if kind == "hafs":
                log(f"  unmounted {mnt} ({r.seconds:.1f} s, includes the final flush)")
            break
        log(f"  unmount of {mnt} failed (rc={r.rc}): {(r.err or r.out).strip()[-500:]}")
        time.sleep(2)
    if mounted_at(mnt):
        log(f"  falling back to: fusermount3 -u -z {mnt}")
        run_shielded(["fusermount3", "-u", "-z", str(mnt)], timeout=60, reraise=False)
    if pid is not None:
        deadline = time.monotonic() + 60
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            log(f"  hafs daemon {pid} still alive 60 s after unmount: sending SIGTERM")
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    ok = not mounted_at(mnt)
    if not ok:
        log(f"  WARNING: {mnt} is STILL MOUNTED")
    return ok


def log_tail(logfile: Path, lines: int = 30) -> str:
    try:
        text = logfile.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(cannot read {logfile}: {e})"
    return "\n".join(text[-lines:])


def log_problems(logfile: Path) -> list[str]:
    """Lines of the hafs log that a healthy run does not write."""
    try:
        text = logfile.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [ln for ln in text if " WARNING " in ln or " ERROR " in ln or "Traceback" in ln]


# ---------------------------------------------------------------------------
# machine description
# ---------------------------------------------------------------------------


def git_revision() -> str:
    """Short HEAD, plus '+dirty (N files)' if the tree has changes (read-only git calls)."""
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
    try:
        rev = (
            subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                env=env,
                timeout=30,
            ).stdout.strip()
            or "?"
        )
        st = subprocess.run(
            [
                "git",
                "-C",
                str(REPO),
                "--no-optional-locks",
                "status",
                "--porcelain",
                "--untracked-files=no",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        ).stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return f"{rev}+dirty ({len(st)} tracked files modified)" if st else rev


def _bindfs_version() -> str:
    exe = shutil.which("bindfs")
    if not exe:
        return "not installed"
    try:
        v = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
        ver = (v.stdout or v.stderr).strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        ver = "bindfs"
    return ver + (" on libfuse 2" if _links_libfuse2(exe) else "")


def loadavg() -> str:
    """'1-min 5-min 15-min' load averages: other work on the machine skews every figure."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def busy_warning(info: dict) -> str | None:
    try:
        one = float(info["loadavg_start"].split()[0])
    except (ValueError, IndexError, KeyError):
        return None
    if one > 0.5 * info["nproc"]:
        return (
            f"WARNING: load average {one:.2f} on {info['nproc']} CPUs at the start: other work is"
            " running, expect noisy figures"
        )
    return None


def machine_info(workdir: Path) -> dict:
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    du = shutil.disk_usage(workdir)
    mnt, fstype, dev = fs_of(workdir)
    return {
        "host": platform.node(),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "workdir": str(workdir),
        "workdir_fs": f"{fstype} on {dev} (mounted at {mnt})",
        "disk_free": f"{du.free / GiB:.1f} GiB of {du.total / GiB:.1f} GiB",
        "hafs_revision": git_revision(),
        "loadavg_start": loadavg(),
    }


# ---------------------------------------------------------------------------
# fsbench runs
# ---------------------------------------------------------------------------


class TargetRun:
    def __init__(self, name: str):
        self.name = name
        self.records: list[dict] = []
        self.status = "not run"  # ok | failed | timeout | skipped | interrupted
        self.note = ""
        self.seconds = 0.0


def mount_counters(url: str) -> dict[str, Counter]:
    """Of the hafs mount serving metrics at `url`: FUSE requests answered, by operation
    ("fuse"); requests to the metadata store, by call ("meta"), and their seconds
    ("meta_s")."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, Counter] = {"fuse": Counter(), "meta": Counter(), "meta_s": Counter()}
    series = [
        ("hafs_fuse_op_seconds_count{", 'op="', "fuse", int),
        ("hafs_meta_request_seconds_count{", 'call="', "meta", int),
        ("hafs_meta_request_seconds_sum{", 'call="', "meta_s", float),
    ]
    for line in text.splitlines():
        for prefix, label, kind, cast in series:
            if line.startswith(prefix) and label in line:
                labels, _, value = line.rpartition(" ")
                out[kind][labels.split(label, 1)[1].split('"', 1)[0]] += cast(float(value))
    return out


def with_metrics(options: str | None) -> tuple[str, str]:
    """Mount options with metrics served (a free loopback port unless -o names one), and
    the URL of those metrics."""
    opts = [o for o in (options or "").split(",") if o]
    given = [o.split("=", 1)[1] for o in opts if o.startswith("metrics=")]
    if given:
        host, _, port = given[-1].rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
    else:
        host, port = "127.0.0.1", str(free_port())
        opts.append(f"metrics={host}:{port}")
    return ",".join(opts), f"http://{host}:{port}/metrics"


def run_fsbench(
    args, target: TargetRun, directory: Path, raw: list[dict], metrics_url: str | None = None
) -> None:
    """Run fsbench on `directory`, filling target.records; never leaves the child running.
    metrics_url: of the hafs mount under test; each record gets the FUSE requests answered
    since the previous one (`fuse_requests`, by operation) and, where there are any, the
    requests to the metadata store (`meta_requests` by call, `meta_seconds`)."""
    cmd = [
        sys.executable,
        str(args.fsbench),
        str(directory),
        target.name,
        "--unique-data",
        "--reps",
        str(args.reps),
        "--only",
        ",".join(args.only),
    ]
    if args.quick:
        cmd.append("--quick")
    log(f"[{target.name}] {' '.join(cmd)}")
    t0 = time.monotonic()
    # stdout: JSON lines for us; stderr: straight to the terminal
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    timed_out = threading.Event()

    def watchdog():
        timed_out.set()
        log(f"[{target.name}] fsbench exceeded --timeout {args.timeout:.0f} s: stopping it")
        try:
            proc.send_signal(signal.SIGINT)  # lets fsbench remove its work dir
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        except ProcessLookupError:
            pass

    timer = threading.Timer(args.timeout, watchdog)
    timer.daemon = True
    timer.start()
    seen: dict[str, Counter] = {}
    try:
        for line in proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                log(f"[{target.name}] {line}")
                continue
            if metrics_url is not None:
                try:
                    now = mount_counters(metrics_url)
                except (OSError, ValueError) as e:
                    log(f"[{target.name}] cannot read the mount's metrics: {e}")
                    metrics_url = None
                else:
                    if rec.get("workload") != "meta":
                        diff = {k: +(v - seen.get(k, Counter())) for k, v in now.items()}
                        rec["fuse_requests"] = dict(diff["fuse"])
                        if now["meta"]:
                            rec["meta_requests"] = dict(diff["meta"])
                            rec["meta_seconds"] = sum(diff["meta_s"].values())
                    seen = now
            raw.append(rec)
            target.records.append(rec)
            w = rec.get("workload")
            if w == "meta":
                log(
                    f"[{target.name}] fs under test: {rec.get('fstype')} at {rec.get('mountpoint')}"
                    f", drop_caches permitted: {rec.get('drop_caches')}"
                )
            elif w == "done":
                log(f"[{target.name}] done in {rec.get('total_s')} s")
            else:
                extra = ""
                if "iops_incl_fsync" in rec:
                    extra = f", {rec['iops_incl_fsync']} IOPS incl. fsync"
                log(
                    f"[{target.name}] {w}: {rec.get('rate')} {rec.get('unit')} "
                    f"(median {rec.get('median_s')} s, samples {rec.get('samples_s')}){extra}"
                )
        rc = proc.wait()
    except KeyboardInterrupt:
        # the child shares our process group and got the Ctrl-C too; SIGTERM to us
        # did not reach it, so forward one; give it time to clean its work dir.
        target.status = "interrupted"
        try:
            proc.wait(5)  # a Ctrl-C reached it too: let it clean up on its own
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            pass
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass
        try:
            proc.wait(60)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            proc.kill()
            proc.wait()
        raise
    finally:
        timer.cancel()
        target.seconds = time.monotonic() - t0
    if timed_out.is_set():
        target.status = "timeout"
        target.note = f"fsbench did not finish within {args.timeout:.0f} s (killed)"
    elif rc != 0:
        target.status = "failed"
        target.note = f"fsbench exited with code {rc} (its stderr is above)"
    else:
        target.status = "ok"


def bench_hafs(args, target: TargetRun, tmp: Path, raw: list[dict]) -> None:
    """The embedded defaults: `hafs mkfs --home HOME` (three backing directories)."""
    mkfs_and_bench(args, target, tmp / "hafs-home", tmp / "hafs-mnt", [], raw)


NODES = 3  # `hafs node` processes of the hafs-nodes target (R=2, like the embedded defaults)


@contextlib.contextmanager
def running_nodes(tmp: Path, name: str) -> Iterator[list[str]]:
    """NODES `hafs node` processes on loopback ports, data in TMP/NAME<i>: their URLs.
    RuntimeError (with its log's tail) if one does not start; stopped by PID on the way
    out."""
    procs: list[subprocess.Popen] = []
    try:
        urls = []
        for i in range(NODES):
            data, port = tmp / f"{name}{i}", free_port()
            data.mkdir()
            listen = f"127.0.0.1:{port}"
            logf = open(tmp / f"{name}{i}.log", "wb")  # noqa: SIM115 - closed with the process
            procs.append(
                subprocess.Popen(
                    [*hafs_cmd(), "node", "--data", str(data), "--listen", listen],
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # a Ctrl-C here reaches us; we stop them in order
                )
            )
            logf.close()
            if not wait_listening(port, procs[-1]):
                raise RuntimeError(
                    f"hafs node on {listen} did not start: {log_tail(tmp / f'{name}{i}.log')}"
                )
            urls.append(f"http://{listen}")
        yield urls
    finally:
        for proc in procs:
            stop_process(proc)


def node_args(urls: list[str]) -> list[str]:
    return [a for url in urls for a in ("--node", url)]


def bench_hafs_nodes(args, target: TargetRun, tmp: Path, raw: list[dict]) -> None:
    """Three `hafs node` processes on loopback ports, claimed by `hafs mkfs --node URL ...`."""
    with running_nodes(tmp, "node") as urls:
        log(f"[{target.name}] {NODES} hafs node processes: {', '.join(urls)}")
        mkfs_and_bench(args, target, tmp / "nodes-home", tmp / "nodes-mnt", node_args(urls), raw)


def etcd_helpers():
    """tests/etcdproc.py of this checkout (the tests' etcd cluster: it imports hafs, this
    checkout's first); ImportError saying what is missing."""
    for path in (REPO / "tests", REPO):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    try:
        import etcdproc
    except ImportError as e:
        raise ImportError(
            f"the cluster target needs this checkout's tests/etcdproc.py and hafs ({e})"
        ) from None
    return etcdproc


def bench_cluster(args, target: TargetRun, tmp: Path, raw: list[dict]) -> None:
    """Three etcd members and three `hafs node`s on loopback: `hafs mkfs --meta URL`."""
    etcdproc = etcd_helpers()
    if etcdproc.etcd_binary() is None:
        target.status = "skipped"
        target.note = "etcd is not installed (apt-get install etcd-server)"
        return
    (tmp / "etcd").mkdir()
    with etcdproc.running_cluster(tmp / "etcd") as cluster, running_nodes(tmp, "cnode") as urls:
        url = cluster.url("bench")
        log(f"[{target.name}] etcd {url}; {NODES} hafs node processes: {', '.join(urls)}")
        mkfs_args = ["--meta", url, *node_args(urls)]
        mkfs_and_bench(args, target, tmp / "cluster-home", tmp / "cluster-mnt", mkfs_args, raw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM by PID, then SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def mkfs_and_bench(
    args, target: TargetRun, home: Path, mnt: Path, mkfs_args: list[str], raw: list[dict]
) -> None:
    """`hafs mkfs --home HOME MKFS_ARGS`, mount at MNT, run fsbench, unmount, report."""
    mnt.mkdir()
    r = run_shielded([*hafs_cmd(), "mkfs", "--home", str(home), *mkfs_args], timeout=120)
    if not r:
        target.status, target.note = "failed", f"hafs mkfs failed (rc={r.rc}): {r.err.strip()}"
        return
    log(f"[{target.name}] {r.out.strip()}")
    options, metrics_url = with_metrics(args.options)
    cmd = [*hafs_cmd(), "mount", "--home", str(home), "-o", options, str(mnt)]
    try:
        r = run_shielded(cmd, timeout=120)
        if not r or not mounted_at(mnt):
            target.status = "failed"
            target.note = f"'{' '.join(cmd)}' failed (rc={r.rc}): {(r.err or r.out).strip()}"
            log(
                f"[{target.name}] {target.note}\n--- tail of {home / 'hafs.log'} ---\n"
                f"{log_tail(home / 'hafs.log')}"
            )
            return
        log(
            f"[{target.name}] mounted at {mnt} (daemon pid {hafs_daemon_pid(home, mnt)},"
            f" options: {options})"
        )
        run_fsbench(args, target, mnt, raw, metrics_url)
    finally:
        t_umount = time.monotonic()
        was_mounted = bool(mounted_at(mnt))
        ok = unmount(mnt, "hafs", home)
        if was_mounted:
            target.note += (
                f"{'; ' if target.note else ''}'hafs umount' took"
                f" {time.monotonic() - t_umount:.1f} s (final flush included)"
            )
        problems = log_problems(home / "hafs.log")
        if problems:
            target.note += (
                f"{'; ' if target.note else ''}hafs.log has {len(problems)}"
                f" warning/error lines, e.g. {problems[0]!r}"
            )
        if not ok:
            target.note += f"{'; ' if target.note else ''}{mnt} could not be unmounted"
        if target.status in ("failed", "timeout") or problems:
            logfile = home / "hafs.log"
            log(f"[{target.name}] --- tail of {logfile} ---\n{log_tail(logfile)}")
    st = run_shielded([*hafs_cmd(), "status", "--home", str(home), "--json"], timeout=120)
    try:
        s = json.loads(st.out)
        target.note += (
            f"{'; ' if target.note else ''}after the run: {s['inodes']} inodes, "
            f"{s['logical_bytes'] / MiB:.0f} MiB logical, "
            f"{sum(n.get('bytes') or 0 for n in s['nodes']) / MiB:.0f} MiB in "
            f"node dirs (R={s['replicas']}; blocks freed by the run wait for gc)"
        )
    except (ValueError, KeyError, TypeError):
        pass


def bench_plain(args, target: TargetRun, tmp: Path, raw: list[dict]) -> None:
    d = tmp / "plain"
    d.mkdir()
    run_fsbench(args, target, d, raw)


def bench_bindfs(args, target: TargetRun, tmp: Path, raw: list[dict]) -> None:
    exe = shutil.which("bindfs")
    if not exe:
        target.status, target.note = "skipped", "bindfs is not installed"
        return
    src, mnt = tmp / "bindfs-src", tmp / "bindfs-mnt"
    src.mkdir()
    mnt.mkdir()
    cmd = [exe, *shlex.split(args.bindfs_args or ""), str(src), str(mnt)]
    log(f"[bindfs] {' '.join(cmd)}")
    try:
        r = run_shielded(cmd, timeout=60)
        if not r or not mounted_at(mnt):
            target.status = "failed"
            target.note = f"bindfs failed (rc={r.rc}): {(r.err or r.out).strip()}"
            return
        if "big_writes" not in (args.bindfs_args or "") and _links_libfuse2(exe):
            target.note = (
                "bindfs is built on libfuse 2: without --bindfs-args='-o big_writes'"
                " the kernel hands it writes in 4 KiB pieces (hafs, on libfuse 3,"
                " gets up to 128 KiB), and it runs single-threaded"
            )
        run_fsbench(args, target, mnt, raw)
    finally:
        if not unmount(mnt, "fuse"):
            target.note += f"{'; ' if target.note else ''}{mnt} could not be unmounted"


def _links_libfuse2(exe: str) -> bool:
    try:
        out = subprocess.run(["ldd", exe], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "libfuse.so.2" in out


RUNNERS = {
    "hafs": bench_hafs,
    "hafs-nodes": bench_hafs_nodes,
    "cluster": bench_cluster,
    "plain": bench_plain,
    "bindfs": bench_bindfs,
}


# ---------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------


def _fmt_rate(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def cell(rec: dict | None, field: str) -> tuple[str, float | None]:
    if rec is None or rec.get(field) is None:
        return "-", None
    rate = float(rec[field])
    unit = rec.get("unit", "")
    text = f"{_fmt_rate(rate)} {unit}"
    # spread of the per-repetition rates around the median
    if field == "rate":
        if "iops_samples" in rec:
            rates = rec["iops_samples"]
        else:
            med_s = rec.get("median_s") or 0
            rates = [rate * med_s / s for s in rec.get("samples_s", []) if s > 0]
        if len(rates) >= 2 and rate > 0:
            text += f" ±{(max(rates) - min(rates)) / 2 / rate * 100:.0f}%"
    return text, rate


def _request_units(rec: dict) -> tuple[float, str]:
    """(how many units the requests of a workload's record are for, the unit)."""
    w, runs = rec.get("workload", ""), len(rec.get("samples_s") or [])
    if w in ("seqwrite", "seqread", "cp"):
        return runs * rec.get("size_mib", 0), "MiB"
    if w.startswith(("smallfiles_", "tree_")):
        return runs * rec.get("files", 0), "file"
    if w == "randwrite":
        if "writes" in rec:
            return rec["writes"], "write"
        rates = rec.get("iops_samples") or [rec.get("rate") or 0] * runs
        return sum(r * t for r, t in zip(rates, rec.get("samples_s") or [])), "write"
    return 0, ""


def request_figures(
    t: TargetRun, field: str = "fuse_requests"
) -> dict[str, tuple[str, Counter, float, float]]:
    """Workload (the first record of its group: smallfiles_* and tree_* are reported
    together) -> (requests per unit as text, the requests by operation, the units, their
    seconds).  field: "fuse_requests", or "meta_requests" (to the metadata store)."""
    groups: dict[str, list] = {}
    for rec in t.records:
        reqs, workload = rec.get(field), rec.get("workload", "")
        if reqs is None or workload == "done":
            continue
        group = groups.setdefault(workload.split("_")[0], [workload, Counter(), rec, 0.0])
        group[1].update(reqs)
        group[3] += rec.get("meta_seconds", 0.0)
    out = {}
    for first, counts, rec, seconds in groups.values():
        units, unit = _request_units(rec)
        if units > 0:
            out[first] = (f"{sum(counts.values()) / units:.3g}/{unit}", counts, units, seconds)
    return out


def request_notes(targets: list[TargetRun], field: str = "fuse_requests") -> list[str]:
    """The busiest operations (calls) per unit of each workload, for every hafs target;
    of the metadata store's requests also their mean time."""
    lines = []
    for t in targets:
        for workload, (text, counts, units, seconds) in request_figures(t, field).items():
            top = ", ".join(f"{n / units:.3g} {op}" for op, n in counts.most_common(5))
            mean = ""
            if field == "meta_requests" and counts:
                mean = f"; {seconds / sum(counts.values()) * 1000:.2f} ms each on average"
            lines.append(f"  {t.name} {workload.split('_')[0]}: {text} = {top}{mean}")
    return lines


def render_table(targets: list[TargetRun]) -> str:
    names = [t.name for t in targets]
    ratios = [
        (a, b)
        for a, b in (
            ("hafs-nodes", "hafs"),
            ("cluster", "hafs-nodes"),
            ("cluster", "hafs"),
            ("hafs", "plain"),
            ("hafs", "bindfs"),
        )
        if a in names and b in names
    ]
    requests = {t.name: request_figures(t) for t in targets}
    counted = [t.name for t in targets if requests[t.name]]
    header = ["workload", *names, *[f"{a}/{b}" for a, b in ratios], *[f"{n} req" for n in counted]]
    rows = [header]
    for row, workload, field in ROWS:
        vals: dict[str, float | None] = {}
        line = [row]
        for t in targets:
            rec = next((r for r in t.records if r.get("workload") == workload), None)
            if rec is None and t.status not in ("ok",):
                line.append(t.status.upper() if t.status != "not run" else "-")
                vals[t.name] = None
                continue
            text, v = cell(rec, field)
            line.append(text)
            vals[t.name] = v
        if all(v is None for v in vals.values()):
            continue
        for a, b in ratios:
            va, vb = vals.get(a), vals.get(b)
            line.append(f"{va / vb:.2f}x" if va and vb else "-")
        for name in counted:
            figure = requests[name].get(workload)
            same_group = "_" in workload and any(
                w.split("_")[0] == workload.split("_")[0] for w in requests[name]
            )
            line.append(figure[0] if figure else "^" if same_group else "-")
        rows.append(line)
    total = ["total time"]
    for t in targets:
        done = next((r for r in t.records if r.get("workload") == "done"), None)
        secs = done["total_s"] if done else t.seconds
        total.append("-" if not secs else f"{secs:.1f} s" if secs < 100 else f"{secs:.0f} s")
    total += [""] * (len(ratios) + len(counted))
    rows.append(total)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    out = []
    for i, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        out.append("  ".join(cells).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def sizes_note(targets: list[TargetRun]) -> list[str]:
    for t in targets:
        recs = {r.get("workload"): r for r in t.records}
        parts = []
        if "seqwrite" in recs:
            parts.append(
                f"seqwrite/seqread/cp: one {recs['seqwrite']['size_mib']} MiB file,"
                f" data {recs['seqwrite'].get('data')}"
            )
        if "smallfiles_create" in recs:
            r = recs["smallfiles_create"]
            parts.append(
                f"smallfiles: {r['files']} files of {r['file_size'] // 1024} KiB in"
                f" {r['dirs']} dirs"
            )
        if "tree_untar" in recs:
            r = recs["tree_untar"]
            parts.append(f"tree: {r['files']} files, {r['mib']} MiB")
        if "randwrite" in recs:
            r = recs["randwrite"]
            parts.append(
                f"randwrite: {r['threads']} threads x {r['file_mib']} MiB files, {r['seconds']} s"
            )
        if parts:
            return parts
    return []


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="Compare hafs with a plain directory and bindfs on one yardstick.",
        epilog="Cells: median rate over --reps repetitions; '±N%' is half the range of the"
        " per-repetition rates relative to the median.  hafs/plain and hafs/bindfs are ratios"
        " of the medians (above 1 = hafs faster).",
    )
    ap.add_argument(
        "--quick", action="store_true", help="pass --quick to the yardstick (~10x smaller)"
    )
    ap.add_argument("--reps", type=int, default=3, help="repetitions per timing (default 3)")
    ap.add_argument(
        "--only",
        default=",".join(ALL_WORKLOADS),
        help="comma-separated subset of: " + ",".join(ALL_WORKLOADS),
    )
    ap.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help="comma-separated subset of: " + ",".join(ALL_TARGETS) + " (run in this order)",
    )
    ap.add_argument(
        "-o",
        dest="options",
        metavar="OPTIONS",
        default=None,
        help="mount options passed to 'hafs mount -o' (e.g. cache_mb=256)",
    )
    ap.add_argument(
        "--bindfs-args",
        metavar="ARGS",
        default=None,
        help="extra bindfs arguments, one shell-quoted string, e.g."
        " --bindfs-args='-o big_writes --multithreaded' (default: none)",
    )
    ap.add_argument(
        "--json",
        dest="json_out",
        metavar="OUT",
        type=Path,
        help="write every raw fsbench JSON line (plus a header line) to OUT",
    )
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directory (hafs home, backing dirs, ...)",
    )
    ap.add_argument(
        "--workdir",
        type=Path,
        default=Path("/var/tmp"),
        help="where the temporary directory is made (default /var/tmp; not a tmpfs)",
    )
    ap.add_argument(
        "--fsbench",
        metavar="PATH|builtin",
        default=None,
        help="the yardstick: a script taking fsbench.py's arguments, or 'builtin' for"
        " tools/fsbench_builtin.py (default: ../shared/bench/fsbench.py beside the checkout"
        " when there is one, else the built-in one)",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds one target's fsbench run may take before it is declared hung"
        " and stopped (default 600 with --quick, 3600 otherwise)",
    )
    args = ap.parse_args(argv)
    args.only = [w.strip() for w in args.only.split(",") if w.strip()]
    bad = [w for w in args.only if w not in ALL_WORKLOADS]
    if bad:
        ap.error(f"unknown workload(s) {bad}; known: {','.join(ALL_WORKLOADS)}")
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in args.targets if t not in ALL_TARGETS]
    if bad or not args.targets:
        ap.error(f"unknown target(s) {bad}; known: {','.join(ALL_TARGETS)}")
    if args.reps < 1:
        ap.error("--reps must be at least 1")
    if args.timeout is None:
        args.timeout = 600.0 if args.quick else 3600.0
    if args.fsbench == "builtin" or (args.fsbench is None and not SHARED_FSBENCH.is_file()):
        args.fsbench = BUILTIN_FSBENCH
    args.fsbench = Path(args.fsbench or SHARED_FSBENCH).resolve()
    if not args.fsbench.is_file():
        ap.error(f"no yardstick at {args.fsbench}: give --fsbench PATH, or --fsbench builtin")
    if not args.workdir.is_dir():
        ap.error(f"--workdir {args.workdir} is not a directory")
    if fs_of(args.workdir)[1] == "tmpfs":
        ap.error(f"--workdir {args.workdir} is on a tmpfs (memory): pick a directory on a disk")
    # one 1 GiB file + its copy, R=2, plus garbage kept for gc_grace_s: ~10 GiB full
    need = (2 if args.quick else 12) * GiB
    free = shutil.disk_usage(args.workdir).free
    if free < need:
        ap.error(
            f"{args.workdir} has {free / GiB:.1f} GiB free; this run needs about"
            f" {need / GiB:.0f} GiB"
        )
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    install_sigterm_handler()
    t_start = time.monotonic()
    info = machine_info(args.workdir)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    header = [
        f"hafs bench  {started}  ({'quick' if args.quick else 'full'} sizes, reps={args.reps})",
        f"machine : {info['host']}: {info['nproc']} CPUs ({info['cpu']}), {info['memory']} RAM,"
        f" kernel {info['kernel']}, Python {info['python']}",
        f"disk    : {info['workdir']}: {info['workdir_fs']}, {info['disk_free']} free;"
        f" load average at start {info['loadavg_start']}",
        f"hafs    : revision {info['hafs_revision']}; mkfs defaults (R=2, 3 backing dirs on"
        f" this disk; hafs-nodes: {NODES} hafs node processes on loopback, R=2, W=2;"
        f" cluster: the same with 3 etcd members on loopback);"
        f" mount options: {args.options or 'defaults'}",
        f"fsbench : {args.fsbench}"
        f"{' (built in)' if args.fsbench == BUILTIN_FSBENCH else ''} --unique-data",
    ]
    if "bindfs" in args.targets:
        header.append(f"bindfs  : {_bindfs_version()}, arguments: {args.bindfs_args or 'none'}")
    log("\n".join(header))
    raw: list[dict] = [
        {
            "workload": "bench_header",
            "started": started,
            "argv": sys.argv,
            "options": args.options,
            "bindfs_args": args.bindfs_args,
            "quick": args.quick,
            "reps": args.reps,
            **info,
        }
    ]
    tmp = Path(tempfile.mkdtemp(prefix="hafs-bench-", dir=args.workdir))
    log(f"temporary directory: {tmp}")
    targets = [TargetRun(name) for name in args.targets]
    rc = 0
    try:
        for t in targets:
            log("")
            try:
                RUNNERS[t.name](args, t, tmp, raw)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - report and go on with the next target
                t.status, t.note = "failed", f"{type(e).__name__}: {e}"
                log(f"[{t.name}] {t.note}")
            if t.status in ("failed", "timeout"):
                rc = 1
    except KeyboardInterrupt:
        log("\ninterrupted: cleaning up")
        rc = 130
    finally:
        left = mounts_under(tmp)
        for m in left:  # should never happen: every runner unmounts what it mounted
            log(f"WARNING: {m} still mounted; unmounting")
            unmount(
                Path(m),
                "hafs" if (mounted_at(Path(m)) or ("", ""))[0].startswith("hafs:") else "fuse",
            )
        left = mounts_under(tmp)
        if args.keep:
            log(f"kept {tmp}")
        elif left:
            log(f"NOT removing {tmp}: still mounted under it: {left}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if INTERRUPTED and rc == 0:
        rc = 130

    print("\n".join(header))
    print()
    print(render_table(targets))
    notes = sizes_note(targets)
    if notes:
        print()
        print("sizes: " + "; ".join(notes))
    lines = request_notes(targets)
    if lines:
        print()
        print("FUSE requests per unit, the busiest operations ('^': counted in the row above;")
        print("the randwrite figure includes its pre-fill):")
        print("\n".join(lines))
    lines = request_notes(targets, "meta_requests")
    if lines:
        print()
        print("Requests to etcd (hafs_meta_request_seconds) per unit, the busiest calls:")
        print("\n".join(lines))
    for t in targets:
        meta = next((r for r in t.records if r.get("workload") == "meta"), None)
        line = f"{t.name}: {t.status}"
        if meta:
            line += f", {meta.get('fstype')} at {meta.get('mountpoint')}"
            if not meta.get("drop_caches"):
                line += ", kernel caches NOT dropped (not root?)"
        if t.note:
            line += f"; {t.note}"
        print(line)
    warn = busy_warning(info)
    if warn:
        print(warn)
    print(f"wall time: {time.monotonic() - t_start:.0f} s; load average at the end {loadavg()}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            for rec in raw:
                f.write(json.dumps(rec) + "\n")
        print(f"raw JSON lines: {args.json_out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
