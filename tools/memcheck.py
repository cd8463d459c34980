#!/usr/bin/env python3
"""Prove that the hafs daemon's memory stays bounded while large files go through it.

    python3 tools/memcheck.py [--size-gib 5] [--dir /var/tmp] [-o cache_mb=...,...]
                              [--overhead-mib 256] [--interval 0.2] [--json OUT] [--keep]

Steps, on a fresh filesystem (`hafs mkfs` defaults: R=2, three backing
directories) made in a temporary directory under --dir and mounted with
`hafs mount -o OPTIONS`:

  write  one file of --size-gib GiB through the mount with 1 MiB write()s of
         os.urandom data (nothing is kept: every MiB is new, so dedup cannot
         help), hashed on the fly (BLAKE3), then fsync();
  cp     `cp big.bin big.copy` inside the mount, then fsync of the copy
         (kernel caches dropped first);
  read   read big.copy and then big.bin back with 1 MiB reads (kernel caches
         dropped first), hashing on the fly, and compare with the write hash;
  umount `hafs umount` (final flush, daemon exit).

Meanwhile a sampler thread reads the daemon's RSS (psutil, pid from
HOME/mount.pid or HOME/run/*.pid) and its RssAnon every --interval seconds.
Since short spikes can fall between two samples, each phase also starts by
resetting the kernel's peak-RSS counter (writing 5 to /proc/PID/clear_refs)
and ends by reading it (VmHWM in /proc/PID/status); the phase's peak is the
larger of the two.

Bound: cache_mb + write_buffer_mb (the mount's configured limits) +
--overhead-mib (default 256 MiB: interpreter, libraries, metadata, in-flight
block I/O).  Exit code: 0 every phase stayed within the bound and the data
read back intact; 1 the bound was exceeded, the data differed, or hafs failed;
2 bad input (e.g. not enough free space); 130 interrupted.  The mount is
always unmounted, also on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (tools/bench.py: mount/unmount helpers)
from fsbench_builtin import drop_caches  # noqa: E402  (sync, then drop the kernel caches)

try:
    import psutil
except ImportError:  # pragma: no cover
    sys.exit("memcheck needs psutil: pip install psutil")

try:
    from blake3 import blake3 as _hasher

    HASH_NAME = "blake3"
except ImportError:  # pragma: no cover
    _hasher = hashlib.sha256
    HASH_NAME = "sha256"

MiB = 1024 * 1024
GiB = 1024 * MiB
DEFAULT_CACHE_MB, DEFAULT_WRITE_BUFFER_MB = 128, 256  # hafs.vfs.Options defaults


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def configured_limits(options: str | None) -> tuple[int, int]:
    """(cache_mb, write_buffer_mb) the mount will use, parsed the way hafs parses -o."""
    try:
        from hafs.mount import parse_options

        opts, _ = parse_options(options)
        return int(opts.cache_mb), int(opts.write_buffer_mb)
    except ImportError:
        vals = {"cache_mb": DEFAULT_CACHE_MB, "write_buffer_mb": DEFAULT_WRITE_BUFFER_MB}
        for item in filter(None, (options or "").split(",")):
            k, _, v = item.partition("=")
            if k in vals:
                vals[k] = int(v)
        return vals["cache_mb"], vals["write_buffer_mb"]


class Sampler(threading.Thread):
    """Polls the daemon's RSS; keeps every sample and the peak of each phase."""

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid = pid
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.phase = "mounted"
        self.progress = ""  # what the main thread is doing, for the periodic line
        self.samples: list[tuple[float, str, int]] = []
        self.peak: dict[str, int] = {}
        self.peak_anon: dict[str, int] = {}
        self.last: dict[str, int] = {}  # the last RSS sampled in each phase
        self.hwm: dict[str, int] = {}  # kernel VmHWM per phase (exact peak)
        self.gone = False
        self._halt = threading.Event()
        self.t0 = time.monotonic()

    def _vm(self, key: str) -> int | None:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def reset_hwm(self) -> bool:
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5\n")
            return True
        except OSError:
            return False

    def set_phase(self, phase: str) -> None:
        """End the current phase (record its VmHWM) and start `phase` with a fresh peak."""
        self.sample_once()
        hwm = self._vm("VmHWM")
        if hwm is not None and self.phase not in self.hwm:
            self.hwm[self.phase] = hwm
        self.phase = phase
        self.reset_hwm()
        self.sample_once()

    def end_phase_hwm(self) -> None:
        hwm = self._vm("VmHWM")
        if hwm is not None:
            self.hwm[self.phase] = hwm

    def sample_once(self) -> None:
        try:
            rss = self.proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            self.gone = True
            return
        except psutil.AccessDenied:
            return
        if rss == 0:  # exiting: its memory is being torn down
            return
        anon = self._vm("RssAnon") or 0  # heap etc.; RSS - anon = mapped files, shared
        phase = self.phase
        self.samples.append((time.monotonic() - self.t0, phase, rss, anon))
        if rss > self.peak.get(phase, 0):
            self.peak[phase] = rss
        if anon > self.peak_anon.get(phase, 0):
            self.peak_anon[phase] = anon
        self.last[phase] = rss

    def run(self) -> None:
        last_print = time.monotonic()
        while not self._halt.wait(self.interval):
            self.sample_once()
            if self.gone or not self.samples:
                if self.gone:
                    return
                continue
            now = time.monotonic()
            if now - last_print >= 10 and self.samples:
                last_print = now
                log(
                    f"  [{now - self.t0:6.0f} s] {self.phase:<6} {self.progress:<22}"
                    f" rss {self.samples[-1][2] / MiB:7.1f} MiB,"
                    f" phase peak {self.peak.get(self.phase, 0) / MiB:7.1f} MiB"
                )

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def write_phase(path: Path, size_mib: int, sampler: Sampler) -> tuple[str, float, float]:
    """Write size_mib MiB of fresh random data; returns (hash, write seconds, fsync seconds)."""
    h = _hasher()
    t0 = time.monotonic()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(size_mib):
            chunk = os.urandom(MiB)
            h.update(chunk)
            view = memoryview(chunk)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if i % 64 == 0:
                sampler.progress = f"{i / 1024:.2f}/{size_mib / 1024:.2f} GiB"
        sampler.progress = "fsync"
        t1 = time.monotonic()
        os.fsync(fd)
        t2 = time.monotonic()
    finally:
        os.close(fd)
    return h.hexdigest(), t1 - t0, t2 - t1


def read_hash(path: Path, size: int, sampler: Sampler, what: str) -> tuple[str, int]:
    h = _hasher()
    buf = bytearray(MiB)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(memoryview(buf)[:n])
            total += n
            if total % (64 * MiB) == 0:
                sampler.progress = f"{what} {total / GiB:.2f}/{size / GiB:.2f} GiB"
    return h.hexdigest(), total


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="Check that the hafs daemon's RSS stays within cache_mb + write_buffer_mb"
        " + an overhead allowance while a large file is written, copied and read back.",
    )
    ap.add_argument(
        "--size-gib", type=float, default=5.0, help="size of the file to write (default 5)"
    )
    ap.add_argument(
        "--dir",
        type=Path,
        default=Path("/var/tmp"),
        help="where the temporary hafs home is made (default /var/tmp)",
    )
    ap.add_argument(
        "-o",
        dest="options",
        metavar="OPTIONS",
        default=None,
        help="mount options for 'hafs mount -o' (default: none)",
    )
    ap.add_argument(
        "--overhead-mib",
        type=int,
        default=256,
        help="allowance above cache_mb + write_buffer_mb (default 256)",
    )
    ap.add_argument("--interval", type=float, default=0.2, help="RSS sampling period (s)")
    ap.add_argument(
        "--json",
        dest="json_out",
        type=Path,
        metavar="OUT",
        help="write the report and every RSS sample as JSON to OUT",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    if args.size_gib <= 0:
        ap.error("--size-gib must be positive")
    if not args.dir.is_dir():
        ap.error(f"--dir {args.dir} is not a directory")
    if bench.fs_of(args.dir)[1] == "tmpfs":
        ap.error(f"--dir {args.dir} is a tmpfs: its files would count as memory; use a disk")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    bench.install_sigterm_handler()
    size_mib = int(round(args.size_gib * 1024))
    size = size_mib * MiB
    try:
        cache_mb, wbuf_mb = configured_limits(args.options)
    except Exception as e:  # a UserError from hafs: unknown option, bad value
        print(f"memcheck: bad -o: {e}", file=sys.stderr)
        return 2
    bound = (cache_mb + wbuf_mb + args.overhead_mib) * MiB
    replicas = 2
    # file + copy, each block stored R times (the copy is free if dedup works) + 2 GiB
    need = 2 * size * replicas + 2 * GiB
    free = shutil.disk_usage(args.dir).free
    if free < need:
        print(
            f"memcheck: {args.dir} has {free / GiB:.1f} GiB free; writing {args.size_gib:g} GiB"
            f" and copying it with R={replicas} needs {need / GiB:.1f} GiB"
            f" (2 x size x R + 2 GiB margin)",
            file=sys.stderr,
        )
        return 2

    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    info = bench.machine_info(args.dir)
    tmp = Path(tempfile.mkdtemp(prefix="hafs-memcheck-", dir=args.dir))
    home, mnt = tmp / "home", tmp / "mnt"
    mnt.mkdir()
    log(f"temporary directory {tmp}; {free / GiB:.1f} GiB free, {need / GiB:.1f} GiB needed")
    hafs = bench.hafs_cmd()
    report: dict = {
        "started": started,
        "size_gib": args.size_gib,
        "options": args.options,
        "cache_mb": cache_mb,
        "write_buffer_mb": wbuf_mb,
        "overhead_mib": args.overhead_mib,
        "bound_mib": bound // MiB,
        "hash": HASH_NAME,
        "phases": {},
        **info,
    }
    phases: dict[str, dict] = report["phases"]
    failures: list[str] = []
    sampler: Sampler | None = None
    rc = 0
    t_all = time.monotonic()
    try:
        r = bench.run_shielded([*hafs, "mkfs", "--home", str(home)], timeout=120)
        if not r:
            raise RuntimeError(f"hafs mkfs failed (rc={r.rc}): {r.err.strip()}")
        cmd = [*hafs, "mount", "--home", str(home)]
        if args.options:
            cmd += ["-o", args.options]
        r = bench.run_shielded([*cmd, str(mnt)], timeout=120)
        if not r or not bench.mounted_at(mnt):
            raise RuntimeError(
                f"'{' '.join(cmd)} {mnt}' failed (rc={r.rc}): {(r.err or r.out).strip()}"
            )
        pid = bench.hafs_daemon_pid(home, mnt)
        if pid is None:
            raise RuntimeError(f"cannot find the daemon's pid ({home}/mount.pid, {home}/run/)")
        log(f"mounted {mnt}, daemon pid {pid}, options: {args.options or 'defaults'}")
        sampler = Sampler(pid, args.interval)
        if not sampler.reset_hwm():
            log("  (cannot reset the kernel peak-RSS counter; using the samples only)")
        sampler.start()
        time.sleep(1.0)
        report["rss_after_mount_mib"] = (
            round(sampler.samples[-1][2] / MiB, 1) if sampler.samples else None
        )

        big, copy = mnt / "big.bin", mnt / "big.copy"

        # --- write
        sampler.set_phase("write")
        log(f"write: {size_mib} MiB of os.urandom data in 1 MiB writes, then fsync")
        digest, t_write, t_fsync = write_phase(big, size_mib, sampler)
        sampler.end_phase_hwm()
        phases["write"] = {
            "seconds": round(t_write + t_fsync, 1),
            "write_s": round(t_write, 1),
            "fsync_s": round(t_fsync, 1),
            "mib_s": round(size_mib / (t_write + t_fsync), 1),
        }
        log(f"  {phases['write']}")

        # --- cp
        sampler.set_phase("cp")
        sampler.progress = "cp"
        drop_caches()
        log("cp: cp big.bin big.copy, then fsync the copy")
        t0 = time.monotonic()
        p = subprocess.run(["cp", str(big), str(copy)], capture_output=True, text=True)
        t1 = time.monotonic()
        if p.returncode != 0:
            raise RuntimeError(f"cp failed (rc={p.returncode}): {p.stderr.strip()}")
        fd = os.open(copy, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        t2 = time.monotonic()
        sampler.end_phase_hwm()
        phases["cp"] = {
            "seconds": round(t2 - t0, 1),
            "cp_s": round(t1 - t0, 1),
            "fsync_s": round(t2 - t1, 1),
            "mib_s": round(size_mib / (t2 - t0), 1),
        }
        log(f"  {phases['cp']}")

        # --- read
        sampler.set_phase("read")
        drop_caches()
        log("read: big.copy then big.bin, 1 MiB reads, hashed")
        t0 = time.monotonic()
        results = {}
        for name, path in (("big.copy", copy), ("big.bin", big)):
            got, n = read_hash(path, size, sampler, name)
            results[name] = (got == digest and n == size, n)
            if n != size:
                failures.append(f"{name}: read {n} bytes, expected {size}")
            elif got != digest:
                failures.append(f"{name}: {HASH_NAME} {got} differs from the written {digest}")
        t1 = time.monotonic()
        sampler.end_phase_hwm()
        phases["read"] = {
            "seconds": round(t1 - t0, 1),
            "mib_s": round(2 * size_mib / (t1 - t0), 1),
            "intact": {k: v[0] for k, v in results.items()},
        }
        log(f"  {phases['read']}")

        # --- umount (flush + exit); the daemon's last moments are sampled too
        sampler.set_phase("umount")
        sampler.progress = "umount"
        t0 = time.monotonic()
        ok = bench.unmount(mnt, "hafs", home)
        sampler.end_phase_hwm()  # no-op if the daemon has gone already
        phases["umount"] = {"seconds": round(time.monotonic() - t0, 1)}
        if not ok:
            failures.append(f"{mnt} could not be unmounted")
    except KeyboardInterrupt:
        log("\ninterrupted: cleaning up")
        rc = 130
    except Exception as e:  # noqa: BLE001 - report hafs failures, then clean up
        failures.append(f"{type(e).__name__}: {e}")
        log(f"FAILED: {type(e).__name__}: {e}")
    finally:
        if sampler is not None:
            sampler.stop()
        if bench.mounted_at(mnt):
            if not bench.unmount(mnt, "hafs", home):
                failures.append(f"{mnt} could not be unmounted")
    report["total_s"] = round(time.monotonic() - t_all, 1)

    # ---- verdict
    problems = bench.log_problems(home / "hafs.log")
    lines = [
        f"hafs memcheck  {started}",
        f"machine : {info['host']}: {info['nproc']} CPUs, {info['memory']} RAM, kernel"
        f" {info['kernel']}; {info['workdir']}: {info['workdir_fs']};"
        f" load average at start {info['loadavg_start']}",
        f"hafs    : revision {info['hafs_revision']}; mkfs defaults (R=2, 3 backing dirs);"
        f" mount options: {args.options or 'defaults'}",
        f"data    : one {args.size_gib:g} GiB file of os.urandom data, 1 MiB writes;"
        f" {HASH_NAME} computed while writing and while reading back",
        f"limits  : cache_mb {cache_mb} + write_buffer_mb {wbuf_mb} = {cache_mb + wbuf_mb} MiB;"
        f" bound = that + {args.overhead_mib} MiB overhead = {bound // MiB} MiB",
    ]
    if sampler is not None:
        lines.append(
            f"RSS after mount (idle): {report.get('rss_after_mount_mib')} MiB;"
            f" {len(sampler.samples)} samples every {args.interval} s"
        )
        lines.append("")
        lines.append(
            f"{'phase':<7} {'time':>8} {'rate':>12} {'peak RSS sampled':>17}"
            f" {'peak RSS (VmHWM)':>17} {'peak anon':>10} {'RSS at end':>11}  verdict"
        )
        worst = 0
        for ph in ("write", "cp", "read", "umount"):
            if ph not in phases and ph not in sampler.peak:
                continue
            d = phases.get(ph, {})
            ps, hw = sampler.peak.get(ph), sampler.hwm.get(ph)
            pa, end = sampler.peak_anon.get(ph), sampler.last.get(ph)
            peak = max(x for x in (ps, hw, 0) if x is not None)
            worst = max(worst, peak)
            verdict = "ok" if peak <= bound else f"OVER by {(peak - bound) / MiB:.0f} MiB"
            d.update(
                peak_rss_sampled_mib=round(ps / MiB, 1) if ps else None,
                peak_rss_hwm_mib=round(hw / MiB, 1) if hw else None,
                peak_anon_mib=round(pa / MiB, 1) if pa else None,
                rss_at_end_mib=round(end / MiB, 1) if end else None,
                verdict=verdict,
            )
            phases[ph] = d
            rate = f"{d['mib_s']} MiB/s" if "mib_s" in d else ""
            secs = f"{d['seconds']} s" if "seconds" in d else "-"
            lines.append(
                f"{ph:<7} {secs:>8} {rate:>12} "
                f"{(f'{ps / MiB:.1f} MiB' if ps else '-'):>17} "
                f"{(f'{hw / MiB:.1f} MiB' if hw else '-'):>17} "
                f"{(f'{pa / MiB:.0f} MiB' if pa else '-'):>10} "
                f"{(f'{end / MiB:.0f} MiB' if end else '-'):>11}  {verdict}"
            )
            if peak > bound:
                failures.append(f"{ph}: peak RSS {peak / MiB:.1f} MiB > bound {bound // MiB} MiB")
        report["peak_rss_mib"] = round(worst / MiB, 1)
        lines.append("")
        if "read" in phases:
            intact = phases["read"]["intact"]
            lines.append(
                "data    : "
                + ", ".join(f"{k} {'identical' if v else 'DIFFERENT'}" for k, v in intact.items())
                + f" ({HASH_NAME} {digest[:16]}...)"
            )
        lines.append(
            f"overall peak RSS {worst / MiB:.1f} MiB vs bound {bound // MiB} MiB"
            f" ({100 * worst / bound:.0f}% of the bound)"
        )
        if sampler.gone and "umount" not in phases:
            failures.append(f"the daemon (pid {sampler.pid}) exited during the run")
    if problems:
        lines.append(f"hafs.log: {len(problems)} warning/error lines, e.g.: {problems[0]}")
    warn = bench.busy_warning(info)
    if warn:
        lines.append(warn)
    lines.append(f"total time {report['total_s']} s; load average at the end {bench.loadavg()}")
    report["failures"] = failures
    if failures:
        lines.append("FAIL: " + "; ".join(failures))
        lines.append(f"--- tail of {home / 'hafs.log'} ---")
        lines.append(bench.log_tail(home / "hafs.log"))
        rc = rc or 1
    elif rc == 0:
        lines.append("PASS: memory stayed within the bound and the data read back intact")
    print("\n".join(lines))

    if args.json_out:
        report["samples_fields"] = ["seconds", "phase", "rss_bytes", "rss_anon_bytes"]
        report["samples"] = [
            (round(t, 2), ph, rss, anon)
            for t, ph, rss, anon in (sampler.samples if sampler else [])
        ]
        args.json_out.write_text(json.dumps(report, indent=1))
        print(f"report and samples: {args.json_out}")
    if args.keep or bench.mounts_under(tmp):
        log(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    if bench.INTERRUPTED and rc == 0:
        rc = 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
